"""ModelArgs: the shape of a Mixtral or Mistral model, read from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from localmix import validate
from localmix.errors import LocalmixError
from localmix.validate import MAX_CONTEXT, MAX_DIM, MAX_EXPERTS, MAX_HEADS, MAX_LAYERS

MAX_TOTAL_EXPERTS = 1 << 16  # layers x experts; the largest mixtures have ~16k (61 x 256)

# Defaults are those of transformers' MixtralConfig / MistralConfig, because transformers fills a
# key that config.json leaves out with them; we must compute what it computes.
_DEFAULTS = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None,
                "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False},
    "mistral": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "sliding_window": 4096,
                "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False},
}
_REQUIRED = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size"]
_REQUIRED_MOE = ["num_local_experts", "num_experts_per_tok"]


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
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
    num_local_experts: int  # 0 for a dense Mistral: its MLP is run as the one and only expert
    num_experts_per_tok: int

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """Every value typed and bounded before anything is sized by it: a config is untrusted (a hub,
        a manifest, a GGUF's metadata), and a lie here (10^9 layers, `"false"` for a bool, NaN for a
        float) would otherwise become an allocation, a wrong model or a traceback much later."""
        config = validate.json_object(config, source, "config")
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or model_type not in _DEFAULTS:
            raise LocalmixError(f"{source}: unsupported model_type {model_type!r:.60} "
                                f"(localmix runs 'mixtral' and 'mistral')")
        required = _REQUIRED + (_REQUIRED_MOE if model_type == "mixtral" else [])
        for key in required:
            if config.get(key) is None:
                raise LocalmixError(f"{source}: missing key {key!r}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise LocalmixError(f"{source}: unsupported hidden_act {act!r:.60} (Mixtral uses 'silu')")

        defaults = _DEFAULTS[model_type]
        get = lambda key: config[key] if config.get(key) is not None else defaults[key]  # noqa: E731

        def positive(key: str, high: int, value=None) -> int:
            value = config[key] if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise LocalmixError(f"{source}: {key} must be a positive integer at most {high}, got {value!r:.60}")
            return value

        hidden = positive("hidden_size", MAX_DIM)
        heads = positive("num_attention_heads", MAX_HEADS)
        head_dim = (positive("head_dim", MAX_DIM) if config.get("head_dim") is not None
                    else positive("head_dim", MAX_DIM, hidden // heads))
        sliding_window = config.get("sliding_window", defaults["sliding_window"])
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window <= 0):
            raise LocalmixError(f"{source}: sliding_window must be null or a positive integer, "
                                f"got {sliding_window!r:.60}")
        is_moe = model_type == "mixtral"
        args = cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=positive("intermediate_size", MAX_DIM),
            num_hidden_layers=positive("num_hidden_layers", MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=positive("num_key_value_heads", MAX_HEADS),
            head_dim=head_dim,
            vocab_size=positive("vocab_size", MAX_DIM),
            rope_theta=validate.number(_rope_theta(config, defaults["rope_theta"], source), "rope_theta", source,
                                       low=0.0, low_open=True),
            rms_norm_eps=validate.number(get("rms_norm_eps"), "rms_norm_eps", source, low=0.0, high=1.0,
                                         low_open=True),
            max_position_embeddings=positive("max_position_embeddings", MAX_CONTEXT,
                                             get("max_position_embeddings")),
            sliding_window=sliding_window,
            tie_word_embeddings=validate.boolean(get("tie_word_embeddings"), "tie_word_embeddings", source),
            num_local_experts=positive("num_local_experts", MAX_EXPERTS) if is_moe else 0,
            num_experts_per_tok=positive("num_experts_per_tok", MAX_EXPERTS) if is_moe else 1,
        )
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


def _rope_theta(config: dict, default: float, source: str) -> float:
    """rope_theta sits at the top level (the real Mixtral config) or in rope_parameters (newer
    transformers). Only plain RoPE is supported: a scaled variant would silently change the math.
    Every place a value can sit is checked, also the one that another overrides: a config that
    lies anywhere is refused."""
    theta = None
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise LocalmixError(f"{source}: {key} must be null or a JSON object, got {params!r:.60}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise LocalmixError(f"{source}: unsupported rope_type {rope_type!r:.60} (only plain RoPE)")
        if params.get("rope_theta") is not None and theta is None:
            theta = validate.number(params["rope_theta"], f"{key}.rope_theta", source, low=0.0, low_open=True)
    top = config.get("rope_theta")
    if top is not None:
        top = validate.number(top, "rope_theta", source, low=0.0, low_open=True)
    return theta if theta is not None else top if top is not None else default
