"""`localmix export NAME OUT --format hf`: a Hugging Face folder (bfloat16 safetensors, config,
tokenizer) that transformers loads, and so vLLM and SGLang, which serve MoE models with expert
parallelism across GPUs and machines: the way out for a user who outgrows one laptop.

The weights are the model's as localmix computes with them (its quantized values, dequantized),
rounded to bfloat16, so transformers' logits are localmix's within that rounding. Written streaming:
one tensor in memory at a time, into shards of at most SHARD_BYTES, each through a hidden file renamed
at the end; the folder appears only when complete.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from localmix.errors import LocalmixError
from localmix.quant.mlx_lm import copy_tokenizer, written_folder
from localmix.store import ModelFolder, is_quantized

SHARD_BYTES = 4 << 30
# Families whose checkpoints on the hub name every expert's matrices (as localmix does): transformers
# loads those names. GraniteMoE and gpt-oss stack a layer's experts in other layouts.
PER_EXPERT_NAMES = ("mixtral", "mistral", "qwen2_moe", "qwen3_moe", "olmoe")


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (uint16), rounded to nearest even, as torch rounds."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def export_hf(model_folder: Path, out: Path, on_progress=None) -> Path:
    model = ModelFolder(model_folder)
    args, manifest = model.config, model.manifest
    if args.model_type not in PER_EXPERT_NAMES:
        raise LocalmixError(f"{model_folder}: exporting {args.model_type} to a Hugging Face folder is not "
                            f"supported yet (its checkpoints stack the experts)")
    out = Path(out)
    if out.exists():
        raise LocalmixError(f"{out} exists already")
    names = sorted(manifest["tensors"])
    nbytes = {name: 2 * int(np.prod(manifest["tensors"][name]["shape"])) for name in names}  # bfloat16
    shards, size = [[]], 0
    for name in names:
        if shards[-1] and size + nbytes[name] > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    with written_folder(out) as tmp:
        weight_map, done = {}, 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_shard(tmp / file, [(name, manifest["tensors"][name]["shape"]) for name in shard], model)
            weight_map.update({name: file for name in shard})
            done += len(shard)
            if on_progress:
                on_progress(done, len(names))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, indent=1))
        config = {**manifest["config"], "torch_dtype": "bfloat16", "dtype": "bfloat16"}
        config.pop("localmix_base_model", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer(model, tmp)
    return out


def write_shard(path: Path, tensors: list[tuple[str, list[int]]], model: ModelFolder) -> None:
    """A safetensors file of these tensors in bfloat16, written one tensor at a time (safetensors'
    layout: an 8-byte header length, the JSON header of offsets, then the data in that order)."""
    header, at = {}, 0
    for name, shape in tensors:
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [at, at + nbytes]}
        at += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in tensors:
            value = model.tensor(name, tuple(shape))
            values = value.dequantize() if is_quantized(value) else np.asarray(value, np.float32)
            f.write(bfloat16_bits(values).tobytes())
