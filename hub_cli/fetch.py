"""``hub_cli fetch``: download a model repository from Hugging Face, ModelScope or OpenXLab into a folder.

Backends (shared/specs/hubs.md §4.1): the official ``huggingface_hub`` client for ``hf``, the official
``modelscope_hub`` client for ``modelscope``, our own implementation of the OpenXLab protocol
(:mod:`hub_cli.openxlab`) for ``openxlab``, or ``git clone`` for ``openxlab --via git``.

What this layer adds on top of the clients, for every hub alike:

* the environment is set **before** a client is imported (endpoint, telemetry off, ModelScope's intra-cloud
  probe off, xet off for custom endpoints), and the endpoint is also passed explicitly (spec §1.4, §2.2);
* the file list is fetched first and every name is checked before anything is written: absolute paths,
  ``..``, backslashes, drive letters and paths through a symlink inside the target folder are refused;
* ``--include`` / ``--exclude`` use one semantics on every hub (``fnmatchcase`` on the whole path, ``*``
  crosses ``/``, ``dir/`` means everything under ``dir``, comma-separated lists allowed);
* every downloaded file is checked against the listing: size, and sha256 (HF LFS files, ModelScope,
  OpenXLab when it sends a 64-hex hash) or the git blob sha1 (HF regular files); a file that fails is
  deleted, never left in place;
* a manifest ``<local_dir>/.hub_cli/manifest.json`` records what was verified, so a second run with an
  unchanged upstream downloads nothing and re-hashes nothing;
* transient failures (connection errors, 5xx, 429) are retried with exponential backoff; partial files
  resume where the hub allows it (HF: within one run; ModelScope and OpenXLab: across runs too);
* errors are :class:`hub_cli.errors.HubCliError` subclasses with one-line messages and distinct exit codes;
  tokens never appear in them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from hub_cli.errors import (AuthError, HubCliError, IntegrityError, NetworkError, NotFoundError,
                            UnsafePathError, UsageError, redact)

__all__ = ["SOURCES", "DEFAULT_ENDPOINTS", "ENDPOINT_ENV", "MANIFEST_PATH", "RemoteFile", "fetch", "is_repo_id",
           "select_paths", "safe_target"]

SOURCES = ("hf", "modelscope", "openxlab")
DEFAULT_ENDPOINTS = {
    "hf": "https://huggingface.co",
    "modelscope": "https://modelscope.cn",
    "openxlab": "https://openapi.openxlab.org.cn/api/v1",
}
ENDPOINT_ENV = {"hf": "HF_ENDPOINT", "modelscope": "MODELSCOPE_ENDPOINT", "openxlab": "HUB_CLI_OPENXLAB_ENDPOINT"}
MANIFEST_PATH = Path(".hub_cli") / "manifest.json"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
_MAX_BACKOFF = 30.0
log = logging.getLogger("hub_cli.fetch")


@dataclass(frozen=True)
class RemoteFile:
    """A file as the hub lists it. ``sha256`` / ``git_oid`` are what the hub vouches for, if anything."""

    path: str
    size: int | None
    sha256: str | None = None
    git_oid: str | None = None
    url: str | None = None  # OpenXLab: where the bytes are


def fetch(
    repo: str,
    *,
    source: str = "hf",
    revision: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    local_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    max_workers: int = 8,
    endpoint: str | None = None,
    quiet: bool = False,
    retries: int = 5,
    backoff: float | None = None,
    via: str = "http",
    no_xet: bool = False,
) -> Path:
    """Download ``repo`` (``owner/name``) from ``source`` into ``local_dir`` and return that folder.

    ``local_dir`` defaults to ``./<name>``. ``token``: HF / ModelScope access token; for OpenXLab a JWT
    or ``AK:SK``. ``endpoint`` overrides the hub's base URL (else the hub's env variable, else the
    public hub). ``retries`` / ``backoff``: attempts after a transient failure, waiting
    ``backoff * 2**attempt`` seconds (at most 30; ``backoff`` defaults to ``HUB_CLI_RETRY_BACKOFF`` or 1).
    ``via="git"`` clones instead (OpenXLab only).
    Raises a :class:`~hub_cli.errors.HubCliError` subclass; its message never contains the token.
    """
    secrets = _secrets(token)
    if backoff is None:
        try:
            backoff = max(0.0, float(os.environ.get("HUB_CLI_RETRY_BACKOFF", "1")))
        except ValueError:
            backoff = 1.0
    try:
        return _fetch(repo, source=source, revision=revision, include=include, exclude=exclude,
                      local_dir=local_dir, token=token, max_workers=max_workers, endpoint=endpoint,
                      quiet=quiet, retries=retries, backoff=backoff, via=via, no_xet=no_xet)
    except HubCliError as exc:
        clean = redact(exc.message, secrets)
        if clean == exc.message:
            raise
        raise type(exc)(clean) from None


def is_repo_id(text: str) -> bool:
    """Whether ``text`` is a repository id OWNER/NAME (serve uses it to tell a repo id from a missing folder)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text.split("/")


