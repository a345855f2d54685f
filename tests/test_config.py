"""ModelArgs from config.json: the real Mixtral configs, newer transformers' layout, clear errors."""

import json

import pytest

from localmix.config import ModelArgs
from localmix.errors import LocalmixError

# config.json of mistralai/Mixtral-8x7B-Instruct-v0.1 as published.
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}
# mistralai/Mixtral-8x22B-Instruct-v0.1.
MIXTRAL_8X22B = dict(MIXTRAL_8X7B, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                     num_attention_heads=48, max_position_embeddings=65536, vocab_size=32768)


def test_mixtral_8x7b():
    a = ModelArgs.from_hf_config(MIXTRAL_8X7B)
    assert (a.hidden_size, a.intermediate_size, a.num_hidden_layers) == (4096, 14336, 32)
    assert (a.num_attention_heads, a.num_key_value_heads, a.head_dim) == (32, 8, 128)
    assert (a.num_local_experts, a.num_experts_per_tok, a.vocab_size) == (8, 2, 32000)
    assert a.rope_theta == 1e6 and a.rms_norm_eps == 1e-5 and a.sliding_window is None
    assert a.max_position_embeddings == 32768 and not a.tie_word_embeddings and a.is_moe


def test_mixtral_8x22b():
    a = ModelArgs.from_hf_config(MIXTRAL_8X22B)
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.head_dim) == (6144, 56, 48, 128)
    assert a.vocab_size == 32768 and a.max_position_embeddings == 65536


def test_rope_parameters_and_explicit_head_dim():
    config = dict(MIXTRAL_8X7B, head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    del config["rope_theta"]
    a = ModelArgs.from_hf_config(config)
    assert a.rope_theta == 1e4 and a.head_dim == 64


def test_null_head_dim_means_hidden_over_heads():
    assert ModelArgs.from_hf_config(dict(MIXTRAL_8X7B, head_dim=None)).head_dim == 128


def test_dense_mistral_defaults_are_transformers_defaults():
    config = {k: v for k, v in MIXTRAL_8X7B.items()
              if k not in ("num_local_experts", "num_experts_per_tok", "rope_theta", "sliding_window",
                           "rms_norm_eps")}
    a = ModelArgs.from_hf_config(dict(config, model_type="mistral"))
    assert not a.is_moe and a.num_local_experts == 0
    assert a.rope_theta == 1e4 and a.sliding_window == 4096 and a.rms_norm_eps == 1e-6


@pytest.mark.parametrize("key", ["hidden_size", "num_key_value_heads", "num_local_experts", "vocab_size"])
def test_missing_key_is_named(key):
    config = dict(MIXTRAL_8X7B)
    del config[key]
    with pytest.raises(LocalmixError, match=f"missing key '{key}'"):
        ModelArgs.from_hf_config(config)


@pytest.mark.parametrize("config, message", [
    (dict(MIXTRAL_8X7B, model_type="llama"), "unsupported model_type 'llama'"),
    ({"hidden_size": 8}, "unsupported model_type None"),
    (dict(MIXTRAL_8X7B, num_key_value_heads=5), "not a multiple"),
    (dict(MIXTRAL_8X7B, num_experts_per_tok=9), "between 1 and num_local_experts"),
    (dict(MIXTRAL_8X7B, hidden_act="gelu"), "unsupported hidden_act"),
    (dict(MIXTRAL_8X7B, rope_parameters={"rope_type": "yarn", "factor": 4.0}), "unsupported rope_type 'yarn'"),
    (dict(MIXTRAL_8X7B, hidden_size=-1), "hidden_size must be a positive integer"),
])
def test_bad_configs(config, message):
    with pytest.raises(LocalmixError, match=message):
        ModelArgs.from_hf_config(config)


def test_unreadable_config_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LocalmixError, match="cannot read config"):
        ModelArgs.from_file(tmp_path / "config.json")
    with pytest.raises(LocalmixError, match="no such file"):
        ModelArgs.from_file(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(LocalmixError, match="not a JSON object"):
        ModelArgs.from_file(tmp_path / "list.json")


@pytest.mark.parametrize("change, message", [
    (dict(num_hidden_layers=10 ** 9), "num_hidden_layers must be a positive integer at most 1024"),
    (dict(num_hidden_layers="32"), "num_hidden_layers must be a positive integer"),
    (dict(hidden_size=4096.0), "hidden_size must be a positive integer"),
    (dict(num_local_experts=True), "num_local_experts must be a positive integer"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(rope_theta=0), "rope_theta must be a finite number above 0"),
    (dict(rope_theta=float("nan")), "rope_theta must be a finite number"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps must be a finite number"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a finite number above 0"),
    (dict(sliding_window="4096"), "sliding_window must be null or a positive integer"),
    (dict(head_dim="128"), "head_dim must be a positive integer"),
    (dict(max_position_embeddings=10 ** 12), "max_position_embeddings must be a positive integer at most"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope_parameters.rope_theta must be"),
    (dict(rope_parameters={"rope_type": "default"}, rope_scaling={"type": "yarn"}), "unsupported rope_type 'yarn'"),
    (dict(rope_parameters="default"), "rope_parameters must be null or a JSON object"),
    (dict(localmix_base_model="false"), "localmix_base_model must be true or false"),
    (dict(num_hidden_layers=1024, num_local_experts=16384), "more than the 65536 experts"),
])
def test_values_are_typed_and_bounded(change, message):
    with pytest.raises(LocalmixError, match=message):
        ModelArgs.from_hf_config(dict(MIXTRAL_8X7B, **change))


def test_a_base_model_flag_and_ints_as_floats_where_floats_are_meant():
    a = ModelArgs.from_hf_config(dict(MIXTRAL_8X7B, localmix_base_model=True, rope_theta=1000000))
    assert a.rope_theta == 1e6 and isinstance(a.rope_theta, float)


def test_a_config_file_is_read_with_a_bound(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.write(b'{"model_type": "mixtral", "pad": "')
        f.truncate(65 * 1024 * 1024)  # sparse: no 65 MB written
    with pytest.raises(LocalmixError, match="cannot read config .*larger than"):
        ModelArgs.from_file(path)
