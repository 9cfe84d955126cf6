"""Causal grouped-query attention of new tokens over the KV cache: attention() and its scratch.

One token's attention reads every cached K and V row of its heads. The cache is (max_seq, n_kv,
head_dim) per layer, so a row of all KV heads is contiguous and the memory is read at full speed
only in position order: reading one KV head's column of the cache (stride n_kv*head_dim, the
previous kernels' order) ran at ~6 GB/s here against ~29 in order, and neither software
prefetch nor blocking by positions helped. So the kernels go position by position over all
heads, taking 4 positions at once from the 4 quarters of the range (4 sequential streams; each
K/V vector loaded once feeds up to 4 query heads x 4 positions, in registers), in three passes:
scores, softmax (a vectorised exp), values. Threads split the positions of one decode token
(each sums its share of the values, added up at the end) or the tokens of a prefill.
head_dim not a multiple of 16 takes the online-softmax kernels at the end instead.

(Named attn.py, not attention.py: the package exports the function attention, which would
shadow a submodule of that name.) Imports numpy, numba and the package's bits.py and vector.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from mpillama.kernels.bits import _exp_f32
from mpillama.kernels.vector import _vfma, _vhsum, _vload_row, _vsplat_f32, _vstore4, _vstore_row, _vsum4


ATT_MIN_CHUNK = 256  # fewest positions per thread in a decode token worth a parallel launch


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _exp_neg(x):
    # exp(x) for x <= 0, and exactly 0 below -87 (where float32 exp is about to underflow)
    return _exp_f32(x) if x >= np.float32(-87.0) else np.float32(0.0)


# _att_scores and _att_values are unrolled by hand on purpose (register blocking: 4 query heads
# x 4 positions of accumulators or weights in 16 registers); their likeness is not duplication.


@njit(cache=True, fastmath=True, error_model="numpy")
def _att_scores(sc, q, k, t, a, b):
    # q[t] (n_heads, hd) . k[p] (n_kv, hd) for p in [a, b) -> sc (n_heads, >= b) f32, raw dot products
    # Position p = a + i + s*L (L = (b-a)//4, s = stream 0..3) goes to slot a + 4i + s; the last
    # (b-a) % 4 positions to their own slot. Query head h reads kv head h // group.
    nh, hd = q.shape[1], q.shape[2]
    nkv = k.shape[1]
    group = nh // nkv
    L = (b - a) // 4
    z = _vsplat_f32(0.0)
    for i in range(L):
        p = a + i
        for kv in range(nkv):
            for h0 in range(kv * group, kv * group + group, 4):  # up to 4 query heads of this kv head
                ng = min(4, kv * group + group - h0)
                a00, a01, a02, a03, a10, a11, a12, a13 = z, z, z, z, z, z, z, z
                a20, a21, a22, a23, a30, a31, a32, a33 = z, z, z, z, z, z, z, z
                for c in range(0, hd, 16):
                    k0 = _vload_row(k, p, kv, c)
                    k1 = _vload_row(k, p + L, kv, c)
                    k2 = _vload_row(k, p + 2 * L, kv, c)
                    k3 = _vload_row(k, p + 3 * L, kv, c)
                    x = _vload_row(q, t, h0, c)
                    a00, a01, a02, a03 = _vfma(x, k0, a00), _vfma(x, k1, a01), _vfma(x, k2, a02), _vfma(x, k3, a03)
                    if ng > 1:
                        x = _vload_row(q, t, h0 + 1, c)
                        a10, a11, a12, a13 = _vfma(x, k0, a10), _vfma(x, k1, a11), _vfma(x, k2, a12), _vfma(x, k3, a13)
                    if ng > 2:
                        x = _vload_row(q, t, h0 + 2, c)
                        a20, a21, a22, a23 = _vfma(x, k0, a20), _vfma(x, k1, a21), _vfma(x, k2, a22), _vfma(x, k3, a23)
                    if ng > 3:
                        x = _vload_row(q, t, h0 + 3, c)
                        a30, a31, a32, a33 = _vfma(x, k0, a30), _vfma(x, k1, a31), _vfma(x, k2, a32), _vfma(x, k3, a33)
                _vstore4(sc, h0, a + 4 * i, _vsum4(a00, a01, a02, a03))
                if ng > 1:
                    _vstore4(sc, h0 + 1, a + 4 * i, _vsum4(a10, a11, a12, a13))
                if ng > 2:
                    _vstore4(sc, h0 + 2, a + 4 * i, _vsum4(a20, a21, a22, a23))
                if ng > 3:
                    _vstore4(sc, h0 + 3, a + 4 * i, _vsum4(a30, a31, a32, a33))
    for p in range(a + 4 * L, b):
        for h in range(nh):
            acc = z
            for c in range(0, hd, 16):
                acc = _vfma(_vload_row(q, t, h, c), _vload_row(k, p, h // group, c), acc)
            sc[h, p] = _vhsum(acc)


@njit(cache=True, fastmath=True, error_model="numpy")
def _att_softmax(sc, n, scale, h_lo, h_hi):
    # rows [h_lo, h_hi) of sc: raw scores in slots [0, n) -> softmax(scale * scores) weights
    for h in range(h_lo, h_hi):
        row = sc[h]
        m = row[0]
        for f in range(1, n):
            m = max(m, row[f])
        den = np.float32(0.0)
        for f in range(n):
            e = _exp_neg((row[f] - m) * scale)
            row[f] = e
            den += e
        inv = np.float32(1.0) / den
        for f in range(n):
            row[f] *= inv


@njit(cache=True, fastmath=True, error_model="numpy")
def _att_values(dst, d, sc, v, a, b):
    # dst[d] (n_heads, hd) f32 += sum over p in [a, b) of weight(h, p) * v[p, h // group] (slots as in _att_scores)
    nh, hd = dst.shape[1], dst.shape[2]
    nkv = v.shape[1]
    group = nh // nkv
    L = (b - a) // 4
    z = _vsplat_f32(0.0)
    for i in range(L):
        p, f = a + i, a + 4 * i
        for kv in range(nkv):
            for h0 in range(kv * group, kv * group + group, 4):
                ng = min(4, kv * group + group - h0)
                w00, w01, w02, w03 = _vsplat_f32(sc[h0, f]), _vsplat_f32(sc[h0, f + 1]), _vsplat_f32(sc[h0, f + 2]), _vsplat_f32(sc[h0, f + 3])  # noqa: E501
                w10, w11, w12, w13, w20, w21, w22, w23, w30, w31, w32, w33 = z, z, z, z, z, z, z, z, z, z, z, z
                if ng > 1:
                    w10, w11, w12, w13 = _vsplat_f32(sc[h0 + 1, f]), _vsplat_f32(sc[h0 + 1, f + 1]), _vsplat_f32(sc[h0 + 1, f + 2]), _vsplat_f32(sc[h0 + 1, f + 3])  # noqa: E501
                if ng > 2:
                    w20, w21, w22, w23 = _vsplat_f32(sc[h0 + 2, f]), _vsplat_f32(sc[h0 + 2, f + 1]), _vsplat_f32(sc[h0 + 2, f + 2]), _vsplat_f32(sc[h0 + 2, f + 3])  # noqa: E501
                if ng > 3:
                    w30, w31, w32, w33 = _vsplat_f32(sc[h0 + 3, f]), _vsplat_f32(sc[h0 + 3, f + 1]), _vsplat_f32(sc[h0 + 3, f + 2]), _vsplat_f32(sc[h0 + 3, f + 3])  # noqa: E501
                for c in range(0, hd, 16):
                    v0 = _vload_row(v, p, kv, c)
                    v1 = _vload_row(v, p + L, kv, c)
                    v2 = _vload_row(v, p + 2 * L, kv, c)
                    v3 = _vload_row(v, p + 3 * L, kv, c)
                    o = _vload_row(dst, d, h0, c)
                    _vstore_row(dst, d, h0, c, _vfma(w03, v3, _vfma(w02, v2, _vfma(w01, v1, _vfma(w00, v0, o)))))
                    if ng > 1:
                        o = _vload_row(dst, d, h0 + 1, c)
                        _vstore_row(dst, d, h0 + 1, c, _vfma(w13, v3, _vfma(w12, v2, _vfma(w11, v1, _vfma(w10, v0, o)))))  # noqa: E501
                    if ng > 2:
                        o = _vload_row(dst, d, h0 + 2, c)
                        _vstore_row(dst, d, h0 + 2, c, _vfma(w23, v3, _vfma(w22, v2, _vfma(w21, v1, _vfma(w20, v0, o)))))  # noqa: E501
                    if ng > 3:
                        o = _vload_row(dst, d, h0 + 3, c)
                        _vstore_row(dst, d, h0 + 3, c, _vfma(w33, v3, _vfma(w32, v2, _vfma(w31, v1, _vfma(w30, v0, o)))))  # noqa: E501
    for p in range(a + 4 * L, b):
        for h in range(nh):
            w = _vsplat_f32(sc[h, p])
            for c in range(0, hd, 16):
                _vstore_row(dst, d, h, c, _vfma(w, _vload_row(v, p, h // group, c), _vload_row(dst, d, h, c)))


@njit(cache=True, fastmath=True, error_model="numpy")
def _att_zero(dst, d):
    # dst[d] (n_heads, hd) = 0
    for h in range(dst.shape[1]):
        for c in range(0, dst.shape[2], 16):
            _vstore_row(dst, d, h, c, _vsplat_f32(0.0))


@njit(cache=True, fastmath=True, error_model="numpy")
def _att_token(out, q, k_cache, v_cache, t, n, sc):
    # q[t] (n_heads, hd) over cache positions [0, n) -> out[t] (n_heads, hd) f32; sc (n_heads, >= n) scratch
    _att_scores(sc, q, k_cache, t, 0, n)
    _att_softmax(sc, n, np.float32(1.0 / math.sqrt(q.shape[2])), 0, q.shape[1])
    _att_zero(out, t)
    _att_values(out, t, sc, v_cache, 0, n)


@njit(cache=True)
def _att_serial(out, q, k_cache, v_cache, pos0, T, sc):
    # q (T, n_heads, hd) x caches (max_seq, n_kv, hd) -> out (T, n_heads, hd) f32, causal
    # sc (slots, n_heads, >= max_seq) scratch
    for t in range(T):
        _att_token(out, q, k_cache, v_cache, t, pos0 + t + 1, sc[0])


@njit(cache=True, parallel=True)
def _att_tokens_parallel(out, q, k_cache, v_cache, pos0, T, sc, n_chunks):
    # as _att_serial, tokens dealt round-robin to n_chunks threads (prefill)
    for c in prange(n_chunks):
        for t in range(c, T, n_chunks):
            _att_token(out, q, k_cache, v_cache, t, pos0 + t + 1, sc[c])


@njit(cache=True, parallel=True)
def _att_positions_parallel(out, q, k_cache, v_cache, t, n, sc, parts, n_chunks):
    # one token (decode): positions [0, n) split in n_chunks ranges over threads; each range's share of
    # the values goes to parts[c], summed at the end. sc (slots, n_heads, >= n): only sc[0] is used.
    s = sc[0]
    for c in prange(n_chunks):
        _att_scores(s, q, k_cache, t, c * n // n_chunks, (c + 1) * n // n_chunks)
    nh = q.shape[1]
    for c in prange(n_chunks):
        _att_softmax(s, n, np.float32(1.0 / math.sqrt(q.shape[2])), c * nh // n_chunks, (c + 1) * nh // n_chunks)
    for c in prange(n_chunks):
        _att_zero(parts, c)
        _att_values(parts, c, s, v_cache, c * n // n_chunks, (c + 1) * n // n_chunks)
    for h in range(nh):
        for i in range(q.shape[2]):
            acc = np.float32(0.0)
            for c in range(n_chunks):
                acc += parts[c, h, i]
            out[t, h, i] = acc


@dataclass
class AttentionScratch:
    """Scores and per-thread partial outputs for attention(), sized once from the slice."""

    scores: np.ndarray  # (slots, n_heads, max_seq) f32: one set of score rows per thread
    parts: np.ndarray  # (slots, n_heads, head_dim) f32: per-thread partial outputs of one decode token


def new_attention_scratch(max_seq: int, n_heads: int, head_dim: int) -> AttentionScratch:
    """Scratch for attention() over a cache of max_seq positions, for this rank's n_heads query heads."""
    assert max_seq >= 1 and n_heads >= 1 and head_dim >= 1, f"max_seq={max_seq} n_heads={n_heads} hd={head_dim}"
    # configure() has set the threads this run uses; at least 2 slots where numba can run 2 threads,
    # so that the warm-up can compile the threaded kernels on a 1-thread run (loading.warm_up)
    slots = max(numba.get_num_threads(), min(2, numba.config.NUMBA_NUM_THREADS))
    return AttentionScratch(
        scores=np.zeros((slots, n_heads, max_seq), np.float32),  # (slots, n_heads, max_seq) f32
        parts=np.zeros((slots, n_heads, head_dim), np.float32),  # (slots, n_heads, head_dim) f32
    )


