"""The numba backend: the CPU kernels of localmix.kernels on the packed weights; float matrices
(routers, a float checkpoint's weights) still go through numpy."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from localmix import kernels
from localmix.model import Ops, SequenceBatch, expert_ffn
from localmix.store import is_quantized


class NumbaOps(Ops):
    """The Numba kernels. A decoded token's attention half runs in two or three compiled calls
    (kernels.decode_qkv, then decode_attention, or attend and attention_out for several sequences
    decoded together) and its experts in one (decode_experts), from kernel tables made once per
    layer and kept here (`plans`, by layer index)."""

    FUSED_ROWS = 32  # up to this many rows (decoded tokens), the experts go through decode_experts

    def __init__(self):
        self.plans: dict[int, FusedPlan | None] = {}

    @staticmethod
    def rms_norm(x, weight, eps):
        return kernels.rms_norm(np.ascontiguousarray(x, np.float32), weight, np.float32(eps))

    @staticmethod
    def apply_rope(x, positions, inv_freq):
        return kernels.apply_rope(np.ascontiguousarray(x), np.asarray(positions, np.int64), inv_freq)

    @staticmethod
    def attend(q, keys, values, positions, sliding_window, sinks=None):
        if sinks is not None:  # gpt-oss's attention sinks: numpy's (correct first; no kernel yet)
            return Ops.attend(q, keys, values, positions, sliding_window, sinks)
        return kernels.attend(q, keys, values, positions, sliding_window)

    @staticmethod
    def route_tokens(x, router, k, renormalize=True, bias=None):
        bias = np.zeros(len(router), np.float32) if bias is None else np.asarray(bias, np.float32)
        return kernels.route_tokens(np.ascontiguousarray(x, np.float32), router, k, renormalize, bias)

    @staticmethod
    def linears(x, ws):
        if all(is_quantized(w) for w in ws):
            return kernels.matmul_many(x, ws)
        return Ops.linears(x, ws)

    @staticmethod
    def experts_ffn(x, experts, counts):
        if not is_quantized(experts[0].w1):
            return Ops.experts_ffn(x, experts, counts)
        if experts[0].plain:
            return kernels.experts_ffn(x, experts, counts)
        # gpt-oss's biases and clamped SwiGLU in numpy, its products on the kernels
        return Ops.experts_ffn(x, experts, counts, NumbaOps.linears)

    def attention_block(self, x, layer, args, cache, index, positions, inv_freq):
        """One decoded token (or one token of each of several sequences decoded together: a
        SequenceBatch, whose products read each weight once for all of them while attention is
        each sequence's own) in the fused kernels; prompts and layers they do not take go
        operation by operation."""
        if index not in self.plans:
            self.plans[index] = fused_plan(layer, args)
        plan = self.plans[index]
        caches = cache.caches if isinstance(cache, SequenceBatch) else [cache]
        if x.shape[0] != len(caches) or plan is None:
            return Ops.attention_block(self, x, layer, args, cache, index, positions, inv_freq)
        heads, kv_heads, dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        positions = np.asarray(positions, np.int64)
        eps, window = np.float32(args.rms_norm_eps), args.window(index) or 0
        x = np.ascontiguousarray(x, np.float32)
        q, k, v = kernels.decode_qkv(x, layer.attention_norm, eps, plan.qkv, *plan.qkv_format, heads, kv_heads, dim,
                                     positions, inv_freq)
        rest = (plan.o, *plan.o_format, layer.ffn_norm, eps)
        if len(caches) == 1:
            keys, values = kernels.kernel_cache(*cache.update(index, k[0], v[0]))
            return kernels.decode_attention(x, q, keys, values, positions, window, kernels.HALF_TO_FLOAT, *rest)
        attended = np.concatenate([kernels.attend(q[i:i + 1], *c.update(index, k[i:i + 1], v[i:i + 1]),
                                                  positions[i:i + 1], window) for i, c in enumerate(caches)])
        return kernels.attention_out(x, attended, *rest)

    def mix_experts(self, h, chosen, weights, source, groups):
        """A few rows (decoded tokens) through decode_experts, one call per format of the chosen
        experts in each group; more rows, float experts or widths the vector kernels do not take,
        through the grouped products of model.mix_experts. Each row sums its experts in index order
        whatever order the groups come in (an expert cache gives those it holds first), so the sum
        is the resident model's bit for bit."""
        if len(h) > NumbaOps.FUSED_ROWS or not source.on_vector_kernels() or not kernels.has_vector_kernels():
            return Ops.mix_experts(self, h, chosen, weights, source, groups)
        h = np.ascontiguousarray(h, np.float32)
        chosen, weights = np.ascontiguousarray(chosen, np.int64), np.ascontiguousarray(weights, np.float32)
        added = []  # (expert, its rows, its output there times their weights)
        for ids, experts in groups:
            if not experts[0].plain:  # gpt-oss's biases and clamped SwiGLU: not fused (no kernel yet)
                added += expert_outputs(h, chosen, weights, ids, experts)
                continue
            formats: dict = {}  # one call for the experts of each format (shadow copies have their own)
            for e, expert in zip(ids, experts):
                w1, w2 = expert.w1, expert.w2
                formats.setdefault((w1.bits, w1.group_size, w2.bits, w2.group_size), []).append((e, expert))
            for (up_bits, up_group, down_bits, down_group), members in formats.items():
                some = [expert for _, expert in members]
                up = one_token_rows([e.w1 for e in some] + [e.w3 for e in some])
                down = one_token_rows([e.w2 for e in some])
                ids_here = np.array([e for e, _ in members], np.int64)
                rows, y, counts = kernels.decode_experts(h, chosen, weights, ids_here, up, up_bits, up_group,
                                                         down, down_bits, down_group)
                ends = np.cumsum(counts)[:-1]
                added += zip(ids_here.tolist(), np.split(rows, ends), np.split(y, ends))
        out = np.zeros_like(h)
        for _, rows, y in sorted(added, key=lambda one: one[0]):
            out[rows] += y
        return out


def expert_outputs(h: np.ndarray, chosen: np.ndarray, weights: np.ndarray, ids, experts) -> list:
    """(expert, rows, output) of each of these experts over the rows that chose it, by weight: the
    kernels' matrix products, the biases and activation in numpy."""
    outputs = []
    for e, expert in zip(ids, experts):
        rows, slots = np.nonzero(chosen == e)
        outputs.append((int(e), rows, expert_ffn(h[rows], expert, NumbaOps.linears) * weights[rows, slots, None]))
    return outputs


def one_token_rows(matrices, cols=None) -> np.ndarray:
    """The kernel's job table for one token through these matrices (output columns `cols`)."""
    table = np.array([kernels.matrix_row(m) for m in matrices], np.int64)
    table[:, kernels.TOKENS] = 1
    if cols is not None:
        table[:, kernels.OUT_COL] = cols
    return table


class FusedPlan(NamedTuple):
    qkv: np.ndarray      # kernel table rows of wq, wk, wv, side by side in one output
    qkv_format: tuple    # (bits, group size)
    o: np.ndarray
    o_format: tuple


def fused_plan(layer, args) -> FusedPlan | None:
    """The kernel tables of a layer's attention matrices and its formats; None where the fused
    kernels do not take the layer: float weights, q, k and v in different formats, widths the vector
    kernels do not take, or a family's attention extras (biases, q/k norms, clamping, GraniteMoE's
    multipliers, gpt-oss's sinks and YaRN), which go operation by operation."""
    matrices = [layer.wq, layer.wk, layer.wv, layer.wo]
    plain = not (args.qkv_bias or args.o_bias or args.qk_norm or args.clip_qkv is not None
                 or args.attention_multiplier is not None or args.residual_multiplier != 1
                 or args.attention_sinks or args.rope_scaling is not None)
    if not (plain and all(is_quantized(m) for m in matrices) and kernels.has_vector_kernels()):
        return None

    def fmt(ms):  # the one format of these matrices, if the vector kernels run it on their widths
        formats = {(m.bits, m.group_size) for m in ms}
        runs = all(kernels.runs_vector(m.bits, m.group_size, m.shape[1]) for m in ms)
        return formats.pop() if len(formats) == 1 and runs else None

    qkv = [layer.wq, layer.wk, layer.wv]
    formats = fmt(qkv), fmt([layer.wo])
    if None in formats:
        return None
    sizes = [m.words.shape[0] for m in qkv]
    return FusedPlan(one_token_rows(qkv, [0, sizes[0], sizes[0] + sizes[1]]), formats[0],
                     one_token_rows([layer.wo]), formats[1])
