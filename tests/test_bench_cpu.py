"""benchmarks/bench_cpu.py's decode ceiling: the bytes a step must read and the tokens/s they allow.

The CPU W4A16 closing figures (benchmarks/README.md) rest on this arithmetic, so it is pinned here on
hand-computed cases (no engine runs)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Args:
    batch = [1, 8]


def _vllm(path, rates, **params):
    return {"path": path, "param_gib": params, "decode_tok_s_b1": rates[0], "decode_tok_s_b8": rates[1]}


def test_step_reads_linears_and_lm_head_not_the_embedding_or_kv_cache(bench):
    r = _vllm("w4a16", (1, 1), quantized_linear=0.8, embedding=0.35, lm_head=0.35, other=0.01, kv_cache=1.0)
    assert bench.step_read_gib(r) == pytest.approx(0.8 + 0.35 + 0.01)
    dense = _vllm("vllm-bf16", (1, 1), dense_linear=2.8, embedding=0.35, lm_head=0.35, other=0.01, kv_cache=1.0)
    assert bench.step_read_gib(dense) == pytest.approx(2.8 + 0.35 + 0.01)
    hf = {"path": "hf-bf16", "param_gib": {"all": 3.5, "embedding": 0.35}}
    assert bench.step_read_gib(hf) == pytest.approx(3.15)
    assert bench.step_read_gib({"path": "stock-awq", "error": "no kernel"}) is None


def test_ceiling_is_batch_times_bandwidth_over_step_bytes(bench):
    results = [_vllm("w4a16", (12.0, 64.0), quantized_linear=0.75, lm_head=0.25, embedding=0.25),
               {"path": "stock-awq", "error": "RuntimeError: no kernel"}]
    bench.add_ceilings(results, Args, bandwidth_gbs=2**30 * 20 / 1e9)  # 20 GiB/s over 1 GiB a step
    r = results[0]
    assert r["step_read_gib"] == 1.0
    assert r["ceiling_tok_s_b1"] == 20.0 and r["ceiling_tok_s_b8"] == 160.0
    assert r["of_ceiling_b1"] == 0.6 and r["of_ceiling_b8"] == 0.4
    assert "ceiling_tok_s_b1" not in results[1]


def test_ratios_to_transformers_name_the_ceiling_ratio(bench):
    results = [_vllm("w4a16", (12.0, 64.0), quantized_linear=0.75, lm_head=0.25),
               {"path": "hf-bf16", "param_gib": {"all": 3.25, "embedding": 0.25},
                "decode_tok_s_b1": 4.0, "decode_tok_s_b8": 32.0}]
    bench.add_ceilings(results, Args, bandwidth_gbs=2**30 * 20 / 1e9)
    results.append(_vllm("w4a16", (1.0, 1.0), quantized_linear=0.75))  # a second run: the first counts
    results.append({"path": "stock-awq", "error": "RuntimeError: no kernel"})  # no line for a failed path
    text = bench.ratios(results, Args)
    # 12 / 4 = 3x at b1 (ceiling 20 / 4 = 5x); 64 / 32 = 2x at b8 (ceiling 160 / 32 = 5x)
    assert text == "w4a16 / transformers bf16 decode: b1 3.00x (ceiling 5.00x), b8 2.00x (ceiling 5.00x)"
    assert bench.ratios(results[:1], Args).startswith("(no transformers")
