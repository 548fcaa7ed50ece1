"""Decode attention on CPU over the 16-bit, int8 and int4 per-token-head KV caches, with ratios (same run).

What changes between the three caches is one attention layer's decode step: the cache write of the new token
and attention over the context. This script times exactly that step through the backend the plugin registers
(internvl_plugin/cpu_kv_attention.py; the 16-bit cache takes vLLM's own CPU_ATTN path in it) for an
InternLM2-1.8B-shaped layer (16 query heads, 8 KV heads, head size 128), at batch 1 and 8 and context 2k and
8k, and prints milliseconds per layer step, the attention's share of decode tokens/s for the model's 24 layers
(batch / (24 x step)), and each quantized cache's ratio to the 16-bit one. The 16-bit cache uses vLLM's ISA
choice for bfloat16 (AMX where present, else AVX-512 / AVX2 code).

    python benchmarks/bench_kv_cpu.py [--contexts 2048 8192] [--batches 1 8] [--iters 20] [--dtype bfloat16]
    python benchmarks/bench_kv_cpu.py --quick          # 1k context, batch 1 and 4, 5 iterations

Needs the project's venv (vLLM CPU build). On a shared machine the numbers move with the load; the ratios,
taken in one run with the three caches interleaved per case, move less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from types import SimpleNamespace

import numba
import torch

HEADS, KV_HEADS, HEAD_SIZE, LAYERS = 16, 8, 128, 24      # InternLM2-1.8B (internlm2-chat-1_8b config.json)
BLOCK_SIZE = 128
CACHES = ("auto", "int8_per_token_head", "int4_per_token_head")


def make_case(kv: str, batch: int, context: int, dtype: torch.dtype, isa: str = "auto"):
    """(impl, layer, cache, decode inputs) with `context` tokens of each sequence already in the cache."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from internvl_plugin import cpu_kv_attention as kvq

    cpu_attn.get_current_vllm_config = lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=dtype))
    impl = kvq.CPUKVQuantAttentionImpl(HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, KV_HEADS, None, None, kv)
    layer = SimpleNamespace(isa=_get_attn_isa(dtype, BLOCK_SIZE, HEAD_SIZE, "auto") if isa == "auto" else isa,
                            _k_scale_float=1.0, _v_scale_float=1.0)
    blocks_per_seq = (context + 1 + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    if kv == "auto":
        cache = torch.zeros(num_blocks, KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE, dtype=dtype)
    else:
        cache = torch.zeros(num_blocks, KV_HEADS, BLOCK_SIZE, kvq.cell_bytes(kv, HEAD_SIZE),
                            dtype=torch.int8 if kv.startswith("int8") else torch.uint8)
    g = torch.Generator().manual_seed(0)
    table = torch.randperm(num_blocks, generator=g).view(batch, blocks_per_seq).to(torch.int32)
    slots = (table.long()[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).view(batch, -1)
    for start in range(0, context, 1024):                        # fill the context in chunks (bounded memory)
        n = min(1024, context - start)
        k = torch.randn(batch * n, KV_HEADS, HEAD_SIZE, generator=g).to(dtype)
        v = torch.randn(batch * n, KV_HEADS, HEAD_SIZE, generator=g).to(dtype)
        impl.do_kv_cache_update(layer, k, v, cache, slots[:, start:start + n].reshape(-1))
    seq_lens = torch.full((batch,), context + 1, dtype=torch.int32)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    scheduler_args = dict(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_SIZE, dtype=dtype, causal=True,
                          sliding_window_size=-1, isa=layer.isa, enable_kv_split=False)
    # per-step metadata, built once per step for all layers as vLLM's builders do (not part of the layer step)
    metadata = SimpleNamespace(
        num_actual_tokens=batch, query_start_loc=query_start_loc, seq_lens=seq_lens, block_table=table,
        causal=True, dynamic_causal=None, max_query_len=1,
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=batch, seq_lens=seq_lens, query_start_loc=query_start_loc, **scheduler_args),
        plan=None if kv == "auto" else kvq.plan_step(query_start_loc, seq_lens, table, BLOCK_SIZE, -1, True,
                                                     scheduler_args))
    step = dict(query=torch.randn(batch, HEADS, HEAD_SIZE, generator=g).to(dtype),
                key=torch.randn(batch, KV_HEADS, HEAD_SIZE, generator=g).to(dtype),
                value=torch.randn(batch, KV_HEADS, HEAD_SIZE, generator=g).to(dtype),
                slots=slots[:, context].contiguous(), output=torch.empty(batch, HEADS, HEAD_SIZE, dtype=dtype))
    return impl, layer, cache, metadata, step


def decode_step(case) -> None:
    impl, layer, cache, metadata, s = case
    impl.do_kv_cache_update(layer, s["key"], s["value"], cache, s["slots"])
    impl.forward(layer, s["query"], s["key"], s["value"], cache, metadata, s["output"])


def time_steps(case, iters: int) -> float:
    """Median seconds of one decode step."""
    decode_step(case)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        decode_step(case)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the three caches")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--isa", default="auto", choices=["auto", "vec"],
                        help="the 16-bit cache's kernel: vLLM's choice (AMX where present) or its AVX-512/AVX2 "
                             "`vec` kernel, what CPUs without AMX run")
    parser.add_argument("--quick", action="store_true", help="1k context, batch 1 and 4, 5 iterations")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.batches, args.iters, args.rounds = [1024], [1, 4], 5, 1
    dtype = getattr(torch, args.dtype)
    torch.cpu._init_amx()   # the Linux permission for AMX tiles (vLLM's workers ask for it; without: SIGILL)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()} (Numba {numba.get_num_threads()}), {args.dtype}, 16-bit kernel {args.isa}; "
          f"InternLM2-1.8B attention: {HEADS} heads, {KV_HEADS} KV heads, "
          f"head size {HEAD_SIZE}, block {BLOCK_SIZE}; median of {args.iters} steps, best of {args.rounds} rounds")
    print(f"{'context':>7} {'batch':>5} | {'16-bit ms':>9} {'int8 ms':>8} {'int4 ms':>8} | "
          f"{'16-bit tok/s':>12} {'int8 tok/s':>10} {'int4 tok/s':>10} | {'int8/16':>7} {'int4/16':>7}")
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            cases = {kv: make_case(kv, batch, context, dtype, args.isa) for kv in CACHES}
            best = {kv: float("inf") for kv in CACHES}
            for _ in range(args.rounds):
                for kv in CACHES:
                    best[kv] = min(best[kv], time_steps(cases[kv], args.iters))
            del cases
            tok_s = {kv: batch / (LAYERS * best[kv]) for kv in CACHES}
            row = dict(context=context, batch=batch, ms={kv: round(best[kv] * 1e3, 3) for kv in CACHES},
                       attention_tok_s={kv: round(tok_s[kv], 1) for kv in CACHES},
                       ratio_int8=round(tok_s["int8_per_token_head"] / tok_s["auto"], 3),
                       ratio_int4=round(tok_s["int4_per_token_head"] / tok_s["auto"], 3))
            rows.append(row)
            ms = row["ms"]
            print(f"{context:>7} {batch:>5} | {ms['auto']:>9.3f} {ms['int8_per_token_head']:>8.3f} "
                  f"{ms['int4_per_token_head']:>8.3f} | {tok_s['auto']:>12.1f} {tok_s['int8_per_token_head']:>10.1f} "
                  f"{tok_s['int4_per_token_head']:>10.1f} | {row['ratio_int8']:>7.2f} {row['ratio_int4']:>7.2f}",
                  flush=True)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
