"""Peak memory and wall time of ``awq_tools quantize`` on random checkpoints of real InternLM2 shapes.

    python benchmarks/bench_quantize.py --shapes 1.8b,7b [--samples 4 --seqlen 256] [--root /tmp/bench-quantize]
                                        [--device cuda] [--json results.json]

For each shape it writes a random bfloat16 InternLM2 checkpoint (plain ``InternLM2ForCausalLM``: the decoder
layers are what is streamed; a vision tower would only add copied bytes), two layers per shard, generated shard
by shard so the generator itself never holds the model; the tokenizer is the tiny InternLM2's (its ids index the
real vocabulary). Then it runs ``awq_tools quantize`` in a child process and reports, from the same run:

    peak RSS of the child (getrusage ru_maxrss)  vs  the checkpoint's bytes (what loading it whole takes)
    wall time                                    vs  reading every input byte once (the IO floor)
    with --device cuda: the child's peak GPU memory (torch.cuda.max_memory_allocated / _reserved)

Exit 1 if the 7B run's peak RSS reaches 4 GiB with at most 4 x 256 calibration tokens. Timings on a shared machine are noisy; memory is not.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from internvl_plugin.tiny import build_tiny_model  # noqa: E402

GiB = 1 << 30
# (layers, hidden, heads, kv heads, ffn, vocab): internlm2-chat-1_8b and internlm2-7b (hub_cli/catalogue.py)
SHAPES = {"1.8b": (24, 2048, 16, 8, 8192, 92544), "7b": (32, 4096, 32, 8, 14336, 92544)}
LIMIT_7B = 4 * GiB
SMALL_CALIBRATION = 4 * 256  # tokens (the default) up to which LIMIT_7B is checked
# the child: awq_tools' CLI, then its CUDA allocator's high-water marks on stderr (one JSON line)
_CHILD = """
import json, sys, torch
from awq_tools.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    if torch.cuda.is_initialized():
        print("GPU_PEAK " + json.dumps({"allocated": torch.cuda.max_memory_allocated(),
                                        "reserved": torch.cuda.max_memory_reserved()}), file=sys.stderr)
