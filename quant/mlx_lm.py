"""Interop with mlx-lm's quantized folders of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE, as
`mlx_lm.convert -q` writes them.

Both use MLX's affine quantization, so nothing is quantized again either way: an mlx-lm folder
keeps each layer's experts stacked ([experts, rows, ...] under `block_sparse_moe.switch_mlp.
{gate_proj,up_proj,down_proj}` for Mixtral, `mlp.switch_mlp.*` for the others), localmix one file
per expert (`experts.E.{w1,w3,w2}` or `experts.E.{gate,up,down}_proj`); import slices the stacks,
export stacks the files, bit for bit. Every other tensor has the same name in both (shared experts,
q/k norms, the shared expert's gate); biases of linear layers are `<module>.bias` beside the
quantized `<module>.biases`. The quantization settings live in config.json's "quantization" block:
bits and group size, and per module where one differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from localmix import validate
from localmix.checkpoint import RAW_DTYPES, SafetensorsFile, tensor_table, to_float32, tokenizer_files_in
from localmix.config import ModelArgs
from localmix.errors import LocalmixError
from localmix.quant.convert import check_disk, write_arrays, write_model
from localmix.quant.affine import BITS, GROUP_SIZES, dequantize
from localmix.store import ModelFolder, expert_matrix, is_quantized, plan_layout, stays_float
from localmix.tokenizer import SENTENCEPIECE, load_tokenizer

SWITCH = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
FLOATS = ("F32", "F16", "BF16")


def is_mlx_lm_folder(folder: Path) -> bool:
    try:
        config = validate.read_json(Path(folder) / "config.json", "config.json")
    except LocalmixError:
        return False  # not ours to judge: the Hugging Face path reads it again and says what is wrong
    return isinstance(config, dict) and "quantization" in config and any(Path(folder).glob("*.safetensors"))


def mlx_module(name: str) -> tuple[str, int | None]:
    """The mlx-lm module holding a localmix tensor's weight, and the expert's index in its stack.
    A linear layer's bias is a float tensor of the same name (is_bias)."""
    matrix = expert_matrix(name)
    if matrix:
        layer, expert, part = matrix
        block = "block_sparse_moe" if ".block_sparse_moe." in name else "mlp"
        return f"model.layers.{layer}.{block}.switch_mlp.{SWITCH[part]}", expert
    return name.removesuffix(".weight"), None


def is_bias(name: str) -> bool:
    return name.endswith(".bias")


def mlx_lm_config(config: dict, args: ModelArgs, source: str) -> dict:
    """config.json for mlx-lm: the keys its ModelArgs require, which transformers may leave to their
    defaults or save elsewhere (rope_theta in rope_parameters, Qwen3-MoE's expert count as
    num_local_experts), written out. A model mlx-lm's module for its family cannot hold is refused
    rather than exported to give other logits there."""
    cannot = {"qwen2_moe": [(not args.qkv_bias, "q/k/v without biases"),
                            (not all(args.sparse_layers), "dense layers among sparse ones")],
              "qwen3_moe": [(args.qkv_bias, "attention biases")],
              "olmoe": [(args.clip_qkv is not None, "clip_qkv")]}.get(args.model_type, [])
    if args.model_type == "gpt_oss":  # its sinks, biased experts and activation are not mapped to mlx-lm's yet
        raise LocalmixError(f"{source}: exporting gpt_oss to mlx-lm is not supported yet")
    for refused, what in cannot:
        if refused:
            raise LocalmixError(f"{source}: mlx-lm's {args.model_type} has no place for {what}")
    extra = {"head_dim": args.head_dim, "rope_theta": args.rope_theta, "tie_word_embeddings": args.tie_word_embeddings,
             "max_position_embeddings": args.max_position_embeddings, "num_key_value_heads": args.num_key_value_heads}
    if args.model_type in ("qwen2_moe", "qwen3_moe", "olmoe"):
        extra.update(num_experts=args.num_local_experts, norm_topk_prob=args.norm_topk_prob,
                     moe_intermediate_size=args.moe_intermediate_size)
    if args.model_type == "qwen3_moe":
        extra.update(decoder_sparse_step=1, mlp_only_layers=[i for i, s in enumerate(args.sparse_layers) if not s])
    return {**config, **extra}