# -- the online-softmax kernels: any head_dim (the vector kernels need multiples of 16)

@njit(cache=True, fastmath=True)
def _attend(out, q, k_cache, v_cache, pos0, t, h, group):
    # q (T, n_heads, hd), caches (max_seq, n_kv, hd) -> out[t, h] (hd,) f32 over positions [0, pos0+t]
    # Online softmax: the output row itself is the accumulator, so no scores scratch is needed.
    hd = q.shape[2]
    kv = h // group
    scale = np.float32(1.0 / math.sqrt(hd))
    o = out[t, h]
    qr = q[t, h]
    s = np.float32(0.0)
    for i in range(hd):
        s += qr[i] * k_cache[0, kv, i]
    m = s * scale  # running max of the scores
    den = np.float32(1.0)  # running sum of exp(score - m)
    for i in range(hd):
        o[i] = v_cache[0, kv, i]
    for p in range(1, pos0 + t + 1):
        s = np.float32(0.0)
        for i in range(hd):
            s += qr[i] * k_cache[p, kv, i]
        s *= scale
        if s > m:  # a new max: rescale what was summed so far
            c = np.exp(m - s)
            den *= c
            for i in range(hd):
                o[i] *= c
            m = s
        w = np.exp(s - m)
        den += w
        for i in range(hd):
            o[i] += w * v_cache[p, kv, i]
    inv = np.float32(1.0) / den
    for i in range(hd):
        o[i] *= inv


