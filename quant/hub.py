"""Pulling a checkpoint from the Hugging Face hub (or any server that speaks its protocol).

huggingface_hub gives the addresses, the headers (HF_ENDPOINT, HF_TOKEN) and the file metadata
(size, commit, checksum). The transfer itself is ours, because the hub client restarts a broken
download from zero: a file comes into NAME.part, and a later pull continues it from the bytes
already there with an HTTP range request. A finished file is checked against its size and, for
large files, the SHA-256 the hub publishes as its ETag. Files land under
$LOCALMIX_HOME/downloads/OWNER--NAME/COMMIT. Weight shards are fetched one at a time, just before
they are converted, so that with delete_shards the disk holds the output plus one shard.

The server is untrusted. Its commit id must be 40 hex digits (it names a folder); every file name
(the index's weight_map, --file) is confined to the download folder before anything is created;
every download is bounded (small files by a fixed limit whatever Content-Length says or omits,
shards by what the config justifies and the hub announced) and must keep moving (a read that
waits longer than LOCALMIX_HUB_TIMEOUT seconds, default 60, or a window of that length with
less than 64 KiB, ends it). The config is checked against the index and the shards' sizes before
anything is sized by it, and the tokenizer is loaded before the first shard is fetched.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from localmix import validate
from localmix.checkpoint import SafetensorsFile, _MAX_HEADER
from localmix.config import ModelArgs
from localmix.errors import LocalmixError
from localmix.home import FileLock
from localmix.quant.convert import check_disk, check_tensor_count
from localmix.tokenizer import HF_SIDE_FILES, HF_TOKENIZER, SENTENCEPIECE, TOKENIZER_FILE_LIMITS, read_tokenizer

REPO_ID = re.compile(r"^[\w][\w.\-]*/[\w][\w.\-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
RETRIES = 3
CHUNK = 1 << 20
MIN_PROGRESS = 64 * 1024  # bytes a download must gain in each window of LOCALMIX_HUB_TIMEOUT seconds
MAX_SHARDS = 4096         # distinct weight files an index may name (the largest real models have a few hundred)
# Small files are read with a hard limit whatever the server announces.
SMALL_LIMITS = {"config.json": 1 << 20, "model.safetensors.index.json": validate.MAX_JSON_BYTES,
                **TOKENIZER_FILE_LIMITS}


def looks_like_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text)) and ".." not in text


def timeout() -> float:
    """Seconds a download may wait for data (LOCALMIX_HUB_TIMEOUT, default 60)."""
    try:
        value = float(os.environ.get("LOCALMIX_HUB_TIMEOUT") or 60)
    except ValueError:
        raise LocalmixError("LOCALMIX_HUB_TIMEOUT must be a number of seconds") from None
    if not 0 < value < math.inf:
        raise LocalmixError("LOCALMIX_HUB_TIMEOUT must be a positive number of seconds")
    return value


class Stalled(TimeoutError):
    """The server stopped sending, or sends too slowly to ever finish (retried, then reported)."""


class HubSource:
    """A hub repository at one commit, fetched file by file as the converter asks."""

    def __init__(self, repo: str, revision: str | None, downloads: Path, delete_shards: bool = False,
                 on_download: Callable[[str, int, int], None] | None = None, file: str | None = None):
        """file: only this file of the repository (a GGUF), not a Hugging Face checkpoint."""
        import huggingface_hub
        import huggingface_hub.errors
        import huggingface_hub.utils

        if not looks_like_repo_id(repo):
            raise LocalmixError(f"{repo!r} is not a hub repository id (OWNER/NAME)")
        self.hub = huggingface_hub
        self.repo = repo
        self.on_download = on_download
        self.delete_shards = delete_shards
        self.offline = huggingface_hub.is_offline_mode()
        self.fetched: list[Path] = []  # what this pull downloaded or used: all --delete-source may delete
        self.sizes: dict[str, int | None] = {}
        requested = revision or "main"
        if self.offline:
            if not COMMIT.match(requested):
                raise LocalmixError(f"cannot reach the hub for {repo}: HF_HUB_OFFLINE is set (offline, pass "
                                    f"--revision with the full 40-digit commit of an earlier download)")
            self.revision = requested
        else:
            try:
                self.revision = self._metadata(file or "config.json", requested).commit_hash
            except FileNotFoundError:
                raise LocalmixError(f"{repo}: no {file or 'config.json'} in the repository") from None
            # The commit names a folder: anything but a commit id (a `../..` header) is refused here,
            # before a folder is made or (with --delete-source) removed.
            if not isinstance(self.revision, str) or not COMMIT.match(self.revision):
                raise LocalmixError(f"{repo}: the hub answered with {self.revision!r:.80} as the commit id, "
                                    f"not 40 hex digits; refusing it")
        repo_folder = validate.confined(downloads, repo.replace("/", "--"), f"{repo}: repository id")
        self.folder = validate.confined(repo_folder, self.revision, f"{repo}: commit")
        self.folder.mkdir(parents=True, exist_ok=True)
        # One pull at a time downloads into a commit's folder: two would write the same .part files.
        self._lock = FileLock(repo_folder.parent / f".{repo_folder.name}.lock",
                              f"another pull is downloading {repo}; run this one when it has finished")
        try:
            self._open(file)
        except BaseException:
            self.close()
            raise

    def _open(self, file: str | None) -> None:
        if file:
            self.file = self._path(file, "--file")
            return
        self._config = validate.json_object(self._read_json("config.json", "config"), f"{self.repo}/config.json",
                                            "config")
        self.config = ModelArgs.from_hf_config(self._config, f"{self.repo}/config.json")
        self.tokenizer_files = self._tokenizer()
        read_tokenizer(self.tokenizer_files, self.config.vocab_size, self.repo, self._config)
        try:
            index = self._read_json("model.safetensors.index.json", "safetensors index")
        except FileNotFoundError:
            self.weight_map = None  # one model.safetensors: its tensors are known once it is here
            self._shard_names(["model.safetensors"])
        else:
            self.weight_map = weight_map_of(index, f"{self.repo}/model.safetensors.index.json")
            self._shard_names(self.weight_map.values())
        self._check_sizes()
        if self.weight_map is None:
            self.weight_map = {name: "model.safetensors" for name in self.shard("model.safetensors").tensors}

    def _tokenizer(self) -> dict[str, Path]:
        """The repository's tokenizer files, picked as tokenizer.tokenizer_files picks them in a folder:
        tokenizer.model, else tokenizer.json with the side files the repository has. Offline, those
        downloaded before."""
        for main in (SENTENCEPIECE, HF_TOKENIZER):
            if self.offline and not self._path(main, self.repo).is_file():
                continue
            try:
                files = {main: self._download(main)}
            except FileNotFoundError:
                continue
            for name in HF_SIDE_FILES if main == HF_TOKENIZER else ():
                if self.offline and not self._path(name, self.repo).is_file():
                    continue
                try:
                    files[name] = self._download(name)
                except FileNotFoundError:
                    pass
            return files
        if self.offline:
            raise LocalmixError(f"cannot reach the hub for {self.repo} (its tokenizer is not downloaded yet); "
                                f"HF_HUB_OFFLINE is set")
        raise LocalmixError(f"{self.repo}: no tokenizer.model or tokenizer.json in the repository "
                            f"(the tokenizers localmix reads)")

    def _shard_names(self, names) -> None:
        """Validate the weight files' names and fetch their sizes, before anything is downloaded."""
        source = f"{self.repo}/model.safetensors.index.json"
        shards = sorted(set(names))
        if len(shards) > MAX_SHARDS:
            raise LocalmixError(f"{source}: names {len(shards)} weight files, more than {MAX_SHARDS}")
        for shard in shards:
            if not shard.endswith(".safetensors"):
                raise LocalmixError(f"{source}: weight file {shard!r:.80} is not a .safetensors file")
            self._path(shard, source)
        for shard in shards:
            if self.offline:
                self.sizes[shard] = None
                continue
            try:
                self.sizes[shard] = self._metadata(shard, self.revision).size
            except FileNotFoundError:
                if shards == ["model.safetensors"]:
                    raise LocalmixError(f"{self.repo}: no safetensors weights in the repository") from None
                raise LocalmixError(f"{self.repo}: the index names {shard}, which the repository lacks") from None

    def _check_sizes(self) -> None:
        """The config against the files it describes, before it sizes anything: as many tensors as
        it needs in the index, and weight files that can hold its parameters and no more than they
        justify (4 bytes each, plus a header)."""
        args = self.config
        params = args.parameter_count()
        source = f"{self.repo}/config.json"
        # At least 2 bytes a parameter (bf16); mlx-lm repositories stack their experts (the index
        # does not count them) and pack them in as few as 2 bits.
        mlx_lm = "quantization" in self.raw_config()
        if self.weight_map is not None and not mlx_lm:
            check_tensor_count(args, self.weight_map, source)
        least = params // 4 if mlx_lm else 2 * params
        known = [size for size in self.sizes.values() if size is not None]
        if len(known) == len(self.sizes) and sum(known) < least:
            raise LocalmixError(f"{source}: describes {params} parameters (at least {least} bytes), but the "
                                f"repository's weight files hold {sum(known)} bytes")
        self.shard_limit = 8 + _MAX_HEADER + 4 * params
        for shard, size in self.sizes.items():
            if size is not None and size > self.shard_limit:
                raise LocalmixError(f"{self.repo}/{shard}: the hub announces {size} bytes, more than a model of "
                                    f"this config can hold ({self.shard_limit})")

    def raw_config(self) -> dict:
        return dict(self._config)

    def _read_json(self, filename: str, what: str):
        """A small JSON file of the repository (fetched if need be), its errors named as the hub names it."""
        path = self._download(filename)
        try:
            return validate.read_json(path, what, SMALL_LIMITS[filename])
        except LocalmixError as e:
            raise LocalmixError(str(e).replace(str(path), f"{self.repo}/{filename}")) from None

    def _path(self, filename: str, source: str) -> Path:
        return validate.confined(self.folder, filename, source)

    def _metadata(self, filename: str, revision: str):
        url = self.hub.hf_hub_url(self.repo, filename, revision=revision)
        try:
            return self.hub.get_hf_file_metadata(url, timeout=timeout())
        except Exception as e:  # noqa: BLE001 (every failure becomes one clear line)
            if isinstance(e, self.hub.errors.RemoteEntryNotFoundError):
                raise FileNotFoundError(filename) from None
            raise self._error(filename, e, revision) from None

    def _download(self, filename: str, limit: int | None = None) -> Path:
        """The file, fetched or continued, at most `limit` bytes (small files: their own limit);
        FileNotFoundError when the repository lacks it. A file already here is checked again
        against the hub's size and checksum before it is used."""
        dest = self._path(filename, f"{self.repo}: file name")
        limit = SMALL_LIMITS.get(filename, limit)
        if self.offline:
            if dest.is_file():
                self._used(dest)
                return dest
            raise LocalmixError(f"cannot reach the hub for {self.repo} ({filename} is not downloaded yet); "
                                f"HF_HUB_OFFLINE is set")
        meta = self._metadata(filename, self.revision)
        if urllib.parse.urlsplit(meta.location).scheme not in ("http", "https"):
            # a redirect to file:// would copy a file of this machine into the download
            raise LocalmixError(f"{self.repo}/{filename}: the hub sends it from {meta.location!r:.120}, "
                                f"not an http(s) address")
        if meta.size is not None and limit is not None and meta.size > limit:
            raise LocalmixError(f"{self.repo}/{filename}: the hub announces {meta.size} bytes, more than the "
                                f"{limit} it may have")
        if dest.is_file():
            if dest.stat().st_size == meta.size and self._checksum_ok(dest, meta.etag):
                self._used(dest)
                return dest
            dest.unlink()  # not what the hub has now: fetched again
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        self._used(part)
        headers = self.hub.utils.build_hf_headers()
        url = self.hub.hf_hub_url(self.repo, filename, revision=self.revision)
        if urllib.parse.urlsplit(meta.location).netloc != urllib.parse.urlsplit(url).netloc:
            headers.pop("authorization", None)  # a signed address elsewhere (a CDN): the token stays home
        for attempt in range(RETRIES):
            try:
                fetch(meta.location, part, headers, meta.size, limit, f"{self.repo}/{filename}",
                      lambda done: self.on_download and self.on_download(filename, done, meta.size or 0))
                break
            except (OSError, http.client.HTTPException) as e:
                if attempt == RETRIES - 1 or isinstance(e, urllib.error.HTTPError):
                    raise LocalmixError(f"download of {self.repo}/{filename} broke off ({describe(e)}); "
                                        f"run the pull again to resume") from None
        if not self._checksum_ok(part, meta.etag):
            part.unlink()
            raise LocalmixError(f"download of {self.repo}/{filename} is corrupt (checksum mismatch); "
                                f"run the pull again")
        part.rename(dest)
        self._used(dest)
        return dest

    @staticmethod
    def _checksum_ok(path: Path, etag: str | None) -> bool:
        return not (etag and SHA256.match(etag)) or sha256_file(path) == etag

    def _used(self, path: Path) -> None:
        if path not in self.fetched:
            self.fetched.append(path)

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
        sizes = [self.sizes.get(shard) or 0 for shard in sorted(set(self.weight_map.values()))
                 if not self._path(shard, self.repo).is_file()]
        return max(sizes, default=0) if self.delete_shards else sum(sizes)

    def shard(self, name: str) -> SafetensorsFile:
        if name not in self.sizes:  # only the files the index named (and were checked) are fetched
            raise LocalmixError(f"{self.repo}: {name!r:.80} is not a weight file of the index")
        try:
            return SafetensorsFile(self._download(name, self.shard_limit))
        except FileNotFoundError:
            raise LocalmixError(f"{self.repo}: the index names {name}, which the repository lacks") from None

    def download_file(self) -> Path:
        """The one file asked for with file= (a GGUF), its size checked against the free disk."""
        name = self.file.relative_to(self.folder).as_posix()
        if self.offline:
            return self._download(name)
        try:
            meta = self._metadata(name, self.revision)
        except FileNotFoundError:
            raise LocalmixError(f"{self.repo}: no {self.file.name} in the repository") from None
        if meta.size is None:  # nothing else bounds it: the config is inside the file
            raise LocalmixError(f"{self.repo}/{name}: the hub does not say how large it is; refusing to download it")
        check_disk(self.folder, meta.size)
        try:
            return self._download(name, meta.size)
        except FileNotFoundError:
            raise LocalmixError(f"{self.repo}: no {self.file.name} in the repository") from None

    def release(self, name: str) -> None:
        if self.delete_shards:
            self._path(name, self.repo).unlink(missing_ok=True)

    def cleanup(self) -> None:
        """After a successful pull with delete_shards, the files this pull used are deleted: only
        those, only inside its own download folder (never a tree of whatever a server named), and
        then the folders they leave empty."""
        if self.delete_shards:
            for path in self.fetched:
                path.unlink(missing_ok=True)
            for folder in sorted({p.parent for p in self.fetched}, key=lambda p: -len(p.parts)):
                while folder.is_relative_to(self.folder.parent):
                    try:
                        folder.rmdir()
                    except OSError:
                        break
                    folder = folder.parent
        self.close()

    def close(self) -> None:
        """Let other pulls download this repository (cleanup closes; so does leaving a `with`)."""
        self._lock.release()

    def __enter__(self) -> "HubSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def weight_map_of(index, source: str) -> dict[str, str]:
    """The index's tensor -> file map, every entry a pair of strings (names are confined later)."""
    weight_map = validate.json_object(validate.json_object(index, source, "the index").get("weight_map"), source,
                                      "weight_map")
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or len(tensor) > 1024:
            raise LocalmixError(f"{source}: weight_map entry {tensor!r:.80} is not a file name")
    return weight_map


