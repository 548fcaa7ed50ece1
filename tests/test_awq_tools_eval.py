"""awq_tools eval through its CLI: perplexity of the quantized tiny InternVL2-1B and of its 16-bit baseline, each
equal to the plain-PyTorch reference's on the same windows (float32, relative 1e-4). Its own module so that the
engines of test_awq_tools_engine.py are released before these two start."""

from __future__ import annotations

import json

from click.testing import CliRunner
from test_awq_tools_engine import CORPUS, _reference_perplexity, awq_tools_checkpoint  # noqa: F401 - fixture

from awq_tools.cli import main


def test_eval_cli_prints_model_and_baseline(awq_tools_checkpoint, tiny_model, monkeypatch):
    from transformers import AutoTokenizer

    from awq_tools.calib import evaluation_ids

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    quant, dense = awq_tools_checkpoint("internvl2-1b")
    original = tiny_model("internvl2-1b")
    res = CliRunner().invoke(main, ["eval", str(quant), "--baseline", str(original), "--dataset", str(CORPUS),
                                    "--seqlen", "48", "--max-samples", "3", "--dtype", "float32", "--json"])
    assert res.exit_code == 0, res.output
    model_ppl, base_ppl = json.loads(res.output[res.output.index("[\n  {"):])
    windows = evaluation_ids(str(CORPUS), AutoTokenizer.from_pretrained(str(quant)), 48, 3)
    assert abs(model_ppl["perplexity"] / _reference_perplexity(dense, windows) - 1) < 1e-4
    assert abs(base_ppl["perplexity"] / _reference_perplexity(original, windows) - 1) < 1e-4
    assert model_ppl["perplexity"] != base_ppl["perplexity"] and model_ppl["tokens"] == base_ppl["tokens"] == 141


def test_eval_names_a_missing_or_corrupt_config_in_one_line(tiny_model, tmp_path):
    import shutil

    good = tiny_model("internvl2-1b")
    for case, damage, message in (("corrupt", lambda f: f.write_text('{"architectures": ['), "not valid JSON"),
                                  ("missing", lambda f: f.unlink(), "no such file")):
        bad = tmp_path / case
        shutil.copytree(good, bad)
        damage(bad / "config.json")
        # as the model and as the baseline: both are checked before the first engine starts
        for args in ([str(bad)], [str(good), "--baseline", str(bad)]):
            res = CliRunner().invoke(main, ["eval", *args, "--dataset", str(CORPUS), "--seqlen", "16"])
            lines = res.output.strip().splitlines()
            assert res.exit_code == 1 and len(lines) == 1, res.output
            assert f"{bad / 'config.json'}: {message}" in lines[0], res.output
