"""`localmix pull`: a Hugging Face folder or hub repository in, a localmix model out."""

from __future__ import annotations

import re
from pathlib import Path

from localmix.errors import LocalmixError
from localmix.home import home, models_dir
from localmix.quant.gguf_import import import_gguf
from localmix.quant.mlx_lm import import_mlx_lm, is_mlx_lm_folder
from localmix.quant.convert import LocalSource, convert
from localmix.quant.hub import HubSource, looks_like_repo_id

MODEL_NAME = re.compile(r"^[\w][\w.\-]*$")


def default_name(source: str, bits: str) -> str:
    return f"{Path(source.rstrip('/')).name}-q{bits}"


def pull(source: str, bits: str = "4", group_size: int = 64, name: str | None = None, revision: str | None = None,
         delete_source: bool = False, on_progress=None, on_download=None, say=print, file: str | None = None) -> Path:
    """Quantize a local Hugging Face folder or a hub repository into $LOCALMIX_HOME/models/NAME; an
    mlx-lm folder or repository (already quantized) is imported as it is."""
    folder = Path(source).expanduser()
    if file:  # one GGUF file of a hub repository
        if not looks_like_repo_id(source) or not file.endswith(".gguf"):
            raise LocalmixError("--file takes a .gguf file of a hub repository (OWNER/NAME)")
        hub = HubSource(source, revision, home() / "downloads", delete_source, on_download, file=file)
        out = models_dir() / (name or Path(file).stem)
        if out.exists():
            raise LocalmixError(f"a model named {out.name} exists already; `localmix rm {out.name}` first or pick --name")
        path = hub._download(file)
        import_gguf(path, out, on_progress, say=say)
        hub.cleanup()
        if delete_source:
            path.unlink(missing_ok=True)
        return out
    if folder.is_file() and folder.suffix == ".gguf":
        out = models_dir() / (name or folder.stem)
        if out.exists():
            raise LocalmixError(f"a model named {out.name} exists already; `localmix rm {out.name}` first or pick --name")
        return import_gguf(folder, out, on_progress, say=say)
    if not folder.is_dir() and not looks_like_repo_id(source):
        raise LocalmixError(f"{source}: no such folder, and not a hub repository id (OWNER/NAME)")
    mlx_lm = folder.is_dir() and is_mlx_lm_folder(folder)
    name = name or (folder.resolve().name if mlx_lm else default_name(source, bits))
    if not MODEL_NAME.match(name):
        raise LocalmixError(f"invalid model name {name!r}: use letters, digits, '.', '-' and '_'")
    out = models_dir() / name
    if out.exists():
        raise LocalmixError(f"a model named {name} exists already; `localmix rm {name}` first or pick --name")
    if mlx_lm:  # already quantized: copied, not quantized again
        if revision or delete_source:
            raise LocalmixError("--revision and --delete-source apply to Hugging Face checkpoints, not mlx-lm folders")
        return import_mlx_lm(folder, out, on_progress)
    if folder.is_dir():
        if revision:
            raise LocalmixError("--revision applies to hub repositories, not local folders")
        origin = LocalSource(folder, delete_source)
    else:
        origin = HubSource(source, revision, home() / "downloads", delete_source, on_download)
        if "quantization" in origin.raw_config():  # an mlx-lm repository: download it whole, then import
            for shard in sorted(set(origin.weight_map.values())):
                origin.shard(shard)
            import_mlx_lm(origin.folder, out, on_progress)
            origin.cleanup()
            return out
    convert(origin, out, bits, group_size, on_progress)
    origin.cleanup()
    return out
