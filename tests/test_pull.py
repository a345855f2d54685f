"""`localmix pull` and the model commands, run as a user runs them, against a fake hub."""

import json

import numpy as np
import pytest

import localmix
from localmix.quality import kl_divergence
from fake_hub import COMMIT, FakeHub
from conftest import make_hf_model
from test_cli import assert_one_line_error, localmix_cli


def pull_error(result, message):
    """pull's error: one line, after whatever progress bars came before it."""
    assert_one_line_error(result, message, after_progress=True)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    make_hf_model(folder, shard="300KB", intermediate_size=128)
    return folder


@pytest.fixture
def hub(hf_folder):
    hub = FakeHub()
    hub.add_folder("acme/tiny-mixtral", hf_folder)
    yield hub
    hub.close()


@pytest.fixture
def env(tmp_path, hub):
    return {"LOCALMIX_HOME": str(tmp_path / "home"), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}


def test_pull_from_the_hub_then_list_show_verify_rm(env, hub, hf_folder, tmp_path):
    result = localmix_cli("pull", "acme/tiny-mixtral", "--bits", "8", env=env)
    assert result.returncode == 0, result.stderr
    assert "pulled tiny-mixtral-q8" in result.stdout
    folder = tmp_path / "home" / "models" / "tiny-mixtral-q8"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"] == {"repo": "acme/tiny-mixtral", "revision": COMMIT}
    assert not (tmp_path / "home" / "models" / ".tiny-mixtral-q8.partial").exists()
    fetched = {path.rsplit("/", 1)[1] for method, path, _ in hub.requests if method == "GET"}
    assert "tokenizer.model" in fetched and "model.safetensors.index.json" in fetched

    ids = np.random.default_rng(0).integers(0, 32000, 16)
    assert kl_divergence(localmix.load(hf_folder).logits(ids), localmix.load(folder).logits(ids)) < 1e-3

    listing = localmix_cli("list", env=env).stdout
    assert "tiny-mixtral-q8" in listing and "acme/tiny-mixtral@0123456789" in listing
    shown = json.loads(localmix_cli("show", "tiny-mixtral-q8", "--json", env=env).stdout)
    assert shown["bits"] == "8" and shown["experts"] == 4 and shown["dense_bytes"] > 0 and shown["expert_bytes"] > 0
    assert shown["parameters"] > shown["active_parameters"] > 0
    assert "architecture     mixtral" in localmix_cli("show", "tiny-mixtral-q8", env=env).stdout
    assert "all files intact" in localmix_cli("verify", "tiny-mixtral-q8", env=env).stdout
    assert localmix_cli("run", "tiny-mixtral-q8", "Hi", "-n", "3", env=env).returncode == 0

    expert = folder / "experts" / "L000-E002.bin"
    expert.write_bytes(b"\0" * 10 + expert.read_bytes()[10:])
    damaged = localmix_cli("verify", "tiny-mixtral-q8", env=env)
    assert damaged.returncode == 1 and "L000-E002.bin: checksum mismatch" in damaged.stderr

    assert_one_line_error(localmix_cli("pull", "acme/tiny-mixtral", "--bits", "8", env=env), "exists already",
                          after_progress=True)
    assert localmix_cli("rm", "tiny-mixtral-q8", env=env).returncode == 0
    assert not folder.exists()
    assert_one_line_error(localmix_cli("rm", "tiny-mixtral-q8", env=env), "unknown model")


def test_download_that_breaks_off_resumes(env, hub, tmp_path):
    shard = sorted(n for n in hub.repos["acme/tiny-mixtral"] if n.endswith(".safetensors"))[1]
    hub.break_file, hub.fail_after_break = shard, True
    first = localmix_cli("pull", "acme/tiny-mixtral", env=env)
    assert_one_line_error(first, "run the pull again to resume", after_progress=True)
    models = tmp_path / "home" / "models"
    assert not (models / "tiny-mixtral-q4").exists() and not list(models.glob(".*partial"))

    hub.broken = False
    second = localmix_cli("pull", "acme/tiny-mixtral", env=env)
    assert second.returncode == 0, second.stderr
    resumed = [h.get("range") for method, path, h in hub.requests if method == "GET" and path.endswith(shard)]
    size = len(hub.repos["acme/tiny-mixtral"][shard])
    assert resumed[-1] is not None and int(resumed[-1].split("=")[1].split("-")[0]) > 0, resumed
    assert int(resumed[-1].split("=")[1].split("-")[0]) < size
    assert "all files intact" in localmix_cli("verify", "tiny-mixtral-q4", env=env).stdout


