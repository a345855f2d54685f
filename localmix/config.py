"""ModelArgs: the shape of a model, read from a Hugging Face config.json.

A family (config.json's model_type) is data here: the defaults transformers fills in for keys a
config leaves out, and the switches that make the one forward pass of model.py that family's
(q/k norms, attention biases, shared experts, dense layers among sparse ones, the routing rule).
Tensor names are mapped in one place, checkpoint.read_weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from localmix import validate
from localmix.errors import LocalmixError
from localmix.validate import MAX_CONTEXT, MAX_DIM, MAX_EXPERTS, MAX_HEADS, MAX_LAYERS

MAX_TOTAL_EXPERTS = 1 << 16  # layers x experts; the largest mixtures have ~16k (61 x 256)


@dataclass(frozen=True)
class Family:
    """What a model_type means. defaults: those of transformers' config class, because
    transformers fills a key that config.json leaves out with them and we must compute what it
    computes. experts_key: where the expert count sits. qk_norm: None, "head" (RMSNorm over each
    head's dim, Qwen3) or "projection" (over the whole q and k projections, OLMoE)."""
    defaults: dict
    experts_key: str | None = None  # None: a dense model
    qk_norm: str | None = None
    shared_expert: bool = False
    dense_layers: bool = False       # mlp_only_layers / decoder_sparse_step
    renormalize: bool | None = None  # always (Mixtral); None: config's norm_topk_prob
    qkv_bias_key: str | None = None  # the bool that puts biases on q, k, v
    o_bias: bool = False             # whether that bool also puts one on o
    window_key: str | None = "sliding_window"
    multipliers: bool = False        # GraniteMoE's embedding, residual, attention and logits multipliers
    gpt_oss: bool = False            # per-layer windows (layer_types), attention sinks, router and expert biases,
                                     # the clamped SwiGLU, YaRN rotary scaling


_QWEN = {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
         "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}
FAMILIES = {
    "mixtral": Family({"rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None,
                       "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False},
                      experts_key="num_local_experts", renormalize=True),
    "mistral": Family({"rope_theta": 1e4, "rms_norm_eps": 1e-6, "sliding_window": 4096,
                       "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False}, renormalize=True),
    "qwen3_moe": Family({**_QWEN, "attention_bias": False}, experts_key="num_experts", qk_norm="head",
                        dense_layers=True, qkv_bias_key="attention_bias", o_bias=True, window_key=None),
    "qwen2_moe": Family({**_QWEN, "qkv_bias": True}, experts_key="num_experts", shared_expert=True,
                        dense_layers=True, qkv_bias_key="qkv_bias", window_key=None),
    "granitemoe": Family({"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
                          "tie_word_embeddings": False, "attention_bias": False, "embedding_multiplier": 1.0,
                          "residual_multiplier": 1.0, "attention_multiplier": 1.0, "logits_scaling": 1.0},
                         experts_key="num_local_experts", renormalize=True, qkv_bias_key="attention_bias", o_bias=True,
                         window_key=None, multipliers=True),
    "olmoe": Family({"rope_theta": 1e4, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                     "tie_word_embeddings": False, "norm_topk_prob": False, "attention_bias": False, "clip_qkv": None},
                    experts_key="num_experts", qk_norm="projection", qkv_bias_key="attention_bias", o_bias=True,
                    window_key=None),
    # rope_parameters: what transformers' GptOssConfig puts there when a config gives none.
    "gpt_oss": Family({"rope_theta": 150000.0, "rms_norm_eps": 1e-5, "sliding_window": 128,
                       "max_position_embeddings": 131072, "tie_word_embeddings": False, "attention_bias": True,
                       "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
                       "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                           "truncate": False, "original_max_position_embeddings": 4096}},
                      experts_key="num_local_experts", renormalize=True, qkv_bias_key="attention_bias", o_bias=True,
                      gpt_oss=True),
}
_REQUIRED = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size"]


@dataclass(frozen=True)
class Yarn:
    """YaRN rotary scaling (rope_type "yarn"), the values transformers' _compute_yarn_parameters
    reads, with its defaults; attention_factor resolved as it resolves it (cos and sin are scaled
    by it)."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int       # a dense MLP's width (a dense model's, or a dense layer's among sparse ones)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    num_local_experts: int  # 0 for a dense model: its MLP is run as the one and only expert
    num_experts_per_tok: int
    moe_intermediate_size: int = 0       # each routed expert's width
    norm_topk_prob: bool = True          # renormalize the top-k router probabilities to sum to one
    sparse_layers: tuple[bool, ...] = ()  # per layer: experts (True) or a dense MLP
    shared_expert_intermediate_size: int = 0  # a shared expert beside the routed ones (0: none)
    qk_norm: str | None = None           # see Family
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None        # q, k and v clamped to [-clip, clip] (OLMoE)
    embedding_multiplier: float = 1.0    # GraniteMoE: the embeddings times this,
    residual_multiplier: float = 1.0     # each layer's attention and MoE outputs times this,
    attention_multiplier: float | None = None  # attention scores times this (None: 1 / sqrt(head_dim)),
    logits_scaling: float = 1.0          # and the logits divided by this
    layer_windows: tuple[int | None, ...] = ()  # each layer's window (gpt-oss's layer_types); (): sliding_window
    attention_sinks: bool = False        # a learned logit per head joins each softmax and is dropped (gpt-oss)
    router_bias: bool = False            # the router's logits have a bias (gpt-oss)
    expert_bias: bool = False            # each expert's gate, up and down projections have biases (gpt-oss)
    swiglu_limit: float | None = None    # gpt-oss's clamped SwiGLU: gate clamped above, up to [-limit, limit],
    swiglu_alpha: float = 1.0            # (up + 1) * gate * sigmoid(alpha * gate); None: silu(gate) * up
    rope_scaling: Yarn | None = None     # None: plain RoPE
    mxfp4_experts: bool = False          # the checkpoint's experts are MXFP4 blocks and scales (gpt-oss as published)

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer's attention (None: full attention)."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def moe_layers(self) -> list[int]:
        """The layers with routed experts."""
        return [i for i, sparse in enumerate(self.sparse_layers) if sparse]

    @property
    def mlp_widths(self) -> list[int]:
        """The widths of every feed-forward network, layer by layer: each routed expert, the
        shared expert, a dense layer's MLP."""
        widths = []
        for sparse in self.sparse_layers:
            if sparse:
                widths += [self.moe_intermediate_size] * self.num_local_experts
                widths += [self.shared_expert_intermediate_size] if self.shared_expert_intermediate_size else []
            else:
                widths.append(self.intermediate_size)
        return widths

    def parameter_count(self) -> int:
        """Parameters the config describes, counted without listing its tensors (a lying config may
        describe billions of them)."""
        H, V = self.hidden_size, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attention = 2 * H + 2 * q * H + 2 * kv * H
        attention += {"head": 2 * self.head_dim, "projection": q + kv, None: 0}[self.qk_norm]
        attention += (q + 2 * kv if self.qkv_bias else 0) + (H if self.o_bias else 0)
        attention += self.num_attention_heads if self.attention_sinks else 0
        routers = len(self.moe_layers) * (self.num_local_experts + (1 if self.shared_expert_intermediate_size else 0)) * H
        routers += len(self.moe_layers) * self.num_local_experts if self.router_bias else 0
        mlps = 3 * H * sum(self.mlp_widths)
        mlps += sum(2 * width + H for width in self.mlp_widths) if self.expert_bias else 0
        return self.num_hidden_layers * attention + routers + mlps + V * H * (1 if self.tie_word_embeddings else 2) + H

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """Every value typed and bounded before anything is sized by it: a config is untrusted (a hub,
        a manifest, a GGUF's metadata), and a lie here (10^9 layers, `"false"` for a bool, NaN for a
        float) would otherwise become an allocation, a wrong model or a traceback much later."""
        config = validate.json_object(config, source, "config")
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or model_type not in FAMILIES:
            raise LocalmixError(f"{source}: unsupported model_type {model_type!r:.60} "
                                f"(localmix runs {', '.join(repr(f) for f in FAMILIES)})")
        family = FAMILIES[model_type]
        experts_key = family.experts_key
        if experts_key and config.get(experts_key) is None and config.get("num_local_experts") is not None:
            experts_key = "num_local_experts"  # transformers 5 saves Qwen3-MoE's count under this name
        required = _REQUIRED + ([experts_key, "num_experts_per_tok"] if experts_key else [])
        for key in required:
            if config.get(key) is None:
                raise LocalmixError(f"{source}: missing key {key!r}")
        act = config.get("hidden_act", "silu")
        if act != "silu":  # (gpt-oss's config says silu too: its clamped SwiGLU is the family's, below)
            raise LocalmixError(f"{source}: unsupported hidden_act {act!r:.60} (localmix runs SwiGLU, 'silu')")

        defaults = family.defaults
        get = lambda key: config[key] if config.get(key) is not None else defaults[key]  # noqa: E731

        def positive(key: str, high: int, value=None) -> int:
            value = config[key] if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise LocalmixError(f"{source}: {key} must be a positive integer at most {high}, got {value!r:.60}")
            return value

        hidden = positive("hidden_size", MAX_DIM)
        heads = positive("num_attention_heads", MAX_HEADS)
        layers = positive("num_hidden_layers", MAX_LAYERS)
        head_dim = (positive("head_dim", MAX_DIM) if config.get("head_dim") is not None
                    else positive("head_dim", MAX_DIM, hidden // heads))
        sliding_window = _sliding_window(config, family, source)
        intermediate = positive("intermediate_size", MAX_DIM)
        experts = positive(experts_key, MAX_EXPERTS) if experts_key else 0
        moe_width = intermediate
        if experts and config.get("moe_intermediate_size") is not None:
            moe_width = positive("moe_intermediate_size", MAX_DIM)
        elif experts and model_type in ("qwen3_moe", "qwen2_moe"):
            raise LocalmixError(f"{source}: missing key 'moe_intermediate_size'")
        renormalize = family.renormalize
        if renormalize is None:
            renormalize = validate.boolean(get("norm_topk_prob"), "norm_topk_prob", source)
        qkv_bias = (validate.boolean(get(family.qkv_bias_key), family.qkv_bias_key, source)
                    if family.qkv_bias_key else False)
        shared = 0
        if family.shared_expert:
            shared = positive("shared_expert_intermediate_size", MAX_DIM,
                              config.get("shared_expert_intermediate_size", intermediate))
        clip = None
        if config.get("clip_qkv") is not None:
            if model_type != "olmoe":
                raise LocalmixError(f"{source}: clip_qkv is not part of {model_type}")
            clip = validate.number(config["clip_qkv"], "clip_qkv", source, low=0.0, low_open=True)
        args = cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=positive("num_key_value_heads", MAX_HEADS),
            head_dim=head_dim,
            vocab_size=positive("vocab_size", MAX_DIM),
            rope_theta=validate.number(_rope_theta(config, family, source), "rope_theta", source,
                                       low=0.0, low_open=True),
            rms_norm_eps=validate.number(get("rms_norm_eps"), "rms_norm_eps", source, low=0.0, high=1.0,
                                         low_open=True),
            max_position_embeddings=positive("max_position_embeddings", MAX_CONTEXT,
                                             get("max_position_embeddings")),
            sliding_window=sliding_window,
            tie_word_embeddings=validate.boolean(get("tie_word_embeddings"), "tie_word_embeddings", source),
            num_local_experts=experts,
            num_experts_per_tok=positive("num_experts_per_tok", MAX_EXPERTS) if experts else 1,
            moe_intermediate_size=moe_width if experts else 0,
            norm_topk_prob=renormalize,
            sparse_layers=_sparse_layers(config, family, layers, experts, source),
            shared_expert_intermediate_size=shared,
            qk_norm=family.qk_norm,
            qkv_bias=qkv_bias,
            o_bias=qkv_bias and family.o_bias,
            clip_qkv=clip,
        )
        if family.multipliers:
            multiplier = lambda key: validate.number(get(key), key, source, low=0.0, low_open=True)  # noqa: E731
            args = replace(args, embedding_multiplier=multiplier("embedding_multiplier"),
                           residual_multiplier=multiplier("residual_multiplier"),
                           attention_multiplier=multiplier("attention_multiplier"),
                           logits_scaling=multiplier("logits_scaling"))
        if family.gpt_oss:
            args = replace(args, layer_windows=_layer_windows(config, layers, sliding_window, source),
                           attention_sinks=True, router_bias=True, expert_bias=True,
                           swiglu_alpha=validate.number(get("swiglu_alpha"), "swiglu_alpha", source),
                           swiglu_limit=validate.number(get("swiglu_limit"), "swiglu_limit", source, low=0.0,
                                                        low_open=True),
                           rope_scaling=_yarn(config, family, args.max_position_embeddings, source),
                           mxfp4_experts=_mxfp4(config, source))
        # localmix's own key (a base model, such as the demo): a real bool or nothing.
        if config.get("localmix_base_model") is not None:
            validate.boolean(config["localmix_base_model"], "localmix_base_model", source)
        args._check(source)
        return args

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if not path.is_file():
            raise LocalmixError(f"{path}: no such file")
        try:
            config = validate.read_json(path, "JSON")
        except LocalmixError as e:  # "cannot read config (not valid JSON ...)", "... larger than ..."
            raise LocalmixError(f"{path}: cannot read config ({str(e).removeprefix(f'{path}: ')})") from None
        if not isinstance(config, dict):
            raise LocalmixError(f"{path}: not a JSON object")
        return cls.from_hf_config(config, source=str(path))

    def with_experts_per_token(self, k: int | None) -> "ModelArgs":
        """The same model with another number of active experts per token (top-1, top-3, ...)."""
        if k is None:
            return self
        if not self.is_moe:
            raise LocalmixError("experts_per_token applies to mixture-of-experts models only")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_local_experts:
            raise LocalmixError(f"experts_per_token must be between 1 and {self.num_local_experts}, got {k!r:.60}")
        return replace(self, num_experts_per_tok=int(k))

    def _check(self, source: str) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise LocalmixError(f"{source}: num_attention_heads ({self.num_attention_heads}) is not a "
                                f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise LocalmixError(f"{source}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads * self.head_dim > MAX_DIM:
            raise LocalmixError(f"{source}: num_attention_heads x head_dim ({self.num_attention_heads} x "
                                f"{self.head_dim}) is larger than {MAX_DIM}")
        if self.num_hidden_layers * max(1, self.num_local_experts) > MAX_TOTAL_EXPERTS:
            # each bound alone allows 1024 x 16384 experts: 50M tensors to list before a file is read
            raise LocalmixError(f"{source}: {self.num_hidden_layers} layers of {self.num_local_experts} experts "
                                f"are more than the {MAX_TOTAL_EXPERTS} experts localmix takes")
        if self.is_moe and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise LocalmixError(f"{source}: num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 "
                                f"and num_local_experts ({self.num_local_experts})")
        if self.is_moe and not any(self.sparse_layers):
            raise LocalmixError(f"{source}: no layer has experts (mlp_only_layers / decoder_sparse_step)")


def _sliding_window(config: dict, family: Family, source: str) -> int | None:
    if family.window_key is None:  # Qwen's and OLMoE's attention is full unless use_sliding_window says
        if config.get("use_sliding_window"):  # otherwise (per-layer windows: not supported)
            raise LocalmixError(f"{source}: use_sliding_window is not supported")
        return None
    window = config.get(family.window_key, family.defaults["sliding_window"])
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise LocalmixError(f"{source}: sliding_window must be null or a positive integer, got {window!r:.60}")
    return window


def _sparse_layers(config: dict, family: Family, layers: int, experts: int, source: str) -> tuple[bool, ...]:
    """Which layers route to experts: every one of a mixture, except (Qwen) the layers listed in
    mlp_only_layers and those that decoder_sparse_step skips, as transformers decides it."""
    if not experts:
        return (False,) * layers
    if not family.dense_layers:
        return (True,) * layers
    step = config.get("decoder_sparse_step", family.defaults["decoder_sparse_step"])
    step = validate.integer(1 if step is None else step, "decoder_sparse_step", source, 1, MAX_LAYERS)
    dense = config.get("mlp_only_layers") or []
    if not isinstance(dense, list) or len(dense) > MAX_LAYERS:
        raise LocalmixError(f"{source}: mlp_only_layers must be a list of layer numbers")
    dense = {validate.integer(i, "mlp_only_layers", source, 0, layers - 1) for i in dense}
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))


def _rope_dicts(config: dict, family: Family, source: str) -> list[tuple[str, dict]]:
    """The rope parameter objects a config gives (rope_parameters, or the older rope_scaling), each
    checked to be an object of a rope_type the family runs: plain RoPE, and YaRN for gpt-oss (a
    scaled variant that we do not compute would silently change the math). A family whose
    transformers config fills in rope_parameters (gpt-oss) gets those when the config gives none."""
    found = []
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise LocalmixError(f"{source}: {key} must be null or a JSON object, got {params!r:.60}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" and not (rope_type == "yarn" and family.gpt_oss):
            raise LocalmixError(f"{source}: unsupported rope_type {rope_type!r:.60} "
                                f"({'plain RoPE or YaRN' if family.gpt_oss else 'only plain RoPE'})")
        if params.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise LocalmixError(f"{source}: {key}.partial_rotary_factor is not supported")
        found.append((key, params))
    if not found and "rope_parameters" in family.defaults:
        found.append(("rope_parameters", family.defaults["rope_parameters"]))
    return found


def _rope_theta(config: dict, family: Family, source: str) -> float:
    """rope_theta sits at the top level (the real Mixtral config) or in rope_parameters (newer
    transformers). Every place a value can sit is checked, also the one that another overrides: a
    config that lies anywhere is refused."""
    theta = None
    for key, params in _rope_dicts(config, family, source):
        if params.get("rope_theta") is not None and theta is None:
            theta = validate.number(params["rope_theta"], f"{key}.rope_theta", source, low=0.0, low_open=True)
    top = config.get("rope_theta")
    if top is not None:
        top = validate.number(top, "rope_theta", source, low=0.0, low_open=True)
    return theta if theta is not None else top if top is not None else family.defaults["rope_theta"]


def _yarn(config: dict, family: Family, max_positions: int, source: str) -> Yarn | None:
    """The YaRN parameters where the (first) rope object says yarn, read as transformers'
    _compute_yarn_parameters reads them: factor (missing: max_position_embeddings over the original
    length), beta_fast and beta_slow (missing or zero: 32 and 1), truncate (missing: true), the
    attention factor (missing: 0.1 ln(factor) + 1, or the ratio of mscale's and mscale_all_dim's)."""
    dicts = _rope_dicts(config, family, source)
    if not dicts or dicts[0][1].get("rope_type", dicts[0][1].get("type", "default")) != "yarn":
        return None
    key, params = dicts[0]

    def number(name, default=None, **bounds):
        value = params.get(name)
        return default if value is None else validate.number(value, f"{key}.{name}", source, **bounds)

    original = params.get("original_max_position_embeddings", max_positions)
    original = validate.integer(original, f"{key}.original_max_position_embeddings", source, 1, MAX_CONTEXT)
    factor = number("factor", max_positions / original, low=0.0, low_open=True)
    beta_fast, beta_slow = number("beta_fast") or 32.0, number("beta_slow") or 1.0
    truncate = validate.boolean(params.get("truncate", True), f"{key}.truncate", source)
    mscale, mscale_all_dim = number("mscale"), number("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention_factor = number("attention_factor", low=0.0, low_open=True)
    if attention_factor is None:
        attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                            else get_mscale(factor))
    return Yarn(float(factor), original, float(beta_fast), float(beta_slow), truncate, float(attention_factor))


def _mxfp4(config: dict, source: str) -> bool:
    """Whether the experts are MXFP4 (quantization_config's quant_method "mxfp4", as gpt-oss is
    published); another method is refused rather than read as floats it is not."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return False
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method != "mxfp4":
        raise LocalmixError(f"{source}: quantization_config: unsupported quant_method {method!r:.60} "
                            f"(localmix reads float checkpoints, and MXFP4 experts)")
    return True


def _layer_windows(config: dict, layers: int, window: int | None, source: str) -> tuple[int | None, ...]:
    """Each layer's window from layer_types ("sliding_attention": the sliding window; "full_attention":
    none); missing, transformers' GptOssConfig alternates them, sliding first."""
    types = config.get("layer_types")
    if types is None:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(
            t not in ("sliding_attention", "full_attention") for t in types):
        raise LocalmixError(f"{source}: layer_types must list 'sliding_attention' or 'full_attention' for each of "
                            f"the {layers} layers, got {types!r:.80}")
    return tuple(window if t == "sliding_attention" else None for t in types)
