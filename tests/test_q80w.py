"""Q8_0 weights at their own precision (kernels/q80w.py, q80w_x86.py) against quant.matmul_q80w_ref,
and the weight-kind registry (kernels/weights.py)."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from mpillama import kernels, quant
from mpillama.errors import MpillamaError
from mpillama.kernels import q80w, weights
from mpillama.kernels.target import kernel_path

THREADS = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]
# every layout this machine runs: vnni (x86 AVX-512 VNNI) or sdot (ARM dotprod, under tests/aarch64's
# emulation) on a dot-product path, rows anywhere
LAYOUTS = sorted({q80w.default_layout(), q80w.LAYOUT_ROWS})


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def nthreads(request):
    before = numba.get_num_threads()
    numba.set_num_threads(request.param)
    yield request.param
    numba.set_num_threads(before)


def random_q80(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Q8_0 bytes of random weights, scales from tiny to large, values over the whole int8 range."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w *= (10.0 ** rng.uniform(-4, 2, (rows, 1))).astype(np.float32)
    return quant.quantize_q80(w)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 100])
@pytest.mark.parametrize("cols", [32, 96])
def test_pack_unpack_roundtrip(layout, rows, cols):
    rng = np.random.default_rng(rows * cols)
    ggml = rng.integers(0, 256, (rows, cols // 32 * 34), dtype=np.uint8)
    ggml[:, 1::34] &= 0x7B  # finite f16 scales (the rows layout widens them to f32 and back)
    m = kernels.pack_q80w(ggml, layout)
    assert (m.rows, m.cols, m.layout) == (rows, cols, layout)
    assert np.array_equal(kernels.unpack_q80w(m), ggml)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_stacks_row_blocks(layout):
    rng = np.random.default_rng(3)
    parts = [random_q80(rng, n, 64) for n in (5, 16, 12)]
    m = kernels.pack_q80w(parts, layout)
    assert np.array_equal(kernels.unpack_q80w(m), np.concatenate(parts))


def test_pack_rejects_unknown_or_unavailable_layout(monkeypatch):
    with pytest.raises(MpillamaError, match="unknown Q80 weight layout"):
        kernels.pack_q80w(np.zeros((1, 34), np.uint8), "tiles")
    monkeypatch.setattr(q80w, "kernel_path", lambda: "portable")  # where pack_q80w looks it up
    for layout in (q80w.LAYOUT_VNNI, q80w.LAYOUT_SDOT):
        with pytest.raises(MpillamaError, match=f"the {layout} Q80 weight layout needs the .* kernel path"):
            kernels.pack_q80w(np.zeros((1, 34), np.uint8), layout)


SHAPES = [(1, 32, 1), (31, 64, 1), (40, 2048, 1), (257, 32, 2), (100, 160, 5), (33, 96, 8), (48, 64, 9), (17, 64, 4),
          (64, 64, 1), (100, 96, 1), (600, 160, 1)]  # decode over 4 row groups at a time (vnni), and its tail


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("rows", "cols", "T"), SHAPES)
def test_matmul_q80w_equals_reference(nthreads, layout, rows, cols, T):
    rng = np.random.default_rng(rows + cols + T)
    wq = random_q80(rng, rows, cols)
    x = rng.standard_normal((T, cols)).astype(np.float32) * 3
    x[0, :32] = 0  # a zero block (scale 0)
    m = kernels.pack_q80w(wq, layout)
    acts = kernels.new_activations(T + 2, cols)
    kernels.quantize_activations(acts, x)
    out = np.full((T, rows), np.nan, np.float32)
    kernels.matmul_weights(out, m, acts, T)
    ref = quant.matmul_q80w_ref(wq, quant.quantize_q80(x))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matmul_q80w_extremes(nthreads, layout):
    # every weight -128 or 127 against +-127 activations: the vnni path's stored bytes 0 and 255 and
    # its 128 * sum(x) correction at their limits; the sums must stay exact
    rows, cols = 40, 128
    rng = np.random.default_rng(5)
    blocks = np.zeros((rows, cols // 32, 34), np.uint8)
    blocks[..., :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    blocks[..., 2:] = np.where(rng.random((rows, cols // 32, 32)) < 0.5, 0x80, 0x7F)
    blocks[0, :, 2:] = 0x80  # all -128
    wq = blocks.reshape(rows, -1)
    x = np.where(rng.random((3, cols)) < 0.5, -1.0, 1.0).astype(np.float32)
    x[0] = 1.0
    m = kernels.pack_q80w(wq, layout)
    acts = kernels.new_activations(3, cols)
    kernels.quantize_activations(acts, x)
    ref = quant.matmul_q80w_ref(wq, quant.quantize_q80(x))
    assert ref[0, 0] == pytest.approx(-128 * 127 * cols * 0.5 * acts.d[0, 0])
    for T in (1, 3):
        out = np.zeros((T, rows), np.float32)
        kernels.matmul_weights(out, m, acts, T)
        # exact block sums; only the float32 sum over blocks (with cancellation) rounds
        np.testing.assert_allclose(out, ref[:T], rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.skipif(kernel_path() != "x86-vnni", reason="the x86 VNNI decode kernel runs only there")
@pytest.mark.parametrize("rows", [64, 100, 600])
def test_vnni_decode_four_groups_at_once_is_one_at_a_time(rows):
    """Four row groups side by side give each group bit for bit what it gets alone."""
    from mpillama.kernels.q80w_x86 import _q80v_one

    rng = np.random.default_rng(rows)
    cols = 256
    m = kernels.pack_q80w(quant.quantize_q80(rng.standard_normal((rows, cols)).astype(np.float32)), "vnni")
    acts = kernels.new_activations(1, cols)
    kernels.quantize_activations(acts, rng.standard_normal((1, cols)).astype(np.float32))
    together, alone = np.zeros((1, rows), np.float32), np.zeros((1, rows), np.float32)
    n_groups = m.qs.shape[0]
    _q80v_one(together, m.qs, acts.qs32, acts.d, acts.corr, rows, 0, n_groups)
    for g in range(n_groups):
        _q80v_one(alone, m.qs, acts.qs32, acts.d, acts.corr, rows, g, g + 1)
    assert np.array_equal(together, alone)


def test_matmul_q80w_near_float_product():
    rng = np.random.default_rng(21)
    w = rng.standard_normal((300, 512)).astype(np.float32) * 0.02
    x = rng.standard_normal((3, 512)).astype(np.float32)
    m = kernels.pack_q80w(quant.quantize_q80(w))
    acts = kernels.new_activations(3, 512)
    kernels.quantize_activations(acts, x)
    out = np.zeros((3, 300), np.float32)
    kernels.matmul_weights(out, m, acts, 3)
    exact = x @ w.T
    # 8-bit weights and activations: well under 1% relative error (Q4_0 weights give ~10%)
    assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < 0.01


def test_registry_kinds_and_dispatch():
    assert {"q40", "q80"} <= set(kernels.KINDS)
    assert (weights.KINDS["q80"].block_values, weights.KINDS["q80"].block_bytes) == (32, 34)
    assert weights.registered("Q8_0") is None and weights.registered("q80").name == "q80"
    rng = np.random.default_rng(8)
    w = rng.standard_normal((20, 64)).astype(np.float32)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    acts = kernels.new_activations(1, 64)
    kernels.quantize_activations(acts, x)
    for kind, quantize, ref in (("q40", quant.quantize_q40, quant.matmul_q40_ref),
                                ("q80", quant.quantize_q80, quant.matmul_q80w_ref)):
        g = quantize(w)
        m = weights.pack(kind, [g[:7], g[7:]])
        assert (m.rows, m.cols) == (20, 64)
        out = np.zeros((1, 20), np.float32)
        kernels.matmul_weights(out, m, acts, 1)
        np.testing.assert_allclose(out, ref(g, quant.quantize_q80(x)), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(weights.KINDS[kind].dequantize(g), quant.dequantize_q40(g) if kind == "q40"
                                      else quant.dequantize_q80(g))
