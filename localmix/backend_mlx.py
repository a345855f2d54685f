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
from localmix.model import Ops, used_experts
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


def mlx_matrix(m, dtype) -> tuple:
    """(words, scales, biases, bits, group size) as MLX arrays. Resident matrices are copied into
    MLX once and keep it; an expert cache's are views of their slot, made at each use (the slot
    holds another expert once this one is evicted)."""
    converted = getattr(m, "mlx", None)
    if converted is None or converted[1].dtype != dtype:
        converted = (mlx_view(m.words, mx.uint32), mlx_view(m.scales, mx.float16).astype(dtype),
                     mlx_view(m.biases, mx.float16).astype(dtype), m.bits, m.group_size)
        if not m.transient:
            m.mlx = converted
    return converted


def mlx_vector(v: np.ndarray, dtype) -> mx.array:
    return mx.array(np.asarray(v, np.float32)).astype(dtype)


def layer_floats(layer, dtype) -> tuple:
    """A layer's norms (in the activations' dtype) and router (float32) as MLX arrays, made once
    rather than at every token."""
    made = getattr(layer, "mlx_floats", None)
    if made is None or made[0].dtype != dtype:
        made = (mlx_vector(layer.attention_norm, dtype), mlx_vector(layer.ffn_norm, dtype),
                None if layer.router is None else mlx_vector(layer.router, mx.float32))
        layer.mlx_floats = made
    return made


def linear(x: mx.array, m) -> mx.array:
    """x @ W.T for a quantized matrix (or a float one)."""
    if not is_quantized(m):
        return x @ mx.array(np.asarray(m, np.float32)).astype(x.dtype).T
    words, scales, biases, bits, group_size = mlx_matrix(m, x.dtype)
    return mx.quantized_matmul(x, words, scales, biases, transpose=True, group_size=group_size, bits=bits)


class MLXKVCache(KVCache):
    """Keys and values as MLX arrays [1, kv_heads, capacity, head_dim] per layer, in the
    activations' dtype, grown in steps as mlx-lm's cache is."""

    STEP = 256

    def __init__(self, args, capacity: int = 256, dtype=np.float32):
        self.max_length = args.max_position_embeddings
        self.layers, self.heads, self.head_dim = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
        self.keys, self.values = [None] * self.layers, [None] * self.layers
        self.length, self.allocated = 0, 0
        self.reserve(capacity)

    @property
    def capacity(self) -> int:
        return self.allocated

    def reserve(self, length: int) -> None:
        if length > self.max_length:
            raise LocalmixError(f"context full: {length} tokens exceed the model's {self.max_length}-token context")
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


def attention(x: mx.array, layer, args, cache: MLXKVCache, index: int, positions: np.ndarray) -> mx.array:
    T, heads, kv_heads, dim = x.shape[0], args.num_attention_heads, args.num_key_value_heads, args.head_dim
    q, k, v = (linear(x, m) for m in (layer.wq, layer.wk, layer.wv))
    q = q.reshape(1, T, heads, dim).transpose(0, 2, 1, 3)
    k = k.reshape(1, T, kv_heads, dim).transpose(0, 2, 1, 3)
    v = v.reshape(1, T, kv_heads, dim).transpose(0, 2, 1, 3)
    # transformers' rotate-half RoPE is MLX's non-traditional one.
    q = mx.fast.rope(q, dim, traditional=False, base=args.rope_theta, scale=1.0, offset=int(positions[0]))
    k = mx.fast.rope(k, dim, traditional=False, base=args.rope_theta, scale=1.0, offset=int(positions[0]))
    keys, values = cache.update(index, k, v)
    mask = attention_mask(positions, keys.shape[2], args.sliding_window, x.dtype)
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=dim ** -0.5, mask=mask)
    return linear(out.transpose(0, 2, 1, 3).reshape(T, heads * dim), layer.wo)


def expert_ffn(x: mx.array, expert) -> mx.array:
    gate, up = linear(x, expert.w1), linear(x, expert.w3)
    return linear(gate * mx.sigmoid(gate) * up, expert.w2)


def moe_block(h: mx.array, layer, k: int) -> mx.array:
    """Route in float32, bring the choice to numpy (statistics, steering, the expert cache), then
    each chosen expert over its tokens."""
    if layer.router is None:
        return expert_ffn(h, layer.experts[0])
    gates = h.astype(mx.float32) @ layer_floats(layer, h.dtype)[2].T
    chosen = mx.argsort(-gates, axis=-1)[:, :k]
    top = mx.take_along_axis(gates, chosen, axis=-1)
    weights = mx.softmax(top, axis=-1)  # = the full softmax's top k, renormalized
    mx.eval(chosen, weights)
    chosen, weights = np.array(chosen).astype(np.int64), np.array(weights)
    if layer.routing is not None:
        steer_input = np.array(h.astype(mx.float32)) if layer.routing.steers else None
        chosen, weights = layer.routing(steer_input, chosen, weights, layer)
    out = mx.zeros(h.shape, h.dtype)
    for batch, experts in layer.experts.batches(used_experts(chosen, len(layer.experts))):
        for e, expert in zip(batch, experts):
            rows, slots = np.nonzero(chosen == e)
            scale = mx.array(weights[rows, slots].astype(np.float32)).astype(h.dtype)[:, None]
            rows_mx = mx.array(rows)
            out = out.at[rows_mx].add(expert_ffn(h[rows_mx], expert) * scale)
        if layer.experts.on_demand:  # computed before the next batch may reuse these slots
            mx.eval(out)
    return out


class MLXOps(Ops):
    """float16 activations."""
    dtype = mx.float16
    kv_cache = MLXKVCache
    batched_decoding = False  # concurrent answers take turns (its KV cache is one sequence's)
    allocate_slots = staticmethod(allocate_slots)

    @classmethod
    def decoder_layer(cls, x, layer, args, cache, index, positions, inv_freq, ops):
        x = x if isinstance(x, mx.array) else mx.array(np.asarray(x, np.float32)).astype(ops.dtype)
        eps = args.rms_norm_eps
        attention_norm, ffn_norm, _ = layer_floats(layer, ops.dtype)
        h = mx.fast.rms_norm(x, attention_norm, eps)
        x = x + attention(h, layer, args, cache, index, np.asarray(positions))
        h = mx.fast.rms_norm(x, ffn_norm, eps)
        return x + moe_block(h, layer, args.num_experts_per_tok)

    @staticmethod
    def rms_norm(x, weight, eps):
        if not isinstance(x, mx.array):
            return Ops.rms_norm(x, weight, eps)
        return mx.fast.rms_norm(x, mlx_vector(weight, x.dtype), eps)

    @staticmethod
    def linears(x, ws):
        """The head: float32 numpy logits, which evaluates the token's whole graph once."""
        if not isinstance(x, mx.array):
            return Ops.linears(x, ws)
        return [np.array(linear(x, w).astype(mx.float32)) for w in ws]


class MLXFloat32Ops(MLXOps):
    """float32 activations: for checking against the numpy reference."""
    dtype = mx.float32
