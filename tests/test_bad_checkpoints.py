"""Bad checkpoints fail in one line: hub_cli serve's checks before vLLM starts (truncated or damaged safetensors, a
sharded index out of step with its shards, config sections, tokenizer files), the line picked out of a vLLM log,
and, with a real server start, a tensor of the wrong shape and one the model lacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hub_cli.checkpoint import check_checkpoint, engine_failure_line
from hub_cli.errors import IntegrityError, UsageError

HUB_CLI = Path(sys.executable).with_name("hub_cli")


@pytest.fixture
def ckpt(tiny_model, tmp_path):
    """A fresh copy of the tiny InternVL2-2B to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_model("internvl2-2b"), dst)
    return dst


def _tensors(path: Path):
    from safetensors.torch import load_file

    return load_file(path)


def _save(tensors, path: Path):
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def _shard(ckpt: Path) -> None:
    """Split model.safetensors into two shards with an index, as large checkpoints come."""
    tensors = _tensors(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in parts.items():
        _save({k: tensors[k] for k in keys}, ckpt / shard)
    weight_map = {k: shard for shard, keys in parts.items() for k in keys}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_the_tiny_checkpoint_passes(ckpt):
    check_checkpoint(ckpt)
    _shard(ckpt)
    check_checkpoint(ckpt)


def _truncate(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])


def _cut_header(ckpt):
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])


def _garbage(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"<html>404 Not Found</html>")


def _lying_shape(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in sorted(header) if k.startswith("mlp1") and len(header[k].get("shape", ())) == 2)
    header[name]["shape"] = [header[name]["shape"][0], header[name]["shape"][1] + 1]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n:])


def _empty(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"")


