"""localmix: run Mixtral-class mixture-of-experts models on a laptop."""

from localmix.api import Model, load
from localmix.errors import LocalmixError
from localmix.generate import GenerationResponse
from localmix.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["load", "Model", "GenerationResponse", "SamplingParams", "LocalmixError", "__version__"]
