"""The MLX backend: a layer's attention and experts on Apple's GPU through MLX (Metal), on the same
files. localmix's format is MLX's affine quantization (packed uint32 words, a scale and a bias
per group), so `mx.quantized_matmul` takes the stored matrices as they are.

On Linux, `pip install mlx[cpu]` runs the same code on the CPU: that is how the tests check it
against the numpy reference. Activations run in float16 (`mlx`, the speed MLX is built for) or
float32 (`mlx-f32`, for exactness); routers always in float32. The residual stream stays an MLX
array from the first layer to the head, and is evaluated once per model call, when the logits
come back to numpy. With every expert resident, the routing stays on the device too (the experts
stacked and applied by mx.gather_qmm, as mlx-lm's SwitchGLU does): a decoded token is one wait of
the host, the statistics read back with later tokens' (routing.LayerRouting.count). Within a
memory budget, or where steering or a trace needs the choice, it comes to numpy once per layer:
the expert cache must know which experts a token chose before their weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import numpy as np

from localmix.errors import LocalmixError
from localmix.kv_cache import KVCache
from localmix.model import Ops, SequenceBatch
from localmix.store import is_quantized


def allocate_slots(shape) -> np.ndarray:
    """The expert cache's slots as MLX memory (unified memory on Apple Silicon), seen from numpy so
    that the cache reads the expert files straight into it."""
    buffer = mx.zeros(shape, mx.uint8)
    mx.eval(buffer)
    return np.asarray(buffer)  # shares the MLX array's memory, and keeps it alive


def mlx_view(a: np.ndarray, dtype) -> mx.array:
    """An MLX array for a numpy array: a view where the numpy one lies in MLX memory (an expert
    cache's slot), else a copy."""
    owner = a
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    owner = getattr(owner, "obj", owner)
    if not isinstance(owner, mx.array):
        return mx.array(a)
    offset = a.ctypes.data - np.asarray(owner).ctypes.data
    return owner.reshape(-1)[offset:offset + a.nbytes].view(dtype).reshape(a.shape)


def mlx_vector(v: np.ndarray, dtype) -> mx.array:
    return mx.array(np.asarray(v, np.float32)).astype(dtype)


def to_host(*arrays: mx.array) -> list[np.ndarray]:
    """MLX arrays as numpy, computed together: the host waits for the device once. Every such wait
    of the backend goes through here (tests count them)."""
    mx.eval(*arrays)
    return [np.array(a) for a in arrays]


# The experts' activations compiled, as mlx-lm compiles its own: mx.compile fuses their element-wise
# steps into one kernel, which on a GPU saves launches and memory passes. On mlx[cpu] the mini model
# decodes as fast either way (3.33 tok/s before, 3.28-3.35 after: scripts/mlx_waits.py, where the
# quantized products are the time); on Metal it is unmeasured here (scripts/mac_bench.sh).
@partial(mx.compile, shapeless=True)
def swiglu(gate, up):
    return gate * mx.sigmoid(gate) * up


@partial(mx.compile, shapeless=True)
def clamped_swiglu(gate, up, alpha: float, limit: float):
    gate, up = mx.minimum(gate, limit), mx.clip(up, -limit, limit)
    return (up + 1) * (gate * mx.sigmoid(gate * alpha))


def activation(gate, up, glu) -> mx.array:
    """The experts' activation: SwiGLU's, or gpt-oss's clamped one (model.ClampedSwiGLU)."""
    return swiglu(gate, up) if glu is None else clamped_swiglu(gate, up, glu.alpha, glu.limit)


SORT_FROM = 64  # routed rows (tokens x k) from which a prompt's rows are sorted by expert (mlx-lm's)


@dataclass
class StackedExperts:
    """A layer's experts stacked: each matrix as MLX's (words, scales, biases, bits, group size) over
    [experts, rows, ...]; gpt-oss's biases [experts, rows] and clamped SwiGLU."""
    w1: tuple
    w2: tuple
    w3: tuple
    b1: mx.array | None
    b2: mx.array | None
    b3: mx.array | None
    glu: object


class MLXKVCache(KVCache):
    """Keys and values as MLX arrays [1, kv_heads, capacity, head_dim] per layer, float32 or float16
    (dtype: --kv-cache's, made float16 by the backend where the activations are), grown in steps
    as mlx-lm's cache is."""

    STEP = 256

    def __init__(self, args, capacity: int = 256, dtype=np.float32, allowance=None):
        self.allowance = allowance
        self.allocated = 0  # (both first: __del__ reads them whatever fails below)
        self.dtype = mx.float16 if np.dtype(dtype) == np.float16 else mx.float32
        self.max_length = args.max_position_embeddings
        self.layers, self.heads, self.head_dim = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
        self.keys, self.values = [None] * self.layers, [None] * self.layers
        self.length = 0
        self.reserve(capacity)

    def _bytes(self, tokens: int) -> int:
        return 2 * self.layers * self.heads * self.head_dim * self.dtype.size * tokens

    def __del__(self):
        if self.allowance is not None and self.allocated:
            self.allowance.give_back(self._bytes(self.allocated))

    @property
    def capacity(self) -> int:
        return self.allocated

    def reserve(self, length: int) -> None:
        if length > self.max_length:
            raise LocalmixError(f"context full: {length} tokens exceed the model's {self.max_length}-token context")
        if length > self.allocated and self.allowance is not None:
            self.allowance.take(self._bytes(length - self.allocated))
        self.allocated = max(self.allocated, length)

    def update(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """The layer's keys and values with these added, in the dtype of those given."""
        end = self.length + keys.shape[2]
        if self.keys[layer] is None or self.keys[layer].shape[2] < end:
            size = -(-end // self.STEP) * self.STEP
            grown = [mx.zeros((1, self.heads, size, self.head_dim), self.dtype) for _ in range(2)]
            if self.keys[layer] is not None:
                grown[0][:, :, :self.length] = self.keys[layer][:, :, :self.length]
                grown[1][:, :, :self.length] = self.values[layer][:, :, :self.length]
            self.keys[layer], self.values[layer] = grown
        self.keys[layer][:, :, self.length:end] = keys.astype(self.dtype)
        self.values[layer][:, :, self.length:end] = values.astype(self.dtype)
        return self.keys[layer][:, :, :end].astype(keys.dtype), self.values[layer][:, :, :end].astype(keys.dtype)


def attention_mask(positions: np.ndarray, keys: int, window: int | None, dtype) -> mx.array | None:
    """Additive mask [T, keys]: causal, and within the sliding window where there is one."""
    if len(positions) == 1 and (window is None or keys <= window):
        return None
    key_positions = np.arange(keys)[None, :]
    allowed = key_positions <= positions[:, None]
    if window is not None:
        allowed &= key_positions > positions[:, None] - window
    return mx.array(np.where(allowed, 0.0, -np.inf).astype(np.float32)).astype(dtype)


class MLXOps(Ops):
    """float16 activations. What it makes from the weights (MLX copies of resident matrices, norms
    and routers) it keeps in `arrays`, by the id of the numpy array it came from (held too, so
    the id stays its own)."""
    dtype = mx.float16
    allocate_slots = staticmethod(allocate_slots)

    def kv_cache(self, args, capacity: int, dtype, allowance=None) -> MLXKVCache:
        """A sequence's cache: float16 where the activations are (their keys and values are float16
        already), else --kv-cache's dtype."""
        return MLXKVCache(args, capacity, np.float16 if self.dtype == mx.float16 else dtype, allowance)

    def __init__(self):
        self.arrays: dict[tuple[int, object], tuple[object, object]] = {}

    def _made(self, source, dtype, make):
        key = (id(source), dtype)
        if key not in self.arrays:
            self.arrays[key] = (source, make())
        return self.arrays[key][1]

    def vector(self, v: np.ndarray, dtype) -> mx.array:
        return self._made(v, dtype, lambda: mlx_vector(v, dtype))

    def matrix(self, m, dtype) -> tuple:
        """(words, scales, biases, bits, group size) as MLX arrays. Resident matrices are copied
        into MLX once and kept; an expert cache's are views of their slot, made at each use (the
        slot holds another expert once this one is evicted)."""
        def make():
            return (mlx_view(m.words, mx.uint32), mlx_view(m.scales, mx.float16).astype(dtype),
                    mlx_view(m.biases, mx.float16).astype(dtype), m.bits, m.group_size)
        return make() if m.transient else self._made(m, dtype, make)

    def linear(self, x: mx.array, m) -> mx.array:
        """x @ W.T for a quantized matrix (or a float one)."""
        if not is_quantized(m):
            return x @ self._made(m, x.dtype, lambda: mx.array(np.asarray(m, np.float32)).astype(x.dtype)).T
        words, scales, biases, bits, group_size = self.matrix(m, x.dtype)
        return mx.quantized_matmul(x, words, scales, biases, transpose=True, group_size=group_size, bits=bits)

    def to_mlx(self, x) -> mx.array:
        return x if isinstance(x, mx.array) else mx.array(np.asarray(x, np.float32)).astype(self.dtype)

    def rms_norm(self, x, weight, eps):
        x = self.to_mlx(x)
        return mx.fast.rms_norm(x, self.vector(weight, x.dtype), eps)

    def linears(self, x, ws):
        return [self.linear(self.to_mlx(x), w) for w in ws]

    @staticmethod
    def sigmoid(x):
        return mx.sigmoid(x)

    def logits(self, x, norm, lm_head, eps):
        """The head: float32 numpy logits, which evaluates the token's whole graph once."""
        return to_host(self.linear(self.rms_norm(x, norm, eps), lm_head).astype(mx.float32))[0]

    def attention_block(self, x, layer, args, cache, index, positions, inv_freq):
        x = self.to_mlx(x)
        eps = args.rms_norm_eps
        attended = self.attention(self.rms_norm(x, layer.attention_norm, eps), layer, args, cache, index,
                                  np.asarray(positions), inv_freq)
        x = x + (attended if args.residual_multiplier == 1 else attended * args.residual_multiplier)  # (GraniteMoE's)
        return x, self.rms_norm(x, layer.ffn_norm, eps)

    def attention(self, x: mx.array, layer, args, cache: MLXKVCache, index: int, positions: np.ndarray,
                  inv_freq: np.ndarray) -> mx.array:
        """model.attention in MLX: the family's extras (biases, q/k norms, clamping, sinks), rotary
        embedding (YaRN's through its frequencies), attention over the cache, output projection."""
        T, heads, kv_heads, dim = x.shape[0], args.num_attention_heads, args.num_key_value_heads, args.head_dim
        eps = args.rms_norm_eps
        q, k, v = self.linears(x, [layer.wq, layer.wk, layer.wv])
        if args.qkv_bias:
            q, k, v = (a + self.vector(b, x.dtype) for a, b in ((q, layer.bq), (k, layer.bk), (v, layer.bv)))
        if args.qk_norm == "projection":
            q, k = self.rms_norm(q, layer.q_norm, eps), self.rms_norm(k, layer.k_norm, eps)
        if args.clip_qkv is not None:
            q, k, v = (mx.clip(a, -args.clip_qkv, args.clip_qkv) for a in (q, k, v))
        q, k, v = q.reshape(1, T, heads, dim), k.reshape(1, T, kv_heads, dim), v.reshape(1, T, kv_heads, dim)
        if args.qk_norm == "head":
            q, k = self.rms_norm(q, layer.q_norm, eps), self.rms_norm(k, layer.k_norm, eps)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        if isinstance(cache, SequenceBatch):  # a token of each sequence, each attending to its own cache
            out = mx.concatenate([self.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], layer, args, c,
                                              index, positions[i:i + 1], inv_freq) for i, c in enumerate(cache.caches)],
                                 axis=2)
        else:
            out = self.attend(q, k, v, layer, args, cache, index, positions, inv_freq)
        out = self.linear(out.transpose(0, 2, 1, 3).reshape(T, heads * dim), layer.wo)
        return out + self.vector(layer.bo, x.dtype) if args.o_bias else out

    def attend(self, q, k, v, layer, args, cache: MLXKVCache, index: int, positions: np.ndarray,
               inv_freq: np.ndarray) -> mx.array:
        """One sequence's rows ([1, heads, T, dim] each): rotary embedding, then attention over its cache."""
        dim = args.head_dim
        # transformers' rotate-half RoPE is MLX's non-traditional one; YaRN's frequencies are given
        # as periods, and its attention factor (transformers scales cos and sin) scales q and k.
        if args.rope_scaling is None:
            rope = dict(base=args.rope_theta)
        else:
            rope = dict(base=None, freqs=self._made(inv_freq, "periods", lambda: mx.array(1.0 / inv_freq)))
        q = mx.fast.rope(q, dim, traditional=False, scale=1.0, offset=int(positions[0]), **rope)
        k = mx.fast.rope(k, dim, traditional=False, scale=1.0, offset=int(positions[0]), **rope)
        if args.rope_scaling is not None:
            q, k = q * args.rope_scaling.attention_factor, k * args.rope_scaling.attention_factor
        keys, values = cache.update(index, k, v)
        mask = attention_mask(positions, keys.shape[2], args.window(index), q.dtype)
        scale = dim ** -0.5 if args.attention_multiplier is None else args.attention_multiplier
        sinks = None if layer.sinks is None else self.vector(layer.sinks, q.dtype)
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask, sinks=sinks)

    def route(self, h, router, k, renormalize=True, bias=None) -> tuple[mx.array, mx.array]:
        """model.route_tokens in float32, left on the device: ([T, k] experts, weights)."""
        logits = self.to_mlx(h).astype(mx.float32) @ self.vector(router, mx.float32).T
        if bias is not None:
            logits = logits + self.vector(bias, mx.float32)
        probs = mx.softmax(logits, axis=-1)
        chosen = mx.argsort(-probs, axis=-1)[:, :k]
        weights = mx.take_along_axis(probs, chosen, axis=-1)
        if renormalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return chosen, weights

    def route_tokens(self, h, router, k, renormalize=True, bias=None):
        """model.route_tokens brought to numpy: where the experts come from a cache, or steering or a
        trace needs the choice, the host must know it before the experts' weights are read."""
        chosen, weights = to_host(*self.route(h, router, k, renormalize, bias))
        return chosen.astype(np.int64), weights

    def routed_experts_on_device(self, h, layer, args, call):
        """The routed experts without the host: the layer's experts stacked as mlx-lm stacks them
        (SwitchGLU), each token's k applied by mx.gather_qmm and summed by weight, all left in the
        token's lazy graph (evaluated once, with the logits). None where the experts are not of one
        quantized format (their own kernels per expert then)."""
        stacked = self.stacked_experts(layer.experts)
        if stacked is None:
            return None
        h = self.to_mlx(h)
        chosen, weights = self.route(h, layer.router, call.experts_per_token, args.norm_topk_prob, layer.router_bias)
        return chosen, weights, self.mix_stacked(h, chosen, weights, stacked)

    def mix_stacked(self, h: mx.array, chosen: mx.array, weights: mx.array, stacked: "StackedExperts") -> mx.array:
        """Each row's chosen experts ([T, k] indices into the stack) applied and summed by weight."""
        T, k = chosen.shape
        if T * k >= SORT_FROM:  # a prompt: rows sorted by expert, so that each expert's weights are read once
            flat = chosen.reshape(-1)
            order = mx.argsort(flat)
            x, indices = h[order // k][:, None, :], flat[order]
            y = self.switch_glu(x, indices, stacked, sorted_indices=True)[:, 0]
            y = y[mx.argsort(order)].reshape(T, k, -1)
        else:
            y = self.switch_glu(h[:, None, None, :], chosen, stacked)[:, :, 0]
        return (y * weights.astype(y.dtype)[..., None]).sum(axis=1)

    def switch_glu(self, x: mx.array, indices: mx.array, stacked: "StackedExperts",
                   sorted_indices: bool = False) -> mx.array:
        """Each row of x through the expert its index names: w2(glu(w1 x, w3 x)), as expert_ffn."""
        def product(x, m, bias):
            words, scales, biases, bits, group_size = m
            y = mx.gather_qmm(x, words, scales, biases, rhs_indices=indices, transpose=True, group_size=group_size,
                              bits=bits, sorted_indices=sorted_indices)
            return y if bias is None else y + mx.expand_dims(bias[indices], -2)
        gate, up = product(x, stacked.w1, stacked.b1), product(x, stacked.w3, stacked.b3)
        return product(activation(gate, up, stacked.glu), stacked.w2, stacked.b2)

    def stacked_experts(self, source) -> "StackedExperts | None":
        """A resident layer's experts as MLX arrays [experts, rows, ...] per matrix, made once (None
        where they are not all quantized in one format)."""
        def make():
            experts = list(source)
            if not all(is_quantized(m) for e in experts for m in (e.w1, e.w2, e.w3)) or len(source.shapes()) != 1:
                return None
            dtype = self.dtype

            def stack(name):
                matrices = [getattr(e, name) for e in experts]
                return (mx.array(np.stack([m.words for m in matrices])),
                        mx.array(np.stack([m.scales for m in matrices])).astype(dtype),
                        mx.array(np.stack([m.biases for m in matrices])).astype(dtype),
                        matrices[0].bits, matrices[0].group_size)

            def biases(name):
                values = [getattr(e, name) for e in experts]
                return None if values[0] is None else mx.array(np.stack(values).astype(np.float32)).astype(dtype)
            return StackedExperts(stack("w1"), stack("w2"), stack("w3"), biases("b1"), biases("b2"), biases("b3"),
                                  experts[0].glu)
        return self._made(source, "stacked", make)

    def expert_ffn(self, x: mx.array, expert) -> mx.array:
        gate, up = self.linear(x, expert.w1), self.linear(x, expert.w3)
        if expert.plain:
            return self.linear(swiglu(gate, up), expert.w2)
        # gpt-oss's: biases (an expert cache's lie in its slot, to be copied at each use as its
        # matrices are) and the clamped SwiGLU, as model.expert_ffn
        transient = is_quantized(expert.w1) and expert.w1.transient
        bias = (lambda b: mlx_vector(b, x.dtype)) if transient else (lambda b: self.vector(b, x.dtype))
        if expert.b1 is not None:
            gate, up = gate + bias(expert.b1), up + bias(expert.b3)
        out = self.linear(activation(gate, up, expert.glu), expert.w2)
        return out if expert.b2 is None else out + bias(expert.b2)

    def experts_ffn(self, x, experts, counts):
        starts = np.cumsum([0] + list(counts))
        return mx.concatenate([self.expert_ffn(x[int(a):int(b)], e) for e, a, b in zip(experts, starts[:-1], starts[1:])])

    def mix_experts(self, h, chosen, weights, source, groups):
        """Each chosen expert over its rows, added in index order; resident experts of one format
        through their stack (a steered choice: a dropped expert, marked len(source), weighs 0), so
        that they are never copied into MLX a second time one by one."""
        stacked = None if source.on_demand else self.stacked_experts(source)
        if stacked is not None:
            kept = np.where(chosen < len(source), chosen, 0).astype(np.uint32)
            return self.mix_stacked(self.to_mlx(h), mx.array(kept), mx.array(np.asarray(weights, np.float32)), stacked)
        added = []  # (expert, its rows, its output there times their weights)
        for batch, experts in groups:
            outputs = []
            for e, expert in zip(batch, experts):
                rows, slots = np.nonzero(chosen == e)
                scale = mx.array(weights[rows, slots].astype(np.float32)).astype(h.dtype)[:, None]
                rows_mx = mx.array(rows)
                outputs.append((int(e), rows_mx, self.expert_ffn(h[rows_mx], expert) * scale))
            # computed before the next batch may take these slots. One token's experts (a group in
            # slots, then one read meanwhile) are left lazy: the next layer's routing, which the host
            # waits for before it brings experts in, computes them (the cache evicts none of them, in
            # use, until then).
            if source.on_demand and len(h) > 1:
                mx.eval([y for _, _, y in outputs])
            added += outputs
        out = mx.zeros(h.shape, h.dtype)
        for _, rows_mx, y in sorted(added, key=lambda one: one[0]):  # index order, however they came
            out = out.at[rows_mx].add(y)
        return out


class MLXFloat32Ops(MLXOps):
    """float32 activations: for checking against the numpy reference."""
    dtype = mx.float32
