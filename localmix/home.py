"""Where models live: $LOCALMIX_HOME/models/NAME (LOCALMIX_HOME defaults to ~/.cache/localmix)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from localmix.errors import LocalmixError


def home() -> Path:
    return Path(os.environ.get("LOCALMIX_HOME") or "~/.cache/localmix").expanduser()


def models_dir() -> Path:
    return home() / "models"


def list_models() -> list[str]:
    folder = models_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def remove_model(name: str) -> Path:
    """Delete $LOCALMIX_HOME/models/NAME (only a name there: never an arbitrary folder)."""
    folder = models_dir() / name
    if "/" in name or name.startswith(".") or not folder.is_dir():
        raise LocalmixError(f"unknown model {name!r}: no such model in {models_dir()}")
    shutil.rmtree(folder)
    return folder


DEMO = Path(__file__).parent / "demo"  # the offline demo model, shipped in the package (scripts/train_demo.py)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A folder path as given, else a model name under $LOCALMIX_HOME/models, else "demo": the
    small model that comes with localmix."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    named = models_dir() / str(name_or_path)
    if str(name_or_path) and named.is_dir():
        return named
    if str(name_or_path) == "demo" and DEMO.is_dir():
        return DEMO
    raise LocalmixError(f"unknown model {str(name_or_path)!r}: no such folder, and no model of that name "
                        f"in {models_dir()}")
