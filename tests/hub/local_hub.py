"""A Hugging Face Hub on 127.0.0.1 speaking exactly the HTTP calls huggingface_hub 2.4 makes for publishing and
downloading a model repo, read from its source (`hf_api.py`, `_commit_api.py`, `_upload_pipeline.py`,
`_snapshot_download.py`, `file_download.py`):

=========================================================  ==========================================
call                                                       huggingface_hub API
=========================================================  ==========================================
``GET  /api/whoami-v2``                                    `HfApi.whoami`
``POST /api/repos/create``                                 `HfApi.create_repo`
``GET  /api/models/{repo}[/revision/{rev}]``               `HfApi.model_info` / `repo_info`
``POST /api/models/{repo}/branch/{branch}``                `HfApi.create_branch`
``POST /api/validate-yaml``                                `upload_folder` of a ``README.md``
``POST /api/models/{repo}/preupload/{rev}``                `upload_folder` (upload mode and remote oid)
``POST /api/models/{repo}/commit/{rev}`` (NDJSON)          `upload_folder` (the git commit)
``GET  /api/models/{repo}/tree/{rev}``                     `list_repo_tree` (by `snapshot_download`)
``HEAD|GET /{repo}/resolve/{rev}/{path}``                  `hf_hub_download`
=========================================================  ==========================================

Every file is stored as a regular git blob: ``preupload`` answers ``uploadMode: regular`` with the git sha1 of
the file already at that path, so `upload_folder` sends contents inline in the commit and never opens the Xet
transfer path, whose content-addressed storage protocol this server does not speak (the real Hub stores large
files through Xet; that transfer is huggingface_hub's own and is not exercised here). The server parses a
committed ``README.md`` front matter into ``cardData`` as the Hub does. It keeps every request (method, path,
and whether it carried the right token) and can be told to fail a commit, which is how tests interrupt an
upload halfway.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, unquote, urlparse

import yaml

USER = "kvtrain-tester"
ORG = "kvtrain-test"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]  # the whole tree after this commit
    changed: list[str]  # paths added or modified by it


@dataclass
class Repo:
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)  # branch -> its commits, oldest first

    def head(self, revision: str) -> Commit | None:
        commits = self.branches.get(revision)
        if commits:
            return commits[-1]
        for history in self.branches.values():  # a commit sha
            for commit in history:
                if commit.oid == revision:
                    return commit
        return None


@dataclass
class Request:
    method: str
    path: str
    authorized: bool
    time: float = field(default_factory=time.monotonic)


class LocalHub:
    """The server and its state; `url` is what HF_ENDPOINT points at."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        # Called with (repo_id, revision, paths the commit adds or modifies) before a commit is applied; returning
        # True fails it (HTTP 400).
        self.fail_commit: Callable[[str, str, list[str]], bool] | None = None
        self._oids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ state changes
    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(private=private)
        repo.branches["main"] = [self._commit(None, "initial commit", {".gitattributes": b"*.safetensors filter=lfs\n"})]
        self.repos[repo_id] = repo
        return repo

    def _commit(self, parent: Commit | None, message: str, changes: dict[str, bytes | None]) -> Commit:
        files = dict(parent.files) if parent else {}
        for path, data in changes.items():
            if data is None:
                files.pop(path, None)
            else:
                files[path] = data
        oid = hashlib.sha1(f"commit {next(self._oids)}".encode()).hexdigest()
        return Commit(oid, message, files, [p for p, d in changes.items() if d is not None])

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].head(revision).files

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        return self.repos[repo_id].branches[revision]


def _card_data(readme: bytes | None) -> dict | None:
    if readme is None:
        return None
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.decode("utf-8"), re.S)
    return yaml.safe_load(match.group(1)) if match else None


