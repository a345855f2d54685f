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


def test_random_localmix_model_is_written_straight_into_the_format(tmp_path):
    """scripts/make_random_localmix.py: a model that verifies, runs, and runs the same within a
    memory budget."""
    script = Path(__file__).parents[1] / "scripts" / "make_random_localmix.py"
    out = tmp_path / "random-q4"
    subprocess.run([sys.executable, script, out, "--hidden", "128", "--ffn", "256", "--layers", "2", "--heads", "4",
                    "--kv-heads", "2"], check=True, capture_output=True)
    from localmix.store import read_manifest, verify
    assert verify(out) == []
    manifest = read_manifest(out)
    assert manifest["quantization"]["bits"] == "4" and len(list((out / "experts").iterdir())) == 16
    ids = np.random.default_rng(0).integers(0, 32000, 8)
    resident = localmix.load(out).logits(ids)
    assert np.isfinite(resident).all() and resident.std() > 0
    from localmix.experts import RUNTIME_BYTES, kv_bytes
    model = localmix.load(out)
    memory = manifest["files"]["dense.bin"]["size"] + kv_bytes(model.config, 4096) + RUNTIME_BYTES + \
        3 * max(f["size"] for name, f in manifest["files"].items() if name.startswith("experts/"))
    budgeted = localmix.load(out, memory=memory)
    assert budgeted.expert_cache.slots == 3
    np.testing.assert_array_equal(budgeted.logits(ids), resident)
