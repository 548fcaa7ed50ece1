"""int8/int4 per-token-head KV caches through real vLLM on CPU (internvl_plugin/cpu_kv_attention.py).

For a tiny Llama, the tiny InternLM2 and the tiny InternVL2-2B (with an image), one bfloat16 engine per KV
dtype runs the same batch: several sequences sharing a prefix, prefilled in chunks (a small token budget),
then the batch again so that the shared blocks come from the prefix cache. Checked against the 16-bit
cache: mean |Δ prompt logprob| (the figures are printed; int8 <= 0.01, int4 <= 0.05 on the Llama, looser bounds
on tiny.py's far more sensitive models, where float32 engines match a torch simulation of the format instead),
the KV blocks the engine reports (the format's byte ratio; memory.py's per-token bytes give the same count),
and prefix-cache reuse (tokens unchanged). The 16-bit run also shows the KV dtypes leave vLLM's own path alone.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import random_image

KV_DTYPES = ("auto", "int8_per_token_head", "int4_per_token_head")
MEAN_BOUND = {"int8_per_token_head": 0.01, "int4_per_token_head": 0.05}      # the issue's, for the tiny Llama
# tiny.py's random InternLM2 / InternVL are far more sensitive to the cache: vLLM's own fp8 cache moves the tiny
# InternLM2's prompt logprobs by 0.080 (bfloat16; 0.005 on the model of vllm-plugin-guide.md §4.5). On them the
# bound is looser and test_engine_drift_is_the_formats shows the drift is exactly the format's.
SENSITIVE_BOUND = {"int8_per_token_head": 0.03, "int4_per_token_head": 0.15}
KV_SPACE_GIB = 1
BLOCK_SIZE = 32
MODELS = ("llama", "internlm2", "internvl2-2b")


def build_tiny_llama(out: Path) -> Path:
    """Llama layout, head size 64 (2 KV heads of 4), random weights at std 0.03: attention about as sensitive to
    the cache as in the issue's tiny Llama (there vLLM's fp8 cache drifts 0.005)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      torch_dtype="bfloat16")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.03)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def prompts_for(name: str, path: Path) -> list:
    """Four requests: three share a 96-token prefix (three blocks), one is unrelated; lengths differ."""
    vocab = json.loads((path / "config.json").read_text())
    vocab = (vocab.get("llm_config") or vocab)["vocab_size"]
    g = torch.Generator().manual_seed(5)
    ids = lambda n: torch.randint(10, min(vocab, 400), (n,), generator=g).tolist()  # noqa: E731
    prefix = ids(96)
    if name != "internvl2-2b":
        return [{"prompt_token_ids": prefix + ids(n)} for n in (40, 77, 13)] + [{"prompt_token_ids": ids(150)}]
    text = "<image>\nDescribe the image. " + " ".join(f"w{i}" for i in range(30))
    image = random_image(448, 448, seed=3)          # one tile + thumbnail
    return [{"prompt": text + tail, "multi_modal_data": {"image": image}}
            for tail in (" first", " second question", " third one here")] + [{"prompt": "Only text, " * 12}]


LONG_PROMPT, LONG_GREEDY = 1500, 64


