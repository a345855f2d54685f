"""Interop with mlx-lm's quantized Mixtral folders, as `mlx_lm.convert -q` writes them.

Both use MLX's affine quantization, so nothing is quantized again either way: an mlx-lm folder
keeps each layer's experts stacked ([experts, rows, ...] under `block_sparse_moe.switch_mlp.
{gate_proj,up_proj,down_proj}`), localmix one file per expert (`experts.E.{w1,w3,w2}`); import
slices the stacks, export stacks the files, bit for bit. The quantization settings live in
config.json's "quantization" block: bits and group size, and per module where one differs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from localmix.checkpoint import RAW_DTYPES, SafetensorsFile, tensor_table, to_float32
from localmix.config import ModelArgs
from localmix.errors import LocalmixError
from localmix.quant.convert import check_disk, write_arrays, write_model
from localmix.quant.affine import dequantize
from localmix.store import ModelFolder, expert_matrix, plan_layout

SWITCH = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def is_mlx_lm_folder(folder: Path) -> bool:
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "quantization" in config and any(Path(folder).glob("*.safetensors"))


def mlx_module(name: str) -> tuple[str, int | None]:
    """The mlx-lm module holding a localmix tensor, and the expert's index in its stack."""
    matrix = expert_matrix(name)
    if matrix:
        layer, expert, part = matrix
        return f"model.layers.{layer}.block_sparse_moe.switch_mlp.{SWITCH[part]}", expert
    return name.removesuffix(".weight"), None


class MLXFolder:
    """The tensors of an mlx-lm folder, raw (no conversion), from any of its safetensors files."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        self.files = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            f = SafetensorsFile(path)
            for name in f.tensors:
                self.files[name] = f

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        if name not in self.files:
            raise LocalmixError(f"{self.folder}: no tensor {name}; not an mlx-lm Mixtral folder?")
        return self.files[name].raw(name, RAW_DTYPES)

    def quantization(self, module: str) -> dict | None:
        """{bits, group_size} of a module, or None where it is stored in floats."""
        if module + ".scales" not in self.files:
            return None
        q = self.config["quantization"]
        own = q.get(module)
        return own if isinstance(own, dict) else {"bits": q["bits"], "group_size": q["group_size"]}


def half(raw: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """Scales or biases as float16; bfloat16 ones must convert exactly (they do within float16's range)."""
    if dtype == "F16":
        return raw
    values = to_float32(raw, dtype)
    converted = values.astype(np.float16)
    if not np.array_equal(converted.astype(np.float32), values):
        raise LocalmixError(f"{what}: {dtype} scales or biases that float16 cannot hold exactly")
    return converted


def import_mlx_lm(folder: Path, out_dir: Path, on_progress=None) -> Path:
    """A localmix model from an mlx-lm folder: every quantized tensor copied as it is stored."""
    source = MLXFolder(folder)
    raw_config = {k: v for k, v in source.config.items() if k not in ("quantization", "quantization_config")}
    args = ModelArgs.from_hf_config(raw_config, str(Path(folder) / "config.json"))
    table = tensor_table(args)
    settings = {name: source.quantization(mlx_module(name)[0]) for name, _ in table}
    groups = {s["group_size"] for s in settings.values() if s}
    if len(groups) != 1:
        raise LocalmixError(f"{folder}: group sizes {sorted(groups)} differ between tensors; localmix keeps one")
    group_size = groups.pop()

    def bits_for(name: str) -> int:
        if settings[name] is None:
            raise LocalmixError(f"{folder}: {name} is not quantized; localmix imports quantized mlx-lm models")
        return settings[name]["bits"]

    layouts, sizes = plan_layout(table, bits_for, group_size)
    tokenizer = Path(folder) / "tokenizer.model"
    if not tokenizer.is_file():
        raise LocalmixError(f"{folder}: no tokenizer.model (the sentencepiece tokenizer localmix reads)")
    check_disk(Path(out_dir).parent, sum(sizes.values()))

    def arrays_of(layout) -> list:
        module, expert = mlx_module(layout.name)
        if layout.bits is None:  # norms and routers, float32 here
            q = source.quantization(module)
            if q:  # a quantized router: its values, dequantized
                words, scales, biases = (source.raw(f"{module}.{p}") for p in ("weight", "scales", "biases"))
                return [dequantize(words[0], half(*scales, module), half(*biases, module), q["bits"],
                                   q["group_size"]).astype(np.float32)]
            return [to_float32(*source.raw(layout.name))]
        parts = [source.raw(f"{module}.{p}") for p in ("weight", "scales", "biases")]
        if expert is not None:
            parts = [(array[expert], dtype) for array, dtype in parts]
        return [parts[0][0], half(*parts[1], module), half(*parts[2], module)]

    bits = sorted({layout.bits for layout in layouts if layout.bits})
    return write_model(Path(out_dir), sizes, lambda tmp: write_arrays(tmp, layouts, arrays_of, on_progress),
                       tokenizer, raw_config,
                       {"repo": str(Path(folder).resolve()), "revision": None, "format": "mlx-lm"},
                       {"bits": "/".join(map(str, bits)), "group_size": group_size, "method": "mlx-lm (imported)"})


def export_mlx_lm(model_folder: Path, out: Path) -> Path:
    """An mlx-lm folder from a localmix model: experts stacked per layer, nothing quantized again."""
    from safetensors.numpy import save_file
    model = ModelFolder(model_folder)
    out = Path(out)
    if out.exists():
        raise LocalmixError(f"{out} exists already")
    tensors, modules = {}, {}
    stacks: dict[str, list] = {}
    for name, entry in model.manifest["tensors"].items():
        module, expert = mlx_module(name)
        value = model.tensor(name, tuple(entry["shape"]))
        if not hasattr(value, "bits"):  # norms and routers
            tensors[name] = value
            continue
        arrays = {"weight": value.words, "scales": value.scales, "biases": value.biases}
        modules[module] = {"bits": value.bits, "group_size": value.group_size}
        if expert is None:
            tensors.update({f"{module}.{p}": a for p, a in arrays.items()})
        else:
            stacks.setdefault(module, []).append((expert, arrays))
    for module, experts in stacks.items():
        experts.sort(key=lambda e: e[0])
        for p in ("weight", "scales", "biases"):
            tensors[f"{module}.{p}"] = np.stack([arrays[p] for _, arrays in experts])
    common = max({(q["bits"], q["group_size"]) for q in modules.values()},
                 key=lambda bq: sum((q["bits"], q["group_size"]) == bq for q in modules.values()))
    quantization = {"group_size": common[1], "bits": common[0],
                    **{m: q for m, q in sorted(modules.items()) if (q["bits"], q["group_size"]) != common}}
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, tmp / "model.safetensors",
                  metadata={"format": "mlx"})
        config = {**model.manifest["config"], "quantization": quantization}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        shutil.copyfile(model.folder / "tokenizer.model", tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True}, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
