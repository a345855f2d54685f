"""Shared test helpers: small random checkpoints that transformers itself builds and saves, with the
real Mixtral tokenizer that mistral-common ships."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import mistral_common
import numpy as np
import pytest
import torch
import transformers

# One Numba cache for the whole session, the one localmix itself would use: importing localmix sets
# NUMBA_CACHE_DIR (inherited by the processes tests start) before tests point LOCALMIX_HOME at
# temporary folders, where a cache under each would compile the kernels again in every test.
import localmix  # noqa: E402,F401

TOKENIZERS = Path(mistral_common.__file__).parent / "data"
TOKENIZER_V1 = TOKENIZERS / "tokenizer.model.v1"
TOKENIZER_V3 = TOKENIZERS / "mistral_instruct_tokenizer_240323.model.v3"

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=32000,
             max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
             tie_word_embeddings=False, initializer_range=0.05)


FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
    "granitemoe": (transformers.GraniteMoeConfig, transformers.GraniteMoeForCausalLM),
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM),
}
# What the families' configs add to SMALL: experts narrower than a dense layer's MLP (Qwen), a
# shared expert of its own width (Qwen2-MoE).
FAMILY_DEFAULTS = {"qwen3_moe": dict(moe_intermediate_size=48),
                   "qwen2_moe": dict(moe_intermediate_size=48, shared_expert_intermediate_size=80)}


def make_hf_model(folder: Path, model_type: str = "mixtral", dtype=None, shard: str | None = None,
                  tokenizer: Path | None = TOKENIZER_V1, seed: int = 0, **overrides):
    """Build a random transformers model of a family, save it as a Hugging Face folder (in dtype,
    sharded to shard-sized files), and return it in float32, holding exactly the values that were
    saved."""
    config = {**SMALL, **FAMILY_DEFAULTS.get(model_type, {}), **overrides}
    if model_type == "mistral":
        for key in ("num_local_experts", "num_experts_per_tok"):
            config.pop(key)
    elif model_type not in ("mixtral", "granitemoe", "gpt_oss"):  # the others call the expert count num_experts
        config["num_experts"] = config.pop("num_local_experts")
    cls_config, cls_model = FAMILIES[model_type]
    config = cls_config(**config)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():  # norms start at one, biases at zero: give them some spread so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("sinks"):  # gpt-oss's: about as large as the attention scores
                p.copy_(torch.randn_like(p))
    kwargs = {"max_shard_size": shard} if shard else {}
    (model.to(dtype) if dtype else model).save_pretrained(folder, **kwargs)
    if tokenizer is not None:
        shutil.copy(tokenizer, Path(folder) / "tokenizer.model")
    if dtype is None:
        return model
    # Reload rather than cast back: casting would leave the rotary table at bf16 precision.
    return cls_model.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def reference_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """One small Mixtral folder shared by the API and CLI tests."""
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    make_hf_model(folder)
    return folder


@contextlib.contextmanager
def running(app):
    """A Starlette app served by uvicorn on a free port of 127.0.0.1, in a thread: its base URL."""
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    while not instance.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(10)
