"""The Mixtral forward pass in float32 numpy: the reference every faster path is checked against.

Reads top to bottom: building blocks (norm, rotary embedding, attention, router, experts), then a
decoder layer, then the model. The math follows transformers' MixtralForCausalLM step by step
(same operation order, float32 softmax), so that logits agree to about 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from localmix.config import ModelArgs
from localmix.kv_cache import KVCache


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
    experts: list[Expert]      # a dense MLP is a single expert that every token uses


@dataclass
class Weights:
    embed: np.ndarray    # [vocab, hidden]
    layers: list[Layer]
    norm: np.ndarray
    lm_head: np.ndarray  # [vocab, hidden]; the embedding itself when tied


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T for a float matrix, or for a quantized one (which multiplies on its backend)."""
    return x @ w.T if isinstance(w, np.ndarray) else w.linear(x)


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


def attention(x: np.ndarray, layer: Layer, args: ModelArgs, cache: KVCache, index: int,
              positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Grouped-query attention over the cached tokens plus the new ones in x ([T, hidden])."""
    T, heads, kv_heads, dim = x.shape[0], args.num_attention_heads, args.num_key_value_heads, args.head_dim
    q = apply_rope(linear(x, layer.wq).reshape(T, heads, dim), positions, inv_freq)
    k = apply_rope(linear(x, layer.wk).reshape(T, kv_heads, dim), positions, inv_freq)
    v = linear(x, layer.wv).reshape(T, kv_heads, dim)
    keys, values = cache.update(index, k.transpose(1, 0, 2), v.transpose(1, 0, 2))

    # Each KV head serves a group of query heads: [kv_heads, group, T, dim] against
    # [kv_heads, 1, S, dim] broadcasts without repeating the keys.
    q = q.reshape(T, kv_heads, heads // kv_heads, dim).transpose(1, 2, 0, 3)
    scores = (q @ keys[:, None].transpose(0, 1, 3, 2)) * np.float32(dim ** -0.5)
    mask = attention_mask(positions, keys.shape[1], args.sliding_window)
    scores = np.where(mask, scores, -np.inf)
    out = softmax(scores) @ values[:, None]            # [kv_heads, group, T, dim]
    out = out.transpose(2, 0, 1, 3).reshape(T, heads * dim)
    return linear(out, layer.wo)


def expert_ffn(x: np.ndarray, expert: Expert) -> np.ndarray:
    return linear(silu(linear(x, expert.w1)) * linear(x, expert.w3), expert.w2)


def route_tokens(x: np.ndarray, router: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each token's top-k experts ([T, k]) and their weights: softmax over all experts, keep the
    k largest, renormalize them to sum to one (equal to a softmax over the top-k logits)."""
    probs = softmax(x @ router.T)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    return chosen, weights / np.sum(weights, axis=-1, keepdims=True)


def moe_block(x: np.ndarray, layer: Layer, k: int) -> np.ndarray:
    if layer.router is None:
        return expert_ffn(x, layer.experts[0])
    chosen, weights = route_tokens(x, layer.router, k)
    out = np.zeros_like(x)
    # Expert by expert, each over the tokens routed to it: every expert's weights are used once
    # per call, and each token sums its experts in index order, as transformers does.
    for e, expert in enumerate(layer.experts):
        rows, slots = np.nonzero(chosen == e)
        if rows.size:
            out[rows] += expert_ffn(x[rows], expert) * weights[rows, slots, None]
    return out


class Transformer:
    """Embedding, decoder layers (attention then mixture of experts, each pre-normed and added to
    the residual stream), final norm and language-model head."""

    def __init__(self, args: ModelArgs, weights: Weights):
        self.args = args
        self.weights = weights
        self.inv_freq = rope_inverse_frequencies(args)

    def __call__(self, ids: np.ndarray, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Logits ([T, vocab], or [1, vocab] with last_only) for tokens that follow the cache's."""
        args, w = self.args, self.weights
        ids = np.asarray(ids, dtype=np.int64)
        positions = cache.length + np.arange(len(ids))
        cache.reserve(cache.length + len(ids))
        x = embedding(ids, w.embed)
        for index, layer in enumerate(w.layers):
            h = rms_norm(x, layer.attention_norm, args.rms_norm_eps)
            x = x + attention(h, layer, args, cache, index, positions, self.inv_freq)
            h = rms_norm(x, layer.ffn_norm, args.rms_norm_eps)
            x = x + moe_block(h, layer, args.num_experts_per_tok)
        cache.advance(len(ids))
        if last_only:
            x = x[-1:]
        return linear(rms_norm(x, w.norm, args.rms_norm_eps), w.lm_head)
