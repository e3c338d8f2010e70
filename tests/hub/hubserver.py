"""A small Hugging Face Hub-compatible HTTP server, for testing the real ``huggingface_hub`` client offline.

It implements only what ``create_repo``, ``create_branch``, ``upload_folder``/``create_commit`` (regular
files and the git-LFS batch API; no Xet), ``model_info``, ``list_repo_tree``, ``list_repo_refs``,
``list_repo_commits``, ``hf_hub_download`` and ``snapshot_download`` call -- with the headers and error
codes (``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``) the client maps to its
exceptions. Repos live in memory, each with branches and a commit history, so a commit sha, a branch
and a subfolder resolve to the right files.

No maintained package on PyPI serves these calls offline (``olah`` is a caching proxy in front of the
real Hub and accepts no uploads), hence this file.

>>> with HubServer() as hub:                                          # doctest: +SKIP
...     os.environ["HF_ENDPOINT"] = hub.url
...     HfApi(endpoint=hub.url).create_repo("org/name")

Uploads must not use Xet (the server has no CAS): set ``huggingface_hub.constants.HF_HUB_DISABLE_XET``
(tests do it with monkeypatch). Every request is recorded in :attr:`HubServer.requests`.

Fault modes, for testing what a client does with a misbehaving Hub (set them on a running server):

* :attr:`HubServer.body_faults` -- repo path -> function of the true bytes: a GET of that file serves what
  it returns (corrupt, truncated) while every header (ETag, X-Linked-Size, HEAD's Content-Length)
  still announces the true file;
* :attr:`HubServer.hang` -- ``"api"`` (``/api/...``) and/or ``"head"`` (``HEAD .../resolve/...``):
  such requests are read and never answered (until the server stops);
* :attr:`HubServer.trickle` -- repo path -> seconds between bytes: its GET body comes one byte at a time;
* :attr:`HubServer.redirect_loop` -- repo paths whose ``resolve`` URL redirects to itself, forever.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable
from typing import Any

__all__ = ["HubServer", "Request"]

MAX_BODY = 256 * 2**20  # refuse request bodies above this (bounded memory)
MAX_STALL_S = 60.0  # a hanging or trickling handler gives up after this long, even if the server is not stopped
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".npz", ".onnx")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
_MISSING = object()


def git_blob_oid(data: bytes) -> str:
    """Git's object id of a blob (what the Hub reports as a regular file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file standing for an LFS object in the git tree."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    """One file's content; ``lfs`` files are stored by sha256, as on the Hub."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """The git blob id: of the content, or of the LFS pointer for LFS files."""
        return git_blob_oid(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    files: dict[str, Blob]
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"))


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit sha -> the commit (``None`` if unknown)."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)

    def history(self, revision: str) -> list[Commit]:
        commit, out = self.resolve(revision), []
        while commit is not None and len(out) <= len(self.commits):
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


@dataclass(frozen=True)
class Request:
    """One request the server answered (for assertions: "the server saw no commit")."""

    method: str
    path: str
    status: int


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **body: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class HubServer:
    """An in-memory Hub on ``127.0.0.1`` at a free port; a context manager (stops on exit).

    :param tokens: accepted access tokens. A request carrying another token is refused (401); private
        repos need one of them to be read; writes need one when ``tokens`` is not empty.
    """

    def __init__(self, tokens: set[str] | frozenset[str] = frozenset()) -> None:
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._connections: set[Any] = set()  # open sockets, closed on stop (clients keep connections alive)
        self.body_faults: dict[str, Callable[[bytes], bytes]] = {}
        self.hang: set[str] = set()
        self.trickle: dict[str, float] = {}
        self.redirect_loop: set[str] = set()
        self.stopping = threading.Event()  # set by stop(): hanging and trickling handlers give up
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "the server is not running"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        hub = self
        self.stopping.clear()

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection: from now on nothing answers."""
        if self._httpd is not None:
            self.stopping.set()
            self._httpd.shutdown()
            self._httpd.server_close()
            with self._lock:
                connections, self._connections = list(self._connections), set()
            for conn in connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection helpers for tests ---------------------------------------------------------------
    def commit_requests(self) -> list[Request]:
        """The commit API calls the server answered."""
        return [r for r in self.requests if r.method == "POST" and "/commit/" in r.path]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision: path -> content."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            assert commit is not None, f"no revision {revision!r} in {repo_id}"
            return {p: b.data for p, b in commit.files.items()}

    # -- repo operations (also usable directly by tests to seed repos) --------------------------------
    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        with self._lock:
            if repo_id in self.repos:
                raise _HubError(409, f"You already created this model repo: {repo_id}")
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
            self._commit(repo, "main", {".gitattributes": Blob(GITATTRIBUTES, False)}, [], "initial commit", "")
            return repo

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", message: str = "upload") -> str:
        """Commit ``files`` (path -> bytes) on ``branch`` (test seeding); returns the commit sha."""
        with self._lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            blobs = {p: Blob(d, p.endswith(LFS_SUFFIXES)) for p, d in files.items()}
            return self._commit(repo, branch, blobs, [], message, "").sha

    def _commit(self, repo: Repo, branch: str, added: dict[str, Blob], deleted: list[str], title: str,
                message: str, parent: str | None = None) -> Commit:
        head = repo.resolve(branch) if branch in repo.branches else None
        if parent is not None and (head is None or not head.sha.startswith(parent)):
            raise _HubError(412, f"parent commit {parent} is not the head of {branch}")
        files = dict(head.files) if head else {}
        for path in deleted:
            prefix = path.rstrip("/") + "/"
            for p in [p for p in files if p == path or p.startswith(prefix)]:
                del files[p]
        files.update(added)
        self._counter += 1
        seed = json.dumps([repo.repo_id, branch, head.sha if head else None, title, self._counter, time.time_ns(),
                           sorted((p, b.oid) for p, b in files.items())])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), head.sha if head else None, title, message, files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may idle: no thread waits forever

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.server_hub._lock:
            self.server_hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server_hub._lock:
            self.server_hub._connections.discard(self.connection)
        super().finish()

    # -- plumbing ----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                if len(data) + size > MAX_BODY:
                    raise _HubError(413, "request body too large")
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise _HubError(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        with self.server_hub._lock:
            self.server_hub.requests.append(Request(self.command, self.path, status))

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        try:
            self._route()
        except _HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message, **e.body}, e.status, headers)
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            self._json({"error": f"bad request: {e}"}, 400, {"X-Error-Message": f"bad request: {e}"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- auth ----------------------------------------------------------------------------------------
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if token is not None and token not in self.server_hub.tokens:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return token

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        token = self._token()
        repo = self.server_hub.repos.get(repo_id)
        if repo is None or (repo.private and token is None):
            raise _HubError(404 if repo is None else 401, "Repository not found", "RepoNotFound")
        if write and self.server_hub.tokens and token is None:
            raise _HubError(401, "You must be authenticated to write", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- routes --------------------------------------------------------------------------------------
    def _route(self) -> None:
        hub, method = self.server_hub, self.command
        split = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(split.query)
        seg = [urllib.parse.unquote(s) for s in split.path.strip("/").split("/")]
        body = self._body() if method in ("POST", "PUT") else b""
        is_resolve = len(seg) >= 5 and seg[2] == "resolve"
        if ("api" in hub.hang and seg[0] == "api") or ("head" in hub.hang and method == "HEAD" and is_resolve):
            return self._never_answer()
        if method in ("GET", "HEAD") and is_resolve:  # outside the lock: a trickled body takes its time
            return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        with hub._lock:
            if method == "POST" and seg == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            if method == "POST" and seg == ["api", "validate-yaml"]:
                return self._json({"errors": [], "warnings": []})
            if method == "PUT" and len(seg) == 2 and seg[0] == "lfs-upload":
                return self._lfs_put(seg[1], body)
            if method == "POST" and seg == ["lfs-verify"]:
                data = json.loads(body)
                ok = data.get("oid") in hub.lfs and len(hub.lfs[data["oid"]]) == data.get("size")
                return self._json({}, 200) if ok else self._json({"error": "object missing"}, 404)
            if len(seg) >= 5 and seg[:2] == ["api", "models"]:
                repo_id, action, rest = f"{seg[2]}/{seg[3]}", seg[4], seg[5:]
                return self._api(method, repo_id, action, rest, body, query)
            if len(seg) == 4 and seg[:2] == ["api", "models"] and method == "GET":
                return self._model_info(f"{seg[2]}/{seg[3]}", "main")
            if method == "POST" and len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
                return self._lfs_batch(f"{seg[0]}/{seg[1][:-4]}", json.loads(body))
        raise _HubError(404, f"hubserver does not implement {method} {split.path}")

    def _api(self, method: str, repo_id: str, action: str, rest: list[str], body: bytes,
             query: dict[str, list[str]]) -> None:
        if method == "GET" and action == "revision" and len(rest) == 1:
            return self._model_info(repo_id, rest[0])
        if method == "GET" and action == "tree" and rest:
            return self._tree(repo_id, rest[0], "/".join(rest[1:]), query.get("recursive", ["false"])[0] == "true")
        if method == "GET" and action == "refs":
            repo = self._repo(repo_id)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
            return self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "GET" and action == "commits" and len(rest) == 1:
            repo = self._repo(repo_id)
            self._commit_of(repo, rest[0])
            return self._json([{"id": c.sha, "authors": [{"user": "test"}], "date": c.date, "title": c.title,
                                "message": c.message} for c in repo.history(rest[0])])
        if method == "POST" and action == "preupload" and len(rest) == 1:
            return self._preupload(repo_id, rest[0], json.loads(body))
        if method == "POST" and action == "commit" and len(rest) == 1:
            return self._commit(repo_id, rest[0], body)
        if method == "POST" and action == "branch" and rest:
            return self._create_branch(repo_id, "/".join(rest), json.loads(body or b"{}"))
        raise _HubError(404, f"hubserver does not implement {method} /api/models/{repo_id}/{action}")

    def _create_repo(self, data: dict[str, Any]) -> None:
        self._token()
        if self.server_hub.tokens and self.headers.get("Authorization") is None:
            raise _HubError(401, "Invalid username or password.")
        if data.get("type", "model") not in (None, "model"):
            raise _HubError(400, "hubserver serves model repos only")
        if not data.get("organization"):
            raise _HubError(400, "hubserver needs a namespace: org/name")
        repo_id = f"{data['organization']}/{data['name']}"
        private = data.get("private") or data.get("visibility") == "private"
        if repo_id in self.server_hub.repos:  # like the Hub: 409, with the repo's url (exist_ok reads it)
            raise _HubError(409, f"You already created this model repo: {repo_id}", url=f"{self.server_hub.url}/{repo_id}")
        self.server_hub.create_repo(repo_id, private=bool(private))
        self._json({"url": f"{self.server_hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        siblings = [{"rfilename": p} for p in sorted(commit.files)]
        self._json({"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.private,
                    "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                    "lastModified": commit.date, "createdAt": repo.history(revision)[-1].date,
                    "siblings": siblings})

    def _tree(self, repo_id: str, revision: str, path: str, recursive: bool) -> None:
        commit = self._commit_of(self._repo(repo_id), revision)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        files = {p: b for p, b in commit.files.items() if p.startswith(prefix)}
        if prefix and not files:
            raise _HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for p, blob in sorted(files.items()):
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder,
                                                "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {"type": "file", "path": p, "size": len(blob.data), "oid": blob.oid}
                if blob.lfs:
                    pointer = lfs_pointer(blob.sha256, len(blob.data))
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(pointer)}
                entries[p] = entry
        self._json(list(entries.values()))

    def _never_answer(self) -> None:
        """Read the request, answer nothing; the connection closes when the server stops (or after MAX_STALL_S)."""
        self.server_hub.stopping.wait(MAX_STALL_S)
        self.close_connection = True

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        hub = self.server_hub
        if path in hub.redirect_loop:
            self._send(302, b"", {"Location": self.path})
            return
        with hub._lock:
            commit = self._commit_of(self._repo(repo_id), revision)
        blob = commit.files.get(path)
        if blob is None:
            self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound",
                                                              "X-Error-Message": "Entry not found",
                                                              "X-Repo-Commit": commit.sha})
            return
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        data, status = blob.data, 200
        if self.command == "GET" and path in hub.body_faults:
            data = hub.body_faults[path](data)
        rng = self.headers.get("Range", "")
        if self.command == "GET" and rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
            start = int(rng[6:].split("-")[0])
            data, status = data[start:], 206
            headers["Content-Range"] = f"bytes {start}-{len(blob.data) - 1}/{len(blob.data)}"
        if self.command == "GET" and path in hub.trickle:
            return self._trickle(status, data, headers, hub.trickle[path])
        self._send(status, data, headers, content_type="application/octet-stream")

    def _trickle(self, status: int, data: bytes, headers: dict[str, str], interval: float) -> None:
        """Send the headers, then the body one byte every ``interval`` seconds (until the client or server quits)."""
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        with self.server_hub._lock:
            self.server_hub.requests.append(Request(self.command, self.path, status))
        started = time.monotonic()
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                if self.server_hub.stopping.wait(interval) or time.monotonic() - started > MAX_STALL_S:
                    break
        except OSError:  # the client gave up
            pass
        self.close_connection = True

    def _preupload(self, repo_id: str, revision: str, data: dict[str, Any]) -> None:
        repo = self._repo(repo_id, write=True)
        head = self._commit_of(repo, revision)
        out = []
        for f in data["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) and f["size"] > 0
            existing = head.files.get(f["path"])
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self._json({"files": out, "commitOid": head.sha})

    def _lfs_batch(self, repo_id: str, data: dict[str, Any]) -> None:
        self._repo(repo_id, write=True)
        if data.get("operation") != "upload":
            raise _HubError(400, "hubserver's LFS batch API accepts uploads only")
        objects = []
        for obj in data["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server_hub.lfs:
                base = self.server_hub.url
                entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{base}/lfs-verify"}}
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, f"content does not hash to {oid}")
        self.server_hub.lfs[oid] = body
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        if revision not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        added: dict[str, Blob] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, "hubserver accepts base64 file contents only")
                added[value["path"]] = Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.server_hub.lfs.get(value["oid"], _MISSING)
                if data is _MISSING:
                    raise _HubError(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                added[value["path"]] = Blob(data, True)  # type: ignore[arg-type]
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise _HubError(400, f"hubserver does not implement commit operation {key!r}")
        commit = self.server_hub._commit(repo, revision, added, deleted, header.get("summary", ""),
                                         header.get("description", ""), header.get("parentCommit"))
        self._json({"success": True, "commitOid": commit.sha,
                    "commitUrl": f"{self.server_hub.url}/{repo_id}/commit/{commit.sha}", "pullRequestUrl": None})

    def _create_branch(self, repo_id: str, branch: str, data: dict[str, Any]) -> None:
        repo = self._repo(repo_id, write=True)
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_of(repo, data.get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        self._json({})