def long_prompt(vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(15)
    return torch.randint(10, min(vocab, 400), (LONG_PROMPT,), generator=g).tolist()


def run_engine(path: Path, kv_cache_dtype: str, prompts, dtype: str = "bfloat16", again: bool = True,
               long_ids: list[int] | None = None) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = LLM(model=str(path), dtype=dtype, kv_cache_dtype=kv_cache_dtype, enforce_eager=True,
              max_model_len=2048, max_num_seqs=4, block_size=BLOCK_SIZE, enable_prefix_caching=True,
              enable_chunked_prefill=True, max_num_batched_tokens=64 if "prompt_token_ids" in prompts[0] else 2048,
              limit_mm_per_prompt={"image": 1}, seed=0, skip_tokenizer_init="prompt_token_ids" in prompts[0])
    try:
        from internvl_plugin.cpu_kv_decode import _decode_kernel
        compiled_at_start = len(_decode_kernel.signatures)
        sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
        first = llm.generate(prompts, sampling, use_tqdm=False)
        again = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                             use_tqdm=False) if again else first
        cached = sum(o.num_cached_tokens or 0 for o in again)
        long = llm.generate([{"prompt_token_ids": long_ids}], SamplingParams(
            max_tokens=LONG_GREEDY, temperature=0.0, ignore_eos=True), use_tqdm=False) if long_ids else None
        return {
            "kernels_at_start": compiled_at_start,
            "kernels_compiled_by_requests": len(_decode_kernel.signatures) - compiled_at_start,
            "long_tokens": list(long[0].outputs[0].token_ids) if long else None,
            "logprobs": [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])] for o in first],
            "tokens": [list(o.outputs[0].token_ids) for o in first],
            "tokens_again": [list(o.outputs[0].token_ids) for o in again],
            "cached_tokens": cached,
            "blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
            "hf_config": llm.llm_engine.vllm_config.model_config.hf_text_config.to_dict(),
            "isa": sorted(set(llm.apply_model(_layer_isas)[0])),
        }
    finally:
        del llm                     # before the process groups go (the engine's finalizer uses them)
        gc.collect()
        cleanup_dist_env_and_memory()


def _layer_isas(model) -> list[str]:
    """The kernel ISA vLLM chose for each attention layer (runs in the worker)."""
    return [m.isa for m in model.modules() if hasattr(m, "isa")]


@pytest.fixture(scope="module", params=MODELS)
def runs(request, tiny_model, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch_module.setenv("VLLM_CPU_KVCACHE_SPACE", str(KV_SPACE_GIB))
    name = request.param
    path = (build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "llama") if name == "llama"
            else tiny_model(name))
    prompts = prompts_for(name, path)
    vocab = json.loads((path / "config.json").read_text())
    ids = long_prompt((vocab.get("llm_config") or vocab)["vocab_size"])
    return name, {kv: run_engine(path, kv, prompts, long_ids=ids) for kv in KV_DTYPES}


@pytest.mark.parametrize("kv", MEAN_BOUND)
def test_prompt_logprob_drift_against_the_16bit_cache(runs, kv):
    name, results = runs
    base, got = results["auto"], results[kv]
    assert [len(x) for x in got["logprobs"]] == [len(x) for x in base["logprobs"]]
    diff = (torch.tensor(sum(got["logprobs"], [])) - torch.tensor(sum(base["logprobs"], []))).abs()
    print(f"\n{name} {kv}: mean |dlogprob| {diff.mean():.4f}, max {diff.max():.4f} over {diff.numel()} tokens")
    bound = (MEAN_BOUND if name == "llama" else SENSITIVE_BOUND)[kv]
    assert diff.mean() <= bound
    assert diff.max() < 20 * bound


@pytest.mark.parametrize("kv", KV_DTYPES)
def test_prefix_cache_reuse_keeps_the_tokens(runs, kv):
    name, results = runs
    got = results[kv]
    assert got["cached_tokens"] >= 3 * 96 - 3 * BLOCK_SIZE        # the shared blocks came from the cache
    assert got["tokens_again"] == got["tokens"]


def test_capacity_grows_as_the_format_says(runs):
    """Blocks in the same KV space: the engine's count, the format's bytes and memory.py's agree."""
    from internvl_plugin.memory import LLMShape, kv_bytes_per_token

    name, results = runs
    shape = LLMShape.from_hf_config(results["auto"]["hf_config"])
    space = KV_SPACE_GIB << 30
    for kv, policy in zip(KV_DTYPES, (0, 8, 4)):
        assert results[kv]["blocks"] == space // (BLOCK_SIZE * kv_bytes_per_token(shape, policy)), kv
    ratio8 = results["int8_per_token_head"]["blocks"] / results["auto"]["blocks"]
    ratio4 = results["int4_per_token_head"]["blocks"] / results["auto"]["blocks"]
    print(f"\n{name} (head size {shape.head_dim}): blocks int8/16-bit {ratio8:.2f}, int4/16-bit {ratio4:.2f}")
    if shape.head_dim >= 64:       # the bounds; at head size 32 the format itself gives 1.78x for int8
        assert ratio8 >= 1.8 and ratio4 >= 3
    else:
        assert ratio8 >= 1.75 and ratio4 >= 3


