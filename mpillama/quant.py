"""Q40 / Q80 block formats in plain numpy, and the numpy reference ops the kernels are tested against.

Owns: the byte layout of GGML Q4_0 ("q40"), Q8_0 ("q80") and K-quant (Q4_K, Q5_K, Q6_K) blocks (quantize, dequantize,
split into scale and values), and short readable float references for every kernel in
mpillama.kernels (matmul, rmsnorm, rope, attention, silu*mul). Nothing here is on the hot path.

Imports numpy and mpillama.errors only: no numba, no mpi4py, nothing from kernels/, so the
references stay independent of the code they check.

Block formats (byte-for-byte GGML):
  Q40: 18 bytes per 32 values: float16 scale d (little-endian), then 16 bytes; byte j holds
       element j in its low nibble and element j+16 in its high nibble; value = (nibble - 8) * d.
       Quantize: d = (the value of largest magnitude, with its sign) / -8,
       nibble = min(15, trunc(x * (1/d) + 8.5)).
  Q80: 34 bytes per 32 values: float16 scale d, then 32 int8 q; value = q * d.
       Quantize: d = max|x| / 127 (float32), q = roundf(x * (1/d)) (half away from zero);
       d is stored rounded to float16.
"""

from __future__ import annotations

import math

import numpy as np

from mpillama.config import RopeScaling
from mpillama.errors import MpillamaError

QK = 32  # values per block
Q40_BLOCK_BYTES = 18  # f16 scale + 16 bytes of nibbles
Q80_BLOCK_BYTES = 34  # f16 scale + 32 int8


