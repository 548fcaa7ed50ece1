"""A fake model hub on 127.0.0.1 that speaks the Hugging Face, ModelScope and OpenXLab protocols.

It serves one folder of repositories to the unmodified official clients (``huggingface_hub``,
``modelscope_hub``) and to our own OpenXLab client, records every request, and injects faults, so that
download code can be tested without any network. Protocol facts: shared/specs/hubs.md §1.3, §2.3, §3.2, §6.

Layout of the served folder (spec §6.2)::

    <root>/<owner>/<name>/<revision>/<files...>   each direct sub-folder is one revision (branch)
    <root>/<owner>/<name>/.fakehub.json          optional settings, never served

Settings keys: ``default_branch`` (default "main"), ``tags`` {tag: folder}, ``revisions`` {name: folder}
(for names with "/", e.g. "refs/pr/1"), ``lfs_threshold`` (bytes, default 1 MiB), ``lfs_patterns``,
``private`` (bool), ``tokens`` (accepted tokens), ``gated`` (HF only), ``hubs`` (subset of "hf", "ms", "ox"),
and, for hostile-listing tests, ``advertise`` {listed name: real path}: extra listing entries under a name
of the test's choosing (e.g. "../evil") whose bytes are those of a real file.

Mount points on one port: ``/hf`` (HF endpoint), ``/ms`` (ModelScope endpoint), ``/openxlab/api/v1``
(OpenXLab API base), ``/openxlab-files`` (stand-in for pre-signed storage URLs), ``/_fake`` (control:
GET log, POST reset, POST faults).

Usage in tests::

    with FakeHub(tmp_path / "repos") as hub:
        hub.add_fault("*model.safetensors", "truncate", after_bytes=1000)
        fetch("owner/name", source="hf", endpoint=hub.hf_endpoint, ...)
        assert not hub.requests(kind="file", method="GET")

Manual use, from the repository root: ``python tests/fakehub.py ROOT [--port N]``; it prints the
endpoint variables to export. It imports only the standard library, so any Python runs it.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import fnmatch
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

__all__ = ["FakeHub", "Fault", "LoggedRequest", "FAULT_MODES"]

FAULT_MODES = (
    "status",        # answer `status` (default 500) instead of the real response; optional `retry_after`
    "drop",          # close the connection without answering
    "truncate",      # announce the full Content-Length, send `after_bytes` (default: half) of the body, close
    "stall",         # sleep `delay` seconds before answering
    "slow",          # send the body at `rate` bytes per second
    "ignore_range",  # answer a ranged request with 200 and the whole body
    "corrupt",       # flip one byte in the middle of the body (size unchanged)
    "wrong_size",    # serve the body one byte short, with a matching Content-Length
    "wrong_hash",    # advertise a wrong sha256 / git oid for the file in listings and headers
)
_BODY_MODES = {"truncate", "slow", "ignore_range", "corrupt", "wrong_size"}
_ANY_MODES = {"status", "drop", "stall"}
_LOGGED_HEADERS = ("range", "authorization", "cookie", "accept-encoding", "user-agent", "content-type")
_DEFAULT_LFS_THRESHOLD = 1 << 20
_CHUNK = 64 * 1024
_OX_OK = "10000"


# ---------------------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Fault:
    """One fault-injection rule.

    ``match`` is an fnmatch glob tested against the decoded URL path of the request and, for file
    requests, against the repository key ``owner/name/path``. ``nth``: the rule fires from the nth
    applicable request on (1 = the first); ``times``: how often it fires (None = every time).
    Body modes (truncate, slow, ignore_range, corrupt, wrong_size) apply to file GETs only.
    """

    match: str
    mode: str
    times: int | None = 1
    nth: int = 1
    hub: str | None = None            # "hf", "ms", "ox" or None for any
    method: str | None = None         # e.g. "GET"; None = any (body modes imply GET)
    status: int = 500
    retry_after: int | None = None
    after_bytes: int | None = None
    delay: float = 0.0
    rate: float = 64 * 1024.0
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {', '.join(FAULT_MODES)}")


@dataclass
class LoggedRequest:
    method: str
    path: str                 # URL path as received (percent-encoded), without the query
    query: str                # raw query string
    hub: str                  # "hf", "ms", "ox", "files", "control" or "?"
    kind: str                 # "api", "file", "auth", "telemetry", "control", "unknown"
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0
    fault: str | None = None
    file_key: str | None = None
    time: float = field(default_factory=time.time)


# ---------------------------------------------------------------------------------------------------------
# Repository model
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _File:
    path: str
    disk: Path
    size: int
    sha256: str
    git_oid: str
    is_lfs: bool
    pointer_size: int = 0
    pointer_oid: str = ""


@dataclass
class _Revision:
    folder: str
    commit: str
    files: dict[str, _File]
    created: float


def _git_blob_sha1(data_len: int, chunks) -> str:
    h = hashlib.sha1(b"blob %d\0" % data_len)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _hash_file(path: Path) -> tuple[int, str, str]:
    # Deliberately not hub_cli.fetch._hash_file: the fake hub computes the hashes it advertises on
    # its own, so a bug in the client's verification cannot be hidden by the server sharing it.
    size = path.stat().st_size
    sha = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            sha.update(block)
            git.update(block)
    return size, sha.hexdigest(), git.hexdigest()


def _wrong(hexdigest: str) -> str:
    """A deterministic, different digest of the same length."""
    return hashlib.sha256(b"wrong:" + hexdigest.encode()).hexdigest()[: len(hexdigest)]


class _Repo:
    def __init__(self, owner: str, name: str, folder: Path) -> None:
        self.owner, self.name, self.folder = owner, name, folder
        settings_path = folder / ".fakehub.json"
        self.settings: dict[str, Any] = json.loads(settings_path.read_text()) if settings_path.exists() else {}
        self.default_branch: str = self.settings.get("default_branch", "main")
        self.private = bool(self.settings.get("private", False))
        self.gated = bool(self.settings.get("gated", False))
        self.tokens: list[str] = list(self.settings.get("tokens", []))
        self.hubs: set[str] = set(self.settings.get("hubs", ["hf", "ms", "ox"]))
        self._revisions: dict[str, _Revision] = {}
        self._lock = threading.Lock()

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.name}"

    def folders(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def revision(self, folder: str) -> _Revision:
        with self._lock:
            if folder not in self._revisions:
                self._revisions[folder] = self._scan(folder)
            return self._revisions[folder]

    def _scan(self, folder: str) -> _Revision:
        base = self.folder / folder
        threshold = int(self.settings.get("lfs_threshold", _DEFAULT_LFS_THRESHOLD))
        patterns = list(self.settings.get("lfs_patterns", []))
        files: dict[str, _File] = {}
        for disk in sorted(base.rglob("*")):
            if not disk.is_file():
                continue
            rel = disk.relative_to(base).as_posix()
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            files[rel] = self._make_file(rel, disk, threshold, patterns)
        for listed, real in self.settings.get("advertise", {}).items():
            disk = base / real
            if disk.is_file():
                files[listed] = self._make_file(listed, disk, threshold, patterns)
        digest = hashlib.sha1(f"{self.repo_id}\0{folder}\0".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].git_oid}\0".encode())
        return _Revision(folder=folder, commit=digest.hexdigest(), files=files,
                         created=(self.folder / folder).stat().st_mtime)

    @staticmethod
    def _make_file(rel: str, disk: Path, threshold: int, patterns: list[str]) -> _File:
        size, sha, git = _hash_file(disk)
        is_lfs = size >= threshold or any(fnmatch.fnmatchcase(rel, p) for p in patterns)
        f = _File(path=rel, disk=disk, size=size, sha256=sha, git_oid=git, is_lfs=is_lfs)
        if is_lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
            f.pointer_size = len(pointer)
            f.pointer_oid = _git_blob_sha1(len(pointer), [pointer])
        return f

    def resolve(self, name: str | None, hub: str) -> _Revision | None:
        """Map a revision name (branch, alias, tag, commit or ≥7-hex prefix) to a revision."""
        folders = self.folders()
        if not name or name in ("HEAD", "main" if hub == "hf" else "master"):
            name = self.default_branch
        if name in ("main", "master") and name not in folders and self.default_branch in folders:
            name = self.default_branch
        folder = self.settings.get("revisions", {}).get(name) or self.settings.get("tags", {}).get(name)
        if folder is None and name in folders:
            folder = name
        if folder is not None and folder in folders:
            return self.revision(folder)
        if len(name) >= 7 and all(c in "0123456789abcdef" for c in name.lower()):
            for f in folders:
                rev = self.revision(f)
                if rev.commit.startswith(name.lower()):
                    return rev
        return None

    def branch_name(self, rev: _Revision, hub: str) -> str:
        if rev.folder == self.default_branch:
            return "main" if hub == "hf" else "master"
        return rev.folder


# ---------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------
class FakeHub:
    """Threaded fake hub bound to 127.0.0.1 on an ephemeral port. Use as a context manager."""

    def __init__(self, root: str | Path, *, port: int = 0, page_size: int = 1000) -> None:
        self.root = Path(root)
        self.page_size = page_size
        self._port_wanted = port
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._log: list[LoggedRequest] = []
        self._faults: list[Fault] = []
        self._jwts: dict[str, str] = {}          # jwt -> ak (OpenXLab SSO)
        self._nonces: dict[str, str] = {}        # ak -> nonce
        self.openxlab_keys: dict[str, str] = {}  # ak -> sk accepted by the OpenXLab SSO routes
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port_wanted), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "FakeHub is not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hf_endpoint(self) -> str:
        return f"{self.url}/hf"

    @property
    def ms_endpoint(self) -> str:
        return f"{self.url}/ms"

    @property
    def openxlab_endpoint(self) -> str:
        return f"{self.url}/openxlab/api/v1"

    # -- repositories ------------------------------------------------------------------------------------
    def repo(self, owner: str, name: str) -> _Repo | None:
        key = f"{owner}/{name}"
        with self._lock:
            if key not in self._repos:
                folder = self.root / owner / name
                if not folder.is_dir() or owner.startswith(".") or name.startswith("."):
                    return None
                self._repos[key] = _Repo(owner, name, folder)
            return self._repos[key]

    def reload(self) -> None:
        """Forget cached metadata (call after changing files under root)."""
        with self._lock:
            self._repos.clear()

    def commit(self, repo_id: str, revision: str | None = None, hub: str = "hf") -> str:
        owner, name = repo_id.split("/", 1)
        repo = self.repo(owner, name)
        assert repo is not None, repo_id
        rev = repo.resolve(revision, hub)
        assert rev is not None, revision
        return rev.commit

    # -- faults and log ----------------------------------------------------------------------------------
    def add_fault(self, match: str, mode: str, **kw: Any) -> Fault:
        fault = Fault(match=match, mode=mode, **kw)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests(self, *, kind: str | None = None, method: str | None = None, hub: str | None = None,
                 contains: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            out = list(self._log)
        return [r for r in out
                if (kind is None or r.kind == kind) and (method is None or r.method == method)
                and (hub is None or r.hub == hub)
                and (contains is None or contains in unquote(r.path + "?" + r.query))]

    @property
    def log(self) -> list[LoggedRequest]:
        return self.requests()

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._log.append(entry)

    def _wrong_hash(self, file_key: str) -> bool:
        with self._lock:
            return any(f.mode == "wrong_hash" and fnmatch.fnmatchcase(file_key, f.match) for f in self._faults)

    def _take_fault(self, *, hub: str, method: str, path: str, file_key: str | None,
                    body: bool) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.mode == "wrong_hash":
                    continue
                if f.mode in _BODY_MODES and not (body and method == "GET"):
                    continue
                if f.hub and f.hub != hub:
                    continue
                if f.method and f.method != method:
                    continue
                if not (fnmatch.fnmatchcase(path, f.match)
                        or (file_key is not None and fnmatch.fnmatchcase(file_key, f.match))):
                    continue
                f.seen += 1
                if f.seen < f.nth or (f.times is not None and f.fired >= f.times):
                    continue
                f.fired += 1
                return f
        return None

    def _check_token(self, repo: _Repo, token: str | None) -> bool:
        if not repo.private:
            return True
        return bool(token) and (token in repo.tokens or token in self._jwts)


# ---------------------------------------------------------------------------------------------------------
# Request handler
# ---------------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the bound subclass
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- plumbing ----------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        raw_path, _, query = self.path.partition("?")
        self._method = method
        self._entry = LoggedRequest(
            method=method, path=raw_path, query=query, hub="?", kind="unknown",
            headers={k: v for k in _LOGGED_HEADERS if (v := self.headers.get(k)) is not None})
        self._query = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        self._body = self.rfile.read(length) if length else b""
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        if segments[:1] != ["_fake"]:
            # logged before answering, so a client that has its answer always finds the entry
            self.hub._record(self._entry)
        try:
            if segments[:1] == ["hf"]:
                self._entry.hub = "hf"
                self._hf(segments[1:], raw_path)
            elif segments[:1] == ["ms"]:
                self._entry.hub = "ms"
                self._ms(segments[1:])
            elif segments[:3] == ["openxlab", "api", "v1"]:
                self._entry.hub = "ox"
                self._ox(segments[3:])
            elif segments[:1] == ["openxlab-files"]:
                self._entry.hub = "ox"
                self._ox_file(segments[1:])
            elif segments[:1] == ["_fake"]:
                self._entry.hub, self._entry.kind = "control", "control"
                self._control(segments[1:])
            else:
                self._json(404, {"error": f"no route for {raw_path}"})
        except _Dropped:
            pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _fault(self, file_key: str | None = None, body: bool = False) -> Fault | None:
        """Apply request-level faults; return a body-level fault for the caller, if any."""
        fault = self.hub._take_fault(hub=self._entry.hub, method=self._method,
                                     path=unquote(self._entry.path), file_key=file_key, body=body)
        if fault is None:
            return None
        self._entry.fault = fault.mode
        if fault.mode == "stall":
            time.sleep(fault.delay)
            return None
        if fault.mode == "drop":
            self._drop()
        if fault.mode == "status":
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            self._json(fault.status, {"error": f"injected {fault.status}", "Code": fault.status,
                                      "Success": False, "Message": "injected fault"}, headers)
            raise _Dropped  # response sent; stop handling
        return fault

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Dropped

    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        self._entry.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        h = {"Content-Type": content_type, "Content-Length": str(len(body))}
        h.update(headers or {})
        self._send_head(status, h)
        if self._method != "HEAD":
            self.wfile.write(body)
            self._entry.body_bytes = len(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        if auth:
            return auth.strip()
        cookie = self.headers.get("Cookie") or ""
        for part in cookie.split(";"):
            k, _, v = part.strip().partition("=")
            if k == "m_session_id" and v:
                return v
        return None

    # -- file body (all hubs) ----------------------------------------------------------------------------
    def _serve_file(self, f: _File, file_key: str, extra: dict[str, str]) -> None:
        self._entry.kind = "file"
        self._entry.file_key = file_key
        fault = self._fault(file_key=file_key, body=True)
        size = f.size
        start, end = 0, size - 1
        status = 200
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        headers.update(extra)
        rng = self.headers.get("Range")
        if rng and not (fault and fault.mode == "ignore_range"):
            parsed = _parse_range(rng, size)
            if parsed == "unsatisfiable":
                self._send(416, b"", {"Content-Range": f"bytes */{size}", **extra})
                return
            if parsed is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        if fault and fault.mode == "wrong_size" and length > 0:
            length -= 1
        headers["Content-Length"] = str(length)
        self._send_head(status, headers)
        if self._method == "HEAD":
            return
        limit = length
        if fault and fault.mode == "truncate":
            limit = min(length, fault.after_bytes if fault.after_bytes is not None else length // 2)
        chunk_size = _CHUNK
        if fault and fault.mode == "slow":
            chunk_size = max(1, min(_CHUNK, int(fault.rate / 20)))
        flip_at = length // 2 if fault and fault.mode == "corrupt" else -1
        sent = 0
        with f.disk.open("rb") as fh:
            fh.seek(start)
            while sent < limit:
                block = fh.read(min(chunk_size, limit - sent))
                if not block:
                    break
                if 0 <= flip_at - sent < len(block):
                    i = flip_at - sent
                    block = block[:i] + bytes([block[i] ^ 0xFF]) + block[i + 1:]
                self.wfile.write(block)
                sent += len(block)
                self._entry.body_bytes = sent
                if fault and fault.mode == "slow":
                    self.wfile.flush()
                    time.sleep(len(block) / fault.rate)
        if sent < length:
            self._drop()

    # -- Hugging Face ------------------------------------------------------------------------------------
    def _hf(self, seg: list[str], raw_path: str) -> None:
        if seg[:2] == ["api", "telemetry"]:
            self._entry.kind = "telemetry"
            self._send(200, b"")
            return
        if seg[:2] == ["api", "agent-harnesses"]:
            self._entry.kind = "telemetry"
            self._json(404, {"error": "not here"})
            return
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in ("models", "datasets"):
            self._entry.kind = "api"
            self._fault()
            self._hf_api(seg[2], seg[3], seg[4:])
            return
        if seg and seg[0] in ("datasets", "spaces"):
            seg = seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve":
            # the file path is everything after the revision, decoded as a whole
            raw_segments = raw_path.split("/")
            prefix_len = len(raw_path.split("/")) - len(seg)
            path = unquote("/".join(raw_segments[prefix_len + 4:]))
            self._hf_resolve(seg[0], seg[1], seg[3], path)
            return
        self._entry.kind = "unknown"
        self._json(404, {"error": "Not Found"})

    def _hf_repo(self, owner: str, name: str) -> _Repo | None:
        repo = self.hub.repo(owner, name)
        if repo is None or "hf" not in repo.hubs:
            return None
        return repo

    def _hf_auth_error(self, repo: _Repo | None) -> bool:
        """Send the HF error for a missing/private/gated repo; True if an error was sent."""
        if repo is None:
            return False
        token = self._token()
        if repo.private and not self.hub._check_token(repo, token):
            msg = "Invalid credentials in Authorization header" if token else "Repository not found"
            self._json(401, {"error": msg}, {"X-Error-Code": "RepoNotFound", "X-Error-Message": msg})
            return True
        if repo.gated and not (token and token in repo.tokens):
            msg = "Access to this model is restricted. You must have access to it and be authenticated."
            self._json(403, {"error": msg}, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
            return True
        return False

    def _hf_api(self, owner: str, name: str, rest: list[str]) -> None:
        repo = self._hf_repo(owner, name)
        if repo is None:
            self._json(404, {"error": "Repository not found"},
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return
        if self._hf_auth_error(repo):
            return
        if not rest or rest[0] == "revision":
            rev = repo.resolve(rest[1] if len(rest) > 1 else None, "hf")
            if rev is None:
                self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound",
                                                              "X-Error-Message": "Invalid rev id"})
                return
            self._json(200, self._hf_info(repo, rev))
            return
        if rest[0] == "tree" and len(rest) >= 2:
            rev = repo.resolve(rest[1], "hf")
            if rev is None:
                self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                return
            self._hf_tree(repo, rev, "/".join(rest[2:]))
            return
        self._json(404, {"error": "Not Found"})

    def _hf_advertised(self, repo: _Repo, f: _File) -> tuple[str, str]:
        """(sha256, git oid) as advertised, possibly wrong on purpose."""
        if self.hub._wrong_hash(f"{repo.repo_id}/{f.path}"):
            return _wrong(f.sha256), _wrong(f.pointer_oid if f.is_lfs else f.git_oid)
        return f.sha256, f.pointer_oid if f.is_lfs else f.git_oid

    def _hf_info(self, repo: _Repo, rev: _Revision) -> dict[str, Any]:
        blobs = self._query.get("blobs", "").lower() == "true"
        siblings = []
        for f in rev.files.values():
            s: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sha, oid = self._hf_advertised(repo, f)
                s.update(size=f.size, blobId=oid)
                if f.is_lfs:
                    s["lfs"] = {"sha256": sha, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(s)
        stamp = _iso(rev.created)
        return {"_id": rev.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.owner,
                "sha": rev.commit, "private": repo.private, "gated": "auto" if repo.gated else False,
                "disabled": False, "tags": [], "downloads": 0, "likes": 0, "lastModified": stamp,
                "createdAt": stamp, "siblings": siblings}

    def _hf_tree(self, repo: _Repo, rev: _Revision, path: str) -> None:
        recursive = self._query.get("recursive", "").lower() == "true"
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for f in rev.files.values():
            if not f.path.startswith(prefix):
                continue
            rel = f.path[len(prefix):]
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                d = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries[d] = {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                  "size": 0, "path": d}
            if recursive or len(parts) == 1:
                sha, oid = self._hf_advertised(repo, f)
                e: dict[str, Any] = {"type": "file", "oid": oid, "size": f.size, "path": f.path}
                if f.is_lfs:
                    e["lfs"] = {"oid": sha, "size": f.size, "pointerSize": f.pointer_size}
                entries[f.path] = e
        if prefix and not entries:
            self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                          "X-Repo-Commit": rev.commit})
            return
        ordered = [entries[k] for k in sorted(entries)]
        cursor = int(self._query.get("cursor") or 0)
        page = ordered[cursor:cursor + self.hub.page_size]
        headers = {}
        if cursor + self.hub.page_size < len(ordered):
            q = f"recursive={self._query.get('recursive', 'false')}&expand={self._query.get('expand', 'false')}"
            nxt = f"{self.hub.url}{self._entry.path}?{q}&cursor={cursor + self.hub.page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(200, page, headers)

    def _hf_resolve(self, owner: str, name: str, revision: str, path: str) -> None:
        self._entry.kind = "file"
        self._entry.file_key = f"{owner}/{name}/{path}"
        repo = self._hf_repo(owner, name)
        if repo is None:
            self._fault(file_key=self._entry.file_key)
            self._json(401, {"error": "Repository not found"},
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return
        if self._hf_auth_error(repo):
            return
        rev = repo.resolve(revision, "hf")
        if rev is None:
            self._fault(file_key=self._entry.file_key)
            self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return
        f = rev.files.get(path)
        if f is None:
            self._fault(file_key=self._entry.file_key)
            self._json(404, {"error": "Entry not found"},
                       {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": rev.commit})
            return
        sha, oid = self._hf_advertised(repo, f)
        extra = {"X-Repo-Commit": rev.commit, "ETag": f'"{sha if f.is_lfs else oid}"'}
        if f.is_lfs:
            extra["X-Linked-Etag"] = f'"{sha}"'
            extra["X-Linked-Size"] = str(f.size)
            extra["ETag"] = f'"{oid}"'
        self._serve_file(f, self._entry.file_key, extra)

    # -- ModelScope --------------------------------------------------------------------------------------
    def _ms_envelope(self, status: int, data: Any = None, message: str = "") -> None:
        ok = status < 400
        self._json(status, {"Code": 200 if ok else status, "Data": data, "Message": message or
                            ("success" if ok else HTTPStatus(status).phrase),
                            "RequestId": uuid.uuid4().hex, "Success": ok})

    def _ms(self, seg: list[str]) -> None:
        if seg[:3] == ["api", "v1", "repos"]:
            self._entry.kind = "telemetry"
            self._ms_envelope(404, None, "not available")
            return
        if len(seg) < 5 or seg[:2] != ["api", "v1"] or seg[2] not in ("models", "datasets"):
            self._entry.kind = "unknown"
            self._ms_envelope(404, None, "no such route")
            return
        owner, name, rest = seg[3], seg[4], seg[5:]
        is_file = rest == ["repo"]
        self._entry.kind = "file" if is_file else "api"
        repo = self.hub.repo(owner, name)
        if is_file:
            self._entry.file_key = f"{owner}/{name}/{self._query.get('FilePath', '')}"
        if not is_file:
            self._fault()
        if repo is None or "ms" not in repo.hubs:
            if is_file:
                self._fault(file_key=self._entry.file_key)
            self._ms_envelope(404, None, "Model not exists")
            return
        if repo.private and not self.hub._check_token(repo, self._token()):
            if is_file:
                self._fault(file_key=self._entry.file_key)
            status = 403 if self._token() else 401
            self._ms_envelope(status, None, "permission denied" if self._token() else "login required")
            return
        if not rest:
            self._ms_envelope(200, {"Id": abs(hash(repo.repo_id)) % 100000, "Name": name, "Path": owner,
                                    "ChineseName": "", "Visibility": 1 if repo.private else 5})
            return
        if rest == ["revisions"]:
            branches = [{"Revision": repo.branch_name(repo.revision(f), "ms"),
                         "CreatedAt": int(repo.revision(f).created), "CommitId": repo.revision(f).commit,
                         "Message": ""} for f in repo.folders()]
            tags = [{"Revision": t, "CreatedAt": int(repo.revision(f).created),
                     "CommitId": repo.revision(f).commit, "Message": ""}
                    for t, f in repo.settings.get("tags", {}).items() if f in repo.folders()]
            self._ms_envelope(200, {"RevisionMap": {"Branches": branches, "Tags": tags}})
            return
        rev = repo.resolve(self._query.get("Revision") or "master", "ms")
        if rev is None:
            if is_file:
                self._fault(file_key=self._entry.file_key)
            self._ms_envelope(404, None, f"Revision {self._query.get('Revision')} not exists")
            return
        if rest == ["repo", "files"]:
            self._ms_files(repo, rev)
            return
        if is_file:
            path = self._query.get("FilePath", "")
            f = rev.files.get(path)
            if f is None:
                self._fault(file_key=self._entry.file_key)
                self._ms_envelope(404, None, f"File {path} not exists")
                return
            sha = _wrong(f.sha256) if self.hub._wrong_hash(self._entry.file_key) else f.sha256
            extra = {"X-Linked-ETag": f'"{sha}"'} if f.is_lfs else {}
            self._serve_file(f, self._entry.file_key, extra)
            return
        self._ms_envelope(404, None, "no such route")

    def _ms_files(self, repo: _Repo, rev: _Revision) -> None:
        recursive = self._query.get("Recursive", "true").lower() == "true"
        root = self._query.get("Root", "").strip("/")
        prefix = f"{root}/" if root else ""
        out: dict[str, dict[str, Any]] = {}
        for f in rev.files.values():
            if not f.path.startswith(prefix):
                continue
            parts = f.path[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                d = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    out[d] = {"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0, "Sha256": "",
                              "Revision": rev.commit, "CommitId": rev.commit, "IsLFS": False, "Mode": "40000"}
            if recursive or len(parts) == 1:
                sha = _wrong(f.sha256) if self.hub._wrong_hash(f"{repo.repo_id}/{f.path}") else f.sha256
                out[f.path] = {"Name": f.path.rsplit("/", 1)[-1], "Path": f.path, "Type": "blob",
                               "Size": f.size, "Sha256": sha, "Revision": rev.commit, "CommitId": rev.commit,
                               "IsLFS": f.is_lfs, "Mode": "100644"}
        if prefix and not out:
            self._ms_envelope(404, None, f"Directory {root} not exists")
            return
        self._ms_envelope(200, {"Files": [out[k] for k in sorted(out)]})

    # -- OpenXLab ----------------------------------------------------------------------------------------
    def _ox_envelope(self, data: Any, code: str = _OX_OK, msg: str = "success", status: int = 200) -> None:
        inner = {"traceId": uuid.uuid4().hex, "msgCode": code, "msg": msg, "data": data}
        self._json(status, {"traceId": inner["traceId"], "msgCode": _OX_OK, "msg": "success", "data": inner})

    def _ox(self, seg: list[str]) -> None:
        try:
            body = json.loads(self._body or b"{}")
        except ValueError:
            body = {}
        route = "/".join(seg)
        if route == "data-bury/api/v1/bury/collect":
            self._entry.kind = "telemetry"
            self._ox_envelope(None)
            return
        if route.startswith("sso-be/api/v1/open/"):
            self._entry.kind = "auth"
            self._fault()
            self._ox_sso(route.rsplit("/", 1)[-1], body)
            return
        if route == "model-center/api/v1/cli/repository/getFileDownloadUrl" and self._method == "POST":
            self._entry.kind = "api"
            self._fault()
            self._ox_urls(body)
            return
        self._entry.kind = "unknown"
        self._json(404, {"msgCode": "404", "msg": "no such route", "data": None})

    def _ox_sso(self, action: str, body: dict[str, Any]) -> None:
        ak = str(body.get("ak", ""))
        sk = self.hub.openxlab_keys.get(ak)
        if sk is None:
            self._ox_envelope(None, "10401", "invalid ak")
            return
        if action == "auth":
            nonce = uuid.uuid4().hex
            self.hub._nonces[ak] = nonce
            self._ox_envelope({"nonce": nonce, "algorithm": "HmacSHA256"})
            return
        if action in ("getJwt", "refreshJwt"):
            if action == "getJwt":
                nonce = self.hub._nonces.pop(ak, None)
                expected = base64.b64encode(hmac.new(sk.encode(), (nonce or "").encode(), hashlib.sha256)
                                            .digest()).decode()
                if nonce is None or not hmac.compare_digest(expected, str(body.get("d", ""))):
                    self._ox_envelope(None, "10401", "signature mismatch")
                    return
            jwt = "fakejwt." + uuid.uuid4().hex
            self.hub._jwts[jwt] = ak
            now = _dt.datetime.now(_dt.timezone(_dt.timedelta(hours=8)))
            fmt = "%Y-%m-%d %H:%M:%S"
            self._ox_envelope({"jwt": jwt, "expiration": (now + _dt.timedelta(hours=1)).strftime(fmt),
                               "sso_uid": ak, "refresh_token": uuid.uuid4().hex,
                               "refresh_expiration": (now + _dt.timedelta(days=1)).strftime(fmt)})
            return
        self._ox_envelope(None, "10404", "no such action")

    def _ox_urls(self, body: dict[str, Any]) -> None:
        owner, name = str(body.get("userName", "")), str(body.get("repositoryName", ""))
        repo = self.hub.repo(owner, name) if owner and name else None
        if repo is None or "ox" not in repo.hubs:
            self._ox_envelope(None, "10404", f"repository {owner}/{name} not found")
            return
        if repo.private and not self.hub._check_token(repo, self._token()):
            self._json(401, {"traceId": uuid.uuid4().hex, "msgCode": "10401", "msg": "unauthorized",
                             "data": None})
            return
        rev = repo.resolve(None, "ox")
        assert rev is not None
        wanted = body.get("modelNames") or None
        ignore = body.get("ignore") or []
        by_path: dict[str, Any] = {}
        by_model: dict[str, Any] = {}
        for f in rev.files.values():
            if any(fnmatch.fnmatch(f.path, pat) for pat in ignore):
                continue
            key = f"{repo.repo_id}/{f.path}"
            entry = {"url": f"{self.hub.url}/openxlab-files/{quote(repo.owner)}/{quote(repo.name)}/"
                            f"{quote(f.path)}",
                     "fileName": f.path.rsplit("/", 1)[-1],
                     "hash": _wrong(f.sha256) if self.hub._wrong_hash(key) else f.sha256,
                     "size": f.size}
            if wanted:
                stem = entry["fileName"].rsplit(".", 1)[0]
                hit = next((m for m in wanted if m in (stem, f.path, entry["fileName"])), None)
                if hit is not None:
                    by_model[f.path] = entry
            else:
                by_path[f.path] = entry
        self._ox_envelope({"modelNames": by_model, "filePaths": by_path})

    def _ox_file(self, seg: list[str]) -> None:
        self._entry.kind = "file"
        if len(seg) < 3:
            self._json(404, {"error": "not found"})
            return
        owner, name, path = seg[0], seg[1], "/".join(seg[2:])
        key = f"{owner}/{name}/{path}"
        self._entry.file_key = key
        repo = self.hub.repo(owner, name)
        rev = repo.resolve(None, "ox") if repo is not None and "ox" in repo.hubs else None
        f = rev.files.get(path) if rev is not None else None
        if f is None:
            self._fault(file_key=key)
            self._json(404, {"error": "NoSuchKey"})
            return
        self._serve_file(f, key, {"ETag": f'"{f.sha256}"'})

    # -- control -----------------------------------------------------------------------------------------
    def _control(self, seg: list[str]) -> None:
        action = seg[0] if seg else ""
        if action == "log" and self._method == "GET":
            self._json(200, [asdict(r) for r in self.hub.log])
        elif action == "reset" and self._method == "POST":
            self.hub.clear_log()
            self.hub.clear_faults()
            self.hub.reload()
            self._json(200, {"ok": True})
        elif action == "faults" and self._method == "POST":
            rules = json.loads(self._body or b"[]")
            try:
                for rule in rules if isinstance(rules, list) else [rules]:
                    self.hub.add_fault(**rule)
            except (TypeError, ValueError) as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, {"ok": True})
        else:
            self._json(404, {"error": "unknown control route"})


class _Dropped(Exception):
    """The response was already sent (or the connection closed); stop handling."""


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """Single byte range per RFC 9110; None = ignore the header, "unsatisfiable" = 416."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return None
            return (max(0, size - n), size - 1) if size else "unsatisfiable"
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return start, min(end, size - 1)


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tests/fakehub.py",
                                     description="Serve a folder of repos as a fake HF / ModelScope / OpenXLab hub.")
    parser.add_argument("root", type=Path, help="folder laid out as <owner>/<name>/<revision>/<files>")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--page-size", type=int, default=1000, help="HF tree page size")
    args = parser.parse_args(argv)
    hub = FakeHub(args.root, port=args.port, page_size=args.page_size).start()
    print(f"fake hub serving {args.root} on {hub.url}")
    print(f"  HF_ENDPOINT={hub.hf_endpoint}")
    print(f"  MODELSCOPE_ENDPOINT={hub.ms_endpoint}")
    print(f"  HUB_CLI_OPENXLAB_ENDPOINT={hub.openxlab_endpoint}")
    print(f"  control: GET {hub.url}/_fake/log, POST {hub.url}/_fake/reset, POST {hub.url}/_fake/faults",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
