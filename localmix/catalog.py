"""The models a server answers for: the one named when it started (`localmix serve NAME`, loaded for as
long as it runs), or every model in $LOCALMIX_HOME, each loaded when a request names it and unloaded
when its keep-alive runs out (`localmix serve`, as Ollama does).

On demand, at most `max_loaded` models are in memory at once (one by default: a laptop's memory
holds one large model). A request for another model waits until a loaded one is idle (no answer
queued or being decoded, no request between being read and being queued), unloads it, then loads
its own. Each request may set the keep-alive of its model (Ollama's keep_alive: "5m", seconds, 0 to
unload once answered, negative to keep it); `expire()`, called every few seconds, unloads the idle
models whose keep-alive has run out.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from localmix.errors import LocalmixError
from localmix.home import list_models, models_dir

log = logging.getLogger("localmix.server")

DEFAULT_KEEP_ALIVE = 300.0  # Ollama's 5 minutes
BUSY_WAIT = 600.0           # a request for another model waits this long for a loaded one to be idle
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class NotFound(LocalmixError):
    pass


class Busy(LocalmixError):
    pass


def keep_alive_seconds(value) -> float | None:
    """Ollama's keep_alive ("5m", "1h30m" is not taken; a number of seconds; 0: unload once answered;
    negative: never) as seconds, None for never. A bad value is a LocalmixError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise LocalmixError("keep_alive must be a duration such as \"5m\", or a number of seconds")
    m = _DURATION.match(value.strip()) if isinstance(value, str) else None
    if isinstance(value, str) and not m:
        raise LocalmixError(f"keep_alive: cannot read {value[:40]!r}; write it as 30s, 5m or 1h")
    seconds = float(m[1]) * _UNITS[m[2]] if m else float(value)
    if seconds != seconds or abs(seconds) > 1e9:
        raise LocalmixError("keep_alive is out of range")
    return None if seconds < 0 else seconds


@dataclass
class Served:
    """A loaded model, the engine thread that answers with it, and what its listings say."""
    name: str
    model: object            # localmix.api.Model
    engine: object           # localmix.server.Engine
    summary: dict            # store.model_summary's figures (server.served_summary)
    created: int
    keep_alive: float | None = None  # seconds idle before it is unloaded; None: never
    last_used: float = field(default_factory=time.monotonic)
    pending: int = 0         # requests read for it and not yet queued for its engine

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def idle(self) -> bool:
        return self.pending == 0 and self.engine.idle()

    def expires_at(self) -> float | None:
        """Wall-clock time it will be unloaded if nothing asks for it (None: never)."""
        if self.keep_alive is None:
            return None
        return time.time() + max(0.0, self.keep_alive - (time.monotonic() - self.last_used))


class Catalog:
    """Which model answers a request, loading and unloading on demand (see the module's text).

    open(name) -> Served loads a model of $LOCALMIX_HOME by name (the server builds its engine);
    fixed: the one model of `localmix serve NAME` instead, never unloaded."""

    def __init__(self, open: Callable[[str], Served] | None = None, fixed: Served | None = None,
                 max_loaded: int = 1, keep_alive: float | None = DEFAULT_KEEP_ALIVE):
        if (open is None) == (fixed is None):
            raise ValueError("a catalog serves one fixed model or opens models on demand")
        self.open, self.fixed, self.max_loaded, self.keep_alive = open, fixed, max_loaded, keep_alive
        self.loaded: dict[str, Served] = {fixed.name: fixed} if fixed else {}
        self.loading: set[str] = set()  # being loaded now (they count toward max_loaded)
        self.changed = threading.Condition()

    @property
    def on_demand(self) -> bool:
        return self.fixed is None

    def names(self) -> list[str]:
        """The models requests may name."""
        return [self.fixed.name] if self.fixed else list_models()

    def name_of(self, requested: str | None) -> str:
        """The model a request's name means ("NAME" or "NAME:latest"); the fixed one where none is given."""
        if not requested:
            if self.fixed:
                return self.fixed.name
            raise LocalmixError("request: model is required (this server loads models by name)")
        name = requested.split(":")[0]
        if name not in self.names():
            where = f"this server has {self.fixed.name!r}" if self.fixed else f"no such model in {models_dir()}"
            raise NotFound(f"model {requested[:200]!r} not found; {where}")
        return name

    def acquire(self, requested: str | None, keep_alive=None) -> Served:
        """The loaded model a request names, loaded first if need be (blocking: call it off the event
        loop), counted as pending until release(). keep_alive: the request's, if it gave one."""
        name = self.name_of(requested)
        seconds = None if keep_alive is None else keep_alive_seconds(keep_alive)
        with self.changed:
            while name in self.loading:  # another request is loading it: wait for that
                self.changed.wait()
            served = self.loaded.get(name)
            if served is not None:
                return self._hold(served, self.keep_alive if keep_alive is None else seconds)
            self._make_room()
            self.loading.add(name)
        opened = None
        try:  # loaded outside the lock: requests for other models, and releases, go on meanwhile
            opened = self.open(name)
        finally:
            with self.changed:
                self.loading.discard(name)
                self.changed.notify_all()
                if opened is not None:
                    self.loaded[name] = opened
                    return self._hold(opened, self.keep_alive if keep_alive is None else seconds)

    def _hold(self, served: Served, keep_alive: float | None) -> Served:
        """A request holds its model (pending until release); each request sets its model's keep-alive
        (the server's default where it gives none). Called with the lock held."""
        served.pending += 1
        if self.on_demand:
            served.keep_alive = keep_alive
        served.last_used = time.monotonic()
        return served

    def release(self, served: Served) -> None:
        """A request's answers are queued (or it failed before): it no longer holds its model."""
        with self.changed:
            served.pending -= 1
            served.last_used = time.monotonic()
            self.changed.notify_all()

    def _make_room(self) -> None:
        """Unload idle models until another fits under max_loaded; waits for one to be idle."""
        deadline = time.monotonic() + BUSY_WAIT
        while len(self.loaded) + len(self.loading) >= self.max_loaded:
            idle = [s for s in self.loaded.values() if s.idle()]
            if idle:
                self._unload(min(idle, key=lambda s: s.last_used))
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise Busy(f"the server is busy with {', '.join(self.loaded)}; try again later")
            self.changed.wait(min(left, 1.0))

    def _unload(self, served: Served) -> None:
        del self.loaded[served.name]
        served.engine.stop()
        log.info("unloaded %s", served.name)

    def unload(self, name: str) -> bool:
        """Unload a model now if it is loaded and idle (before deleting it); False if it is busy."""
        with self.changed:
            served = self.loaded.get(name)
            if served is None or served is self.fixed:
                return served is None
            if not served.idle():
                return False
            self._unload(served)
            return True

    def stop(self, wait: float) -> bool:
        """Stop every loaded model's engine (the server's end), waiting up to `wait` seconds for the
        steps under way to end; whether they all did."""
        with self.changed:
            engines = [served.engine for served in self.loaded.values()]
        for engine in engines:
            engine.stop()
        deadline = time.monotonic() + wait
        return all([engine.ended(max(0.0, deadline - time.monotonic())) for engine in engines])

    def expire(self) -> None:
        """Unload the idle models whose keep-alive has run out."""
        now = time.monotonic()
        with self.changed:
            for served in list(self.loaded.values()):
                if (served is not self.fixed and served.keep_alive is not None and served.idle()
                        and now - served.last_used >= served.keep_alive):
                    self._unload(served)
