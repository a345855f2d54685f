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

from localmix.checkpoint import (Checkpoint, SafetensorsFile, Source, check_tensor, checkpoint_tensor_floor,
                                 source_of, tensor_table)
from localmix.config import ModelArgs
from localmix import validate
from localmix.errors import LocalmixError
from localmix.quant.affine import GROUP_SIZES, quantize
from localmix.tokenizer import HF_TOKENIZER, SENTENCEPIECE, load_tokenizer, read_tokenizer
from localmix.store import DENSE_FILE, FORMAT_VERSION, MANIFEST, TensorLayout, plan_layout, sha256_of, tensor_file

BLOCK_VALUES = 1 << 22  # values converted at a time: 16 MB of float32, ~150 MB with temporaries
BITS_CHOICES = ("4", "8", "mixed")


def bits_policy(bits: str, args: ModelArgs) -> Callable[[str], int]:
    """How many bits each quantized tensor gets.
    4: everything at 4 bits but the output projection at 8 (llama.cpp likewise keeps its output
       at 6 bits in Q4_0 files), so logits are not where the error concentrates.
    8: everything at 8 bits.
    mixed: the experts (nearly all the parameters) at 4 bits, everything else at 8: attention,
       and the embeddings, whose error enters the residual stream directly (on the peers' mini
       model it is most of the 4-bit model's divergence from the original)."""
    if bits not in BITS_CHOICES:
        raise LocalmixError(f"--bits must be one of {', '.join(BITS_CHOICES)}, got {bits!r}")
    output = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"

    def policy(name: str) -> int:
        if bits == "8" or name == output:
            return 8
        if bits == "4":
            return 4
        return 4 if tensor_file(name, args) != DENSE_FILE else 8
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
    layouts, sizes = plan_layout(table, bits_policy(bits, args), group_size, args)
    check_disk(out_dir.parent, sum(sizes.values()) + source.download_bytes())

    source_info = {"repo": source.repo, "revision": source.revision}
    quantization = {"bits": bits, "group_size": group_size, "method": "least-squares search"}
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
    for shard_name in sorted(by_shard):
        shard = source.shard(shard_name)
        for layout in by_shard[shard_name]:
            for rows in write_tensor(shard, tmp, layout, source_of(layout.name, layout.shape, source.config)):
                done += rows * int(np.prod(layout.shape[1:]))
                if on_progress:
                    on_progress(done, total)
            entries[layout.name] = layout.to_json(sha256_of(tmp / layout.file, layout.offset, layout.nbytes))
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


def write_tensor(shard: SafetensorsFile, tmp: Path, layout: TensorLayout, source: Source):
    """Write one tensor a block of rows at a time; yields the rows written each time. It is the
    checkpoint tensor source.name whole, or a block of it (see checkpoint.source_of): one expert's
    matrix of a stacked tensor, read at once (its columns may be interleaved or transposed)."""
    check_tensor(shard, source.name, source.shape)
    rows = layout.shape[0]
    cols = int(np.prod(layout.shape[1:]))
    step = max(1, BLOCK_VALUES // cols)
    ours = None if source.whole else source.take(shard.read_rows(source.name, source.first,
                                                                 source.first + source.rows, source.cols))
    ours = None if ours is None else ours.reshape(rows, cols)
    fd = os.open(tmp / layout.file, os.O_WRONLY)
    try:
        for start in range(0, rows, step):
            stop = min(rows, start + step)
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
