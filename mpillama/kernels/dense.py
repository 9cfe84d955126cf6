"""Dense f32 kernels of the forward pass: matmul_f32 (--weight-type f32), rmsnorm, swiglu, rope.

Imports numpy, numba, mpillama.{config, quant} and the package's bits.py only.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from mpillama.config import RopeScaling
from mpillama.kernels.bits import _exp_f32
from mpillama.quant import rope_frequencies_ref


@njit(cache=True, fastmath=True)
def _f32_rows(out, w, x, lo, hi):
    # w rows [lo, hi) (rows, cols) f32 @ x (1, cols) f32 -> out (1, rows) f32
    cols = w.shape[1]
    for r in range(lo, hi):
        s = np.float32(0.0)
        for i in range(cols):
            s += w[r, i] * x[0, i]
        out[0, r] = s


@njit(cache=True, parallel=True)
def _f32_rows_parallel(out, w, x, n_threads):
    # w (rows, cols) f32 @ x (1, cols) f32 -> out (1, rows) f32, row chunks over n_threads
    rows = w.shape[0]
    n_chunks = min(n_threads, rows)
    for k in prange(n_chunks):
        _f32_rows(out, w, x, k * rows // n_chunks, (k + 1) * rows // n_chunks)


def matmul_f32(out: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """out (T, rows) f32 = x (T, cols) @ w (rows, cols).T (for --weight-type f32).

    T = 1 (decode, memory-bound) runs a numba kernel on numba's threads: as fast as BLAS and it
    honours configure(). T > 1 (prefill, compute-bound) uses numpy's BLAS, several times faster
    than a plain numba loop there; its threads follow OPENBLAS_NUM_THREADS, not configure().
    """
    # w (rows, cols) f32 @ x (T, cols) f32 -> out (T, rows) f32
    assert w.ndim == 2 and x.ndim == 2 and x.shape[1] == w.shape[1], f"w {w.shape} x {x.shape}"
    assert out.dtype == np.float32 and out.shape == (x.shape[0], w.shape[0]), f"out {out.dtype} {out.shape}"
    assert w.dtype == x.dtype == np.float32, f"w {w.dtype} x {x.dtype}"
    if x.shape[0] != 1:
        np.matmul(x, w.T, out=out)
        return
    n_threads = numba.get_num_threads()
    if n_threads > 1:
        _f32_rows_parallel(out, w, x, n_threads)
    else:
        _f32_rows(out, w, x, 0, w.shape[0])


@njit(cache=True, fastmath=True)
def _rmsnorm(out, x, weight, eps):
    # x (T, n) f32, weight (n,) f32 -> out (T, n) f32 = x / sqrt(mean(x^2) + eps) * weight (out may be x)
    T, n = x.shape
    for t in range(T):
        ss = 0.0  # float64 sum: exact enough for any n (fastmath lets LLVM vectorise it)
        for i in range(n):
            ss += np.float64(x[t, i]) * x[t, i]
        s = np.float32(1.0 / math.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = x[t, i] * s * weight[i]


def rmsnorm(out: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float) -> None:
    """out (T, n) = x / sqrt(mean(x^2) + eps) * weight; out may alias x."""
    assert x.ndim == 2 and out.shape == x.shape and weight.shape == (x.shape[1],), (
        f"out {out.shape} x {x.shape} weight {weight.shape}"
    )
    assert out.dtype == x.dtype == weight.dtype == np.float32, f"{out.dtype} {x.dtype} {weight.dtype}"
    _rmsnorm(out, x, weight, eps)


@njit(cache=True, fastmath=True, error_model="numpy")
def _swiglu(out, h13):
    # h13 (T, 2n) f32 = [w1 rows | w3 rows] outputs -> out (T, n) f32 = silu(h13[:, :n]) * h13[:, n:]
    T, n = out.shape
    for t in range(T):
        for i in range(n):
            a = h13[t, i]
            out[t, i] = a / (np.float32(1.0) + _exp_f32(-a)) * h13[t, n + i]


def swiglu(out: np.ndarray, h13: np.ndarray) -> None:
    """out (T, n) = silu(h13[:, :n]) * h13[:, n:], h13 the stacked w1/w3 output."""
    assert h13.ndim == 2 and out.ndim == 2 and h13.shape == (out.shape[0], 2 * out.shape[1]), (
        f"out {out.shape} h13 {h13.shape}"
    )
    assert out.dtype == h13.dtype == np.float32, f"{out.dtype} {h13.dtype}"
    _swiglu(out, h13)


def rope_tables(
    head_dim: int, max_seq: int, theta: float, scaling: RopeScaling | None
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables, each f32 (max_seq, head_dim//2): angle = position * frequency i (float64 inside)."""
    assert head_dim % 2 == 0 and max_seq >= 1, f"head_dim={head_dim} max_seq={max_seq}"
    freqs = rope_frequencies_ref(head_dim, theta, scaling)  # (hd/2,) f64, Llama 3.1 remap if scaling
    ang = np.arange(max_seq, dtype=np.float64)[:, None] * freqs[None, :]  # (max_seq, hd/2) f64
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@njit(cache=True, fastmath=True)
def _rope(x, positions, cos, sin, halves):
    # x (T, n_heads, hd) f32 rotated in place by positions (T,), tables (max_seq, hd/2) f32
    # (the two layouts in separate loops, so that each vectorises)
    T, n_heads, hd = x.shape
    half = hd // 2
    for t in range(T):
        p = positions[t]
        for h in range(n_heads):
            if halves:
                for i in range(half):
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    x[t, h, i] = a * cos[p, i] - b * sin[p, i]
                    x[t, h, i + half] = a * sin[p, i] + b * cos[p, i]
            else:
                for i in range(half):
                    a = x[t, h, 2 * i]
                    b = x[t, h, 2 * i + 1]
                    x[t, h, 2 * i] = a * cos[p, i] - b * sin[p, i]
                    x[t, h, 2 * i + 1] = a * sin[p, i] + b * cos[p, i]


def rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, halves: bool) -> None:
    """Rotate x (T, n_heads, head_dim) in place: pairs (2i, 2i+1), or halves (i, i + hd/2) (NeoX)."""
    assert x.ndim == 3 and x.dtype == np.float32 and positions.shape == (x.shape[0],), (
        f"x {x.dtype} {x.shape} positions {positions.shape}"
    )
    assert cos.shape == sin.shape and cos.shape[1] * 2 == x.shape[2], f"tables {cos.shape} for head_dim {x.shape[2]}"
    assert positions.size == 0 or (0 <= positions.min() and positions.max() < cos.shape[0]), (
        f"positions {positions.min()}..{positions.max()} outside the tables' {cos.shape[0]}"
    )
    _rope(x, positions, cos, sin, halves)
