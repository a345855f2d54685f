"""ModelArgs: the shape of a Mixtral or Mistral model, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from localmix.errors import LocalmixError

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
        model_type = config.get("model_type")
        if model_type not in _DEFAULTS:
            raise LocalmixError(f"{source}: unsupported model_type {model_type!r} "
                                f"(localmix runs 'mixtral' and 'mistral')")
        required = _REQUIRED + (_REQUIRED_MOE if model_type == "mixtral" else [])
        for key in required:
            if config.get(key) is None:
                raise LocalmixError(f"{source}: missing key {key!r}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise LocalmixError(f"{source}: unsupported hidden_act {act!r} (Mixtral uses 'silu')")

        defaults = _DEFAULTS[model_type]
        get = lambda key: config[key] if config.get(key) is not None else defaults[key]  # noqa: E731
        heads = config["num_attention_heads"]
        args = cls(
            model_type=model_type,
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config["num_key_value_heads"],
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            rope_theta=float(_rope_theta(config, defaults["rope_theta"], source)),
            rms_norm_eps=float(get("rms_norm_eps")),
            max_position_embeddings=int(get("max_position_embeddings")),
            sliding_window=config.get("sliding_window", defaults["sliding_window"]),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            num_local_experts=config.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            num_experts_per_tok=config.get("num_experts_per_tok", 1) if model_type == "mixtral" else 1,
        )
        args._check(source)
        return args

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise LocalmixError(f"{path}: no such file") from None
        except (OSError, ValueError) as e:
            raise LocalmixError(f"{path}: cannot read config ({e})") from None
        if not isinstance(config, dict):
            raise LocalmixError(f"{path}: not a JSON object")
        return cls.from_hf_config(config, source=str(path))

    def with_experts_per_token(self, k: int | None) -> "ModelArgs":
        """The same model with another number of active experts per token (top-1, top-3, ...)."""
        if k is None:
            return self
        if not self.is_moe:
            raise LocalmixError("experts_per_token applies to mixture-of-experts models only")
        if not 1 <= k <= self.num_local_experts:
            raise LocalmixError(f"experts_per_token must be between 1 and {self.num_local_experts}, got {k}")
        return replace(self, num_experts_per_tok=k)

    def _check(self, source: str) -> None:
        positive = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"]
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise LocalmixError(f"{source}: {key} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LocalmixError(f"{source}: num_attention_heads ({self.num_attention_heads}) is not a "
                                f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise LocalmixError(f"{source}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise LocalmixError(f"{source}: sliding_window must be null or a positive integer")
        if self.is_moe and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise LocalmixError(f"{source}: num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 "
                                f"and num_local_experts ({self.num_local_experts})")


def _rope_theta(config: dict, default: float, source: str) -> float:
    """rope_theta sits at the top level (the real Mixtral config) or in rope_parameters (newer
    transformers). Only plain RoPE is supported: a scaled variant would silently change the math."""
    params = config.get("rope_parameters") or config.get("rope_scaling")
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise LocalmixError(f"{source}: unsupported rope_type {rope_type!r} (only plain RoPE)")
        if params.get("rope_theta") is not None:
            return params["rope_theta"]
    return config["rope_theta"] if config.get("rope_theta") is not None else default
