"""Pulling a checkpoint from the Hugging Face hub (or any server that speaks its protocol).

huggingface_hub gives the addresses, the headers (HF_ENDPOINT, HF_TOKEN) and the file metadata
(size, commit, checksum). The transfer itself is ours, because the hub client restarts a broken
download from zero: a file comes into NAME.part, and a later pull continues it from the bytes
already there with an HTTP range request. A finished file is checked against its size and, for
large files, the SHA-256 the hub publishes as its ETag. Files land under
$LOCALMIX_HOME/downloads/OWNER--NAME/COMMIT. Weight shards are fetched one at a time, just before
they are converted, so that with delete_shards the disk holds the output plus one shard.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from localmix.checkpoint import SafetensorsFile
from localmix.config import ModelArgs
from localmix.errors import LocalmixError

REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
RETRIES = 3


def looks_like_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text))


class HubSource:
    """A hub repository at one commit, fetched file by file as the converter asks."""

    def __init__(self, repo: str, revision: str | None, downloads: Path, delete_shards: bool = False,
                 on_download: Callable[[str, int, int], None] | None = None, file: str | None = None):
        """file: only this file of the repository (a GGUF), not a Hugging Face checkpoint."""
        import huggingface_hub
        import huggingface_hub.errors
        import huggingface_hub.utils

        self.hub = huggingface_hub
        self.repo = repo
        self.on_download = on_download
        self.delete_shards = delete_shards
        self.offline = huggingface_hub.is_offline_mode()
        requested = revision or "main"
        try:
            self.revision = requested if self.offline else self._metadata(file or "config.json", requested).commit_hash
        except FileNotFoundError:
            raise LocalmixError(f"{repo}: no {file or 'config.json'} in the repository") from None
        self.folder = downloads / repo.replace("/", "--") / (self.revision or requested)
        self.folder.mkdir(parents=True, exist_ok=True)
        if file:
            return
        self.config = ModelArgs.from_file(self._download("config.json"))
        self.tokenizer_path = self._download("tokenizer.model")
        try:
            index = json.loads(self._download("model.safetensors.index.json").read_text())
            self.weight_map = dict(index["weight_map"])
        except FileNotFoundError:
            try:
                path = self._download("model.safetensors")
            except FileNotFoundError:
                raise LocalmixError(f"{repo}: no safetensors weights in the repository") from None
            self.weight_map = {name: "model.safetensors" for name in SafetensorsFile(path).tensors}
        except (ValueError, KeyError, TypeError):
            raise LocalmixError(f"{repo}: model.safetensors.index.json is not a valid index") from None

    def raw_config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text())

    def _metadata(self, filename: str, revision: str):
        url = self.hub.hf_hub_url(self.repo, filename, revision=revision)
        try:
            return self.hub.get_hf_file_metadata(url)
        except Exception as e:  # noqa: BLE001 (every failure becomes one clear line)
            if isinstance(e, self.hub.errors.RemoteEntryNotFoundError):
                raise FileNotFoundError(filename) from None
            raise self._error(filename, e, revision) from None

    def _download(self, filename: str) -> Path:
        """The file, fetched or continued; FileNotFoundError when the repository lacks it."""
        dest = self.folder / filename
        if dest.is_file():
            return dest
        if self.offline:
            raise LocalmixError(f"cannot reach the hub for {self.repo} ({filename} is not downloaded yet); "
                                f"HF_HUB_OFFLINE is set")
        meta = self._metadata(filename, self.revision)
        headers = self.hub.utils.build_hf_headers()
        part = dest.with_name(dest.name + ".part")
        for attempt in range(RETRIES):
            try:
                fetch(meta.location, part, headers, meta.size,
                      lambda done: self.on_download and self.on_download(filename, done, meta.size or 0))
                break
            except (OSError, http.client.HTTPException) as e:
                if attempt == RETRIES - 1 or isinstance(e, urllib.error.HTTPError):
                    raise LocalmixError(f"download of {self.repo}/{filename} broke off ({describe(e)}); "
                                        f"run the pull again to resume") from None
        if meta.etag and SHA256.match(meta.etag) and sha256_file(part) != meta.etag:
            part.unlink()
            raise LocalmixError(f"download of {self.repo}/{filename} is corrupt (checksum mismatch); "
                                f"run the pull again")
        part.rename(dest)
        return dest

    def _error(self, filename: str, e: Exception, revision: str | None) -> LocalmixError:
        errors = self.hub.errors
        if isinstance(e, errors.GatedRepoError):
            return LocalmixError(f"{self.repo} is gated: accept its terms on the hub and set HF_TOKEN")
        if isinstance(e, errors.RepositoryNotFoundError):
            return LocalmixError(f"unknown repository {self.repo} (private repositories need HF_TOKEN)")
        if isinstance(e, errors.RevisionNotFoundError):
            return LocalmixError(f"{self.repo}: unknown revision {revision!r}")
        return LocalmixError(f"cannot reach the hub for {self.repo}/{filename} ({describe(e)}); "
                             f"check the network or HF_ENDPOINT")

    def download_bytes(self) -> int:
        """Bytes still to download: all missing shards, or only the largest with delete_shards."""
        if self.offline:
            return 0
        sizes = [self._metadata(shard, self.revision).size or 0
                 for shard in sorted(set(self.weight_map.values())) if not (self.folder / shard).is_file()]
        return max(sizes, default=0) if self.delete_shards else sum(sizes)

    def shard(self, name: str) -> SafetensorsFile:
        try:
            return SafetensorsFile(self._download(name))
        except FileNotFoundError:
            raise LocalmixError(f"{self.repo}: the index names {name}, which the repository lacks") from None

    def release(self, name: str) -> None:
        if self.delete_shards:
            (self.folder / name).unlink(missing_ok=True)

    def cleanup(self) -> None:
        """After a successful pull with delete_shards, nothing of the download is kept."""
        if self.delete_shards:
            shutil.rmtree(self.folder, ignore_errors=True)


def fetch(url: str, part: Path, headers: dict, size: int | None, on_bytes: Callable[[int], None]) -> None:
    """Download url into part, continuing from what part already holds."""
    start = part.stat().st_size if part.is_file() else 0
    if size is not None and start > size:
        start = 0
    if size is not None and start == size:
        return
    request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={start}-"} if start else {})})
    with urllib.request.urlopen(request, timeout=60) as response:
        if start and response.status != 206:  # the server ignored the range: start over
            start = 0
        with open(part, "ab" if start else "wb") as f:
            done = start
            on_bytes(done)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                on_bytes(done)
    if size is not None and part.stat().st_size != size:
        raise http.client.IncompleteRead(b"", size - part.stat().st_size)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def describe(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
