"""The MLX backend: a layer's attention and experts on Apple's GPU through MLX (Metal), on the same
files. localmix's format is MLX's affine quantization (packed uint32 words, a scale and a bias
per group), so `mx.quantized_matmul` takes the stored matrices as they are.

On Linux, `pip install mlx[cpu]` runs the same code on the CPU: that is how the tests check it
against the numpy reference. Activations run in float16 (`mlx`, the speed MLX is built for) or
float32 (`mlx-f32`, for exactness); routers always in float32. The residual stream stays an MLX
array from the first layer to the head, and is evaluated once per model call, when the logits
come back to numpy. Routing is brought to numpy once per layer: the statistics, steering and the
expert cache all need to know which experts a token chose before their weights are read.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from localmix.errors import LocalmixError
from localmix.kv_cache import KVCache
from localmix.model import Ops
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


class MLXKVCache(KVCache):
    """Keys and values as MLX arrays [1, kv_heads, capacity, head_dim] per layer, in the
    activations' dtype, grown in steps as mlx-lm's cache is."""

    STEP = 256

    def __init__(self, args, capacity: int = 256, dtype=np.float32, allowance=None):
        self.allowance = allowance  # counted as float32, as the numpy cache's (float16 takes half)
        self.allocated = 0  # (both first: __del__ reads them whatever fails below)
        self.max_length = args.max_position_embeddings
        self.layers, self.heads, self.head_dim = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
        self.keys, self.values = [None] * self.layers, [None] * self.layers
        self.length = 0
        self.reserve(capacity)

    def _bytes(self, tokens: int) -> int:
        return 2 * self.layers * self.heads * self.head_dim * 4 * tokens

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
        end = self.length + keys.shape[2]
        if self.keys[layer] is None or self.keys[layer].shape[2] < end:
            size = -(-end // self.STEP) * self.STEP
            grown = [mx.zeros((1, self.heads, size, self.head_dim), keys.dtype) for _ in range(2)]
            if self.keys[layer] is not None:
                grown[0][:, :, :self.length] = self.keys[layer][:, :, :self.length]
                grown[1][:, :, :self.length] = self.values[layer][:, :, :self.length]
            self.keys[layer], self.values[layer] = grown
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


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
    kv_cache = MLXKVCache
    batched_decoding = False  # concurrent answers take turns (its KV cache is one sequence's)
    allocate_slots = staticmethod(allocate_slots)

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
        return np.array(self.linear(self.rms_norm(x, norm, eps), lm_head).astype(mx.float32))

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
        mask = attention_mask(positions, keys.shape[2], args.window(index), x.dtype)
        scale = dim ** -0.5 if args.attention_multiplier is None else args.attention_multiplier
        sinks = None if layer.sinks is None else self.vector(layer.sinks, x.dtype)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask, sinks=sinks)
        out = self.linear(out.transpose(0, 2, 1, 3).reshape(T, heads * dim), layer.wo)
        return out + self.vector(layer.bo, x.dtype) if args.o_bias else out

    def route_tokens(self, h, router, k, renormalize=True, bias=None):
        """model.route_tokens in float32, brought to numpy (statistics, steering and the expert
        cache need to know which experts a token chose before their weights are read)."""
        logits = self.to_mlx(h).astype(mx.float32) @ self.vector(router, mx.float32).T
        if bias is not None:
            logits = logits + self.vector(bias, mx.float32)
        probs = mx.softmax(logits, axis=-1)
        chosen = mx.argsort(-probs, axis=-1)[:, :k]
        weights = mx.take_along_axis(probs, chosen, axis=-1)
        if renormalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        mx.eval(chosen, weights)
        return np.array(chosen).astype(np.int64), np.array(weights)

    def expert_ffn(self, x: mx.array, expert) -> mx.array:
        gate, up = self.linear(x, expert.w1), self.linear(x, expert.w3)
        if expert.plain:
            return self.linear(gate * mx.sigmoid(gate) * up, expert.w2)
        # gpt-oss's: biases (an expert cache's lie in its slot, to be copied at each use as its
        # matrices are) and the clamped SwiGLU, as model.expert_ffn
        transient = is_quantized(expert.w1) and expert.w1.transient
        bias = (lambda b: mlx_vector(b, x.dtype)) if transient else (lambda b: self.vector(b, x.dtype))
        if expert.b1 is not None:
            gate, up = gate + bias(expert.b1), up + bias(expert.b3)
        if expert.glu is None:
            hidden = gate * mx.sigmoid(gate) * up
        else:
            limit = expert.glu.limit
            gate, up = mx.minimum(gate, limit), mx.clip(up, -limit, limit)
            hidden = (up + 1) * (gate * mx.sigmoid(gate * expert.glu.alpha))
        out = self.linear(hidden, expert.w2)
        return out if expert.b2 is None else out + bias(expert.b2)

    def experts_ffn(self, x, experts, counts):
        starts = np.cumsum([0] + list(counts))
        return mx.concatenate([self.expert_ffn(x[int(a):int(b)], e) for e, a, b in zip(experts, starts[:-1], starts[1:])])

    def mix_experts(self, h, chosen, weights, source, groups):
        """Each chosen expert over its rows, added in index order."""
        out = mx.zeros(h.shape, h.dtype)
        for batch, experts in groups:
            for e, expert in zip(batch, experts):
                rows, slots = np.nonzero(chosen == e)
                scale = mx.array(weights[rows, slots].astype(np.float32)).astype(h.dtype)[:, None]
                rows_mx = mx.array(rows)
                out = out.at[rows_mx].add(self.expert_ffn(h[rows_mx], expert) * scale)
            if source.on_demand:  # computed before the next batch may reuse these slots
                mx.eval(out)
        return out


class MLXFloat32Ops(MLXOps):
    """float32 activations: for checking against the numpy reference."""
    dtype = mx.float32
