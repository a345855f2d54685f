"""A small stand-in for the Hugging Face hub on 127.0.0.1: the HTTP endpoints huggingface_hub uses
to fetch files (HEAD and GET on /{repo}/resolve/{revision}/{file}, with ranges for resuming), its
error codes, and a switch that breaks a download off half way."""

from __future__ import annotations

import hashlib
import threading
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
        parts = unquote(handler.path.split("?")[0]).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(handler, 404, "RepoNotFound")
        repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.repos:
            return self._error(handler, 401, "RepoNotFound")
        if revision not in ("main", COMMIT):
            return self._error(handler, 404, "RevisionNotFound")
        if name not in self.repos[repo]:
            return self._error(handler, 404, "EntryNotFound")
        content = self.repos[repo][name]
        start = 0
        if "Range" in handler.headers:
            start = int(handler.headers["Range"].split("=")[1].split("-")[0])
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        handler.send_header("Content-Length", str(len(content) - start))
        handler.send_header("Accept-Ranges", "bytes")
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        handler.end_headers()
        if not body:
            return
        if name == self.break_file:
            self.break_file = None
            handler.wfile.write(content[start:start + (len(content) - start) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            self.broken = self.fail_after_break
            return
        handler.wfile.write(content[start:])