def select_paths(paths: Iterable[str], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """Filter repo paths: keep those matching any include pattern (all if none), drop any excluded."""
    inc, exc = _patterns(include), _patterns(exclude)
    return [p for p in paths
            if (not inc or any(fnmatch.fnmatchcase(p, pat) for pat in inc))
            and not any(fnmatch.fnmatchcase(p, pat) for pat in exc)]


def safe_target(local_dir: Path, name: str) -> Path:
    """Where ``name`` goes under ``local_dir``; raises UnsafePathError when it could land elsewhere."""
    bad = (not name or "\\" in name or "\0" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name)
           or any(part in ("", ".", "..") for part in name.split("/")))
    if bad:
        raise UnsafePathError(f"refusing file name {name!r} listed by the hub: it could be written outside "
                              f"{local_dir}")
    if name.split("/")[0] == ".hub_cli":
        raise UnsafePathError(f"refusing file name {name!r} listed by the hub: .hub_cli/ is this tool's folder")
    target = local_dir.joinpath(*PurePosixPath(name).parts)
    probe = local_dir
    for part in PurePosixPath(name).parts:
        probe = probe / part
        if probe.is_symlink():
            raise UnsafePathError(f"refusing to write {name!r}: {probe} is a symbolic link")
    return target


# ---------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------
def _fetch(repo: str, *, source: str, revision: str | None, include: Sequence[str], exclude: Sequence[str],
           local_dir: str | os.PathLike[str] | None, token: str | None, max_workers: int, endpoint: str | None,
           quiet: bool, retries: int, backoff: float, via: str, no_xet: bool) -> Path:
    source = _normalize_source(source)
    if not is_repo_id(repo):
        raise UsageError(f"invalid repository id {repo!r}: expected OWNER/NAME")
    if max_workers < 1:
        raise UsageError("--max-workers must be at least 1")
    if via not in ("http", "git"):
        raise UsageError(f"--via must be http or git, not {via!r}")
    if via == "git" and source != "openxlab":
        raise UsageError("--via git is only offered for --source openxlab")
    if source == "openxlab" and revision and via != "git":
        raise UsageError("OpenXLab's download API has no revisions; use --via git --revision REV")
    target_dir = Path(local_dir) if local_dir is not None else Path.cwd() / repo.split("/", 1)[1]
    target_dir = Path(os.path.abspath(target_dir))
    if target_dir.exists() and not target_dir.is_dir():
        raise UsageError(f"--local-dir {target_dir} exists and is not a folder")
    if quiet:
        for name in ("huggingface_hub", "modelscope_hub", "hub_cli"):
            logging.getLogger(name).setLevel(logging.ERROR)

    if via == "git":
        return _fetch_git(repo, target_dir, revision=revision, include=include, exclude=exclude,
                          token=token, endpoint=endpoint, quiet=quiet)

    endpoint = (endpoint or os.environ.get(ENDPOINT_ENV[source]) or DEFAULT_ENDPOINTS[source]).rstrip("/")
    backend: _Backend = {"hf": _HF, "modelscope": _ModelScope, "openxlab": _OpenXLab}[source](
        repo, endpoint=endpoint, token=token, target_dir=target_dir, quiet=quiet, no_xet=no_xet)
    secrets = _secrets(token)
    commit, listing = _retrying(lambda: backend.list(revision), retries, backoff, secrets)

    by_path = {f.path: f for f in listing}
    chosen = select_paths(sorted(by_path), include, exclude)
    if not chosen:
        what = f"matches --include {' '.join(include)}" if include else "is left after --exclude"
        raise NotFoundError(f"no file of {repo} ({source}, revision {revision or 'default'}) {what}")
    targets = {p: safe_target(target_dir, p) for p in chosen}  # refuse before writing anything

    target_dir.mkdir(parents=True, exist_ok=True)
    manifest = _Manifest.load(target_dir, source=source, repo=repo)
    todo = [by_path[p] for p in chosen if not manifest.up_to_date(targets[p], by_path[p])]
    log.info("%s: %d of %d selected files to download", repo, len(todo), len(chosen))

    def one(f: RemoteFile) -> None:
        target = targets[f.path]
        for attempt in range(2):  # a file that fails verification is fetched once more from scratch
            try:
                rec = _retrying(lambda: backend.download(f, target, force=attempt > 0), retries, backoff,
                                 secrets)
                manifest.record(target, f, rec or _verify(target, f))
                return
            except IntegrityError as exc:
                backend.discard(f, target)
                if attempt == 1 or not backend.refetch_on_mismatch:
                    if repo in exc.message:
                        raise
                    raise IntegrityError(f"{repo} on {source}: {exc.message}; the download was discarded"
                                         ) from None

    try:
        with _silenced(quiet):
            _run_pool(one, todo, max_workers=max_workers, quiet=quiet, desc=f"Fetching {repo}")
    finally:
        manifest.save(endpoint=endpoint, revision=revision, commit=commit)
    return target_dir


