"""Choosing the next token from logits: greedy, or sampled after penalties and truncation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from localmix.errors import LocalmixError


@dataclass
class SamplingParams:
    """Defaults are Ollama's, so that `localmix chat` answers as its users expect.
    temperature 0 means greedy decoding (and makes the other settings moot)."""
    temperature: float = 0.8
    top_k: int = 40            # 0 turns it off
    top_p: float = 0.9         # 1.0 turns it off
    min_p: float = 0.0         # 0.0 turns it off
    repeat_penalty: float = 1.1  # 1.0 turns it off
    repeat_last_n: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def check(self) -> "SamplingParams":
        """Refuse what would sample nonsense: NaN or infinite numbers (NaN passes every `<`
        test and sampled nothing at all), bools and strings where numbers belong, out-of-range
        values. Numbers come from users and HTTP requests."""
        number(self.temperature, "temperature", 0.0, 1e6)
        integer(self.top_k, "top_k", 0, 1 << 31)
        number(self.top_p, "top_p", 0.0, 1.0, low_open=True)
        number(self.min_p, "min_p", 0.0, 1.0)
        number(self.repeat_penalty, "repeat_penalty", 0.0, 1e6, low_open=True)
        integer(self.repeat_last_n, "repeat_last_n", 0, 1 << 31)
        if self.seed is not None:
            integer(self.seed, "seed", 0, (1 << 64) - 1)  # numpy's generators take 0 .. 2^64 - 1 (and more, slowly)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise LocalmixError("stop must be a list of strings")
        return self


def number(value, key: str, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LocalmixError(f"{key} must be a finite number, got {value!r:.60}")
    if value < low or value > high or (low_open and value == low):
        raise LocalmixError(f"{key} must be {'>' if low_open else '>='} {low:g} and <= {high:g}, got {value}")


def integer(value, key: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LocalmixError(f"{key} must be an integer, got {value!r:.60}")
    if not low <= value <= high:
        raise LocalmixError(f"{key} must be >= {low} and <= {high}, got {value}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params.check()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.params
        logits = apply_repeat_penalty(logits.astype(np.float64), history[-p.repeat_last_n:] if p.repeat_last_n else [],
                                      p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        probs = token_probabilities(logits, p.temperature, p.top_k, p.top_p, p.min_p)
        return int(self.rng.choice(len(probs), p=probs))


def apply_repeat_penalty(logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
    """Make recently seen tokens less likely (CTRL's rule, as llama.cpp and transformers apply it:
    divide a positive logit by the penalty, multiply a negative one)."""
    if penalty == 1.0 or not recent:
        return logits
    logits = logits.copy()
    seen = np.unique(np.asarray(recent))
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def token_probabilities(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                        min_p: float) -> np.ndarray:
    """The distribution to sample from: temperature, then top-k, top-p and min-p truncation
    (each keeps at least the most likely token), renormalized."""
    scaled = logits / temperature
    probs = np.exp(scaled - np.max(scaled))
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.ones(len(order), dtype=bool)  # in order of decreasing probability
    if top_k:
        keep[top_k:] = False
    if top_p < 1.0:
        before = np.cumsum(probs[order]) - probs[order]  # mass of the tokens ranked above each one
        keep &= before < top_p
    if min_p > 0.0:
        keep &= probs[order] >= min_p * probs[order[0]]
    keep[0] = True
    out = np.zeros_like(probs)
    out[order[keep]] = probs[order[keep]]
    return out / out.sum()
