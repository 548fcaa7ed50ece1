"""The fused decode kernel (internvl_plugin/cpu_kv_decode.py) against attention over the dequantized cache.

Random K, V, Q (never zeros) of many shapes: batch sizes, context lengths that are not multiples of the block,
GQA ratios, head sizes 8 / 64 / 80 / 96 / 128, int8 and int4, sliding windows and context slices (flash-decoding
splits). The cache is decoded by test_kv_cpu_format's reference (straight from the format definition) and
attention is taken in float64.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from internvl_plugin import cpu_kv_attention as kvq
from internvl_plugin.cpu_kv_decode import decode_attention, split_count
from test_kv_cpu_format import (CACHE_DTYPE, INT4, attention_reference, cache_for, dequant_reference,
                                torch_write_cells)


def filled_cache(fmt, seq_lens, kv_heads, head_size, block_size, seed):
    """A cache holding random K/V for each sequence in shuffled blocks; (cache, block table, slots per seq)."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in seq_lens]
    width = max(blocks) + 1                                    # a padding column, as vLLM's tables have
    num_blocks = sum(blocks) + 2
    order = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    cache = cache_for(fmt, num_blocks, kv_heads, block_size, head_size)
    slots, used = [], 0
    for i, (n, nb) in enumerate(zip(seq_lens, blocks)):
        table[i, :nb] = order[used:used + nb].to(torch.int32)
        used += nb
        s = torch.tensor([int(table[i, t // block_size]) * block_size + t % block_size for t in range(n)])
        scale = 0.5 + 2 * torch.rand(n, kv_heads, 1, generator=g)       # per-token magnitudes vary
        k = torch.randn(n, kv_heads, head_size, generator=g) * scale
        v = torch.randn(n, kv_heads, head_size, generator=g) * scale + 0.3
        kvq.write_cells(fmt, cache, k, v, s)
        slots.append(s)
    return cache, table, slots


def reference(fmt, cache, slots, q, scale, window):
    """float64 attention of one query row per sequence (the last position) over the decoded cache."""
    heads, head_size = q.shape[1], q.shape[2]
    block_size = cache.shape[2]
    deq = dequant_reference(fmt, cache, head_size)                       # [blocks, H, bs, 2, D]
    rows = torch.cat([deq[s // block_size, :, s % block_size] for s in slots])
    k, v = rows[:, :, 0], rows[:, :, 1]
    if fmt == INT4:                                                      # back from the rotated space
        b = kvq.rht_block(head_size)
        k, v = kvq.rht(k, inverse=True) / b, kvq.rht(v, inverse=True) / b
    seq_lens = [len(s) for s in slots]
    return attention_reference(q, k, v, scale, seq_lens, [1] * len(seq_lens), window)


CASES = [  # (seq_lens, heads, kv_heads, head_size, block_size, window)
    ([1], 8, 8, 64, 32, None),
    ([77], 8, 2, 128, 32, None),
    ([33, 95, 160, 7], 16, 8, 128, 32, None),
    ([200, 31], 12, 4, 96, 32, None),
    ([129, 300, 64], 8, 1, 64, 64, None),
    ([250, 40], 8, 4, 128, 32, 50),
    ([513], 4, 2, 96, 128, 200),
    ([70, 9], 6, 2, 80, 16, None),        # row lengths without straight-line code (cpu_kv_simd): 80 / 40 bytes
    ([21], 4, 4, 8, 16, None),            # shorter than one 16-lane chunk
    ([100, 45], 4, 4, 64, 16, None),      # one query head per KV head over many blocks
]


@pytest.mark.parametrize("fmt", kvq.PER_TOKEN_HEAD_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{'-'.join(map(str, c[0]))}_H{c[1]}/{c[2]}_D{c[3]}_w{c[5]}")
def test_fused_decode_matches_attention_over_the_dequantized_cache(fmt, case):
    seq_lens, heads, kv_heads, head_size, block_size, window = case
    cache, table, slots = filled_cache(fmt, seq_lens, kv_heads, head_size, block_size, seed=len(seq_lens) + heads)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(len(seq_lens), heads, head_size, generator=g) * 1.5
    scale = head_size ** -0.5
    ref = reference(fmt, cache, slots, q, scale, window)
    # the kernel takes the query unscaled (int4: rotated like the cache) and the softmax scale apart
    qk, qk_scale = (kvq.rht(q), scale / kvq.rht_block(head_size)) if fmt == INT4 else (q, scale)
    max_blocks = table.shape[1]
    for splits in sorted({1, 2, split_count(len(seq_lens), kv_heads, max_blocks, 2), max_blocks + 3}):
        out = np.full(q.shape, np.nan, dtype=np.float32)
        decode_attention(cache.numpy(), qk.contiguous().numpy(), table.numpy(), np.array(seq_lens, dtype=np.int32),
                         np.arange(len(seq_lens), dtype=np.int32), window or 0, fmt == INT4, out, splits, qk_scale)
        got = torch.from_numpy(out).double()
        if fmt == INT4:
            got = kvq.rht(got, inverse=True).double() / kvq.rht_block(head_size)
        err = (got - ref).abs().max().item()
        assert err < 1e-5 * ref.abs().max().item(), (splits, err)          # float32 rounding, relative


@pytest.mark.parametrize("fmt", kvq.PER_TOKEN_HEAD_DTYPES)
def test_bfloat16_query_and_output_in_place(fmt):
    """A bfloat16 model's query is read and its output written where they are (as uint16 bits, numpy has no
    bfloat16), at the sequences' rows of the whole step: equal to the float32 call on the same query, rounded
    to nearest even like torch's cast; rows of other sequences untouched."""
    seq_lens = [150, 33, 260]
    cache, table, _ = filled_cache(fmt, seq_lens, 2, 64, 32, seed=11)
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(7, 8, 64, generator=g) * 2).to(torch.bfloat16)
    rows = np.array([4, -1, 1], dtype=np.int32)                      # sequence 1 is prefilling elsewhere
    out = torch.full((7, 8, 64), 9.0, dtype=torch.bfloat16)
    args = (table.numpy(), np.array(seq_lens, dtype=np.int32), rows, 0, fmt == INT4)
    decode_attention(cache.numpy(), q.view(torch.int16).numpy().view(np.uint16), *args,
                     out.view(torch.int16).numpy().view(np.uint16), 2, 0.125)
    want = np.full((7, 8, 64), np.nan, dtype=np.float32)
    decode_attention(cache.numpy(), q.float().numpy(), *args, want, 2, 0.125)
    for r in (1, 4):
        assert torch.equal(out[r], torch.from_numpy(want[r]).to(torch.bfloat16))
        assert (out[r] != 9.0).all()
    assert (out[[0, 2, 3, 5, 6]] == 9.0).all()


@pytest.mark.parametrize("fmt", kvq.PER_TOKEN_HEAD_DTYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_writer_writes_the_bytes_of_the_torch_definition(fmt, dtype):
    """kvq.write_cells (Numba) against the format written as torch ops (test_kv_cpu_format): the same bytes on
    random K/V, ties at .5 and all-zero rows included, padding slots (-1) skipped, head sizes 64 / 96 / 128."""
    g = torch.Generator().manual_seed(3)
    for head_size in (64, 96, 128):
        k = (torch.randn(40, 4, head_size, generator=g) * torch.rand(40, 4, 1, generator=g) * 3).to(dtype)
        v = (torch.randn(40, 4, head_size, generator=g) + 0.3).to(dtype)
        k[0, 0], v[0, 1] = 0, 0
        k[1, 1] = torch.arange(head_size) * (1.5 / 127)         # x / scale lands on .5: rounded away from zero
        k[2, 2] = -k[1, 1]
        slots = torch.randperm(64, generator=g)[:40]
        slots[5] = -1
        want = cache_for(fmt, 4, 4, 16, head_size)
        torch_write_cells(fmt, want, k, v, slots)
        got = cache_for(fmt, 4, 4, 16, head_size)
        kvq.write_cells(fmt, got, k, v, slots)
        assert torch.equal(got, want), (head_size, (got != want).sum())
        assert (want.view(torch.int8) != 0).sum() > 0.5 * 39 * 4 * want.shape[-1]


def test_rows_not_decoding_are_left_alone():
    assert split_count(0, 8, 16, 2) == 1                         # a step without decode rows (prefill only)
    cache, table, slots = filled_cache(kvq.PER_TOKEN_HEAD_DTYPES[0], [40, 50], 2, 64, 32, seed=3)
    out = np.full((1, 4, 64), 7.0, dtype=np.float32)
    q = np.random.default_rng(0).standard_normal((1, 4, 64)).astype(np.float32)
    decode_attention(cache.numpy(), q, table.numpy(), np.array([40, 50], dtype=np.int32),
                     np.array([-1, 0], dtype=np.int32), 0, False, out, 2)
    assert np.isfinite(out).all() and not (out == 7.0).any()
    ref = reference(kvq.PER_TOKEN_HEAD_DTYPES[0], cache, slots[1:], torch.from_numpy(q), 1.0, None)
    torch.testing.assert_close(torch.from_numpy(out).double(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("fmt", kvq.PER_TOKEN_HEAD_DTYPES)
@pytest.mark.parametrize("dtype,order", [(torch.float32, (0, 1, 2)), (torch.bfloat16, (2, 0, 1)),
                                         (torch.float16, (1, 2, 0))])
def test_backend_step_mixes_decode_and_prefill(fmt, dtype, order, monkeypatch):
    """Through the impl with the per-step plan: two decoding sequences share prefix blocks with a prefill chunk;
    the decode rows take the fused kernel, the chunk vLLM's kernel over a scratch copy holding each block once.
    In the model's dtype (bfloat16: query and output in place; float16: through float32), with the prefill chunk
    anywhere in the step (a decode row's place in the query is not its place among the decode rows)."""
    from vllm.v1.attention.backends import cpu_attn

    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: SimpleNamespace(
        model_config=SimpleNamespace(dtype=dtype)))
    heads, kv_heads, head_size, block_size = 8, 2, 128, 32
    impl = kvq.CPUKVQuantAttentionImpl(heads, head_size, head_size ** -0.5, kv_heads, None, None, fmt)
    layer = SimpleNamespace(isa="vec", _k_scale_float=1.0, _v_scale_float=1.0)
    g = torch.Generator().manual_seed(11)
    cache = cache_for(fmt, 10, kv_heads, block_size, head_size)
    prefix = torch.tensor([3, 8])                                   # two shared blocks (64 tokens)
    tables = [torch.cat([prefix, torch.tensor([1])]), torch.cat([prefix, torch.tensor([6])]),
              torch.cat([prefix, torch.tensor([0, 9])])]
    seq_lens, query_lens = [[70, 90, 120][i] for i in order], [[1, 1, 30][i] for i in order]
    tables = [tables[i] for i in order]
    kp, vp = torch.randn(2, 64, kv_heads, head_size, generator=g).unbind(0)
    slot = lambda tb, t: int(tb[t // block_size]) * block_size + t % block_size  # noqa: E731
    kvq.write_cells(fmt, cache, kp, vp, torch.tensor([slot(tables[0], t) for t in range(64)]))
    ks, vs, slots = [], [], []
    for tb, n in zip(tables, seq_lens):
        k = torch.cat([kp, torch.randn(n - 64, kv_heads, head_size, generator=g)])
        v = torch.cat([vp, torch.randn(n - 64, kv_heads, head_size, generator=g)])
        s = torch.tensor([slot(tb, t) for t in range(n)])
        kvq.write_cells(fmt, cache, k[64:], v[64:], s[64:])
        ks.append(k), vs.append(v), slots.append(s)
    q = torch.randn(sum(query_lens), heads, head_size, generator=g).to(dtype)
    loc = torch.tensor([0] + list(itertools.accumulate(query_lens)), dtype=torch.int32)
    table = torch.zeros(3, 5, dtype=torch.int32)
    for i, tb in enumerate(tables):
        table[i, :len(tb)] = tb.to(torch.int32)
    metadata = SimpleNamespace(num_actual_tokens=32, query_start_loc=loc, block_table=table, causal=True,
                               seq_lens=torch.tensor(seq_lens, dtype=torch.int32), dynamic_causal=None)
    out = torch.full((32, heads, head_size), float("nan"), dtype=dtype)
    impl.forward(layer, q, None, None, cache, metadata, out)
    plan = kvq.plan_step(loc, metadata.seq_lens, table, block_size, -1, True, dict(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_size, dtype=dtype, causal=True,
        sliding_window_size=-1, isa="vec", enable_kv_split=False))
    decoding = [i for i, n in enumerate(query_lens) if n == 1]
    assert plan.decode_rows.tolist() == [decoding.index(i) if i in decoding else -1 for i in range(3)]
    assert plan.decode_query_rows.tolist() == [int(loc[i]) if i in decoding else -1 for i in range(3)]
    chunk = query_lens.index(30)
    assert plan.prefill_tokens.tolist() == list(range(int(loc[chunk]), int(loc[chunk]) + 30))
    assert sorted(plan.prefill_blocks.tolist()) == [0, 3, 8, 9]      # only the prefilling sequence's blocks
    deq = dequant_reference(fmt, cache, head_size)
    rows = torch.cat([deq[s // block_size, :, s % block_size] for s in slots])
    k, v = rows[:, :, 0], rows[:, :, 1]
    if fmt == INT4:
        b = kvq.rht_block(head_size)
        k, v = kvq.rht(k, inverse=True) / b, kvq.rht(v, inverse=True) / b
    ref = attention_reference(q.float(), k, v, head_size ** -0.5, seq_lens, query_lens)
    # float32: rounding only; 16-bit: the output's rounding and the prefill scratch's (K, V in the model dtype)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5 if dtype == torch.float32 else 2e-2)
    # and the format's error itself stays small against the original K, V
    exact = attention_reference(q.float(), torch.cat(ks), torch.cat(vs), head_size ** -0.5, seq_lens, query_lens)
    assert (out.double() - exact).abs().mean() < (0.05 if fmt == INT4 else 0.01)
    assert CACHE_DTYPE[fmt] == cache.dtype


def test_the_builders_metadata_keeps_every_field_of_vllms():
    """The engine's metadata comes from CPUKVQuantMetadataBuilder.build, which copies vLLM's CPUAttentionMetadata
    field by field (the step test above passes its own metadata): the dataclass fields must be exactly the
    constructor's arguments, and the copy keeps each value."""
    import inspect
    from dataclasses import fields

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    names = [f.name for f in fields(CPUAttentionMetadata)]
    assert list(inspect.signature(CPUAttentionMetadata).parameters) == names
    assert [f.name for f in fields(kvq.CPUKVQuantMetadata)] == [*names, "plan"]
    values = {name: object() for name in names}
    plan = object()
    got = kvq.with_plan(CPUAttentionMetadata(**values), plan)
    assert isinstance(got, CPUAttentionMetadata) and got.plan is plan
    assert all(getattr(got, name) is value for name, value in values.items())


AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx2,+fma,+avx,+sse4.2,+popcnt,+f16c,+bmi,+bmi2"}


@pytest.mark.skipif(all(os.environ.get(k) == v for k, v in AVX2_ONLY.items()), reason="this is the AVX2 run")
def test_the_kernel_built_for_an_avx2_only_cpu():
    """Numba compiles for the CPU it runs on; built for Haswell (AVX2, no AVX-512), as on the AVX2 machines the
    plugin also serves, the kernel gives the same attention (the shape tests above, run in a child process)."""
    env = {**os.environ, **AVX2_ONLY}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "matches_attention and L33"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


LAZY_SCRIPT = """
import os, sys, torch
from types import SimpleNamespace
from vllm.v1.attention.backends import cpu_attn
cpu_attn.get_current_vllm_config = lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
from internvl_plugin import cpu_kv_attention as kvq
kvq.CPUKVQuantAttentionImpl(8, 64, 0.125, 2, None, None, "auto")
print("auto", "numba" in sys.modules, "internvl_plugin.cpu_kv_decode" in sys.modules)
torch.set_num_threads(int(sys.argv[2]))
x = torch.randn(512, 512); (x @ x).sum()               # torch's OpenMP threads exist from here on
threads = len(os.listdir("/proc/self/task"))
kvq.CPUKVQuantAttentionImpl(8, 64, 0.125, 2, None, None, sys.argv[1])   # compiles and runs the kernel once
from internvl_plugin import cpu_kv_decode
print("quantized", "numba" in sys.modules, sys.modules["numba"].config.THREADING_LAYER,
      len(cpu_kv_decode._decode_kernel.signatures), sys.modules["numba"].threading_layer(),
      "new threads", len(os.listdir("/proc/self/task")) - threads)
print("threads: torch", torch.get_num_threads(), "numba", sys.modules["numba"].config.NUMBA_NUM_THREADS)
"""


@pytest.mark.parametrize("fmt,torch_threads,numba_env", [(kvq.PER_TOKEN_HEAD_DTYPES[0], 2, None),
                                                         (kvq.PER_TOKEN_HEAD_DTYPES[0], 1, "2")])
def test_numba_only_for_a_quantized_cache(fmt, torch_threads, numba_env):
    """A 16-bit KV cache leaves numba unimported and its threading layer unset (vLLM's n-gram proposer runs its own
    Numba parallel code); an int8/int4 impl imports the kernel and compiles it when built (a fresh process), on
    Numba's "omp" layer bound to torch's OpenMP runtime: the kernel's parallel launch starts no thread of its
    own beyond torch's (a second runtime or the work queue would start workers that fight torch's for the cores).
    Numba's pool
    takes torch's thread count unless NUMBA_NUM_THREADS says otherwise, and starting it (which sets the shared
    runtime's count to Numba's) leaves torch's count as it was."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS")}
    if numba_env:
        env["NUMBA_NUM_THREADS"] = numba_env
    proc = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, fmt, str(torch_threads)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "auto False False" in lines
    numba_threads = int(numba_env or torch_threads)
    # the runtime's pool grows only by the threads Numba wants beyond torch's (a pool of its own: all of them)
    assert f"quantized True omp 1 omp new threads {numba_threads - torch_threads}" in lines, lines
    assert f"threads: torch {torch_threads} numba {numba_env or torch_threads}" in lines, lines


def test_context_slices_follow_the_longest_decoding_context():
    """The block table is as wide as the model's whole length; slices are planned over the decoding rows' blocks,
    with Numba's thread count set first (torch's)."""
    from internvl_plugin import cpu_kv_decode

    table = torch.zeros(2, 64, dtype=torch.int32)               # 64 blocks of 32: a 2048-token model
    loc = torch.tensor([0, 1, 2], dtype=torch.int32)
    args = dict(num_kv_heads=1)
    threads = min(torch.get_num_threads(), cpu_kv_decode.numba.config.NUMBA_NUM_THREADS)
    short = kvq.plan_step(loc, torch.tensor([40, 20], dtype=torch.int32), table, 32, -1, True, args)
    assert cpu_kv_decode.numba.get_num_threads() == threads
    assert short.splits == 1                                     # 2 blocks: one slice, not up to 16
    long = kvq.plan_step(loc, torch.tensor([1280, 20], dtype=torch.int32), table, 32, -1, True, args)
    assert long.splits == split_count(2, 1, 40, threads) == min(threads, 10)
