"""Routing: what the routers chose, seen and steered.

Seen: each layer counts, as the model runs, the tokens sent to each expert, the router weights
they got, and how often a token reuses an expert of the token before it (`LayerRouting`, one per
layer, collected in `Routing`); `localmix stats` runs a text and shows them, `--save` keeps the
counts in the model's folder for the expert cache's "pinned" policy, and `--trace` writes every
token's choice.

Steered (`Steering`, all off by default, when routing is exact; set per call in `RoutingOptions`,
beside experts per token and the trace):
- min_weight: drop an expert whose renormalized weight is below the threshold (the first one
  always stays), so that tokens the router is sure of use one expert;
- fallback_margin: under a memory budget, while decoding, replace a chosen expert that is not in
  the cache by a resident one whose router probability is within the margin of it (the weights
  are then the router's probabilities of the experts used, renormalized).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from localmix.errors import LocalmixError
from localmix.validate import read_json

ROUTING_FILE = "routing.json"  # routing statistics in a model's folder, written by `localmix stats --save`


@dataclass(frozen=True)
class Steering:
    min_weight: float = 0.0
    fallback_margin: float = 0.0

    def check(self) -> "Steering":
        if not 0 <= self.min_weight < 1:
            raise LocalmixError(f"--min-expert-weight must be in [0, 1), got {self.min_weight}")
        if not 0 <= self.fallback_margin <= 1:
            raise LocalmixError(f"--fallback-margin must be in [0, 1], got {self.fallback_margin}")
        return self


@dataclass(frozen=True)
class RoutingOptions:
    """One call's routing settings, passed down as an argument (Model.stream, the server's requests,
    the CLI): never stored on the model, so that calls with different settings can interleave.
    Hashable: the server decodes answers with equal options together."""
    experts_per_token: int | None = None  # None: the model's num_experts_per_tok
    steering: Steering = Steering()
    # Gets each token's routing records (trace_records); left out of the hash, as a list's bound
    # `extend` cannot be hashed (equality still tells sinks apart).
    trace: Callable[[list[dict]], None] | None = field(default=None, hash=False)


EXACT = RoutingOptions()  # the router's choice, untraced


class RoutingCall:
    """What one model call's layers share about routing: its options, its experts per token, whether
    its rows are one token of each of several sequences (Transformer.step: no reuse between them
    is counted), and, while tracing, each layer's choice. Made afresh for every call."""

    def __init__(self, options: RoutingOptions, experts_per_token: int, layers: int, batched: bool = False,
                 renormalize: bool = True):
        self.options, self.experts_per_token, self.batched = options, experts_per_token, batched
        self.renormalize = renormalize  # the family's rule (norm_topk_prob): steered weights follow it too
        self.routes: list | None = [None] * layers if options.trace else None  # (chosen, weights, cached)


