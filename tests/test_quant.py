"""quant.py: Q40/Q80 bytes against the gguf package and hand-made blocks; the reference ops' own sanity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mpillama import quant
from mpillama.config import RopeScaling
from mpillama.errors import MpillamaError


def awkward_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random rows at scales from f16-subnormal to large, plus zero, tied and constant blocks."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= (10.0 ** rng.uniform(-7, 3, (rows, 1))).astype(np.float32)
    x[0, :32] = 0  # zero block: d = 0
    x[1, :32] = 1.5  # constant block
    x[1, 32:64] = np.linspace(-2, 2, 32)  # +2 and -2 tie for the largest magnitude
    x[2, :32] = np.arange(32) - 16  # exact integers
    return x


@pytest.mark.parametrize(
    ("kind", "qtype", "quantize", "dequantize"),
    [
        ("q40", GGMLQuantizationType.Q4_0, quant.quantize_q40, quant.dequantize_q40),
        ("q80", GGMLQuantizationType.Q8_0, quant.quantize_q80, quant.dequantize_q80),
    ],
)
def test_bytes_equal_gguf(kind, qtype, quantize, dequantize):
    rng = np.random.default_rng(7)
    x = awkward_rows(rng, 64, 256)
    ours = quantize(x)
    theirs = gguf_quantize(x, qtype)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), f"{kind}: {np.count_nonzero(ours != theirs)} bytes differ from gguf"
    assert np.array_equal(dequantize(ours), gguf_dequantize(theirs, qtype))
    # leading dimensions are kept
    assert np.array_equal(quantize(x.reshape(4, 16, 256)), ours.reshape(4, 16, -1))


def test_q40_known_block():
    x = np.zeros(32, np.float32)
    x[0] = -8.0  # largest magnitude, negative: d = -8 / -8 = 1.0 (f16 0x3C00)
    x[1] = 3.0  # nibble trunc(3 + 8.5) = 11
    x[17] = -5.0  # nibble trunc(-5 + 8.5) = 3, high nibble of byte 1
    expected = np.array([0x00, 0x3C, 0x80, 0x3B] + [0x88] * 14, np.uint8)
    assert np.array_equal(quant.quantize_q40(x), expected)
    assert np.array_equal(quant.dequantize_q40(expected), x)


def test_q40_positive_max_gives_negative_scale():
    x = np.zeros(32, np.float32)
    x[5] = 16.0  # d = 16 / -8 = -2 (f16 0xC000); 16 -> nibble 0, value (0 - 8) * -2 = 16
    b = quant.quantize_q40(x)
    assert b[0] == 0x00 and b[1] == 0xC0 and b[2 + 5] == 0x80
    assert np.array_equal(quant.dequantize_q40(b), x)


def test_q80_known_block_rounds_half_away_from_zero():
    x = np.zeros(32, np.float32)
    x[0] = 63.5  # d = 63.5 / 127 = 0.5 (f16 0x3800); q = 127
    x[1] = -1.25  # -2.5 -> -3 (roundf, not banker's -2)
    x[2] = 0.25  # 0.5 -> 1
    x[3] = 0.75  # 1.5 -> 2
    b = quant.quantize_q80(x)
    expected = np.zeros(34, np.uint8)
    expected[:2] = [0x00, 0x38]
    expected[2:6] = np.array([127, -3, 1, 2], np.int8).view(np.uint8)
    assert np.array_equal(b, expected)


def test_roundtrip_error_bounds():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 512)).astype(np.float32) * 0.05
    blocks = x.reshape(50, 16, 32)
    # q40: |d| = max|x| / 8; an element is off by at most |d|/2 (plus the f16 rounding of d times 8),
    # except one of the opposite sign beyond 7.5|d|, which clamps to 7|d| (off by at most |d|).
    d40 = np.abs(blocks).max(-1, keepdims=True) / 8
    err40 = np.abs(quant.dequantize_q40(quant.quantize_q40(x)).reshape(blocks.shape) - blocks)
    top = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)  # (50, 16, 1) signed max
    clamped = blocks * -np.sign(top) > 7.5 * d40  # (50, 16, 32): beyond the far end of the nibble range
    bound = np.broadcast_to(d40, blocks.shape)
    assert np.all(err40[~clamped] <= bound[~clamped] * (0.5 + 8 * 2**-11) + 1e-9)
    assert np.all(err40 <= d40 * (1 + 8 * 2**-11) + 1e-9)
    # q80: d = max|x| / 127; off by at most d/2 plus 127 times the f16 rounding of d
    d80 = np.abs(blocks).max(-1, keepdims=True) / 127
    err80 = np.abs(quant.dequantize_q80(quant.quantize_q80(x)).reshape(blocks.shape) - blocks)
    assert np.all(err80 <= d80 * (0.5 + 127 * 2**-11) + 1e-9)
    assert quant.worst_roundtrip_error(x, "q40") == pytest.approx(err40.max())
    assert quant.worst_roundtrip_error(x, "q80") == pytest.approx(err80.max())


@pytest.mark.parametrize("fn", [quant.quantize_q40, quant.quantize_q80])
def test_quantize_rejects_partial_blocks(fn):
    with pytest.raises(MpillamaError, match="multiple of 32"):
        fn(np.zeros((2, 40), np.float32))


@pytest.mark.parametrize("fn", [quant.dequantize_q40, quant.dequantize_q80])
def test_dequantize_rejects_partial_blocks(fn):
    with pytest.raises(MpillamaError, match="multiple of"):
        fn(np.zeros((2, 35), np.uint8))


def test_matmul_q40_ref_is_the_dequantized_product():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((40, 128)).astype(np.float32)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    wq, xq = quant.quantize_q40(w), quant.quantize_q80(x)
    exact = quant.dequantize_q80(xq).astype(np.float64) @ quant.dequantize_q40(wq).astype(np.float64).T
    np.testing.assert_allclose(quant.matmul_q40_ref(wq, xq), exact, rtol=1e-5, atol=1e-5)
    # and both are near the float product, within quantization error
    rel = np.linalg.norm(exact - x @ w.T) / np.linalg.norm(x @ w.T)
    assert rel < 0.15


def test_rope_ref_properties():
    rng = np.random.default_rng(9)
    hd = 16
    x = rng.standard_normal((3, 2, hd)).astype(np.float32)
    pos = np.array([0, 1, 37])
    for halves in (False, True):
        y = quant.rope_ref(x, pos, hd, 10000.0, None, halves)
        np.testing.assert_allclose(y[0], x[0], rtol=1e-6)  # position 0 is the identity
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)  # a rotation
    # halves is pairs on a permuted head: (i, i + hd/2) <-> (2i, 2i+1)
    perm = np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], axis=1).reshape(-1)
    np.testing.assert_allclose(
        quant.rope_ref(x, pos, hd, 10000.0, None, True)[..., perm],
        quant.rope_ref(x[..., perm], pos, hd, 10000.0, None, False),
        rtol=1e-6,
    )
    # one pair at position p rotates by angle p * theta^0 = p
    e = np.zeros((1, 1, hd), np.float32)
    e[0, 0, 0] = 1
    y = quant.rope_ref(e, np.array([2]), hd, 10000.0, None, False)
    assert y[0, 0, 0] == pytest.approx(math.cos(2), abs=1e-6) and y[0, 0, 1] == pytest.approx(math.sin(2), abs=1e-6)


def test_llama3_frequency_remap():
    s = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    base = quant.rope_frequencies_ref(64, 500000.0, None)
    f = quant.rope_frequencies_ref(64, 500000.0, s)
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_array_equal(f[high], base[high])  # short wavelengths untouched
    np.testing.assert_allclose(f[low], base[low] / 32)  # long ones divided by factor
    mid = ~high & ~low  # in between: strictly between the two
    assert np.all((f[mid] < base[mid]) & (f[mid] > base[mid] / 32))


def test_attention_ref_small_cases():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 4, 8)).astype(np.float32)
    k = rng.standard_normal((5, 2, 8)).astype(np.float32)
    v = rng.standard_normal((5, 2, 8)).astype(np.float32)
    # one visible position: the output is that position's value row, for every head of the group
    out = quant.attention_ref(q, k, v, 0)
    np.testing.assert_allclose(out[0, :2], v[[0, 0], 0], rtol=1e-6)
    np.testing.assert_allclose(out[0, 2:], v[[0, 0], 1], rtol=1e-6)
    # identical keys: a plain mean of the visible values
    k[:] = k[0]
    out = quant.attention_ref(q, k, v, 3)
    np.testing.assert_allclose(out[0, 3], v[:4, 1].mean(0), rtol=1e-5)


def test_silu_mul_ref():
    h1 = np.array([[0.0, 1.0, -2.0]], np.float32)
    h3 = np.array([[5.0, 2.0, 3.0]], np.float32)
    expected = [0.0, 2.0 / (1 + math.exp(-1)), 3.0 * -2.0 / (1 + math.exp(2))]
    np.testing.assert_allclose(quant.silu_mul_ref(h1, h3)[0], expected, rtol=1e-6)
