"""An offline stand-in for the Hugging Face Hub, for tests that exercise the real `huggingface_hub` client.

The Hub cannot be reached from tests, yet `from_pretrained("org/repo")`, `push_to_hub(...)` and the training script's
`create_repo` + `upload_folder` must be tested with the real client. `LocalHubServer` is a small threaded HTTP
server on 127.0.0.1 that speaks the part of the Hub's HTTP protocol those calls use (read from huggingface_hub 2.4's
`file_download.py`, `_snapshot_download.py`, `hf_api.py`, `_commit_api.py`, `_upload_pipeline.py`,
`utils/_http.py`):

========================================================  ============================================================
route                                                     used by
========================================================  ============================================================
``POST /api/repos/create``                                `create_repo` (409 + ``url`` when the repo exists)
``GET  /api/models/{repo_id}[/revision/{rev}]``           `model_info`, `repo_info` (first call of `snapshot_download`)
``GET  /api/models/{repo_id}/tree/{rev}[/{path}]``        `list_repo_tree`, `list_repo_files`, `snapshot_download`
``HEAD|GET /{repo_id}/resolve/{rev}/{path}``              `hf_hub_download` (metadata HEAD, then the download GET)
``POST /api/models/{repo_id}/preupload/{rev}``            `upload_folder`, `create_commit` (asks regular vs LFS)
``POST /api/models/{repo_id}/commit/{rev}``               `upload_folder`, `create_commit` (NDJSON operations)
``POST /api/validate-yaml``                               `create_commit` when a ``README.md`` is committed
========================================================  ============================================================

Two choices keep the client on its plain-HTTP paths:

* no Xet: resolve responses never carry ``X-Xet-Hash`` and the tree never carries ``xetHash``, so downloads use a
  plain GET of ``/resolve``;
* no LFS: the preupload answer is ``"uploadMode": "regular"`` for every file (the client accepts it for binary
  ``.safetensors`` files too), so file bytes travel inline, base64-encoded, in the commit NDJSON. Neither the LFS batch
  API nor Xet storage is needed. ``lfsFile`` commit lines are accepted only for content the server already stores.

Only model repos and the branch ``main`` are served; every commit gets a new 40-hex commit id, and every past commit
stays readable by its id. Storage is a folder: ``root/<namespace>/<name>/`` holds the current files of ``main`` (see
`LocalHubServer.repo_path`) and ``root/.objects/<sha256>`` the content of every file ever committed.

The client reads its endpoint at import time. In another process, pass ``env=server.env()`` (``HF_ENDPOINT`` and
``HF_HUB_OFFLINE=0``). In this process, wrap the client calls in `hub_endpoint(server.url)`, which patches the
module-level constants of huggingface_hub 2.4 (and turns off the offline mode that ``tests/conftest.py`` sets), then
restores them::

    with LocalHubServer() as server, hub_endpoint(server.url):
        model.push_to_hub("org/tiny", token="hf_test")
        again = type(model).from_pretrained("org/tiny", cache_dir=tmp_path)

It is test-only code: it lives in ``tests/`` (not in the package) and is imported as ``hub_server``, which
``tests/conftest.py`` makes importable for the tests in ``tests/`` and ``examples/``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubRequest", "LocalHubServer", "hub_endpoint"]

DEFAULT_BRANCH = "main"
# Modules that copy `huggingface_hub.constants.HF_HUB_OFFLINE` at import time (`from ... import HF_HUB_OFFLINE`) and
# use it on a Hub code path this server serves: LoRA loading by repo id, and the telemetry part of the user agent.
_OFFLINE_FLAG_COPIES = ("diffusers.loaders.lora_base", "diffusers.utils.hub_utils")
# Hub rule for a namespace or repo name: starts with a letter or digit, then letters, digits, '.', '_', '-'.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_COMMIT_OID_PATTERN = re.compile(r"[0-9a-f]{40}")
# Folders that `upload_folder` never uploads; `add_repo` skips them too.
_SKIPPED_FOLDERS = (".git", ".cache/huggingface")


class HubRequest(NamedTuple):
    """One request received by `LocalHubServer`.

    Attributes:
        method: HTTP method, e.g. ``"HEAD"``.
        path: URL path with percent-escapes decoded and without the query, e.g. ``"/org/repo/resolve/main/a.json"``.
        token: the bearer token sent in ``Authorization``, or ``None`` when the request had none.
    """

    method: str
    path: str
    token: str | None


@dataclass(frozen=True)
class _FileEntry:
    """A file in a commit: its git blob id (what the Hub reports as ``oid``/``ETag``), content sha256 and size."""

    git_oid: str
    sha256: str
    size: int


@dataclass
class _Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    date: datetime
    files: dict[str, _FileEntry]


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: datetime
    head: str
    commits: dict[str, _Commit] = field(default_factory=dict)


class _HubError(Exception):
    """An error answered the way the Hub answers it: status, ``X-Error-Code`` and a message (header and JSON)."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}