class LayerRouting:
    """One layer's routing statistics (rows of the model's arrays) and the steering it applies."""

    PENDING = 1024  # decoded tokens' choices kept before they are counted

    def __init__(self, routing: "Routing", index: int):
        self.routing, self.index = routing, index
        self.previous: set[int] | None = None  # experts of the sequence's last token
        # Decoded tokens' (chosen, weights), counted together when the statistics are read: counted
        # one by one, even in plain Python, they cost 3-5% of the demo model's tokens.
        self.pending: list[tuple] = []  # (chosen, weights, consecutive)

    def __call__(self, h: np.ndarray, chosen: np.ndarray, weights: np.ndarray, layer,
                 call: RoutingCall) -> tuple[np.ndarray, np.ndarray]:
        """The router's choice ([T, k] experts, weights) after the call's steering, counted (and
        kept in call.routes while tracing). A dropped expert is marked with the index
        len(experts), weight 0."""
        steering, experts = call.options.steering, len(layer.experts)
        if steering.min_weight > 0:
            chosen, weights = drop_light_experts(chosen, weights, steering.min_weight, experts, call.renormalize)
        if steering.fallback_margin > 0 and len(h) == 1 and layer.experts.on_demand:
            chosen, weights = fall_back_to_resident(h, chosen, layer, steering.fallback_margin, call.renormalize)
        self.count(chosen, weights, call)
        if call.routes is not None:
            source = layer.experts
            call.routes[self.index] = (chosen, weights, None if not source.on_demand else
                                       [[source.is_resident(int(e)) for e in row] for row in chosen])
        return chosen, weights

    def count(self, chosen, weights, call: RoutingCall, on_device: bool = False) -> None:
        """Count a call's choice ([T, k] experts and weights). A decoded token's is kept in `pending`
        and counted with the others; so is a choice left on a backend's device (on_device: MLX
        arrays), read back when they are counted, not in every layer of every token."""
        consecutive = not call.batched  # rows of several sequences (Transformer.step) count no reuse
        if (len(chosen) == 1 and consecutive) or on_device:
            if self.pending and (len(self.pending) >= self.PENDING or self.pending[-1][0].shape[1] != chosen.shape[1]):
                self.flush()
            self.pending.append((chosen, weights, consecutive))
        else:
            self.flush()
            self._count(chosen, weights, consecutive)

    def flush(self) -> None:
        """Count the choices kept in `pending`, in order (a device's read back here): consecutive
        rows together, a step of several sequences' on its own."""
        pending, self.pending, run = self.pending, [], []
        for chosen, weights, consecutive in pending + [(None, None, False)]:
            if run and not consecutive:
                self._count(np.concatenate([c for c, _ in run]), np.concatenate([w for _, w in run]))
                run = []
            if chosen is not None:
                chosen, weights = np.asarray(chosen).astype(np.int64), np.asarray(weights)
                if consecutive:
                    run.append((chosen, weights))
                else:
                    self._count(chosen, weights, consecutive=False)

    def _count(self, chosen: np.ndarray, weights: np.ndarray, consecutive: bool = True) -> None:
        """Consecutive tokens' counts (a prompt's, or decoded ones'); or, not consecutive, one
        token of each of several sequences. A dropped expert is marked len(experts)."""
        r, i, experts = self.routing, self.index, self.routing.experts
        used = np.zeros((len(chosen), experts + 1), bool)
        np.put_along_axis(used, chosen, True, axis=1)
        used = used[:, :experts]
        r._routed[i] += used.sum(axis=0)
        r._tokens[i] += len(used)
        r._weight[i] += np.bincount(chosen.ravel(), weights.ravel(), minlength=experts + 1)[:experts]
        if not consecutive:
            return
        if self.previous is not None:
            r._reused[i] += len(self.previous & set(np.flatnonzero(used[0]).tolist()))
            r._followed[i] += len(self.previous)
        r._reused[i] += np.count_nonzero(used[1:] & used[:-1])
        r._followed[i] += np.count_nonzero(used[:-1])
        self.previous = set(np.flatnonzero(used[-1]).tolist())