def test_the_decode_kernel_is_compiled_before_the_first_request(runs):
    """Built with the model (before a server reports healthy), not in the first real decode step: the requests,
    decode steps over 1500 cached tokens included, add no kernel signature."""
    name, results = runs
    for kv in MEAN_BOUND:
        assert results[kv]["kernels_at_start"] >= 1, kv
        assert results[kv]["kernels_compiled_by_requests"] == 0, kv


@pytest.mark.parametrize("kv", ("int4_per_token_head",))
def test_greedy_tokens_track_the_16bit_cache(runs, kv):
    """Several sequences per batch: each sequence's first greedy token agrees with the 16-bit cache's."""
    name, results = runs
    assert [t[0] for t in results[kv]["tokens"]] == [t[0] for t in results["auto"]["tokens"]]


def test_greedy_64_tokens_after_a_1500_token_prompt(runs):
    """The issue's long-context check: where greedy decoding over the int8 / int4 cache first leaves the 16-bit
    cache's tokens (printed); the decode steps read 1500+ cached tokens through the fused kernel."""
    name, results = runs
    base = results["auto"]["long_tokens"]
    first = {}
    for kv in MEAN_BOUND:
        got = results[kv]["long_tokens"]
        assert len(got) == len(base) == LONG_GREEDY
        first[kv] = next((i for i, (a, b) in enumerate(zip(got, base)) if a != b), None)
        print(f"\n{name} {kv}: greedy {LONG_GREEDY} tokens after {LONG_PROMPT} prompt tokens, first divergence at "
              f"{'none' if first[kv] is None else first[kv]}")
    # int8 keeps at least the first tokens (its logprob drift is a fraction of the models' top-2 gaps)
    assert first["int8_per_token_head"] is None or first["int8_per_token_head"] >= 1


