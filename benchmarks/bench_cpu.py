"""CPU serving benchmark: an InternLM2-1.8B-shaped random checkpoint through vLLM-CPU + the plugin
(16-bit and float32 dense, W4A16), stock vLLM ``--quantization awq``, and transformers ``generate``.

    python benchmarks/bench_cpu.py                     # 24 layers (InternLM2-1.8B / InternVL2-2B's LLM)
    python benchmarks/bench_cpu.py --layers 4          # a quick run
    python benchmarks/bench_cpu.py --paths vllm-bf16 w4a16 --json out.json
    python benchmarks/bench_cpu.py --layer-ab          # the plugin's int4 operator vs stock's call, per linear
    python benchmarks/bench_cpu.py --kernel-rows       # vLLM's int4 kernel per call at 1..16 rows, whole / 4 a call

One checkpoint pair is built once under --work-dir: random weights with InternLM2-1.8B's shapes (hidden
2048, 16 heads / 8 KV heads, intermediate 8192, vocab 92544), RTN-quantized to AWQ gemm G=128 (the
plugin's checkpoint, ``internvl_kernels.quantize_awq``), and a dense bfloat16 copy of the *dequantized*
weights, so that every path computes nearly the same function. transformers runs the same dense
weights as a LlamaForCausalLM (InternLM2 is Llama with fused wqkv and w1/w3; split here).

Each path runs in a process of its own (peak RSS is that process's; --wait-load L waits for the
1-minute load average to drop below L before each, and the table shows it), vLLM in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), ``enforce_eager`` as ``hub_cli serve`` runs on CPU, a 1 GiB KV
cache, prefix caching off, random prompt token ids. Reported per path: decode tokens/s at batch 1 and
8 (64-token prompts, D new tokens; the tokens after the first over the time from the first to the last, from
vLLM's per-request timestamps or a transformers streamer), time to first token of one 1024-token prompt,
peak RSS (and where it goes: the process before the engine, the peak while loading, the model's
parameter bytes by kind, RSS after loading), and the kernel each W4A16 path used. Paths that cannot run here (e.g. stock AWQ where the
vLLM build has no CPU int4 kernel) report the one-line error. The ``-compiled`` paths run vLLM's
torch.compile graph instead (what ``hub_cli serve MODEL -- --no-enforce-eager`` serves); their start-up
time includes the compile (vLLM caches it under ~/.cache/vllm, so a second start is shorter).

The decode ceiling: before and after the paths the script measures the machine's read bandwidth (a
float32 matrix-vector product over 1 GiB, the fastest dense read torch has here). A decode step must
read every linear's weights and the LM head once, so at that read rate no engine decodes faster than
batch x bandwidth / those bytes (an estimate from a measured rate, not a hardware peak; the larger of the
two readings); each path prints the share of that ceiling it reached, and the last lines its ratio to
transformers beside the ratio its ceiling allows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, intermediate_size=8192,
             vocab_size=92544, rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768)
GROUP = 128
MAX_MODEL_LEN = 2048

# path -> (checkpoint, dtype, extra LLM kwargs, environment)
PATHS: dict[str, tuple[str, str, dict, dict]] = {
    "vllm-bf16": ("dense", "bfloat16", {}, {}),
    "vllm-fp16": ("dense", "float16", {}, {}),
    "vllm-fp32": ("dense", "float32", {}, {}),
    "w4a16": ("awq", "bfloat16", {}, {}),                                   # the plugin, kernel by its probe
    "w4a16-int4pack": ("awq", "bfloat16", {}, {"VLLM_INTERNVL_CPU_INT4": "int4pack"}),
    "w4a16-wna16": ("awq", "bfloat16", {}, {"VLLM_INTERNVL_CPU_INT4": "wna16-amx"}),
    "w4a16-fp32": ("awq", "float32", {}, {}),
    "w4a16-fp16": ("awq", "float16", {}, {}),
    "stock-awq": ("awq", "bfloat16", {"quantization": "awq"}, {}),           # vLLM's default on the machine
    "stock-awq-w4a16": ("awq", "bfloat16", {"quantization": "awq"}, {"VLLM_CPU_INT4_W4A8": "0"}),
    # torch.compile (vLLM's inductor graph) instead of eager: what serving gets with --no-enforce-eager
    "vllm-bf16-compiled": ("dense", "bfloat16", {"enforce_eager": False}, {}),
    "w4a16-compiled": ("awq", "bfloat16", {"enforce_eager": False}, {}),
    "stock-awq-compiled": ("awq", "bfloat16", {"quantization": "awq", "enforce_eager": False}, {}),
    "hf-bf16": ("dense", "bfloat16", {}, {}),
    "hf-fp32": ("dense", "float32", {}, {}),
}
DEFAULT_PATHS = ["vllm-bf16", "vllm-fp16", "vllm-fp32", "w4a16", "w4a16-int4pack", "w4a16-wna16",
                 "stock-awq", "stock-awq-w4a16", "hf-bf16", "hf-fp32"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--paths", nargs="+", default=DEFAULT_PATHS, choices=list(PATHS))
    ap.add_argument("--work-dir", default=os.path.expanduser("~/.cache/vllm-internvl/bench-cpu"))
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=1024, help="prompt of the time-to-first-token measurement")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3, help="each timing is the best of this many runs")
    ap.add_argument("--wait-load", type=float, default=None, metavar="L",
                    help="before each path wait (up to 15 min) for the 1-minute load average to drop below L")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--layer-ab", action="store_true", help="only time the plugin's CPU int4 operator against "
                    "stock vLLM's AWQ call on the 1.8B linears, interleaved in one process")
    ap.add_argument("--ab-rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--ab-iters", type=int, default=200)
    ap.add_argument("--kernel-rows", action="store_true", help="only time vLLM's int4 kernel (the plan w4a8-amx) "
                    "per call at 1..16 rows on the 1.8B linears, weights read from memory, whole and 4 rows a call")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.layer_ab:
        layer_ab(args)
        return
    if args.kernel_rows:
        kernel_rows(args)
        return
    if args.worker:
        print("RESULT " + json.dumps(run_path(args.worker, args)), flush=True)
        return

    folders = build_checkpoints(Path(args.work_dir) / f"internlm2-1.8b-L{args.layers}", args.layers)
    print(f"# {machine()}  layers={args.layers}  load1={os.getloadavg()[0]:.2f}", flush=True)
    bandwidth = [read_bandwidth_gbs()]
    print(f"# read bandwidth (float32 GEMV over 1 GiB): {bandwidth[0]:.1f} GB/s", flush=True)
    results = []
    for path in args.paths:
        load = wait_for_load(args.wait_load) if args.wait_load else os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--worker", path, "--layers", str(args.layers), "--work-dir", args.work_dir,
               "--decode-tokens", str(args.decode_tokens), "--prompt-len", str(args.prompt_len),
               "--repeats", str(args.repeats), "--batch", *map(str, args.batch)]
        env = {**os.environ, **PATHS[path][3], "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            result = json.loads(lines[-1][len("RESULT "):])
        elif proc.returncode < 0:  # killed (e.g. a path too slow to wait for): say so, not stderr's last line
            result = {"path": path, "error": f"stopped by signal {-proc.returncode}"}
        else:
            tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-1:] or ["no output"]
            result = {"path": path, "error": tail[0][:200]}
        result["load1_at_start"] = round(load, 2)
        results.append(result)
        print(json.dumps(result), flush=True)
    bandwidth.append(read_bandwidth_gbs())
    print(f"# read bandwidth after the paths: {bandwidth[1]:.1f} GB/s", flush=True)
    add_ceilings(results, args, max(bandwidth))
    print()
    print(table(results, args))
    print()
    print(ratios(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "layers": args.layers, "folders": folders,
                                               "read_bandwidth_gbs": bandwidth, "results": results}, indent=2))


# ------------------------------------------------------------------------------------------ checkpoints


def build_checkpoints(root: Path, layers: int) -> dict[str, str]:
    """{"awq": folder, "dense": folder}, built once (a stamp file marks a complete folder)."""
    import torch
    from safetensors.torch import save_file

    from internvl_kernels import dequantize_awq, quantize_awq
    from internvl_plugin.tiny import build_tiny_model

    folders = {"awq": root / "awq-g128", "dense": root / "dense-bf16"}
    stamp = {"layers": layers, "group_size": GROUP, **SHAPE, "version": 1}
    if all((f / "bench_stamp.json").is_file() and json.loads((f / "bench_stamp.json").read_text()) == stamp
           for f in folders.values()):
        return {k: str(v) for k, v in folders.items()}
    print(f"building the {layers}-layer checkpoints under {root} (once)", flush=True)
    tokenizer = build_tiny_model("internlm2", root / "tokenizer-source", overwrite=True)  # tokenizer files
    config = json.loads((tokenizer / "config.json").read_text())
    config.update(SHAPE, num_hidden_layers=layers, torch_dtype="bfloat16")
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        for f in tokenizer.iterdir():
            if f.is_file() and f.name not in ("config.json", "model.safetensors", "tiny_build.json"):
                (folder / f.name).write_bytes(f.read_bytes())
    awq_config = {**config, "quantization_config": {"quant_method": "awq", "version": "gemm", "bits": 4,
                                                      "group_size": GROUP, "zero_point": True}}
    (folders["awq"] / "config.json").write_text(json.dumps(awq_config, indent=2))
    (folders["dense"] / "config.json").write_text(json.dumps(config, indent=2))

    gen = torch.Generator().manual_seed(0)
    h, inter, vocab = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    head_dim = h // SHAPE["num_attention_heads"]
    qkv_out = (SHAPE["num_attention_heads"] + 2 * SHAPE["num_key_value_heads"]) * head_dim
    index: dict[str, dict[str, str]] = {"awq": {}, "dense": {}}

    def linear(out_f, in_f, gain=1.0):
        return torch.randn(out_f, in_f, generator=gen) * (gain / in_f ** 0.5)

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    def write(shard: str, dense: dict, awq: dict) -> None:
        for kind, tensors in (("dense", dense), ("awq", awq)):
            save_file(tensors, str(folders[kind] / shard), metadata={"format": "pt"})
            index[kind].update({name: shard for name in tensors})

    bf16 = torch.bfloat16
    outer = {"model.tok_embeddings.weight": torch.randn(vocab, h, generator=gen).to(bf16),
             "model.norm.weight": norm(h).to(bf16),
             "output.weight": linear(vocab, h, gain=3.0).to(bf16)}
    write("model-outer.safetensors", outer, outer)
    for i in range(layers):
        p = f"model.layers.{i}."
        dense, awq = {}, {}
        for name, (out_f, in_f) in {"attention.wqkv": (qkv_out, h), "attention.wo": (h, h),
                                    "feed_forward.w1": (inter, h), "feed_forward.w3": (inter, h),
                                    "feed_forward.w2": (h, inter)}.items():
            qweight, qzeros, scales = quantize_awq(linear(out_f, in_f), GROUP, scale_dtype=bf16)
            awq.update({p + name + ".qweight": qweight, p + name + ".qzeros": qzeros, p + name + ".scales": scales})
            dense_weight = dequantize_awq(qweight, qzeros, scales, GROUP, dtype=torch.float32)
            dense[p + name + ".weight"] = dense_weight.t().to(bf16)
        for name in ("attention_norm", "ffn_norm"):
            dense[p + name + ".weight"] = awq[p + name + ".weight"] = norm(h).to(bf16)
        write(f"model-layer{i:02d}.safetensors", {k: v.contiguous() for k, v in dense.items()}, awq)
        print(f"  layer {i + 1}/{layers}", flush=True)
    for kind, folder in folders.items():
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index[kind]}))
        (folder / "bench_stamp.json").write_text(json.dumps(stamp))
    return {k: str(v) for k, v in folders.items()}


# ------------------------------------------------------------------------------------------ one path


def run_path(path: str, args) -> dict:
    import torch

    folder_kind, dtype, llm_kwargs, _ = PATHS[path]
    root = Path(args.work_dir) / f"internlm2-1.8b-L{args.layers}"
    folder = root / ("awq-g128" if folder_kind == "awq" else "dense-bf16")
    result = {"path": path, "dtype": dtype, "rss_before_load_gib": round(rss_now() / 2**30, 2)}
    try:
        runner = HFRunner(folder, dtype) if path.startswith("hf-") else VLLMRunner(folder, dtype, llm_kwargs)
    except Exception as e:  # e.g. stock AWQ on a build without CPU int4 kernels
        return {**result, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else repr(e)}
    result.update(runner.info)
    result["rss_after_load_gib"] = round(rss_now() / 2**30, 2)
    result["peak_rss_load_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    result["rss_anon_file_gib"] = rss_kinds()
    result["rss_after_malloc_trim_gib"] = round(malloc_trim() / 2**30, 2)
    gen = torch.Generator().manual_seed(1)

    def prompts(batch, length):
        return torch.randint(3, 400, (batch, length), generator=gen).tolist()

    runner.generate(prompts(1, 16), 2)  # warm-up: first-call allocations
    for batch in args.batch:  # best of --repeats: on a shared machine the least disturbed run
        rate = max(runner.generate(prompts(batch, 64), 1 + args.decode_tokens)[1] for _ in range(args.repeats))
        result[f"decode_tok_s_b{batch}"] = round(rate, 2)
    ttft = min(runner.generate(prompts(1, args.prompt_len), 1)[0] for _ in range(args.repeats))
    result[f"ttft_{args.prompt_len}_s"] = round(ttft, 2)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    result["threads"] = torch.get_num_threads()
    return result


class VLLMRunner:
    def __init__(self, folder: Path, dtype: str, llm_kwargs: dict) -> None:
        from vllm import LLM

        t = time.perf_counter()
        llm_kwargs = {"enforce_eager": True, **llm_kwargs}
        self.llm = LLM(model=str(folder), dtype=dtype, max_model_len=MAX_MODEL_LEN,
                       skip_tokenizer_init=True, enable_prefix_caching=False, max_num_seqs=8, disable_log_stats=False,
                       max_num_batched_tokens=MAX_MODEL_LEN, seed=0, **llm_kwargs)
        self.info = {"load_s": round(time.perf_counter() - t, 1),
                     "quantization": self.llm.llm_engine.model_config.quantization}
        kernels = self.llm.apply_model(_int4_kernels)[0]
        if kernels:
            self.info["kernels"] = kernels
        self.info["param_gib"] = self.llm.apply_model(param_bytes)[0]

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
        """(wall seconds, decode tokens/s: the tokens after each request's first over the time from the
        last first token to the last token, from the engine's per-request timestamps)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - t
        stats = [o.metrics for o in outs]
        span = max(m.last_token_ts for m in stats) - max(m.first_token_ts for m in stats)
        return wall, sum(m.num_generation_tokens - 1 for m in stats) / span if span > 0 else float("nan")


def _int4_kernels(model) -> str:
    """Which weight format each quantized linear ended up in (runs in the worker)."""
    seen = {}
    for module in model.modules():
        method = type(getattr(module, "quant_method", None)).__name__
        if method == "UnquantizedLinearMethod" or method == "NoneType":
            continue
        kernel = getattr(module, "cpu_int4_plan", None) or method
        seen[kernel] = seen.get(kernel, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(seen.items()) if "Embedding" not in k)


def param_bytes(model) -> dict[str, float]:
    """GiB of parameters and buffers by kind: quantized linears (their 4-bit weights, scales, zero points),
    the embedding, the LM head, the other linears, the rest (norms)."""
    import torch
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    out: dict[str, float] = {}
    storages: dict[int, int] = {}
    for module in model.modules():
        cache = getattr(module, "kv_cache", None)  # the attention layers' views of vLLM's KV cache
        cache = [cache] if isinstance(cache, torch.Tensor) else list(cache or [])
        storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache
                         if isinstance(t, torch.Tensor) and t.numel()})
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not tensors:
            continue
        method = type(getattr(module, "quant_method", None)).__name__
        if isinstance(module, ParallelLMHead):
            kind = "lm_head"
        elif isinstance(module, VocabParallelEmbedding):
            kind = "embedding"
        elif method not in ("NoneType", "UnquantizedLinearMethod"):
            kind = "quantized_linear"
        elif method == "UnquantizedLinearMethod":
            kind = "dense_linear"
        else:
            kind = "other"
        held = sum(t.numel() * t.element_size() for t in tensors)
        if kind == "dense_linear" and hasattr(module, "cpu_linear"):  # vLLM's oneDNN handle holds the weight
            held = (module.input_size_per_partition * module.output_size_per_partition
                    * torch.empty((), dtype=module.params_dtype).element_size())
        out[kind] = out.get(kind, 0.0) + held / 2**30
    out["kv_cache"] = sum(storages.values()) / 2**30
    return {k: round(v, 3) for k, v in sorted(out.items())}


