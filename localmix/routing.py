"""Routing statistics: how many tokens each layer sends to each expert, and how unevenly.

The model counts them as it runs (Transformer.routed, [layers, experts]); `localmix stats` runs a
text and shows them, and `--save` keeps them in the model's folder, where the expert cache's
"pinned" policy finds its hot experts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from localmix.expert_cache import ROUTING_FILE


def imbalance(routed: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer: the busiest expert's load over the mean load (1 is even), the coefficient of
    variation of the loads, and the entropy of the experts' shares over its largest value (1 is
    even, 0 is one expert for every token)."""
    routed = np.asarray(routed, np.float64)
    mean = np.maximum(routed.mean(axis=1), 1e-12)
    share = routed / np.maximum(routed.sum(axis=1, keepdims=True), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(share > 0, share * np.log(share), 0.0).sum(axis=1)
    return {"max_over_mean": routed.max(axis=1) / mean, "cv": routed.std(axis=1) / mean,
            "entropy": entropy / np.log(routed.shape[1]) if routed.shape[1] > 1 else np.ones(len(routed))}


def collect(model, ids: list[int], step: int = 256,
            on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The routed-token counts of one pass over the ids (in chunks of `step` tokens)."""
    before = model.transformer.routed.copy()
    cache = model.transformer.new_cache(len(ids))
    for start in range(0, len(ids), step):
        model.transformer(ids[start:start + step], cache, last_only=True)
        if on_progress:
            on_progress(min(start + step, len(ids)), len(ids))
    return model.transformer.routed - before


def save(folder: Path, routed: np.ndarray, tokens: int, source: str) -> Path:
    """Write the counts to the model's folder (through a temporary file, so a reader never sees
    half of one)."""
    path = Path(folder) / ROUTING_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"source": source, "tokens": tokens, "routed": np.asarray(routed).tolist()}))
    os.replace(temporary, path)
    return path
