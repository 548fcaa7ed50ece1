"""The inner loops of the CPU int8/int4 KV decode kernel as explicit LLVM vector code (Numba intrinsics).

Numba's auto-vectorized loops left the decode kernel compute-bound at 32 ns a (token, KV head) on one core of
the 2-core AVX-512 VM: LLVM picks 256-bit vectors on AVX-512 machines, keeps the V accumulators in memory, and
spends as much on each token's bookkeeping as on its dot products. These loops say what to do instead: 16-lane
vectors (one zmm register on AVX-512; LLVM splits them into two ymm on AVX2, four registers on NEON), the query
loaded once per block, independent accumulators so that the FMA latency overlaps, straight-line code per token
for the usual head sizes, and the V accumulators kept in registers over a run of tokens: 17-20 ns there. On
machines with 16 vector registers (AVX2) the widest cases (int4, two heads) spill some accumulators.
Written as intrinsics because Numba has no vector type; the kernel (cpu_kv_decode.py) calls them like functions
and LLVM inlines them.

Element layout is the cache's (cpu_kv_decode): int8 cells are signed bytes; an int4 byte holds element 2i in
its low nibble and 2i + 1 in its high one, and the callers keep queries and accumulators in split order (the
``n`` low-nibble elements first, then the ``n`` high ones), so one byte load feeds two contiguous vectors.
Every offset is in elements of the array it indexes (flat, C order); ``n`` is the number of bytes in a row's
data (int8: the head size; int4: half of it); any ``n`` works (a scalar tail after the 16-lane chunks).
"""

from __future__ import annotations

from llvmlite import ir
import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["acc1_i8", "acc1_u4", "acc2_i8", "acc2_u4", "scores1_i8", "scores1_u4", "scores2_i8",
           "scores2_u4"]

LANES = 16
UNROLL = 4                        # tokens per step of the V loop: independent accumulators hide FMA latency
_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_FAST = ("nsz", "arcp", "contract", "reassoc")     # not nnan/ninf: a NaN query stays a visible NaN


def _vec(t, w):
    return ir.VectorType(t, w)


def _i64(v):
    return ir.Constant(_I64, v)


_BYTES = (types.int8, types.uint8)     # the kernel types both formats' branches with one cache type


def _check(name, ary, dtypes):
    """A typing error unless ``ary`` is a C-contiguous array of one of ``dtypes``: the loops index it flat."""
    if not (isinstance(ary, types.Array) and ary.layout == "C" and ary.dtype in dtypes):
        raise numba.core.errors.TypingError(f"{name}: a C-contiguous array of {dtypes} expected, got {ary}")


def _int64(name, *values):
    """int64 for each integer argument (the call converts them), a typing error for anything else."""
    for v in values:
        if not isinstance(v, types.Integer):
            raise numba.core.errors.TypingError(f"{name}: integer offsets and counts expected, got {v}")
    return [types.int64] * len(values)


def _data(context, builder, aryty, ary):
    return context.make_array(aryty)(context, builder, ary).data


def _load_f32(builder, base, at, w):
    return builder.load(builder.bitcast(builder.gep(base, [at]), _vec(_F32, w).as_pointer()), align=4)


def _store_f32(builder, value, base, at, w):
    builder.store(value, builder.bitcast(builder.gep(base, [at]), _vec(_F32, w).as_pointer()), align=4)


def _codes(builder, base, at, w, int4):
    """w bytes at ``base[at]`` as float vectors: (x,) for int8, (low nibbles, high nibbles) for int4."""
    raw = builder.load(builder.bitcast(builder.gep(base, [at]), _vec(_I8, w).as_pointer()), align=1)
    if not int4:
        return (builder.sitofp(builder.sext(raw, _vec(_I32, w)), _vec(_F32, w)),)
    wide = builder.zext(raw, _vec(_I32, w))
    low = builder.and_(wide, ir.Constant(_vec(_I32, w), [15] * w))
    high = builder.lshr(wide, ir.Constant(_vec(_I32, w), [4] * w))
    return builder.sitofp(low, _vec(_F32, w)), builder.sitofp(high, _vec(_F32, w))


