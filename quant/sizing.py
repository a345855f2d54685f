"""Per-expert bit widths to meet a size: `localmix pull REPO --size 14GB`, `localmix shrink NAME --size 14GB`.

A model's experts are nearly all its bytes, and they are not equally used nor equally hard to
quantize. Starting from a model whose experts are stored at 4 (or 8) bits, each expert gets a score:
how often a calibration text is routed to it (the model's own routing.json where `localmix stats
--save` wrote one, else the text given, else the built-in calibration.txt) times how far its weights
move when quantized again at 2 bits (the squared error, estimated on evenly spread rows). The
experts of least score are stored at 2 bits (groups of 64, the format the vector kernels take) until
the model fits the size; the others keep their bytes as they are (linked, or copied where the file
system cannot link). MC-MoE allocates bits by the same two measures (activation frequency and
quantization loss), there by linear programming over 1-3 bits; here the choice is between two
widths, so ranking by score is the optimum of that knapsack (every expert of a model saves the
same bytes).

The 2-bit experts are quantized from the stored 4-bit values, not from the original floats, which
may be gone (a pull's shards, a GGUF or mlx-lm source): on the mini model the KL divergence this
adds is in the README's quality table (2-bit experts from the source vs from the 4-bit model).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from localmix.checkpoint import tensor_table
from localmix.errors import LocalmixError
from localmix.quant.affine import dequantize, quantize
from localmix.store import ModelFolder, TensorLayout, expert_matrix, place, sha256_of

SMALL_BITS, SMALL_GROUP = 2, 64   # the small experts' format: 2-bit groups of 64 run the vector kernels
ESTIMATE_VALUES = 1 << 20         # values per matrix that estimate an expert's 2-bit error
CALIBRATION_TOKENS = 1024         # of the calibration text, at most
BLOCK_VALUES = 1 << 22            # values requantized at a time (as convert.BLOCK_VALUES)

Steps = Callable[[str, int, int], None]  # on_step(what, done, total): progress of each stage


def calibration_text() -> str:
    return resources.files("localmix").joinpath("calibration.txt").read_text(encoding="utf-8")


def routing_counts(model: ModelFolder, text: str | None, on_step: Steps | None = None) -> tuple[np.ndarray, str]:
    """Tokens routed to each expert [MoE layers, experts], and where the counts come from: the folder's
    routing.json (`localmix stats --save`) unless a text is given, else a pass over the text (the
    built-in calibration text without one) through the model as it is stored."""
    import localmix
    from localmix.routing import ROUTING_FILE, collect, read_routing

    folder, args = model.folder, model.config
    layers = args.moe_layers
    if text is None and (folder / ROUTING_FILE).is_file():
        routed = read_routing(folder, (args.num_hidden_layers, args.num_local_experts))
        return routed[layers], f"its {ROUTING_FILE}"
    llm = localmix.load(folder)
    limit = min(CALIBRATION_TOKENS, args.max_position_embeddings)
    ids = llm.tokenizer.encode(text if text is not None else calibration_text(), bos=True)[:limit]
    progress = (lambda done, total: on_step("calibrate", done, total)) if on_step else None
    routed = collect(llm, ids, on_progress=progress)["routed"]
    return routed[layers], f"{len(ids)} tokens of {'the text given' if text is not None else 'calibration.txt'}"


def rows_for_estimate(rows: int, cols: int) -> np.ndarray:
    """Evenly spread rows holding about ESTIMATE_VALUES values."""
    step = max(1, rows * cols // ESTIMATE_VALUES)
    return np.arange(0, rows, step)


def requantize_error(model: ModelFolder, layout: TensorLayout) -> float:
    """The squared distance, over the whole matrix (estimated on rows_for_estimate), between its
    stored values and those values quantized again at SMALL_BITS."""
    m = model.tensor(layout.name, layout.shape)
    rows = rows_for_estimate(*layout.shape)
    stored = m.dequantize(rows)
    small = dequantize(*quantize(stored, SMALL_BITS, SMALL_GROUP, steps=4), SMALL_BITS, SMALL_GROUP)
    return float(((small - stored) ** 2).sum()) * layout.shape[0] / len(rows)


def expert_layouts(model: ModelFolder) -> dict[tuple[int, int], list[TensorLayout]]:
    experts: dict[tuple[int, int], list[TensorLayout]] = {}
    for name, layout in model.layouts.items():
        matrix = expert_matrix(name)
        if matrix and layout.bits is not None:
            experts.setdefault(matrix[:2], []).append(layout)
    return experts


def choose_small(model: ModelFolder, size: int, text: str | None = None, on_step: Steps | None = None,
                 say=print) -> set[tuple[int, int]]:
    """The experts to store at SMALL_BITS so that the model fits `size` bytes: those of least score
    (routed tokens + 1, times the requantization error), as few as fit it."""
    args, name = model.config, model.folder.name
    if not args.is_moe:
        raise LocalmixError(f"{name} has no experts: --size picks bit widths per expert")
    experts = expert_layouts(model)
    if not experts:
        raise LocalmixError(f"{name}: its experts are not quantized")
    files = model.manifest["files"]
    total = sum(f["size"] for f in files.values())
    _, all_small = place(tensor_table(args), lambda name, shape: small_format(name, shape, model.layouts, set(experts)),
                         args)
    saving = {key: files[layouts[0].file]["size"] - all_small[layouts[0].file] for key, layouts in experts.items()}
    smallest = total - sum(max(s, 0) for s in saving.values())
    if size >= total:
        say(f"the model is {total / 1e9:.2f} GB, within {size / 1e9:.2f} GB: its experts keep their bits")
        return set()
    if size < smallest:
        raise LocalmixError(f"--size {size / 1e9:.3f} GB is below the smallest this model can be: "
                            f"{smallest / 1e9:.3f} GB with every expert at {SMALL_BITS} bits")
    routed, where = routing_counts(model, text, on_step)
    errors = {}
    for i, key in enumerate(sorted(experts)):
        errors[key] = sum(requantize_error(model, layout) for layout in experts[key])
        if on_step:
            on_step("measure experts", i + 1, len(experts))
    moe_index = {layer: i for i, layer in enumerate(args.moe_layers)}
    score = {key: (routed[moe_index[key[0]], key[1]] + 1) * errors[key] for key in experts}
    chosen, excess = set(), total - size
    for key in sorted(experts, key=lambda k: (score[k], k)):
        if excess <= 0:
            break
        if saving[key] > 0:
            chosen.add(key)
            excess -= saving[key]
    say(f"{len(chosen)} of {len(experts)} experts at {SMALL_BITS} bits (routing: {where}), "
        f"{(total - sum(saving[k] for k in chosen)) / 1e9:.2f} GB")
    return chosen


def small_format(name: str, shape, layouts: dict[str, TensorLayout], small: set) -> tuple[str, int | None]:
    """A tensor's (dtype, group size) in the resized model: SMALL_BITS for the chosen experts' quantized
    matrices whose columns the small groups divide, else what it is stored as."""
    layout = layouts[name]
    matrix = expert_matrix(name)
    if matrix and matrix[:2] in small and layout.bits is not None and layout.bits > SMALL_BITS \
            and shape[1] % SMALL_GROUP == 0:
        return f"q{SMALL_BITS}", SMALL_GROUP
    return layout.dtype, layout.group_size


def resize(folder: Path, out: Path, size: int, text: str | None = None, on_step: Steps | None = None,
           say=print) -> Path:
    """A new model folder `out` from `folder` with the experts choose_small picks at SMALL_BITS."""
    from localmix.quant.convert import check_disk, write_model

    folder, out = Path(folder), Path(out)
    if out.exists():
        raise LocalmixError(f"a model named {out.name} exists already; `localmix rm {out.name}` first or pick --name")
    model = ModelFolder(folder)  # its manifest read and checked once, for everything below
    small = choose_small(model, size, text, on_step, say)
    args, manifest = model.config, model.manifest
    table = tensor_table(args)
    layouts, sizes = place(table, lambda name, shape: small_format(name, shape, model.layouts, small), args)
    rewritten = {t.file for t in layouts if t.dtype != model.layouts[t.name].dtype}
    check_disk(out.parent, sum(sizes[f] for f in rewritten))

    def write(tmp: Path) -> dict:
        entries = {}
        for file in sizes:
            if file not in rewritten:
                link_or_copy(folder / file, tmp / file)
        done, todo = 0, [t for t in layouts if t.file in rewritten]
        for layout in todo:
            write_tensor(model, layout, tmp)
            entries[layout.name] = layout.to_json(sha256_of(tmp / layout.file, layout.offset, layout.nbytes))
            done += 1
            if on_step:
                on_step(f"requantize at {SMALL_BITS} bits", done, len(todo))
        for layout in layouts:
            entries.setdefault(layout.name, manifest["tensors"][layout.name])
        return dict(sorted(entries.items()))

    quantization = {**manifest["quantization"], "experts_at_2_bits": len(small),
                    "experts": len(expert_layouts(model)), "size_asked": size}
    if small:
        quantization["bits"] = f"{SMALL_BITS}-{manifest['quantization']['bits']}"
    return write_model(out, sizes, write, model.tokenizer_files, manifest["config"], manifest["source"], quantization)


def write_tensor(model: ModelFolder, layout: TensorLayout, tmp: Path) -> None:
    """Write one tensor of a rewritten expert file at its new layout: quantized again from its stored
    values, a block of rows at a time, where its format changed; its stored bytes as they are where
    it did not (an expert's float biases, a matrix whose width the small groups do not divide)."""
    stored = model.tensor(layout.name, layout.shape)
    old = model.layouts[layout.name]
    rows = layout.shape[0]
    fd = os.open(tmp / layout.file, os.O_WRONLY)
    try:
        if (old.dtype, old.group_size) == (layout.dtype, layout.group_size):
            arrays = [stored] if layout.bits is None else [stored.words, stored.scales, stored.biases]
            for (_, offset, _), array in zip(layout.parts, arrays):
                os.pwrite(fd, np.ascontiguousarray(array).tobytes(), offset)
            return
        step = max(1, BLOCK_VALUES // layout.shape[1])
        for start in range(0, rows, step):
            block = slice(start, min(rows, start + step))
            arrays = quantize(stored.dequantize(block), layout.bits, layout.group_size)
            for (_, offset, nbytes), array in zip(layout.parts, arrays):
                os.pwrite(fd, array.tobytes(), offset + start * (nbytes // rows))
    finally:
        os.close(fd)


def link_or_copy(source: Path | str, target: Path | str) -> None:
    """The file at target, sharing the source's blocks where the file system can (the source stays
    as it is: neither is ever written again), else copied. (shutil.copytree's copy_function.)"""
    Path(target).unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
