"""`localmix pull` against a hostile hub. Whatever the server lies about (its commit id, the file
names in its index, lengths, checksums, bodies that never end or never come, configs and
tokenizers that do not fit their weights), the pull ends with one `error:` line, writes nothing
outside $LOCALMIX_HOME, deletes nothing it did not download (every case runs with
--delete-source), lists no model, and stays within bounded memory and time. And two pulls of one
name at once make one model that verifies."""

from __future__ import annotations

import hashlib
import itertools
import math
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

import pytest

from fake_hub import COMMIT, FakeHub, endless, sized
from test_cli import assert_one_line_error, localmix_cli
from test_pull import hf_folder  # noqa: F401 (a fixture: the small sharded checkpoint the honest pulls use)

REPO = "acme/evil"
INDEX = "model.safetensors.index.json"
MB = 1 << 20
SECONDS = 30       # a case that takes longer than this hangs
EXTRA_MEMORY = 128 * MB  # over a pull that fails at once: a 300 MB body read whole would pass it

# Runs the CLI and, at exit, writes the process's own peak RSS (VmHWM: it starts again at exec,
# unlike a child's ru_maxrss, which keeps the forking test process's peak) to $PEAK_FILE.
PEAK = """
import atexit, os, resource, runpy, sys
def peak():
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    with open(os.environ["PEAK_FILE"], "w") as f:
        f.write(str(kb * 1024))
atexit.register(peak)
sys.argv = ["localmix", *sys.argv[1:]]
runpy.run_module("localmix", run_name="__main__")
"""


@dataclass
class Pull:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_bytes: int


def pull(*args, env: dict, tmp_path: Path) -> Pull:
    """`localmix pull ARGS` in a subprocess, with its wall time and peak memory; killed after SECONDS."""
    peak_file = tmp_path / "home" / "peak"  # inside the home: the snapshot outside it stays as it was
    peak_file.parent.mkdir(parents=True, exist_ok=True)
    out, err = tmp_path / "home" / "stdout", tmp_path / "home" / "stderr"
    start = time.monotonic()
    with open(out, "wb") as o, open(err, "wb") as e:
        process = subprocess.Popen([sys.executable, "-c", PEAK, "pull", *map(str, args)], stdout=o, stderr=e,
                                   stdin=subprocess.DEVNULL, env={**os.environ, **env, "PEAK_FILE": str(peak_file)},
                                   cwd="/")
        try:
            process.wait(timeout=SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"pull {' '.join(map(str, args))} still running after {SECONDS} s: {err.read_text()[-500:]}")
    seconds = time.monotonic() - start
    result = Pull(process.returncode, out.read_text(), err.read_text(), seconds,
                  int(peak_file.read_text()) if peak_file.is_file() else 0)
    for path in (peak_file, out, err):
        path.unlink(missing_ok=True)
    return result


@pytest.fixture
def hub(hf_folder):
    hub = FakeHub()
    hub.add_folder(REPO, hf_folder)
    hub.add_folder("acme/honest", hf_folder)
    yield hub
    hub.close()