class HFRunner:
    """transformers LlamaForCausalLM with the dense checkpoint's weights (wqkv and w1/w3 split)."""

    def __init__(self, folder: Path, dtype: str) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaForCausalLM

        t = time.perf_counter()
        cfg = json.loads((folder / "config.json").read_text())
        self.dtype = getattr(torch, dtype)
        config = LlamaConfig(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                             num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                             num_key_value_heads=cfg["num_key_value_heads"], vocab_size=cfg["vocab_size"],
                             rms_norm_eps=cfg["rms_norm_eps"], rope_theta=cfg["rope_theta"],
                             max_position_embeddings=cfg["max_position_embeddings"], tie_word_embeddings=False,
                             bos_token_id=1, eos_token_id=2, pad_token_id=2)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        state = {}
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(llama_state_dict(load_file(str(shard)), cfg))
        model.load_state_dict({k: v.to(self.dtype) for k, v in state.items()}, assign=True, strict=True)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers are not weights
        self.model = model.eval()
        self.info = {"load_s": round(time.perf_counter() - t, 1), "quantization": None,
                     "param_gib": {"all": round(sum(p.numel() * p.element_size() for p in model.parameters())
                                                / 2**30, 3),
                                   "embedding": round(model.model.embed_tokens.weight.nbytes / 2**30, 3)}}

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
        """(wall seconds, decode tokens/s after the first new token, timed by a streamer)."""
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def __init__(self):
                self.times = []

            def put(self, value):  # the prompt first, then each step's new tokens
                self.times.append(time.perf_counter())

            def end(self):
                pass

        ids, clock = torch.tensor(prompts), Clock()
        t = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                min_new_tokens=max_tokens, do_sample=False, streamer=clock)
        wall = time.perf_counter() - t
        steps = clock.times[1:]  # new tokens
        span = steps[-1] - steps[0] if len(steps) > 1 else 0.0
        return wall, len(prompts) * (len(steps) - 1) / span if span > 0 else float("nan")


