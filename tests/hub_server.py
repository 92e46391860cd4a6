"""A small Hugging Face Hub-compatible HTTP server, used as a test fixture.

The server speaks enough of the Hub's HTTP API for the *real* ``huggingface_hub`` client
(checked against huggingface_hub 2.4) to create repos, push folders (``upload_folder``,
``upload_file``, ``create_commit``), manage branches/tags and pull snapshots
(``snapshot_download``, ``hf_hub_download``, ``ModelCard.load``) over loopback.

The server core uses the standard library only (``http.server`` + ``threading``).
``pytest`` and ``huggingface_hub`` are imported lazily, only by the fixtures / env helper.

Quick use (pytest)::

    # tests/conftest.py
    from hub_server import hub_server, hub_server_raw  # noqa: F401  (registers the fixtures)

    def test_push(hub_server):
        api = HfApi(endpoint=hub_server.endpoint)
        api.create_repo("me/lib", exist_ok=True)
        ...
        hub_server.tamper("me/lib", "manifest.json", b"{}")

Design notes
------------
* Storage is in memory: repos -> commits; each commit is an immutable snapshot ``{path: bytes}``
  with a 40-hex sha; branches/tags/PR refs map names to commit shas (default branch ``main``).
* Like the real Hub, a new repo starts with an "initial commit" holding a default ``.gitattributes``.
* Every file is answered as ``uploadMode: "regular"`` by ``/preupload`` so the client never goes
  through Xet/LFS storage: file contents arrive base64-encoded inside the NDJSON commit.
* Files matching a ``filter=lfs`` pattern of the snapshot's ``.gitattributes`` (e.g. ``*.safetensors``)
  or larger than ``lfs_threshold`` are *described* as LFS files, as on the Hub: tree/paths-info entries
  carry ``lfs: {oid: sha256, size, pointerSize}`` and ``/resolve`` answers ``ETag``/``X-Linked-Etag`` =
  sha256 and ``X-Linked-Size`` (so the client's blob cache is keyed by sha256). Regular files use their
  git blob sha1 as ETag / oid. Bytes are always served directly (no CDN redirect).
* Committing to a branch that does not exist answers 404 ``RevisionNotFound`` ("Invalid rev id"), as the
  real Hub does: call ``HfApi.create_branch(repo_id, branch=..., exist_ok=True)`` first. Set
  ``HubServer(auto_create_branches=True)`` to have commits create missing branches from ``main``.
* Never answers 5xx on client mistakes (the client retries 5xx with sleeps); internal errors answer 500
  and are recorded in ``server.errors`` (the fixtures fail the test at teardown if any).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import os
import re
import threading
import traceback
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, unquote

__all__ = [
    "DUMMY_TOKEN",
    "DEFAULT_USER",
    "HubServer",
    "HubEnv",
    "RequestRecord",
    "hub_env",
    "hub_offline",
    "git_blob_sha1",
    "hub_server",
    "hub_server_raw",
]

DUMMY_TOKEN = "hf_fakehubdummytokenfortestsonly0000"
DEFAULT_USER = "test-user"

_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_REPO_ACTIONS = {
    "revision", "tree", "preupload", "commit", "commits", "refs", "paths-info", "branch", "tag",
    "settings", "discussions", "lfs-files", "xet-write-token", "xet-read-token", "super-squash",
    "auth-check", "safetensors-metadata", "resolve",
}
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA_RE = re.compile(r"^[0-9a-f]{7,39}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

DEFAULT_GITATTRIBUTES = b"""*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.bz2 filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.ftz filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.joblib filter=lfs diff=lfs merge=lfs -text
*.lfs.* filter=lfs diff=lfs merge=lfs -text
*.mlmodel filter=lfs diff=lfs merge=lfs -text
*.model filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.ot filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pb filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.rar filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
saved_model/**/* filter=lfs diff=lfs merge=lfs -text
*.tar.* filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.tflite filter=lfs diff=lfs merge=lfs -text
*.tgz filter=lfs diff=lfs merge=lfs -text
*.wasm filter=lfs diff=lfs merge=lfs -text
*.xz filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""


# --------------------------------------------------------------------------------------------- helpers