@pytest.fixture
def env(tmp_path, hub):
    return {"LOCALMIX_HOME": str(tmp_path / "home"), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home" / "hf"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "LOCALMIX_HUB_TIMEOUT": "1"}


@pytest.fixture(scope="module")
def baseline_peak(hf_folder, tmp_path_factory):
    """Peak memory of a pull that fails at once (unknown repository), with every module loaded."""
    tmp_path = tmp_path_factory.mktemp("baseline")
    hub = FakeHub()
    try:
        env = {"LOCALMIX_HOME": str(tmp_path / "home"), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
        result = pull("acme/nothing", env=env, tmp_path=tmp_path)
    finally:
        hub.close()
    assert "unknown repository" in result.stderr and result.peak_bytes > 0
    return result.peak_bytes


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under root but skip: its kind, size and content hash (files) or target (links)."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) != skip]
        for name in dirs + files:
            path = Path(folder, name)
            if path.is_symlink():
                entries[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                entries[str(path)] = ("file", path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                entries[str(path)] = ("dir",)
    return entries


# Where a pull may write inside the home: its locks, the download folder of a 40-hex commit,
# the models folder (nothing listed after a refusal: checked separately) and the hub client's own.
ALLOWED = re.compile(r"^(models(/\.[\w.\-]+\.lock)?|downloads(/\.acme--evil\.lock|/acme--evil(/[0-9a-f]{40}(/.*)?)?)?"
                     r"|hf(/.*)?)$")


# -- the hostile cases ----------------------------------------------------------------------------

def edit_index(files: dict, edit: Callable[[dict], None]) -> None:
    index = json.loads(files[INDEX])
    edit(index["weight_map"])
    files[INDEX] = json.dumps(index).encode()


def edit_config(files: dict, **changes) -> None:
    files["config.json"] = json.dumps({**json.loads(files["config.json"]), **changes}).encode()


def first_shard(files: dict) -> str:
    return sorted(n for n in files if n.endswith(".safetensors"))[0]


def retarget(files: dict, target: str) -> None:
    """The index's first tensor moves to `target`, which the hub then also serves."""
    edit_index(files, lambda weight_map: weight_map.update({sorted(weight_map)[0]: target}))
    files.setdefault(target, files[first_shard(files)])


def slow_shard(hub: FakeHub, files: dict, victim: Path) -> None:
    shard = first_shard(files)
    hub.lengths[(REPO, shard)] = None
    hub.bodies[(REPO, shard)] = endless(b"x" * 100, pause=0.05)  # 2 KB/s, forever


def silent_shard(hub: FakeHub, files: dict, victim: Path) -> None:
    def nothing():
        time.sleep(20)
        yield b""
    hub.bodies[(REPO, first_shard(files))] = nothing


def longer_than_announced(hub: FakeHub, files: dict, victim: Path) -> None:
    shard = first_shard(files)
    hub.lengths[(REPO, shard)] = len(files[shard]) + 1000
    hub.head_lengths[(REPO, shard)] = len(files[shard])
    hub.bodies[(REPO, shard)] = lambda: iter([files[shard], b"\0" * 1000])


def more_than_announced(hub: FakeHub, files: dict, victim: Path) -> None:
    shard = first_shard(files)
    hub.lengths[(REPO, shard)] = None
    hub.head_lengths[(REPO, shard)] = len(files[shard])
    hub.bodies[(REPO, shard)] = lambda: itertools.chain([files[shard]], endless(b"\0" * 65536)())


@dataclass
class Case:
    name: str
    make: Callable[[FakeHub, dict, Path], None]  # (hub, the repository's files, the victim folder)
    error: str
    args: tuple = ()


CASES = [
    Case("commit-header-traversal", lambda hub, files, victim: hub.commits.update({REPO: "../../../victim"}),
         "not 40 hex digits"),
    Case("commit-header-absolute", lambda hub, files, victim: hub.commits.update({REPO: str(victim)}),
         "not 40 hex digits"),
    Case("commit-header-missing", lambda hub, files, victim: hub.commits.update({REPO: None}), "not 40 hex digits"),
    Case("weight-map-traversal", lambda hub, files, victim: retarget(files, "../../../../victim/pwned.safetensors"),
         "is not a relative path inside the folder"),
    Case("weight-map-absolute", lambda hub, files, victim: retarget(files, str(victim / "pwned.safetensors")),
         "is not a relative path inside the folder"),
    Case("weight-map-not-weights", lambda hub, files, victim: retarget(files, "config.json"),
         "is not a .safetensors file"),
    Case("file-traversal", lambda hub, files, victim: files.update({"../../victim/x.gguf": b"GGUF"}),
         "is not a relative path inside the folder", ("--file", "../../victim/x.gguf")),
    Case("gguf-without-length",
         lambda hub, files, victim: (files.update({"x.gguf": b""}), hub.lengths.update({(REPO, "x.gguf"): None}),
                                     hub.bodies.update({(REPO, "x.gguf"): endless(b"GGUF" * 16384)})),
         "does not say how large", ("--file", "x.gguf")),
    Case("config-300MB-without-length",
         lambda hub, files, victim: (hub.lengths.update({(REPO, "config.json"): None}),
                                     hub.bodies.update({(REPO, "config.json"): sized(300 * MB)})),
         "larger than 1048576 bytes"),
    Case("tokenizer-announced-10GB",
         lambda hub, files, victim: (hub.lengths.update({(REPO, "tokenizer.model"): 10 ** 10}),
                                     hub.bodies.update({(REPO, "tokenizer.model"): sized(10 ** 10)})),
         "announces 10000000000 bytes"),
    Case("index-not-json", lambda hub, files, victim: files.update({INDEX: b'{"weight_map": {'}), "not valid"),
    Case("index-nested-deep", lambda hub, files, victim: files.update({INDEX: b"[" * 200_000}), "nested too deeply"),
    Case("shard-endless-slow-body", slow_shard, "broke off (Stalled"),
    Case("shard-silent-body", silent_shard, "broke off"),
    Case("shard-longer-than-announced", longer_than_announced, "then sends"),
    Case("shard-more-than-announced", more_than_announced, "sends more than the"),
    Case("shard-announced-1PB", lambda hub, files, victim: hub.head_lengths.update({(REPO, first_shard(files)): 10 ** 15}),
         "more than a model of this config can hold"),
    Case("shard-truncated", lambda hub, files, victim: files.update(
        {first_shard(files): files[first_shard(files)][:len(files[first_shard(files)]) // 2]}), "truncated"),
    Case("shard-checksum", lambda hub, files, victim: hub.etags.update({(REPO, first_shard(files)): "0" * 64}),
         "checksum mismatch"),
    Case("config-1e9-layers", lambda hub, files, victim: edit_config(files, num_hidden_layers=10 ** 9),
         "num_hidden_layers"),
    Case("config-more-tensors-than-index",
         lambda hub, files, victim: edit_config(files, num_hidden_layers=64, num_local_experts=1024),
         "describes at least"),
    Case("config-more-parameters-than-weights",
         lambda hub, files, victim: edit_config(files, hidden_size=65536, intermediate_size=1 << 20),
         "parameters"),
    Case("redirect-to-local-file", lambda hub, files, victim: hub.locations.update(
        {(REPO, "tokenizer.model"): (victim / "keep" / "data.txt").as_uri()}), "not an http(s) address"),
    Case("tokenizer-garbage", lambda hub, files, victim: files.update({"tokenizer.model": bytes(range(256)) * 64}),
         "sentencepiece"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_hub(case, hub, env, tmp_path, baseline_peak, monkeypatch):
    victim = tmp_path / "victim"  # an unrelated folder beside the home, where the attacks aim
    (victim / "keep").mkdir(parents=True)
    (victim / "keep" / "data.txt").write_text("not the hub's to touch")
    (tmp_path / "home" / "downloads").mkdir(parents=True)
    before = snapshot(tmp_path, skip=tmp_path / "home")
    case.make(hub, hub.repos[REPO], victim)

    result = pull(REPO, "--delete-source", "--name", "evil", *case.args, env=env, tmp_path=tmp_path)

    assert_one_line_error(result, case.error, after_progress=True)
    assert snapshot(tmp_path, skip=tmp_path / "home") == before  # nothing written, nothing deleted outside
    home = tmp_path / "home"
    strays = [p.relative_to(home).as_posix() for p in home.rglob("*")
              if not ALLOWED.match(p.relative_to(home).as_posix())]
    assert not strays, strays
    monkeypatch.setenv("LOCALMIX_HOME", str(home))
    from localmix.home import list_models
    assert list_models() == [] and not list((home / "models").glob(".*partial"))
    assert result.peak_bytes < baseline_peak + EXTRA_MEMORY, (result.peak_bytes, baseline_peak)
    assert result.seconds < SECONDS


def test_two_pulls_of_one_name(hub, env, tmp_path, hf_folder):
    """--bits 4 and --bits 8 under one --name at once: one pull makes the model, the other is refused
    at once; the model is whole. (Each shard's body comes after a pause, so the first pull still
    holds the name when the second asks for it.)"""
    for name in hub.repos["acme/honest"]:
        hub.delays[name] = 0.5
    env = dict(env, LOCALMIX_HUB_TIMEOUT="60")
    command = [sys.executable, "-m", "localmix", "pull", "acme/honest", "--name", "t", "--bits"]
    runs = {bits: subprocess.Popen(command + [bits], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, **env}, cwd="/") for bits in ("4", "8")}
    results = {bits: (p.wait(timeout=120), p.stdout.read().decode(), p.stderr.read().decode())
               for bits, p in runs.items()}
    winners = [bits for bits, (code, _, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    (loser,) = set(results) - set(winners)
    code, _, stderr = results[loser]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == \
        "error: another pull of t is running; wait for it to finish, or pick another --name", stderr

    models = tmp_path / "home" / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["t"]
    assert not list(models.glob(".*partial"))
    assert json.loads((models / "t" / "manifest.json").read_text())["quantization"]["bits"] == winners[0]
    verified = localmix_cli("verify", "t", env=env)
    assert verified.returncode == 0 and "all files intact" in verified.stdout, verified.stderr


def test_a_killed_pull_leaves_nothing_a_later_pull_trusts(hub, env, tmp_path):
    """A pull killed half way leaves a hidden temporary folder, and a shard that is damaged on disk
    since: the next pull of the name deletes the folder (never resumes it), fetches the shard again
    because it no longer matches the hub's size and checksum, and makes a model that verifies."""
    models = tmp_path / "home" / "models"
    stale = models / ".t.abcd1234.partial"
    (stale / "experts").mkdir(parents=True)
    (stale / "manifest.json").write_text("{}")
    other = models / ".t.x.abcd1234.partial"  # a pull of another name (t.x): not this one's to remove
    other.mkdir()
    files = hub.repos["acme/honest"]
    shard = first_shard(files)
    damaged = tmp_path / "home" / "downloads" / "acme--honest" / COMMIT / shard
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"\0" * len(files[shard]))

    result = localmix_cli("pull", "acme/honest", "--name", "t", env=env)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and other.exists()
    assert damaged.read_bytes() == files[shard]
    assert "all files intact" in localmix_cli("verify", "t", env=env).stdout


def test_a_running_pull_holds_its_name_and_its_download(hub, env, tmp_path, monkeypatch):
    """While a pull holds the name's lock, or the repository's download folder, another is refused
    at once with a message that says so (the test holds each lock as a running pull would)."""
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "home"))
    from localmix.home import FileLock, model_lock

    with model_lock("t"):
        assert_one_line_error(localmix_cli("pull", "acme/honest", "--name", "t", env=env),
                              "another pull of t is running")
    with FileLock(tmp_path / "home" / "downloads" / ".acme--honest.lock", "test"):
        assert_one_line_error(localmix_cli("pull", "acme/honest", "--name", "u", env=env),
                              "another pull is downloading acme/honest", after_progress=True)
    assert not list((tmp_path / "home" / "models").glob("[!.]*"))


@pytest.mark.parametrize("overrides", [
    {}, {"tie_word_embeddings": True, "head_dim": 32}, {"model_type": "mistral", "num_local_experts": None},
    {"model_type": "qwen3_moe", "moe_intermediate_size": 48, "mlp_only_layers": [0], "head_dim": 32},
    {"model_type": "qwen2_moe", "moe_intermediate_size": 48, "shared_expert_intermediate_size": 80},
    {"model_type": "olmoe", "num_experts": 4, "num_local_experts": None},
    {"model_type": "granitemoe", "attention_bias": True, "tie_word_embeddings": True}])
def test_parameter_count_agrees_with_the_tensor_table(overrides):
    """The hub's size checks count a config's parameters without listing its tensors (a lying
    config may describe millions); the count must be the converter's table's, for every family."""
    from conftest import SMALL
    from localmix.checkpoint import tensor_table
    from localmix.config import ModelArgs

    config = {"model_type": "mixtral", **SMALL, **overrides}
    if config["model_type"] in ("qwen3_moe", "qwen2_moe"):
        config["num_experts"] = config.pop("num_local_experts")
    args = ModelArgs.from_hf_config({k: v for k, v in config.items() if v is not None})
    assert args.parameter_count() == sum(math.prod(shape) for _, shape in tensor_table(args))


def test_a_redirect_to_another_host_does_not_carry_the_token():
    """urllib copies every header along a redirect: the hub token must not reach another host."""
    import urllib.request

    from localmix.quant.hub import HTTPOnlyRedirects

    request = urllib.request.Request("http://127.0.0.1:9/a", headers={"Authorization": "Bearer secret"})
    elsewhere = HTTPOnlyRedirects().redirect_request(request, None, 302, "Found", {}, "http://localhost:9/b")
    same_host = HTTPOnlyRedirects().redirect_request(request, None, 302, "Found", {}, "http://127.0.0.1:9/c")
    assert not elsewhere.has_header("Authorization")
    assert same_host.get_header("Authorization") == "Bearer secret"