def llama_state_dict(state: dict, cfg: dict) -> dict:
    """InternLM2 weight names and fused tensors -> LlamaForCausalLM's. wqkv is laid out per KV head:
    [kv_heads, q_per_kv + 2, head_dim, hidden] (the group's query heads, then its k, then its v)."""
    kv, heads, h = cfg["num_key_value_heads"], cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim, groups = h // heads, heads // kv
    out = {}
    for name, t in state.items():
        if name == "model.tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "output.weight":
            out["lm_head.weight"] = t
        elif name.endswith("attention.wqkv.weight"):
            p = name[: -len("attention.wqkv.weight")]
            w = t.view(kv, groups + 2, head_dim, h)
            out[p + "self_attn.q_proj.weight"] = w[:, :groups].reshape(-1, h)
            out[p + "self_attn.k_proj.weight"] = w[:, groups].reshape(-1, h)
            out[p + "self_attn.v_proj.weight"] = w[:, groups + 1].reshape(-1, h)
        else:
            for src, dst in (("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
                             ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj"),
                             ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
                name = name.replace(src, dst)
            out[name] = t
    return out


# ------------------------------------------------------------------------------------------ layer A/B


def layer_ab(args) -> None:
    """The plugin's CPU int4 operator against stock vLLM's call of the same AWQ layer (CPUWNA16's
    ``apply_weights``), interleaved in one process so that a shared machine's load hits both alike:
    InternLM2-1.8B's four linear shapes, G=128, bfloat16, --ab-rows rows. Prints the median of
    --ab-iters calls each and the ratio stock / plugin (above 1: the plugin is faster)."""
    import statistics
    from unittest import mock

    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.model_executor.layers.quantization.auto_awq import _convert_awq_to_standard_format
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
    from vllm.scalar_type import scalar_types

    from internvl_kernels import quantize_awq
    from internvl_plugin import quant_cpu

    h, inter = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    qkv = (SHAPE["num_attention_heads"] + 2 * SHAPE["num_key_value_heads"]) * h // SHAPE["num_attention_heads"]
    gen = torch.Generator().manual_seed(0)
    print(f"# {machine()}  load1={os.getloadavg()[0]:.2f}  plan={quant_cpu.choose_plan(h, inter, GROUP, torch.bfloat16)}")
    print("| linear (K x N) | rows | plugin ms | stock ms | stock / plugin |\n|---|---|---|---|---|")
    for name, (k, n) in {"wqkv": (h, qkv), "wo": (h, h), "w1w3": (h, 2 * inter), "w2": (inter, h)}.items():
        awq = quantize_awq(torch.randn(n, k, generator=gen) / k**0.5, GROUP, scale_dtype=torch.bfloat16)
        ours = torch.nn.Module()
        for pname, t in zip(("qweight", "qzeros", "scales"), awq):
            ours.register_parameter(pname, torch.nn.Parameter(t.clone(), requires_grad=False))
        quant_cpu.repack_layer(ours, GROUP, quant_cpu.choose_plan(k, n, GROUP, torch.bfloat16))
        stock = torch.nn.Module()  # as vLLM's AutoAWQMarlinLinearMethod builds and converts it on CPU
        # vLLM's parameter classes ask for the tensor-parallel rank; one process, no group: rank 0 of 1
        patches = [mock.patch(f"vllm.model_executor.parameter.get_tensor_model_parallel_{f}", return_value=v)
                   for f, v in (("rank", 0), ("world_size", 1))]
        for patch in patches:
            patch.start()
        noop = lambda *a, **kw: None  # noqa: E731
        stock.register_parameter("qweight", PackedvLLMParameter(data=awq[0].clone(), input_dim=0, output_dim=1,
                                                                packed_dim=1, packed_factor=8, weight_loader=noop))
        stock.register_parameter("qzeros", PackedvLLMParameter(data=awq[1].clone(), input_dim=0, output_dim=1,
                                                               packed_dim=1, packed_factor=8, weight_loader=noop))
        stock.register_parameter("scales", GroupQuantScaleParameter(data=awq[2].clone(), input_dim=0, output_dim=1,
                                                                    weight_loader=noop))
        stock.bias = None
        config = MPLinearLayerConfig(full_weight_shape=(k, n), partition_weight_shape=(k, n),
                                     weight_type=scalar_types.uint4, act_type=torch.bfloat16, group_size=GROUP,
                                     zero_points=True)
        kernel = CPUWNA16LinearKernel(config, w_q_param_name="qweight", w_s_param_name="scales",
                                      w_zp_param_name="qzeros")
        _convert_awq_to_standard_format(stock, "qweight", "qzeros", 4)
        kernel.process_weights_after_loading(stock)
        for patch in patches:
            patch.stop()
        for rows in args.ab_rows:
            x = torch.randn(rows, k, generator=gen).bfloat16()
            calls = {"plugin": lambda: quant_cpu.apply_layer(ours, x, GROUP), "stock": lambda: kernel.apply_weights(stock, x)}
            assert torch.equal(calls["plugin"](), calls["stock"]()), name  # the same kernel on the same weights
            times = {key: [] for key in calls}
            for _ in range(args.ab_iters):
                for key, call in calls.items():
                    t = time.perf_counter()
                    call()
                    times[key].append(time.perf_counter() - t)
            med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
            print(f"| {name} ({k} x {n}) | {rows} | {med['plugin']:.3f} | {med['stock']:.3f} | "
                  f"{med['stock'] / med['plugin']:.2f} |", flush=True)


def kernel_rows(args, budget_gb: float = 0.8, min_s: float = 0.4) -> None:
    """ms a call of vLLM's int4 kernel (``_C.int4_scaled_mm_cpu``, the plan w4a8-amx) at 1..16 rows on
    the four 1.8B linears, with the weights cycled through `budget_gb` of copies so that every call reads
    them from memory as a decode step does; beside it the same rows 4 at a time (the kernel's VNNI path
    takes at most 4, more go to its brgemm path), over the whole weight and per column slice (the second
    call of a slice finds its weights in L2). Best of 3 timings of at least `min_s` each."""
    import torch

    from internvl_kernels import quantize_awq
    from internvl_plugin import quant_cpu

    if "w4a8-amx" not in quant_cpu.available_kernels(torch.bfloat16):
        sys.exit("--kernel-rows: vLLM's int4 kernel (w4a8-amx) does not run on this machine")
    op = torch.ops._C.int4_scaled_mm_cpu
    h, inter = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    qkv = (SHAPE["num_attention_heads"] + 2 * SHAPE["num_key_value_heads"]) * h // SHAPE["num_attention_heads"]
    gen = torch.Generator().manual_seed(0)

    def chunked(x, w, blocks):  # rows 4 at a time, per slice of `blocks` x 32 output columns
        out = torch.empty(x.shape[0], w[0].shape[0] * 32, dtype=x.dtype)
        for b0 in range(0, w[0].shape[0], blocks):
            b1 = min(w[0].shape[0], b0 + blocks)
            for r in range(0, x.shape[0], 4):
                out[r:r + 4, b0 * 32:b1 * 32] = op(x[r:r + 4], w[0][b0:b1], w[2][b0:b1], w[1][b0:b1], None)
        return out

    print(f"# {machine()}  load1={os.getloadavg()[0]:.2f}  vLLM's int4_scaled_mm_cpu, ms a call, weights from memory")
    print("| linear (K x N) | MB | rows | whole | GB/s | 4 rows a call | per 512 / 2048 columns |\n|---|---|---|---|---|---|---|")
    for name, (k, n) in {"wqkv": (h, qkv), "wo": (h, h), "w1w3": (h, 2 * inter), "w2": (inter, h)}.items():
        packed = quant_cpu.pack_awq(*quantize_awq(torch.randn(n, k, generator=gen) / k**0.5, GROUP,
                                                  scale_dtype=torch.bfloat16), GROUP, "w4a8-amx", torch.bfloat16)
        first = (packed.weight, packed.scales, packed.zeros)
        mb = sum(t.nbytes for t in first) / 1e6
        copies = [first] + [tuple(t.clone() for t in first) for _ in range(max(0, int(budget_gb * 1e3 / mb) - 1))]

        def ms(call, x):
            best = float("inf")
            for _ in range(3):
                t, calls = time.perf_counter(), 0
                while time.perf_counter() - t < min_s:
                    for w in copies:
                        call(x, w)
                    calls += len(copies)
                best = min(best, (time.perf_counter() - t) / calls)
            return best * 1e3

        for rows in (1, 2, 4, 5, 8, 12, 16):
            x = torch.randn(rows, k, generator=gen).bfloat16()
            whole = ms(lambda x, w: op(x, w[0], w[2], w[1], None), x)
            cells = [f"{whole:.3f}", f"{mb / whole:.1f}"]
            if rows > 4:
                ref = op(x, first[0], first[2], first[1], None)
                assert torch.equal(chunked(x, first, 16), ref), name  # the same sums, row by row
                cells += [f"{ms(lambda x, w: chunked(x, w, 10**9), x):.3f}",
                          f"{ms(lambda x, w: chunked(x, w, 16), x):.3f} / {ms(lambda x, w: chunked(x, w, 64), x):.3f}"]
            else:
                cells += ["", ""]
            print(f"| {name} ({k} x {n}) | {mb:.1f} | {rows} | " + " | ".join(cells) + " |", flush=True)


# ------------------------------------------------------------------------------------------ report


def wait_for_load(limit: float, every_s: int = 30, max_s: int = 900) -> float:
    """The 1-minute load average once it is below `limit` (or after max_s): a shared machine's other work
    would otherwise be in the timings."""
    deadline = time.monotonic() + max_s
    while (load := os.getloadavg()[0]) >= limit and time.monotonic() < deadline:
        time.sleep(every_s)
    return load


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_kinds() -> list[float]:
    """[anonymous, file-backed] resident GiB of this process (/proc/self/status)."""
    kinds = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                kinds[line.split(":")[0]] = int(line.split()[1]) / 2**20
    return [round(kinds.get("RssAnon", 0.0), 2), round(kinds.get("RssFile", 0.0), 2)]


def malloc_trim() -> int:
    """RSS after glibc's malloc_trim(0) hands freed heap pages back (what loading left allocated-but-free)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_now()


def machine() -> str:
    import platform

    flags = set()
    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, {'/'.join(isa) or 'no AVX2'}"


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of the fastest dense read here: a float32 matrix-vector product over `gib` of weights, on
    torch's threads (best of `repeats`). A decode step cannot read its weights faster than this."""
    import torch

    w = torch.rand(2048, int(gib * 2**30) // (2048 * 4))
    v = torch.rand(1, 2048)
    best = float("inf")
    for _ in range(repeats + 1):  # one more: a warm-up call
        t = time.perf_counter()
        v @ w
        best = min(best, time.perf_counter() - t)
    return w.numel() * 4 / best / 1e9


def step_read_gib(result: dict) -> float | None:
    """GiB a decode step must read from memory: every linear's weights and the LM head; of the
    embedding only the batch's rows (so none is counted); KV cache reads at 64-token prompts are
    under 1 MB a sequence."""
    p = result.get("param_gib") or {}
    if "all" in p:  # transformers: its parameters less the embedding (untied, as these checkpoints)
        return p["all"] - p["embedding"]
    if not p:
        return None
    return p.get("quantized_linear", 0) + p.get("dense_linear", 0) + p.get("other", 0) + p.get("lm_head", 0)


def add_ceilings(results: list[dict], args, bandwidth_gbs: float) -> None:
    """Each path's decode ceiling at each batch: the tokens/s if a step cost only reading its weights
    at the measured bandwidth, and the share of it reached."""
    for r in results:
        read = step_read_gib(r)
        if not read or "error" in r:
            continue
        r["step_read_gib"] = round(read, 3)
        for b in args.batch:
            ceiling = b * bandwidth_gbs * 1e9 / (read * 2**30)
            r[f"ceiling_tok_s_b{b}"] = round(ceiling, 1)
            if f"decode_tok_s_b{b}" in r:
                r[f"of_ceiling_b{b}"] = round(r[f"decode_tok_s_b{b}"] / ceiling, 2)


def ratios(results: list[dict], args) -> str:
    """Each vLLM path's decode against transformers bfloat16 (first run of each), and the largest
    ratio its weight bytes allow (its ceiling over transformers' measured rate)."""
    first = {}
    for r in results:
        first.setdefault(r["path"], r)
    hf = first.get("hf-bf16")
    if not hf or "error" in hf:
        return "(no transformers bfloat16 run: no ratios)"
    lines = []
    for path, r in first.items():
        if path.startswith("hf-") or "error" in r:
            continue
        parts = []
        for b in args.batch:
            base, rate = hf.get(f"decode_tok_s_b{b}"), r.get(f"decode_tok_s_b{b}")
            if base and rate:
                cap = r.get(f"ceiling_tok_s_b{b}")
                parts.append(f"b{b} {rate / base:.2f}x" + (f" (ceiling {cap / base:.2f}x)" if cap else ""))
        lines.append(f"{path} / transformers bf16 decode: " + ", ".join(parts))
    return "\n".join(lines)


def table(results: list[dict], args) -> str:
    ttft = f"ttft_{args.prompt_len}_s"
    cols = ([f"decode_tok_s_b{b}" for b in args.batch] + [f"of_ceiling_b{b}" for b in args.batch]
            + [ttft, "peak_rss_gib", "load_s", "load1_at_start"])
    heads = ([f"decode tok/s b{b}" for b in args.batch] + [f"of ceiling b{b}" for b in args.batch]
             + [f"TTFT {args.prompt_len} (s)", "peak RSS (GiB)", "start (s)", "load"])
    lines = ["| path | dtype | " + " | ".join(heads) + " | kernel |", "|" + "---|" * (len(heads) + 3)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['path']} | {r.get('dtype', '')} | " + " | ".join("-" for _ in heads[:-1])
                         + f" | {r['load1_at_start']} | {r['error']} |")
            continue
        lines.append(f"| {r['path']} | {r['dtype']} | " + " | ".join(str(r.get(c, "-")) for c in cols)
                     + f" | {r.get('kernels', r.get('quantization') or '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
