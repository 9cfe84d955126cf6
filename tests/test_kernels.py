"""mpillama.kernels against the numpy references in quant.py, on random shapes including odd sizes and block edges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from numba.core import registry

from mpillama import kernels, quant
from mpillama.kernels import attn, bits, cache, target
from mpillama.config import RopeScaling
from mpillama.errors import MpillamaError

THREADS = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]
# every Q40 layout this machine runs: vnni on a dot-product path (x86 AVX-512 VNNI, or ARM sdot
# under tests/aarch64's emulation), tiles anywhere
LAYOUTS = [kernels.LAYOUT_TILES] if kernels.kernel_path() == "portable" else [kernels.LAYOUT_VNNI, kernels.LAYOUT_TILES]


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def nthreads(request):
    """Run a test with the serial kernels (1) and the threaded ones (2), then restore."""
    before = numba.get_num_threads()
    numba.set_num_threads(request.param)
    yield request.param
    numba.set_num_threads(before)


def awkward(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random f32 rows at scales from f16-subnormal to large, with zero blocks and exact halves."""
    x = rng.standard_normal(shape).astype(np.float32)
    x *= (10.0 ** rng.uniform(-7, 3, shape[:-1] + (1,))).astype(np.float32)
    x.reshape(-1, shape[-1])[0, :32] = 0
    if x.reshape(-1, shape[-1]).shape[0] > 1:
        # d = 63.5 / 127 = 0.5 exactly, so x / d = +-(k + 0.5): ties that roundf sends away from zero
        tie = (np.arange(32) * 0.5 + 0.25) * np.where(np.arange(32) % 2, -1, 1)
        tie[31] = 63.5
        x.reshape(-1, shape[-1])[1, :32] = tie
    return x


