"""hub_cli fetch against the fake hub, with the unmodified official clients (HF, ModelScope) and our OpenXLab client.

Hugging Face runs in a subprocess of the console script: huggingface_hub reads its environment once, at
import, and other tests of the suite import it first (spec hubs.md §6.9). ModelScope and OpenXLab run in
process through click's CliRunner or the library function. Every process refuses to resolve any host but
127.0.0.1 / localhost / ::1, so a request to a real hub fails loudly.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from conftest import NETGUARD_SITECUSTOMIZE
from fakehub import FakeHub

from hub_cli.cli import main
from hub_cli.errors import UnsafePathError
from hub_cli.fetch import fetch, safe_target, select_paths

TOKEN = "hf_SeCrEt_tok3n_0123456789"
WRONG_TOKEN = "wrong_SeCrEt_value_987654"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

_NETGUARD = NETGUARD_SITECUSTOMIZE


# ---------------------------------------------------------------------------------------------------------
# Fixtures: repositories, the hub, a network guard, a clean client environment
# ---------------------------------------------------------------------------------------------------------
def _safetensors(n_floats: int) -> bytes:
    data = struct.pack(f"<{n_floats}f", *[(i % 97) / 7.0 for i in range(n_floats)])
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, len(data)]},
                         "__metadata__": {"format": "pt"}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repos")

    def write(repo: str, rev: str, files: dict[str, bytes], settings: dict | None = None) -> None:
        for name, data in files.items():
            path = root / repo / rev / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if settings is not None:
            (root / repo / ".fakehub.json").write_text(json.dumps(settings))

    main_files = {
        "config.json": json.dumps({"architectures": ["InternVLChatModel"], "revision": "main"}).encode(),
        "model.safetensors": _safetensors(1500),  # ~6 KB, LFS above the 1 KiB threshold
        "tokenizer/tokenizer.json": json.dumps({"model": {"type": "BPE"}, "added_tokens": []}).encode(),
    }
    write("owner/tiny", "main", main_files, {"lfs_threshold": 1024})
    write("owner/tiny", "v2", {"config.json": b'{"revision": "v2"}', "model.safetensors": _safetensors(400)})
    write("owner/private", "main", {"config.json": b'{"private": true}'},
          {"private": True, "tokens": [TOKEN]})
    write("owner/hostile", "main", {"config.json": b"{}"}, {"advertise": {"../evil.txt": "config.json"}})
    write("owner/axs", "main", {"config.json": b'{"ak": true}'}, {"private": True})
    return root


@pytest.fixture
def hub(repos: Path):
    with FakeHub(repos, page_size=2) as server:  # page size 2: the HF tree listing is paginated
        yield server


@pytest.fixture(autouse=True)
def netguard(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def guard(host, *args, **kwargs):
        if host not in _LOCAL_HOSTS:
            raise socket.gaierror(f"test network guard: refusing to resolve {host!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guard)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub, tmp_path_factory) -> dict[str, str]:
    """A clean environment (spec §6.9), applied in process and returned for subprocesses."""
    home = tmp_path / "home"
    home.mkdir()
    for key in list(os.environ):
        if key.startswith(("HF_", "HUGGING", "MODELSCOPE_", "OPENXLAB_", "HUB_CLI_")) or key in (
                "TRANSFORMERS_OFFLINE", "INTRA_CLOUD_ACCELERATION", "TQDM_DISABLE"):
            monkeypatch.delenv(key)
    values = {
        "HOME": str(home), "HF_HOME": str(home / "hf"), "MODELSCOPE_CACHE": str(home / "ms-cache"),
        "MODELSCOPE_HOME": str(home / "ms-home"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_ENDPOINT": hub.hf_endpoint, "MODELSCOPE_ENDPOINT": hub.ms_endpoint,
        "MODELSCOPE_DOWNLOAD_INTRA_CLOUD": "false", "INTRA_CLOUD_ACCELERATION": "false",
        "HUB_CLI_OPENXLAB_ENDPOINT": hub.openxlab_endpoint, "TQDM_DISABLE": "",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HUB_CLI_RETRY_BACKOFF": "0.01",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    guard_dir = tmp_path / "netguard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(_NETGUARD)
    sub = dict(os.environ)
    sub["PYTHONPATH"] = os.pathsep.join([str(guard_dir), sub.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return sub


def _endpoint(hub: FakeHub, source: str) -> str:
    return {"hf": hub.hf_endpoint, "modelscope": hub.ms_endpoint, "openxlab": hub.openxlab_endpoint}[source]


def run_cli(source: str, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """HF: a subprocess of the console script; others: click's CliRunner in process. Returns (code, output)."""
    if source == "hf":
        script = Path(sys.executable).parent / "hub_cli"
        cmd = [str(script)] if script.exists() else [sys.executable, "-c", "from hub_cli.cli import main; main()"]
        proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout + proc.stderr
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.output  # click >= 8.2: stdout and stderr interleaved


