"""Loading Hugging Face folders: dtypes, shards, and clear errors for broken checkpoints."""

import json
import os

import numpy as np
import pytest
import torch

import localmix
from localmix.checkpoint import Checkpoint, bf16_to_f32
from localmix.errors import LocalmixError
from conftest import make_hf_model


def test_bf16_conversion_is_exact():
    values = torch.randn(1000, dtype=torch.float32).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_to_f32(bits), values.float().numpy())


def test_fp32_tensors_are_memory_mapped_not_copied(tmp_path):
    make_hf_model(tmp_path)
    model = localmix.load(tmp_path)
    w1 = model.transformer.weights.layers[0].experts[0].w1
    assert isinstance(w1.base, np.memmap) or isinstance(w1.base.base, np.memmap)


def test_sharded_index_is_used(tmp_path):
    make_hf_model(tmp_path, shard="300KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert Checkpoint(tmp_path).weight_map == index["weight_map"]


@pytest.fixture
def folder(tmp_path):
    make_hf_model(tmp_path)
    return tmp_path


def rewrite_header(path, edit):
    """Change a safetensors file's JSON header in place (same data after it)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_missing_tensor_is_named(folder):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    rewrite_header(folder / "model.safetensors", lambda h: h.pop(name))
    with pytest.raises(LocalmixError, match=f"tensor {name} is missing"):
        localmix.load(folder)


def test_misshapen_tensor_is_named(folder):
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(h):  # same number of bytes, wrong shape
        rows, cols = h[name]["shape"]
        h[name]["shape"] = [rows // 2, cols * 2]
    rewrite_header(folder / "model.safetensors", edit)
    with pytest.raises(LocalmixError, match=f"{name} has shape .* expected"):
        localmix.load(folder)


def test_truncated_file_is_an_error(folder):
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1000)
    with pytest.raises(LocalmixError, match="truncated file"):
        localmix.load(folder)
    os.truncate(path, 5)
    with pytest.raises(LocalmixError, match="truncated safetensors file"):
        localmix.load(folder)


def test_garbage_header(folder):
    (folder / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"x" * 40)
    with pytest.raises(LocalmixError, match="corrupt safetensors header"):
        localmix.load(folder)


def test_missing_shard_and_missing_files(tmp_path):
    make_hf_model(tmp_path, shard="300KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(LocalmixError, match=f"{shard}: missing weights file"):
        localmix.load(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(LocalmixError, match="no tokenizer.model"):
        localmix.load(tmp_path)
    with pytest.raises(LocalmixError, match="unknown model"):
        localmix.load(tmp_path / "nowhere")


def test_no_weights(tmp_path):
    make_hf_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LocalmixError, match="no .safetensors weights"):
        localmix.load(tmp_path)


def test_unsupported_dtype(folder):
    name = "model.norm.weight"

    def edit(h):
        h[name]["dtype"] = "I32"
    rewrite_header(folder / "model.safetensors", edit)
    with pytest.raises(LocalmixError, match="dtype I32"):
        localmix.load(folder)


def test_header_lies_are_refused_at_open(folder):
    """Offsets reaching back into the header, two tensors on the same bytes, a byte count that is
    not the shape's: each refused when the file is opened, naming the tensor."""
    from localmix.checkpoint import SafetensorsFile
    path = folder / "model.safetensors"
    original = path.read_bytes()
    norm, other = "model.norm.weight", "model.layers.0.input_layernorm.weight"  # both 64 float32

    def negative(h):
        begin, end = h[norm]["data_offsets"]
        h[norm]["data_offsets"] = [-(end - begin), 0]  # the header's last bytes read as weights

    def overlap(h):
        h[other]["data_offsets"] = list(h[norm]["data_offsets"])

    def short(h):
        h[norm]["shape"] = [63]

    for edit, message in [(negative, f"{norm}.*data_offsets must be between 0"),
                          (overlap, "tensors .* overlap"), (short, f"{norm}.*256 bytes for shape \\[63\\] of F32")]:
        path.write_bytes(original)
        rewrite_header(path, edit)
        with pytest.raises(LocalmixError, match=message):
            SafetensorsFile(path)
        with pytest.raises(LocalmixError, match=message):
            localmix.load(folder)


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/passwd.safetensors", "sub/../../x.safetensors",
                                  "model.bin", "link.safetensors"])
def test_index_names_stay_in_the_folder(tmp_path, name):
    folder = tmp_path / "model"
    make_hf_model(folder, shard="300KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.norm.weight"]
    if name == "link.safetensors":  # a symlink inside that leads out
        (tmp_path / "outside.safetensors").write_bytes((folder / shard).read_bytes())
        os.symlink(tmp_path / "outside.safetensors", folder / name)
    index["weight_map"]["model.norm.weight"] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(LocalmixError, match="model.safetensors.index.json: .*(outside|not a relative|not a .safetensors)"):
        Checkpoint(folder)