def quantization_settings(block, source: str) -> tuple[dict, dict]:
    """config.json's "quantization" block: the default {bits, group_size}, and per module either
    its own settings or true/false (quantized with the default, or not at all), as mlx-lm writes
    them. Only what localmix can hold is accepted: affine mode, 2, 3, 4 or 8 bits, groups of 32-128."""
    block = validate.json_object(block, source, "quantization")

    def setting(entry: dict, what: str) -> dict:
        mode = entry.get("mode", "affine")
        if mode != "affine":
            raise LocalmixError(f"{source}: {what}.mode is {mode!r:.40}; localmix reads mlx-lm's affine quantization")
        bits = validate.integer(entry.get("bits"), f"{what}.bits", source, 1, 32)
        group_size = validate.integer(entry.get("group_size"), f"{what}.group_size", source, 1, 1 << 20)
        if bits not in BITS or group_size not in GROUP_SIZES:
            raise LocalmixError(f"{source}: {what} is {bits} bits in groups of {group_size}; localmix holds "
                                f"{' or '.join(map(str, BITS))} bits in groups of {', '.join(map(str, GROUP_SIZES))}")
        return {"bits": bits, "group_size": group_size}

    default = setting(block, "quantization")
    modules = {}
    for key, value in block.items():
        if key in ("bits", "group_size", "mode"):
            continue
        if isinstance(value, bool):
            modules[key] = default if value else None
        elif isinstance(value, dict):
            modules[key] = setting(value, f"quantization[{key!r:.80}]")
        else:
            raise LocalmixError(f"{source}: quantization[{key!r:.80}] must be an object or true/false")
    return default, modules