def _splat(builder, x, w):
    undef = ir.Constant(_vec(_F32, w), None)
    return builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(_I32, 0)), undef,
                                  ir.Constant(_vec(_I32, w), [0] * w))


def _fma(builder, a, b, c):
    return builder.fadd(builder.fmul(a, b, flags=_FAST), c, flags=_FAST)


def _hsum(builder, v, w):
    while w > 1:
        w //= 2
        low = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, w), list(range(w))))
        high = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, w), list(range(w, 2 * w))))
        v = builder.fadd(low, high, flags=_FAST)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _chunks(builder, n, body):
    """body(offset, w) over offsets [0, n): chunks of w = LANES, then the remainder one element at a time."""
    full = builder.udiv(n, _i64(LANES))
    with cgutils.for_range(builder, full) as loop:
        body(builder.mul(loop.index, _i64(LANES)), LANES)
    done = builder.mul(full, _i64(LANES))
    with cgutils.for_range(builder, builder.sub(n, done)) as loop:
        body(builder.add(done, loop.index), 1)


def _prefetch_at(builder, base, at):
    """Ask for the cache line holding ``base[at]``, into L2 (a hint: no fault, no effect on results). A block's
    cells are read in order, but the next block is wherever the block table says, so the hardware prefetcher
    stalls at each block boundary. L2, not L1: a 128-token block of a 128-wide head is 33 KB."""
    ptr = builder.bitcast(builder.gep(base, [at]), _I8.as_pointer())
    fn = builder.module.declare_intrinsic("llvm.prefetch", [ptr.type],
                                          ir.FunctionType(ir.VoidType(), [ptr.type] + [_I32] * 3))
    builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])


_SIZES = (32, 48, 64, 96, 128)      # row lengths (bytes) given straight-line code: head sizes 32-128, 64-256 (int4)


