"""awq_tools quantize without vLLM: the AWQ math on a layer with outlier channels, exact smoothing, resuming after
SIGKILL, bad inputs, calibration data (local files, a named dataset through `datasets` and the fake hub).

Measured on the synthetic layer (seeded; T=512 tokens, K=512, N=256, G=128, 8 input channels x40): output
relative MSE RTN 1.01e-2, AWQ (alpha 0.5, absmax) 2.91e-3 = 0.29x RTN, AWQ with --search-scale 2.26e-3 = 0.22x.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from awq_tools.awq import ChannelStats, pseudo_quantize, search_ratio, smoothing_scales, weight_importance
from awq_tools.cli import main

CORPUS = Path(__file__).resolve().parents[1] / "internvl_plugin" / "data" / "corpus.txt"
SMALL = ["--calib-dataset", str(CORPUS), "--calib-samples", "4", "--calib-seqlen", "32", "--w-group-size", "32"]


# ------------------------------------------------------------------------------------------ the AWQ math

def _outlier_layer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 512, generator=g)
    x[:, torch.randperm(512, generator=g)[:8]] *= 40
    return x, torch.randn(256, 512, generator=g) / 512 ** 0.5


@pytest.mark.parametrize("search", [False, True], ids=["alpha0.5", "search-scale"])
def test_awq_beats_round_to_nearest_on_outlier_channels(search):
    x, w = _outlier_layer()
    ref = x @ w.t()

    def err(y):
        return float((y - ref).pow(2).mean() / ref.pow(2).mean())

    rtn = err(x @ pseudo_quantize(w, 128).t())
    stats = ChannelStats()
    stats.update(x, 0)
    if search:
        ratio, s, losses = search_ratio(stats.absmean, [w], 128, lambda ws: x @ ws[0].t())
        assert len(losses) == 20 and 0 < ratio < 1
    else:
        s = smoothing_scales(stats.absmax, weight_importance([w], 128), 0.5)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two: folding is exact
    awq = err((x / s) @ pseudo_quantize(w * s, 128).t())
    print(f"RTN {rtn:.3e}  AWQ {awq:.3e}  ratio {awq / rtn:.2f}")
    assert awq < 0.35 * rtn


@pytest.mark.parametrize("layout,search", [("internvl2-2b", False), ("internvl2-1b", True), ("internvl2-40b", False)])
def test_smoothing_alone_leaves_the_float_model_unchanged(layout, search, tiny_model, tmp_path):
    from awq_tools.quantize import QuantizeSettings, quantize
    from reference.internvl import load_reference

    src = _with_outlier_channels(tiny_model(layout), tmp_path / "src")
    settings = QuantizeSettings(calib_dataset=str(CORPUS), calib_samples=4, calib_seqlen=32, w_group_size=32,
                                search_scale=search)
    smoothed = quantize(src, tmp_path / "smoothed", settings, quiet=True, smooth_only=True)
    a, b = load_reference(src), load_reference(smoothed)
    sa, sb = a.state_dict(), b.state_dict()
    changed = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert any("norm" in k for k in changed) and any("norm" not in k for k in changed), changed
    ids = torch.tensor([1, 5, 9, 33, 60, 7, 100, 42, 17, 3])
    with torch.no_grad():
        assert torch.equal(a.forward(ids, None, None), b.forward(ids, None, None))


def _with_outlier_channels(src: Path, dst: Path) -> Path:
    """A copy whose token embeddings have 4 channels x30, so that smoothing scales differ from 1 everywhere."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    for name in ("language_model.model.tok_embeddings.weight", "language_model.model.embed_tokens.weight"):
        if name in state:
            state[name][:, [3, 17, 64, 100]] *= 30
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------------ resuming