# ---------------------------------------------------------------- layout and activations


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 31, 255, 256, 257, 600])
@pytest.mark.parametrize("cols", [32, 96])
def test_pack_unpack_roundtrip(layout, rows, cols):
    rng = np.random.default_rng(rows * cols)
    ggml = rng.integers(0, 256, (rows, cols // 32 * 18), dtype=np.uint8)
    m = kernels.pack_q40(ggml, layout)
    assert (m.rows, m.cols, m.layout) == (rows, cols, layout)
    assert m.qs.shape[0] * (kernels.TILE if layout == kernels.LAYOUT_TILES else kernels.VNNI_ROWS) >= rows
    assert np.array_equal(kernels.unpack_q40(m), ggml)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_stacks_strided_parts_like_their_concatenation(layout):
    # what loading does: wq/wk/wv row ranges of one rank, column-sliced views of the mapped file
    rng = np.random.default_rng(7)
    file_rows = rng.integers(0, 256, (3, 40, 4 * 18), dtype=np.uint8)  # 3 tensors, 40 rows, 4 blocks
    parts = [file_rows[0, 3:19, 18:54], file_rows[1, 0:5, 18:54], file_rows[2, 30:40, 18:54]]
    assert not parts[0].flags.c_contiguous
    m = kernels.pack_q40(parts, layout)
    stacked = np.concatenate(parts)
    assert (m.rows, m.cols) == (31, 64)
    assert np.array_equal(kernels.unpack_q40(m), stacked)
    assert np.array_equal(m.qs, kernels.pack_q40(stacked, layout).qs)  # padding included


def test_vnni_layout_bytes():
    # Group 0, block 1: row r's byte 4k+i at k*64 + r*4 + i, its f16 scale at 256 + 2r (independent of the kernels)
    if kernels.LAYOUT_VNNI not in LAYOUTS:
        pytest.skip("the portable kernel path runs here")
    rows, nb = 20, 2
    ggml = np.arange(rows * nb * 18, dtype=np.int64).astype(np.uint8).reshape(rows, nb * 18)
    m = kernels.pack_q40(ggml, kernels.LAYOUT_VNNI)
    assert m.qs.shape == (2, nb, 288)
    for r in range(16):
        blk = ggml[r, 18:36]
        for j in range(16):
            assert m.qs[0, 1, (j // 4) * 64 + r * 4 + j % 4] == blk[2 + j]
        assert m.qs[0, 1, 256 + 2 * r] == blk[0] and m.qs[0, 1, 257 + 2 * r] == blk[1]
    assert np.all(m.qs[1, :, :256].reshape(nb, 4, 16, 4)[:, :, 4:] == 0x88)  # padded rows: nibbles 8 = 0
    assert np.all(m.d[1, :, 4:] == 0)


def test_pack_q40_rejects_unknown_or_unavailable_layout(monkeypatch):
    ggml = np.zeros((4, 18), np.uint8)
    with pytest.raises(MpillamaError, match="unknown Q40 layout"):
        kernels.pack_q40(ggml, "rows")
    monkeypatch.setattr(kernels.q40, "kernel_path", lambda: "portable")  # where pack_q40 looks it up
    assert kernels.default_layout() == kernels.LAYOUT_TILES
    with pytest.raises(MpillamaError, match="dot-product kernel path"):
        kernels.pack_q40(ggml, kernels.LAYOUT_VNNI)


@pytest.mark.parametrize("shape", [(1, 32), (5, 96), (3, 2048)])
def test_quantize_activations_is_q8_0(shape):
    rng = np.random.default_rng(11)
    x = awkward(rng, shape)
    acts = kernels.new_activations(8, shape[1])
    kernels.quantize_activations(acts, x)
    d, q = quant.split_q80(quant.quantize_q80(x))  # d: the float16 scales, exact in float32
    T = shape[0]
    assert np.array_equal(acts.d[:T], d) and np.array_equal(acts.qs[:T], q)
    assert np.array_equal(acts.corr[:T], 8 * q.astype(np.int32).sum(-1))


def test_f16_bits_round_like_numpy():
    # every float16 rounding case: random magnitudes across the whole range, exact midpoints
    # between neighbouring float16 values (ties to even), subnormals, overflow to inf
    rng = np.random.default_rng(14)
    x = np.abs(rng.standard_normal(20000) * 10.0 ** rng.uniform(-9, 5.5, 20000)).astype(np.float32)
    h = np.arange(0, 0x7C00, 7, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = ((h[:-1] + h[1:]) / 2).astype(np.float32)  # exact in float32
    x = np.concatenate([x, mids, np.float32([0.0, 2.0**-25, 2.0**-24, 65504.0, 65520.0, 1e6])])
    ours = np.array([bits._f16_bits(v) for v in x])
    with np.errstate(over="ignore"):
        theirs = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(ours, theirs)
    back = np.array([bits._f16_to_f32(int(b)) for b in theirs], np.float32)
    assert np.array_equal(back, theirs.view(np.float16).astype(np.float32))


def test_activations_from_q80_equal_quantize_activations():
    rng = np.random.default_rng(12)
    x = awkward(rng, (6, 256))
    a = kernels.new_activations(6, 256)
    b = kernels.new_activations(6, 256)
    kernels.quantize_activations(a, x)
    kernels.activations_from_q80(b, quant.quantize_q80(x))
    for name in ("qs", "d", "corr"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("shape", [(1, 32), (4, 160), (2, 2048)])
def test_quantize_q80_into_and_dequantize_add(shape):
    rng = np.random.default_rng(13)
    x = awkward(rng, shape)
    payload = np.zeros((shape[0], shape[1] // 32 * 34), np.uint8)
    kernels.quantize_q80_into(payload, x)
    assert np.array_equal(payload, quant.quantize_q80(x))
    acc = rng.standard_normal(shape).astype(np.float32)
    expected = acc + quant.dequantize_q80(payload)
    kernels.dequantize_q80_add(acc, payload)
    np.testing.assert_array_equal(acc, expected)


# ---------------------------------------------------------------- Q40 matmul



# ---------------------------------------------------------------- kernel path (target.py)

X86 = dict(machine="x86_64", hwcap=None, cpu="icelake-server", features=None, fixed=False)
ARM = dict(machine="aarch64", vnni=False, features=None, fixed=False, host_features="+neon,-sve")


@pytest.mark.parametrize(("facts", "forced", "path", "features"), [
    ({**X86, "vnni": True}, "", "x86-vnni", None),
    ({**X86, "vnni": False}, "auto", "portable", None),
    ({**X86, "vnni": True}, "portable", "portable", None),
    ({**X86, "vnni": True}, " VNNI ", "x86-vnni", None),
    # aarch64: HWCAP decides, and numba's target features are made to say the same
    ({**ARM, "hwcap": True, "cpu": "cortex-a76"}, "", "arm-sdot", "+neon,-sve,+dotprod"),
    ({**ARM, "hwcap": True, "cpu": "generic"}, "", "arm-sdot", "+neon,-sve,+dotprod"),  # a core LLVM does not know
    ({**ARM, "hwcap": False, "cpu": "cortex-a72"}, "", "portable", "+neon,-sve,-dotprod"),
    ({**ARM, "hwcap": False, "cpu": "cortex-a76"}, "", "portable", "+neon,-sve,-dotprod"),  # a VM hiding dotprod
    ({**ARM, "hwcap": True, "cpu": "cortex-a76"}, "portable", "portable", "+neon,-sve,+dotprod"),
    # no HWCAP (no getauxval): the CPU name decides, the target is left alone
    ({**ARM, "hwcap": None, "cpu": "cortex-a55"}, "", "arm-sdot", None),
    ({**ARM, "hwcap": None, "cpu": "cortex-a72"}, "", "portable", None),
    ({**ARM, "hwcap": None, "cpu": "generic"}, "sdot", "arm-sdot", "+neon,-sve,+dotprod"),  # forced: trusted
    # a target the user set (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) is obeyed, never changed
    ({**ARM, "hwcap": True, "cpu": "generic", "features": "", "fixed": True}, "", "portable", None),
    ({**ARM, "hwcap": True, "cpu": "generic", "features": "+neon,+dotprod", "fixed": True}, "", "arm-sdot", None),
    ({**ARM, "hwcap": True, "cpu": "cortex-a76", "features": "-dotprod", "fixed": True}, "", "portable", None),
    ({**X86, "machine": "ppc64le", "vnni": False, "cpu": "pwr9"}, "", "portable", None),
])  # fmt: skip
def test_kernel_path_decision(facts, forced, path, features):
    d = target.decide(facts.pop("machine"), forced, **facts)
    assert (d.path, d.features, d.error) == (path, features, None)


@pytest.mark.parametrize(("facts", "forced", "error"), [
    ({**X86, "vnni": True}, "avx", "MPILLAMA_KERNELS='avx': choose auto, vnni, sdot, portable"),
    ({**X86, "vnni": False}, "vnni", "has no AVX-512 VNNI"),
    ({**X86, "vnni": True}, "sdot", "the SDOT kernels are aarch64 code and this machine is x86_64"),
    ({**ARM, "hwcap": True, "cpu": "cortex-a76"}, "vnni", "the VNNI kernels are x86 code and this machine is aarch64"),
    ({**ARM, "hwcap": False, "cpu": "cortex-a76"}, "sdot", "no dot-product extension (HWCAP_ASIMDDP is not set)"),
    ({**ARM, "hwcap": True, "cpu": "generic", "features": "", "fixed": True}, "sdot", "without dotprod"),
])  # fmt: skip
def test_kernel_path_decision_refuses_what_cannot_run(facts, forced, error):
    d = target.decide(facts.pop("machine"), forced, **facts)
    assert d.path is None and error in d.error


def test_kernel_path_of_this_process_and_forcing_it(monkeypatch):
    # this process: what decide() says for its facts; its numba target agrees with the path
    path = kernels.kernel_path()
    assert path in ("x86-vnni", "arm-sdot", "portable")
    features = registry.cpu_target.target_context.codegen().magic_tuple()[2]  # part of numba's cache key
    if path == "arm-sdot":
        assert "+dotprod" in features.split(",") or target.names_dotprod(numba.config.CPU_NAME or "", features)
    if target.hwcap_dotprod() is False:
        assert "-dotprod" in features.split(",")  # a cache made here never serves dotprod code, nor takes it
    monkeypatch.setattr(target, "_DECISION", target.Decision(None, "MPILLAMA_KERNELS='x': choose ..."))
    with pytest.raises(MpillamaError, match="MPILLAMA_KERNELS='x'"):
        kernels.kernel_path()
    monkeypatch.setattr(target, "_DECISION", target.Decision("portable"))
    assert kernels.default_layout() == kernels.LAYOUT_TILES and kernels.new_activations(1, 32).group_nibbles.size == 0


def test_forced_portable_path_in_a_new_process():
    # MPILLAMA_KERNELS is read once, at import, before anything compiles
    code = "from mpillama import kernels; print(kernels.kernel_path(), kernels.default_layout())"
    path = os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "MPILLAMA_KERNELS": "portable", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["portable", "tiles"]

# rows, cols, T: rows off the 16-row group and the 256-row tile, T off the 4-token pass
MATMUL_SHAPES = [
    (1, 32, 1), (31, 64, 1), (40, 2048, 1), (256, 96, 3), (257, 32, 2), (600, 160, 5), (513, 64, 17),
    (17, 64, 4), (33, 96, 8), (48, 64, 9), (100, 256, 6), (20, 64, 15), (64, 128, 16),
    (64, 64, 1), (100, 96, 1), (257, 32, 1), (600, 160, 1),  # decode over 4 row groups at a time, and its tail
]  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("rows", "cols", "T"), MATMUL_SHAPES)
def test_matmul_q40_equals_reference(nthreads, layout, rows, cols, T):
    rng = np.random.default_rng(rows + cols + T)
    wq = quant.quantize_q40(rng.standard_normal((rows, cols)).astype(np.float32))
    x = awkward(rng, (T, cols))
    m = kernels.pack_q40(wq, layout)
    acts = kernels.new_activations(T + 2, cols)
    kernels.quantize_activations(acts, x)
    out = np.full((T, rows), np.nan, np.float32)
    kernels.matmul_q40(out, m, acts, T)
    ref = quant.matmul_q40_ref(wq, quant.quantize_q80(x))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.skipif(kernels.kernel_path() != "x86-vnni", reason="the x86 VNNI decode kernel runs only there")
@pytest.mark.parametrize("rows", [64, 100, 600])
def test_vnni_decode_four_groups_at_once_is_one_at_a_time(rows):
    """The decode kernel runs four row groups side by side: each group's result is bit for bit the one
    it gets alone (the same integer sums, the same float operations in the same order)."""
    from mpillama.kernels.x86 import _q40v_one

    rng = np.random.default_rng(rows)
    cols = 256
    m = kernels.pack_q40(quant.quantize_q40(rng.standard_normal((rows, cols)).astype(np.float32)), "vnni")
    acts = kernels.new_activations(1, cols)
    kernels.quantize_activations(acts, awkward(rng, (1, cols)))
    together, alone = np.zeros((1, rows), np.float32), np.zeros((1, rows), np.float32)
    n_groups = m.qs.shape[0]
    _q40v_one(together, m.qs, acts.qs32, acts.d, acts.corr, rows, 0, n_groups)
    for g in range(n_groups):  # a range of one group takes the one-group loop
        _q40v_one(alone, m.qs, acts.qs32, acts.d, acts.corr, rows, g, g + 1)
    assert np.array_equal(together, alone)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matmul_q40_int16_extremes(nthreads, layout):
    # Every nibble 0 or 15 against +-127: the block dot products hit -32512 / +28448 exactly, and the
    # unsigned partial sums (up to 15 * 127 * 32 = 60960) overflow int16 before the correction.
    rows, cols = 300, 128
    rng = np.random.default_rng(4)
    nib = np.where(rng.random((rows, cols // 32, 32)) < 0.5, 0, 15).astype(np.uint8)
    nib[:10] = 0
    nib[10:20] = 15
    blocks = np.zeros((rows, cols // 32, 18), np.uint8)
    blocks[..., :2] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)
    blocks[..., 2:] = nib[..., :16] | (nib[..., 16:] << 4)
    wq = blocks.reshape(rows, -1)
    x = np.where(rng.random((2, cols)) < 0.5, -1.0, 1.0).astype(np.float32)
    x[0] = 1.0
    m = kernels.pack_q40(wq, layout)
    acts = kernels.new_activations(2, cols)
    kernels.quantize_activations(acts, x)
    assert np.all(np.abs(acts.qs[:2]) == 127)
    ref = quant.matmul_q40_ref(wq, quant.quantize_q80(x))
    assert ref[0, 0] == pytest.approx(-32512 * 4 * 0.25 * acts.d[0, 0])
    for T in (1, 2):  # the decode and the prefill kernels
        out = np.zeros((T, rows), np.float32)
        kernels.matmul_q40(out, m, acts, T)
        np.testing.assert_allclose(out, ref[:T], rtol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matmul_q40_near_float_product(layout):
    rng = np.random.default_rng(21)
    w = rng.standard_normal((300, 512)).astype(np.float32) * 0.02
    x = rng.standard_normal((3, 512)).astype(np.float32)
    m = kernels.pack_q40(quant.quantize_q40(w), layout)
    acts = kernels.new_activations(3, 512)
    kernels.quantize_activations(acts, x)
    out = np.zeros((3, 300), np.float32)
    kernels.matmul_q40(out, m, acts, 3)
    exact = x @ w.T
    # 4-bit weights (~8% rms error per weight) and 8-bit activations: about 10% relative overall
    assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < 0.15
    deq = quant.dequantize_q80(quant.quantize_q80(x)) @ quant.dequantize_q40(quant.quantize_q40(w)).T
    np.testing.assert_allclose(out, deq, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T", [1, 3])
def test_matmul_f32(nthreads, T):
    rng = np.random.default_rng(22)
    w = rng.standard_normal((77, 1000)).astype(np.float32)
    x = rng.standard_normal((T, 1000)).astype(np.float32)
    out = np.zeros((T, 77), np.float32)
    kernels.matmul_f32(out, w, x)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- elementwise


@pytest.mark.parametrize("alias", [False, True])
def test_rmsnorm(alias):
    rng = np.random.default_rng(23)
    x = (rng.standard_normal((3, 2048)) * 10).astype(np.float32)
    w = rng.standard_normal(2048).astype(np.float32)
    ref = quant.rmsnorm_ref(x, w, 1e-5)
    out = x if alias else np.zeros_like(x)
    kernels.rmsnorm(out, x, w, 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_exp_f32_accuracy():
    # the vectorisable exp used by silu and softmax: relative error < 5e-7 on its whole range
    x = np.linspace(-87.0, 88.0, 200001).astype(np.float32)
    ours = np.array([bits._exp_f32(v) for v in x[::97]], np.float64)
    exact = np.exp(x[::97].astype(np.float64))
    assert np.max(np.abs(ours - exact) / exact) < 5e-7
    assert attn._exp_neg(np.float32(-87.5)) == 0.0 and attn._exp_neg(np.float32(0.0)) == 1.0


def test_swiglu_is_silu_mul_of_the_halves():
    rng = np.random.default_rng(26)
    h13 = (rng.standard_normal((3, 2 * 999)) * 5).astype(np.float32)
    h13[0, :4] = [-100.0, 100.0, -1e30, 1e30]  # exp clamps: silu stays finite (about 0 and a)
    out = np.full((3, 999), np.nan, np.float32)
    kernels.swiglu(out, h13)
    with np.errstate(over="ignore"):  # the reference's exp(1e30) is inf, and silu then exactly 0
        ref = quant.silu_mul_ref(h13[:, :999], h13[:, 999:])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize(
    "scaling", [None, RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)]
)
def test_rope(halves, scaling):
    rng = np.random.default_rng(25)
    hd, max_seq = 64, 5000
    x = rng.standard_normal((4, 3, hd)).astype(np.float32)
    pos = np.array([0, 1, 777, 4999], np.int32)
    cos, sin = kernels.rope_tables(hd, max_seq, 500000.0, scaling)
    assert cos.shape == sin.shape == (max_seq, hd // 2) and cos.dtype == np.float32
    ref = quant.rope_ref(x, pos, hd, 500000.0, scaling, halves)
    kernels.rope(x, pos, cos, sin, halves)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


# n_heads, n_kv, hd, pos0, T: groups of 1..8 query heads (over the 4-head pass), head_dim off 16
# (the online kernels), position counts off the 4 streams, prefill (T > 1) and decode
ATTENTION_SHAPES = [
    (4, 4, 32, 0, 1), (8, 2, 64, 0, 7), (6, 3, 16, 41, 1), (4, 1, 128, 9, 5), (24, 8, 64, 37, 3),
    (16, 2, 32, 6, 2), (12, 2, 48, 0, 1), (4, 2, 24, 9, 3),
]  # fmt: skip


@pytest.mark.parametrize("with_scratch", [False, True], ids=["online", "scratch"])
@pytest.mark.parametrize(("n_heads", "n_kv", "hd", "pos0", "T"), ATTENTION_SHAPES)
def test_attention(nthreads, with_scratch, n_heads, n_kv, hd, pos0, T):
    rng = np.random.default_rng(n_heads * 100 + pos0)
    max_seq = pos0 + T + 3
    q = (rng.standard_normal((T, n_heads, hd)) * 2).astype(np.float32)
    k = rng.standard_normal((max_seq, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((max_seq, n_kv, hd)).astype(np.float32)
    k[pos0 + T :] = np.nan  # beyond the last token: must never be read
    v[pos0 + T :] = np.nan
    out = np.full((T, n_heads, hd), np.nan, np.float32)
    scratch = kernels.new_attention_scratch(max_seq, n_heads, hd) if with_scratch else None
    if scratch is not None:
        scratch.scores[:] = np.nan  # stale contents must not matter
        scratch.parts[:] = np.nan
    kernels.attention(out, q, k, v, pos0, T, scratch)
    np.testing.assert_allclose(out, quant.attention_ref(q, k, v, pos0), rtol=1e-5, atol=1e-5)


def test_attention_head_range_views(nthreads):
    # More ranks than KV heads: the model passes a range of query heads of one KV head (strided views)
    rng = np.random.default_rng(31)
    T, pos0, hd = 3, 20, 32
    q = rng.standard_normal((T, 8, hd)).astype(np.float32)
    k = rng.standard_normal((pos0 + T, 2, hd)).astype(np.float32)
    v = rng.standard_normal((pos0 + T, 2, hd)).astype(np.float32)
    out = np.full((T, 8, hd), np.nan, np.float32)
    a, b = 5, 7  # heads 5, 6 of kv head 1
    kernels.attention(out[:, a:b], q[:, a:b], k[:, 1:2], v[:, 1:2], pos0, T)
    ref = quant.attention_ref(q[:, a:b], k[:, 1:2], v[:, 1:2], pos0)
    np.testing.assert_allclose(out[:, a:b], ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.isnan(out[:, :a])) and np.all(np.isnan(out[:, b:]))


@pytest.mark.parametrize("T", [1, 2])
def test_attention_long_context(nthreads, T):
    # long enough that a decode token's positions are split over threads (2 * ATT_MIN_CHUNK and more)
    rng = np.random.default_rng(32)
    pos0 = 2 * kernels.ATT_MIN_CHUNK + 37
    q = rng.standard_normal((T, 8, 64)).astype(np.float32)
    k = rng.standard_normal((pos0 + T, 2, 64)).astype(np.float32)
    v = rng.standard_normal((pos0 + T, 2, 64)).astype(np.float32)
    out = np.zeros((T, 8, 64), np.float32)
    scratch = kernels.new_attention_scratch(pos0 + T, 8, 64)
    kernels.attention(out, q, k, v, pos0, T, scratch)
    np.testing.assert_allclose(out, quant.attention_ref(q, k, v, pos0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_scratch", [False, True], ids=["online", "scratch"])
def test_attention_increasing_scores(with_scratch):
    # Every new position has a larger score: the online softmax rescales at every step.
    hd, n = 16, 50
    q = np.ones((1, 1, hd), np.float32)
    k = (np.arange(n, dtype=np.float32)[:, None, None] * 0.3 * np.ones((1, 1, hd), np.float32)) / hd
    v = np.random.default_rng(1).standard_normal((n, 1, hd)).astype(np.float32)
    out = np.zeros((1, 1, hd), np.float32)
    kernels.attention(out, q, k, v, n - 1, 1, kernels.new_attention_scratch(n, 1, hd) if with_scratch else None)
    np.testing.assert_allclose(out, quant.attention_ref(q, k, v, n - 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("nthreads", "preset", "local_ranks", "load", "expected"),
    [(1, None, 1, 0.0, None), (2, None, 1, 0.0, "ACTIVE"), (2, "PASSIVE", 1, 0.0, "PASSIVE"), (2, None, 64, 0.0, None),
     (2, None, 1, 1.6, None)],
)
def test_configure_spins_only_with_several_threads(nthreads, preset, local_ranks, load, expected):
    # libgomp reads OMP_WAIT_POLICY once, as it loads: a fresh process shows what configure() chose.
    # 64 ranks on this host with 2 threads each are more threads than cores: they must not spin; nor
    # may threads on a host whose load average says other work holds a core (the load is set here,
    # so the test does not depend on what else this machine runs).
    if nthreads > len(os.sched_getaffinity(0)):
        pytest.skip("fewer CPUs than threads: configure() leaves the threads sleeping")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMPI_COMM_WORLD_LOCAL_SIZE"] = str(local_ranks)
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = (
        f"import os; os.getloadavg = lambda: ({load}, {load}, {load}); "
        f"from mpillama import kernels; kernels.configure({nthreads}); "
        "print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == str(expected)


def test_configure_rejects_bad_thread_counts():
    with pytest.raises(MpillamaError, match="nthreads"):
        kernels.configure(0)
    with pytest.raises(MpillamaError, match="nthreads"):
        kernels.configure(numba.config.NUMBA_NUM_THREADS + 1)


def test_every_kernel_is_cached_against_all_files_of_the_package(tmp_path):
    # numba alone re-checks only a kernel's own file, but the code it caches includes the helpers
    # called from sibling files (bits.py's exp inside attn.py's softmax): an edit to any file must
    # invalidate every kernel of the package
    for kernel in (attn._att_softmax, bits._exp_f32, kernels.q40._pack_vnni_rows):
        assert isinstance(kernel._cache._impl.locator, cache.PackageLocator)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    before = cache.package_stamp(tmp_path)
    (tmp_path / "b.py").write_text("y = 20\n")  # another size: a file's stat decides when it is read again
    assert cache.package_stamp(tmp_path) != before
