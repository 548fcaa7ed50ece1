"""Times one decode step of an InternLM2-7B-shaped decoder stack: W4A16 linears against bf16 linears.

    python3 benchmarks/bench_decode.py [--layers 32] [--kv-len 1024] [--batches 1 4 16] [--out decode-h200.json]

32 layers with random weights (hidden 4096, 32 heads, 8 kv heads, head_dim 128, FFN 14336), plain
torch: RMSNorm, wqkv, attention of the new token over a KV cache of fixed length (its last slot
overwritten by the new k/v; torch SDPA with GQA; no rotary embedding), wo, RMSNorm, w13, SwiGLU, w2.
No embedding and no LM head (both stay 16-bit in an AWQ checkpoint). The W4A16 stack uses AWQ tensors
quantized from the same weights the bf16 stack uses (dequantized back), so both compute nearly the
same function; the script reports how far their outputs differ. "w4a16" is the plugin's CUDA path:
the weights repacked by pack_w4a16, then w4a16_packed_matmul with its default configs.
Each step is captured in a CUDA graph and replayed, which takes the launch overhead out; the eager
time is reported too. Tokens/s = batch / step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from _shim import import_kernels

K_ = import_kernels()

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 4096, 32, 8, 128, 14336
GROUP = 128


def rms_norm(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)


class Linear:
    def __init__(self, k, n, gen):
        w = torch.randn(n, k, device="cuda", generator=gen) * (1.0 / k**0.5)
        awq = K_.quantize_awq(w, GROUP, scale_dtype=torch.bfloat16)  # a bf16 model's scales
        self.dense = K_.dequantize_awq(*awq, GROUP, dtype=torch.float32).t().contiguous().to(torch.bfloat16)
        self.packed = K_.pack_w4a16(*awq, GROUP)

    def __call__(self, x, quant):
        if quant == "w4a16":
            return K_.w4a16_packed_matmul(x, *self.packed, GROUP)
        return F.linear(x, self.dense)


class Layer:
    def __init__(self, gen, batch, kv_len):
        self.attn_norm = 1 + 0.1 * torch.randn(HIDDEN, device="cuda", generator=gen)
        self.ffn_norm = 1 + 0.1 * torch.randn(HIDDEN, device="cuda", generator=gen)
        self.wqkv = Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, gen)
        self.wo = Linear(HEADS * HEAD_DIM, HIDDEN, gen)
        self.w13 = Linear(HIDDEN, 2 * FFN, gen)
        self.w2 = Linear(FFN, HIDDEN, gen)
        shape = (batch, KV_HEADS, kv_len, HEAD_DIM)
        self.k_cache = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)
        self.v_cache = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)

    def __call__(self, h, quant):
        b = h.shape[0]
        k_cache, v_cache = self.k_cache[:b], self.v_cache[:b]
        x = rms_norm(h, self.attn_norm)
        qkv = self.wqkv(x, quant)
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        k_cache[:, :, -1] = k.view(b, KV_HEADS, HEAD_DIM)
        v_cache[:, :, -1] = v.view(b, KV_HEADS, HEAD_DIM)
        o = F.scaled_dot_product_attention(q.view(b, HEADS, 1, HEAD_DIM), k_cache, v_cache, enable_gqa=True)
        h = h + self.wo(o.reshape(b, HEADS * HEAD_DIM), quant)
        x = rms_norm(h, self.ffn_norm)
        gate, up = self.w13(x, quant).chunk(2, dim=-1)
        return h + self.w2(F.silu(gate) * up, quant)


def step(layers, h, quant):
    for layer in layers:
        h = layer(h, quant)
    return h


def time_graph(layers, h0, quant, replays=20, rounds=7):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile Triton kernels, warm cuBLAS, outside the capture
            step(layers, h0, quant)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(layers, h0, quant)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    eager = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(layers, h0, quant)
        end.record()
        torch.cuda.synchronize()
        eager.append(start.elapsed_time(end))
    return statistics.median(times), min(eager), out.clone()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-len", type=int, default=1024)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode: needs a CUDA device (run it through the device tool)", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    layers = [Layer(gen, max(args.batches), args.kv_len) for _ in range(args.layers)]
    for batch in args.batches:
        h0 = torch.randn(batch, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
        res = {}
        for quant in ("bf16", "w4a16"):
            res[quant] = time_graph(layers, h0, quant)  # (graph ms, eager ms, output)
        ref = res["bf16"][2].float()
        diff = float((res["w4a16"][2].float() - ref).norm() / ref.norm())
        row = dict(batch=batch, layers=args.layers, kv_len=args.kv_len, cuda_graph=True,
                   bf16_ms=res["bf16"][0], w4a16_ms=res["w4a16"][0],
                   bf16_eager_ms=res["bf16"][1], w4a16_eager_ms=res["w4a16"][1],
                   bf16_tok_s=batch / res["bf16"][0] * 1e3, w4a16_tok_s=batch / res["w4a16"][0] * 1e3,
                   speedup=res["bf16"][0] / res["w4a16"][0], output_rel_diff=diff)
        rows.append(row)
        print(f"batch {batch:3d}: bf16 {row['bf16_ms']:.3f} ms/step ({row['bf16_tok_s']:.0f} tok/s)  "
              f"w4a16 {row['w4a16_ms']:.3f} ms/step ({row['w4a16_tok_s']:.0f} tok/s, x{row['speedup']:.2f})  "
              f"[eager {row['bf16_eager_ms']:.2f} / {row['w4a16_eager_ms']:.2f} ms]  output rel diff {diff:.1e}",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
