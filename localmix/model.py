"""The forward pass of every family in float32 numpy: the reference every faster path is checked
against.

Reads top to bottom: building blocks (norm, rotary embedding, attention, router, experts), then the
MoE block, then a decoder layer, then the model. A family is data (config.ModelArgs: q/k norms,
biases, shared experts, dense layers, the routing rule, attention sinks, per-layer windows, YaRN,
the experts' activation), not code of its own. The math follows transformers' MixtralForCausalLM,
Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, OlmoeForCausalLM, GraniteMoeForCausalLM and
GptOssForCausalLM step by step (same operation order, float32 softmax), so that logits agree to
about 1e-6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from localmix.config import ModelArgs
from localmix.kv_cache import KVCache
from localmix.routing import EXACT, Routing, RoutingCall, RoutingOptions, trace_records

if TYPE_CHECKING:
    from localmix.experts import ExpertSource


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's activation of gate and up: the gate clamped above at limit, up to [-limit, limit],
    then (up + 1) * gate * sigmoid(alpha * gate), in transformers' order of operations."""
    alpha: float
    limit: float

    def __call__(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        limit = np.float32(self.limit)
        gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
        return (up + np.float32(1.0)) * (gate * sigmoid(gate * np.float32(self.alpha)))


def expert_activation(args: ModelArgs) -> ClampedSwiGLU | None:
    """The experts' activation where it is not SwiGLU's silu(gate) * up (gpt-oss's)."""
    return None if args.swiglu_limit is None else ClampedSwiGLU(args.swiglu_alpha, args.swiglu_limit)


@dataclass
class Expert:
    """One SwiGLU feed-forward network: w2(silu(w1 x) * w3 x). Matrices are [out, in]. gpt-oss's
    experts add biases to the three products and clamp their SwiGLU (glu)."""
    w1: np.ndarray  # gate
    w2: np.ndarray  # down
    w3: np.ndarray  # up
    b1: np.ndarray | None = None  # float32 biases of gate, down and up (gpt-oss)
    b2: np.ndarray | None = None
    b3: np.ndarray | None = None
    glu: ClampedSwiGLU | None = None  # None: silu(gate) * up

    @property
    def plain(self) -> bool:
        """SwiGLU without biases: what the Numba kernels compute."""
        return self.glu is None and self.b1 is None


@dataclass
class Layer:
    attention_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    router: np.ndarray | None  # [experts, hidden]; None for a dense MLP (Mistral's, or a dense layer's)
    experts: ExpertSource      # given at construction (resident, or an expert cache's view); a dense MLP
                               # is a single expert that every token uses
    bq: np.ndarray | None = None  # attention biases (Qwen2-MoE: q, k, v)
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # RMSNorm weights over each head (Qwen3) or the projection (OLMoE)
    k_norm: np.ndarray | None = None
    shared_expert: Expert | None = None          # run for every token beside the routed ones (Qwen2-MoE),
    shared_expert_gate: np.ndarray | None = None  # scaled by sigmoid(shared_expert_gate h) [1, hidden]
    sinks: np.ndarray | None = None        # [heads]: a logit per head that joins each softmax (gpt-oss)
    router_bias: np.ndarray | None = None  # [experts] (gpt-oss)
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
    dim = args.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(args.rope_theta) ** exponents)).astype(np.float32)
    yarn = args.rope_scaling
    if yarn is None:
        return inv_freq
    # YaRN, as transformers' _compute_yarn_parameters: the frequencies that turn fewer than beta_slow
    # times over the original context are interpolated (divided by factor), those that turn more
    # than beta_fast times are kept, with a linear ramp between; the bounds in float64, the rest in float32.
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(args.rope_theta))
    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # (transformers': no division by zero)
    pos_freqs = np.float32(args.rope_theta) ** exponents
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(yarn.factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = np.float32(1.0) - ramp.astype(np.float32)
    return (interpolation * (np.float32(1.0) - keep) + extrapolation * keep).astype(np.float32)


def rope_attention_factor(args: ModelArgs) -> float:
    """What rotary scaling multiplies cos and sin by (YaRN's attention factor; 1 for plain RoPE):
    the same as multiplying the rotated q and k by it."""
    return 1.0 if args.rope_scaling is None else args.rope_scaling.attention_factor


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
           sliding_window: int | None, sinks: np.ndarray | None = None) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v for q [T, heads, dim] over cached keys and values
    [S, kv_heads, dim], masked by position; returns [T, heads * dim]. sinks [heads]: a logit per
    head that joins the softmax as one more key with no value (gpt-oss)."""
    T, heads, dim = q.shape
    kv_heads = keys.shape[1]
    keys = keys.astype(np.float32, copy=False).transpose(1, 0, 2)
    values = values.astype(np.float32, copy=False).transpose(1, 0, 2)
    # Each KV head serves a group of query heads: [kv_heads, group, T, dim] against
    # [kv_heads, 1, S, dim] broadcasts without repeating the keys.
    q = q.reshape(T, kv_heads, heads // kv_heads, dim).transpose(1, 2, 0, 3)
    scores = (q @ keys[:, None].transpose(0, 1, 3, 2)) * np.float32(dim ** -0.5)
    scores = np.where(attention_mask(positions, keys.shape[1], sliding_window), scores, -np.inf)
    if sinks is None:
        probs = softmax(scores)
    else:
        sink = np.broadcast_to(sinks.astype(np.float32).reshape(kv_heads, -1, 1, 1), scores.shape[:3] + (1,))
        probs = softmax(np.concatenate([scores, sink], axis=-1))[..., :-1]
    out = probs @ values[:, None]                      # [kv_heads, group, T, dim]
    return out.transpose(2, 0, 1, 3).reshape(T, heads * dim)


def attention(x: np.ndarray, layer: Layer, args: ModelArgs, cache: KVCache, index: int,
              positions: np.ndarray, inv_freq: np.ndarray, ops: Ops) -> np.ndarray:
    """Grouped-query attention over the cached tokens plus the new ones in x ([T, hidden]): q, k, v
    (with their biases; q and k RMS-normed over the projection or each head where the family says;
    clamped where it says), rotary embedding, attention, output projection."""
    T, heads, kv_heads, dim = x.shape[0], args.num_attention_heads, args.num_key_value_heads, args.head_dim
    window = args.window(index)
    q, k, v = ops.linears(x, [layer.wq, layer.wk, layer.wv])
    if args.qkv_bias:
        q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
    if args.qk_norm == "projection":
        q, k = ops.rms_norm(q, layer.q_norm, args.rms_norm_eps), ops.rms_norm(k, layer.k_norm, args.rms_norm_eps)
    if args.clip_qkv is not None:
        q, k, v = (np.clip(a, -args.clip_qkv, args.clip_qkv) for a in (q, k, v))
    q, k, v = q.reshape(T, heads, dim), k.reshape(T, kv_heads, dim), v.reshape(T, kv_heads, dim)
    if args.qk_norm == "head":
        q = ops.rms_norm(q.reshape(T * heads, dim), layer.q_norm, args.rms_norm_eps).reshape(T, heads, dim)
        k = ops.rms_norm(k.reshape(T * kv_heads, dim), layer.k_norm, args.rms_norm_eps).reshape(T, kv_heads, dim)
    q, k = ops.apply_rope(q, positions, inv_freq), ops.apply_rope(k, positions, inv_freq)
    if args.rope_scaling is not None:  # transformers scales cos and sin by YaRN's attention factor
        factor = np.float32(rope_attention_factor(args))
        q, k = q * factor, k * factor
    if args.attention_multiplier is not None:  # GraniteMoE scales scores by its own factor, not 1/sqrt(dim)
        q = q * np.float32(args.attention_multiplier * dim ** 0.5)
    if isinstance(cache, SequenceBatch):  # a token of each sequence, each attending to its own cache
        out = np.concatenate([ops.attend(q[i:i + 1], *c.update(index, k[i:i + 1], v[i:i + 1]), positions[i:i + 1],
                                         window, layer.sinks) for i, c in enumerate(cache.caches)])
    else:
        keys, values = cache.update(index, k, v)
        out = ops.attend(q, keys, values, positions, window, layer.sinks)
    out = ops.linears(out, [layer.wo])[0]
    return out + layer.bo if args.o_bias else out


def expert_ffn(x: np.ndarray, expert: Expert, products=linears) -> np.ndarray:
    """The expert over the rows of x; products(x, matrices): its matrix products (a backend's)."""
    gate, up = products(x, [expert.w1, expert.w3])
    if expert.b1 is not None:
        gate, up = gate + expert.b1, up + expert.b3
    out = products(silu(gate) * up if expert.glu is None else expert.glu(gate, up), [expert.w2])[0]
    return out if expert.b2 is None else out + expert.b2


def experts_ffn(x: np.ndarray, experts: list[Expert], counts: list[int], products=linears) -> np.ndarray:
    """Each expert over its run of rows of x: experts[0] the first counts[0] rows, and so on."""
    starts = np.cumsum([0] + list(counts))
    return np.concatenate([expert_ffn(x[a:b], e, products) for e, a, b in zip(experts, starts[:-1], starts[1:])])


def route_tokens(x: np.ndarray, router: np.ndarray, k: int, renormalize: bool = True,
                 bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The routing rule, the one every backend follows: each token's k most probable experts
    ([T, k], most probable first, the lower index first on ties) and their weights, the softmax over
    all experts' logits (float32; plus the router's bias where it has one), renormalized to sum to
    one where the family does (Mixtral always; the others by norm_topk_prob). Renormalized, that is
    the softmax of the k largest logits (GraniteMoE's and gpt-oss's rule)."""
    logits = x @ router.T
    probs = softmax(logits if bias is None else logits + bias)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    return chosen, (weights / np.sum(weights, axis=-1, keepdims=True) if renormalize else weights)


def used_experts(chosen: np.ndarray, experts: int) -> np.ndarray:
    """The experts that any row chose, in index order (a dropped one is marked `experts`)."""
    used = np.unique(chosen)
    return used[used < experts]


def mix_experts(x: np.ndarray, chosen: np.ndarray, weights: np.ndarray, groups, experts_ffn=experts_ffn) -> np.ndarray:
    """Each row's chosen experts applied to it and summed by weight. groups: the chosen experts as
    (indices, experts) in memory together, in any order (see moe_block). (row, slot) pairs are
    grouped by expert, so that each expert's weights are read once per call (experts_ffn: a
    backend's), then each row sums its experts in index order, as transformers does. A dropped
    expert (an index past the layer's) adds nothing."""
    k = chosen.shape[1]
    order = np.argsort(chosen.ravel(), kind="stable")
    rows, slots = np.divmod(order, k)
    counts = np.bincount(chosen.ravel())
    starts = np.concatenate([[0], np.cumsum(counts)])  # expert e's pairs: rows[starts[e]:starts[e + 1]]
    added = {}
    for ids, experts in groups:
        pairs = np.concatenate([np.arange(starts[e], starts[e + 1]) for e in ids])
        y = experts_ffn(x[rows[pairs]], experts, counts[ids].tolist()) * weights[rows[pairs], slots[pairs], None]
        for e, part in zip(ids, np.split(y, np.cumsum(counts[ids])[:-1])):
            added[int(e)] = part
    out = np.zeros_like(x)
    for e in sorted(added):
        out[rows[starts[e]:starts[e + 1]]] += added[e]
    return out


def moe_block(h: np.ndarray, layer: Layer, args: ModelArgs, ops: Ops, call: RoutingCall) -> np.ndarray:
    """The feed-forward half of a layer, for every family: a dense MLP; or route (route_tokens, the
    call's experts per token), count and steer as the call asks (layer.routing), run the chosen
    experts (ops.mix_experts), and add the shared expert scaled by its sigmoid gate where the
    family has one. A backend with a device of its own (MLX) may route and run resident experts
    there, the host never waiting for the choice (ops.routed_experts_on_device)."""
    if layer.router is None:
        return ops.experts_ffn(h, [layer.experts[0]], [len(h)])
    source = layer.experts
    # With every expert resident and nothing to steer or trace, the host need not see the choice: a
    # backend that can route and run the experts on its device does the whole block there.
    on_device = None if source.on_demand or call.routes is not None or call.options.steering.min_weight > 0 \
        else ops.routed_experts_on_device(h, layer, args, call)
    if on_device is not None:
        chosen, weights, out = on_device
        if layer.routing is not None:
            layer.routing.count(chosen, weights, call, on_device=True)  # read back when the counts are
    else:
        chosen, weights = ops.route_tokens(h, layer.router, call.experts_per_token, args.norm_topk_prob,
                                           layer.router_bias)
        if layer.routing is not None:  # counted, and steered where asked: a dropped expert is len(experts)
            chosen, weights = layer.routing(h, chosen, weights, layer, call)
        # The chosen experts, brought in: one token's as groups (an expert cache computes those it
        # holds while it reads the others, or answers with low-bit shadow copies), more tokens' in
        # batches that fit its slots together, each as it is reached.
        used = used_experts(chosen, len(source))
        groups = source.for_token(used) if len(h) == 1 else source.batches(used)
        if len(h) == 1 or call.batched:  # decoding, this token's experts in: the cache reads the next layer's meanwhile
            source.speculate(h, call.experts_per_token)
        out = ops.mix_experts(h, chosen, weights, source, groups)
    if layer.shared_expert is not None:
        gate = ops.sigmoid(ops.linears(h, [layer.shared_expert_gate])[0])
        out = out + gate * ops.experts_ffn(h, [layer.shared_expert], [len(h)])
    return out


def attention_block(x: np.ndarray, layer: Layer, args: ModelArgs, cache: KVCache, index: int,
                    positions: np.ndarray, inv_freq: np.ndarray, ops: Ops) -> tuple[np.ndarray, np.ndarray]:
    """The attention half of a layer: x plus the attention of its norm; and that, normed for the
    MoE block."""
    attended = attention(ops.rms_norm(x, layer.attention_norm, args.rms_norm_eps), layer, args, cache, index,
                         positions, inv_freq, ops)
    x = x + (attended if args.residual_multiplier == 1 else attended * args.residual_multiplier)  # (GraniteMoE's)
    return x, ops.rms_norm(x, layer.ffn_norm, args.rms_norm_eps)


def decoder_layer(x: np.ndarray, layer: Layer, args: ModelArgs, cache: KVCache, index: int,
                  positions: np.ndarray, inv_freq: np.ndarray, ops: Ops, call: RoutingCall) -> np.ndarray:
    """Attention then the MoE block, each pre-normed and added to the residual stream."""
    x, h = ops.attention_block(x, layer, args, cache, index, positions, inv_freq)
    out = moe_block(h, layer, args, ops, call)
    return x + (out if args.residual_multiplier == 1 else out * args.residual_multiplier)  # (GraniteMoE's)


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


class Ops:
    """The operations that a backend may run faster. These are the reference: the functions above,
    in float32 numpy. localmix.backends has the Numba kernels' versions and MLX's.
    A backend is an instance: what it prepares from the weights (kernel tables, MLX copies) it keeps
    in its own fields, keyed by the layer's index."""
    rms_norm = staticmethod(rms_norm)
    route_tokens = staticmethod(route_tokens)
    apply_rope = staticmethod(apply_rope)
    attend = staticmethod(attend)
    linears = staticmethod(linears)
    experts_ffn = staticmethod(experts_ffn)

    def mix_experts(self, x, chosen, weights, source: ExpertSource, groups):
        """model.mix_experts with this backend's experts_ffn. source: the layer's experts (their
        formats, whether they come on demand); groups: the chosen ones as moe_block brought them in."""
        return mix_experts(x, chosen, weights, groups, self.experts_ffn)

    def routed_experts_on_device(self, h, layer: Layer, args: ModelArgs, call: RoutingCall):
        """The routed part of moe_block (route_tokens, then the chosen resident experts mixed by
        weight) on the backend's device, the choice left there: (chosen, weights, out), or None where
        this backend routes on the host (numpy's and Numba's choice is host data anyway)."""
        return None

    sigmoid = staticmethod(sigmoid)

    def attention_block(self, x, layer: Layer, args: ModelArgs, cache, index: int, positions, inv_freq):
        """model.attention_block with this backend's operations."""
        return attention_block(x, layer, args, cache, index, positions, inv_freq, self)

    kv_cache = KVCache
    batched_decoding = True  # attention_block takes a SequenceBatch (Transformer.step)

    def logits(self, x, norm: np.ndarray, lm_head, eps: float) -> np.ndarray:
        """The final norm and the language-model head (this backend's), as float32 numpy [T, vocab]."""
        return self.linears(self.rms_norm(x, norm, eps), [lm_head])[0]

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

    def __init__(self, args: ModelArgs, weights: Weights, ops: Ops | None = None, kv_dtype=np.float32,
                 default_routing: RoutingOptions = EXACT, kv_allowance=None):
        """kv_allowance: within a memory budget, the KV caches' part of it, which their growth
        takes from (experts.budget.KVAllowance); None: no budget."""
        self.args = args
        self.kv_allowance = kv_allowance
        self.weights = weights
        self.ops = ops or Ops()
        self.kv_dtype = kv_dtype
        self.inv_freq = rope_inverse_frequencies(args)
        # What the routers chose, counted as the model runs (and steered, where asked).
        self.routing = Routing(args.num_hidden_layers, args.num_local_experts if args.is_moe else 1)
        for layer, routing in zip(weights.layers, self.routing.layers):
            layer.routing = routing
        self.default_routing = default_routing  # a call's that gives no options (the model's, as loaded)

    def new_cache(self, capacity: int) -> KVCache:
        return self.ops.kv_cache(self.args, capacity, self.kv_dtype, self.kv_allowance)

    def __call__(self, ids: np.ndarray, cache: KVCache, last_only: bool = False,
                 options: RoutingOptions | None = None) -> np.ndarray:
        """Logits ([T, vocab], or [1, vocab] with last_only) for tokens that follow the cache's,
        routed as `options` say (experts per token, steering, trace; default: default_routing)."""
        w = self.weights
        ids = np.asarray(ids, dtype=np.int64)
        positions = cache.length + np.arange(len(ids))
        cache.reserve(cache.length + len(ids))
        if cache.length == 0:
            self.routing.new_sequence()
        x = self.layers(embedding(ids, w.embed), ids, cache, positions, options)
        cache.advance(len(ids))
        return self.head(x[-1:] if last_only else x)

    def step(self, ids: list[int], caches: list[KVCache], options: RoutingOptions | None = None) -> np.ndarray:
        """Logits [len(ids), vocab] for the next token of each of several sequences at once (a
        server's concurrent answers): each weight is read once for all of them. One call routes
        all its rows alike: sequences with other options go in a step of their own."""
        if len(caches) == 1 or not self.ops.batched_decoding:
            return np.concatenate([self([token], cache, last_only=True, options=options)
                                   for token, cache in zip(ids, caches)])
        ids = np.asarray(ids, dtype=np.int64)
        positions = np.array([cache.length for cache in caches])
        for cache in caches:
            cache.reserve(cache.length + 1)
        x = self.layers(embedding(ids, self.weights.embed), ids, SequenceBatch(caches), positions, options)
        for cache in caches:
            cache.advance(1)
        return self.head(x)

    def layers(self, x: np.ndarray, ids: np.ndarray, cache, positions: np.ndarray,
               options: RoutingOptions | None) -> np.ndarray:
        # This call's routing, its own: rows of several sequences (a SequenceBatch) count no reuse.
        options = options or self.default_routing
        call = RoutingCall(options, options.experts_per_token or self.args.num_experts_per_tok,
                           len(self.weights.layers), batched=isinstance(cache, SequenceBatch),
                           renormalize=self.args.norm_topk_prob)
        if self.args.embedding_multiplier != 1:  # GraniteMoE's
            x = x * self.args.embedding_multiplier
        for index, layer in enumerate(self.weights.layers):
            x = decoder_layer(x, layer, self.args, cache, index, positions, self.inv_freq, self.ops, call)
        if call.routes is not None and self.args.is_moe:
            options.trace(trace_records(ids, positions, call.routes, self.args.num_local_experts))
        return x

    def head(self, x: np.ndarray) -> np.ndarray:
        logits = self.ops.logits(x, self.weights.norm, self.weights.lm_head, self.args.rms_norm_eps)
        return logits / self.args.logits_scaling if self.args.logits_scaling != 1 else logits