def _make_scores(int4: bool, heads: int):
    """out[o_at_h + j] = Σ_i q[q_at_h + i] · k_j,i for j < tokens and each of ``heads`` query rows, where
    k_j = cells.flat[k_at + j * stride:][:n] (int4: the low nibbles pair with q[q_at_h + i], the high ones
    with q[q_at_h + n + i]). The query chunks are loaded once for all tokens; for the usual row lengths
    (``_SIZES``) each token's dot product is straight-line code, two accumulators per head."""

    def typer(typingctx, cells, k_at, stride, q, q_at0, q_at1, n, tokens, out, o_at0, o_at1):
        _check("scores: cells", cells, _BYTES)
        _check("scores: q", q, (types.float32,))
        _check("scores: out", out, (types.float32,))
        k_at, stride, q_at0, q_at1, n, tokens, o_at0, o_at1 = _int64("scores", k_at, stride, q_at0, q_at1, n, tokens,
                                                                     o_at0, o_at1)
        sig = types.void(cells, k_at, stride, q, q_at0, q_at1, n, tokens, out, o_at0, o_at1)

        def codegen(context, builder, signature, args):
            cells_v, k_at, stride, q_v, q_at0, q_at1, n, tokens, out_v, o_at0, o_at1 = args
            kp = _data(context, builder, signature.args[0], cells_v)
            qp = _data(context, builder, signature.args[3], q_v)
            op = _data(context, builder, signature.args[8], out_v)
            q_ats, o_ats = (q_at0, q_at1)[:heads], (o_at0, o_at1)[:heads]
            parts = 2 if int4 else 1

            def dot(row, q_chunks, size_at_runtime):
                """The heads' dot products with the row at flat index ``row``: the chunks' partial sums
                (straight-line over ``q_chunks``), or a loop when the length is only known at run time."""
                sums = []
                if size_at_runtime:
                    regs = {w: [cgutils.alloca_once(builder, _vec(_F32, w)) for _ in range(heads)]
                            for w in (LANES, 1)}
                    for w in (LANES, 1):
                        for h in range(heads):
                            builder.store(ir.Constant(_vec(_F32, w), [0.0] * w), regs[w][h])

                    def body(off, w):
                        xs = _codes(builder, kp, builder.add(row, off), w, int4)
                        for h in range(heads):
                            for part, x in enumerate(xs):
                                at = builder.add(builder.add(q_ats[h], off), builder.mul(n, _i64(part)))
                                qv = _load_f32(builder, qp, at, w)
                                builder.store(_fma(builder, qv, x, builder.load(regs[w][h])), regs[w][h])

                    _chunks(builder, n, body)
                    for h in range(heads):
                        tail = builder.extract_element(builder.load(regs[1][h]), ir.Constant(_I32, 0))
                        sums.append(builder.fadd(_hsum(builder, builder.load(regs[LANES][h]), LANES), tail,
                                                 flags=_FAST))
                    return sums
                partial = [[None, None] for _ in range(heads)]
                for c, chunk in enumerate(q_chunks):
                    xs = _codes(builder, kp, builder.add(row, _i64(c * LANES)), LANES, int4)
                    for h in range(heads):
                        for part, x in enumerate(xs):
                            k = (c * parts + part) % 2
                            prev = partial[h][k]
                            partial[h][k] = (builder.fmul(chunk[h][part], x, flags=_FAST) if prev is None
                                             else _fma(builder, chunk[h][part], x, prev))
                for h in range(heads):
                    a, b = partial[h]
                    sums.append(_hsum(builder, a if b is None else builder.fadd(a, b, flags=_FAST), LANES))
                return sums

            def token_loop(size):
                q_chunks = []
                if size:
                    for c in range(size // LANES):
                        q_chunks.append([[_load_f32(builder, qp, builder.add(q_ats[h], _i64(c * LANES + part * size)),
                                                    LANES) for part in range(parts)] for h in range(heads)])
                with cgutils.for_range(builder, tokens) as loop:
                    j = loop.index
                    row = builder.add(k_at, builder.mul(j, stride))
                    for h, value in enumerate(dot(row, q_chunks, not size)):
                        builder.store(value, builder.gep(op, [builder.add(o_ats[h], j)]))

            # a switch on the row length: straight-line code for the usual ones, a loop for the rest
            after = builder.append_basic_block("scores.end")
            generic = builder.append_basic_block("scores.generic")
            switch = builder.switch(n, generic)
            for size in _SIZES:
                case = builder.append_basic_block(f"scores.n{size}")
                switch.add_case(_i64(size), case)
                builder.position_at_end(case)
                token_loop(size)
                builder.branch(after)
            builder.position_at_end(generic)
            token_loop(0)
            builder.branch(after)
            builder.position_at_end(after)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _make_acc(int4: bool, heads: int):
    """acc[a_at_h + i] += Σ_j w[w_at_h + j] · v_j,i for j < tokens, where v_j = cells.flat[v_at + j * stride:][:n]
    (int4: low nibbles into acc[a_at_h + i], high ones into acc[a_at_h + n + i]). Meanwhile up to ``pf_len``
    bytes at cells.flat[pf_at:] (the next block; pf_at < 0: none) are asked for, three lines every 4-token step
    of the 16-lane chunks (at most 192 bytes a step): spread over the loop, not in a burst, which measured
    10-15 % slower where the cache sits in L3 (8k context, one sequence)."""

    def typer(typingctx, acc, a_at0, a_at1, cells, v_at, stride, weights, w_at0, w_at1, tokens, n, pf_at, pf_len):
        _check("acc: acc", acc, (types.float32,))
        _check("acc: cells", cells, _BYTES)
        _check("acc: weights", weights, (types.float32,))
        a_at0, a_at1, v_at, stride, w_at0, w_at1, tokens, n, pf_at, pf_len = _int64(
            "acc", a_at0, a_at1, v_at, stride, w_at0, w_at1, tokens, n, pf_at, pf_len)
        sig = types.void(acc, a_at0, a_at1, cells, v_at, stride, weights, w_at0, w_at1, tokens, n, pf_at, pf_len)

        def codegen(context, builder, signature, args):
            acc_v, a_at0, a_at1, cells_v, v_at, stride, w_v, w_at0, w_at1, tokens, n, pf_at, pf_len = args
            ap = _data(context, builder, signature.args[0], acc_v)
            cp = _data(context, builder, signature.args[3], cells_v)
            wp = _data(context, builder, signature.args[6], w_v)
            a_ats, w_ats = (a_at0, a_at1)[:heads], (w_at0, w_at1)[:heads]
            parts = 2 if int4 else 1
            slots = {w: [[[cgutils.alloca_once(builder, _vec(_F32, w)) for _ in range(UNROLL)]
                          for _ in range(parts)] for _ in range(heads)] for w in (LANES, 1)}

            def body(off, w):
                # this chunk of every head's accumulator stays in registers while the tokens stream by
                zero = ir.Constant(_vec(_F32, w), [0.0] * w)
                regs = slots[w]
                for h in range(heads):
                    for p in range(parts):
                        for u in range(UNROLL):
                            builder.store(zero, regs[h][p][u])

                def token(j, u):
                    xs = _codes(builder, cp, builder.add(builder.add(v_at, builder.mul(j, stride)), off), w, int4)
                    for h in range(heads):
                        wj = _splat(builder, builder.load(builder.gep(wp, [builder.add(w_ats[h], j)])), w)
                        for p, x in enumerate(xs):
                            builder.store(_fma(builder, wj, x, builder.load(regs[h][p][u])), regs[h][p][u])

                steps = builder.udiv(tokens, _i64(UNROLL))
                with cgutils.for_range(builder, steps) as loop:
                    first = builder.mul(loop.index, _i64(UNROLL))
                    if w > 1:
                        gs = builder.add(builder.mul(builder.udiv(off, _i64(LANES)), steps), loop.index)
                        for extra in range(3):
                            byte = builder.mul(builder.add(builder.mul(gs, _i64(3)), _i64(extra)), _i64(64))
                            ok = builder.and_(builder.icmp_signed(">=", pf_at, _i64(0)),
                                              builder.icmp_signed("<", byte, pf_len))
                            with builder.if_then(ok):
                                _prefetch_at(builder, cp, builder.add(pf_at, byte))
                    for u in range(UNROLL):
                        token(builder.add(first, _i64(u)), u)
                done = builder.mul(steps, _i64(UNROLL))
                with cgutils.for_range(builder, builder.sub(tokens, done)) as loop:
                    token(builder.add(done, loop.index), 0)
                for h in range(heads):
                    for p in range(parts):
                        total = builder.load(regs[h][p][0])
                        for u in range(1, UNROLL):
                            total = builder.fadd(total, builder.load(regs[h][p][u]), flags=_FAST)
                        at = builder.add(builder.add(a_ats[h], off), builder.mul(n, _i64(p)))
                        _store_f32(builder, builder.fadd(_load_f32(builder, ap, at, w), total, flags=_FAST),
                                   ap, at, w)

            _chunks(builder, n, body)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


# one and two query heads per call (a GQA group is walked in pairs)
scores1_i8, scores2_i8 = _make_scores(False, 1), _make_scores(False, 2)
scores1_u4, scores2_u4 = _make_scores(True, 1), _make_scores(True, 2)
acc1_i8, acc2_i8 = _make_acc(False, 1), _make_acc(False, 2)
acc1_u4, acc2_u4 = _make_acc(True, 1), _make_acc(True, 2)
