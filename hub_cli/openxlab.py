"""OpenXLab download client: the two-step HTTP protocol of the official ``openxlab`` package, and a git route.

The official client is unmaintained, has its hosts hard-coded, sends telemetry with every file, verifies
nothing and cannot resume (shared/specs/hubs.md §3, §5), so this module speaks the protocol itself:

1. ``POST {endpoint}/model-center/api/v1/cli/repository/getFileDownloadUrl`` with
   ``{userName, repositoryName, modelNames, filePaths, clientFrom, ignore}`` and, when credentials exist,
   ``Authorization: <raw JWT>`` → a double envelope (``msgCode == "10000"`` twice) whose inner data maps
   ``filePaths`` / ``modelNames`` keys to ``{url, fileName, hash, size}``;
2. ``GET url`` for each file (a pre-signed storage URL in production; never sent the JWT).

Credentials: a ready JWT (``token``), or an access key pair (``ak``/``sk``, also ``OPENXLAB_AK`` /
``OPENXLAB_SK``) exchanged for a JWT through the SSO HMAC flow of §3.3. No telemetry is sent.

OpenXLab is treated as legacy and best-effort: its maintainers call it unmaintained (spec §3.1), so
errors suggest the same repository on Hugging Face or ModelScope.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from hub_cli.errors import AuthError, HubCliError, IntegrityError, NetworkError, NotFoundError, redact

__all__ = ["DEFAULT_ENDPOINT", "DEFAULT_GIT_URL", "ENV_ENDPOINT", "ENV_GIT_URL", "OpenXLabClient",
           "OpenXLabFile", "git_clone", "safe_url"]

DEFAULT_ENDPOINT = "https://openapi.openxlab.org.cn/api/v1"
DEFAULT_GIT_URL = "https://code.openxlab.org.cn"
ENV_ENDPOINT = "HUB_CLI_OPENXLAB_ENDPOINT"
ENV_GIT_URL = "HUB_CLI_OPENXLAB_GIT_URL"
_OK = "10000"
_URLS_ROUTE = "model-center/api/v1/cli/repository/getFileDownloadUrl"
_SSO_ROUTE = "sso-be/api/v1/open"
_HINT = "OpenXLab may be discontinued; the same repository is usually on --source hf or --source modelscope"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_LFS_POINTER = re.compile(rb"version https://git-lfs\.github\.com/spec/v1\s+oid sha256:([0-9a-f]{64})\s+size (\d+)")


@dataclass(frozen=True)
class OpenXLabFile:
    path: str                 # repository path (the filePaths key when it looks like one, else fileName)
    url: str
    size: int | None
    sha256: str | None        # only when the listed hash is 64-hex (what production sends is unverified)


def safe_url(url: str) -> str:
    """The URL without query, fragment or user info (pre-signed queries carry signatures)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class OpenXLabClient:
    """Lists and downloads the files of an OpenXLab model repository."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, token: str | None = None, ak: str | None = None,
                 sk: str | None = None, timeout: tuple[float, float] = (10.0, 60.0)) -> None:
        import requests

        self.endpoint = endpoint.rstrip("/")
        self._token = token or None
        self._ak = ak if ak is not None else os.environ.get("OPENXLAB_AK")
        self._sk = sk if sk is not None else os.environ.get("OPENXLAB_SK")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "hub_cli (vllm-internvl)"

    def __repr__(self) -> str:  # never show credentials
        return f"OpenXLabClient(endpoint={self.endpoint!r}, authenticated={bool(self._token or self._ak)})"

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self._token, self._sk)

    # -- listing ---------------------------------------------------------------------------------------
    def list_files(self, repo: str, *, model_names: list[str] | None = None) -> list[OpenXLabFile]:
        owner, name = repo.split("/", 1)
        body = {"userName": owner, "repositoryName": name, "modelNames": model_names or None,
                "filePaths": None, "clientFrom": os.environ.get("CLIENT_FROM", "0"), "ignore": None}
        headers = {"Content-Type": "application/json", "accept": "application/json"}
        jwt = self._jwt()
        if jwt:
            headers["Authorization"] = jwt
        url = f"{self.endpoint}/{_URLS_ROUTE}"
        data = self._post(url, body, headers, what=f"repository {repo}")
        files: dict[str, OpenXLabFile] = {}
        for group in ("filePaths", "modelNames"):
            for key, entry in ((data or {}).get(group) or {}).items():
                if not isinstance(entry, dict) or not entry.get("url"):
                    continue
                file_name = str(entry.get("fileName") or key)
                path = str(key) if group == "filePaths" and str(key).endswith(file_name) else file_name
                digest = str(entry.get("hash") or "")
                size = entry.get("size")
                files[path] = OpenXLabFile(path=path, url=str(entry["url"]),
                                           size=int(size) if isinstance(size, (int, str)) and str(size).isdigit()
                                           else None,
                                           sha256=digest.lower() if _HEX64.fullmatch(digest) else None)
        return [files[p] for p in sorted(files)]

    # -- download --------------------------------------------------------------------------------------
    def download(self, f: OpenXLabFile, part: Path, progress: Callable[[int], None] | None = None) -> None:
        """One attempt: fetch ``f`` into ``part``, resuming from what ``part`` already holds.

        Raises NetworkError when the transfer broke off (``part`` keeps the bytes received, so calling
        again resumes), IntegrityError when the server's size contradicts the listing.
        """
        import requests
        import urllib3

        have = part.stat().st_size if part.exists() else 0
        if f.size is not None and have > f.size:
            part.unlink()
            have = 0
        if f.size is not None and have == f.size:
            return
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        where = f"{f.path} ({safe_url(f.url)})"
        try:
            with self.session.get(f.url, headers=headers, stream=True, timeout=self.timeout) as r:
                if r.status_code == 416 and have:
                    part.unlink(missing_ok=True)
                    raise NetworkError(f"server refused to resume {where} (HTTP 416); restarting")
                _raise_for_status(r.status_code, where)
                mode, offset = "wb", 0
                content_range = r.headers.get("Content-Range", "")
                total: int | None = None
                if have and r.status_code == 206:
                    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
                    if not m or int(m.group(1)) != have:
                        part.unlink(missing_ok=True)
                        raise NetworkError(f"resume of {where} answered with the wrong range; restarting")
                    mode, offset = "ab", have
                    total = int(m.group(3)) if m.group(3) != "*" else None
                length = r.headers.get("Content-Length")
                if total is None and length is not None and length.isdigit():
                    total = offset + int(length)
                if f.size is not None and total is not None and total != f.size:
                    part.unlink(missing_ok=True)
                    raise IntegrityError(f"size mismatch for {where}: the server sends {total} bytes, "
                                         f"the listing says {f.size}")
                received = 0
                if progress and offset:
                    progress(offset)
                with part.open(mode) as fh:
                    try:
                        for chunk in _body(r):
                            fh.write(chunk)
                            received += len(chunk)
                            if progress:
                                progress(len(chunk))
                    finally:
                        fh.flush()
                if length is not None and length.isdigit() and received < int(length):
                    raise NetworkError(f"connection closed after {offset + received} bytes of {where}")
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise NetworkError(f"download of {where} broke off ({type(exc).__name__}); the part received "
                               "is kept for resuming") from None

    # -- auth ------------------------------------------------------------------------------------------
    def _jwt(self) -> str | None:
        if self._token is None and self._ak and self._sk:
            self._token = self._login(self._ak, self._sk)
        return self._token

    def _login(self, ak: str, sk: str) -> str:
        """AK/SK → JWT: POST auth {ak} → {nonce, algorithm}; d = b64(HMAC(sk, nonce)); POST getJwt {ak, d}."""
        headers = {"Content-Type": "application/json", "accept": "application/json"}
        sso = f"{self.endpoint}/{_SSO_ROUTE}"
        challenge = self._post(f"{sso}/auth", {"ak": ak}, headers, what="OpenXLab login (auth)") or {}
        algorithm = str(challenge.get("algorithm") or "HmacSHA256").lower().removeprefix("hmac")
        if algorithm not in hashlib.algorithms_available:
            raise AuthError(f"OpenXLab login asks for unsupported signature algorithm {algorithm!r}")
        digest = hmac.new(sk.encode(), str(challenge.get("nonce", "")).encode(), algorithm).digest()
        reply = self._post(f"{sso}/getJwt", {"ak": ak, "d": base64.b64encode(digest).decode()}, headers,
                           what="OpenXLab login (getJwt)") or {}
        jwt = reply.get("jwt")
        if not jwt:
            raise AuthError("OpenXLab login returned no token; check OPENXLAB_AK / OPENXLAB_SK")
        return str(jwt)

    def _post(self, url: str, body: dict[str, Any], headers: dict[str, str], *, what: str) -> Any:
        import requests

        try:
            r = self.session.post(url, json=body, headers=headers, timeout=self.timeout)
        except requests.exceptions.RequestException as exc:
            raise NetworkError(f"cannot reach {safe_url(url)} for {what} ({type(exc).__name__}); {_HINT}") from None
        _raise_for_status(r.status_code, f"{what} ({safe_url(url)})")
        try:
            outer = r.json()
        except ValueError:
            raise HubCliError(f"unexpected non-JSON answer from {safe_url(url)} for {what}; {_HINT}") from None
        inner = outer.get("data") if isinstance(outer, dict) else None
        for level in (outer, inner):
            if not isinstance(level, dict):
                raise HubCliError(f"unexpected answer from {safe_url(url)} for {what}; {_HINT}")
            code = str(level.get("msgCode", ""))
            if code != _OK:
                _raise_for_code(code, str(level.get("msg", "")), what, url)
        return inner.get("data")


def _body(r: Any) -> Any:
    """Yield the body as it arrives (``read1``), so bytes received before a dropped connection are kept."""
    read1 = getattr(r.raw, "read1", None)
    if read1 is None:
        yield from r.iter_content(chunk_size=1 << 16)
        return
    while data := read1(1 << 20, decode_content=True):
        yield data


def _raise_for_status(status: int, where: str) -> None:
    if status < 400:
        return
    if status in (401, 403):
        raise AuthError(f"HTTP {status} for {where}: not authorised; pass --token (JWT or AK:SK) "
                        "or set OPENXLAB_AK / OPENXLAB_SK")
    if status == 404:
        raise NotFoundError(f"HTTP 404 for {where}: not found")
    if status >= 500 or status == 429:
        raise NetworkError(f"HTTP {status} for {where}; {_HINT}")
    raise HubCliError(f"HTTP {status} for {where}")


def _raise_for_code(code: str, msg: str, what: str, url: str) -> None:
    text = f"OpenXLab answered msgCode {code} ({msg or 'no message'}) for {what} at {safe_url(url)}"
    low = msg.lower()
    if code.endswith("404") or "not found" in low or "not exist" in low:
        raise NotFoundError(text)
    if code.endswith(("401", "403")) or "unauthor" in low or "permission" in low or "invalid ak" in low:
        raise AuthError(text)
    raise HubCliError(f"{text}; {_HINT}")


# ---------------------------------------------------------------------------------------------------------
# git route (spec §3.5, §5.3): git clone <base>/<owner>/<repo>.git, LFS objects through git-lfs
# ---------------------------------------------------------------------------------------------------------
def git_clone(repo: str, dest: Path, *, base_url: str = DEFAULT_GIT_URL, revision: str | None = None,
              token: str | None = None) -> tuple[str, list[str]]:
    """Clone ``repo`` into the empty folder ``dest`` with LFS smudging off; check out ``revision``.

    Returns (commit, tracked paths). The token travels in an ``http.extraHeader`` set through the
    environment, so it appears neither in the URL, nor in ``ps`` output, nor in git's messages.
    """
    if shutil.which("git") is None:
        raise HubCliError("--via git needs the git command, which is not installed")
    url = f"{base_url.rstrip('/')}/{repo}.git"
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_LFS_SKIP_SMUDGE="1")
    if token:
        env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="http.extraHeader",
                   GIT_CONFIG_VALUE_0=f"Authorization: Bearer {token}")

    def git(*args: str, cwd: Path | None = None) -> str:
        proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            _raise_git(proc.stderr, url, token)
        return proc.stdout

    git("clone", "--quiet", "--no-checkout", url, str(dest))
    commit = ""
    for candidate in (revision or "HEAD", f"origin/{revision}" if revision else ""):
        if not candidate:
            continue
        proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"],
                              cwd=dest, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            commit = proc.stdout.strip()
            break
    if not commit:
        raise NotFoundError(f"revision {revision!r} not found in {safe_url(url)}")
    git("checkout", "--quiet", "--detach", commit, cwd=dest)
    paths = [p for p in git("ls-files", "-z", cwd=dest).split("\0") if p]
    return commit, paths


def lfs_pointer(path: Path) -> tuple[str, int] | None:
    """(sha256, size) when the file is a Git LFS pointer, else None."""
    if path.stat().st_size > 1024:
        return None
    m = _LFS_POINTER.match(path.read_bytes())
    return (m.group(1).decode(), int(m.group(2))) if m else None


def git_lfs_pull(dest: Path, paths: list[str], token: str | None = None) -> None:
    if shutil.which("git-lfs") is None:
        raise HubCliError(f"{paths[0]} is stored with Git LFS and git-lfs is not installed; install git-lfs "
                          "or fetch without --via git")
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    if token:
        env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="http.extraHeader",
                   GIT_CONFIG_VALUE_0=f"Authorization: Bearer {token}")
    proc = subprocess.run(["git", "lfs", "pull", "--include", ",".join(paths)], cwd=dest, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        _raise_git(proc.stderr, "git lfs pull", token)


def _raise_git(stderr: str, where: str, token: str | None) -> None:
    last = redact(" ".join(line.strip() for line in stderr.strip().splitlines()[-2:]), [token])
    low = stderr.lower()
    if "not found" in low or "does not exist" in low or "does not appear to be a git repository" in low:
        raise NotFoundError(f"git: repository not found at {safe_url(where)}: {last}")
    if "authentication" in low or " 401" in low or " 403" in low or "could not read username" in low:
        raise AuthError(f"git: not authorised for {safe_url(where)}: {last}")
    if "could not resolve" in low or "connection" in low or "timed out" in low or "unable to access" in low:
        raise NetworkError(f"git: cannot reach {safe_url(where)}: {last}")
    raise HubCliError(f"git failed for {safe_url(where)}: {last}")
