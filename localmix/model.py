"""The Mixtral forward pass in float32 numpy: the reference every faster path is checked against.

Reads top to bottom: building blocks (norm, rotary embedding, attention, router, experts), then a
decoder layer, then the model. The math follows transformers' MixtralForCausalLM step by step
(same operation order, float32 softmax), so that logits agree to about 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from localmix.config import ModelArgs
from localmix.kv_cache import KVCache
from localmix.routing import Routing, trace_records

if TYPE_CHECKING:
    from localmix.experts import ExpertSource


@dataclass
class Expert:
    """One SwiGLU feed-forward network: w2(silu(w1 x) * w3 x). Matrices are [out, in]."""
    w1: np.ndarray  # gate
    w2: np.ndarray  # down
    w3: np.ndarray  # up


@dataclass
class Layer:
    attention_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    router: np.ndarray | None  # [experts, hidden]; None for a dense Mistral MLP
    experts: ExpertSource      # given at construction (resident, or an expert cache's view); a dense MLP
                               # is a single expert that every token uses
    routing: object = None     # localmix.routing.LayerRouting: statistics and steering (set by Transformer)


@dataclass
class Weights:
    embed: np.ndarray    # [vocab, hidden]
    layers: list[Layer]
    norm: np.ndarray
    lm_head: np.ndarray  # [vocab, hidden]; the embedding itself when tied


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T for a float matrix, or for a quantized one (dequantized first)."""
    return x @ w.T if isinstance(w, np.ndarray) else w.linear(x)


def linears(x: np.ndarray, ws: list) -> list[np.ndarray]:
    return [linear(x, w) for w in ws]