_KILLER = """
import os, signal, sys
import awq_tools.quantize as q
point, calls = sys.argv[1], {"shard": 0}
real_shard, real_json = q.save_shard_atomically, q.write_json_atomically
def shard(tensors, path):
    real_shard(tensors, path)
    calls["shard"] += 1
    if point == "after-first-layer-shard" and calls["shard"] == 2:   # rest shard, then layer 0
        os.kill(os.getpid(), signal.SIGKILL)
def state(obj, path):
    real_json(obj, path)
    if point == "after-layer-0-state" and obj.get("layers_done") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
q.save_shard_atomically, q.write_json_atomically = shard, state
import pathlib
real_replace = pathlib.Path.replace
def replace(self, target):
    final = self.name.endswith(".partial")          # the rename that completes the output
    if final and point == "before-final-rename":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real_replace(self, target)
    if final and point == "after-final-rename":
        os.kill(os.getpid(), signal.SIGKILL)
    return out
pathlib.Path.replace = replace
from awq_tools.cli import main
main(sys.argv[2:])
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _kill(point: str, args: list[str], out: Path) -> None:
    killed = subprocess.run([sys.executable, "-c", _KILLER, point, "quantize", *args, "--work-dir", str(out)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if point == "after-final-rename":
        assert (out / "state.json").is_file()
        return
    assert not out.exists()                                  # nothing that looks complete
    assert (out.parent / f".{out.name}.partial" / "state.json").is_file()


def test_sigkill_then_rerun_is_byte_identical_and_a_changed_input_starts_over(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_model("internlm2"), src)
    args = [str(src), *SMALL, "--quiet"]
    whole = CliRunner().invoke(main, ["quantize", *args, "--work-dir", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output

    # killed between a layer's shard and its progress record: that layer is redone
    out = tmp_path / "out"
    _kill("after-first-layer-shard", args, out)
    rerun = CliRunner().invoke(main, ["quantize", *args[:-1], "--work-dir", str(out)])
    assert rerun.exit_code == 0 and "resuming after layer 0 of 2" in rerun.output, rerun.output
    assert _files(out) == _files(tmp_path / "whole")
    assert not (tmp_path / ".out.partial").exists()
    assert [e["layer"] for e in json.loads((out / "quant_report.json").read_text())["layers"]] == [0, 1]

    # killed after layer 0 was recorded, then the input changes (same names, shapes and file size): start over
    out2 = tmp_path / "out2"
    _kill("after-layer-0-state", args, out2)
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.attention.wqkv.weight"] = -state["model.layers.0.attention.wqkv.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    rerun = CliRunner().invoke(main, ["quantize", *args[:-1], "--work-dir", str(out2)])
    assert rerun.exit_code == 0 and "input layer 0 changed" in rerun.output, rerun.output
    fresh = CliRunner().invoke(main, ["quantize", *args, "--work-dir", str(tmp_path / "fresh")])
    assert fresh.exit_code == 0
    assert _files(out2) == _files(tmp_path / "fresh") != _files(out)


def test_resume_after_the_last_recorded_layer(tiny_model, tmp_path):
    """Killed after layer 0's record, unchanged input: the rerun continues at layer 1, same bytes."""
    src = tiny_model("internlm2")
    args = [str(src), *SMALL, "--quiet"]
    _kill("after-layer-0-state", args, tmp_path / "out")
    rerun = CliRunner().invoke(main, ["quantize", *args[:-1], "--work-dir", str(tmp_path / "out")])
    assert rerun.exit_code == 0 and "resuming after layer 1 of 2" in rerun.output, rerun.output
    whole = CliRunner().invoke(main, ["quantize", *args, "--work-dir", str(tmp_path / "whole")])
    assert whole.exit_code == 0
    assert _files(tmp_path / "out") == _files(tmp_path / "whole")