class Routing:
    """The model's routing statistics since the start (they accumulate over calls by design; what a
    call sets travels in its RoutingOptions), [layers, experts] each: tokens routed to
    each expert (`routed`), the sum of their router weights (`weight`), and per layer the tokens
    (`tokens`) and the experts a token shared with the token before it (`reused`, out of the
    `followed` experts of the tokens before)."""

    COUNTS = ("routed", "weight", "tokens", "reused", "followed")

    def __init__(self, layers: int, experts: int):
        self.experts = experts
        self._routed = np.zeros((layers, experts), np.int64)
        self._weight = np.zeros((layers, experts), np.float64)
        self._tokens, self._reused, self._followed = (np.zeros(layers, np.int64) for _ in range(3))
        self.layers = [LayerRouting(self, i) for i in range(layers)]

    def _counted(name: str):  # the counts, with the decoded tokens not yet counted added first
        def read(self) -> np.ndarray:
            for layer in self.layers:
                layer.flush()
            return getattr(self, "_" + name)
        return property(read)

    routed, weight, tokens, reused, followed = _counted("routed"), _counted("weight"), _counted("tokens"), \
        _counted("reused"), _counted("followed")

    def new_sequence(self) -> None:
        for layer in self.layers:
            layer.flush()
            layer.previous = None

    def snapshot(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).copy() for name in self.COUNTS}

    def since(self, before: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {key: value - before[key] for key, value in self.snapshot().items()}

    def reset(self) -> None:
        for name in self.COUNTS:
            getattr(self, name)[...] = 0


def drop_light_experts(chosen: np.ndarray, weights: np.ndarray, min_weight: float, experts: int,
                       renormalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mark experts whose weight is below min_weight as dropped (index `experts`, weight 0),
    keeping each token's heaviest; the rest weigh as if routed to them alone: renormalized where
    the family renormalizes its top-k, the router's probabilities as they are where it does not."""
    light = weights < min_weight
    light[np.arange(len(weights)), np.argmax(weights, axis=1)] = False
    weights = np.where(light, 0, weights).astype(weights.dtype)
    if renormalize:
        weights /= weights.sum(axis=1, keepdims=True)
    return np.where(light, experts, chosen), weights


def fall_back_to_resident(h: np.ndarray, chosen: np.ndarray, layer, margin: float,
                          renormalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """For one token: each chosen expert that the cache does not hold is replaced by the most
    probable resident expert not chosen, if its router probability (route_tokens': softmax of the
    logits plus the router's bias) is within `margin` of it. The weights are then the router's
    probabilities of the experts used, renormalized where the family renormalizes its top-k."""
    source = layer.experts
    logits = (np.asarray(h).astype(np.float64) @ layer.router.T.astype(np.float64))[0]
    if layer.router_bias is not None:
        logits = logits + layer.router_bias
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    row = [int(e) for e in chosen[0]]
    resident = [e for e in np.argsort(-probs, kind="stable") if source.is_resident(int(e))]
    for i, e in enumerate(row):
        if e >= len(probs) or source.is_resident(e):
            continue
        spare = next((int(r) for r in resident if int(r) not in row), None)
        if spare is not None and probs[e] - probs[spare] <= margin:
            row[i] = spare
    kept = [e for e in row if e < len(probs)]
    total = sum(probs[kept]) if renormalize else 1.0
    weights = np.array([[probs[e] / total if e < len(probs) else 0.0 for e in row]], np.float32)
    return np.array([row]), weights


def trace_records(ids, positions, per_layer: list, experts: int) -> list[dict]:
    """One record per token of a model call: its id and position, and per layer the experts used,
    their weights, and (under a budget) whether each was in the cache when asked for."""
    records = []
    for t, (token, position) in enumerate(zip(ids, positions)):
        layers = []
        for routed in per_layer:
            if routed is None:  # a dense layer among sparse ones: no routing
                layers.append(None)
                continue
            chosen, weights, cached = routed
            kept = [i for i in np.argsort(chosen[t], kind="stable") if chosen[t][i] < experts]  # in index order
            entry = {"experts": [int(chosen[t][i]) for i in kept], "weights": [round(float(weights[t][i]), 6)
                                                                               for i in kept]}
            if cached is not None:
                entry["cached"] = [cached[t][i] for i in kept]
            layers.append(entry)
        records.append({"position": int(position), "token": int(token), "layers": layers})
    return records


class TraceFile:
    """Writes routing records as JSON lines (`--trace FILE.jsonl`): an audit trail of every token's
    experts, weights and cache hits."""

    def __init__(self, path: Path):
        try:
            self.file = open(path, "w")
        except OSError as e:
            raise LocalmixError(f"{path}: cannot write the trace ({e.strerror})") from None

    def __call__(self, records: list[dict]) -> None:
        for record in records:
            self.file.write(json.dumps(record) + "\n")
        self.file.flush()


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


def summary(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per layer, from counts such as Routing.since() gives: imbalance, the mean router weight of
    each expert, experts per token, and the share of a token's experts the next token uses again."""
    routed = stats["routed"]
    return {**imbalance(routed), "mean_weight": stats["weight"] / np.maximum(routed, 1),
            "experts_per_token": routed.sum(axis=1) / np.maximum(stats["tokens"], 1),
            "reuse": stats["reused"] / np.maximum(stats["followed"], 1)}


def collect(model, ids: list[int], step: int = 256,
            on_progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """The routing counts of one pass over the ids (in chunks of `step` tokens)."""
    before = model.transformer.routing.snapshot()
    cache = model.transformer.new_cache(len(ids))
    for start in range(0, len(ids), step):
        model.transformer(ids[start:start + step], cache, last_only=True)
        if on_progress:
            on_progress(min(start + step, len(ids)), len(ids))
    return model.transformer.routing.since(before)


def save(folder: Path, routed: np.ndarray, tokens: int, source: str) -> Path:
    """Write the counts to the model's folder (through a temporary file, so a reader never sees
    half of one). The built-in demo's folder is part of the installed package: it is never written."""
    from localmix.home import DEMO

    if Path(folder).resolve() == DEMO.resolve():
        raise LocalmixError("the built-in demo is read-only (it ships with its routing statistics); "
                            "leave out --save")
    path = Path(folder) / ROUTING_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"source": source, "tokens": tokens, "routed": np.asarray(routed).tolist()}))
    os.replace(temporary, path)
    return path


def read_routing(folder: Path, shape: tuple[int, int]) -> np.ndarray:
    """The routed-token counts [layers, experts] saved in a model's folder."""
    path = Path(folder) / ROUTING_FILE
    if not path.is_file():
        raise LocalmixError(f"the pinned policy needs routing statistics: run `localmix stats {Path(folder).name} "
                            f"--file TEXT --save` first")
    try:
        routed = np.array(read_json(path, "routing statistics")["routed"], np.int64)
    except (LocalmixError, ValueError, KeyError, TypeError, OverflowError):
        raise LocalmixError(f"{path}: cannot read the routing statistics; write them again with "
                            f"`localmix stats --save`") from None
    if routed.shape != shape:
        raise LocalmixError(f"{path}: routing statistics for {routed.shape} experts, the model has {shape}")
    return routed


def hot_experts(routed: np.ndarray, count: int) -> list[tuple[int, int]]:
    """The `count` (layer, expert) pairs that most tokens were routed to."""
    order = np.argsort(-routed, axis=None, kind="stable")[:count]
    return [tuple(int(i) for i in np.unravel_index(k, routed.shape)) for k in order]