def _handler(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        # -------------------------------------------------------------- plumbing
        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload=None, headers: dict[str, str] | None = None, body: bytes | None = None):
            data = body if body is not None else (json.dumps(payload).encode() if payload is not None else b"")
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None):
            headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
            self._send(status, {"error": message}, headers)

        def _route(self):
            url = urlparse(self.path)
            with hub._lock:
                hub.requests.append(Request(self.command, url.path, self._authorized()))
            return unquote(url.path), parse_qs(url.query)

        def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or ((repo.private or write) and not self._authorized()):
                self._error(404, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
                return None
            return repo

        # -------------------------------------------------------------- verbs
        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            path, query = self._route()
            if path == "/api/whoami-v2":
                if not self._authorized():
                    return self._error(401, "Invalid credentials in Authorization header")
                return self._send(200, {"type": "user", "name": USER, "orgs": [{"name": ORG}]})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                return self._model_info(m.group(1), m.group(2) or "main")
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                return self._tree(m.group(1), m.group(2), m.group(3) or "")
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m.group(1), m.group(2), m.group(3))
            self._error(404, f"no such endpoint {self.command} {path}")

        def do_POST(self):
            path, query = self._route()
            body = self._body()
            if path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body)["content"])
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
                return self._create_branch(m.group(1), m.group(2), json.loads(body or b"{}"))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
                return self._preupload(m.group(1), m.group(2), json.loads(body))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
                return self._commit(m.group(1), m.group(2), body)
            self._error(404, f"no such endpoint {self.command} {path}")

        # -------------------------------------------------------------- endpoints
        def _model_info(self, repo_id: str, revision: str):
            repo = self._repo(repo_id)
            if repo is None:
                return
            head = repo.head(revision)
            if head is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            siblings = [{"rfilename": p} for p in sorted(head.files)]
            self._send(200, {"id": repo_id, "sha": head.oid, "private": repo.private, "siblings": siblings,
                             "cardData": _card_data(head.files.get("README.md")), "tags": []})

        def _tree(self, repo_id: str, revision: str, folder: str):
            repo = self._repo(repo_id)
            if repo is None:
                return
            head = repo.head(revision)
            if head is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            prefix = f"{folder.rstrip('/')}/" if folder else ""
            entries = [{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha1(d)}
                       for p, d in sorted(head.files.items()) if p.startswith(prefix)]
            self._send(200, entries)

        def _resolve(self, repo_id: str, revision: str, file: str):
            repo = self._repo(repo_id)
            if repo is None:
                return
            head = repo.head(revision)
            if head is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if file not in head.files:
                return self._error(404, f"Entry not found: {file}", "EntryNotFound")
            data = head.files[file]
            self._send(200, headers={"X-Repo-Commit": head.oid, "ETag": f'"{git_blob_sha1(data)}"'}, body=data)

        def _create_repo(self, payload: dict):
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            if repo_id in hub.repos:  # the Hub's conflict answer carries the url too (create_repo reads it)
                message = "You already created this model repo"
                return self._send(409, {"error": message, "url": f"{hub.url}/{repo_id}"}, {"X-Error-Message": message})
            with hub._lock:
                hub.create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            self._send(200, {"url": f"{hub.url}/{repo_id}"})

        def _validate_yaml(self, content: str):
            try:
                data = _card_data(content.encode())
            except yaml.YAMLError as err:
                return self._send(400, {"errors": [{"message": str(err)}]}, {"X-Error-Message": "Invalid YAML"})
            if not isinstance(data, dict):
                return self._send(400, {"errors": [{"message": "no YAML metadata block"}]})
            self._send(200, {"errors": [], "warnings": []})

        def _create_branch(self, repo_id: str, branch: str, payload: dict):
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            start = repo.head(payload.get("startingPoint") or "main")
            with hub._lock:
                repo.branches[branch] = [start]
            self._send(200, {})

        def _preupload(self, repo_id: str, revision: str, payload: dict):
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            head = repo.head(revision)
            if head is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                      "oid": git_blob_sha1(head.files[f["path"]]) if f["path"] in head.files else None}
                     for f in payload["files"]]
            self._send(200, {"files": files, "commitOid": head.oid})

        def _commit(self, repo_id: str, revision: str, body: bytes):
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            if revision not in repo.branches:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            changes: dict[str, bytes | None] = {}
            for item in lines:
                if item["key"] == "file":
                    changes[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    changes[item["value"]["path"]] = None
                elif item["key"] != "header":
                    return self._error(400, f"unsupported commit operation {item['key']!r} (only regular files)")
            added = sorted(path for path, data in changes.items() if data is not None)
            if hub.fail_commit is not None and hub.fail_commit(repo_id, revision, added):
                return self._error(400, "commit refused by the test (an interrupted upload)")
            with hub._lock:
                commit = hub._commit(repo.branches[revision][-1], header["summary"], changes)
                repo.branches[revision].append(commit)
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                             "pullRequestUrl": None})

    return Handler
