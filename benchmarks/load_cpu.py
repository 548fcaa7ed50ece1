"""Load test of ``hub_cli serve`` on CPU: N concurrent clients sending image chats of mixed sizes to the tiny InternVL.

    python benchmarks/load_cpu.py                       # 64 clients, 60 s, a server of its own on 127.0.0.1
    python benchmarks/load_cpu.py --clients 16 --duration 20 --json out.json
    python benchmarks/load_cpu.py --url http://127.0.0.1:23333 --model NAME --pid PID   # a running server

Each client sends one request at a time (a base64 image of a size drawn in turn from SIZES, 8 answer tokens) until
the time is up; every client's first request goes out together, so the server sees N requests at once. Prints
requests answered (HTTP 200), errors by status, p50/p95/p99 latency, throughput, and the RSS of the server's
process tree (API server, engine core, workers) after one warm-up request of each size and after the load.
Exit code 1 when a request failed or the RSS grew more than --max-rss-growth (default 10 %).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIZES = [(64, 48), (448, 448), (640, 480), (1024, 768), (300, 1), (2000, 300), (800, 1200)]


def image_url(w: int, h: int, seed: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (seed * 37 % 256, seed * 91 % 256, 120)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def run_load(base: str, model: str, clients: int, duration: float, max_tokens: int,
                   pid: int | None = None, rss_every: float = 30.0) -> dict:
    """The load; with `pid`, the server's process-tree RSS every `rss_every` seconds while it runs."""
    import httpx

    urls = [image_url(w, h, i) for i, (w, h) in enumerate(SIZES)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start_gate = asyncio.Event()
    deadline = 0.0

    async def client(n: int, http: httpx.AsyncClient) -> None:
        await start_gate.wait()
        i = n
        while True:
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                                {"type": "text", "text": "Describe the image."}]}]}
            t0 = time.perf_counter()
            try:
                resp = await http.post("/v1/chat/completions", json=body)
                key = None if resp.status_code == 200 else f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            if key is None:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[key] = errors.get(key, 0) + 1
            i += clients
            if time.monotonic() >= deadline:
                return

    rss_samples: list[tuple[float, int]] = []

    async def sample_rss(t0: float) -> None:
        while True:
            rss_samples.append((round(time.monotonic() - t0, 1), tree_rss(pid)))
            await asyncio.sleep(rss_every)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        tasks = [asyncio.create_task(client(n, http)) for n in range(clients)]
        t0 = time.monotonic()
        deadline = t0 + duration
        sampler = asyncio.create_task(sample_rss(t0)) if pid else None
        start_gate.set()
        await asyncio.gather(*tasks)
        wall = time.monotonic() - t0
        if sampler is not None:
            sampler.cancel()
    return {"answered": len(latencies), "errors": errors, "wall_s": wall, "rss_samples": rss_samples,
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95), "p99_s": percentile(latencies, 99),
            "throughput_rps": len(latencies) / wall if wall else 0.0}


def warm_up(base: str, model: str, max_tokens: int) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=600) as http:
        for i, (w, h) in enumerate(SIZES):
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": image_url(w, h, i)}},
                                {"type": "text", "text": "Describe the image."}]}]}
            resp = http.post("/v1/chat/completions", json=body)
            if resp.status_code != 200:
                raise SystemExit(f"load_cpu: warm-up request {w}x{h} answered HTTP {resp.status_code}: "
                                 f"{resp.text[:200]}")


def start_own_server(args: argparse.Namespace):
    """hub_cli serve of the tiny InternVL on a free loopback port; returns (process, base URL, served name, log)."""
    import socket

    from hub_cli.launch import start_server, wait_healthy
    from hub_cli.serve import prepare_server
    from internvl_plugin.tiny import build_tiny_model

    root = Path(args.cache_dir or tempfile.mkdtemp(prefix="load-cpu-"))
    model = build_tiny_model(args.layout, root / args.layout)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, served, argv, env, _ = prepare_server(
        str(model), host="127.0.0.1", port=port, source="hf", revision=None, download_dir=None, tp=1,
        cache_max_entry_count=None, quant_policy="0", model_format=None, model_name="tiny", session_len=4096,
        max_batch_size=args.max_batch_size, trust_request_mm_kwargs=False,
        vllm_args=("--limit-mm-per-prompt", '{"image": 1}'))
    log = open(root / "server.log", "w")
    proc = start_server(argv, env, log=log)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, timeout_s=900)
    return proc, base, served, root / "server.log"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=16, help="own server: --max-batch-size")
    parser.add_argument("--layout", default="internvl2-2b", help="own server: tiny layout")
    parser.add_argument("--cache-dir", help="own server: where the tiny checkpoint is built")
    parser.add_argument("--url", help="a running server instead of our own")
    parser.add_argument("--model", help="served model name (with --url)")
    parser.add_argument("--pid", type=int, help="the running server's PID, for RSS (with --url)")
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--rss-every", type=float, default=30.0, help="seconds between RSS samples during the load")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    proc = None
    if args.url:
        if not args.model:
            parser.error("--url needs --model")
        base, model, pid = args.url.rstrip("/"), args.model, args.pid
    else:
        from hub_cli.launch import stop_server

        proc, base, model, log = start_own_server(args)
        pid = proc.pid
        print(f"load_cpu: server {base} (pid {pid}, log {log})", file=sys.stderr)
    try:
        rss_start = tree_rss(pid) if pid else None
        warm_up(base, model, args.max_tokens)
        rss_before = tree_rss(pid) if pid else None
        result = asyncio.run(run_load(base, model, args.clients, args.duration, args.max_tokens, pid, args.rss_every))
        time.sleep(2)   # let the engine drop finished requests
        rss_after = tree_rss(pid) if pid else None
    finally:
        if proc is not None:
            stop_server(proc)
    result.update(clients=args.clients, duration_s=args.duration, max_tokens=args.max_tokens,
                  sizes=[f"{w}x{h}" for w, h in SIZES], cpus=os.cpu_count(),
                  rss_start_bytes=rss_start, rss_before_bytes=rss_before, rss_after_bytes=rss_after)
    mib = 1 << 20
    print(f"clients {args.clients}, {result['wall_s']:.1f} s: answered {result['answered']}, "
          f"errors {sum(result['errors'].values())} {result['errors'] or ''}")
    print(f"latency p50 {result['p50_s']:.2f} s, p95 {result['p95_s']:.2f} s, p99 {result['p99_s']:.2f} s; "
          f"throughput {result['throughput_rps']:.2f} requests/s")
    growth = None
    if rss_before:
        growth = rss_after / rss_before - 1
        print(f"server RSS (process tree): {rss_start / mib:.0f} MiB at start, {rss_before / mib:.0f} MiB after "
              f"warm-up, {rss_after / mib:.0f} MiB after the load ({growth:+.1%})")
        samples = result["rss_samples"]
        if samples:
            print(f"server RSS during the load (every {args.rss_every:.0f} s): "
                  + ", ".join(f"{t:.0f} s {b / mib:.0f}" for t, b in samples)
                  + f" MiB; peak {max(b for _, b in samples) / mib:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    failed = bool(result["errors"]) or result["answered"] == 0
    return 1 if failed or (growth is not None and growth > args.max_rss_growth) else 0


if __name__ == "__main__":
    sys.exit(main())