def _blocks_of(x: np.ndarray, what: str) -> np.ndarray:
    """(..., n) -> (..., n//32, 32) f32, or an error naming the fix when n is not a multiple of 32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK:
        raise MpillamaError(
            f"{what}: last dimension {x.shape[-1] if x.ndim else 'scalar'} is not a multiple of {QK}: "
            f"pad or split the tensor into whole {QK}-value blocks"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // QK, QK)


def _bytes_blocks(b: np.ndarray, block_bytes: int, what: str) -> np.ndarray:
    """(..., nb*block_bytes) uint8 -> (..., nb, block_bytes), or an error naming the fix."""
    b = np.asarray(b)
    if b.dtype != np.uint8 or b.ndim == 0 or b.shape[-1] % block_bytes:
        raise MpillamaError(
            f"{what}: expected uint8 bytes with a last dimension that is a multiple of {block_bytes}, "
            f"got {b.dtype} {b.shape}: pass the raw block bytes of whole blocks"
        )
    return b.reshape(*b.shape[:-1], b.shape[-1] // block_bytes, block_bytes)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exact in float32: floor(|v|) + floor(2 * frac)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.sign(v) * (f + np.floor(np.float32(2) * (a - f)))


# ---------------------------------------------------------------- Q40


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """f32 (..., n) -> uint8 (..., n//32*18): GGML Q4_0 bytes."""
    blocks = _blocks_of(x, "quantize_q40")  # (..., nb, 32) f32
    imax = np.abs(blocks).argmax(axis=-1)[..., None]
    d = np.take_along_axis(blocks, imax, axis=-1) / np.float32(-8)  # (..., nb, 1) f32
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    nib = np.minimum(np.trunc(blocks * inv + np.float32(8.5)), 15).astype(np.uint8)  # (..., nb, 32)
    qs = nib[..., :16] | (nib[..., 16:] << np.uint8(4))  # (..., nb, 16) uint8
    dbytes = d.astype("<f2").view(np.uint8)  # (..., nb, 2) uint8
    out = np.concatenate([dbytes, qs], axis=-1)  # (..., nb, 18) uint8
    return out.reshape(*out.shape[:-2], -1)


def split_q40(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (..., nb*18) -> (d f32 (..., nb), nibbles uint8 (..., nb, 32) in 0..15, unsigned)."""
    blocks = _bytes_blocks(b, Q40_BLOCK_BYTES, "split_q40")  # (..., nb, 18)
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    nib = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)  # (..., nb, 32)
    return d, nib


def dequantize_q40(b: np.ndarray) -> np.ndarray:
    """uint8 (..., nb*18) -> f32 (..., nb*32)."""
    d, nib = split_q40(b)
    x = (nib.astype(np.float32) - np.float32(8)) * d[..., None]  # (..., nb, 32)
    return x.reshape(*x.shape[:-2], -1)


# ---------------------------------------------------------------- Q80


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """f32 (..., n) -> uint8 (..., n//32*34): GGML Q8_0 bytes."""
    blocks = _blocks_of(x, "quantize_q80")  # (..., nb, 32) f32
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)  # (..., nb, 1) f32
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = _roundf(blocks * inv).astype(np.int8)  # (..., nb, 32)
    out = np.concatenate([d.astype("<f2").view(np.uint8), q.view(np.uint8)], axis=-1)  # (..., nb, 34)
    return out.reshape(*out.shape[:-2], -1)


def split_q80(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (..., nb*34) -> (d f32 (..., nb), q int8 (..., nb, 32))."""
    blocks = _bytes_blocks(b, Q80_BLOCK_BYTES, "split_q80")  # (..., nb, 34)
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float32)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    return d, q


def dequantize_q80(b: np.ndarray) -> np.ndarray:
    """uint8 (..., nb*34) -> f32 (..., nb*32)."""
    d, q = split_q80(b)
    x = q.astype(np.float32) * d[..., None]
    return x.reshape(*x.shape[:-2], -1)


def worst_roundtrip_error(x: np.ndarray, kind: str) -> float:
    """Largest |x - dequant(quant(x))| for kind 'q40' or 'q80' (quantizers report it, STYLE 8)."""
    if kind == "q40":
        y = dequantize_q40(quantize_q40(x))
    elif kind == "q80":
        y = dequantize_q80(quantize_q80(x))
    else:
        raise MpillamaError(f"unknown block format {kind!r}: use 'q40' or 'q80'")
    return float(np.max(np.abs(np.asarray(x, np.float32) - y))) if y.size else 0.0


# ---------------------------------------------------------------- reference ops


def matmul_q40_ref(w_q40: np.ndarray, x_q80: np.ndarray) -> np.ndarray:
    """w (rows, nb*18) q40 @ x (T, nb*34) q80 -> (T, rows) f32.

    Exactly the arithmetic of the kernels: per block an integer dot product of the signed
    nibbles and the int8 activations, times (f16 weight scale * f16 activation scale),
    summed over blocks (here in float64, so only the kernels' summation order differs).
    """
    wd, nib = split_q40(w_q40)  # (rows, nb) f32, (rows, nb, 32) uint8
    xd, xq = split_q80(x_q80)  # (T, nb) f32, (T, nb, 32) int8
    assert wd.shape[1] == xd.shape[1], f"weights have {wd.shape[1]} blocks per row, activations {xd.shape[1]}"
    wi = nib.astype(np.int64) - 8
    idot = np.einsum("rbk,tbk->trb", wi, xq.astype(np.int64))  # (T, rows, nb) exact integers
    return np.einsum("trb,rb,tb->tr", idot.astype(np.float64), wd.astype(np.float64), xd.astype(np.float64)).astype(
        np.float32
    )


def matmul_q80w_ref(w_q80: np.ndarray, x_q80: np.ndarray) -> np.ndarray:
    """w (rows, nb*34) q80 weights @ x (T, nb*34) q80 -> (T, rows) f32, the Q8_0-weight kernels' arithmetic:
    per block an exact integer dot product, times (f16 weight scale * f16 activation scale), summed in float64."""
    wd, wq = split_q80(w_q80)  # (rows, nb) f32, (rows, nb, 32) int8
    xd, xq = split_q80(x_q80)  # (T, nb) f32, (T, nb, 32) int8
    assert wd.shape[1] == xd.shape[1], f"weights have {wd.shape[1]} blocks per row, activations {xd.shape[1]}"
    idot = np.einsum("rbk,tbk->trb", wq.astype(np.int64), xq.astype(np.int64))  # (T, rows, nb) exact integers
    return np.einsum("trb,rb,tb->tr", idot.astype(np.float64), wd.astype(np.float64), xd.astype(np.float64)).astype(
        np.float32
    )


def rmsnorm_ref(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, n) -> x / sqrt(mean(x^2) + eps) * weight, in float64, returned as f32."""
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps) * weight).astype(np.float32)


def rope_frequencies_ref(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """(head_dim//2,) f64 inverse frequencies, with the Llama 3.1 ('llama3' rope_type) remap if given."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return freqs
    # Wavelengths shorter than high_freq_wavelen keep their frequency, longer than
    # low_freq_wavelen are divided by factor, and those between are interpolated.
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    out = np.empty_like(freqs)
    for i, f in enumerate(freqs):
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out[i] = f
        elif wavelen > low_wavelen:
            out[i] = f / scaling.factor
        else:
            smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            out[i] = (1 - smooth) * f / scaling.factor + smooth * f
    return out


def rope_ref(
    x: np.ndarray, positions: np.ndarray, head_dim: int, theta: float, scaling: RopeScaling | None, halves: bool
) -> np.ndarray:
    """x (T, n_heads, head_dim) rotated by position, as a new f32 array (float64 inside).

    pairs: rotate (2i, 2i+1) by frequency i; halves: rotate (i, i + head_dim/2) by frequency i.
    """
    freqs = rope_frequencies_ref(head_dim, theta, scaling)  # (hd/2,)
    ang = np.asarray(positions, np.float64)[:, None] * freqs[None, :]  # (T, hd/2)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]  # (T, 1, hd/2)
    x64 = x.astype(np.float64)
    if halves:
        a, b = x64[..., : head_dim // 2], x64[..., head_dim // 2 :]
        return np.concatenate([a * c - b * s, a * s + b * c], axis=-1).astype(np.float32)
    a, b = x64[..., 0::2], x64[..., 1::2]
    out = np.empty_like(x64)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out.astype(np.float32)


def attention_ref(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int) -> np.ndarray:
    """q (T, n_heads, hd); caches (>= pos0+T, n_kv, hd) -> (T, n_heads, hd) f32.

    Token t (at position pos0+t) attends causally to cache positions [0, pos0+t]; query head h
    reads kv head h // (n_heads // n_kv); softmax of q.k / sqrt(hd), in float64.
    """
    T, n_heads, hd = q.shape
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    out = np.empty((T, n_heads, hd), np.float64)
    for t in range(T):
        n = pos0 + t + 1
        for h in range(n_heads):
            k = k_cache[:n, h // group].astype(np.float64)  # (n, hd)
            v = v_cache[:n, h // group].astype(np.float64)
            s = k @ q[t, h].astype(np.float64) / math.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v
    return out.astype(np.float32)


def silu_mul_ref(h1: np.ndarray, h3: np.ndarray) -> np.ndarray:
    """silu(h1) * h3 = h1 / (1 + exp(-h1)) * h3, in float64, returned as f32."""
    a = h1.astype(np.float64)
    return (a / (1 + np.exp(-a)) * h3).astype(np.float32)


# ---------------------------------------------------------------- K-quants (Q4_K, Q5_K, Q6_K)
# Super-blocks of QK_K = 256 values, byte-for-byte GGML (ggml-common.h's block_q4_K/q5_K/q6_K):
#   Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales sc[8] and mins m[8], 128 bytes qs.
#        8 sub-blocks of 32; qs byte 32c+i holds sub-block 2c element i (low nibble) and sub-block
#        2c+1 element i (high); value = d*sc[j]*q - dmin*m[j]. Scale bytes: 0-3 = sc[0:4] | (sc[4:8]>>4)<<6,
#        4-7 = m[0:4] | (m[4:8]>>4)<<6, 8-11 = (sc[4:8]&15) | (m[4:8]&15)<<4.
#   Q5_K (176 bytes): d, dmin, the 12 scale bytes, qh[32], qs[128]: Q4_K's nibbles plus a fifth bit,
#        bit j of qh[i] for sub-block j element i.
#   Q6_K (210 bytes): ql[128], qh[64], int8 scales[16], f16 d; 16 sub-blocks of 16; value v =
#        128h + 32k + l (h < 2, k < 4, l < 32): low 4 bits in ql[64h + 32(k&1) + l] (nibble k>>1),
#        high 2 bits in qh[32h + l] (bits 2k, 2k+1); value = d*sc[v//16]*(q6 - 32).
# Quantizing (ours, simple, no importance search): per sub-block an affine (Q4_K/Q5_K) or symmetric
# (Q6_K) range, then the super-block scales rounded up to float16 and the sub-block scales rounded
# up, so no value is clipped and every error is at most half a step of its sub-block.

QK_K = 256  # values per K-quant super-block
KQUANT_BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}


def _kblocks_of(x: np.ndarray, what: str) -> np.ndarray:
    """(..., n) -> (..., n//256, 256) f32, or an error naming the fix when n is not a multiple of 256."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise MpillamaError(
            f"{what}: last dimension {x.shape[-1] if x.ndim else 'scalar'} is not a multiple of {QK_K}: "
            f"K-quants need whole {QK_K}-value super-blocks (use q40 or q80 for this tensor)"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // QK_K, QK_K)


def _f16_up(v: np.ndarray) -> np.ndarray:
    """The float16 nearest above or at v (>= 0), as f32: a scale that never shrinks the range it covers."""
    h = v.astype(np.float16)
    h = np.where(h.astype(np.float32) < v, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float32)


def _ceil_ratio(num: np.ndarray, den: np.ndarray, top: int) -> np.ndarray:
    """ceil(num / den) clipped to [0, top] (0 where den is 0), as uint8."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 0, np.ceil(num / np.where(den > 0, den, 1)), 0)
    return np.clip(r, 0, top).astype(np.uint8)


def _affine_k(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(..., nsb, 8, 32) f32 -> (d, dmin (..., nsb) f32 f16-exact, sc, m (..., nsb, 8) u8 < 64, q (..., nsb, 8, 32) u8)."""
    lo = np.minimum(x.min(axis=-1), 0)  # (..., nsb, 8)
    hi = x.max(axis=-1)
    dmin = _f16_up((-lo).max(axis=-1) / np.float32(63))  # (..., nsb)
    m = _ceil_ratio(-lo, dmin[..., None], 63)
    off = dmin[..., None] * m.astype(np.float32)  # (..., nsb, 8): -(lowest representable value)
    need = (hi + off) / np.float32(levels - 1)  # the step each sub-block needs
    d = _f16_up(need.max(axis=-1) / np.float32(63))
    sc = _ceil_ratio(need, d[..., None], 63)
    step = (d[..., None] * sc.astype(np.float32))[..., None]  # (..., nsb, 8, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, _roundf((x + off[..., None]) / np.where(step > 0, step, 1)), 0)
    return d, dmin, sc, m, np.clip(q, 0, levels - 1).astype(np.uint8)


def _pack_scales_k(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """sc, m (..., 8) u8 < 64 -> (..., 12) u8: the 6-bit scale bytes of Q4_K/Q5_K."""
    return np.concatenate(
        [sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6), (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)],
        axis=-1,
    ).astype(np.uint8)


def unpack_scales_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) u8 scale bytes -> (sc, m) (..., 8) u8, each < 64 (the inverse of the packing, exact)."""
    b = b.astype(np.uint8)
    sc = np.concatenate([b[..., 0:4] & 63, (b[..., 8:12] & 15) | ((b[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([b[..., 4:8] & 63, (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, m


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2")[..., None].view(np.uint8)  # (..., 2)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """f32 (..., n) -> uint8 (..., n//256*144): GGML Q4_K bytes."""
    blocks = _kblocks_of(x, "quantize_q4_k")  # (..., nsb, 256)
    d, dmin, sc, m, q = _affine_k(blocks.reshape(*blocks.shape[:-1], 8, 32), 16)
    qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(*q.shape[:-2], 128)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k(sc, m), qs], axis=-1)  # (..., nsb, 144)
    return out.reshape(*out.shape[:-2], -1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """f32 (..., n) -> uint8 (..., n//256*176): GGML Q5_K bytes."""
    blocks = _kblocks_of(x, "quantize_q5_k")
    d, dmin, sc, m, q = _affine_k(blocks.reshape(*blocks.shape[:-1], 8, 32), 32)
    low = q & 15
    qs = (low[..., 0::2, :] | (low[..., 1::2, :] << 4)).reshape(*q.shape[:-2], 128)
    bits = (q >> 4).astype(np.uint16) << np.arange(8, dtype=np.uint16)[:, None]  # (..., nsb, 8, 32)
    qh = bits.sum(axis=-2).astype(np.uint8)  # (..., nsb, 32)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k(sc, m), qh, qs], axis=-1)
    return out.reshape(*out.shape[:-2], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """f32 (..., n) -> uint8 (..., n//256*210): GGML Q6_K bytes."""
    blocks = _kblocks_of(x, "quantize_q6_k")
    sub = blocks.reshape(*blocks.shape[:-1], 16, 16)  # (..., nsb, 16, 16)
    need = np.abs(sub).max(axis=-1) / np.float32(31)  # (..., nsb, 16): the step for q in [-31, 31]
    d = _f16_up(need.max(axis=-1) / np.float32(127))  # (..., nsb)
    sc = _ceil_ratio(need, d[..., None], 127)
    step = (d[..., None] * sc.astype(np.float32))[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, _roundf(sub / np.where(step > 0, step, 1)), 0)
    q6 = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(*blocks.shape[:-1], 2, 4, 32)  # [h, k, l]
    low, high = q6 & 15, q6 >> 4
    ql = (low[..., 0:2, :] | (low[..., 2:4, :] << 4)).reshape(*blocks.shape[:-1], 128)
    qh = (high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6))
    qh = qh.reshape(*blocks.shape[:-1], 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=-1)  # (..., nsb, 210)
    return out.reshape(*out.shape[:-2], -1)


def split_kquant(kind: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GGML K-quant bytes (..., nsb*block) -> (d, dmin (..., nsb) f32, scales (..., nsb, 2, n_sub) f32, q (..., nsb, 256)).

    scales[..., 0, :] are the integer sub-block scales (8 per super-block, Q6_K: 16 signed ones),
    scales[..., 1, :] the integer mins (Q6_K: zeros, and dmin 0); q the stored integers (Q4_K
    0..15, Q5_K 0..31 as uint8, Q6_K -32..31 as int8). Value = d*scale*q - dmin*min.
    """
    if kind not in KQUANT_BLOCK_BYTES:
        raise MpillamaError(f"unknown K-quant {kind!r}: use one of {', '.join(KQUANT_BLOCK_BYTES)}")
    blocks = _bytes_blocks(b, KQUANT_BLOCK_BYTES[kind], f"split_kquant({kind})")
    lead = blocks.shape[:-1]

    def f16(lo: int) -> np.ndarray:
        return np.ascontiguousarray(blocks[..., lo : lo + 2]).view("<f2")[..., 0].astype(np.float32)

    if kind == "q6_k":
        ql = blocks[..., :128].reshape(*lead, 2, 2, 32)  # [h, k&1, l]
        qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32)  # [h, -, l]
        low = np.concatenate([ql & 15, ql >> 4], axis=-2)  # [h, k, l]: k = 2*(nibble) + (k&1)
        high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # [h, k, l]
        q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(*lead, 256)
        sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
        return f16(208), np.zeros(lead, np.float32), np.stack([sc, np.zeros_like(sc)], axis=-2), q
    sc, m = unpack_scales_k(blocks[..., 4:16])
    qs = blocks[..., -128:].reshape(*lead, 4, 1, 32)
    q = ((qs >> np.array([0, 4], np.uint8)[:, None]) & 15).reshape(*lead, 8, 32)  # sub-block 2c, 2c+1
    if kind == "q5_k":
        qh = blocks[..., 16:48].reshape(*lead, 1, 32)
        q = q | (((qh >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4)
    scales = np.stack([sc.astype(np.float32), m.astype(np.float32)], axis=-2)  # (..., nsb, 2, 8)
    return f16(0), f16(2), scales, q.reshape(*lead, 256)


def dequantize_kquant(kind: str, b: np.ndarray) -> np.ndarray:
    """GGML K-quant bytes (..., nsb*block) -> f32 (..., nsb*256), the float32 arithmetic of GGML's dequantizer."""
    d, dmin, scales, q = split_kquant(kind, b)
    n_sub = scales.shape[-1]
    qf = q.astype(np.float32).reshape(*q.shape[:-1], n_sub, 256 // n_sub)
    ds = (d[..., None] * scales[..., 0, :])[..., None]  # (..., nsb, n_sub, 1)
    dm = (dmin[..., None] * scales[..., 1, :])[..., None]
    x = ds * qf - dm if kind != "q6_k" else ds * qf
    return x.reshape(*x.shape[:-3], -1)


def quantize_kquant(kind: str, x: np.ndarray) -> np.ndarray:
    """f32 (..., n) -> GGML bytes of kind 'q4_k', 'q5_k' or 'q6_k'."""
    quantizers = {"q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k}
    if kind not in quantizers:
        raise MpillamaError(f"unknown K-quant {kind!r}: use one of {', '.join(quantizers)}")
    return quantizers[kind](x)


def matmul_kquant_ref(kind: str, w: np.ndarray, x_q80: np.ndarray) -> np.ndarray:
    """w (rows, nsb*block) K-quant @ x (T, nsb*8*34) q80 -> (T, rows) f32.

    The exact value of the products the kernels sum: weights d*scale*q - dmin*m and activations
    q*d taken exactly in float64 (every factor is an f16 or a small integer), summed in float64;
    only the kernels' float32 rounding and summation order differ.
    """
    d, dmin, scales, q = split_kquant(kind, w)  # (rows, nsb), (rows, nsb, 2, n_sub), (rows, nsb, 256)
    n_sub = scales.shape[-1]
    q64 = q.astype(np.float64).reshape(*q.shape[:-1], n_sub, 256 // n_sub)
    w64 = d.astype(np.float64)[..., None, None] * scales[..., 0, :, None] * q64
    w64 -= dmin.astype(np.float64)[..., None, None] * scales[..., 1, :, None]
    xd, xq = split_q80(x_q80)  # (T, nb) f32, (T, nb, 32) int8
    assert xd.shape[1] * QK == w64.shape[1] * QK_K, f"activations have {xd.shape[1] * QK} columns, weights {w64.shape[1] * QK_K}"
    x64 = (xq.astype(np.float64) * xd.astype(np.float64)[..., None]).reshape(xd.shape[0], -1)
    return (x64 @ w64.reshape(w64.shape[0], -1).T).astype(np.float32)
