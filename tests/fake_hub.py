"""A small stand-in for the Hugging Face hub on 127.0.0.1: the HTTP endpoints huggingface_hub uses
to fetch files (HEAD and GET on /{repo}/resolve/{revision}/{file}, with ranges for resuming), its
error codes, and a switch that breaks a download off half way.

It can also be hostile, file by file: a commit header of its choosing (`commits`), a length that
lies or is left out (`lengths`; no length means the body runs until the connection closes), a
body of its own (`bodies`: a generator, so a 300 MB or endless body is never built in memory),
a checksum of its own (`etags`), a redirect anywhere (`locations`, on HEAD) and a pause before a
body (`delays`)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> file name -> content
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers in lower case)
        self.break_file: str | None = None  # the next GET of this file stops half way...
        self.fail_after_break = False       # ...and every request after it fails with 500
        self.broken = False
        self.commits: dict[str, str | None] = {}  # repo -> X-Repo-Commit sent (None: no header)
        self.lengths: dict[tuple[str, str], int | None] = {}  # (repo, file) -> Content-Length sent
        self.head_lengths: dict[tuple[str, str], int | None] = {}  # the same, on HEAD only
        self.bodies: dict[tuple[str, str], Callable[[], Iterator[bytes]]] = {}  # (repo, file) -> GET body
        self.etags: dict[tuple[str, str], str | None] = {}  # (repo, file) -> ETag sent (None: none)
        self.locations: dict[tuple[str, str], str] = {}  # (repo, file) -> where HEAD redirects
        self.delays: dict[str, float] = {}  # file -> seconds to wait before sending its body
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.block_on_close = False  # close() does not wait for an endless body's thread
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_folder(self, repo: str, folder: Path) -> None:
        self.repos[repo] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _error(self, handler, status: int, code: str) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _serve(self, handler, body: bool) -> None:
        self.requests.append((handler.command, handler.path, {k.lower(): v for k, v in handler.headers.items()}))
        if self.broken:
            handler.send_response(500)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        # Split, then unquote: a revision of "../.." arrives as one quoted part.
        parts = [unquote(p) for p in handler.path.split("?")[0].strip("/").split("/")]
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(handler, 404, "RepoNotFound")
        repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.repos:
            return self._error(handler, 401, "RepoNotFound")
        commit = self.commits.get(repo, COMMIT)
        if revision not in ("main", COMMIT, commit):
            return self._error(handler, 404, "RevisionNotFound")
        if name not in self.repos[repo]:
            return self._error(handler, 404, "EntryNotFound")
        key = (repo, name)
        if key in self.locations and not body:
            handler.send_response(302)
            handler.send_header("Location", self.locations[key])
            handler.send_header("X-Repo-Commit", commit or "")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if key in self.lengths or key in self.head_lengths or key in self.bodies or key in self.etags:
            return self._serve_hostile(handler, body, commit, key)
        content = self.repos[repo][name]
        start = 0
        if "Range" in handler.headers:
            start = int(handler.headers["Range"].split("=")[1].split("-")[0])
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        handler.send_header("Content-Length", str(len(content) - start))
        handler.send_header("Accept-Ranges", "bytes")
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        handler.end_headers()
        if not body:
            return
        time.sleep(self.delays.get(name, 0))
        if name == self.break_file:
            self.break_file = None
            handler.wfile.write(content[start:start + (len(content) - start) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            self.broken = self.fail_after_break
            return
        handler.wfile.write(content[start:])

    def _serve_hostile(self, handler, body: bool, commit: str | None, key: tuple[str, str]) -> None:
        """A file as the hostile settings have it; ranges are ignored (the client must start over)."""
        content = self.repos[key[0]][key[1]]
        length = self.lengths.get(key, len(content))
        if not body:
            length = self.head_lengths.get(key, length)
        etag = self.etags.get(key, None if key in self.bodies else hashlib.sha256(content).hexdigest())
        handler.send_response(200)
        if commit is not None:
            handler.send_header("X-Repo-Commit", commit)
        if etag is not None:
            handler.send_header("ETag", f'"{etag}"')
        if length is not None:
            handler.send_header("Content-Length", str(length))
        else:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        if not body:
            return
        handler.close_connection = True  # a body that lies about its length cannot share a connection
        chunks = self.bodies[key]() if key in self.bodies else iter([content])
        try:
            for chunk in chunks:
                handler.wfile.write(chunk)
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what a hostile hub wants to test


def endless(chunk: bytes, pause: float = 0.0) -> Callable[[], Iterator[bytes]]:
    """A body that never ends, chunk after chunk (after a pause each): built lazily, never whole."""
    def body():
        while True:
            if pause:
                time.sleep(pause)
            yield chunk
    return body


def sized(total: int, chunk: bytes = b" " * 65536) -> Callable[[], Iterator[bytes]]:
    """A body of `total` bytes, a chunk at a time (300 MB of it costs 64 KiB of memory)."""
    def body():
        left = total
        while left > 0:
            yield chunk[:left]
            left -= len(chunk)
    return body