def test_delete_source_keeps_no_download(env, tmp_path):
    assert localmix_cli("pull", "acme/tiny-mixtral", "--delete-source", "--name", "t", env=env).returncode == 0
    assert not list((tmp_path / "home" / "downloads").rglob("*.safetensors"))


def test_hub_errors(env, hub, hf_folder):
    pull_error(localmix_cli("pull", "acme/nothing", env=env), "unknown repository acme/nothing")
    pull_error(localmix_cli("pull", "acme/tiny-mixtral", "--revision", "v9", env=env),
                          "unknown revision 'v9'")
    hub.repos["acme/empty"] = {n: c for n, c in hub.repos["acme/tiny-mixtral"].items() if "safetensors" not in n}
    pull_error(localmix_cli("pull", "acme/empty", env=env), "no safetensors weights")
    hub.repos["acme/llama"] = dict(hub.repos["acme/tiny-mixtral"], **{"config.json": json.dumps(
        {"model_type": "llama", "hidden_size": 8}).encode()})
    pull_error(localmix_cli("pull", "acme/llama", env=env), "unsupported model_type 'llama'")
    pull_error(localmix_cli("pull", "acme/tiny-mixtral", env=dict(env, HF_HUB_OFFLINE="1")),
                          "cannot reach the hub")
    no_network = dict(env, HF_ENDPOINT="http://127.0.0.1:9")
    pull_error(localmix_cli("pull", "acme/tiny-mixtral", env=no_network), "acme/tiny-mixtral")
    pull_error(localmix_cli("pull", "not a repo", env=env), "not a hub repository id")
    pull_error(localmix_cli("pull", "acme/tiny-mixtral", "--name", "../x", env=env), "invalid model name")
    pull_error(localmix_cli("pull", "acme/tiny-mixtral", "--bits", "5", env=env), "--bits must be one of")


def test_token_is_sent(env, hub):
    localmix_cli("pull", "acme/tiny-mixtral", env=dict(env, HF_TOKEN="hf_secret"))
    assert any(h.get("authorization") == "Bearer hf_secret" for _, _, h in hub.requests)


def test_pull_local_folder_and_perplexity(env, hf_folder, tmp_path):
    result = localmix_cli("pull", hf_folder, "--name", "local-q4", env=env)
    assert result.returncode == 0, result.stderr
    text = tmp_path / "text.txt"
    text.write_text("The lighthouse stood at the end of a long spit of sand, where the river met the sea.")
    out = localmix_cli("perplexity", "local-q4", text, "--base", hf_folder, "--json", env=env)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["tokens"] > 10 and figures["perplexity"] > 1 and 0 < figures["kl"] < 1 and 0 <= figures["top1"] <= 1
    assert_one_line_error(localmix_cli("perplexity", "local-q4", tmp_path / "none.txt", env=env), "cannot read")
    assert_one_line_error(localmix_cli("show", hf_folder, env=env), "is a Hugging Face folder")


def test_ollama_pull_through_the_server(env, tmp_path):
    """/api/pull runs `localmix pull` of a hub repository, its progress as Ollama's status lines,
    through the official client; a local path is never pulled by a request."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    ollama = pytest.importorskip("ollama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "acme" / "local").mkdir(parents=True)  # a folder that looks like a repo id, in the server's folder
    server = subprocess.Popen([sys.executable, "-m", "localmix", "serve", "demo", "--port", str(port)],
                              env={**os.environ, **env}, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        statuses = [update.status for update in client.pull("acme/tiny-mixtral", stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        assert "pulled tiny-mixtral-q4" in statuses and any(s.startswith("downloading ") for s in statuses)
        from localmix.store import verify
        assert verify(tmp_path / "home" / "models" / "tiny-mixtral-q4") == []
        for bad in ("../../etc", "/etc/passwd"):
            with pytest.raises(ollama.ResponseError) as refused:
                client.pull(bad)
            assert refused.value.status_code == 400 and "repository id" in refused.value.error
        with pytest.raises(ollama.ResponseError) as missing:  # the hub's, not the local folder acme/local
            client.pull("acme/local")
        assert "acme/local" in missing.value.error
        assert not (tmp_path / "home" / "models" / "local-q4").exists()
    finally:
        server.terminate()
        server.wait(30)