def _run_pool(fn: Callable[[RemoteFile], None], files: list[RemoteFile], *, max_workers: int, quiet: bool,
              desc: str) -> None:
    if not files:
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=len(files), unit="file", desc=desc, disable=quiet, leave=True)
    stop = threading.Event()

    def task(f: RemoteFile) -> None:
        if stop.is_set():
            return
        fn(f)
        bar.update(1)

    pool = ThreadPoolExecutor(max_workers=min(max_workers, len(files)), thread_name_prefix="hub_cli-fetch")
    try:
        futures = [pool.submit(task, f) for f in files]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [fut for fut in done if fut.exception() is not None]
        if failed:  # let the files in flight finish (their partial data stays resumable), start no more
            stop.set()
            for fut in pending:
                fut.cancel()
            wait(pending)
    except BaseException:  # Ctrl-C: start nothing new; partial files stay for the next run
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    if failed:
        errors = [fut.exception() for fut in failed]
        # report the most specific failure: a typed hub error before anything else
        errors.sort(key=lambda e: 0 if isinstance(e, HubCliError) else 1)
        raise errors[0]  # type: ignore[misc]


def _retrying(call: Callable[[], Any], retries: int, backoff: float, secrets: Sequence[str] = ()) -> Any:
    for attempt in range(retries + 1):
        try:
            return call()
        except NetworkError as exc:
            if attempt >= retries:
                raise
            delay = min(_MAX_BACKOFF, backoff * (2 ** attempt))
            log.warning("%s; retry %d/%d in %.1fs", redact(exc.message, secrets), attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _verify(target: Path, f: RemoteFile) -> dict[str, Any]:
    """Hash ``target`` once; compare with the listing. Returns the manifest record."""
    if not target.is_file() or target.is_symlink():
        raise IntegrityError(f"{f.path}: the client reported success but {target} is missing")
    size, sha256, git_oid = _hash_file(target)
    if f.size is not None and size != f.size:
        raise IntegrityError(f"{f.path}: size {size} differs from the listed {f.size} bytes")
    if f.sha256 and sha256 != f.sha256.lower():
        raise IntegrityError(f"{f.path}: sha256 {sha256[:16]}… differs from the listed {f.sha256[:16]}…")
    if not f.sha256 and f.git_oid and git_oid != f.git_oid.lower():
        raise IntegrityError(f"{f.path}: git blob hash {git_oid[:16]}… differs from the listed "
                             f"{f.git_oid[:16]}…")
    return {"size": size, "sha256": sha256, "git_oid": git_oid,
            "verified": "sha256" if f.sha256 else "git_oid" if f.git_oid else "size" if f.size is not None
            else "none"}


def _hash_file(path: Path) -> tuple[int, str, str]:
    size = path.stat().st_size
    sha = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            sha.update(block)
            git.update(block)
    return size, sha.hexdigest(), git.hexdigest()


class _Manifest:
    """``.hub_cli/manifest.json``: what was downloaded and verified, keyed by repo path."""

    def __init__(self, root: Path, source: str, repo: str, files: dict[str, dict[str, Any]]) -> None:
        self.root, self.source, self.repo, self.files = root, source, repo, files
        self._lock = threading.Lock()

    @classmethod
    def load(cls, root: Path, *, source: str, repo: str) -> "_Manifest":
        files: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads((root / MANIFEST_PATH).read_text())
            if data.get("source") == source and data.get("repo") == repo:
                files = dict(data.get("files", {}))
        except (OSError, ValueError, AttributeError):
            pass
        return cls(root, source, repo, files)

    def up_to_date(self, target: Path, f: RemoteFile) -> bool:
        """True when ``target`` is what the listing describes: by the manifest (no hashing) or by hashing."""
        if not target.is_file() or target.is_symlink():
            return False
        st = target.stat()
        rec = self.files.get(f.path)
        if (rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
                and (f.size is None or f.size == st.st_size)
                and ((f.sha256 and rec.get("sha256") == f.sha256.lower())
                     or (not f.sha256 and f.git_oid and rec.get("git_oid") == f.git_oid.lower())
                     or (not f.sha256 and not f.git_oid))):
            return True
        if not (f.sha256 or f.git_oid):
            return False  # nothing to compare an unknown local file with: download it again
        try:
            self.record(target, f, _verify(target, f))
        except IntegrityError:
            return False
        return True

    def record(self, target: Path, f: RemoteFile, rec: dict[str, Any]) -> None:
        rec = dict(rec, mtime_ns=target.stat().st_mtime_ns)
        with self._lock:
            self.files[f.path] = rec

    def save(self, *, endpoint: str, revision: str | None, commit: str | None) -> None:
        path = self.root / MANIFEST_PATH
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            data = {"format": 1, "source": self.source, "endpoint": _strip_userinfo(endpoint), "repo": self.repo,
                    "revision": revision, "commit": commit, "updated": int(time.time()),
                    "files": dict(sorted(self.files.items()))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------
class _Backend:
    refetch_on_mismatch = True

    def __init__(self, repo: str, *, endpoint: str, token: str | None, target_dir: Path, quiet: bool,
                 no_xet: bool) -> None:
        self.repo, self.endpoint, self.target_dir, self.quiet = repo, endpoint, target_dir, quiet
        self._token = token or None

    def __repr__(self) -> str:  # never show the token
        return f"{type(self).__name__}(repo={self.repo!r}, endpoint={self.endpoint!r})"

    def list(self, revision: str | None) -> tuple[str | None, list[RemoteFile]]:
        raise NotImplementedError

    def download(self, f: RemoteFile, target: Path, *, force: bool) -> dict[str, Any] | None:
        """Put the file at ``target``; return its verification record if the backend verified it."""
        raise NotImplementedError

    def discard(self, f: RemoteFile, target: Path) -> None:
        target.unlink(missing_ok=True)


class _HF(_Backend):
    """huggingface_hub: repo_info (A1) → list_repo_tree (A2) → hf_hub_download per file into local_dir."""

    def __init__(self, repo: str, **kw: Any) -> None:
        super().__init__(repo, **kw)
        custom = self.endpoint != DEFAULT_ENDPOINTS["hf"]
        _configure_hf(self.endpoint if custom else None, no_xet=kw["no_xet"] or custom)
        from huggingface_hub import HfApi
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        if self.quiet and not are_progress_bars_disabled():
            disable_progress_bars()
        self.api = HfApi(endpoint=self.endpoint, token=self._token, library_name="hub_cli")
        self.commit: str | None = None

    def list(self, revision: str | None) -> tuple[str | None, list[RemoteFile]]:
        from huggingface_hub import RepoFile

        with self._errors(f"revision {revision or 'main'}"):
            info = self.api.repo_info(self.repo, revision=revision)
            self.commit = info.sha
            entries = list(self.api.list_repo_tree(self.repo, revision=self.commit, recursive=True))
        files = []
        for e in entries:
            if isinstance(e, RepoFile):
                lfs = e.lfs.sha256 if e.lfs is not None else None
                files.append(RemoteFile(path=e.path, size=e.size, sha256=lfs,
                                        git_oid=None if lfs else e.blob_id))
        return self.commit, files

    def download(self, f: RemoteFile, target: Path, *, force: bool) -> dict[str, Any] | None:
        from huggingface_hub import hf_hub_download

        with self._errors(f"file {f.path}"):
            hf_hub_download(self.repo, f.path, revision=self.commit, local_dir=self.target_dir,
                            endpoint=self.endpoint, token=self._token, force_download=force,
                            library_name="hub_cli")
        return None

    def discard(self, f: RemoteFile, target: Path) -> None:
        target.unlink(missing_ok=True)
        meta = self.target_dir / ".cache" / "huggingface" / "download" / f"{f.path}.metadata"
        meta.unlink(missing_ok=True)

    def _errors(self, what: str) -> "_ErrorMap":
        return _ErrorMap(self._map_error, what)

    def _map_error(self, exc: BaseException, what: str) -> HubCliError | None:
        from huggingface_hub import errors as hf
        from huggingface_hub.utils import httpx

        where = f"{self.repo} on hf"
        url = _response_url(exc)
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, hf.OfflineModeIsEnabled):
            return NetworkError(f"HF_HUB_OFFLINE is set, so {where} cannot be fetched; unset it to download")
        if isinstance(exc, hf.GatedRepoError):
            return AuthError(f"{where} is gated (HTTP {status} for {url}): accept its conditions on the hub "
                             "and pass --token or set HF_TOKEN")
        if isinstance(exc, hf.RevisionNotFoundError):
            return NotFoundError(f"{what} not found in {where} (HTTP {status} for {url})")
        if isinstance(exc, hf.RemoteEntryNotFoundError):
            return NotFoundError(f"{what} not found in {where} (HTTP {status} for {url})")
        if isinstance(exc, hf.HfHubHTTPError):
            if status in (401, 403):
                hint = ("the token was rejected" if self._token or os.environ.get("HF_TOKEN")
                        else "the repository is private, gated or missing; pass --token or set HF_TOKEN")
                return AuthError(f"HTTP {status} for {url}: not authorised to read {where}: {hint}")
            if status == 404:
                return NotFoundError(f"repository {where} not found (HTTP 404 for {url})")
            if status is not None and (status >= 500 or status == 429):
                return NetworkError(f"HTTP {status} for {url} while fetching {what} of {where}")
            return HubCliError(f"HTTP {status} for {url} while fetching {what} of {where}")
        if isinstance(exc, hf.FileMetadataError):
            return HubCliError(f"{self.endpoint} does not answer like a Hugging Face hub ({what})")
        if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
            return NetworkError(f"network error while fetching {what} of {where} from {self.endpoint}: "
                                f"{type(exc).__name__}")
        if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
            return NetworkError(f"{what} of {where} arrived with the wrong size; retrying")
        return None


class _ModelScope(_Backend):
    """modelscope_hub: legacy file listing, then HubApi.download_file per file (size + sha256 checked)."""

    refetch_on_mismatch = False  # the client already retried a hash mismatch 3 times

    def __init__(self, repo: str, **kw: Any) -> None:
        super().__init__(repo, **kw)
        _configure_modelscope(self.endpoint)
        from modelscope_hub import HubApi
        from modelscope_hub.config import HubConfig

        self.api = HubApi(HubConfig(endpoint=self.endpoint, token=self._token))
        if self.quiet:  # the client sets its level from MODELSCOPE_LOG_LEVEL when imported
            logging.getLogger("modelscope_hub").setLevel(logging.ERROR)
        self.revision = "master"

    def list(self, revision: str | None) -> tuple[str | None, list[RemoteFile]]:
        from modelscope_hub.errors import NotExistError

        self.revision = revision or "master"
        with _ErrorMap(self._map_error, f"revision {self.revision}"):
            try:
                raw = self.api.legacy.list_repo_files(repo_id=self.repo, repo_type="model",
                                                      revision=self.revision, recursive=True)
            except NotExistError:
                # the listing answers 404 for a missing repo and a missing revision alike
                with _ErrorMap(self._map_error, "repository"):
                    self.api.legacy.get_repo_info(self.repo, "model")
                raise
        files, commits = [], set()
        for e in raw:
            if str(e.get("Type", "blob")).lower() == "tree":
                continue
            path = str(e.get("Path") or e.get("Name") or "")
            sha = str(e.get("Sha256") or "").lower()
            size = e.get("Size")
            files.append(RemoteFile(path=path, size=int(size) if size is not None else None,
                                    sha256=sha if re.fullmatch(r"[0-9a-f]{64}", sha) else None))
            if e.get("Revision"):
                commits.add(str(e["Revision"]))
        return (commits.pop() if len(commits) == 1 else None), files

    def download(self, f: RemoteFile, target: Path, *, force: bool) -> dict[str, Any] | None:
        with _ErrorMap(self._map_error, f"file {f.path}"):
            self.api.download_file(self.repo, "model", f.path, revision=self.revision, local_dir=self.target_dir,
                                   force=force, expected_sha256=f.sha256, file_size=f.size)
        return None

    def _map_error(self, exc: BaseException, what: str) -> HubCliError | None:
        from modelscope_hub import errors as ms

        where = f"{self.repo} on modelscope"
        url = _strip_userinfo(getattr(exc, "url", None) or self.endpoint)
        status = getattr(exc, "status_code", None)
        if isinstance(exc, ms.NotExistError):
            if what == "repository":
                return NotFoundError(f"repository {where} not found (HTTP {status or 404} for {url})")
            return NotFoundError(f"{what} of {where} not found (HTTP {status or 404} for {url})")
        if isinstance(exc, (ms.AuthenticationError, ms.PermissionDeniedError)):
            hint = ("the token was rejected" if self._token or os.environ.get("MODELSCOPE_API_TOKEN")
                    else "the repository is private or missing; pass --token or set MODELSCOPE_API_TOKEN")
            return AuthError(f"HTTP {status} for {url}: not authorised to read {where}: {hint}")
        if isinstance(exc, ms.FileIntegrityError):
            return IntegrityError(f"{what} of {where} failed verification: {_first_line(exc)}")
        if isinstance(exc, (ms.NetworkError, ms.ServerError, ms.RateLimitError)):
            return NetworkError(f"network error while fetching {what} of {where} ({url}): {_first_line(exc)}")
        if isinstance(exc, ms.HubError):
            return HubCliError(f"{what} of {where}: {_first_line(exc)}")
        return None


class _OpenXLab(_Backend):
    """Our client for OpenXLab's two-step protocol; partial files live in ``.hub_cli/incomplete/``."""

    def __init__(self, repo: str, **kw: Any) -> None:
        super().__init__(repo, **kw)
        from hub_cli.openxlab import OpenXLabClient

        token, ak, sk = self._token, None, None
        if token and ":" in token:  # "AK:SK"
            ak, _, sk = token.partition(":")
            token = None
        self.client = OpenXLabClient(self.endpoint, token=token, ak=ak, sk=sk)
        self.partial_dir = self.target_dir / ".hub_cli" / "incomplete"

    def list(self, revision: str | None) -> tuple[str | None, list[RemoteFile]]:
        files = self.client.list_files(self.repo)
        return None, [RemoteFile(path=f.path, size=f.size, sha256=f.sha256, url=f.url) for f in files]

    def _part(self, f: RemoteFile) -> Path:
        key = hashlib.sha256(f"{f.path}\0{f.sha256}\0{f.size}".encode()).hexdigest()[:24]
        return self.partial_dir / f"{key}.part"

    def download(self, f: RemoteFile, target: Path, *, force: bool) -> dict[str, Any] | None:
        from hub_cli.openxlab import OpenXLabFile

        from tqdm.auto import tqdm

        part = self._part(f)
        part.parent.mkdir(parents=True, exist_ok=True)
        if force:
            part.unlink(missing_ok=True)
        with tqdm(total=f.size, unit="B", unit_scale=True, unit_divisor=1024, desc=f.path, leave=False,
                  disable=self.quiet) as bar:
            self.client.download(OpenXLabFile(f.path, f.url or "", f.size, f.sha256), part, progress=bar.update)
        try:
            rec = _verify(part, f)
        except IntegrityError:
            part.unlink(missing_ok=True)
            raise
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)
        return rec

    def discard(self, f: RemoteFile, target: Path) -> None:
        target.unlink(missing_ok=True)
        self._part(f).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# git route (OpenXLab)
