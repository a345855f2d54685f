"""How far a quantized model's predictions are from the original's: perplexity, KL divergence of
the next-token distribution, and top-1 agreement, each over every position of a text."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, ids) -> float:
    """exp of the mean negative log-likelihood of each token given those before it."""
    ids = np.asarray(ids)
    logp = log_softmax(logits[:-1])
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def kl_divergence(base_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(base || model), in nats, as llama.cpp's perplexity tool reports it."""
    base, model = log_softmax(base_logits), log_softmax(logits)
    return float((np.exp(base) * (base - model)).sum(axis=-1).mean())


def top1_agreement(base_logits: np.ndarray, logits: np.ndarray) -> float:
    return float((base_logits.argmax(-1) == logits.argmax(-1)).mean())