@njit(cache=True)
def _attention_serial(out, q, k_cache, v_cache, pos0, T):
    # q (T, n_heads, hd) x caches (max_seq, n_kv, hd) -> out (T, n_heads, hd) f32, causal
    n_heads = q.shape[1]
    group = n_heads // k_cache.shape[1]
    for j in range(T * n_heads):
        _attend(out, q, k_cache, v_cache, pos0, j // n_heads, j % n_heads, group)


@njit(cache=True, parallel=True)
def _attention_parallel(out, q, k_cache, v_cache, pos0, T):
    # q (T, n_heads, hd) x caches (max_seq, n_kv, hd) -> out (T, n_heads, hd) f32, (token, head) over threads
    n_heads = q.shape[1]
    group = n_heads // k_cache.shape[1]
    for j in prange(T * n_heads):
        _attend(out, q, k_cache, v_cache, pos0, j // n_heads, j % n_heads, group)


def attention(
    out: np.ndarray,
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    pos0: int,
    T: int,
    scratch: AttentionScratch | None = None,
) -> None:
    """Causal grouped-query attention of T new tokens (positions pos0..pos0+T-1) over the KV cache.

    The caller has already written the T new k/v rows. Query head h reads kv head
    h // (n_heads // n_kv); scores are scaled by 1/sqrt(head_dim). Arrays may be views (e.g. a
    range of heads) as long as their last axis is contiguous. scratch =
    new_attention_scratch(max_seq, n_heads, head_dim), allocated once; without it each call
    allocates its own. head_dim not a multiple of 16 takes the slower online-softmax kernels.
    """
    assert q.ndim == 3 and q.shape[0] >= T and out.shape[1:] == q.shape[1:] and out.shape[0] >= T, (
        f"out {out.shape} q {q.shape} T={T}"
    )
    assert k_cache.shape == v_cache.shape and k_cache.shape[2] == q.shape[2], (
        f"k_cache {k_cache.shape} v_cache {v_cache.shape} q {q.shape}"
    )
    assert q.shape[1] % k_cache.shape[1] == 0, f"{q.shape[1]} query heads over {k_cache.shape[1]} kv heads"
    assert 0 <= pos0 and pos0 + T <= k_cache.shape[0], f"pos0={pos0} T={T} cache length {k_cache.shape[0]}"
    assert out.dtype == q.dtype == k_cache.dtype == v_cache.dtype == np.float32, "attention buffers must be f32"
    n_heads, hd = q.shape[1], q.shape[2]
    n_threads = numba.get_num_threads()
    unit = all(a.strides[2] == 4 for a in (out, q, k_cache, v_cache))
    if hd % 16 or not unit:
        kernel = _attention_parallel if n_threads > 1 else _attention_serial
        kernel(out, q, k_cache, v_cache, pos0, T)
        return
    if scratch is None:
        scratch = new_attention_scratch(pos0 + T, n_heads, hd)
    sc, parts = scratch.scores, scratch.parts
    assert sc.ndim == 3 and sc.shape[1] >= n_heads and sc.shape[2] >= pos0 + T and parts.shape[1:] == (n_heads, hd), (
        f"scratch {sc.shape} {parts.shape} for {n_heads} heads of {hd}, positions up to {pos0 + T}: "
        "use new_attention_scratch(max_seq, n_heads, head_dim)"
    )
    slots = min(n_threads, sc.shape[0])
    if T == 1 and slots > 1 and pos0 + 1 >= 2 * ATT_MIN_CHUNK:
        n_chunks = min(slots, (pos0 + 1) // ATT_MIN_CHUNK)
        _att_positions_parallel(out, q, k_cache, v_cache, 0, pos0 + 1, sc, parts, n_chunks)
    elif T > 1 and slots > 1:
        _att_tokens_parallel(out, q, k_cache, v_cache, pos0, T, sc, min(slots, T))
    else:
        _att_serial(out, q, k_cache, v_cache, pos0, T, sc)