# ---------------------------------------------------------------------------------------------------------
def _fetch_git(repo: str, target_dir: Path, *, revision: str | None, include: Sequence[str],
               exclude: Sequence[str], token: str | None, endpoint: str | None, quiet: bool) -> Path:
    from hub_cli import openxlab

    base = endpoint or os.environ.get(openxlab.ENV_GIT_URL) or openxlab.DEFAULT_GIT_URL
    target_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="git-", dir=_ensure(target_dir / ".hub_cli")))
    try:
        clone = work / "clone"
        commit, paths = openxlab.git_clone(repo, clone, base_url=base, revision=revision, token=token)
        chosen = select_paths(sorted(paths), include, exclude)
        if not chosen:
            raise NotFoundError(f"no file of {repo} (git {revision or 'HEAD'}) matches the --include/--exclude")
        targets = {p: safe_target(target_dir, p) for p in chosen}
        pointers = {p: ptr for p in chosen if (ptr := openxlab.lfs_pointer(clone / p))}
        if pointers:
            openxlab.git_lfs_pull(clone, sorted(pointers), token=token)
        manifest = _Manifest.load(target_dir, source="openxlab", repo=repo)
        for p in chosen:
            src = clone / p
            if src.is_symlink():
                raise UnsafePathError(f"refusing {p!r}: it is a symbolic link in the git repository")
            sha, size = pointers.get(p, (None, None))
            f = RemoteFile(path=p, size=size, sha256=sha)
            rec = _verify(src, f)  # LFS content against its pointer; git checked the rest
            targets[p].parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, targets[p])
            manifest.record(targets[p], f, rec)
        manifest.save(endpoint=base, revision=revision, commit=commit)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        log.info("cloned %s at %s", repo, commit)
    return target_dir