def cli_fetch(hub: FakeHub, source: str, repo: str, dest: Path, env: dict[str, str], *extra: str) -> tuple[int, str]:
    args = ["fetch", repo, "--source", source, "--endpoint", _endpoint(hub, source), "--local-dir", str(dest),
            "--quiet", *extra]
    return run_cli(source, args, env)


def visible_files(folder: Path) -> dict[str, bytes]:
    """Files a user or a loader would see: everything outside hidden tool folders."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            out[rel] = p.read_bytes()
    return out


def source_bytes(repos: Path, repo: str, rev: str = "main") -> dict[str, bytes]:
    return visible_files(repos / repo / rev)


SOURCES = ["hf", "modelscope", "openxlab"]


# ---------------------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES)
def test_fetch_small_repo(source, hub, env, repos, tmp_path):
    dest = tmp_path / "out"
    code, out = cli_fetch(hub, source, "owner/tiny", dest, env)
    assert code == 0, out
    assert out.strip().splitlines()[-1] == str(dest)
    assert visible_files(dest) == source_bytes(repos, "owner/tiny")
    assert not [p for p in dest.rglob("*") if p.name.endswith((".incomplete", ".part"))]
    manifest = json.loads((dest / ".hub_cli" / "manifest.json").read_text())
    assert manifest["source"] == source and manifest["repo"] == "owner/tiny"
    assert set(manifest["files"]) == set(source_bytes(repos, "owner/tiny"))
    assert {rec["verified"] for rec in manifest["files"].values()} <= {"sha256", "git_oid"}
    # everything went to the configured mount point; no telemetry, no xet
    assert all(r.hub in ("hf", "ms", "ox") for r in hub.log)
    assert not hub.requests(kind="telemetry")
    if source == "hf":
        assert manifest["commit"] == hub.commit("owner/tiny")
        assert len(hub.requests(contains="/tree/")) >= 2  # the paginated listing was followed


@pytest.mark.parametrize("source", ["hf", "modelscope"])
def test_revision_and_include(source, hub, env, repos, tmp_path):
    dest = tmp_path / "out"
    code, out = cli_fetch(hub, source, "owner/tiny", dest, env, "--revision", "v2", "--include", "*.json")
    assert code == 0, out
    assert visible_files(dest) == {"config.json": b'{"revision": "v2"}'}
    assert not hub.requests(contains="model.safetensors", kind="file")


@pytest.mark.parametrize("source", SOURCES)
def test_include_exclude(source, hub, env, repos, tmp_path):
    dest = tmp_path / "out"
    code, out = cli_fetch(hub, source, "owner/tiny", dest, env, "--include", "*.json,*.safetensors",
                          "--exclude", "tokenizer/")
    assert code == 0, out
    want = source_bytes(repos, "owner/tiny")
    del want["tokenizer/tokenizer.json"]
    assert visible_files(dest) == want


def test_openxlab_revision_is_a_usage_error(hub, env, tmp_path):
    code, out = cli_fetch(hub, "openxlab", "owner/tiny", tmp_path / "out", env, "--revision", "v2")
    assert code == 2 and "revision" in out


@pytest.mark.parametrize("source", SOURCES)
def test_second_fetch_downloads_nothing(source, hub, env, repos, tmp_path):
    dest = tmp_path / "out"
    assert cli_fetch(hub, source, "owner/tiny", dest, env)[0] == 0
    assert hub.requests(kind="file", method="GET")
    hub.clear_log()
    code, out = cli_fetch(hub, source, "owner/tiny", dest, env)
    assert code == 0, out
    assert hub.requests(kind="file") == []  # no HEAD, no GET of any file
    assert visible_files(dest) == source_bytes(repos, "owner/tiny")
    # a file changed on disk is noticed and fetched again
    (dest / "config.json").write_bytes(b"tampered")
    hub.clear_log()
    assert cli_fetch(hub, source, "owner/tiny", dest, env)[0] == 0
    assert visible_files(dest) == source_bytes(repos, "owner/tiny")
    assert [r.file_key for r in hub.requests(kind="file", method="GET")] == ["owner/tiny/config.json"]


@pytest.mark.parametrize("source", SOURCES)
def test_dropped_connection_is_resumed(source, hub, env, repos, tmp_path):
    dest = tmp_path / "out"
    hub.add_fault("*model.safetensors", "truncate", after_bytes=1500)
    code, out = cli_fetch(hub, source, "owner/tiny", dest, env, "--include", "model.safetensors")
    assert code == 0, out
    assert visible_files(dest) == {"model.safetensors": source_bytes(repos, "owner/tiny")["model.safetensors"]}
    gets = hub.requests(kind="file", method="GET")
    assert [g.fault for g in gets] == ["truncate", None]
    if source != "hf":  # HF resumes only from its last 10 MiB chunk boundary, i.e. here from 0
        assert gets[1].headers.get("range") == "bytes=1500-"
    manifest = json.loads((dest / ".hub_cli" / "manifest.json").read_text())
    assert manifest["files"]["model.safetensors"]["verified"] == "sha256"


def test_openxlab_partial_file_resumes_across_runs(hub, env, repos, tmp_path):
    dest = tmp_path / "out"
    hub.add_fault("*model.safetensors", "truncate", after_bytes=2000, times=None)
    with pytest.raises(Exception) as info:
        fetch("owner/tiny", source="openxlab", endpoint=hub.openxlab_endpoint, local_dir=dest,
              include=["model.safetensors"], quiet=True, retries=1, backoff=0.01)
    assert getattr(info.value, "exit_code", None) == 6
    assert not (dest / "model.safetensors").exists()
    # the retry within the run resumed too
    assert [g.headers.get("range") for g in hub.requests(kind="file", method="GET")] == [None, "bytes=2000-"]
    hub.clear_faults()
    hub.clear_log()
    fetch("owner/tiny", source="openxlab", endpoint=hub.openxlab_endpoint, local_dir=dest,
          include=["model.safetensors"], quiet=True, backoff=0.01)
    assert [g.headers.get("range") for g in hub.requests(kind="file", method="GET")] == ["bytes=4000-"]
    assert (dest / "model.safetensors").read_bytes() == source_bytes(repos, "owner/tiny")["model.safetensors"]


@pytest.mark.parametrize("source", ["modelscope", "openxlab"])
def test_server_errors_are_retried(source, hub, env, repos, tmp_path):
    dest = tmp_path / "out"
    hub.add_fault("*config.json", "status", status=503, nth=1, times=2)
    hub.add_fault("*model.safetensors", "drop", nth=1, times=1)
    fetch("owner/tiny", source=source, endpoint=_endpoint(hub, source), local_dir=dest, quiet=True, backoff=0.01)
    assert visible_files(dest) == source_bytes(repos, "owner/tiny")
    statuses = [r.status for r in hub.requests(kind="file", method="GET") if r.file_key.endswith("config.json")]
    assert statuses[:2] == [503, 503] and statuses[-1] == 200


def test_hf_server_error_is_retried(hub, env, repos, tmp_path):
    hub.add_fault("/hf/api/models/owner/tiny", "status", status=500, times=1)  # repo info (A1)
    hub.add_fault("*model.safetensors", "status", status=502, method="GET", times=1)
    code, out = cli_fetch(hub, "hf", "owner/tiny", tmp_path / "out", env)
    assert code == 0, out
    assert visible_files(tmp_path / "out") == source_bytes(repos, "owner/tiny")
    assert [r.status for r in hub.log if r.path == "/hf/api/models/owner/tiny"] == [500, 200]
    assert [r.status for r in hub.requests(method="GET", contains="model.safetensors")] == [502, 200]


def test_persistent_server_error_is_a_network_error(hub, env, tmp_path):
    hub.add_fault("*getFileDownloadUrl", "status", status=502, times=None)
    code, out = cli_fetch(hub, "openxlab", "owner/tiny", tmp_path / "out", env, "--retries", "1")
    assert code == 6 and "502" in out
    assert len(hub.requests(contains="getFileDownloadUrl")) == 2


# ---------------------------------------------------------------------------------------------------------
# Integrity and safety
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES)
def test_wrong_hash_is_an_error_and_leaves_nothing(source, hub, env, tmp_path):
    dest = tmp_path / "out"
    hub.add_fault("owner/tiny/model.safetensors", "wrong_hash")
    code, out = cli_fetch(hub, source, "owner/tiny", dest, env)
    assert code == 5, out
    assert "model.safetensors" in out and len(out.strip().splitlines()) == 1
    assert "model.safetensors" not in visible_files(dest)
    assert not [p for p in dest.rglob("*model.safetensors*") if p.is_file() and p.stat().st_size > 0
                and not p.name.endswith((".incomplete", ".part"))]
    manifest = json.loads((dest / ".hub_cli" / "manifest.json").read_text())
    assert "model.safetensors" not in manifest["files"]


@pytest.mark.parametrize("source", SOURCES)
def test_traversal_name_is_refused(source, hub, env, tmp_path):
    dest = tmp_path / "deep" / "out"
    code, out = cli_fetch(hub, source, "owner/hostile", dest, env)
    assert code == 7, out
    assert "../evil.txt" in out
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert hub.requests(kind="file") == []  # refused before anything was downloaded


def test_symlink_inside_target_is_refused(hub, env, tmp_path):
    dest, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (dest / "tokenizer").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        fetch("owner/tiny", source="openxlab", endpoint=hub.openxlab_endpoint, local_dir=dest, quiet=True)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "a\\..\\x", "C:/x", "a//b", "./a", "",
                                  ".hub_cli/manifest.json"])
def test_safe_target_rejects(name, tmp_path):
    with pytest.raises(UnsafePathError):
        safe_target(tmp_path, name)


def test_safe_target_accepts_nested(tmp_path):
    assert safe_target(tmp_path, "a/b.c/d..e") == tmp_path / "a" / "b.c" / "d..e"


def test_select_paths_semantics():
    paths = ["config.json", "sub/a.json", "sub/b.bin", "model.safetensors"]
    assert select_paths(paths, ["*.json"]) == ["config.json", "sub/a.json"]  # '*' crosses '/'
    assert select_paths(paths, ["sub/"]) == ["sub/a.json", "sub/b.bin"]
    assert select_paths(paths, ["*.json,*.bin"], ["sub/a*"]) == ["config.json", "sub/b.bin"]
    assert select_paths(paths, (), ["*.json"]) == ["sub/b.bin", "model.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# Errors, exit codes, tokens
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES)
def test_not_found_and_unauthorised_differ(source, hub, env, tmp_path):
    code_404, out_404 = cli_fetch(hub, source, "owner/missing", tmp_path / "a", env)
    code_401, out_401 = cli_fetch(hub, source, "owner/private", tmp_path / "b", env)
    assert (code_404, code_401) == (3, 4), (out_404, out_401)
    assert "owner/missing" in out_404 and "not found" in out_404
    assert "owner/private" in out_401 or "getFileDownloadUrl" in out_401
    assert "401" in out_401 and "--token" in out_401
    assert len(out_404.strip().splitlines()) == 1 and len(out_401.strip().splitlines()) == 1
    assert "Traceback" not in out_404 + out_401


@pytest.mark.parametrize("source", SOURCES)
def test_token_is_used_but_never_printed(source, hub, env, repos, tmp_path):
    code, out = cli_fetch(hub, source, "owner/private", tmp_path / "bad", env, "--token", WRONG_TOKEN)
    assert code == 4, out
    assert WRONG_TOKEN not in out
    code, out = cli_fetch(hub, source, "owner/private", tmp_path / "good", env, "--token", TOKEN)
    assert code == 0, out
    assert TOKEN not in out
    assert visible_files(tmp_path / "good") == source_bytes(repos, "owner/private")
    assert TOKEN not in (tmp_path / "good" / ".hub_cli" / "manifest.json").read_text()
    sent = [r.headers.get("authorization", "") + r.headers.get("cookie", "") for r in hub.log if r.kind == "api"]
    assert any(TOKEN in s for s in sent)
    # storage URLs (OpenXLab) never get the credentials
    assert not [r for r in hub.requests(hub="ox", kind="file") if "authorization" in r.headers]


def test_openxlab_access_key_login(hub, env, repos, tmp_path):
    hub.openxlab_keys["my-access-key"] = "my-secret-key-1234"
    code, out = cli_fetch(hub, "openxlab", "owner/axs", tmp_path / "out", env,
                          "--token", "my-access-key:my-secret-key-1234")
    assert code == 0, out
    assert "my-secret-key-1234" not in out
    assert visible_files(tmp_path / "out") == source_bytes(repos, "owner/axs")
    assert hub.requests(contains="sso-be/api/v1/open/getJwt")
    code, out = cli_fetch(hub, "openxlab", "owner/axs", tmp_path / "out2", env,
                          "--token", "my-access-key:wrong-secret-5678")
    assert code == 4 and "wrong-secret-5678" not in out


def test_no_match_and_bad_repo_id(hub, env, tmp_path):
    code, out = cli_fetch(hub, "modelscope", "owner/tiny", tmp_path / "a", env, "--include", "*.gguf")
    assert code == 3 and "*.gguf" in out
    code, out = cli_fetch(hub, "modelscope", "../etc", tmp_path / "b", env)
    assert code == 2
    result = CliRunner().invoke(main, ["fetch", "owner/tiny", "--source", "nohub"])
    assert result.exit_code == 2


def test_connection_refused_is_a_network_error(env, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out = run_cli("openxlab", ["fetch", "owner/tiny", "--source", "openxlab", "--endpoint",
                                     f"http://127.0.0.1:{port}/api/v1", "--retries", "0", "-q"], env)
    assert code == 6 and f"127.0.0.1:{port}" in out


# ---------------------------------------------------------------------------------------------------------
# OpenXLab git route (spec §5.3: a local bare repository over file://)
# ---------------------------------------------------------------------------------------------------------
def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main",
                    *args], cwd=cwd, check=True, capture_output=True)


def test_git_route(env, tmp_path):
    work, base = tmp_path / "work", tmp_path / "git"
    work.mkdir()
    _git("init", "-q", cwd=work)
    (work / "config.json").write_text('{"git": 1}')
    (work / "tokenizer.json").write_text("{}")
    _git("add", ".", cwd=work)
    _git("commit", "-q", "-m", "one", cwd=work)
    _git("checkout", "-q", "-b", "v2", cwd=work)
    (work / "config.json").write_text('{"git": 2}')
    (work / "weights.bin").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        f"oid sha256:{'ab' * 32}\nsize 123\n")
    _git("commit", "-q", "-am", "two", cwd=work)
    _git("add", "weights.bin", cwd=work)
    _git("commit", "-q", "-m", "lfs", cwd=work)
    _git("checkout", "-q", "main", cwd=work)
    (base / "owner").mkdir(parents=True)
    _git("clone", "-q", "--bare", str(work), str(base / "owner" / "gitrepo.git"), cwd=tmp_path)
    url = f"file://{base}"

    code, out = run_cli("openxlab", ["fetch", "owner/gitrepo", "--source", "openxlab", "--via", "git",
                                     "--endpoint", url, "--local-dir", str(tmp_path / "o1"), "-q"], env)
    assert code == 0, out
    assert visible_files(tmp_path / "o1") == {"config.json": b'{"git": 1}', "tokenizer.json": b"{}"}
    code, out = run_cli("openxlab", ["fetch", "owner/gitrepo", "--source", "openxlab", "--via", "git",
                                     "--endpoint", url, "--revision", "v2", "--include", "*.json",
                                     "--local-dir", str(tmp_path / "o2"), "-q"], env)
    assert code == 0, out
    assert visible_files(tmp_path / "o2") == {"config.json": b'{"git": 2}', "tokenizer.json": b"{}"}
    # an LFS pointer is never handed over as if it were the weights
    code, out = run_cli("openxlab", ["fetch", "owner/gitrepo", "--source", "openxlab", "--via", "git",
                                     "--endpoint", url, "--revision", "v2", "--local-dir", str(tmp_path / "o3"),
                                     "-q"], env)
    assert code != 0 and ("git-lfs" in out or "lfs" in out.lower())
    assert not (tmp_path / "o3" / "weights.bin").exists()
    code, out = run_cli("openxlab", ["fetch", "owner/nothere", "--source", "openxlab", "--via", "git",
                                     "--endpoint", url, "--local-dir", str(tmp_path / "o4"), "-q"], env)
    assert code == 3, out


# ---------------------------------------------------------------------------------------------------------
# The fake hub itself
# ---------------------------------------------------------------------------------------------------------
def test_fakehub_ranges_control_and_log(hub, repos):
    url = f"{hub.url}/openxlab-files/owner/tiny/model.safetensors"
    data = source_bytes(repos, "owner/tiny")["model.safetensors"]
    assert requests.get(url, headers={"Range": "bytes=10-19"}).content == data[10:20]
    r = requests.get(url, headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:] and r.headers["Content-Range"].endswith(f"/{len(data)}")
    r = requests.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    assert requests.get(url, headers={"Range": "bogus"}).content == data
    head = requests.head(url)
    assert head.headers["Content-Length"] == str(len(data)) and head.content == b""
    # control endpoints (for use from another process)
    assert requests.post(f"{hub.url}/_fake/faults",
                         json={"match": "*tiny/config.json", "mode": "corrupt"}).status_code == 200
    body = requests.get(f"{hub.url}/openxlab-files/owner/tiny/config.json").content
    assert body != source_bytes(repos, "owner/tiny")["config.json"] and len(body) == len(
        source_bytes(repos, "owner/tiny")["config.json"])
    log = requests.get(f"{hub.url}/_fake/log").json()
    assert log[-1]["fault"] == "corrupt" and log[0]["headers"]["range"] == "bytes=10-19"
    assert requests.post(f"{hub.url}/_fake/reset").json() == {"ok": True}
    assert hub.log == []
    # the HF surface: revisions by name, alias and commit; pagination links are absolute
    commit = hub.commit("owner/tiny")
    for rev in ("main", "HEAD", commit, commit[:7]):
        assert requests.get(f"{hub.hf_endpoint}/api/models/owner/tiny/revision/{rev}").json()["sha"] == commit
    page = requests.get(f"{hub.hf_endpoint}/api/models/owner/tiny/tree/main?recursive=True")
    assert len(page.json()) == 2 and page.links["next"]["url"].startswith(hub.url)
    assert requests.get(f"{hub.hf_endpoint}/api/models/owner/tiny/revision/nope").headers[
        "X-Error-Code"] == "RevisionNotFound"
    ms = requests.get(f"{hub.ms_endpoint}/api/v1/models/owner/tiny/revisions").json()
    assert {b["Revision"] for b in ms["Data"]["RevisionMap"]["Branches"]} == {"master", "v2"}


def test_fakehub_slow_and_stall(hub, repos):
    hub.add_fault("*config.json", "stall", delay=0.3)
    hub.add_fault("*model.safetensors", "slow", rate=20000)
    r = requests.get(f"{hub.url}/openxlab-files/owner/tiny/config.json")
    assert r.elapsed.total_seconds() >= 0.3
    r = requests.get(f"{hub.url}/openxlab-files/owner/tiny/model.safetensors")
    assert r.content == source_bytes(repos, "owner/tiny")["model.safetensors"]
    assert [e.fault for e in hub.log] == ["stall", "slow"]
    hub.add_fault("*model.safetensors", "ignore_range")
    hub.add_fault("*model.safetensors", "wrong_size")
    data = source_bytes(repos, "owner/tiny")["model.safetensors"]
    r = requests.get(f"{hub.url}/openxlab-files/owner/tiny/model.safetensors", headers={"Range": "bytes=100-"})
    assert r.status_code == 200 and r.content == data
    r = requests.get(f"{hub.url}/openxlab-files/owner/tiny/model.safetensors")
    assert r.content == data[:-1]


def test_fakehub_script_entry_point(repos):
    """``python tests/fakehub.py ROOT``: the manual use the README's offline-testing note shows."""
    script = Path(__file__).with_name("fakehub.py")
    proc = subprocess.Popen([sys.executable, str(script), str(repos)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:")
        r = requests.get(f"{url}/hf/api/models/owner/tiny")
        assert r.json()["id"] == "owner/tiny"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
