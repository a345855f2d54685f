"""A decoded token's layer in four compiled calls (decode_qkv, decode_attention or attention_out,
route_tokens, decode_experts).

One token's layer is about 60 small operations; run from Python one by one, the time between them
was a third of the token's. Here they run in three compiled calls: between them, numpy writes the
KV cache (converting to float16 where asked) and the chosen experts are looked up (from an expert
cache, when the model runs within a memory budget). The math is the model's, step by step. Several
sequences decoded together (a server's answers) take the same calls with a row each, except
attention, which is each sequence's own (attend, then attention_out).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from localmix.kernels.activations import _quantized
from localmix.kernels.experts import _swiglu_serial
from localmix.kernels.products import OUT_COL, OUT_ROW, ROWS, TOKENS, X_ROW, _vector_matmul
from localmix.kernels.small_ops import _attend, apply_rope, rms_norm


@njit(cache=True, nogil=True)
def _products(x, table, bits, group_size, rows, width):
    """x (float) times the table's matrices, into [rows, width]."""
    xq, dx, sums, sums_by_token = _quantized(x, bits, group_size)
    out = np.empty((rows, width), np.float32)
    _vector_matmul(table, xq, dx, sums, sums_by_token, out, bits, group_size)
    return out


@njit(cache=True, nogil=True)
def _with_tokens(table, tokens):
    """A copy of a job table whose jobs take `tokens` activation rows (the plan's take one)."""
    table = table.copy()
    table[:, TOKENS] = tokens
    return table


@njit(cache=True, nogil=True)
def decode_qkv(x, norm, eps, qkv, bits, group_size, heads, kv_heads, dim, positions, inv_freq):
    """RMSNorm, q k v, RoPE: the attention's inputs for one token, or for one token of each of
    several sequences decoded together (a row each)."""
    T = x.shape[0]
    out = _products(rms_norm(x, norm, eps), _with_tokens(qkv, T), bits, group_size, T, (heads + 2 * kv_heads) * dim)
    q = apply_rope(out[:, :heads * dim].copy().reshape(T, heads, dim), positions, inv_freq)
    k = apply_rope(out[:, heads * dim:(heads + kv_heads) * dim].copy().reshape(T, kv_heads, dim), positions, inv_freq)
    return q, k, out[:, (heads + kv_heads) * dim:].copy().reshape(T, kv_heads, dim)


@njit(cache=True, nogil=True)
def decode_attention(x, q, keys, values, positions, window, half, o, o_bits, o_group, norm, eps):
    """Attention over the cache and the rest of attention_out, for one token."""
    heads, dim = q.shape[1], q.shape[2]
    attended = np.empty((1, heads * dim), np.float32)
    _attend(q, keys, values, positions, window, half, attended)
    return attention_out(x, attended, o, o_bits, o_group, norm, eps)


@njit(cache=True, nogil=True)
def attention_out(x, attended, o, o_bits, o_group, norm, eps):
    """The attention's output projection added to x, and the MoE block's norm of that, for each
    row: returns x and the normed h."""
    T = x.shape[0]
    x = x + _products(attended, _with_tokens(o, T), o_bits, o_group, T, x.shape[1])
    return x, rms_norm(x, norm, eps)


@njit(cache=True, nogil=True)
def decode_experts(h, chosen, weights, experts, up, up_bits, up_group, down, down_bits, down_group):
    """The SwiGLU of each row of h by these experts (ids) where chosen, times its weight: (rows,
    added, counts), the (row, expert) pairs grouped by expert in the order of `experts`, counts[j]
    of them for experts[j], for the caller to
    add to the block's output in index order (NumbaOps.mix_experts: the experts may come in several
    calls, a format or a group of an expert cache at a time). up: the table rows of the experts' w1
    then their w3, down: of their w2. Each expert's rows go through its weights together: one read
    of them for all the sequences decoded together that chose it."""
    n = experts.size
    pairs = 0
    for j in range(n):
        pairs += np.count_nonzero(chosen == experts[j])
    rows, scale, counts = np.empty(pairs, np.int64), np.empty(pairs, np.float32), np.empty(n, np.int64)
    hs = np.empty((pairs, h.shape[1]), np.float32)
    p = 0
    for j in range(n):  # (row, expert) pairs grouped by expert
        up[j, X_ROW] = up[n + j, X_ROW] = down[j, X_ROW] = p
        up[j, OUT_ROW] = up[n + j, OUT_ROW] = down[j, OUT_ROW] = p
        for t in range(chosen.shape[0]):
            for slot in range(chosen.shape[1]):
                if chosen[t, slot] == experts[j]:
                    rows[p], scale[p] = t, weights[t, slot]
                    hs[p] = h[t]
                    p += 1
        counts[j] = up[j, TOKENS] = up[n + j, TOKENS] = down[j, TOKENS] = p - up[j, X_ROW]
        up[n + j, OUT_COL] = up[0, ROWS]
    gate_up = _products(hs, up, up_bits, up_group, pairs, 2 * up[0, ROWS])
    y = _products(_swiglu_serial(gate_up), down, down_bits, down_group, pairs, h.shape[1])
    for p in range(pairs):
        y[p] *= scale[p]
    return rows, y, counts
