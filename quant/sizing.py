"""Per-expert bit widths to meet a size: `localmix pull REPO --size 14GB`, `localmix shrink NAME --size 14GB`.

A model's experts are nearly all its bytes, and they are not equally used nor equally hard to
quantize. Starting from a model whose experts are stored at 4 (or 8) bits, each expert may keep its
bytes or be stored again at 3 or 2 bits; each width costs the expert's routed tokens on a
calibration text (the model's own routing.json where `localmix stats --save` wrote one, else the
text given, else the built-in calibration.txt) times how far its weights move when quantized at that
width (the squared error, estimated on evenly spread rows). Which width each expert gets is a
multiple-choice knapsack (MC-MoE solves the same one, from the same two measures, by linear
programming over 1-3 bits): each expert's widths are steps down in bytes, each with its cost; the
steps not worth taking (a 3-bit step that costs more per byte saved than going on to 2 bits) are
dropped, so an expert's steps cost more per byte the further they go, and the cheapest steps per
byte saved over all experts are taken until the model fits. That is the knapsack's linear optimum,
short of it by at most the last step. 3 bits cost about a fifth of 2 bits' error for half of their
saving, so most experts go to 3 bits before the least used go on to 2.

The smaller experts are quantized from the stored 4-bit values, not from the original floats, which
may be gone (a pull's shards, a GGUF or mlx-lm source): on the mini model the KL divergence this
adds is in the README's quality table (2-bit experts from the source vs from the 4-bit model).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from localmix.checkpoint import tensor_table
from localmix.errors import LocalmixError
from localmix.quant.affine import dequantize, quantize
from localmix.store import ModelFolder, TensorLayout, expert_matrix, place, sha256_of

SMALL_FORMATS = ((3, 64), (2, 64))  # (bits, group size) an expert may be stored at, widest first: vector kernels
ESTIMATE_VALUES = 1 << 20         # values per matrix that estimate an expert's error at a width
CALIBRATION_TOKENS = 1024         # of the calibration text, at most
BLOCK_VALUES = 1 << 22            # values requantized at a time (as convert.BLOCK_VALUES)

Steps = Callable[[str, int, int], None]  # on_step(what, done, total): progress of each stage
Expert = tuple[int, int]  # (layer, expert)


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


def requantize_errors(model: ModelFolder, layout: TensorLayout, formats) -> list[float]:
    """For each (bits, group size): the squared distance, over the whole matrix (estimated on
    rows_for_estimate), between its stored values and those values quantized again in that format."""
    m = model.tensor(layout.name, layout.shape)
    rows = rows_for_estimate(*layout.shape)
    stored = m.dequantize(rows)
    errors = []
    for bits, group in formats:
        small = dequantize(*quantize(stored, bits, group, steps=4), bits, group)
        errors.append(float(((small - stored) ** 2).sum()) * layout.shape[0] / len(rows))
    return errors


def expert_layouts(model: ModelFolder) -> dict[tuple[int, int], list[TensorLayout]]:
    experts: dict[tuple[int, int], list[TensorLayout]] = {}
    for name, layout in model.layouts.items():
        matrix = expert_matrix(name)
        if matrix and layout.bits is not None:
            experts.setdefault(matrix[:2], []).append(layout)
    return experts


@dataclass(frozen=True)
class Step:
    """One expert's step down to a smaller format: the bytes it saves and what it costs (routed
    tokens times squared error, over the step before)."""
    expert: Expert
    format: tuple[int, int]
    saving: int
    cost: float


def cheapest_steps(options: dict[Expert, list[tuple[tuple[int, int], int, float]]]) -> list[Step]:
    """Every expert's steps, the cheapest per byte saved first. options: per expert, its smaller
    formats as (format, bytes saved against the stored ones, cost), the largest first. A format whose
    step would cost more per byte than the one after it is skipped (the lower convex hull), so each
    expert's steps come in their order."""
    steps = []
    for expert, formats in options.items():
        hull = [(None, 0, 0.0)]
        for format, saving, cost in formats:
            if saving < hull[-1][1] or (saving == hull[-1][1] and cost >= hull[-1][2]):
                continue  # saves less, or as much for no less
            if saving == hull[-1][1]:
                hull.pop()  # as much saved for less
            while len(hull) > 1 and rate(hull[-2], hull[-1]) >= rate(hull[-1], (format, saving, cost)):
                hull.pop()  # the point before is not worth stopping at: go on past it
            hull.append((format, saving, cost))
        steps += [Step(expert, b[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(hull, hull[1:])]
    return sorted(steps, key=lambda step: (step.cost / step.saving, step.expert, -step.format[0]))


def rate(a, b) -> float:
    return (b[2] - a[2]) / (b[1] - a[1])


def choose_formats(model: ModelFolder, size: int, text: str | None = None, on_step: Steps | None = None,
                   say=print) -> dict[Expert, tuple[int, int]]:
    """The experts to store in a smaller format, and which, so that the model fits `size` bytes:
    the cheapest steps per byte saved (see the module's text), as few as fit it."""
    args, name = model.config, model.folder.name
    if not args.is_moe:
        raise LocalmixError(f"{name} has no experts: --size picks bit widths per expert")
    experts = expert_layouts(model)
    if not experts:
        raise LocalmixError(f"{name}: its experts are not quantized")
    files = model.manifest["files"]
    total = sum(f["size"] for f in files.values())
    savings = {}  # per format: the bytes each expert saves in it
    for format in SMALL_FORMATS:
        _, sizes = place(tensor_table(args), lambda name, shape: small_format(
            name, shape, model.layouts, dict.fromkeys(experts, format)), args)
        savings[format] = {key: files[layouts[0].file]["size"] - sizes[layouts[0].file]
                           for key, layouts in experts.items()}
    smallest = total - sum(max(0, *(savings[f][key] for f in SMALL_FORMATS)) for key in experts)
    if size >= total:
        say(f"the model is {total / 1e9:.2f} GB, within {size / 1e9:.2f} GB: its experts keep their bits")
        return {}
    if size < smallest:
        raise LocalmixError(f"--size {size / 1e9:.3f} GB is below the smallest this model can be: "
                            f"{smallest / 1e9:.3f} GB with every expert at {SMALL_FORMATS[-1][0]} bits")
    routed, where = routing_counts(model, text, on_step)
    moe_index = {layer: i for i, layer in enumerate(args.moe_layers)}
    options = {}
    for i, key in enumerate(sorted(experts)):
        errors = np.sum([requantize_errors(model, layout, SMALL_FORMATS) for layout in experts[key]], axis=0)
        weight = routed[moe_index[key[0]], key[1]] + 1
        options[key] = [(format, savings[format][key], weight * float(error))
                        for format, error in zip(SMALL_FORMATS, errors)]
        if on_step:
            on_step("measure experts", i + 1, len(experts))
    chosen, excess = {}, total - size
    for step in cheapest_steps(options):
        if excess <= 0:
            break
        chosen[step.expert] = step.format
        excess -= step.saving
    counts = ", ".join(f"{sum(f == format for f in chosen.values())} at {format[0]} bits" for format in SMALL_FORMATS)
    saved = sum(savings[format][key] for key, format in chosen.items())
    say(f"of {len(experts)} experts, {counts} (routing: {where}), {(total - saved) / 1e9:.2f} GB")
    return chosen


def small_format(name: str, shape, layouts: dict[str, TensorLayout],
                 chosen: dict[Expert, tuple[int, int]]) -> tuple[str, int | None]:
    """A tensor's (dtype, group size) in the resized model: its expert's chosen format for the
    quantized matrices narrower than it whose columns its groups divide, else what it is stored as."""
    layout = layouts[name]
    matrix = expert_matrix(name)
    format = chosen.get(matrix[:2]) if matrix else None
    if format and layout.bits is not None and layout.bits > format[0] and shape[1] % format[1] == 0:
        return f"q{format[0]}", format[1]
    return layout.dtype, layout.group_size


def resize(folder: Path, out: Path, size: int, text: str | None = None, on_step: Steps | None = None,
           say=print) -> Path:
    """A new model folder `out` from `folder` with the experts choose_formats picks in their formats."""
    from localmix.quant.convert import check_disk, write_model

    folder, out = Path(folder), Path(out)
    if out.exists():
        raise LocalmixError(f"a model named {out.name} exists already; `localmix rm {out.name}` first or pick --name")
    model = ModelFolder(folder)  # its manifest read and checked once, for everything below
    chosen = choose_formats(model, size, text, on_step, say)
    args, manifest = model.config, model.manifest
    table = tensor_table(args)
    layouts, sizes = place(table, lambda name, shape: small_format(name, shape, model.layouts, chosen), args)
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
                on_step("requantize experts", done, len(todo))
        for layout in layouts:
            entries.setdefault(layout.name, manifest["tensors"][layout.name])
        return dict(sorted(entries.items()))

    # the format before any --size ("2-4" from a model shrunk before this field was written: "4")
    base = manifest["quantization"].get("bits_before_size") or str(manifest["quantization"]["bits"]).split("-")[-1]
    experts_bits = {}  # (layer, expert) -> the bits of its matrices in the new model
    for layout in layouts:
        if expert_matrix(layout.name) and layout.bits is not None:
            experts_bits[expert_matrix(layout.name)[:2]] = layout.bits
    counts = {bits: sum(b == bits for b in experts_bits.values()) for bits, _ in SMALL_FORMATS}
    widths = [str(bits) for bits in sorted(counts) if counts[bits] and str(bits) != str(base)]
    quantization = {**manifest["quantization"], "experts": len(experts_bits), "size_asked": size,
                    "bits": "-".join([*widths, str(base)]), "bits_before_size": base,
                    **{f"experts_at_{bits}_bits": n for bits, n in counts.items()}}
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
