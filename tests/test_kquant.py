"""K-quants (Q4_K, Q5_K, Q6_K): quant.py's bytes against the gguf package, and the kernels against quant.py's reference."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from mpillama import kernels, quant
from mpillama.errors import MpillamaError
from mpillama.kernels import kquant

KINDS = ["q4_k", "q5_k", "q6_k"]
GGUF_TYPE = {"q4_k": GGMLQuantizationType.Q4_K, "q5_k": GGMLQuantizationType.Q5_K, "q6_k": GGMLQuantizationType.Q6_K}
THREADS = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]


def awkward_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random rows at scales from tiny to large, plus zero, constant, all-negative and one-outlier sub-blocks."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= (10.0 ** rng.uniform(-4, 2, (rows, 1))).astype(np.float32)
    x[0, :32] = 0  # a zero sub-block
    x[0, 256:512] = 0  # a zero super-block: d = dmin = 0
    x[1, :32] = 1.5  # constant, positive
    x[1, 32:64] = -np.linspace(0.5, 2, 32)  # all negative: the min carries it
    x[2, 5] = 40.0 * np.abs(x[2]).max()  # one outlier sets the super-block scale
    return x


def step_of(kind: str, b: np.ndarray) -> np.ndarray:
    """(..., n) f32: the quantization step d*scale of the sub-block of each value."""
    d, _, scales, _q = quant.split_kquant(kind, b)
    n_sub = scales.shape[-1]
    step = np.abs(d[..., None] * scales[..., 0, :])  # (..., nsb, n_sub)
    return np.repeat(step, 256 // n_sub, axis=-1).reshape(*d.shape[:-1], -1)


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_decodes_our_bytes_like_our_dequantizer(kind):
    rng = np.random.default_rng(3)
    x = awkward_rows(rng, 24, 768)
    b = quant.quantize_kquant(kind, x)
    assert b.dtype == np.uint8 and b.shape == (24, 3 * quant.KQUANT_BLOCK_BYTES[kind])
    ours = quant.dequantize_kquant(kind, b)
    theirs = gguf_dequantize(b, GGUF_TYPE[kind])
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)
    # every value within half a step of its sub-block (the quantizer never clips), plus f32 rounding
    err = np.abs(ours - x)
    bound = 0.5 * step_of(kind, b) * (1 + 1e-5) + 1e-6 * np.abs(x)
    assert np.all(err <= bound), f"{kind}: worst excess {np.max(err - bound)}"
    assert np.all(ours[0, :32] == 0) and np.all(ours[0, 256:512] == 0)
    # and the error is what the format gives on Gaussian rows: relative RMS within the usual bits' range
    g = rng.standard_normal((64, 1024)).astype(np.float32)
    rel = np.sqrt(np.mean((quant.dequantize_kquant(kind, quant.quantize_kquant(kind, g)) - g) ** 2))
    assert rel < {"q4_k": 0.13, "q5_k": 0.065, "q6_k": 0.035}[kind], f"{kind}: relative RMS error {rel}"


@pytest.mark.parametrize("kind", KINDS)
def test_known_values_round_trip_exactly(kind):
    # values on a grid whose step is a full-range sub-block scale times an exact float16 come back exactly
    x = np.zeros((1, 256), np.float32)
    if kind == "q6_k":
        q = np.tile(np.r_[-31, 31, -14:0], 16)  # every 16-value sub-block spans [-31, 31]
        x[0] = q * np.float32(127 / 128)  # d = 1/128, sc = 127
    else:
        levels = 16 if kind == "q4_k" else 32
        x[0] = (np.arange(256) % levels) * np.float32(63 / 64)  # d = 1/64, sc = 63, no min
    b = quant.quantize_kquant(kind, x)
    assert np.array_equal(quant.dequantize_kquant(kind, b), x)
    assert np.array_equal(gguf_dequantize(b, GGUF_TYPE[kind]), x)


def test_scale_bytes_round_trip():
    rng = np.random.default_rng(1)
    b = rng.integers(0, 256, (1000, 12), dtype=np.uint8)
    sc, m = quant.unpack_scales_k(b)
    assert sc.max() < 64 and m.max() < 64
    assert np.array_equal(quant._pack_scales_k(sc, m), b)


def test_bad_input():
    with pytest.raises(MpillamaError, match="multiple of 256"):
        quant.quantize_q4_k(np.zeros((2, 300), np.float32))
    with pytest.raises(MpillamaError, match="unknown K-quant"):
        quant.quantize_kquant("q3_k", np.zeros(256, np.float32))
    with pytest.raises(MpillamaError, match="multiple of 210"):
        quant.split_kquant("q6_k", np.zeros(211, np.uint8))


@pytest.mark.parametrize("kind", KINDS)
def test_matmul_ref_against_float_dot(kind):
    # the reference is the float64 dot of the two dequantized operands (an independent computation)
    rng = np.random.default_rng(5)
    w = quant.quantize_kquant(kind, rng.standard_normal((7, 512)).astype(np.float32))
    xq = quant.quantize_q80(rng.standard_normal((3, 512)).astype(np.float32))
    want = quant.dequantize_q80(xq).astype(np.float64) @ quant.dequantize_kquant(kind, w).astype(np.float64).T
    got = quant.matmul_kquant_ref(kind, w, xq)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- layout and kernels

PATHS = ["portable"] if kernels.kernel_path() == "portable" else [kernels.kernel_path(), "portable"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 40])
def test_pack_unpack_roundtrip(kind, rows):
    rng = np.random.default_rng(rows)
    ggml = rng.integers(0, 256, (rows, 2 * quant.KQUANT_BLOCK_BYTES[kind]), dtype=np.uint8)
    m = kernels.pack_kquant(kind, ggml)
    assert (m.kind, m.rows, m.cols) == (kind, rows, 512)
    assert np.array_equal(kernels.unpack_kquant(m), ggml)
    # in memory within 3% of the file's bytes (whole groups aside)
    assert m.w.nbytes / (-(-rows // 16) * 16 * ggml.shape[1]) <= 1.03


@pytest.mark.parametrize("kind", KINDS)
def test_pack_stacks_strided_parts_like_their_concatenation(kind):
    bb = quant.KQUANT_BLOCK_BYTES[kind]
    rng = np.random.default_rng(9)
    file_rows = rng.integers(0, 256, (3, 40, 3 * bb), dtype=np.uint8)
    parts = [file_rows[0, 3:19, bb:], file_rows[1, 0:5, bb:], file_rows[2, 30:40, bb:]]
    assert not parts[0].flags.c_contiguous
    m = kernels.pack_kquant(kind, parts)
    assert (m.rows, m.cols) == (31, 512)
    assert np.array_equal(kernels.unpack_kquant(m), np.concatenate(parts))
    assert np.array_equal(m.w, kernels.pack_kquant(kind, np.concatenate(parts)).w)


def test_pack_rejects_unknown_kind():
    with pytest.raises(MpillamaError, match="unknown K-quant weight kind"):
        kernels.pack_kquant("q3_k", np.zeros((1, 110), np.uint8))


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def nthreads(request):
    before = numba.get_num_threads()
    numba.set_num_threads(request.param)
    yield request.param
    numba.set_num_threads(before)


def run_matmul(m, acts, T, nthreads, path):
    out = np.full((T, m.rows), np.nan, np.float32)
    kernel, args = kquant._kernel_call(out, m, acts, T, nthreads, path)
    kernel(*args)
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("rows", "nsb", "T"), [(1, 1, 1), (17, 2, 1), (33, 3, 3), (40, 1, 9), (16, 2, 13)])
def test_matmul_against_reference(kind, rows, nsb, T, nthreads, path):
    rng = np.random.default_rng(rows * 100 + nsb * 10 + T)
    w = quant.quantize_kquant(kind, awkward_rows(rng, rows + 2, nsb * 256)[2:] if rows > 2 else rng.standard_normal((rows, nsb * 256)))
    x = rng.standard_normal((T, nsb * 256)).astype(np.float32) * np.float32(3)
    x[0, :32] = 0
    acts = kernels.new_activations(16, nsb * 256)
    kernels.quantize_activations(acts, x)
    xq = quant.quantize_q80(x)
    got = run_matmul(kernels.pack_kquant(kind, w), acts, T, nthreads, path)
    want = quant.matmul_kquant_ref(kind, w, xq)
    # float32 sums of the exact products: error relative to sum |w||x|
    scale = np.abs(quant.dequantize_q80(xq)).astype(np.float64) @ np.abs(quant.dequantize_kquant(kind, w)).astype(np.float64).T
    assert np.all(np.abs(got - want) <= 2e-5 * scale + 1e-30), f"worst {np.max(np.abs(got - want) / (scale + 1e-30))}"


def test_matmul_kquant_public_entry():
    rng = np.random.default_rng(2)
    w = quant.quantize_q4_k(rng.standard_normal((20, 512)).astype(np.float32))
    x = rng.standard_normal((2, 512)).astype(np.float32)
    acts = kernels.new_activations(4, 512)
    kernels.quantize_activations(acts, x)
    out = np.zeros((2, 20), np.float32)
    kernels.matmul_kquant(out, kernels.pack_kquant("q4_k", w), acts, 2)
    np.testing.assert_allclose(out, quant.matmul_kquant_ref("q4_k", w, quant.quantize_q80(x)), rtol=1e-4, atol=1e-4)


def test_kernel_path_picks_the_kernels(monkeypatch):
    # the dispatch follows target.kernel_path() (MPILLAMA_KERNELS=portable forces the plain kernels)
    m = kernels.pack_kquant("q6_k", np.zeros((3, 210), np.uint8))
    acts = kernels.new_activations(1, 256)
    out = np.zeros((1, 3), np.float32)
    from mpillama.kernels import kquant_dot, kquant_portable

    monkeypatch.setattr(kquant, "kernel_path", lambda: "portable")
    assert kquant._kernel_call(out, m, acts, 1, 1)[0] is kquant_portable._kq_portable_run
    assert kquant._kernel_call(out, m, acts, 1, 2)[0] is kquant_portable._kq_portable_parallel
    for path in ("x86-vnni", "arm-sdot"):
        monkeypatch.setattr(kquant, "kernel_path", lambda path=path: path)
        assert kquant._kernel_call(out, m, acts, 1, 1)[0] is kquant_dot._kqv_serial
        assert kquant._kernel_call(out, m, acts, 1, 2)[0] is kquant_dot._kqv_parallel


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_matmul_on_arbitrary_blocks(kind, path):
    # every bit pattern a file may hold (llama.cpp's quantizer writes negative Q6_K scales, 6-bit scales
    # with their high bits set, negative d): random bytes with finite float16 scales
    rng = np.random.default_rng(11)
    rows, nsb, T = 35, 2, 6
    bb = quant.KQUANT_BLOCK_BYTES[kind]
    w = rng.integers(0, 256, (rows, nsb, bb), dtype=np.uint8)
    for lo in (208,) if kind == "q6_k" else (0, 2):
        w[:, :, lo : lo + 2] = rng.uniform(-0.01, 0.01, (rows, nsb)).astype("<f2").view(np.uint8).reshape(rows, nsb, 2)
    w = w.reshape(rows, nsb * bb)
    x = rng.standard_normal((T, nsb * 256)).astype(np.float32)
    acts = kernels.new_activations(T, nsb * 256)
    kernels.quantize_activations(acts, x)
    xq = quant.quantize_q80(x)
    want = quant.matmul_kquant_ref(kind, w, xq)
    scale = np.abs(quant.dequantize_q80(xq)).astype(np.float64) @ np.abs(quant.dequantize_kquant(kind, w)).astype(np.float64).T
    m = kernels.pack_kquant(kind, w)
    for T_run in (1, T):
        got = run_matmul(m, acts, T_run, 1, path)
        assert np.all(np.abs(got - want[:T_run]) <= 2e-5 * scale[:T_run]), kind


@pytest.mark.parametrize("kind", KINDS)
def test_dequantizer_equals_gguf_on_arbitrary_blocks(kind):
    rng = np.random.default_rng(12)
    bb = quant.KQUANT_BLOCK_BYTES[kind]
    w = rng.integers(0, 256, (50, bb), dtype=np.uint8)
    for lo in (208,) if kind == "q6_k" else (0, 2):
        w[:, lo : lo + 2] = rng.uniform(-10, 10, (50, 1)).astype("<f2").view(np.uint8)
    assert np.array_equal(quant.dequantize_kquant(kind, w), gguf_dequantize(w, GGUF_TYPE[kind]))