def git_blob_sha1(data: bytes) -> str:
    """Git blob id of ``data`` (what the Hub reports as ``oid``/ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now_iso() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _lfs_patterns(gitattributes: bytes | None) -> list[str]:
    if not gitattributes:
        return []
    patterns = []
    for line in gitattributes.decode("utf-8", "replace").splitlines():
        parts = line.strip().split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches_gitattr(pattern: str, path: str) -> bool:
    if "/" in pattern.strip("/"):
        return fnmatch.fnmatchcase(path, pattern.lstrip("/"))
    return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)


def _check_path(path: str) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise _HttpError(400, f"Invalid path in repo: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise _HttpError(400, f"Invalid path in repo: {path!r}")
    return path


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


@dataclasses.dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def _json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    h = {"Content-Type": "application/json; charset=utf-8"}
    h.update(headers or {})
    return _Response(status, json.dumps(data).encode(), h)


def _error_response(err: _HttpError) -> _Response:
    headers = {"X-Error-Message": err.message.replace("\n", " ")[:1000]}
    if err.error_code:
        headers["X-Error-Code"] = err.error_code
    headers.update(err.headers)
    return _json_response({"error": err.message, **err.extra}, err.status, headers)


@dataclasses.dataclass
class RequestRecord:
    """One request served by the server (see ``HubServer.requests``)."""

    method: str
    path: str  # raw path, without query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    status: int | None = None

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclasses.dataclass
class _Commit:
    sha: str
    parent: str | None
    files: dict[str, bytes]  # full snapshot; treat as immutable (except `tamper(in_place=True)`)
    title: str
    message: str
    author: str
    date: str
    _meta: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, repr=False)


@dataclasses.dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    pulls: dict[int, str] = dataclasses.field(default_factory=dict)
    gated: Any = False


@dataclasses.dataclass
class _Fault:
    status: int
    method: str | None
    path_contains: str | None
    times: int
    error_code: str | None
    message: str


@dataclasses.dataclass
class _Req:
    method: str
    path: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def q(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def qbool(self, name: str) -> bool:
        return (self.q(name) or "").lower() in ("1", "true", "yes")

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise _HttpError(400, f"Invalid JSON body: {e}") from None


# --------------------------------------------------------------------------------------------- server


class HubServer:
    """In-memory fake of the Hugging Face Hub HTTP API, served on ``127.0.0.1:<random port>``.

    Args:
        token: if set, write requests must carry ``Authorization: Bearer <token>`` (else 401) and
            private repos are only readable with it. If ``None`` (default), any or no token is
            accepted for writes; private repos then only require *some* Authorization header.
        user: namespace used for repo ids given without one, and returned by ``/api/whoami-v2``.
        auto_create_branches: commits/preuploads to a missing branch create it from ``main``
            (the real Hub answers 404 "Invalid rev id" instead, which is the default here).
        initial_gitattributes: new repos start with an "initial commit" holding a default
            ``.gitattributes`` (like the Hub). Set ``False`` for an empty initial commit.
        lfs_threshold: files larger than this are described as LFS even without a pattern.

    Python-side test API (no HTTP): ``create_repo``, ``commit``, ``add_file``, ``remove_file``,
    ``tamper``, ``get_file``, ``list_files``, ``head``, ``resolve``, ``refs``, ``history``,
    ``set_private``; request accounting: ``requests``, ``request_count``, ``count()``,
    ``reset_requests()``; fault injection: ``inject_error()``; internal errors: ``errors``.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        user: str = DEFAULT_USER,
        auto_create_branches: bool = False,
        initial_gitattributes: bool = True,
        lfs_threshold: int = 10 * 1024 * 1024,
        host: str = "127.0.0.1",
    ) -> None:
        self.token = token
        self.user = user
        self.auto_create_branches = auto_create_branches
        self.initial_gitattributes = initial_gitattributes
        self.lfs_threshold = lfs_threshold
        self.tree_page_size: int | None = None  # set to paginate tree listings (Link header)
        self.reject_yaml: str | None = None  # set to make /api/validate-yaml answer 400 with this error
        self.requests: list[RequestRecord] = []
        self.errors: list[str] = []  # tracebacks of internal server errors (HTTP 500)
        self._host = host
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._faults: list[_Fault] = []
        self._counter = itertools.count()
        self._httpd: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> "HubServer":
        if self._httpd is not None:
            return self
        httpd = _ThreadingServer((self._host, 0), _Handler)
        httpd.hub = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        try:
            httpd.shutdown()  # returns once serve_forever has exited (<= poll_interval)
        finally:
            httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._thread = None

    close = stop

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("HubServer is not running")
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        """Base URL to pass as ``endpoint=`` / ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:54321``."""
        return f"http://{self._host}:{self.port}"

    url = endpoint

    # ----------------------------------------------------------------------------- request stats

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        """Number of requests served, optionally filtered by method and path substring."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method.upper())
                and (path_contains is None or path_contains in unquote(r.path))
            )

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def inject_error(
        self,
        status: int,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        times: int = 1,
        error_code: str | None = None,
        message: str = "Injected error",
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (after recording them).

        Beware: the client retries 5xx/429 answers with exponential sleeps (1, 2, 4... s).
        """
        with self._lock:
            self._faults.append(
                _Fault(status, method.upper() if method else None, path_contains, times, error_code, message)
            )

    # ------------------------------------------------------------------------- python-side API

    def _canonical_id(self, repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"{self.user}/{repo_id}"

    def _get_repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        repo = self._repos.get((repo_type, repo_id)) or self._repos.get((repo_type, self._canonical_id(repo_id)))
        if repo is None:
            raise KeyError(f"No {repo_type} repo {repo_id!r} on the fake hub")
        return repo

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = True
    ) -> str:
        """Create a repo (with its initial commit). Returns the canonical repo id."""
        repo_id = self._canonical_id(repo_id)
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                if not exist_ok:
                    raise ValueError(f"repo {repo_id!r} exists")
                return repo_id
            repo = _Repo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now_iso())
            files = {".gitattributes": DEFAULT_GITATTRIBUTES} if self.initial_gitattributes else {}
            first = self._new_commit(repo, None, files, "initial commit", "", "system")
            repo.branches["main"] = first.sha
            self._repos[(repo_type, repo_id)] = repo
            return repo_id

    def delete_repo(self, repo_id: str, *, repo_type: str = "model") -> None:
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            del self._repos[(repo.repo_type, repo.repo_id)]

    def set_private(self, repo_id: str, private: bool = True, *, repo_type: str = "model") -> None:
        with self._lock:
            self._get_repo(repo_id, repo_type).private = private

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(rid for (rtype, rid) in self._repos if rtype == repo_type)

    def resolve(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Commit sha that ``revision`` (branch, tag, ``refs/pr/N``, sha or sha prefix) points to."""
        with self._lock:
            return self._resolve(self._get_repo(repo_id, repo_type), revision).sha

    def head(self, repo_id: str, branch: str = "main", *, repo_type: str = "model") -> str:
        return self.resolve(repo_id, branch, repo_type=repo_type)

    def refs(self, repo_id: str, *, repo_type: str = "model") -> dict[str, dict[str, str]]:
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return {
                "branches": dict(repo.branches),
                "tags": dict(repo.tags),
                "pulls": {f"refs/pr/{n}": s for n, s in repo.pulls.items()},
            }

    def history(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        """Commit shas reachable from ``revision``, newest first."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return [c.sha for c in self._walk(repo, self._resolve(repo, revision))]

    def list_files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(self._resolve(self._get_repo(repo_id, repo_type), revision).files)

    def get_file(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bytes:
        with self._lock:
            return self._resolve(self._get_repo(repo_id, repo_type), revision).files[path]

    def commit(
        self,
        repo_id: str,
        changes: dict[str, bytes | str | None],
        *,
        revision: str = "main",
        message: str = "Update files",
        author: str = "test-api",
        repo_type: str = "model",
        create_repo: bool = True,
    ) -> str:
        """Commit ``changes`` ({path: bytes, or None to delete}) on branch ``revision``.

        The branch is created from ``main`` if missing. Returns the new commit sha.
        """
        with self._lock:
            if create_repo:
                self.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
            repo = self._get_repo(repo_id, repo_type)
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            base = repo.commits[repo.branches[revision]]
            files = dict(base.files)
            for path, data in changes.items():
                _check_path(path)
                if data is None:
                    if path not in files:
                        raise KeyError(f"{path!r} not in {repo_id}@{revision}")
                    del files[path]
                else:
                    files[path] = data.encode() if isinstance(data, str) else bytes(data)
            new = self._new_commit(repo, base.sha, files, message, "", author)
            repo.branches[revision] = new.sha
            return new.sha

    def add_file(
        self, repo_id: str, path: str, data: bytes | str, *, revision: str = "main", repo_type: str = "model",
        message: str | None = None,
    ) -> str:
        """Add/overwrite one file in a new commit on branch ``revision``. Returns the commit sha."""
        return self.commit(
            repo_id, {path: data}, revision=revision, repo_type=repo_type, message=message or f"Add {path}"
        )

    def remove_file(
        self, repo_id: str, path: str, *, revision: str = "main", repo_type: str = "model",
        message: str | None = None,
    ) -> str:
        """Delete one file in a new commit on branch ``revision``. Returns the commit sha."""
        return self.commit(
            repo_id, {path: None}, revision=revision, repo_type=repo_type, message=message or f"Delete {path}",
            create_repo=False,
        )

    def tamper(
        self,
        repo_id: str,
        path: str,
        new_bytes: bytes | str,
        revision: str = "main",
        *,
        in_place: bool = False,
        repo_type: str = "model",
    ) -> str:
        """Replace the content of ``path`` like an attacker would.

        * ``in_place=False`` (default): push a new commit on branch ``revision`` (a malicious upload);
          the branch moves, older commit shas still serve the original bytes.
        * ``in_place=True``: rewrite the bytes *inside the existing commit* that ``revision`` resolves to
          (a compromised storage/mirror): the commit sha does not change, but every later download of that
          commit gets ``new_bytes`` (ETag/size/sha256 metadata follow the new bytes).

        Returns the commit sha now serving the tampered content.
        """
        data = new_bytes.encode() if isinstance(new_bytes, str) else bytes(new_bytes)
        if not in_place:
            return self.commit(
                repo_id, {path: data}, revision=revision, repo_type=repo_type, message=f"Update {path}",
                author="mallory", create_repo=False,
            )
        with self._lock:
            c = self._resolve(self._get_repo(repo_id, repo_type), revision)
            _check_path(path)
            c.files[path] = data
            c._meta.clear()
            return c.sha

    # ------------------------------------------------------------------------------ internals

    def _new_commit(
        self, repo: _Repo, parent: str | None, files: dict[str, bytes], title: str, message: str, author: str
    ) -> _Commit:
        h = hashlib.sha1()
        h.update(f"{repo.repo_type}/{repo.repo_id}\0{parent}\0{title}\0{next(self._counter)}\0".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        c = _Commit(h.hexdigest(), parent, dict(files), title, message, author, _now_iso())
        repo.commits[c.sha] = c
        return c

    def _resolve(self, repo: _Repo, revision: str | None) -> _Commit:
        rev = revision or "main"
        sha = None
        if rev in repo.branches:
            sha = repo.branches[rev]
        elif rev.startswith("refs/heads/") and rev[len("refs/heads/"):] in repo.branches:
            sha = repo.branches[rev[len("refs/heads/"):]]
        elif rev in repo.tags:
            sha = repo.tags[rev]
        elif rev.startswith("refs/tags/") and rev[len("refs/tags/"):] in repo.tags:
            sha = repo.tags[rev[len("refs/tags/"):]]
        elif rev.startswith("refs/pr/") and rev[len("refs/pr/"):].isdigit() and int(rev[8:]) in repo.pulls:
            sha = repo.pulls[int(rev[8:])]
        elif _SHA_RE.match(rev) and rev in repo.commits:
            sha = rev
        elif _SHORT_SHA_RE.match(rev):
            matches = [s for s in repo.commits if s.startswith(rev)]
            if len(matches) == 1:
                sha = matches[0]
        if sha is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", error_code="RevisionNotFound")
        return repo.commits[sha]

    def _walk(self, repo: _Repo, commit: _Commit) -> Iterator[_Commit]:
        c: _Commit | None = commit
        while c is not None:
            yield c
            c = repo.commits.get(c.parent) if c.parent else None

    def _file_meta(self, commit: _Commit, path: str) -> dict[str, Any]:
        meta = commit._meta.get(path)
        if meta is None:
            data = commit.files[path]
            patterns = _lfs_patterns(commit.files.get(".gitattributes"))
            is_lfs = len(data) > self.lfs_threshold or any(_matches_gitattr(p, path) for p in patterns)
            blob = git_blob_sha1(data)
            meta = {"size": len(data), "blob_id": blob, "lfs": None, "etag": blob}
            if is_lfs:
                sha256 = hashlib.sha256(data).hexdigest()
                pointer = _lfs_pointer(sha256, len(data))
                meta.update(
                    blob_id=git_blob_sha1(pointer),
                    etag=sha256,
                    lfs={"oid": sha256, "size": len(data), "pointerSize": len(pointer)},
                )
            commit._meta[path] = meta
        return meta

    def _tree_entry(self, repo: _Repo, commit: _Commit, path: str, is_dir: bool, expand: bool) -> dict:
        if is_dir:
            entry: dict[str, Any] = {
                "type": "directory",
                "oid": hashlib.sha1(f"tree\0{commit.sha}\0{path}".encode()).hexdigest(),
                "size": 0,
                "path": path,
            }
        else:
            meta = self._file_meta(commit, path)
            entry = {"type": "file", "oid": meta["blob_id"], "size": meta["size"], "path": path}
            if meta["lfs"] is not None:
                entry["lfs"] = dict(meta["lfs"])
            if expand:
                entry["securityFileStatus"] = {"status": "safe", "avScan": None, "pickleImportScan": None}
        if expand:
            last = self._last_commit_touching(repo, commit, path, is_dir)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
        return entry

    def _last_commit_touching(self, repo: _Repo, commit: _Commit, path: str, is_dir: bool) -> _Commit:
        def view(c: _Commit) -> Any:
            if is_dir:
                return sorted((p, git_blob_sha1(d)) for p, d in c.files.items() if p.startswith(path + "/"))
            d = c.files.get(path)
            return None if d is None else git_blob_sha1(d)

        current, last = view(commit), commit
        for c in itertools.islice(self._walk(repo, commit), 1, None):
            if view(c) != current:
                break
            last = c
        return last

    @staticmethod
    def _dirs(files: dict[str, bytes]) -> set[str]:
        dirs = set()
        for p in files:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # --------------------------------------------------------------------------- HTTP handling

    def _authorized(self, req: _Req) -> bool:
        auth = req.headers.get("authorization")
        if self.token is None:
            return True
        return auth == f"Bearer {self.token}"

    def _require_write(self, req: _Req) -> None:
        if self.token is not None and not self._authorized(req):
            raise _HttpError(401, "Invalid credentials in Authorization header")

    def _find_repo(self, req: _Req, repo_type: str, repo_id: str, *, write: bool = False) -> _Repo:
        repo = self._repos.get((repo_type, repo_id)) or self._repos.get((repo_type, self._canonical_id(repo_id)))
        if repo is not None and repo.private:
            has_auth = "authorization" in req.headers and self._authorized(req)
            if not has_auth:
                repo = None
        if repo is None:
            raise _HttpError(401 if write else 404, "Repository not found", error_code="RepoNotFound")
        if write:
            self._require_write(req)
        return repo

    def _split_repo(self, repo_type: str, segs: list[str], marker: set[str]) -> tuple[str, list[str]]:
        """Split ``segs`` into (repo_id, rest): repo ids have 1 or 2 segments."""
        if len(segs) >= 2:
            two = f"{segs[0]}/{segs[1]}"
            if (repo_type, two) in self._repos:
                return two, segs[2:]
            if (repo_type, segs[0]) in self._repos or (repo_type, self._canonical_id(segs[0])) in self._repos:
                if segs[1] in marker:
                    return segs[0], segs[1:]
            if segs[1] not in marker:
                return two, segs[2:]
        if segs:
            return segs[0], segs[1:]
        raise _HttpError(404, "Not found")

    def _handle(self, req: _Req) -> _Response:
        # One lock around the whole request: the store is tiny and this keeps every answer consistent.
        with self._lock:
            return self._handle_locked(req)

    def _handle_locked(self, req: _Req) -> _Response:
        for fault in self._faults:
            if (fault.method is None or fault.method == req.method) and (
                fault.path_contains is None or fault.path_contains in unquote(req.path)
            ):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                raise _HttpError(fault.status, fault.message, error_code=fault.error_code)
        segs = req.segments
        if segs and segs[0] == "api":
            return self._handle_api(req, segs[1:])
        # File downloads: /{repo_id}/resolve/{rev}/{path}, /datasets/{repo_id}/resolve/...
        repo_type = "model"
        if segs and segs[0] in _API_TYPES and segs[0] != "models":
            repo_type, segs = _API_TYPES[segs[0]], segs[1:]
        if "resolve" in segs[:3] and req.method in ("GET", "HEAD"):
            repo_id, rest = self._split_repo(repo_type, segs, {"resolve"})
            if len(rest) >= 3 and rest[0] == "resolve":
                return self._resolve_file(req, repo_type, repo_id, rest[1], "/".join(rest[2:]))
        raise _HttpError(404, f"Not found: {req.method} {req.path}")

    def _handle_api(self, req: _Req, segs: list[str]) -> _Response:
        m = req.method
        if segs == ["repos", "create"] and m == "POST":
            return self._api_create_repo(req)
        if segs == ["repos", "delete"] and m == "DELETE":
            return self._api_delete_repo(req)
        if segs == ["validate-yaml"] and m == "POST":
            return self._api_validate_yaml(req)
        if segs == ["whoami-v2"] and m == "GET":
            return self._api_whoami(req)
        if not segs or segs[0] not in _API_TYPES:
            raise _HttpError(404, f"Not found: {m} {req.path}")
        repo_type = _API_TYPES[segs[0]]
        repo_id, rest = self._split_repo(repo_type, segs[1:], _REPO_ACTIONS)
        action = rest[0] if rest else None
        with self._lock:
            if action is None and m == "GET":
                return self._api_repo_info(req, repo_type, repo_id, None)
            if action == "revision" and m == "GET" and len(rest) >= 2:
                return self._api_repo_info(req, repo_type, repo_id, "/".join(rest[1:]))
            if action == "tree" and m == "GET" and len(rest) >= 2:
                return self._api_tree(req, repo_type, repo_id, rest[1], "/".join(rest[2:]))
            if action == "paths-info" and m == "POST" and len(rest) >= 2:
                return self._api_paths_info(req, repo_type, repo_id, "/".join(rest[1:]))
            if action == "preupload" and m == "POST" and len(rest) >= 2:
                return self._api_preupload(req, repo_type, repo_id, "/".join(rest[1:]))
            if action == "commit" and m == "POST" and len(rest) >= 2:
                return self._api_commit(req, repo_type, repo_id, "/".join(rest[1:]))
            if action == "commits" and m == "GET" and len(rest) >= 2:
                return self._api_commits(req, repo_type, repo_id, "/".join(rest[1:]))
            if action == "refs" and m == "GET":
                return self._api_refs(req, repo_type, repo_id)
            if action == "branch" and len(rest) >= 2 and m in ("POST", "DELETE"):
                return self._api_branch(req, repo_type, repo_id, "/".join(rest[1:]))
            if action == "tag" and len(rest) >= 2 and m in ("POST", "DELETE"):
                return self._api_tag(req, repo_type, repo_id, "/".join(rest[1:]))
            if action == "settings" and m == "PUT":
                return self._api_settings(req, repo_type, repo_id)
        raise _HttpError(404, f"Not found: {m} {req.path}")

    # ---- /api/repos/*, whoami, validate-yaml

    def _api_create_repo(self, req: _Req) -> _Response:
        self._require_write(req)
        payload = req.json()
        name = payload.get("name")
        org = payload.get("organization") or self.user
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"Invalid repo type: {repo_type}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(org):
            raise _HttpError(400, f"Invalid repo name: {org}/{name}")
        private = payload.get("visibility", "public") != "public" if "visibility" in payload else bool(
            payload.get("private", False)
        )
        repo_id = f"{org}/{name}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                repo = self._repos[(repo_type, repo_id)]
                raise _HttpError(
                    409, f"You already created this {repo_type} repo", extra={"url": self._repo_url(repo)}
                )
            self.create_repo(repo_id, repo_type=repo_type, private=private)
            repo = self._repos[(repo_type, repo_id)]
            return _json_response({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _api_delete_repo(self, req: _Req) -> _Response:
        self._require_write(req)
        payload = req.json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload.get('name')}"
        with self._lock:
            repo = self._find_repo(req, repo_type, repo_id, write=True)
            del self._repos[(repo.repo_type, repo.repo_id)]
        return _json_response({})

    def _api_validate_yaml(self, req: _Req) -> _Response:
        req.json()
        if self.reject_yaml:
            return _json_response({"errors": [{"message": self.reject_yaml}], "warnings": []}, 400)
        return _json_response({"errors": [], "warnings": []})

    def _api_whoami(self, req: _Req) -> _Response:
        if "authorization" not in req.headers or not self._authorized(req):
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return _json_response(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.user,
                "fullname": "Fake Hub Test User",
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            }
        )

    # ---- repo-level endpoints

    def _api_repo_info(self, req: _Req, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        repo = self._find_repo(req, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        with_blobs = req.qbool("blobs")
        siblings = []
        for path in sorted(commit.files):
            sib: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                meta = self._file_meta(commit, path)
                sib.update(size=meta["size"], blobId=meta["blob_id"])
                if meta["lfs"] is not None:
                    sib["lfs"] = {
                        "sha256": meta["lfs"]["oid"], "size": meta["lfs"]["size"],
                        "pointerSize": meta["lfs"]["pointerSize"],
                    }
            siblings.append(sib)
        author = repo.repo_id.split("/")[0]
        data: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": author,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(d) for d in commit.files.values()),
        }
        if repo_type == "model":
            data["modelId"] = repo.repo_id
            data["spaces"] = []
        if repo_type == "space":
            data["sdk"] = "static"
        return _json_response(data)

    def _api_tree(self, req: _Req, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._find_repo(req, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        path = path.strip("/")
        recursive, expand = req.qbool("recursive"), req.qbool("expand")
        dirs = self._dirs(commit.files)
        if path and path not in dirs:
            if path in commit.files:
                raise _HttpError(400, f"{path} is a file, not a directory")
            raise _HttpError(404, f"Path not found: {path}", error_code="EntryNotFound",
                             headers={"X-Repo-Commit": commit.sha})
        prefix = path + "/" if path else ""
        items: list[tuple[str, bool]] = []
        for d in sorted(dirs):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                items.append((d, True))
        for f in sorted(commit.files):
            if f.startswith(prefix) and (recursive or "/" not in f[len(prefix):]):
                items.append((f, False))
        headers = {"X-Repo-Commit": commit.sha}
        if self.tree_page_size:
            start = int(req.q("cursor") or 0)
            page = items[start : start + self.tree_page_size]
            if start + self.tree_page_size < len(items):
                query = "&".join(
                    f"{k}={quote(v[-1], safe='')}" for k, v in req.query.items() if k != "cursor" and v
                )
                nxt = f"{self.endpoint}{req.path}?{query + '&' if query else ''}cursor={start + self.tree_page_size}"
                headers["Link"] = f'<{nxt}>; rel="next"'
            items = page
        return _json_response([self._tree_entry(repo, commit, p, d, expand) for p, d in items], headers=headers)

    def _api_paths_info(self, req: _Req, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._find_repo(req, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        ctype = req.headers.get("content-type", "")
        if "json" in ctype:
            payload = req.json()
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(req.body.decode("utf-8", "replace"), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = (form.get("expand", ["false"])[-1]).lower() in ("1", "true")
        dirs = self._dirs(commit.files)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(self._tree_entry(repo, commit, p, False, expand))
            elif p in dirs:
                out.append(self._tree_entry(repo, commit, p, True, expand))
        return _json_response(out)

    def _writable_branch(self, repo: _Repo, revision: str, *, create_pr: bool) -> str:
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/"):]
        if revision.startswith("refs/pr/"):
            num = revision[len("refs/pr/"):]
            if num.isdigit() and int(num) in repo.pulls:
                return revision
            raise _HttpError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")
        if revision in repo.branches:
            return revision
        if revision in repo.tags or revision in repo.commits or _SHORT_SHA_RE.match(revision):
            if create_pr:
                return revision
            raise _HttpError(400, f"Revision {revision} is not a branch: you can only commit to a branch")
        if self.auto_create_branches and not create_pr:
            repo.branches[revision] = repo.branches["main"]
            return revision
        raise _HttpError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")

    def _api_preupload(self, req: _Req, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._find_repo(req, repo_type, repo_id, write=True)
        create_pr = req.qbool("create_pr")
        branch = self._writable_branch(repo, revision, create_pr=create_pr)
        commit = self._resolve(repo, branch)
        payload = req.json()
        files = payload.get("files")
        if not isinstance(files, list):
            raise _HttpError(400, "Invalid preupload payload: 'files' must be a list")
        out = []
        for f in files:
            path = _check_path(f.get("path"))
            existing = commit.files.get(path)
            out.append(
                {
                    "path": path,
                    "uploadMode": "regular",  # never "lfs": keeps the client away from Xet/LFS storage
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        return _json_response({"files": out, "commitOid": commit.sha})

    def _api_commit(self, req: _Req, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._find_repo(req, repo_type, repo_id, write=True)
        create_pr = req.qbool("create_pr")
        branch = self._writable_branch(repo, revision, create_pr=create_pr)
        base = self._resolve(repo, branch)
        header: dict[str, Any] | None = None
        ops: list[tuple[str, dict]] = []
        for i, line in enumerate(req.body.splitlines()):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise _HttpError(400, f"Invalid NDJSON commit payload (line {i + 1})") from None
            if key == "header":
                header = value
            else:
                ops.append((key, value))
        if header is None or not str(header.get("summary") or "").strip():
            raise _HttpError(400, "Commit payload must start with a header holding a non-empty summary")
        parent = header.get("parentCommit")
        if parent and not create_pr and not base.sha.startswith(str(parent)):
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
        if parent and create_pr:
            base = self._resolve(repo, str(parent))
        files = dict(base.files)
        for key, value in ops:
            path = _check_path(str(value.get("path", "")).strip("/") if key == "deletedFolder" else value.get("path"))
            if key == "file":
                content = value.get("content", "")
                encoding = value.get("encoding", "utf-8")
                if encoding == "base64":
                    try:
                        files[path] = base64.b64decode(content, validate=True)
                    except ValueError:
                        raise _HttpError(400, f"Invalid base64 content for {path}") from None
                else:
                    files[path] = str(content).encode("utf-8")
            elif key == "deletedFile":
                if path not in files:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", error_code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise _HttpError(404, f"A folder with this name doesn't exist: {path}", error_code="EntryNotFound")
                for p in doomed:
                    del files[p]
            elif key == "lfsFile":
                raise _HttpError(
                    400, f"{path}: LFS/Xet uploads are not supported by the fake hub (preupload answers 'regular')"
                )
            else:
                raise _HttpError(400, f"Unknown commit operation: {key}")
        author = self.user
        new = self._new_commit(repo, base.sha, files, str(header["summary"]), str(header.get("description") or ""),
                               author)
        pr_url = None
        if create_pr:
            num = max(repo.pulls, default=0) + 1
            repo.pulls[num] = new.sha
            pr_url = f"{self._repo_url(repo)}/discussions/{num}"
        else:
            if branch.startswith("refs/pr/"):
                repo.pulls[int(branch[len("refs/pr/"):])] = new.sha
            else:
                repo.branches[branch] = new.sha
        return _json_response(
            {
                "success": True,
                "commitOid": new.sha,
                "commitUrl": f"{self._repo_url(repo)}/commit/{new.sha}",
                "commitMessage": new.title,
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _api_commits(self, req: _Req, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._find_repo(req, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        out = []
        for c in self._walk(repo, commit):
            item = {
                "id": c.sha,
                "title": c.title,
                "message": c.message,
                "authors": [{"user": c.author}],
                "date": c.date,
            }
            if "formatted" in req.query.get("expand[]", []):
                item["formatted"] = {"title": c.title, "message": c.message}
            out.append(item)
        return _json_response(out)

    def _api_refs(self, req: _Req, repo_type: str, repo_id: str) -> _Response:
        repo = self._find_repo(req, repo_type, repo_id)
        data: dict[str, Any] = {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo.branches.items()],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo.tags.items()],
            "converts": [],
        }
        if req.qbool("include_prs"):
            data["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s} for n, s in repo.pulls.items()
            ]
        return _json_response(data)

    def _api_branch(self, req: _Req, repo_type: str, repo_id: str, branch: str) -> _Response:
        repo = self._find_repo(req, repo_type, repo_id, write=True)
        if req.method == "DELETE":
            if branch not in repo.branches:
                raise _HttpError(404, f"Invalid rev id: {branch}", error_code="RevisionNotFound")
            if branch == "main":
                raise _HttpError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return _json_response({})
        if branch.startswith("refs/") or not re.match(r"^[A-Za-z0-9._/-]+$", branch):
            raise _HttpError(400, f"Invalid branch name: {branch}")
        if branch in repo.branches:
            raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
        starting = req.json().get("startingPoint")
        repo.branches[branch] = self._resolve(repo, starting or "main").sha
        return _json_response({})

    def _api_tag(self, req: _Req, repo_type: str, repo_id: str, name: str) -> _Response:
        repo = self._find_repo(req, repo_type, repo_id, write=True)
        if req.method == "DELETE":
            if name not in repo.tags:
                raise _HttpError(404, f"Invalid rev id: {name}", error_code="RevisionNotFound")
            del repo.tags[name]
            return _json_response({})
        tag = req.json().get("tag")
        if not isinstance(tag, str) or not tag:
            raise _HttpError(400, "Missing tag name")
        if tag in repo.tags:
            raise _HttpError(409, f"Reference already exists: refs/tags/{tag}")
        repo.tags[tag] = self._resolve(repo, name).sha
        return _json_response({})

    def _api_settings(self, req: _Req, repo_type: str, repo_id: str) -> _Response:
        repo = self._find_repo(req, repo_type, repo_id, write=True)
        payload = req.json()
        if "visibility" in payload:
            repo.private = payload["visibility"] != "public"
        if "private" in payload:
            repo.private = bool(payload["private"])
        if "gated" in payload:
            repo.gated = payload["gated"]
        return _json_response({})

    # ---- downloads

    def _resolve_file(self, req: _Req, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        with self._lock:
            repo = self._find_repo(req, repo_type, repo_id)
            commit = self._resolve(repo, revision)
            if path not in commit.files:
                raise _HttpError(404, "Entry not found", error_code="EntryNotFound",
                                 headers={"X-Repo-Commit": commit.sha})
            data = commit.files[path]
            meta = self._file_meta(commit, path)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{meta["etag"]}"',
            "X-Repo-Commit": commit.sha,
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if meta["lfs"] is not None:
            headers["X-Linked-Etag"] = f'"{meta["etag"]}"'
            headers["X-Linked-Size"] = str(meta["size"])
        rng = req.headers.get("range")
        if rng:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            total = len(data)
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
                else:
                    start, end = max(total - int(m.group(2)), 0), total - 1
                if start < total and start <= end:
                    headers["Content-Range"] = f"bytes {start}-{end}/{total}"
                    return _Response(206, data[start : end + 1], headers)
            headers["Content-Range"] = f"bytes */{total}"
            return _Response(416, b"", headers)
        return _Response(200, data, headers)


# --------------------------------------------------------------------------------------------- http.server glue


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True  # request threads never block interpreter exit / server shutdown
    allow_reuse_address = True
    request_queue_size = 64
    hub: HubServer


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no idle keep-alive sockets outlive a test's server.
    protocol_version = "HTTP/1.0"
    server_version = "FakeHub/1.0"
    timeout = 30  # seconds; bounds reads of a stalled client
    server: _ThreadingServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        raw_path, _, query_string = self.path.partition("?")
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = RequestRecord(method, raw_path, parse_qs(query_string, keep_blank_values=True), headers)
        with hub._lock:
            hub.requests.append(record)
        try:
            body = self._read_body()
            segments = [unquote(s) for s in raw_path.split("/") if s]
            req = _Req(method, raw_path, segments, record.query, headers, body)
            resp = hub._handle(req)
        except _HttpError as err:
            resp = _error_response(err)
        except Exception as exc:  # a bug in the fake hub: answer 500 and remember it
            with hub._lock:
                hub.errors.append(traceback.format_exc())
            resp = _error_response(_HttpError(500, f"Internal fake-hub error: {exc!r}"))
        record.status = resp.status
        try:
            self.send_response(resp.status)
            for k, v in resp.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(resp.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if method != "HEAD" and resp.body:
                self.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # client went away


# --------------------------------------------------------------------------------------------- client env


@dataclasses.dataclass
class HubEnv:
    """What ``hub_env`` set up (all paths live under ``home``)."""

    endpoint: str
    home: Path  # HF_HOME
    hub_cache: Path  # HF_HUB_CACHE (where snapshot_download stores repos)
    token: str | None


_ENV_UNSET = ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HUGGINGFACE_CO_STAGING",
              "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_HUB_ENABLE_HF_TRANSFER")


@contextlib.contextmanager
def hub_env(
    endpoint: str,
    home: str | os.PathLike,
    *,
    token: str | None = DUMMY_TOKEN,
    offline: bool = False,
    implicit_token: bool = True,
) -> Iterator[HubEnv]:
    """Point ``huggingface_hub`` at ``endpoint`` with an isolated HF_HOME, restoring everything on exit.

    Sets environment variables (for code that imports huggingface_hub later, and subprocesses) AND patches
    the already-imported module constants (huggingface_hub reads its env vars once, at import):

    * env: ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``,
      ``HF_TOKEN_PATH``, ``HF_TOKEN`` (dummy; removed if ``token=None``), ``HF_HUB_OFFLINE``,
      ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_UPDATE_CHECK=1``, ``NO_PROXY``/``no_proxy`` += loopback;
      unsets ``HUGGING_FACE_HUB_TOKEN``, ``HF_OIDC_*``, ``HUGGINGFACE_CO_STAGING``, ``TRANSFORMERS_OFFLINE``...
    * ``huggingface_hub.constants``: ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``,
      ``HF_HOME``, ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_ASSETS_CACHE``,
      ``HUGGINGFACE_ASSETS_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN_PATH``, ``HF_STORED_TOKENS_PATH``,
      ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_TELEMETRY``, ``HF_HUB_DISABLE_IMPLICIT_TOKEN`` (``not
      implicit_token``: by default the dummy HF_TOKEN is sent on every call, as a logged-in user's would be),
      ``HF_HUB_DISABLE_UPDATE_CHECK``;
    * ``huggingface_hub.hf_api.api.endpoint`` (the module-level HfApi behind ``huggingface_hub.upload_file``,
      ``create_repo``... and ``ModelCard.push_to_hub``). Only public names are patched: mergetool calls
      ``snapshot_download``/``HfApi``, which read ``constants`` at call time;
    * closes the shared httpx client (``huggingface_hub.close_session``) on enter and exit so no pooled connection or
      proxy setting leaks across tests.

    The user's real token file is never read: HF_TOKEN_PATH points into ``home``.
    """
    home = Path(home)
    hub_cache = home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    endpoint = endpoint.rstrip("/")

    env_new: dict[str, str | None] = {k: None for k in _ENV_UNSET}
    no_proxy = ",".join(
        x for x in [os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), "127.0.0.1,localhost"] if x
    )
    env_new.update(
        {
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(hub_cache),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_TOKEN": token,
            "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": None if implicit_token else "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
    )
    env_old = {k: os.environ.get(k) for k in env_new}
    patches: list[tuple[Any, str, Any]] = []  # (object, attribute, old value)

    def _patch(obj: Any, name: str, value: Any) -> None:
        if hasattr(obj, name):
            patches.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

    try:
        for k, v in env_new.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            import huggingface_hub.constants as C
        except ImportError:  # pragma: no cover - client not installed
            C = None
        if C is not None:
            from urllib.parse import urlsplit

            import huggingface_hub

            _patch(C, "ENDPOINT", endpoint)
            _patch(C, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
            _patch(C, "HF_URL_HOSTS", frozenset(set(getattr(C, "HF_URL_HOSTS", ())) | {urlsplit(endpoint).hostname}))
            _patch(C, "HF_HOME", str(home))
            _patch(C, "HF_HUB_CACHE", str(hub_cache))
            _patch(C, "HUGGINGFACE_HUB_CACHE", str(hub_cache))
            _patch(C, "HF_ASSETS_CACHE", str(home / "assets"))
            _patch(C, "HUGGINGFACE_ASSETS_CACHE", str(home / "assets"))
            _patch(C, "HF_XET_CACHE", str(home / "xet"))
            _patch(C, "HF_TOKEN_PATH", str(home / "token"))
            _patch(C, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
            _patch(C, "HF_HUB_OFFLINE", bool(offline))
            _patch(C, "HF_HUB_DISABLE_TELEMETRY", True)
            _patch(C, "HF_HUB_DISABLE_IMPLICIT_TOKEN", not implicit_token)
            _patch(C, "HF_HUB_DISABLE_UPDATE_CHECK", True)
            import huggingface_hub.hf_api as hf_api_mod

            _patch(hf_api_mod.api, "endpoint", endpoint)
            huggingface_hub.close_session()
        yield HubEnv(endpoint=endpoint, home=home, hub_cache=hub_cache, token=token)
    finally:
        for obj, name, old in reversed(patches):
            setattr(obj, name, old)
        for k, v in env_old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if patches:
            import huggingface_hub

            huggingface_hub.close_session()


@contextlib.contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """Toggle huggingface_hub offline mode at runtime (``HF_HUB_OFFLINE`` is only read at import).

    Patches ``huggingface_hub.constants.HF_HUB_OFFLINE`` (read by ``constants.is_offline_mode()``, which the
    client's HTTP request hook checks before every request, raising ``OfflineModeIsEnabled``) and the
    ``HF_HUB_OFFLINE`` env var; both are restored on exit.
    """
    import huggingface_hub.constants as C

    old_const, old_env = C.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    C.HF_HUB_OFFLINE = offline
    os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
    try:
        yield
    finally:
        C.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


# --------------------------------------------------------------------------------------------- pytest fixtures

try:
    import pytest
except ImportError:  # pragma: no cover - module usable without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def _check_no_server_errors(server: HubServer) -> None:
        if server.errors:
            pytest.fail("fake hub server had internal errors:\n" + "\n".join(server.errors), pytrace=False)

    @pytest.fixture
    def hub_server_raw():
        """A running ``HubServer`` with NO client env patching (pass ``endpoint=`` yourself)."""
        server = HubServer().start()
        try:
            yield server
        finally:
            server.stop()
        _check_no_server_errors(server)

    @pytest.fixture
    def hub_server(tmp_path_factory):
        """A running ``HubServer`` with huggingface_hub pointed at it (see ``hub_env``).

        Yields the server; ``hub_server.env`` is the ``HubEnv`` (``.home``, ``.hub_cache``, ``.token``).
        HF_HOME is a fresh temp dir per test; everything is restored and the server stopped on teardown,
        even if the test fails.
        """
        server = HubServer().start()
        try:
            with hub_env(server.endpoint, tmp_path_factory.mktemp("hf_home")) as env:
                server.env = env  # type: ignore[attr-defined]
                yield server
        finally:
            server.stop()
        _check_no_server_errors(server)