def fetch(url: str, part: Path, headers: dict, size: int | None, limit: int | None, what: str,
          on_bytes: Callable[[int], None]) -> None:
    """Download url into part, continuing from what part already holds when the size is known.
    At most `size` bytes (or `limit` when the size is unknown) are taken: a server that sends
    more is refused, one that stalls is cut off."""
    wait = timeout()
    start = part.stat().st_size if part.is_file() and size is not None else 0
    if size is not None and start > size:
        start = 0
    if size is not None and start == size:
        return
    cap = size if size is not None else limit
    request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={start}-"} if start else {})})
    with urllib.request.build_opener(HTTPOnlyRedirects).open(request, timeout=wait) as response:
        if start and response.status != 206:  # the server ignored the range: start over
            start = 0
        length = response.headers.get("Content-Length")
        if size is not None and length is not None and length.isdigit() and start + int(length) != size:
            raise LocalmixError(f"download of {what}: the hub announced {size} bytes, then sends "
                                f"{start + int(length)}")
        with open(part, "ab" if start else "wb") as f:
            f.truncate(start)
            done = start
            on_bytes(done)
            window_start, window_done = time.monotonic(), done
            while True:
                # read1 returns after one read from the socket, so the clock is looked at between
                # reads however slowly the bytes come (read() would wait for a whole chunk).
                chunk = response.read1(CHUNK if cap is None else max(1, min(CHUNK, cap + 1 - done)))
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                if cap is not None and done > cap:
                    part.unlink(missing_ok=True)
                    if size is not None:
                        raise LocalmixError(f"download of {what}: the hub sends more than the {size} bytes it "
                                            f"announced")
                    raise LocalmixError(f"download of {what}: larger than {limit} bytes, more than such a file "
                                        f"may have")
                on_bytes(done)
                now = time.monotonic()
                if now - window_start > wait:
                    if done - window_done < MIN_PROGRESS:
                        raise Stalled(f"less than {MIN_PROGRESS // 1024} KiB in {wait:g} s")
                    window_start, window_done = now, done
    if size is not None and part.stat().st_size != size:
        raise http.client.IncompleteRead(b"", size - part.stat().st_size)


class HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only (urllib would also follow one to ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl!r:.120} refused", headers, fp)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")  # urllib copies it along: the token never leaves its host
        return new


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def describe(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
