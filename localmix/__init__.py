"""localmix: run Mixtral-class mixture-of-experts models on a laptop."""

import os
import sys

from localmix.home import home as _home

# Numba keeps its compiled kernels beside their source by default: inside site-packages, where a
# user's install may not write and where the files outlive an uninstall (a later `pip install -e`
# then finds a stray localmix/ folder there). They go to the user's cache instead, set before the
# first @njit(cache=True) kernel is defined, unless the user chose a place (NUMBA_CACHE_DIR).
if not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = str(_home() / "numba-cache")  # read by numba, also in processes we start
if "numba" in sys.modules:  # numba read the environment before we set it
    sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

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
