"""localmix: run Mixtral-class mixture-of-experts models on a laptop."""

import os

from localmix.home import home as _home

# Numba keeps its compiled kernels beside their source by default: inside site-packages, where a
# user's install may not write and where the files outlive an uninstall (a later `pip install -e`
# then finds a stray localmix/ folder there). They go to the user's cache instead, set before the
# first @njit(cache=True) kernel is defined, unless the user chose a place (NUMBA_CACHE_DIR).
if not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = str(_home() / "numba-cache")  # also for the processes we start
import numba  # noqa: E402

numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]  # numba may have read the environment already

from localmix.api import Model, load  # noqa: E402
from localmix.errors import LocalmixError  # noqa: E402
from localmix.generate import GenerationResponse  # noqa: E402
from localmix.sampling import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "Model", "GenerationResponse", "SamplingParams", "LocalmixError", "__version__"]
