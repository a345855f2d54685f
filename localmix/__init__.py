"""localmix: run Mixtral-class mixture-of-experts models on a laptop."""

import os
import sys
from pathlib import Path

from localmix.home import home as _home

# Numba keeps its compiled kernels beside their source by default: inside site-packages, where a
# user's install may not write and where the files outlive an uninstall (a later `pip install -e`
# then finds a stray localmix/ folder there). They go to the user's cache instead, set before the
# first @njit(cache=True) kernel is defined, unless the user chose a place (NUMBA_CACHE_DIR).


def _kernels_version() -> str:
    """A digest of the kernels' source. Numba's cache checks only a kernel's own file, so a kernel
    calling into another module of localmix/kernels/ would keep a stale callee after an edit there;
    a cache folder per version of the whole package cannot."""
    import hashlib

    digest = hashlib.sha256(os.environ.get("LOCALMIX_KERNELS", "").encode())  # it changes what is compiled
    for path in sorted(Path(__file__).parent.joinpath("kernels").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _numba_cache_dir() -> str:
    """The user's choice, else $LOCALMIX_HOME/numba-cache/VERSION; where that cannot be written (a
    read-only home), a folder of this user's in the temporary directory: Numba, finding its folder
    unwritable, would fall back to writing beside the installed source."""
    import tempfile

    version = _kernels_version()
    for folder in (os.environ.get("NUMBA_CACHE_DIR") or str(_home() / "numba-cache" / version),
                   os.path.join(tempfile.gettempdir(), f"localmix-numba-cache-{os.getuid()}", version)):
        try:
            os.makedirs(folder, exist_ok=True)
            if os.access(folder, os.W_OK | os.X_OK):
                return folder
        except OSError:
            pass
    return folder


os.environ["NUMBA_CACHE_DIR"] = _numba_cache_dir()  # read by numba, also in processes we start
if "numba" in sys.modules:  # numba read the environment before we set it
    sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

# Numba's threads meet at the end of every parallel loop, about a hundred times per decoded token.
# GNU OpenMP spins there for about 3 ms before it sleeps; when another process takes a core, the
# spinning thread and the one it waits for take turns on that core and decoding collapses (mini
# model, 2 cores: 60-64 -> 4-12 tok/s). Sleeping at once (OMP_WAIT_POLICY=passive) holds 35 tok/s
# busy but costs a third of the idle speed (44-46); a spin of 10000 rounds (about 0.1 ms) keeps the
# idle speed (60-64) and bounds the loss (20 busy), and threads.ThreadTuner then decodes with one
# thread fewer while that is faster (36-38, the one-thread speed).
# Measured in README, "A busy laptop". OpenMP first where Numba has it; a user's settings win; set
# before Numba starts its threads.
os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb workqueue")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
if "numba" in sys.modules:  # read already: numba starts its threads at the first parallel loop, not at import
    sys.modules["numba"].config.THREADING_LAYER_PRIORITY = os.environ["NUMBA_THREADING_LAYER_PRIORITY"].split()

__version__ = "0.1.0"
__all__ = ["load", "Model", "GenerationResponse", "SamplingParams", "LocalmixError", "__version__"]

# The API is imported on first use, not with the package: numpy and Numba take a second or more, and
# the command line must be able to answer Ctrl-C (or --version) before they are in.
_API = {"load": "localmix.api", "Model": "localmix.api", "GenerationResponse": "localmix.generate",
        "SamplingParams": "localmix.sampling", "LocalmixError": "localmix.errors"}


def __getattr__(name: str):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'localmix' has no attribute {name!r}")
