"""A Hugging Face Hub on 127.0.0.1, enough for ``huggingface_hub.hf_hub_download``.

It answers ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` the way the Hub does: the
commit in ``X-Repo-Commit``, the content's hash as ``ETag``, and 404s whose
``X-Error-Code`` says whether the repository, the revision or the file is missing. A repo
may be private (401 without its token); every request's headers are kept for tests.
"""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file


@dataclass
class Repo:
    """Files per commit, and which branch or tag names point at which commit."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    token: str | None = None

    def add(self, files: dict[str, bytes], *names: str) -> str:
        """A new commit with ``files``, which ``names`` (default ``main``) now point at."""
        commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        self.commits[commit] = files
        for name in names or ("main",):
            self.refs[name] = commit
        return commit


def hub_layout(hf_dir: Path, target: Path) -> Path:
    """The same weights as the Hub publishes them: no ``transformer.`` prefix, no lm_head."""
    target.mkdir(parents=True, exist_ok=True)
    tensors = load_file(hf_dir / "model.safetensors")
    plain = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    save_file(plain, target / "model.safetensors")
    shutil.copy(hf_dir / "config.json", target / "config.json")
    return target


def published(scaled_gpt2_dir: Path, tmp_path: Path) -> dict[str, bytes]:
    """A GPT-2 repository as the Hub holds it, with files the loader must not fetch."""
    files = folder_files(hub_layout(scaled_gpt2_dir, tmp_path / "published"))
    return files | {"pytorch_model.bin": b"pickled weights", "README.md": b"# gpt2"}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict]] = []  # method, path, lower-cased headers
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def repo(self, repo_id: str) -> Repo:
        return self.repos.setdefault(repo_id, Repo())

    def downloads(self, name: str) -> int:
        """GET requests for files called ``name``."""
        return sum(1 for verb, path, _ in self.requests if verb == "GET" and path.endswith(name))

    def answer(self, handler: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        headers = {key.lower(): value for key, value in handler.headers.items()}
        self.requests.append((handler.command, handler.path, headers))
        repo_id, _, rest = handler.path.partition("/resolve/")
        repo = self.repos.get(repo_id.strip("/"))
        revision, _, name = rest.partition("/")
        if repo is None:
            return self.fail(handler, 404, "RepoNotFound", body)
        if repo.token and handler.headers.get("Authorization") != f"Bearer {repo.token}":
            return self.fail(handler, 401, "RepoNotFound", body)
        commit = repo.refs.get(revision, revision)
        if commit not in repo.commits:
            return self.fail(handler, 404, "RevisionNotFound", body)
        content = repo.commits[commit].get(name)
        if content is None:
            return self.fail(handler, 404, "EntryNotFound", body, commit)
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        if body:
            handler.wfile.write(content)

    @staticmethod
    def fail(handler, status: int, code: str, body: bool, commit: str | None = None) -> None:
        message = f'{{"error": "{code}"}}'.encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        if commit:
            handler.send_header("X-Repo-Commit", commit)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(message)))
        handler.end_headers()
        if body:
            handler.wfile.write(message)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