class MLXFolder:
    """The tensors of an mlx-lm folder, raw (no conversion), from any of its safetensors files,
    whose headers the checkpoint reader checks whole when it opens them."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        source = str(self.folder / "config.json")
        self.config = validate.json_object(validate.read_json(self.folder / "config.json", "config.json"), source,
                                           "config.json")
        if "quantization" not in self.config:
            raise LocalmixError(f"{source}: no quantization block; not an mlx-lm quantized folder")
        self.default, self.modules = quantization_settings(self.config["quantization"], source)
        self.files = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            f = SafetensorsFile(validate.confined(self.folder, path.name, str(self.folder)))
            for name in f.tensors:
                if name in self.files:  # two values for one tensor: which one is meant is anyone's guess
                    raise LocalmixError(f"{self.folder}: tensor {name} is in {self.files[name].path.name} "
                                        f"and in {path.name}")
                self.files[name] = f

    def locate(self, name: str, dtypes) -> tuple[str, tuple[int, ...]]:
        if name not in self.files:
            raise LocalmixError(f"{self.folder}: no tensor {name}; not an mlx-lm folder of the model its "
                                f"config.json describes?")
        dtype, shape, _ = self.files[name].locate(name, {d: RAW_DTYPES[d] for d in dtypes})
        return dtype, shape

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        if name not in self.files:
            raise LocalmixError(f"{self.folder}: no tensor {name}; not an mlx-lm folder of the model its "
                                f"config.json describes?")
        return self.files[name].raw(name, RAW_DTYPES)

    def quantization(self, module: str) -> dict | None:
        """{bits, group_size} of a module, or None where it is stored in floats. Whether it is
        quantized is what the files hold (scales or not); config.json must agree."""
        quantized = module + ".scales" in self.files
        setting = self.modules.get(module, self.default)
        if quantized and setting is None:
            raise LocalmixError(f"{self.folder}: {module} has scales but config.json says it is not quantized")
        return setting if quantized else None

    def check(self, module: str, shape: tuple[int, ...], experts: int | None) -> dict | None:
        """A module's tensors' dtypes and shapes against what the config implies (experts: the size
        of its stack), before anything is read. Returns its quantization settings."""
        stack = (experts,) if experts is not None else ()
        q = self.quantization(module)
        if q is None:
            dtype, found = self.locate(module + ".weight", FLOATS)
            expected = stack + shape
        else:
            rows, cols = shape
            if cols % q["group_size"]:
                raise LocalmixError(f"{self.folder}: {module} has {cols} columns, not a multiple of its group size "
                                    f"{q['group_size']}")
            self.locate(module + ".weight", ["U32"])
            expected = stack + (rows, cols * q["bits"] // 32)
            for part in ("scales", "biases"):
                self.locate(f"{module}.{part}", FLOATS)
                found = self.files[f"{module}.{part}"].tensors[f"{module}.{part}"]["shape"]
                if tuple(found) != stack + (rows, cols // q["group_size"]):
                    raise LocalmixError(f"{self.folder}: {module}.{part} has shape {list(found)}, expected "
                                        f"{list(stack + (rows, cols // q['group_size']))} for {q['group_size']}-value groups")
            found = self.files[module + ".weight"].tensors[module + ".weight"]["shape"]
        if tuple(found) != expected:
            raise LocalmixError(f"{self.folder}: {module}.weight has shape {list(found)}, expected {list(expected)} "
                                f"from config.json" + (f" at {q['bits']} bits" if q else ""))
        return q


# float16's smallest normal number: below it float16 has fewer significant bits than bfloat16.
F16_NORMAL = 2.0 ** -14


def half(raw: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """Scales or biases as float16; bfloat16 (or float32) ones must convert exactly (bfloat16 ones
    do within float16's normal range). Below that range bfloat16 ones are rounded: MLX gives a
    group of zeros (a padding row of a bfloat16 model's embeddings) the scale -1e-7, which float16
    holds only as a subnormal; the rounding moves each of that group's values by at most
    255 * 2^-25 (8e-6)."""
    if dtype == "F16":
        values = raw
    else:
        values = to_float32(raw, dtype)
        converted = values.astype(np.float16)
        inexact = converted.astype(np.float32) != values
        if (inexact & ~((np.abs(values) < F16_NORMAL) & (dtype == "BF16"))).any():
            raise LocalmixError(f"{what}: {dtype} scales or biases that float16 cannot hold exactly")
        values = converted
    if not np.isfinite(values).all():
        raise LocalmixError(f"{what}: scales or biases that are not finite")
    return values


def import_mlx_lm(folder: Path, out_dir: Path, on_progress=None) -> Path:
    """A localmix model from an mlx-lm folder: every quantized tensor copied as it is stored."""
    source = MLXFolder(folder)
    raw_config = {k: v for k, v in source.config.items() if k not in ("quantization", "quantization_config")}
    args = ModelArgs.from_hf_config(raw_config, str(Path(folder) / "config.json"))
    if args.model_type == "gpt_oss":  # its sinks, biased experts and activation are not mapped to mlx-lm's yet
        raise LocalmixError(f"{folder}: importing gpt_oss from mlx-lm is not supported yet; pull the Hugging Face model")
    # tensor_table lists every expert matrix the config counts: first make sure the files could
    # hold that many (4 bits a value at least), so a lying count cannot size that list.
    values = 3 * args.hidden_size * sum(args.mlp_widths)
    held = sum(f.size for f in {id(f): f for f in source.files.values()}.values())
    if values // 2 > held:
        raise LocalmixError(f"{folder}: config.json describes {values} expert weights, more than the safetensors "
                            f"files ({held} bytes) hold")
    table = tensor_table(args)
    modules: dict[str, tuple[tuple[int, ...], int | None]] = {}
    biases = {name: shape for name, shape in table if is_bias(name)}
    for name, shape in table:
        if not is_bias(name):
            module, expert = mlx_module(name)
            modules[module] = (shape, None if expert is None else args.num_local_experts)
    settings = {module: source.check(module, shape, experts) for module, (shape, experts) in modules.items()}
    for name, shape in biases.items():
        _, found = source.locate(name, FLOATS)
        if tuple(found) != shape:
            raise LocalmixError(f"{folder}: {name} has shape {list(found)}, expected {list(shape)} from config.json")
    parts = {f"{module}.{p}" for module in modules for p in ("weight", "scales", "biases")} | set(biases)
    extra = sorted(set(source.files) - parts)
    if extra:  # as mlx-lm's strict load refuses them: tensors the config has no place for mean it is not this model
        raise LocalmixError(f"{folder}: tensor {extra[0]} is not part of the model config.json describes"
                            + (f" ({len(extra)} such tensors)" if len(extra) > 1 else ""))
    groups = {s["group_size"] for name, _ in table
              if not stays_float(name) and (s := settings[mlx_module(name)[0]])}
    if len(groups) > 1:
        raise LocalmixError(f"{folder}: group sizes {sorted(groups)} differ between tensors; localmix keeps one")
    group_size = groups.pop() if groups else source.default["group_size"]

    def bits_for(name: str) -> int:
        setting = settings[mlx_module(name)[0]]
        if setting is None:
            raise LocalmixError(f"{folder}: {name} is not quantized; localmix imports quantized mlx-lm models")
        return setting["bits"]

    layouts, sizes = plan_layout(table, bits_for, group_size, args)
    tokenizer = tokenizer_files_in(Path(folder), "the tokenizers localmix reads")
    load_tokenizer(folder, args.vocab_size, files=tokenizer)
    check_disk(Path(out_dir).parent, sum(sizes.values()))

    def floats(values: np.ndarray, what: str) -> np.ndarray:
        if not np.isfinite(values).all():
            raise LocalmixError(f"{folder}: {what} holds values that are not finite")
        return values

    def arrays_of(layout) -> list:
        if is_bias(layout.name):
            return [floats(to_float32(*source.raw(layout.name)), layout.name)]
        module, expert = mlx_module(layout.name)
        if layout.bits is None:  # norms and routers, float32 here
            q = settings[module]
            if q:  # a quantized router: its values, dequantized
                words, scales, biases = (source.raw(f"{module}.{p}") for p in ("weight", "scales", "biases"))
                return [dequantize(words[0], half(*scales, module), half(*biases, module), q["bits"],
                                   q["group_size"]).astype(np.float32)]
            return [floats(to_float32(*source.raw(layout.name)), layout.name)]
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
    config = mlx_lm_config(model.manifest["config"], model.config, str(model_folder))
    tensors, modules = {}, {}
    stacks: dict[str, list] = {}
    for name, entry in model.manifest["tensors"].items():
        module, expert = mlx_module(name)
        value = model.tensor(name, tuple(entry["shape"]))
        if not is_quantized(value):  # norms, routers, biases
            tensors[name] = value
            continue
        arrays = {"weight": value.words, "scales": value.scales, "biases": value.biases}
        found = {"bits": value.bits, "group_size": value.group_size}
        if modules.setdefault(module, found) != found:
            raise LocalmixError(f"{model_folder}: the experts of {module} differ in bits (`localmix shrink` made "
                                f"it so), and mlx-lm keeps a layer's experts in one format; export it as GGUF, "
                                f"or export the model it was made from")
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
    with written_folder(out) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, tmp / "model.safetensors",
                  metadata={"format": "mlx"})
        config = {**config, "quantization": quantization}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer(model, tmp)
    return out


@contextlib.contextmanager
def written_folder(out: Path):
    """A hidden folder beside `out` to write an export into: renamed to `out` when the block ends,
    removed if it fails, so that `out` appears only complete."""
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer(model: ModelFolder, folder: Path) -> None:
    """The model's tokenizer files into a folder that transformers (and mlx-lm) open: a tokenizer.json
    comes with its own tokenizer_config.json; a bare tokenizer.model gets the config that opens it."""
    for name, path in model.tokenizer_files.items():
        shutil.copyfile(path, folder / name)
    if SENTENCEPIECE in model.tokenizer_files:
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True}, indent=2))