# ---------------------------------------------------------------------------------------------------------
# Client configuration (must run before the client is imported; spec §1.4, §2.2, §6.9)
# ---------------------------------------------------------------------------------------------------------
def _configure_hf(endpoint: str | None, *, no_xet: bool) -> None:
    """Telemetry (and the agent-registry fetch) off; HF_ENDPOINT for a custom endpoint; xet off if asked.

    huggingface_hub reads these once, at import. When it was imported earlier in this process, the
    same switches are set on its constants module, which the library consults at call time.
    """
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if endpoint:
        os.environ["HF_ENDPOINT"] = endpoint
    if no_xet:
        os.environ["HF_HUB_DISABLE_XET"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_DISABLE_TELEMETRY = True
        if no_xet:
            constants.HF_HUB_DISABLE_XET = True


def _configure_modelscope(endpoint: str) -> None:
    """No intra-cloud probe (it may contact an address the server names) unless the user enabled it."""
    os.environ.setdefault("MODELSCOPE_DOWNLOAD_INTRA_CLOUD", "false")
    os.environ.setdefault("INTRA_CLOUD_ACCELERATION", "false")
    if endpoint != DEFAULT_ENDPOINTS["modelscope"]:
        os.environ["MODELSCOPE_ENDPOINT"] = endpoint


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
class _ErrorMap:
    """Context manager translating a client's exceptions into HubCliError subclasses."""

    def __init__(self, mapper: Callable[[BaseException, str], HubCliError | None], what: str) -> None:
        self.mapper, self.what = mapper, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, (HubCliError, KeyboardInterrupt)):
            return False
        mapped = self.mapper(exc, self.what)
        if mapped is None:
            return False
        raise mapped from None


@contextlib.contextmanager
def _silenced(enabled: bool) -> Iterator[None]:
    """Quiet mode: the clients' own per-file progress bars go to stderr and, once tqdm is imported, cannot
    be switched off through the environment any more; send stderr to /dev/null while downloading
    (failures are raised, not printed)."""
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def _normalize_source(source: str) -> str:
    s = source.strip().lower()
    s = {"huggingface": "hf", "ms": "modelscope", "ox": "openxlab"}.get(s, s)
    if s not in SOURCES:
        raise UsageError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
    return s


def _patterns(values: Sequence[str]) -> list[str]:
    out = []
    for value in values:
        for pat in value.split(","):
            pat = pat.strip()
            if pat:
                out.append(pat + "*" if pat.endswith("/") else pat)
    return out


def _secrets(token: str | None) -> list[str]:
    if not token:
        return []
    return [token, *token.split(":", 1)] if ":" in token else [token]


def _strip_userinfo(url: str) -> str:
    return re.sub(r"(?<=://)[^/@]*@", "", url)


def _response_url(exc: BaseException) -> str:
    try:
        url = str(exc.response.request.url)  # type: ignore[attr-defined]
    except Exception:
        return "the hub"
    return _strip_userinfo(url.split("?", 1)[0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
