"""`localmix pull`: a Hugging Face folder or hub repository in, a localmix model out.

A pull holds a lock on its model name (models/.NAME.lock) from before it looks whether NAME is
free until NAME is in place: a second pull of the same name is refused at once, with a message,
rather than left waiting. Each pull writes into a hidden folder of its own, renamed into place
only when everything (tensors, tokenizer, manifest) is written and checked.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from localmix import validate
from localmix.errors import LocalmixError
from localmix.home import home, model_lock, models_dir, resolve_model, temporary_folders
from localmix.quant.gguf_import import import_gguf
from localmix.quant.mlx_lm import import_mlx_lm, is_mlx_lm_folder
from localmix.quant.convert import LocalSource, convert
from localmix.quant.hub import HubSource, looks_like_repo_id
from localmix.quant.sizing import link_or_copy, resize

MODEL_NAME = re.compile(r"^[\w][\w.\-]*$")


def default_name(source: str, bits: str, size: int | None = None) -> str:
    return f"{Path(source.rstrip('/')).name}-{f'{size / 1e9:.3g}GB' if size else f'q{bits}'}"


def pull(source: str, bits: str = "4", group_size: int = 64, name: str | None = None, revision: str | None = None,
         delete_source: bool = False, on_progress=None, on_download=None, say=print, file: str | None = None,
         size: int | None = None, text: str | None = None, on_step=None, hub_only: bool = False) -> Path:
    """Quantize a local Hugging Face folder or a hub repository into $LOCALMIX_HOME/models/NAME; an
    mlx-lm folder or repository (already quantized) is imported as it is. With a size (bytes), the
    model is made first in a hidden folder, then the experts that matter least are stored at 3 or 2 bits
    until it fits (quant/sizing.py: routing counted on `text`, or the built-in calibration text;
    on_step(what, done, total) reports those stages). hub_only: SOURCE is a hub repository even if a
    folder of that name exists here (the server's /api/pull: a client names what the hub has)."""
    if hub_only and not looks_like_repo_id(source):
        raise LocalmixError(f"{source[:200]!r} is not a hub repository id (OWNER/NAME)")
    folder = None if hub_only else Path(source).expanduser()  # None: a hub repository
    mlx_lm = False
    if file:  # one GGUF file of a hub repository
        if not looks_like_repo_id(source) or not file.endswith(".gguf"):
            raise LocalmixError("--file takes a .gguf file of a hub repository (OWNER/NAME)")
        validate.confined(home(), file, "--file")  # a relative path, before it names anything
        name = name or Path(file).stem
    elif folder is not None and folder.is_file() and folder.suffix == ".gguf":
        name = name or folder.stem
    else:
        if (folder is None or not folder.is_dir()) and not looks_like_repo_id(source):
            raise LocalmixError(f"{source}: no such folder, and not a hub repository id (OWNER/NAME)")
        mlx_lm = folder is not None and folder.is_dir() and is_mlx_lm_folder(folder)
        name = name or (folder.resolve().name if mlx_lm else default_name(source, bits, size))
    check_name(name)
    with claimed(name) as out:
        if size is None:
            return _fetch(source, folder, mlx_lm, file, out, bits, group_size, revision, delete_source,
                          on_progress, on_download, say)
        with hidden_folder(name) as work:
            full = _fetch(source, folder, mlx_lm, file, work / "full", bits, group_size, revision, delete_source,
                          on_progress, on_download, say)
            return resize(full, out, size, text, on_step, say)


def shrink(model: str, size: int, name: str | None = None, text: str | None = None, on_step=None,
           say=print) -> Path:
    """A copy of a model with the experts that matter least at 3 or 2 bits, to fit `size` bytes, as
    $LOCALMIX_HOME/models/NAME (default MODEL-SIZE)."""
    folder = resolve_model(model)
    name = name or default_name(folder.name, "", size)
    check_name(name)
    with claimed(name) as out:
        return resize(folder, out, size, text, on_step, say)


def copy_model(folder: Path, name: str) -> Path:
    """The model at folder as $LOCALMIX_HOME/models/NAME (Ollama's copy), its files linked where the
    file system can (neither is ever written again), else copied."""
    check_name(name)
    with claimed(name) as out, hidden_folder(name) as work:
        shutil.copytree(folder, work / "model", copy_function=link_or_copy)
        os.rename(work / "model", out)
    return out


def check_name(name: str) -> None:
    if not MODEL_NAME.match(name):
        raise LocalmixError(f"invalid model name {name!r}: use letters, digits, '.', '-' and '_'")


@contextlib.contextmanager
def claimed(name: str):
    """$LOCALMIX_HOME/models/NAME, free, under the name's lock, with a killed pull's leftovers removed."""
    out = models_dir() / name
    with model_lock(name):
        for leftover in temporary_folders(name):  # a killed pull's: never resumed, only removed
            shutil.rmtree(leftover, ignore_errors=True)
        if out.exists():
            raise LocalmixError(f"a model named {name} exists already; `localmix rm {name}` first or pick --name")
        yield out


@contextlib.contextmanager
def hidden_folder(name: str):
    """A hidden work folder among the models (.NAME.RANDOM.partial: removed by the next pull of NAME
    if this one is killed), removed at the end."""
    models_dir().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=models_dir()))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fetch(source, folder, mlx_lm, file, out, bits, group_size, revision, delete_source, on_progress,
           on_download, say) -> Path:
    """The model from its source into out: a hub repository's GGUF file, a GGUF file, a checkpoint."""
    if file:
        with HubSource(source, revision, home() / "downloads", delete_source, on_download, file=file) as hub:
            path = hub.download_file()
            import_gguf(path, out, on_progress, say=say)
            hub.cleanup()
        return out
    if folder is not None and folder.is_file():
        return import_gguf(folder, out, on_progress, say=say)
    return _pull_checkpoint(source, folder, mlx_lm, out, bits, group_size, revision, delete_source,
                            on_progress, on_download)


def _pull_checkpoint(source, folder, mlx_lm, out, bits, group_size, revision, delete_source,
                     on_progress, on_download) -> Path:
    if mlx_lm:  # already quantized: copied, not quantized again
        if revision or delete_source:
            raise LocalmixError("--revision and --delete-source apply to Hugging Face checkpoints, not mlx-lm folders")
        return import_mlx_lm(folder, out, on_progress)
    if folder is not None and folder.is_dir():
        if revision:
            raise LocalmixError("--revision applies to hub repositories, not local folders")
        convert(LocalSource(folder, delete_source), out, bits, group_size, on_progress)
        return out
    with HubSource(source, revision, home() / "downloads", delete_source, on_download) as origin:
        if "quantization" in origin.raw_config():  # an mlx-lm repository: download it whole, then import
            for shard in sorted(set(origin.weight_map.values())):
                origin.shard(shard)
            import_mlx_lm(origin.folder, out, on_progress)
        else:
            convert(origin, out, bits, group_size, on_progress)
        origin.cleanup()
    return out
