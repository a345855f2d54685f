"""Where models live: $LOCALMIX_HOME/models/NAME (LOCALMIX_HOME defaults to ~/.cache/localmix)."""

from __future__ import annotations

import os
import re
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


class FileLock:
    """An exclusive flock on a file, taken at once or refused with `busy` (a LocalmixError): pulls
    refuse rather than wait, because a pull can run for an hour and a silent wait looks like a hang.
    The lock file is left in place (hidden): unlinking it would let a later pull lock a new file
    while an earlier one still holds the old. The lock ends with the process, however it ends."""

    def __init__(self, path: Path, busy: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(self.fd)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise LocalmixError(busy) from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def model_lock(name: str) -> FileLock:
    """Held by a pull from before it checks that models/NAME is free until NAME is in place."""
    return FileLock(models_dir() / f".{name}.lock",
                    f"another pull of {name} is running; wait for it to finish, or pick another --name")


def temporary_folders(name: str) -> list[Path]:
    """The hidden folders that pulls of NAME write into (.NAME.RANDOM.partial, see write_model).
    Under model_lock(name) no pull of NAME runs, so any that exist were left by one that was
    killed: they are never resumed, only deleted."""
    folder = models_dir()
    pattern = re.compile(rf"^\.{re.escape(name)}\.[^.]+\.partial$")  # RANDOM has no dot: no other name matches
    return [p for p in folder.iterdir() if pattern.match(p.name)] if folder.is_dir() else []


def remove_model(name: str) -> Path:
    """Delete $LOCALMIX_HOME/models/NAME (only a name there: never an arbitrary folder)."""
    # An empty name is the models folder itself: a name must be one non-hidden entry inside it.
    folder = models_dir() / name
    if not name or "/" in name or name.startswith(".") or folder.parent != models_dir() or not folder.is_dir():
        raise LocalmixError(f"unknown model {name!r}: no such model in {models_dir()}")
    shutil.rmtree(folder)
    return folder


DEMO = Path(__file__).parent / "demo"  # the offline demo model, shipped in the package (scripts/train_demo.py)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A folder path as given, else a model name under $LOCALMIX_HOME/models, else "demo": the
    small model that comes with localmix."""
    if not str(name_or_path):
        raise LocalmixError("give a model name or folder (an empty name names none)")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    named = models_dir() / str(name_or_path)
    if str(name_or_path) and not str(name_or_path).startswith(".") and named.is_dir():  # hidden: a pull's, not a model
        return named
    if str(name_or_path) == "demo" and DEMO.is_dir():
        return DEMO
    raise LocalmixError(f"unknown model {str(name_or_path)!r}: no such folder, and no model of that name "
                        f"in {models_dir()}")