@pytest.mark.parametrize("point", ["before-final-rename", "after-final-rename"])
def test_a_kill_around_the_final_rename_recomputes_nothing(point, tiny_model, tmp_path, monkeypatch):
    """Killed with every layer done, just before or just after the rename that completes the output: the rerun
    quantizes no layer and copies nothing again, and the result has the uninterrupted run's bytes."""
    import awq_tools.quantize as q

    src = tiny_model("internlm2")
    args = [str(src), *SMALL, "--quiet"]
    out = tmp_path / "out"
    _kill(point, args, out)

    def recompute(*_):
        raise AssertionError("recomputed after a kill at " + point)

    monkeypatch.setattr(q._Job, "_quantize_layer", recompute)
    monkeypatch.setattr(q._Job, "_copy_rest", recompute)
    rerun = CliRunner().invoke(main, ["quantize", *args[:-1], "--work-dir", str(out)])
    assert rerun.exit_code == 0, rerun.output
    assert ("resuming after layer 2 of 2" if point == "before-final-rename" else "was already complete") \
        in rerun.output, rerun.output
    monkeypatch.undo()
    whole = CliRunner().invoke(main, ["quantize", *args, "--work-dir", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    assert _files(out) == _files(tmp_path / "whole") and "state.json" not in _files(out)
    assert not (tmp_path / ".out.partial").exists()


_NO_VLLM = """
import sys
class NoVllm:
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("vllm imported while quantizing: " + name)
sys.meta_path.insert(0, NoVllm())
from awq_tools.cli import main
main(sys.argv[1:])
"""


def test_quantize_runs_where_vllm_is_not_installed(tiny_model, tmp_path):
    """A GPU machine used only for quantizing may lack vLLM: nothing on quantize's path imports it."""
    res = subprocess.run([sys.executable, "-c", _NO_VLLM, "quantize", str(tiny_model("xcomposer2-vl-1.8b")), *SMALL,
                          "--quiet", "--work-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "out" / "config.json").is_file()


# ------------------------------------------------------------------------------------------ bad input

def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _sharded_with_missing_shard(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"language_model.model.norm.weight": "model-00002-of-00002.safetensors"}}))


BAD = {
    "missing-config": (lambda f: (f / "config.json").unlink(), [], "config.json: no such file"),
    "config-not-object": (lambda f: (f / "config.json").write_text("[]"), [], "config.json: not a JSON object"),
    "truncated": (_truncate, [], "model.safetensors is truncated: tensor"),
    "missing-shard": (_sharded_with_missing_shard, [], "model-00002-of-00002.safetensors: no such file"),
    "already-quantized": (lambda f: _edit_config(f, lambda c: c["llm_config"].update(quantization_config={
        "quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True})), [],
        "already quantized (config.json llm_config.quantization_config"),
    "architecture": (lambda f: _edit_config(f, lambda c: c.update(architectures=["LlavaForConditionalGeneration"])),
                     [], "architecture 'LlavaForConditionalGeneration' is not supported"),
    "llm-architecture": (lambda f: _edit_config(f, lambda c: c["llm_config"].update(architectures=["GPT2LMHeadModel"])),
                         [], "language model architecture 'GPT2LMHeadModel' is not supported"),
    "group-size": (None, ["--w-group-size", "48"], "--w-group-size 48 does not divide K=128 of attention.wqkv"),
    "dataset-name": (None, ["--calib-dataset", "wikitext3"], "unknown dataset 'wikitext3'"),
    "bits": (None, ["--w-bits", "8"], "--w-bits 8: only 4-bit"),
    "missing-file": (None, ["--calib-dataset", "nope.txt"], "nope.txt: no such file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(case, tiny_model, tmp_path):
    make_bad, extra, message = BAD[case]
    src = tmp_path / "src"
    shutil.copytree(tiny_model("internvl2-2b"), src)
    if make_bad:
        make_bad(src)
    out = tmp_path / "out"
    args = ["quantize", str(src), "--work-dir", str(out), *SMALL, *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_lone_plora_half_is_refused_in_one_line(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_model("xcomposer2-vl-1.8b"), src)
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.feed_forward.w3.Plora_B.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    res = CliRunner().invoke(main, ["quantize", str(src), "--work-dir", str(tmp_path / "out"), *SMALL])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "'model.layers.1.feed_forward.w3.Plora_B.weight' is missing" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_existing_output_is_refused(tiny_model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    res = CliRunner().invoke(main, ["quantize", str(tiny_model("internlm2")), "--work-dir", str(tmp_path / "out"),
                                    *SMALL])
    assert res.exit_code == 1 and "already exists and is not empty" in res.output
    assert (tmp_path / "out" / "x").read_text() == "keep"


def test_search_scale_false_means_off(monkeypatch, tmp_path):
    import awq_tools.quantize

    seen = []
    monkeypatch.setattr(awq_tools.quantize, "quantize", lambda model, out, settings, quiet: seen.append(settings))
    spellings = (["--search-scale", "False"], ["--search-scale", "false"], ["--search-scale=False"],
                 ["--no-search-scale"], [], ["--search-scale", "True"], ["--search-scale"])
    for spelling in spellings:
        res = CliRunner().invoke(main, ["quantize", str(tmp_path), "--work-dir", str(tmp_path / "o"), *spelling])
        assert res.exit_code == 0, res.output
    assert [s.search_scale for s in seen] == [False] * 5 + [True] * 2


# ------------------------------------------------------------------------------------------ calibration data

def _tokenizer(tiny_model):
    from transformers import AutoTokenizer

    from internvl_plugin.configs import register_configs

    register_configs()
    return AutoTokenizer.from_pretrained(str(tiny_model("internvl2-1b")), trust_remote_code=False)


def test_local_txt_and_jsonl(tiny_model, tmp_path):
    import random

    from awq_tools.calib import CalibrationError, calibration_ids

    tok = _tokenizer(tiny_model)
    lines = CORPUS.read_text().splitlines()
    ids = calibration_ids(str(CORPUS), tok, 5, 16)
    whole = tok("\n\n".join([CORPUS.read_text()]))["input_ids"]
    rng = random.Random(0)
    starts = [rng.randint(0, len(whole) - 17) for _ in range(5)]
    assert ids.tolist() == [whole[s:s + 16] for s in starts]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in lines))
    ids = calibration_ids(str(jsonl), tok, 3, 16)
    whole = tok("\n\n".join(lines))["input_ids"]
    rng = random.Random(0)
    assert ids.tolist() == [whole[s:s + 16] for s in [rng.randint(0, len(whole) - 17) for _ in range(3)]]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": 1}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: not a JSON object with a \"text\" field"):
        calibration_ids(str(tmp_path / "bad.jsonl"), tok, 1, 4)
    with pytest.raises(CalibrationError, match="not more than --calib-seqlen"):
        calibration_ids(str(CORPUS), tok, 1, 100000)


def _wikitext_repo(root: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = CORPUS.read_text().splitlines()
    repo = root / "Salesforce" / "wikitext" / "main"
    (repo / "wikitext-2-raw-v1").mkdir(parents=True)
    for split, part in (("train", lines[: len(lines) // 2]), ("test", lines[len(lines) // 2:])):
        pq.write_table(pa.table({"text": part}), str(repo / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet"))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
                                    "  - split: train\n    path: wikitext-2-raw-v1/train-*\n"
                                    "  - split: test\n    path: wikitext-2-raw-v1/test-*\n---\ntiny stand-in\n")
    return lines[: len(lines) // 2]


_NAMED = """
import json, sys
from transformers import AutoTokenizer
from internvl_plugin.configs import register_configs
from awq_tools.calib import calibration_ids
register_configs()
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)
print(json.dumps(calibration_ids("wikitext2", tok, 3, 16).tolist()))
"""


def test_named_dataset_through_datasets_and_the_fake_hub(tiny_model, tmp_path):
    import random

    from fakehub import FakeHub

    train = _wikitext_repo(tmp_path / "hub")
    model = str(tiny_model("internvl2-1b"))
    with FakeHub(tmp_path / "hub") as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.hf_endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
                   HF_DATASETS_OFFLINE="0")
        res = subprocess.run([sys.executable, "-c", _NAMED, model], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        assert hub.requests(kind="file", method="GET")
    tok = _tokenizer(tiny_model)
    whole = tok("\n\n".join(train))["input_ids"]
    rng = random.Random(0)
    expected = [whole[s:s + 16] for s in [rng.randint(0, len(whole) - 17) for _ in range(3)]]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected
    # the same, offline with no cache: one line pointing at a local file, nothing written
    env = dict(os.environ, HF_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "awq_tools.cli", "quantize", model, "--work-dir",
                          str(tmp_path / "out"), "--calib-dataset", "wikitext2"], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset 'wikitext2' (Salesforce/wikitext) cannot be loaded" in lines[0] \
        and "local .txt or .jsonl" in lines[0], res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_a_repo_id_is_fetched_first(tiny_model, tmp_path, monkeypatch):
    from fakehub import FakeHub

    shutil.copytree(tiny_model("internlm2"), tmp_path / "repos" / "owner" / "tiny" / "main")
    with FakeHub(tmp_path / "repos") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.hf_endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import (conftest: on)
        res = CliRunner().invoke(main, ["quantize", "owner/tiny", "--download-dir", str(tmp_path / "dl"),
                                        "--work-dir", str(tmp_path / "out"), *SMALL, "--quiet"])
        assert res.exit_code == 0, res.output
        assert hub.requests(kind="file", method="GET")
    assert (tmp_path / "dl" / "owner" / "tiny" / "config.json").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["group_size"] == 32
