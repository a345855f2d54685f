"""Convert a Hugging Face checkpoint into a localmix model folder, streaming.

Tensors are read a block of rows at a time (pread, no memory map), quantized and written straight
to their place in the preallocated output files, so memory stays bounded by one block whatever the
model's size. Everything is written into a hidden temporary folder of its own (two pulls never
share one) that is renamed into place at the very end, once the tokenizer has been loaded and
checked: an interrupted or refused conversion never leaves something that looks like a model.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from localmix.checkpoint import (MXFP4_GROUP, MXFP4_VALUES, Checkpoint, SafetensorsFile, Source, check_tensor,
                                 checkpoint_tensor_floor, source_of, tensor_table)
from localmix.config import ModelArgs
from localmix import validate
from localmix.errors import LocalmixError
from localmix.quant.affine import GROUP_SIZES, pack, quantize
from localmix.tokenizer import HF_TOKENIZER, SENTENCEPIECE, load_tokenizer, read_tokenizer
from localmix.store import DENSE_FILE, FORMAT_VERSION, MANIFEST, TensorLayout, plan_layout, sha256_of, tensor_file

BLOCK_VALUES = 1 << 22  # values converted at a time: 16 MB of float32, ~150 MB with temporaries
BITS_CHOICES = ("4", "8", "mixed", "3", "2")


def bits_policy(bits: str, args: ModelArgs) -> Callable[[str], int]:
    """How many bits each quantized tensor gets.
    4: everything at 4 bits but the output projection at 8 (llama.cpp likewise keeps its output
       at 6 bits in Q4_0 files), so logits are not where the error concentrates.
    8: everything at 8 bits.
    mixed: the experts (nearly all the parameters) at 4 bits, everything else at 8: attention,
       and the embeddings, whose error enters the residual stream directly (on the peers' mini
       model it is most of the 4-bit model's divergence from the original).
    3, 2: the experts at 3 or 2 bits (for small memories: a Mixtral 8x7B's experts in 19 or 13 GB
       instead of 25), everything else at 4, the output projection at 8."""
    if bits not in BITS_CHOICES:
        raise LocalmixError(f"--bits must be one of {', '.join(BITS_CHOICES)}, got {bits!r}")
    output = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"

    def policy(name: str) -> int:
        if bits == "8" or name == output:
            return 8
        if bits == "4":
            return 4
        expert = tensor_file(name, args) != DENSE_FILE
        if bits in ("3", "2"):
            return int(bits) if expert else 4
        return 4 if expert else 8
    return policy


def check_tensor_count(args: ModelArgs, weight_map: dict, source: str) -> None:
    """A config that describes more tensors than the checkpoint lists is refused before its table
    (an entry per tensor: tens of millions for 1024 layers of 16384 experts) is built."""
    needed = checkpoint_tensor_floor(args)
    if needed > len(weight_map):
        raise LocalmixError(f"{source}: describes at least {needed} tensors, but the checkpoint lists "
                            f"{len(weight_map)}")


class LocalSource:
    """A Hugging Face folder on disk; with delete_shards, each shard is deleted once converted."""

    def __init__(self, folder: str | Path, delete_shards: bool = False):
        self.checkpoint = Checkpoint(folder)
        self.folder = self.checkpoint.folder
        self.config = self.checkpoint.config
        self.weight_map = self.checkpoint.weight_map
        self.delete_shards = delete_shards
        self.repo, self.revision = str(self.folder.resolve()), None
        self.tokenizer_files = self.checkpoint.tokenizer_files
        load_tokenizer(self.folder, self.config.vocab_size, files=self.tokenizer_files)
        check_tensor_count(self.config, self.weight_map, str(self.folder / "config.json"))
        for name, shape in tensor_table(self.config):  # every tensor present and well shaped, up front
            source = source_of(name, shape, self.config)
            self.checkpoint.file_of(source.name, source.shape)
            if source.scales:
                self.checkpoint.file_of(source.scales, source.scales_shape)

    def raw_config(self) -> dict:
        return validate.read_json(self.folder / "config.json", "config")

    def download_bytes(self) -> int:
        return 0

    def shard(self, name: str) -> SafetensorsFile:
        return self.checkpoint._file(name)

    def release(self, name: str) -> None:
        if self.delete_shards:
            (self.folder / name).unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Nothing was downloaded: the folder stays (less its shards with delete_shards)."""


def convert(source, out_dir: str | Path, bits: str = "4", group_size: int = 64,
            on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Quantize the source's tensors into a new localmix model folder out_dir."""
    out_dir = Path(out_dir)
    if group_size not in GROUP_SIZES:
        raise LocalmixError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if out_dir.exists():
        raise LocalmixError(f"{out_dir} already exists; remove it first (localmix rm)")
    args = source.config
    check_tensor_count(args, source.weight_map, f"{source.repo}: config.json")
    table = tensor_table(args)
    # MXFP4 experts (gpt-oss as published) become 8-bit groups of 32, which hold them exactly
    exact = {name: ("q8", MXFP4_GROUP) for name, shape in table if source_of(name, shape, args).scales}
    layouts, sizes = plan_layout(table, bits_policy(bits, args), group_size, args, exact)
    check_disk(out_dir.parent, sum(sizes.values()) + source.download_bytes())

    source_info = {"repo": source.repo, "revision": source.revision}
    quantization = {"bits": bits, "group_size": group_size, "method": "least-squares search"}
    if exact:
        quantization["mxfp4_experts"] = "8-bit groups of 32, exact"
    return write_model(out_dir, sizes, lambda tmp: write_tensors(source, tmp, layouts, on_progress),
                       source.tokenizer_files, source.raw_config(), source_info, quantization)


def write_model(out_dir: Path, sizes: dict[str, int], write, tokenizer: dict[str, Path], raw_config: dict,
                source_info: dict, quantization: dict) -> Path:
    """Make a model folder: files preallocated at their sizes, filled by write(tmp) (which returns
    the manifest's tensor entries), then the tokenizer files (name -> path, as
    tokenizer.tokenizer_files names them), config and manifest, all in a hidden folder renamed
    into place at the very end."""
    vocab_size = raw_config.get("vocab_size")
    read_tokenizer(tokenizer, vocab_size if isinstance(vocab_size, int) else 0,
                   f"the tokenizer of {source_info.get('repo')}", raw_config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        (tmp / "experts").mkdir()
        for file, size in sizes.items():
            with open(tmp / file, "wb") as f:
                f.truncate(size)
        tensors = write(tmp)
        files = {file: {"size": size, "sha256": sha256_of(tmp / file)} for file, size in sizes.items()}
        for name, path in tokenizer.items():
            shutil.copyfile(path, tmp / name)
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)}
        (tmp / "config.json").write_text(json.dumps(raw_config, indent=2))
        manifest = {
            "format": "localmix", "format_version": FORMAT_VERSION, "source": source_info,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quantization": quantization, "config": raw_config,
            "tokenizer": SENTENCEPIECE if SENTENCEPIECE in tokenizer else HF_TOKENIZER,
            "files": files, "tensors": tensors,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a model folder is as readable as any other
        sync_folder(tmp)  # everything on disk before the rename makes it a model
        # rename, not replace: it fails rather than take the place of a model that is there (an
        # empty folder aside, which rename also replaces, so that is checked first).
        if out_dir.exists():
            raise LocalmixError(f"a model named {out_dir.name} exists already; `localmix rm {out_dir.name}` first")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def sync_folder(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise LocalmixError(f"not enough disk space in {folder}: need {needed / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB free")


def write_tensors(source, tmp: Path, layouts: list[TensorLayout], on_progress) -> dict:
    """Convert every tensor, shard by shard in the order the shards come, and return the
    manifest's tensor entries."""
    by_shard: dict[str, list[TensorLayout]] = {}
    for layout in layouts:
        checkpoint_name = source_of(layout.name, layout.shape, source.config).name
        by_shard.setdefault(source.weight_map[checkpoint_name], []).append(layout)
    total = sum(int(np.prod(layout.shape)) for layout in layouts)
    done = 0
    entries = {}
    # MXFP4 scales may lie in another shard than their blocks: such shards are opened once, and every
    # shard is then kept until the end (released at once, a later block may need its scales).
    opened: dict[str, SafetensorsFile] = {}
    keep = source.config.mxfp4_experts

    def open_shard(shard_name: str) -> SafetensorsFile:  # each shard fetched and its header read once
        if shard_name not in opened:
            opened[shard_name] = source.shard(shard_name)
        return opened[shard_name]

    def file_of(name: str, shape: tuple[int, ...]) -> SafetensorsFile:
        return checked(open_shard(source.weight_map[name]), name, shape)

    for shard_name in sorted(by_shard):
        shard = open_shard(shard_name)
        for layout in by_shard[shard_name]:
            for rows in write_tensor(shard, tmp, layout, source_of(layout.name, layout.shape, source.config),
                                     file_of):
                done += rows * int(np.prod(layout.shape[1:]))
                if on_progress:
                    on_progress(done, total)
            entries[layout.name] = layout.to_json(sha256_of(tmp / layout.file, layout.offset, layout.nbytes))
        if not keep:
            opened.pop(shard_name, None)
            source.release(shard_name)
    for shard_name in sorted(by_shard) if keep else ():
        source.release(shard_name)
    return dict(sorted(entries.items()))


def write_arrays(tmp: Path, layouts: list[TensorLayout], arrays_of, on_progress=None) -> dict:
    """Write each tensor's arrays (as the layout's parts: the float values, or words, scales and
    biases) from arrays_of(layout), already in their final form; returns the manifest's entries.
    For importers of formats that are quantized already (mlx-lm, GGUF)."""
    entries = {}
    for i, layout in enumerate(layouts):
        with open(tmp / layout.file, "r+b") as f:
            for (part, offset, size), array in zip(layout.parts, arrays_of(layout)):
                data = np.ascontiguousarray(array).tobytes()
                if len(data) != size:
                    raise LocalmixError(f"{layout.name}: {part} has {len(data)} bytes, expected {size} for shape "
                                        f"{list(layout.shape)} at {layout.bits or 32} bits")
                f.seek(offset)
                f.write(data)
        entries[layout.name] = layout.to_json(sha256_of(tmp / layout.file, layout.offset, layout.nbytes))
        if on_progress:
            on_progress(i + 1, len(layouts))
    return dict(sorted(entries.items()))


def mxfp4_to_affine8(codes: np.ndarray, exponents: np.ndarray, what: str) -> list[np.ndarray]:
    """MXFP4 values (E2M1 codes [rows, cols], exponents e [rows, cols / 32]) as 8-bit affine groups
    of 32 that hold each one exactly: an E2M1 value v (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6) times
    2^e is q * 0.5 * 2^e - 6 * 2^e with q = 2 v + 12 (0 to 24), and both float16 numbers are exact
    for e in [-23, 13]. A group whose e is smaller holds values below 2^-20: it is stored with
    e = -23, each value rounded to the nearest multiple of 2^-24 (what float16 can still tell from
    zero); a larger e (values beyond float16) is refused."""
    if exponents.size and exponents.max() > 13:
        raise LocalmixError(f"{what}: MXFP4 scales of 2^{int(exponents.max())} are beyond float16's range")
    q = (2 * MXFP4_VALUES[codes] + 12).reshape(codes.shape[0], -1, MXFP4_GROUP)
    tiny = exponents < -23
    if tiny.any():  # round those groups' values onto the grid of e = -23
        shift = np.where(tiny, -23 - exponents, 0)[..., None].astype(np.float32)
        q = np.where(tiny[..., None], np.round((q - 12) * np.exp2(-shift)) + 12, q)
    exponents = np.maximum(exponents, -23).astype(np.float32)
    scales = (np.float32(0.5) * np.exp2(exponents)).astype(np.float16)
    biases = (np.float32(-6.0) * np.exp2(exponents)).astype(np.float16)
    return [pack(q.reshape(codes.shape).astype(np.uint8), 8), scales, biases]


def checked(shard: SafetensorsFile, name: str, shape: tuple[int, ...]) -> SafetensorsFile:
    check_tensor(shard, name, shape)
    return shard


def write_tensor(shard: SafetensorsFile, tmp: Path, layout: TensorLayout, source: Source, file_of):
    """Write one tensor a block of rows at a time; yields the rows written each time. It is the
    checkpoint tensor source.name whole, or a block of it (see checkpoint.source_of): one expert's
    matrix of a stacked tensor, read at once (its columns may be interleaved or transposed), from
    the file file_of(name, shape) gives (MXFP4 scales may lie in another shard than their blocks)."""
    check_tensor(shard, source.name, source.shape)
    rows = layout.shape[0]
    cols = int(np.prod(layout.shape[1:]))
    step = max(1, BLOCK_VALUES // cols)
    exact = None  # MXFP4 experts: their 8-bit words, scales and biases, exactly (mxfp4_to_affine8)
    if source.scales and layout.bits == 8 and layout.group_size == MXFP4_GROUP:
        exact = mxfp4_to_affine8(*source.read_mxfp4(file_of), f"{source.name} ({layout.name})")
    ours = None if source.whole or exact is not None else source.read(file_of).reshape(rows, cols)
    fd = os.open(tmp / layout.file, os.O_WRONLY)
    try:
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            if exact is not None:
                arrays = [np.ascontiguousarray(a[start:stop]) for a in exact]
            else:
                block = shard.read_rows(source.name, start, stop) if ours is None else ours[start:stop]
                if layout.bits is None:
                    arrays = [np.ascontiguousarray(block, dtype=np.float32)]
                else:
                    arrays = quantize(block, layout.bits, layout.group_size)
            for (_, offset, size), array in zip(layout.parts, arrays):
                row_bytes = size // rows
                os.pwrite(fd, array.tobytes(), offset + start * row_bytes)
            yield stop - start
    finally:
        os.close(fd)
