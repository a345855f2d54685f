"""mlx-lm interop: import an mlx-lm quantized Mixtral folder, export one, both without quantizing again."""

import json

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install 'mlx[cpu]' on Linux)")

import localmix  # noqa: E402
from localmix.checkpoint import Checkpoint  # noqa: E402
from localmix.quant.convert import LocalSource, convert  # noqa: E402
from localmix.quant.mlx_lm import SWITCH  # noqa: E402
from localmix.store import read_manifest  # noqa: E402

from conftest import TOKENIZER_V1, make_hf_model  # noqa: E402
from test_cli import assert_one_line_error, localmix_cli  # noqa: E402

IDS = [1, 415, 2936, 9060, 285, 1142, 754, 28705]


def mlx_lm_folder(hf, out, bits=4, group_size=64, scale_dtype=mx.float16):
    """What `mlx_lm.convert -q` writes, made here with mx.quantize: every linear layer and the
    embedding quantized (the routers too), experts stacked under switch_mlp, the settings in
    config.json, scales and biases in the model's dtype. Returns the quantized arrays by name."""
    checkpoint = Checkpoint(hf)
    config = json.loads((hf / "config.json").read_text())
    weights, quantized = {}, {}
    state = {name: checkpoint._file(shard).load(name) for name, shard in checkpoint.weight_map.items()}
    stacks = {}
    for name, value in state.items():
        if value.ndim == 1:
            weights[name] = mx.array(value).astype(scale_dtype)
            continue
        q = [np.array(a) for a in mx.quantize(mx.array(value), group_size=group_size, bits=bits)]
        q[1], q[2] = (np.array(mx.array(a).astype(scale_dtype).astype(mx.float32)) for a in q[1:])  # as stored
        quantized[name] = q
        parts = name.split(".")
        if "experts" in parts:
            i = parts.index("experts")
            module = ".".join(parts[:i]) + ".switch_mlp." + SWITCH[parts[i + 2]]
            stacks.setdefault(module, {})[int(parts[i + 1])] = q
        else:
            module = name.removesuffix(".weight")
            for part, array in zip(("weight", "scales", "biases"), q):
                weights[f"{module}.{part}"] = mx.array(array).astype(scale_dtype) if part != "weight" else mx.array(array)
    for module, experts in stacks.items():
        for k, part in enumerate(("weight", "scales", "biases")):
            stacked = mx.stack([mx.array(experts[e][k]) for e in sorted(experts)])
            weights[f"{module}.{part}"] = stacked if part == "weight" else stacked.astype(scale_dtype)
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": group_size, "bits": bits}}))
    (out / "tokenizer.model").write_bytes(TOKENIZER_V1.read_bytes())
    return quantized


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    make_hf_model(folder, dtype=torch.bfloat16, intermediate_size=128, num_local_experts=4)
    return folder


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_import_copies_the_quantized_tensors_bit_for_bit(hf, tmp_path, scale_dtype):
    source = tmp_path / "mixtral-4bit-mlx"
    quantized = mlx_lm_folder(hf, source, scale_dtype=getattr(mx, scale_dtype))
    result = localmix_cli("pull", source, env={"LOCALMIX_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "home" / "models" / "mixtral-4bit-mlx"
    model = localmix.load(folder, backend="numpy")
    layer = model.transformer.weights.layers[1]
    for name, matrix in [("model.layers.1.self_attn.q_proj.weight", layer.wq),
                         ("model.layers.1.block_sparse_moe.experts.3.w2.weight", layer.experts[3].w2),
                         ("model.layers.1.block_sparse_moe.experts.0.w1.weight", layer.experts[0].w1),
                         ("lm_head.weight", model.transformer.weights.lm_head)]:
        words, scales, biases = quantized[name]
        np.testing.assert_array_equal(matrix.words, words)
        np.testing.assert_array_equal(matrix.scales.astype(np.float32), scales)
        np.testing.assert_array_equal(matrix.biases.astype(np.float32), biases)
    assert read_manifest(folder)["source"]["format"] == "mlx-lm"
    assert localmix_cli("verify", folder).returncode == 0


@pytest.mark.parametrize("bits", ["4", "3"])
def test_export_then_import_is_lossless_and_mlx_lm_agrees(hf, tmp_path, bits):
    """3: experts at 3 bits (MLX's own 3-bit packing), the rest at 4, exported with per-module settings."""
    original = convert(LocalSource(hf), tmp_path / "tiny-q4", bits=bits)
    exported = tmp_path / "tiny-mlx"
    result = localmix_cli("export", original, exported, "--format", "mlx-lm")
    assert result.returncode == 0, result.stderr
    config = json.loads((exported / "config.json").read_text())
    assert config["quantization"]["lm_head"] == {"bits": 8, "group_size": 64}
    experts = config["quantization"].get("model.layers.0.block_sparse_moe.switch_mlp.gate_proj", config["quantization"])
    assert experts["bits"] == int(bits)
    again = tmp_path / "home" / "models" / "back"
    assert localmix_cli("pull", exported, "--name", "back", env={"LOCALMIX_HOME": str(tmp_path / "home")}).returncode == 0
    a, b = read_manifest(original), read_manifest(again)
    assert {n: t["sha256"] for n, t in a["tensors"].items()} == {n: t["sha256"] for n, t in b["tensors"].items()}
    assert {f: e["sha256"] for f, e in a["files"].items()} == {f: e["sha256"] for f, e in b["files"].items()}

    mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")
    model, _ = mlx_lm.load(str(exported))
    model.set_dtype(mx.float32)
    theirs = np.array(model(mx.array([IDS]))[0].astype(mx.float32))
    ours = localmix.load(original, backend="numpy").logits(IDS)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-4


def test_a_three_bit_mlx_lm_folder_is_imported_as_it_is(hf, tmp_path):
    source = tmp_path / "mixtral-3bit-mlx"
    quantized = mlx_lm_folder(hf, source, bits=3)
    result = localmix_cli("pull", source, env={"LOCALMIX_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    model = localmix.load(tmp_path / "home" / "models" / "mixtral-3bit-mlx")
    words, _, _ = quantized["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    np.testing.assert_array_equal(model.transformer.weights.layers[1].experts[2].w3.words, words)
    reference = localmix.load(tmp_path / "home" / "models" / "mixtral-3bit-mlx", backend="numpy").logits(IDS)
    assert np.abs(model.logits(IDS) - reference).max() <= 1e-3 * np.abs(reference).max()  # the kernels' 3 bits


def test_bad_exports(hf, tmp_path):
    original = convert(LocalSource(hf), tmp_path / "tiny-q4", bits="4")
    assert_one_line_error(localmix_cli("export", original, tmp_path / "x", "--format", "onnx"), "unknown export format")
    assert_one_line_error(localmix_cli("export", hf, tmp_path / "x"), "is not a localmix model")
    assert_one_line_error(localmix_cli("export", original, original), "exists already")


def test_pull_an_mlx_lm_repository_from_the_hub(hf, tmp_path):
    from fake_hub import FakeHub
    source = tmp_path / "mixtral-4bit-mlx"
    quantized = mlx_lm_folder(hf, source, bits=8, group_size=32)
    hub = FakeHub()
    hub.add_folder("mlx-community/tiny-mixtral-8bit", source)
    try:
        env = {"LOCALMIX_HOME": str(tmp_path / "home"), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
        result = localmix_cli("pull", "mlx-community/tiny-mixtral-8bit", "--name", "tiny", env=env)
    finally:
        hub.close()
    assert result.returncode == 0, result.stderr
    model = localmix.load(tmp_path / "home" / "models" / "tiny", backend="numpy")
    np.testing.assert_array_equal(model.transformer.weights.layers[0].experts[2].w3.words,
                                  quantized["model.layers.0.block_sparse_moe.experts.2.w3.weight"][0])
    assert model.transformer.weights.layers[0].wq.bits == 8 and model.transformer.weights.layers[0].wq.group_size == 32


def test_lying_mlx_lm_folders_are_one_error_line_and_list_nothing(hf, tmp_path):
    """A quantization block that is not typed as mlx-lm writes it, and an expert stack whose shape
    is not the config's: refused before any tensor is read, with nothing listed."""
    from safetensors.numpy import load_file, save_file

    source = tmp_path / "mixtral-4bit-mlx"
    mlx_lm_folder(hf, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 64, "bits": "4"}}))
    env = {"LOCALMIX_HOME": str(tmp_path / "home")}
    assert_one_line_error(localmix_cli("pull", source, env=env), "quantization.bits must be an integer")

    (source / "config.json").write_text(json.dumps(config))
    stack = "model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight"
    arrays = load_file(str(source / "model.safetensors"))
    arrays[stack] = arrays[stack].reshape(2, -1, arrays[stack].shape[-1])  # same bytes, half the experts
    save_file(arrays, str(source / "model.safetensors"))
    assert_one_line_error(localmix_cli("pull", source, env=env), f"{stack} has shape")
    assert not [p for p in (tmp_path / "home" / "models").iterdir() if not p.name.endswith(".lock")]


# -- Qwen3-MoE, Qwen2-MoE, OLMoE, GraniteMoE: mlx-lm's qwen3_moe, qwen2_moe, olmoe, granitemoe -----

# Widths a multiple of mlx-lm's default group of 64; a dense layer among Qwen3-MoE's sparse ones.
NEW_FAMILIES = {
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=32, num_hidden_layers=3, num_experts_per_tok=2,
                      norm_topk_prob=True, mlp_only_layers=[1], moe_intermediate_size=64, intermediate_size=128),
    "qwen2_moe": dict(model_type="qwen2_moe", moe_intermediate_size=64, shared_expert_intermediate_size=128),
    "olmoe": dict(model_type="olmoe", intermediate_size=64, eos_token_id=2),
    "granitemoe": dict(model_type="granitemoe", intermediate_size=64, embedding_multiplier=12.0,
                       residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=6.0,
                       tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(NEW_FAMILIES))
def family_hf(request, tmp_path_factory):
    """A random model of the family with a byte-level BPE tokenizer.json (as the hub has them)."""
    from test_gguf import original_tokenizer
    family = request.param
    root = tmp_path_factory.mktemp(family)
    make_hf_model(root / "hf", dtype=torch.bfloat16, tokenizer=None, **NEW_FAMILIES[family])
    tokenizer = original_tokenizer(root / "tokenizer", "olmo" if family == "olmoe" else "qwen2")
    for path in tokenizer.iterdir():
        (root / "hf" / path.name).write_bytes(path.read_bytes())
    # The keys the hub's configs have (written by transformers 4) and mlx-lm reads: transformers 5
    # saves Qwen3-MoE's expert count as num_local_experts and rope_theta inside rope_parameters.
    config = json.loads((root / "hf" / "config.json").read_text())
    config.update(num_experts=config.get("num_experts", config.get("num_local_experts")),
                  rope_theta=config["rope_parameters"]["rope_theta"])
    (root / "hf" / "config.json").write_text(json.dumps(config))
    return family, root / "hf"


def mlx_lm_logits(folder) -> np.ndarray:
    mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")
    model, _ = mlx_lm.load(str(folder))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


def test_new_families_export_to_mlx_lm_and_back(family_hf, tmp_path):
    """mlx-lm's own model code, loading our export, computes our logits; pulled back, every tensor
    is the same bytes."""
    family, hf = family_hf
    original = convert(LocalSource(hf), tmp_path / "q4", bits="4")
    exported = tmp_path / f"{family}-mlx"
    result = localmix_cli("export", original, exported, "--format", "mlx-lm")
    assert result.returncode == 0, result.stderr
    ours = localmix.load(original, backend="numpy").logits(IDS)
    theirs = mlx_lm_logits(exported)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-4
    again = tmp_path / "home" / "models" / "back"
    result = localmix_cli("pull", exported, "--name", "back", env={"LOCALMIX_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    a, b = read_manifest(original), read_manifest(again)
    assert {n: t["sha256"] for n, t in a["tensors"].items()} == {n: t["sha256"] for n, t in b["tensors"].items()}
    assert (again / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


def test_new_families_import_what_mlx_lm_convert_writes(family_hf, tmp_path):
    """A folder made by mlx_lm.convert itself (its own names, stacks, per-module settings such as
    Qwen3-MoE's 8-bit router) pulls, and our logits are mlx-lm's on it."""
    mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")
    family, hf = family_hf
    source = tmp_path / f"{family}-4bit-mlx"
    mlx_lm.convert(str(hf), str(source), quantize=True, q_bits=4, q_group_size=64)
    result = localmix_cli("pull", source, env={"LOCALMIX_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "home" / "models" / source.name
    assert read_manifest(folder)["source"]["format"] == "mlx-lm"
    ours = localmix.load(folder, backend="numpy").logits(IDS)
    theirs = mlx_lm_logits(source)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-4


@pytest.mark.parametrize("family, change, what", [
    ("qwen3_moe", dict(attention_bias=True), "attention biases"),
    ("qwen2_moe", dict(qkv_bias=False), "q/k/v without biases"),
    ("qwen2_moe", dict(mlp_only_layers=[0], intermediate_size=128), "dense layers"),
    ("olmoe", dict(clip_qkv=2.0), "clip_qkv")])
def test_exports_mlx_lm_would_compute_otherwise_are_refused(tmp_path, family, change, what):
    """mlx-lm's module of the family has no place for these (it would load the export and give
    other logits, or fail on a missing tensor): refused, and nothing written."""
    make_hf_model(tmp_path / "hf", **{**NEW_FAMILIES[family], **change})
    original = convert(LocalSource(tmp_path / "hf"), tmp_path / "q4", bits="4")
    assert_one_line_error(localmix_cli("export", original, tmp_path / "out", "--format", "mlx-lm"),
                          f"mlx-lm's {family} has no place for {what}")
    assert not (tmp_path / "out").exists()
