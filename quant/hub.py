"""Pulling a checkpoint from the Hugging Face hub (or any server that speaks its protocol).

huggingface_hub does the transfers: it honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE, and
resumes a file that broke off from the bytes already on disk. Files land under
$LOCALMIX_HOME/downloads/OWNER--NAME/COMMIT. Small files come first; the weight shards are fetched
one at a time, just before they are converted, so that with delete_shards the disk holds the
output plus one shard.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from localmix.checkpoint import SafetensorsFile
from localmix.config import ModelArgs
from localmix.errors import LocalmixError

REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def looks_like_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text))


class HubSource:
    """A hub repository, at one commit, fetched as the converter asks for its files."""

    def __init__(self, repo: str, revision: str | None, downloads: Path, delete_shards: bool = False,
                 tqdm_class=None):
        import huggingface_hub

        self.hub = huggingface_hub
        self.repo = repo
        self.tqdm_class = tqdm_class
        self.delete_shards = delete_shards
        self.revision = self._commit(revision or "main")
        self.folder = downloads / f"{repo.replace('/', '--')}" / (self.revision or revision or "main")
        self.folder.mkdir(parents=True, exist_ok=True)
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

    def _commit(self, revision: str) -> str | None:
        """The commit hash the revision points to, so every file comes from the same commit."""
        if self.hub.constants.HF_HUB_OFFLINE:
            return revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
        url = self.hub.hf_hub_url(self.repo, "config.json", revision=revision)
        try:
            return self.hub.get_hf_file_metadata(url).commit_hash
        except Exception as e:  # noqa: BLE001 (every failure becomes one clear line)
            raise self._error("config.json", e, revision) from None

    def _download(self, filename: str) -> Path:
        """Fetch a file (resuming a partial one); FileNotFoundError when the repo lacks it."""
        errors = self.hub.errors
        try:
            return Path(self.hub.hf_hub_download(self.repo, filename, revision=self.revision, local_dir=self.folder,
                                                 tqdm_class=self.tqdm_class))
        except errors.RemoteEntryNotFoundError:
            raise FileNotFoundError(filename) from None
        except Exception as e:  # noqa: BLE001
            raise self._error(filename, e, self.revision) from None

    def _error(self, filename: str, e: Exception, revision: str | None) -> LocalmixError:
        errors = self.hub.errors
        if isinstance(e, errors.GatedRepoError):
            return LocalmixError(f"{self.repo} is gated: accept its terms on the hub and set HF_TOKEN")
        if isinstance(e, errors.RepositoryNotFoundError):
            return LocalmixError(f"unknown repository {self.repo} (private repositories need HF_TOKEN)")
        if isinstance(e, errors.RevisionNotFoundError):
            return LocalmixError(f"{self.repo}: unknown revision {revision!r}")
        if isinstance(e, errors.RemoteEntryNotFoundError):
            return LocalmixError(f"{self.repo}: no {filename} in the repository")
        if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
            return LocalmixError(f"cannot reach the hub for {self.repo} ({filename} is not downloaded yet); "
                                 f"check the network, HF_ENDPOINT or HF_HUB_OFFLINE")
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return LocalmixError(f"download of {self.repo}/{filename} failed: {first_line}; run the pull again to resume")

    def download_bytes(self) -> int:
        """Bytes still to download: all missing shards, or only the largest with delete_shards."""
        sizes = []
        for shard in sorted(set(self.weight_map.values())):
            if (self.folder / shard).is_file():
                continue
            url = self.hub.hf_hub_url(self.repo, shard, revision=self.revision)
            try:
                sizes.append(self.hub.get_hf_file_metadata(url).size or 0)
            except Exception:  # noqa: BLE001 (offline: sizes unknown)
                return 0
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
