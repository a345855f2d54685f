"""The catalog of `localmix serve` without a model: loading on demand, one model at a time, waiting
for a busy one, keep-alives (with stand-ins for models and engines: no model is loaded here)."""

import threading
import time

import pytest

from localmix.catalog import Busy, Catalog, NotFound, Served, keep_alive_seconds
from localmix.errors import LocalmixError


class Engine:
    def __init__(self):
        self.busy, self.stopped = False, False

    def idle(self):
        return not self.busy

    def stop(self):
        self.stopped = True


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    for name in ("a", "b"):
        (tmp_path / "models" / name).mkdir(parents=True)
    return tmp_path


def catalog(opened: list, load_seconds: float = 0.0, **kwargs) -> Catalog:
    def open_model(name):
        time.sleep(load_seconds)
        opened.append(name)
        return Served(name, None, Engine(), {}, 0)
    return Catalog(open=open_model, **kwargs)


def test_one_model_at_a_time_and_a_busy_one_is_waited_for(home):
    opened = []
    c = catalog(opened)
    a = c.acquire("a:latest")
    assert list(c.loaded) == ["a"] and a.pending == 1
    c.release(a)
    a.engine.busy = True  # answering: b must wait for it
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("b", c.acquire("b")))
    waiter.start()
    time.sleep(0.3)
    assert "b" not in got and list(c.loaded) == ["a"]
    a.engine.busy = False
    with c.changed:
        c.changed.notify_all()
    waiter.join(5)
    assert got["b"].name == "b" and list(c.loaded) == ["b"] and a.engine.stopped and opened == ["a", "b"]


def test_a_model_being_loaded_is_loaded_once(home):
    opened = []
    c = catalog(opened, load_seconds=0.3, max_loaded=2)
    threads = [threading.Thread(target=c.acquire, args=("a",)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert opened == ["a"] and c.loaded["a"].pending == 3


def test_keep_alive_and_errors(home, monkeypatch):
    c = catalog([], keep_alive=300.0)
    a = c.acquire("a", keep_alive=0)
    c.expire()
    assert "a" in c.loaded  # held by its request
    c.release(a)
    c.expire()
    assert "a" not in c.loaded and a.engine.stopped
    b = c.acquire("b", keep_alive="-1")
    c.release(b)
    assert b.keep_alive is None and b.expires_at() is None
    with pytest.raises(NotFound):
        c.acquire("c")
    with pytest.raises(LocalmixError, match="model is required"):
        c.acquire(None)
    assert [keep_alive_seconds(v) for v in ("5m", "30s", "1h", 0, 2.5, "-1", -3)] == [300, 30, 3600, 0, 2.5, None, None]
    for bad in ("soon", True, [1], "1e999"):
        with pytest.raises(LocalmixError):
            keep_alive_seconds(bad)
    import localmix.catalog as catalog_module
    monkeypatch.setattr(catalog_module, "BUSY_WAIT", 0.2)
    b = c.acquire("b")
    b.engine.busy = True
    with pytest.raises(Busy):
        c.acquire("a")