def _missing_shard(ckpt):
    _shard(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()


def _tensor_missing_from_shard(ckpt):
    _shard(ckpt)
    shard = ckpt / "model-00001-of-00002.safetensors"
    tensors = _tensors(shard)
    del tensors[sorted(tensors)[0]]
    _save(tensors, shard)


def _tensor_not_in_index(ckpt):
    import torch

    _shard(ckpt)
    shard = ckpt / "model-00001-of-00002.safetensors"
    tensors = _tensors(shard)
    tensors["stray.weight"] = torch.zeros(2)
    _save(tensors, shard)


def _bad_index(ckpt):
    _shard(ckpt)
    (ckpt / "model.safetensors.index.json").write_text("{}")


def _no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()


def _config_without(key):
    def damage(ckpt):
        config = json.loads((ckpt / "config.json").read_text())
        del config[key]
        (ckpt / "config.json").write_text(json.dumps(config))
    return damage


def _no_tokenizer_model(ckpt):
    (ckpt / "tokenizer.model").unlink()


def _no_tokenizer_at_all(ckpt):
    (ckpt / "tokenizer.model").unlink()
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


CASES = {
    "truncated safetensors": (_truncate, IntegrityError, r"model\.safetensors is truncated: tensor '.+' needs \d+ "
                                                         r"data bytes, the file holds \d+; download it again"),
    "header cut short": (_cut_header, IntegrityError, r"model\.safetensors is truncated or not safetensors: its "
                                                      r"header claims \d+ bytes, the file has 100"),
    "HTML instead of safetensors": (_garbage, IntegrityError, "is truncated or not safetensors"),
    "empty safetensors": (_empty, IntegrityError, "is truncated: 0 bytes"),
    "shape in header does not match the bytes": (_lying_shape, IntegrityError,
                                                 r"tensor 'mlp1\.\d\.weight' of shape \[\d+, \d+\] \(\w+\) needs"),
    "index names a missing shard": (_missing_shard, UsageError,
                                    r"index\.json puts tensor '.+' in model-00002-of-00002\.safetensors, which is "
                                    "missing from"),
    "tensor missing from its shard": (_tensor_missing_from_shard, UsageError,
                                      r"model-00001-of-00002\.safetensors lacks tensor '.+', which "
                                      r"model\.safetensors\.index\.json lists there"),
    "extra tensor not in the index": (_tensor_not_in_index, UsageError,
                                      "holds tensor 'stray.weight', which model.safetensors.index.json does not list"),
    "index without weight_map": (_bad_index, UsageError, "is not a safetensors index"),
    "no weight files": (_no_weights, UsageError, r"has no weights \(\*\.safetensors or \*\.bin\)"),
    "config without llm_config": (_config_without("llm_config"), UsageError,
                                  r"config\.json has no llm_config: an InternVL checkpoint needs both"),
    "config without vision_config": (_config_without("vision_config"), UsageError, "config.json has no vision_config"),
    "tokenizer.model missing": (_no_tokenizer_model, UsageError,
                                r"tokenizer\.model is missing: tokenizer_config\.json names InternLM2Tokenizer"),
    "no tokenizer file": (_no_tokenizer_at_all, UsageError, r"has no tokenizer file \(tokenizer\.model, "),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_one_line(ckpt, case):
    damage, error, pattern = CASES[case]
    damage(ckpt)
    with pytest.raises(error, match=pattern) as info:
        check_checkpoint(ckpt)
    assert "\n" not in str(info.value)


def test_serve_exits_before_vllm_with_the_line(ckpt):
    _truncate(ckpt)
    proc = subprocess.run([HUB_CLI, "serve", ckpt], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5
    assert proc.stderr.strip().splitlines()[-1].startswith(f"hub_cli serve: error: {ckpt}/model.safetensors is "
                                                           "truncated: tensor ")
    assert "Traceback" not in proc.stderr


def test_engine_failure_line_from_a_vllm_log():
    log = [
        "(APIServer pid=1) WARNING 12-06 00:26:06 [system_utils.py:255] ... `OSError: [Errno 24] Too many open files`",
        "(Worker pid=3) ERROR 12-06 00:26:24 [multiproc_executor.py:953] AssertionError: Attempted to load weight "
        "(torch.Size([128, 127])) into parameter (torch.Size([128, 128]))",
        "(Worker pid=3) ERROR 12-06 00:26:24 [multiproc_executor.py:953] The above exception was the direct cause",
        "(Worker pid=3) ERROR 12-06 00:26:24 [multiproc_executor.py:953] ValueError: checkpoint tensor 'mlp1.1.weight'"
        " (shape [128, 127]) cannot be loaded: Attempted to load weight",
        "(EngineCore pid=2) ERROR 12-06 00:26:27 [core.py:1510] Exception: WorkerProc initialization failed due to "
        "an exception in a background process. See stack trace for root cause.",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ]
    assert engine_failure_line(log) == ("ValueError: checkpoint tensor 'mlp1.1.weight' (shape [128, 127]) cannot "
                                        "be loaded: Attempted to load weight")
    assert engine_failure_line(["INFO all good", "RuntimeError: Engine core initialization failed."]) is None


FAKE_SERVER = r"""
import sys, time
print("INFO 12-06 00:26:00 [api_server.py:1] starting", flush=True)
print("(Worker pid=3) ERROR 12-06 00:26:24 [multiproc_executor.py:953] Traceback (most recent call last):")
print("(Worker pid=3) ERROR 12-06 00:26:24 [multiproc_executor.py:953]   File 'x.py', line 1, in load_weights")
print("(Worker pid=3) ERROR 12-06 00:26:24 [multiproc_executor.py:953] " + sys.argv[1])
print("INFO 12-06 00:26:25 [core.py:1] shutting down")
print("Traceback (most recent call last):")
print("  File 'api_server.py', line 59, in <module>")
print("RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}", flush=True)
sys.exit(1)
"""
RUN = ("import sys; from hub_cli.launch import run_server; "
       "sys.exit(run_server([sys.executable, '-c', sys.argv[1], sys.argv[2]], {}, 'http://127.0.0.1:9'))")


CAUSE = "ValueError: checkpoint tensor 'w' (shape [4]) cannot be loaded: no parameter named 'w'"
WRAPPER = "Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace"


@pytest.mark.parametrize("error", [CAUSE, WRAPPER], ids=["cause", "no-cause"])
def test_run_server_shows_the_cause_instead_of_the_tracebacks(tmp_path, error):
    """A server that stops while starting: its INFO lines are copied, its tracebacks are held back and the root
    cause's line comes last (the whole output in a file it names); with no cause found, nothing is hidden."""
    import os

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", RUN, FAKE_SERVER, error], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hub_cli: vLLM server exited with code 1 before it became healthy"), proc.stderr
    assert "starting" in proc.stdout
    if error == CAUSE:
        assert proc.stdout.strip().splitlines() == ["INFO 12-06 00:26:00 [api_server.py:1] starting"]
        assert last.endswith(f"before it became healthy: {CAUSE}")
        (log,) = tmp_path.glob("hub_cli-server-*.log")
        assert f"the server's whole output: {log}" in proc.stderr and "shutting down" in log.read_text()
        assert log.read_text().count("Traceback") == 2
    else:  # only vLLM's wrappers, no root cause: everything is shown
        assert last.endswith("before it became healthy")
        assert proc.stdout.count("Traceback") == 2 and "shutting down" in proc.stdout
        assert not list(tmp_path.glob("hub_cli-server-*.log"))


def _wrong_shape(ckpt):
    tensors = _tensors(ckpt / "model.safetensors")
    name = next(k for k in sorted(tensors) if k.startswith("mlp1") and k.endswith("weight") and tensors[k].dim() == 2)
    tensors[name] = tensors[name][:, :-1].contiguous()
    _save(tensors, ckpt / "model.safetensors")
    return rf"checkpoint tensor '{name}' \(shape \[\d+, \d+\]\) cannot be loaded: Attempted to load weight"


def _unknown_tensor(ckpt):
    import torch

    tensors = _tensors(ckpt / "model.safetensors")
    tensors["language_model.model.bogus.weight"] = torch.zeros(4)
    _save(tensors, ckpt / "model.safetensors")
    return (r"checkpoint tensor 'language_model\.model\.bogus\.weight' \(shape \[4\]\) cannot be loaded: There is no "
            r"module or parameter named 'bogus' in InternLM2Model$")


def _model_tensor_missing(ckpt):
    tensors = _tensors(ckpt / "model.safetensors")
    name = next(k for k in sorted(tensors) if k.startswith("mlp1") and k.endswith("bias"))
    del tensors[name]
    _save(tensors, ckpt / "model.safetensors")
    return rf"Following weights were not initialized from checkpoint: {{'{name}'}}"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_wrong_shape, _unknown_tensor, _model_tensor_missing])
def test_engine_stops_and_serve_ends_with_one_line(ckpt, damage):
    """The model-level errors only vLLM can find: serve exits 1, its last line names the tensor."""
    import re

    from conftest import free_port

    pattern = damage(ckpt)
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING",
                                                                          "VLLM_PLUGINS")}
    proc = subprocess.run([HUB_CLI, "serve", ckpt, "--server-port", str(free_port()), "--session-len", "2048"],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hub_cli: vLLM server exited with code 1 before it became healthy: ValueError: "), last
    assert re.search(pattern, last), last
    # vLLM's three tracebacks of the same failure are not shown, the server's output up to them is
    assert "Traceback" not in proc.stdout + proc.stderr and "ERROR" not in proc.stdout, proc.stdout[-3000:]
    assert "INFO" in proc.stdout and "version 0.32" in proc.stdout, proc.stdout[:2000]
    log = Path(re.search(r"the server's whole output: (\S+)", proc.stderr).group(1))
    assert "Traceback (most recent call last)" in log.read_text()
    log.unlink()