"""


def write_random_internlm2(out: Path, shape: tuple[int, ...], tokenizer_from: Path, seed: int = 0) -> int:
    """A random bfloat16 InternLM2 checkpoint, two decoder layers per shard; returns its tensor bytes."""
    layers, hidden, heads, kv, ffn, vocab = shape
    head_dim = hidden // heads
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    # drawing 7.5e9 normal numbers takes many minutes on 2 cores; a pool of 2^24 of them, read from a random
    # offset per tensor, gives values of the same distribution at copy speed (the quantizer's cost does not
    # depend on them)
    pool = torch.randn(1 << 24, generator=gen).to(torch.bfloat16)

    def rand(*s, std):
        n = math.prod(s)
        start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
        reps = -(-(start + n) // pool.numel())
        flat = pool.repeat(reps)[start:start + n] if reps > 1 else pool[start:start + n]
        return (flat.reshape(s) * std).to(torch.bfloat16)

    groups = [[("model.tok_embeddings.weight", (vocab, hidden), 1.0), ("output.weight", (vocab, hidden), 0.02),
               ("model.norm.weight", (hidden,), None)]]
    for i in range(0, layers, 2):
        group = []
        for j in (i, i + 1):
            p = f"model.layers.{j}."
            group += [(p + "attention.wqkv.weight", ((heads + 2 * kv) * head_dim, hidden), hidden ** -0.5),
                      (p + "attention.wo.weight", (hidden, hidden), hidden ** -0.5),
                      (p + "feed_forward.w1.weight", (ffn, hidden), hidden ** -0.5),
                      (p + "feed_forward.w3.weight", (ffn, hidden), hidden ** -0.5),
                      (p + "feed_forward.w2.weight", (hidden, ffn), ffn ** -0.5),
                      (p + "attention_norm.weight", (hidden,), None), (p + "ffn_norm.weight", (hidden,), None)]
        groups.append(group)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.ones(s, dtype=torch.bfloat16) if std is None else rand(*s, std=std))
                   for name, s, std in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: fname for name in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config = json.loads((tokenizer_from / "config.json").read_text())
    config.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn,
                  num_hidden_layers=layers, vocab_size=vocab)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return total


def full_model_bytes(shape: tuple[int, ...]) -> int:
    """bf16 bytes of the InternLM2 of this shape with all its layers."""
    layers, hidden, heads, kv, ffn, vocab = shape
    head_dim = hidden // heads
    per_layer = (heads + 2 * kv) * head_dim * hidden + hidden * hidden + 3 * ffn * hidden + 2 * hidden
    return 2 * (2 * vocab * hidden + hidden + layers * per_layer)


def read_floor(folder: Path) -> float:
    """Seconds to read every shard once (drop nothing: the page cache is what the quantizer sees too)."""
    start = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1.8b,7b")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--root", type=Path, default=Path("/tmp/bench-quantize"))
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the real count); every layer has the same shape, so the peak "
                         "memory of a few is the peak of all")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--device", default="cpu", help="awq_tools quantize --device (cpu, cuda)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    corpus = REPO / "internvl_plugin" / "data" / "corpus.txt"
    tiny = build_tiny_model("internlm2", args.root / "tiny-internlm2")
    failed, results = False, []
    for name in args.shapes.split(","):
        src, out = args.root / f"internlm2-{name}", args.root / f"internlm2-{name}-w4a16"
        for p in (src, out, out.parent / f".{out.name}.partial"):
            shutil.rmtree(p, ignore_errors=True)
        t0 = time.perf_counter()
        shape = SHAPES[name] if args.layers is None else (args.layers, *SHAPES[name][1:])
        nbytes = write_random_internlm2(src, shape, tiny)
        gen_s = time.perf_counter() - t0
        floor = read_floor(src)
        cmd = [sys.executable, "-c", _CHILD, "quantize", str(src), "--work-dir", str(out),
               "--calib-dataset", str(corpus), "--calib-samples", str(args.samples), "--calib-seqlen",
               str(args.seqlen), "--w-group-size", "128", "--device", args.device, "--quiet"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if res.returncode:
            print(res.stderr[-3000:])
            return 1
        if peak <= before * 1024:
            print("warning: peak RSS not above an earlier child's; run one shape per invocation for exact figures")
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        print(f"internlm2-{name}: {shape[0]} layers, checkpoint {nbytes / GiB:.2f} GiB bf16 "
              f"(generated in {gen_s:.0f} s), output {out_bytes / GiB:.2f} GiB; calibration {args.samples} x "
              f"{args.seqlen} tokens")
        full = full_model_bytes(SHAPES[name])
        print(f"  peak RSS {peak / GiB:.2f} GiB = {peak / full:.2f} x the bytes of the whole {SHAPES[name][0]}-layer "
              f"model ({full / GiB:.2f} GiB bf16, what loading it whole takes)")
        print(f"  wall {wall:.0f} s = {wall / max(floor, 1e-9):.1f} x reading the input once ({floor:.1f} s); "
              f"{wall / shape[0]:.1f} s per layer")
        gpu = [json.loads(line.split(" ", 1)[1]) for line in res.stderr.splitlines() if line.startswith("GPU_PEAK ")]
        if gpu:
            print(f"  peak GPU memory {gpu[0]['allocated'] / GiB:.2f} GiB allocated, "
                  f"{gpu[0]['reserved'] / GiB:.2f} GiB reserved (torch's allocator, {args.device})")
        results.append({"shape": name, "layers": shape[0], "device": args.device, "samples": args.samples,
                        "seqlen": args.seqlen, "checkpoint_bytes": nbytes, "whole_model_bytes": full,
                        "peak_rss_bytes": peak, "wall_s": round(wall, 1), "read_floor_s": round(floor, 2),
                        "gpu_peak": gpu[0] if gpu else None})
        # the bound is for a small calibration set: 128 x 2048 tokens alone hold 2 x 4 GiB of 7B activations
        if name == "7b" and peak >= LIMIT_7B and args.samples * args.seqlen <= SMALL_CALIBRATION:
            print(f"  FAIL: 7B peak RSS {peak / GiB:.2f} GiB >= 4 GiB")
            failed = True
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
