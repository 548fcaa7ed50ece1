"""The decode kernel's vector loops (internvl_plugin/cpu_kv_simd.py) against float64 numpy on random bytes.

Every row length the code has a path for: the straight-line sizes of the score loop (32-128 bytes), lengths it
only knows at run time, shorter than one 16-lane chunk and with a scalar tail; one and two query heads; int8
and int4 (low nibble with the first half of the query or accumulator, high nibble with the second); token
counts around the V loop's unroll of 4; unaligned offsets and row strides.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from internvl_plugin import cpu_kv_simd as simd

LENGTHS = (4, 8, 15, 16, 20, 32, 40, 48, 64, 80, 96, 100, 128)


@njit(cache=False)
def _scores(cells, k_at, stride, q, q_len, n, tokens, out, int4, heads):
    if int4:
        if heads == 2:
            simd.scores2_u4(cells, k_at, stride, q, 0, q_len, n, tokens, out, 0, tokens)
        else:
            simd.scores1_u4(cells, k_at, stride, q, 0, 0, n, tokens, out, 0, 0)
    elif heads == 2:
        simd.scores2_i8(cells, k_at, stride, q, 0, q_len, n, tokens, out, 0, tokens)
    else:
        simd.scores1_i8(cells, k_at, stride, q, 0, 0, n, tokens, out, 0, 0)


@njit(cache=False)
def _accumulate(acc, acc_len, cells, v_at, stride, weights, tokens, n, int4, heads, fetch):
    size = cells.size - fetch
    if int4:
        if heads == 2:
            simd.acc2_u4(acc, 0, acc_len, cells, v_at, stride, weights, 0, tokens, tokens, n, fetch, size)
        else:
            simd.acc1_u4(acc, 0, 0, cells, v_at, stride, weights, 0, 0, tokens, n, fetch, size)
    elif heads == 2:
        simd.acc2_i8(acc, 0, acc_len, cells, v_at, stride, weights, 0, tokens, tokens, n, fetch, size)
    else:
        simd.acc1_i8(acc, 0, 0, cells, v_at, stride, weights, 0, 0, tokens, n, fetch, size)


def _values(cells: np.ndarray, at: int, n: int, int4: bool) -> np.ndarray:
    """The row's elements in the loops' order (int4: the n low nibbles, then the n high ones), float64."""
    raw = cells[at:at + n].astype(np.float64)
    return np.concatenate([raw % 16, raw // 16]) if int4 else raw


def _bytes(rng, size: int, int4: bool) -> np.ndarray:
    raw = rng.integers(0, 256, size, dtype=np.uint8)
    return raw if int4 else raw.view(np.int8)


@pytest.mark.parametrize("int4", [False, True], ids=["int8", "int4"])
@pytest.mark.parametrize("heads", [1, 2])
def test_scores_equal_float64_dot_products(int4, heads):
    rng = np.random.default_rng(3 + heads + 10 * int4)
    for n in LENGTHS:
        for tokens in (1, 5):
            cells = _bytes(rng, 4000, int4)
            q_len = 2 * n if int4 else n
            q = rng.standard_normal(heads * q_len).astype(np.float32)
            k_at, stride = int(rng.integers(0, 100)), n + int(rng.integers(0, 9))
            out = np.full(2 * tokens, np.nan, dtype=np.float32)
            _scores(cells, k_at, stride, q, q_len, n, tokens, out, int4, heads)
            for h in range(heads):
                for j in range(tokens):
                    qh, k = q[h * q_len:(h + 1) * q_len].astype(np.float64), _values(cells, k_at + j * stride, n, int4)
                    bound = 1e-6 * (np.abs(qh) @ np.abs(k)) + 1e-6          # float32 rounding of the sum
                    assert abs(out[h * tokens + j] - qh @ k) <= bound, (n, tokens, h, j)
            if heads == 1:
                assert np.isnan(out[tokens:]).all()                      # nothing written past the head's row


@pytest.mark.parametrize("int4", [False, True], ids=["int8", "int4"])
@pytest.mark.parametrize("heads", [1, 2])
def test_accumulate_equals_float64_weighted_sums(int4, heads):
    rng = np.random.default_rng(5 + heads + 10 * int4)
    for n in LENGTHS:
        for tokens in (1, 3, 4, 7, 9):
            cells = _bytes(rng, 4000, int4)
            acc_len = 2 * n if int4 else n
            v_at, stride = int(rng.integers(0, 50)), n + int(rng.integers(0, 9))
            weights = rng.random(2 * tokens).astype(np.float32)
            acc = rng.standard_normal(2 * acc_len + 3).astype(np.float32)
            want = acc.astype(np.float64)
            for h in range(heads):
                for j in range(tokens):
                    want[h * acc_len:(h + 1) * acc_len] += (weights[h * tokens + j]
                                                             * _values(cells, v_at + j * stride, n, int4))
            fetch = -1 if tokens % 2 else int(rng.integers(0, 4000))     # a prefetch hint changes nothing
            _accumulate(acc, acc_len, cells, v_at, stride, weights, tokens, n, int4, heads, fetch)
            np.testing.assert_allclose(acc, want, rtol=0, atol=1e-4, err_msg=f"n={n} T={tokens}")  # sums < 1300
            if heads == 1:                                                 # the rest untouched
                assert np.array_equal(acc[acc_len:], want[acc_len:].astype(np.float32))


def test_wrong_arrays_and_offsets_are_typing_errors_naming_the_argument():
    """The loops index their arrays flat: a float64 query, a non-contiguous output or a float offset must not
    compile into reads of the wrong bytes."""
    from numba.core.errors import TypingError

    cells = np.zeros(64, dtype=np.int8)
    out = np.zeros(4, dtype=np.float32)

    @njit(cache=False)
    def call(q, out, at):
        simd.scores1_i8(cells, at, 16, q, 0, 0, 16, 1, out, 0, 0)

    call(np.ones(16, dtype=np.float32), out, 0)                       # the right types compile and run
    assert out[0] == 0.0
    for args, culprit in (((np.ones(16), out, 0), "scores: q"),
                          ((np.ones(16, dtype=np.float32), np.zeros((4, 2), np.float32)[:, 0], 0), "scores: out"),
                          ((np.ones(16, dtype=np.float32), out, 0.5), "integer offsets")):
        with pytest.raises(TypingError, match=culprit):
            call(*args)