TP_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
out = {}
for kv in ("auto", "int4_per_token_head"):
    llm = LLM(model=sys.argv[1], dtype="bfloat16", tensor_parallel_size=2, max_model_len=1024, enforce_eager=True,
              seed=0, kv_cache_dtype=kv, block_size=32)
    o = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=0), use_tqdm=False)[0]
    out[kv] = [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
    del llm
    import gc; gc.collect()
    from vllm.distributed import cleanup_dist_env_and_memory; cleanup_dist_env_and_memory()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_tensor_parallel_2(tiny_model, tmp_path):
    """Two CPU workers, each with half of the KV heads in its own int4 cache, run by the plugin's backend."""
    import subprocess
    import sys

    path = tiny_model("internlm2")
    ids = torch.randint(10, 400, (150,), generator=torch.Generator().manual_seed(9)).tolist()
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run([sys.executable, "-c", TP_SCRIPT, str(path), json.dumps(ids)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    diff = (torch.tensor(got["int4_per_token_head"]) - torch.tensor(got["auto"])).abs()
    print(f"\nTP=2 internlm2 int4: mean |dlogprob| {diff.mean():.4f}, max {diff.max():.4f}")
    assert diff.mean() <= SENSITIVE_BOUND["int4_per_token_head"]       # TP=1 on the same model: 0.110


# ------------------------------------------------------------------------------------------ against a simulation


def simulate_cache(fmt: str, x: torch.Tensor) -> torch.Tensor:
    """K or V [heads, L, D] as the cache gives it back, straight from the format's definition
    (specs/internvl-and-quant.md B4.2; vLLM 0.32 int4_per_token_head.py and triton_reshape_and_cache_flash.py)."""
    def round_half_away(t):
        return torch.sign(t) * torch.floor(t.abs() + 0.5)

    if fmt == "int8_per_token_head":
        scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-6)
        return round_half_away(x / scale).clamp(-128, 127) * scale
    d = x.shape[-1]
    b = d & -d
    signs = 2.0 * torch.bernoulli(torch.full((b,), 0.5), generator=torch.Generator().manual_seed(0x9E3779B9)) - 1
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    y = (x.reshape(*x.shape[:-1], d // b, b) * signs) @ h                   # H·(d ⊙ x), H symmetric
    y = y.reshape(x.shape)
    mn, mx = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
    scale = ((mx - mn) / 15).clamp_min(1e-6)
    zp = round_half_away(-mn / scale).clamp(0, 15)
    q = round_half_away(y / scale + zp).clamp(0, 15)
    stored = (scale.view(torch.int32) & ~0xF).view(torch.float32)          # the zero point takes 4 mantissa bits
    y_hat = ((q - zp) * stored).reshape(*x.shape[:-1], d // b, b)
    return ((y_hat @ h) * signs / b).reshape(x.shape)


def reference_logprobs(folder: Path, prompts, fmt: str | None) -> torch.Tensor:
    """Prompt logprobs of the plain-PyTorch InternLM2 (float32), its attention reading K/V through ``fmt``."""
    from reference import llm as ref_llm
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = ref_llm.build_language_model(config)
    state = {k: v.float() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    model.load_state_dict(state, strict=True, assign=True)
    plain = ref_llm.causal_gqa_attention
    attend = plain if fmt is None else (lambda q, k, v: plain(q, simulate_cache(fmt, k), simulate_cache(fmt, v)))
    out = []
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref_llm, "causal_gqa_attention", attend)
        for p in prompts:
            ids = torch.tensor(p["prompt_token_ids"])
            lp = model(ids).float()[:-1].log_softmax(-1)
            out.append(lp.gather(-1, ids[1:, None]).squeeze(-1))
    return torch.cat(out)


def test_engine_drift_is_the_formats(tiny_model, monkeypatch):
    """float32 engines on the tiny InternLM2 against the plain-PyTorch model whose attention reads K/V through a
    simulation of the format: the drift each cache causes is the drift the format causes."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", str(KV_SPACE_GIB))
    path = tiny_model("internlm2")
    prompts = prompts_for("internlm2", path)
    engine = {kv: torch.tensor(sum(run_engine(path, kv, prompts, "float32", again=False)["logprobs"], [])) for kv in KV_DTYPES}
    plain = reference_logprobs(path, prompts, None)
    assert (engine["auto"] - plain).abs().max() < 1e-3
    for kv in MEAN_BOUND:
        simulated = (reference_logprobs(path, prompts, kv) - plain).abs().mean().item()
        got = (engine[kv] - engine["auto"]).abs().mean().item()
        print(f"\ninternlm2 float32 {kv}: engine mean |dlogprob| {got:.4f}, simulation {simulated:.4f}")
        assert abs(got - simulated) <= 0.05 * simulated + 0.001
        if kv == "int8_per_token_head":
            # float32 engines isolate the cache format (in bfloat16 part of the drift is the 16-bit run's own
            # rounding noise: 0.020 there); the bound holds. int4 (0.113) does not hold it on this model:
            # its attention logits are ~4x the tiny Llama's and its head size is 32 (see the README).
            assert got <= MEAN_BOUND[kv]


def test_runs_where_the_cpu_has_neither_avx512_nor_amx(tiny_model, monkeypatch):
    """vLLM picks its kernels from what torch reports; reporting an AVX2-only CPU gives the "vec" kernels, where
    vLLM's own int8_per_token_head stops ("FP8 KV cache on CPU requires x86 with AVX-512 or AMX") and ours runs."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", str(KV_SPACE_GIB))
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(NotImplementedError, match="AVX-512 or AMX"):
        _get_attn_isa(torch.float32, BLOCK_SIZE, 32, "int8_per_token_head")
    path = tiny_model("internlm2")
    prompts = prompts_for("internlm2", path)[:2]
    got = {kv: run_engine(path, kv, prompts, "float32", again=False) for kv in ("auto", "int8_per_token_head")}
    assert got["int8_per_token_head"]["isa"] == ["vec"]
    diff = (torch.tensor(sum(got["int8_per_token_head"]["logprobs"], []))
            - torch.tensor(sum(got["auto"]["logprobs"], []))).abs()
    assert diff.mean() <= MEAN_BOUND["int8_per_token_head"]