def embedding(ids: np.ndarray, w) -> np.ndarray:
    return (w[ids] if isinstance(w, np.ndarray) else w.dequantize(ids)).astype(np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return weight * (x / np.sqrt(variance + eps))


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflows to inf for very negative x: silu is then -0
        return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rope_inverse_frequencies(args: ModelArgs) -> np.ndarray:
    # float32 throughout, as transformers computes them: a float64 table would be more accurate
    # at long positions but would no longer match the reference.
    exponents = np.arange(0, args.head_dim, 2, dtype=np.float32) / np.float32(args.head_dim)
    return (np.float32(1.0) / (np.float32(args.rope_theta) ** exponents)).astype(np.float32)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate [T, heads, head_dim] by position, in transformers' rotate-half convention: the two
    halves of each head form the (real, imaginary) pairs."""
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_mask(query_positions: np.ndarray, key_count: int, sliding_window: int | None) -> np.ndarray:
    """True where a query may look at a key: causal, and within the window when there is one
    (a window of W lets a token see itself and the W - 1 tokens before it)."""
    keys = np.arange(key_count)[None, :]
    queries = query_positions[:, None]
    allowed = keys <= queries
    if sliding_window is not None:
        allowed &= keys > queries - sliding_window
    return allowed


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, positions: np.ndarray,
           sliding_window: int | None) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v for q [T, heads, dim] over cached keys and values
    [S, kv_heads, dim], masked by position; returns [T, heads * dim]."""
    T, heads, dim = q.shape
    kv_heads = keys.shape[1]
    keys = keys.astype(np.float32, copy=False).transpose(1, 0, 2)
    values = values.astype(np.float32, copy=False).transpose(1, 0, 2)
    # Each KV head serves a group of query heads: [kv_heads, group, T, dim] against
    # [kv_heads, 1, S, dim] broadcasts without repeating the keys.
    q = q.reshape(T, kv_heads, heads // kv_heads, dim).transpose(1, 2, 0, 3)
    scores = (q @ keys[:, None].transpose(0, 1, 3, 2)) * np.float32(dim ** -0.5)
    scores = np.where(attention_mask(positions, keys.shape[1], sliding_window), scores, -np.inf)
    out = softmax(scores) @ values[:, None]            # [kv_heads, group, T, dim]
    return out.transpose(2, 0, 1, 3).reshape(T, heads * dim)


def attention(x: np.ndarray, layer: Layer, args: ModelArgs, cache: KVCache, index: int,
              positions: np.ndarray, inv_freq: np.ndarray, ops: type[Ops]) -> np.ndarray:
    """Grouped-query attention over the cached tokens plus the new ones in x ([T, hidden])."""
    T, heads, kv_heads, dim = x.shape[0], args.num_attention_heads, args.num_key_value_heads, args.head_dim
    q, k, v = ops.linears(x, [layer.wq, layer.wk, layer.wv])
    q = ops.apply_rope(q.reshape(T, heads, dim), positions, inv_freq)
    k = ops.apply_rope(k.reshape(T, kv_heads, dim), positions, inv_freq)
    v = v.reshape(T, kv_heads, dim)
    if isinstance(cache, SequenceBatch):  # a token of each sequence, each attending to its own cache
        out = np.concatenate([ops.attend(q[i:i + 1], *c.update(index, k[i:i + 1], v[i:i + 1]), positions[i:i + 1],
                                         args.sliding_window) for i, c in enumerate(cache.caches)])
    else:
        keys, values = cache.update(index, k, v)
        out = ops.attend(q, keys, values, positions, args.sliding_window)
    return ops.linears(out, [layer.wo])[0]


def expert_ffn(x: np.ndarray, expert: Expert) -> np.ndarray:
    return linear(silu(linear(x, expert.w1)) * linear(x, expert.w3), expert.w2)


def experts_ffn(x: np.ndarray, experts: list[Expert], counts: list[int]) -> np.ndarray:
    """Each expert over its run of rows of x: experts[0] the first counts[0] rows, and so on."""
    starts = np.cumsum([0] + list(counts))
    return np.concatenate([expert_ffn(x[a:b], e) for e, a, b in zip(experts, starts[:-1], starts[1:])])


def route_tokens(x: np.ndarray, router: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each token's top-k experts ([T, k]) and their weights: softmax over all experts, keep the
    k largest, renormalize them to sum to one (equal to a softmax over the top-k logits)."""
    probs = softmax(x @ router.T)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    return chosen, weights / np.sum(weights, axis=-1, keepdims=True)


def used_experts(chosen: np.ndarray, experts: int) -> np.ndarray:
    """The experts that any row chose, in index order (a dropped one is marked `experts`)."""
    used = np.unique(chosen)
    return used[used < experts]


def moe_block(x: np.ndarray, layer: Layer, k: int, ops: type[Ops]) -> np.ndarray:
    if layer.router is None:
        return ops.experts_ffn(x, layer.experts, [len(x)])
    chosen, weights = ops.route_tokens(x, layer.router, k)
    if layer.routing is not None:  # counted, and steered where asked: a dropped expert is len(experts)
        chosen, weights = layer.routing(x, chosen, weights, layer)
    # (token, slot) pairs grouped by expert, so that every expert's weights are read once per call.
    order = np.argsort(chosen.ravel(), kind="stable")
    rows, slots = np.divmod(order, k)
    counts = np.bincount(chosen.ravel(), minlength=len(layer.experts))[:len(layer.experts)]
    used = np.flatnonzero(counts)
    y, start = [], 0
    # The chosen experts in batches that are in memory together (see ExpertSource.batches).
    for batch, experts in layer.experts.batches(used):
        size = counts[batch].sum()
        y.append(ops.experts_ffn(x[rows[start:start + size]], experts, counts[batch].tolist()))
        start += size
    y = np.concatenate(y) * weights[rows[:start], slots[:start], None]
    # Each token sums its experts in index order, as transformers does.
    out, start = np.zeros_like(x), 0
    for count in counts[used]:
        out[rows[start:start + count]] += y[start:start + count]
        start += count
    return out


def decoder_layer(x: np.ndarray, layer: Layer, args: ModelArgs, cache: KVCache, index: int,
                  positions: np.ndarray, inv_freq: np.ndarray, ops: type[Ops]) -> np.ndarray:
    """Attention then mixture of experts, each pre-normed and added to the residual stream."""
    h = ops.rms_norm(x, layer.attention_norm, args.rms_norm_eps)
    x = x + attention(h, layer, args, cache, index, positions, inv_freq, ops)
    h = ops.rms_norm(x, layer.ffn_norm, args.rms_norm_eps)
    return x + moe_block(h, layer, args.num_experts_per_tok, ops)


class Ops:
    """The operations that a backend may run faster. These are the reference: the functions above,
    in float32 numpy. localmix.backends has the Numba kernels' versions."""
    rms_norm = staticmethod(rms_norm)
    route_tokens = staticmethod(route_tokens)
    apply_rope = staticmethod(apply_rope)
    attend = staticmethod(attend)
    linears = staticmethod(linears)
    experts_ffn = staticmethod(experts_ffn)
    decoder_layer = staticmethod(decoder_layer)
    kv_cache = KVCache
    batched_decoding = True  # decoder_layer takes a SequenceBatch (Transformer.step)

    @staticmethod
    def allocate_slots(shape) -> np.ndarray | None:
        """An expert cache's slots ([slots, bytes] uint8) in the backend's own memory; None where it
        has none (the cache then takes numpy's)."""
        return None


class SequenceBatch:
    """Several sequences decoded together: row i of the hidden states is the next token of the
    sequence whose KV cache is caches[i]. The products read each weight once for all of them;
    attention stays each sequence's own."""

    def __init__(self, caches: list[KVCache]):
        self.caches = caches


class Transformer:
    """Embedding, decoder layers (attention then mixture of experts, each pre-normed and added to
    the residual stream), final norm and language-model head."""

    def __init__(self, args: ModelArgs, weights: Weights, ops: type[Ops] = Ops, kv_dtype=np.float32):
        self.args = args
        self.weights = weights
        self.ops = ops
        self.kv_dtype = kv_dtype
        self.inv_freq = rope_inverse_frequencies(args)
        # What the routers chose, counted as the model runs (and steered, where asked).
        self.routing = Routing(args.num_hidden_layers, args.num_local_experts if args.is_moe else 1)
        for layer, routing in zip(weights.layers, self.routing.layers):
            layer.routing = routing
        self.trace: Callable[[list[dict]], None] | None = None  # gets each token's routing, where set

    def new_cache(self, capacity: int) -> KVCache:
        return self.ops.kv_cache(self.args, capacity, self.kv_dtype)

    def __call__(self, ids: np.ndarray, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Logits ([T, vocab], or [1, vocab] with last_only) for tokens that follow the cache's."""
        w = self.weights
        ids = np.asarray(ids, dtype=np.int64)
        positions = cache.length + np.arange(len(ids))
        cache.reserve(cache.length + len(ids))
        if cache.length == 0:
            self.routing.new_sequence()
        x = self.layers(embedding(ids, w.embed), ids, cache, positions)
        cache.advance(len(ids))
        return self.head(x[-1:] if last_only else x)

    def step(self, ids: list[int], caches: list[KVCache]) -> np.ndarray:
        """Logits [len(ids), vocab] for the next token of each of several sequences at once (a
        server's concurrent answers): each weight is read once for all of them."""
        if len(caches) == 1 or not self.ops.batched_decoding:
            return np.concatenate([self([token], cache, last_only=True) for token, cache in zip(ids, caches)])
        ids = np.asarray(ids, dtype=np.int64)
        positions = np.array([cache.length for cache in caches])
        for cache in caches:
            cache.reserve(cache.length + 1)
        x = self.layers(embedding(ids, self.weights.embed), ids, SequenceBatch(caches), positions)
        for cache in caches:
            cache.advance(1)
        return self.head(x)

    def layers(self, x: np.ndarray, ids: np.ndarray, cache, positions: np.ndarray) -> np.ndarray:
        self.routing.trace = [None] * len(self.weights.layers) if self.trace else None
        self.routing.batched = isinstance(cache, SequenceBatch)  # rows of several sequences: no reuse counted
        for index, layer in enumerate(self.weights.layers):
            x = self.ops.decoder_layer(x, layer, self.args, cache, index, positions, self.inv_freq, self.ops)
        if self.routing.trace and self.args.is_moe:
            self.trace(trace_records(ids, positions, self.routing.trace, len(self.weights.layers[0].experts)))
        return x

    def head(self, x: np.ndarray) -> np.ndarray:
        return self.ops.linears(self.ops.rms_norm(x, self.weights.norm, self.args.rms_norm_eps),
                                [self.weights.lm_head])[0]
