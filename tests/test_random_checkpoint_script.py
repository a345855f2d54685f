"""scripts/make_random_checkpoint.py writes a real Hugging Face folder: transformers loads it and
computes the same logits as localmix."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import localmix
from conftest import reference_logits

SCRIPT = Path(__file__).parents[1] / "scripts" / "make_random_checkpoint.py"


@pytest.mark.parametrize("dtype, experts", [("bf16", 4), ("f16", 0), ("f32", 2)])
def test_script_checkpoint_loads_in_transformers(tmp_path, dtype, experts):
    subprocess.run([sys.executable, SCRIPT, tmp_path, "--hidden", "64", "--ffn", "96", "--layers", "2",
                    "--heads", "4", "--kv-heads", "2", "--experts", str(experts), "--top-k", "2",
                    "--dtype", dtype, "--context", "256"], check=True, capture_output=True)
    cls = transformers.MixtralForCausalLM if experts else transformers.MistralForCausalLM
    reference = cls.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ids = np.random.default_rng(0).integers(0, 32000, 12)
    ref = reference_logits(reference, ids)
    ours = localmix.load(tmp_path).logits(ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert localmix.load(tmp_path).config.is_moe == bool(experts)