def _git_blob_oid(content: bytes) -> str:
    """Git's blob id (``git hash-object``): sha1 of ``b"blob <size>\\0"`` followed by the content."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


def _iso(date: datetime) -> str:
    """Hub date format, e.g. ``2024-01-31T12:00:00.000000Z``."""
    return date.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_repo_id(repo_id: str, argument: str = "repo_id") -> str:
    """Return `repo_id` if it is ``"<namespace>/<name>"`` with Hub-valid parts, else raise a ValueError."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(_NAME_PATTERN.fullmatch(part) for part in parts) or "--" in repo_id:
        raise ValueError(
            f"`{argument}` must look like '<namespace>/<name>' (letters, digits, '.', '_', '-'; no '--'), "
            f"got {repo_id!r}."
        )
    return repo_id


def _check_path_in_repo(path: str) -> str:
    """Return a normalized repo file path, or raise a 400 `_HubError` for an unsafe or malformed one."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise _HubError(400, f"Invalid path in repo: {path!r} (must be a non-empty relative POSIX path).")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts) or parts[0] == ".git":
        raise _HubError(400, f"Invalid path in repo: {path!r} (empty, '.', '..' or '.git' segment).")
    return path


class LocalHubServer:
    """A threaded HTTP server on 127.0.0.1 that serves model repos the way the Hugging Face Hub does.

    Use it as a context manager (or call `start` / `stop`), then point the client at `url` with `hub_endpoint` (same
    process) or `env` (subprocess). See the module docstring for the routes.

    Args:
        root: folder for the repos. Defaults to a temporary folder removed by `stop`; a given folder is kept.
        require_token: when True, every request without ``Authorization: Bearer <token>`` gets HTTP 401. Any token
            is accepted. (A repo's ``private`` flag is stored and reported by model info, not enforced.)
        user: namespace given to ``create_repo("name")`` calls that name no namespace (the token's user on the Hub).
        port: port to listen on; 0 picks a free one.

    Attributes:
        requests: every request received, as `HubRequest` (method, decoded path, token), in arrival order.
        errors: descriptions of exceptions raised while handling requests (answered with HTTP 500). A test that ends
            with a non-empty list found a server bug.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        require_token: bool = False,
        user: str = "local-user",
        port: int = 0,
    ):
        if not _NAME_PATTERN.fullmatch(user):
            raise ValueError(f"`user` must be a valid Hub namespace, got {user!r}.")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"`port` must be in [0, 65535], got {port}.")
        self.require_token = require_token
        self.user = user
        self.requests: list[HubRequest] = []
        self.errors: list[str] = []
        self._given_root = Path(root) if root is not None else None
        self._port = int(port)
        self._root: Path | None = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.RLock()
        self._commit_counter = itertools.count()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHubServer:
        """Bind 127.0.0.1 and serve requests in a background thread. Returns `self`."""
        if self._httpd is not None:
            raise RuntimeError("LocalHubServer is already running.")
        if self._given_root is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="local-hub-")
            self._root = Path(self._tmpdir.name)
        else:
            self._root = self._given_root
            self._root.mkdir(parents=True, exist_ok=True)
        self._httpd = _HubHTTPServer(("127.0.0.1", self._port), _HubRequestHandler)
        self._httpd.hub = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. A temporary root is removed with its repos; a given `root` is kept."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
            self._root = None
            self._repos.clear()

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:53211`` (no trailing slash)."""
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not running: call start() or use it as a context manager.")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def root(self) -> Path:
        """Folder holding the repos (``root/<namespace>/<name>/``) and the content store (``root/.objects``)."""
        if self._root is None:
            raise RuntimeError("LocalHubServer is not running: call start() or use it as a context manager.")
        return self._root

    def env(self) -> dict[str, str]:
        """Environment variables that point a huggingface_hub client in a *new process* at this server.

        Merge them over the current environment: ``subprocess.run(..., env={**os.environ, **server.env()})``. They
        turn the offline mode off and keep loopback traffic away from any configured HTTP proxy.
        """
        existing = os.environ.get("NO_PROXY") or os.environ.get("no_proxy")
        no_proxy = f"{existing},127.0.0.1,localhost" if existing else "127.0.0.1,localhost"
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    def patch_client(self, **kwargs: Any) -> contextlib.AbstractContextManager[str]:
        """`hub_endpoint(self.url, **kwargs)`: point the huggingface_hub client of *this process* at the server."""
        return hub_endpoint(self.url, **kwargs)

    # ------------------------------------------------------------------ test conveniences

    def add_repo(
        self,
        repo_id: str,
        folder: str | os.PathLike | None = None,
        *,
        private: bool = False,
        commit_message: str = "Add files",
    ) -> str:
        """Create `repo_id` if needed and commit every file under `folder` to ``main``. Returns the new head commit id.

        Files under ``.git/`` and ``.cache/huggingface/`` are skipped, as `upload_folder` skips them. Files already in
        the repo and absent from `folder` are kept. With `folder=None`, only the (empty) repo is created.
        """
        _check_repo_id(repo_id)
        operations: list[tuple[str, str, bytes | None]] = []
        if folder is not None:
            folder = Path(folder)
            if not folder.is_dir():
                raise ValueError(f"`folder` must be an existing directory, got {str(folder)!r}.")
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                relative = path.relative_to(folder).as_posix()
                if any(relative == skip or relative.startswith(skip + "/") for skip in _SKIPPED_FOLDERS):
                    continue
                operations.append(("file", relative, path.read_bytes()))
        with self._lock:
            if repo_id not in self._repos:
                self._create_repo(repo_id, private=private)
            if not operations:
                return self._repos[repo_id].head
            try:
                return self._commit(repo_id, operations, summary=commit_message).oid
            except _HubError as error:  # e.g. a file name the Hub would refuse
                raise ValueError(f"Cannot add {str(folder)!r} to {repo_id!r}: {error.message}") from error

    def repo_path(self, repo_id: str) -> Path:
        """Local folder with the current files of ``main`` of `repo_id` (read it, do not write it)."""
        self.head(repo_id)  # raises for an unknown repo
        return self.root.joinpath(*repo_id.split("/"))

    def head(self, repo_id: str) -> str:
        """Commit id of ``main`` of `repo_id`. Raises a ValueError for a repo this server does not hold."""
        _check_repo_id(repo_id)
        with self._lock:
            if repo_id not in self._repos:
                raise ValueError(f"`repo_id` {repo_id!r} is not a repo of this LocalHubServer.")
            return self._repos[repo_id].head

    # ------------------------------------------------------------------ repository state (called under the lock)

    def _get_repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise _HubError(404, f"Repository not found: {repo_id}", error_code="RepoNotFound")
        return repo

    def _resolve(self, repo_id: str, revision: str) -> tuple[_Repo, _Commit]:
        """The repo and the commit that `revision` (``main`` or a full commit id) points to."""
        repo = self._get_repo(repo_id)
        oid = repo.head if revision == DEFAULT_BRANCH else revision
        commit = repo.commits.get(oid)
        if commit is None:
            raise _HubError(
                404,
                f"Invalid rev id: {revision} (LocalHubServer serves '{DEFAULT_BRANCH}' and full commit ids).",
                error_code="RevisionNotFound",
            )
        return repo, commit

    def _create_repo(self, repo_id: str, private: bool) -> _Repo:
        now = datetime.now(timezone.utc)
        repo = _Repo(repo_id=repo_id, private=private, created_at=now, head="")
        self._repos[repo_id] = repo
        self.root.joinpath(*repo_id.split("/")).mkdir(parents=True, exist_ok=True)
        initial = self._new_commit(repo, parent=None, summary="initial commit", description="", files={})
        repo.head = initial.oid
        return repo

    def _new_commit(
        self, repo: _Repo, parent: str | None, summary: str, description: str, files: dict[str, _FileEntry]
    ) -> _Commit:
        listing = "\n".join(f"{path} {entry.git_oid}" for path, entry in sorted(files.items()))
        seed = f"{repo.repo_id}\n{parent}\n{summary}\n{next(self._commit_counter)}\n{listing}".encode()
        commit = _Commit(
            oid=hashlib.sha1(seed).hexdigest(),
            parent=parent,
            summary=summary,
            description=description,
            date=datetime.now(timezone.utc),
            files=files,
        )
        repo.commits[commit.oid] = commit
        return commit

    def _object_path(self, sha256: str) -> Path:
        return self.root / ".objects" / sha256

    def _store(self, content: bytes) -> _FileEntry:
        """Write `content` to the content store (once) and describe it."""
        entry = _FileEntry(
            git_oid=_git_blob_oid(content), sha256=hashlib.sha256(content).hexdigest(), size=len(content)
        )
        target = self._object_path(entry.sha256)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.{threading.get_ident()}.partial")
            partial.write_bytes(content)
            os.replace(partial, target)
        return entry

    def _find_object(self, sha256: str) -> _FileEntry | None:
        """The entry of stored content with this sha256, if any commit of any repo holds it."""
        for repo in self._repos.values():
            for commit in repo.commits.values():
                for entry in commit.files.values():
                    if entry.sha256 == sha256:
                        return entry
        return None

    def _commit(
        self,
        repo_id: str,
        operations: list[tuple[str, str, Any]],
        summary: str,
        description: str = "",
        parent_commit: str | None = None,
    ) -> _Commit:
        """Apply `operations` on top of ``main`` and move ``main`` to the new commit.

        Operations are ``("file", path, bytes)``, ``("lfsFile", path, sha256)``, ``("deletedFile", path, None)`` and
        ``("deletedFolder", path, None)``. The working tree at `repo_path` is updated to match.
        """
        repo = self._get_repo(repo_id)
        if parent_commit is not None and parent_commit != repo.head:
            raise _HubError(
                412, f"A commit has happened since {parent_commit}: '{DEFAULT_BRANCH}' is now at {repo.head}."
            )
        files = dict(repo.commits[repo.head].files)
        for kind, path, payload in operations:
            if kind == "deletedFolder" and isinstance(path, str):
                path = path.strip("/")
            path = _check_path_in_repo(path)
            if kind == "file":
                files[path] = self._store(payload)
            elif kind == "lfsFile":
                entry = self._find_object(payload)
                if entry is None:
                    raise _HubError(
                        422,
                        f"LFS object {payload} for '{path}' is not stored. LocalHubServer answers preupload with "
                        "uploadMode 'regular' and has no LFS upload endpoint.",
                    )
                files[path] = entry
            elif kind == "deletedFile":
                if path not in files:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", error_code="EntryNotFound")
                del files[path]
            elif kind == "deletedFolder":
                inside = [name for name in files if name.startswith(path + "/")]
                if not inside:
                    raise _HubError(404, f"A folder with this name doesn't exist: {path}", error_code="EntryNotFound")
                for name in inside:
                    del files[name]
            else:  # the handler only builds the kinds above
                raise _HubError(400, f"Unknown commit operation {kind!r}.")
        folders = {str(parent) for name in files for parent in PurePosixPath(name).parents if str(parent) != "."}
        if clashes := sorted(folders & files.keys()):
            raise _HubError(400, f"Path conflict: {clashes[0]!r} would be both a file and a folder.")
        commit = self._new_commit(repo, parent=repo.head, summary=summary, description=description, files=files)
        self._write_working_tree(repo_id, old=repo.commits[repo.head].files, new=files)
        repo.head = commit.oid
        return commit

    def _write_working_tree(self, repo_id: str, old: dict[str, _FileEntry], new: dict[str, _FileEntry]) -> None:
        folder = self.root.joinpath(*repo_id.split("/"))
        for path in old.keys() - new.keys():
            target = folder.joinpath(*path.split("/"))
            target.unlink(missing_ok=True)
            for parent in target.parents:
                if parent == folder or any(parent.iterdir()):
                    break
                parent.rmdir()
        for path, entry in new.items():
            if old.get(path) == entry:
                continue
            target = folder.joinpath(*path.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._object_path(entry.sha256), target)

    # ------------------------------------------------------------------ JSON views

    def _model_info(self, repo: _Repo, commit: _Commit, with_blobs: bool) -> dict[str, Any]:
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
            siblings.append(sibling)
        namespace = repo.repo_id.split("/")[0]
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": namespace,
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        }

    @staticmethod
    def _tree(commit: _Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
        """Entries under `path` ("" for the root), as the Hub's ``/tree`` endpoint lists them."""
        prefix = path + "/" if path else ""
        if path and path in commit.files:
            raise _HubError(400, f"'{path}' is a file, not a folder.")
        below = {name: entry for name, entry in commit.files.items() if name.startswith(prefix)}
        if path and not below:
            raise _HubError(404, f"Path not found in repo: {path}", error_code="EntryNotFound")
        folders: dict[str, list[str]] = {}
        entries: list[dict[str, Any]] = []
        for name, entry in sorted(below.items()):
            relative_parts = name[len(prefix) :].split("/")
            for depth in range(1, len(relative_parts)):
                folder = prefix + "/".join(relative_parts[:depth])
                folders.setdefault(folder, []).append(f"{name} {entry.git_oid}")
            if recursive or len(relative_parts) == 1:
                entries.append({"type": "file", "oid": entry.git_oid, "size": entry.size, "path": name})
        for folder, listing in sorted(folders.items()):
            if recursive or "/" not in folder[len(prefix) :]:
                oid = hashlib.sha1("\n".join(listing).encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
        return sorted(entries, key=lambda item: (item["type"] != "directory", item["path"]))


class _HubHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    hub: LocalHubServer


class _HubRequestHandler(http.server.BaseHTTPRequestHandler):
    """Translates HTTP requests into `LocalHubServer` state reads and commits (one thread per connection)."""

    server: _HubHTTPServer
    # Bounds a read on a stuck client connection; the server never waits longer than this on one socket.
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
        """Requests are recorded in `LocalHubServer.requests`, not printed."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # ------------------------------------------------------------------ plumbing

    @property
    def hub(self) -> LocalHubServer:
        return self.server.hub

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        token = self._bearer_token()
        self.hub.requests.append(HubRequest(self.command, unquote(split.path), token))
        try:
            if self.hub.require_token and token is None:
                raise _HubError(
                    401,
                    "Unauthorized: this LocalHubServer has require_token=True and the request carried no "
                    "'Authorization: Bearer <token>' header.",
                )
            self._route(split.path, parse_qs(split.query))
        except _HubError as error:
            self._send_error(error)
        except Exception as error:  # a server bug: answer 500 and keep it for the test to see
            self.hub.errors.append(f"{self.command} {self.path}: {type(error).__name__}: {error}")
            self._send_error(_HubError(500, f"LocalHubServer internal error: {type(error).__name__}: {error}"))

    def _bearer_token(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding"):
                raise _HubError(411, "LocalHubServer needs a Content-Length request header (no chunked bodies).")
            return b""
        return self.rfile.read(int(length))

    def _read_json(self) -> Any:
        body = self._read_body()
        try:
            return json.loads(body or b"null")
        except json.JSONDecodeError as error:
            raise _HubError(400, f"Request body is not valid JSON: {error}") from error

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8", headers)

    def _send_error(self, error: _HubError) -> None:
        headers = dict(error.headers)
        # One printable latin-1 line: the client copies X-Error-Message into its exception message.
        headers["X-Error-Message"] = " ".join(error.message.split()).encode("latin-1", "replace").decode("latin-1")
        if error.error_code is not None:
            headers["X-Error-Code"] = error.error_code
        self._send_json({"error": error.message}, status=error.status, headers=headers)

    # ------------------------------------------------------------------ routes

    def _route(self, raw_path: str, query: dict[str, list[str]]) -> None:
        segments = raw_path.split("/")[1:]  # still percent-encoded: a '%2F' stays inside its segment
        method = self.command
        if segments[:1] == ["api"]:
            rest = segments[1:]
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if len(rest) >= 3 and rest[0] in ("datasets", "spaces", "kernels"):
                raise _HubError(404, f"LocalHubServer only serves model repos, not {rest[0]}.")
            if len(rest) >= 3 and rest[0] == "models":
                repo_id = f"{unquote(rest[1])}/{unquote(rest[2])}"
                action, arguments = (rest[3], rest[4:]) if len(rest) > 3 else (None, [])
                if method == "GET" and action is None:
                    return self._model_info(repo_id, DEFAULT_BRANCH, query)
                if method == "GET" and action == "revision" and len(arguments) == 1:
                    return self._model_info(repo_id, unquote(arguments[0]), query)
                if method == "GET" and action == "tree" and arguments:
                    path = "/".join(unquote(part) for part in arguments[1:]).strip("/")
                    return self._list_tree(repo_id, unquote(arguments[0]), path, query)
                if method == "POST" and action == "preupload" and len(arguments) == 1:
                    return self._preupload(repo_id, unquote(arguments[0]), query)
                if method == "POST" and action == "commit" and len(arguments) == 1:
                    return self._create_commit(repo_id, unquote(arguments[0]), query)
        elif len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            if segments[0] in ("datasets", "spaces", "kernels"):
                raise _HubError(404, f"LocalHubServer only serves model repos, not {segments[0]}.")
            repo_id = f"{unquote(segments[0])}/{unquote(segments[1])}"
            return self._resolve_file(repo_id, unquote(segments[3]), "/".join(unquote(s) for s in segments[4:]))
        raise _HubError(404, f"LocalHubServer does not implement {method} {unquote(raw_path)}.")

    def _create_repo(self) -> None:
        payload = self._read_json()
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            raise _HubError(400, "create repo: the JSON body must be an object with a string 'name'.")
        if payload.get("type") not in (None, "model"):
            raise _HubError(400, f"LocalHubServer only creates model repos, not type {payload['type']!r}.")
        namespace = payload.get("organization") or self.hub.user
        repo_id = f"{namespace}/{payload['name']}"
        try:
            _check_repo_id(repo_id, argument="name")
        except ValueError as error:
            raise _HubError(400, str(error)) from error
        private = payload.get("visibility") == "private" or payload.get("private") is True
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub._repos:
                # The client reads 'url' from this 409 body too when exist_ok=True.
                return self._send_json({"error": "You already created this model repo", "url": url}, status=409)
            self.hub._create_repo(repo_id, private=private)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        import yaml  # a huggingface_hub dependency

        payload = self._read_json()
        content = payload.get("content") if isinstance(payload, dict) else None
        if not isinstance(content, str):
            raise _HubError(400, "validate-yaml: the JSON body must be an object with a string 'content'.")
        errors = []
        lines = content.splitlines()
        if lines and lines[0].strip() == "---":
            closing = next((i for i, line in enumerate(lines[1:], start=1) if line.strip() == "---"), None)
            if closing is None:
                errors.append({"message": "README.md metadata block opened with '---' is never closed."})
            else:
                try:
                    metadata = yaml.safe_load("\n".join(lines[1:closing]))
                except yaml.YAMLError as error:
                    errors.append({"message": f"Invalid YAML in README.md metadata: {error}"})
                else:
                    if metadata is not None and not isinstance(metadata, dict):
                        errors.append({"message": "README.md metadata must be a YAML mapping."})
        self._send_json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _model_info(self, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        with self.hub._lock:
            repo, commit = self.hub._resolve(repo_id, revision)
            info = self.hub._model_info(repo, commit, with_blobs=_is_true(query.get("blobs")))
        self._send_json(info)

    def _list_tree(self, repo_id: str, revision: str, path: str, query: dict[str, list[str]]) -> None:
        with self.hub._lock:
            _, commit = self.hub._resolve(repo_id, revision)
            entries = self.hub._tree(commit, path, recursive=_is_true(query.get("recursive")))
        self._send_json(entries)

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        with self.hub._lock:
            _, commit = self.hub._resolve(repo_id, revision)
            entry = commit.files.get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache the file's absence for this commit (`.no_exist`).
            raise _HubError(
                404, f"Entry not found: {path}", error_code="EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{entry.git_oid}"',
            "Accept-Ranges": "none",
            "Content-Disposition": f'inline; filename="{PurePosixPath(path).name}";',
        }
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(entry.size))
        self.end_headers()
        if self.command == "GET":
            with open(self.hub._object_path(entry.sha256), "rb") as source:
                shutil.copyfileobj(source, self.wfile)

    def _writable_revision(self, revision: str, query: dict[str, list[str]]) -> None:
        if _is_true(query.get("create_pr")):
            raise _HubError(400, "LocalHubServer does not support pull requests (create_pr=True).")
        if revision != DEFAULT_BRANCH:
            raise _HubError(
                400, f"LocalHubServer only accepts commits to branch '{DEFAULT_BRANCH}', got revision {revision!r}."
            )

    def _preupload(self, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        payload = self._read_json()
        self._writable_revision(revision, query)
        files = payload.get("files") if isinstance(payload, dict) else None
        if not isinstance(files, list) or not all(
            isinstance(item, dict) and isinstance(item.get("path"), str) for item in files
        ):
            raise _HubError(400, "preupload: the JSON body must hold 'files': a list of objects with a string 'path'.")
        with self.hub._lock:
            repo, commit = self.hub._resolve(repo_id, revision)
        answer = []
        for item in files:
            existing = commit.files.get(item["path"])
            # 'oid' (git blob id of the file already on the branch) lets the client skip unchanged files.
            answer.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": existing.git_oid if existing is not None else None,
                }
            )
        self._send_json({"files": answer, "commitOid": repo.head})

    def _create_commit(self, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        body = self._read_body()
        self._writable_revision(revision, query)
        header: dict[str, Any] | None = None
        operations: list[tuple[str, str, Any]] = []
        for number, line in enumerate(body.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                message = f"commit NDJSON line {number}: not a {{'key', 'value'}} object ({error})."
                raise _HubError(400, message) from error
            if key == "header":
                header = value
            elif key == "file":
                encoding = value.get("encoding", "utf-8")
                try:
                    content = (
                        base64.b64decode(value["content"], validate=True)
                        if encoding == "base64"
                        else value["content"].encode("utf-8")
                    )
                except (ValueError, KeyError, AttributeError) as error:
                    raise _HubError(400, f"commit NDJSON line {number}: bad file content ({error}).") from error
                operations.append(("file", value.get("path"), content))
            elif key == "lfsFile":
                operations.append(("lfsFile", value.get("path"), value.get("oid")))
            elif key in ("deletedFile", "deletedFolder"):
                operations.append((key, value.get("path"), None))
            else:
                raise _HubError(400, f"commit NDJSON line {number}: unknown key {key!r}.")
        if not isinstance(header, dict) or not header.get("summary"):
            raise _HubError(400, "commit NDJSON: missing 'header' line with a non-empty 'summary'.")
        with self.hub._lock:
            commit = self.hub._commit(
                repo_id,
                operations,
                summary=header["summary"],
                description=header.get("description") or "",
                parent_commit=header.get("parentCommit"),
            )
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}",
                "hookOutput": "",
            }
        )


def _is_true(values: list[str] | None) -> bool:
    """Whether a query parameter (as parsed by `parse_qs`) is set to a true value (``true``, ``True``, ``1``)."""
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


@contextlib.contextmanager
def hub_endpoint(url: str, *, timeout: float | None = 60.0, disable_xet: bool = False) -> Iterator[str]:
    """Point the huggingface_hub client of this process at `url`, online, and restore everything on exit.

    huggingface_hub 2.4 reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` once, at import. This patches what it computed:

    * ``huggingface_hub.constants.ENDPOINT`` (read by `HfApi()` at construction, `hf_hub_url`, repo cards),
      ``HUGGINGFACE_CO_URL_TEMPLATE`` (the ``/resolve`` URL of `hf_hub_download`) and ``HF_URL_HOSTS`` (hosts whose
      URLs parse as repo URLs);
    * ``huggingface_hub.hf_api.api.endpoint``: the module-level `HfApi` behind `create_repo`, `upload_folder`,
      `model_info`, `list_repo_files`, ... (also what diffusers imports);
    * ``huggingface_hub.constants.HF_HUB_OFFLINE`` -> False (the HTTP client refuses every request while it is True),
      and the copies that diffusers modules took at import (``diffusers.loaders.lora_base``,
      ``diffusers.utils.hub_utils``) when they are imported;
    * the shared HTTP client, replaced by one whose requests time out after `timeout` seconds (the default client
      waits forever), so a test against a broken server fails instead of hanging, and which ignores proxy settings
      for a loopback `url`. `timeout=None` keeps the client.

    Args:
        url: base URL of the Hub to use, e.g. `LocalHubServer.url`.
        timeout: per-request connect/read/write timeout in seconds for the client, or None to leave it alone.
        disable_xet: also set ``HF_HUB_DISABLE_XET``, so that `upload_folder` takes its single-commit path (as when
            ``hf_xet`` is not installed) instead of the streamed pipeline.

    Yields:
        The endpoint, without a trailing slash.

    Not thread-safe with other code that patches the same globals; nested uses restore in order.
    """
    if not isinstance(url, str) or not re.match(r"^https?://[^/]+", url):
        raise ValueError(f"`url` must be an http(s) URL such as 'http://127.0.0.1:8080', got {url!r}.")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"`timeout` must be positive or None, got {timeout}.")

    import httpx2
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    endpoint = url.rstrip("/")
    host = (urlsplit(endpoint).hostname or "").lower()
    saved_constants = {
        name: getattr(constants, name)
        for name in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_URL_HOSTS", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET")
    }
    saved_api_endpoint = hf_api.api.endpoint
    saved_flag_copies = {
        name: sys.modules[name].HF_HUB_OFFLINE
        for name in _OFFLINE_FLAG_COPIES
        if hasattr(sys.modules.get(name), "HF_HUB_OFFLINE")
    }
    saved_factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    # Loopback traffic must never be routed to an HTTP proxy configured in the environment.
    trust_env = host not in ("127.0.0.1", "localhost", "::1", "[::1]")

    def bounded_client() -> httpx2.Client:
        # huggingface_hub's default client (request hook, redirects followed) with a finite timeout.
        return httpx2.Client(
            event_hooks={"request": [_http.hf_request_event_hook]},
            follow_redirects=True,
            timeout=timeout,
            trust_env=trust_env,
        )

    try:
        constants.ENDPOINT = endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_URL_HOSTS = saved_constants["HF_URL_HOSTS"] | {host}
        constants.HF_HUB_OFFLINE = False
        if disable_xet:
            constants.HF_HUB_DISABLE_XET = True
        hf_api.api.endpoint = endpoint
        for name in saved_flag_copies:
            sys.modules[name].HF_HUB_OFFLINE = False
        if timeout is not None:
            _http.set_client_factory(bounded_client)
        yield endpoint
    finally:
        for name, value in saved_constants.items():
            setattr(constants, name, value)
        hf_api.api.endpoint = saved_api_endpoint
        for name in _OFFLINE_FLAG_COPIES:
            module = sys.modules.get(name)
            if hasattr(module, "HF_HUB_OFFLINE"):
                # Imported inside the block, the module copied the patched False: give it the original value.
                module.HF_HUB_OFFLINE = saved_flag_copies.get(name, saved_constants["HF_HUB_OFFLINE"])
        if timeout is not None:
            _http.set_client_factory(saved_factory)
        else:
            _http.close_session()  # drop pooled connections to a server that may be gone
