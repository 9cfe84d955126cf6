"""Q80 x Q40 (and Q80 x Q8_0-weight) matmul and attention speed against baselines measured in the same run.

Usage: python bench/kernels.py [--threads N] [--shapes 2048x2048,...] [--layouts vnni,tiles]
                               [--kquant q4_k,q6_k,q5_k] [--attention] [--scaling] [--json] [--asm]

Matmul: for each Llama-3.2-1B shape (rows x cols) and each Q40 layout this machine can run, it times
  decode   one token: the Q40 kernel vs numpy's float32 matrix-vector product;
  prefill  16 and 64 tokens: the Q40 kernel vs numpy's float32 matrix product;
and the same for Q8_0 weights kept as stored (layouts q80-vnni on x86-vnni, q80-rows anywhere:
kernels/q80w.py; the q40_* fields then hold the Q8_0 kernel's figures), with GB/s of weight bytes read,
with weights streaming from memory (each timed pass rotates through copies of the matrix
totalling >= --stream-mb, more than the caches hold), and decode again with one matrix
repeated ("hot": in cache when it fits). Figures are G weights/s (G weight-columns/s for
T tokens: rows * cols * T / time) and ratios to numpy.
K-quants (--kquant KINDS): for each shape and kind, the K-quant matmul (this process's kernel
path) from memory, decode and prefill (--tokens), as G weights/s, GB/s of the GGML file bytes
it covers, and ratios to numpy float32 and to the Q40 kernel (its default layout), each timed
alternating with the K-quant kernel. With --kquant the Q40 table is skipped (--kquant-only is
implied); the llama3.2-1b shapes are 2048x2048,8192x2048,2048x8192.
Model (--gguf FILE): one decode token's matmuls over every 2-D Q4_0/Q4_K/Q5_K/Q6_K tensor of the file
(the output head, or the tied embedding table in its place) in its own type, weights from memory:
ms per token and GB/s of file bytes, best and median of --repeat rounds.
Attention (--attention): one decode token of the Llama-3.2-1B shape (32 query heads, 8 KV heads,
head_dim 64) at several positions, caches streaming from memory (16 layers' worth rotated),
against the time to read the same K and V bytes once in order (ratio 1.0 = memory speed) and
against the previous online-softmax kernel (one query head at a time).
Scaling (--scaling, with --threads N > 1): for 1..N threads, the machine's memory read
bandwidth (a numba sum over --stream-mb * 4 of floats, rows split over the threads) and the
decode kernel on the output-head shape from memory, as G weights/s and as the GB/s of Q40
bytes it reads: decode is bound by that bandwidth, so this is the ceiling for threads.
Assembly (--asm; --shapes '' for nothing else): per layout this CPU runs, the hot loop of each Q40
kernel of its kernel path, compiled afresh (tests/aarch64/asm.py finds and counts it): instructions
per iteration, multiply-adds (vector products, weights and scales), per instruction, and stack
reloads. For aarch64, under emulation: python tests/aarch64/run.py -- bench/kernels.py --asm --shapes ''
Warm-up passes come first; the two timed sides alternate, so load from other processes hits both.
Say whether the machine was idle (the load average is printed).

Owns nothing the package imports; it imports mpillama.kernels (and its attn.py and q40.py) and, for
--asm, tests/aarch64/asm.py only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SHAPES = "2048x2048,512x2048,8192x2048,2048x8192,128256x2048"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="numba and BLAS threads (default 1)")
    p.add_argument("--shapes", default=SHAPES, help=f"rows x cols list (default {SHAPES}; '' for none)")
    p.add_argument("--layouts", default=None, help="layouts to time: vnni, tiles (Q40), q80-vnni, q80-rows (Q8_0) (default: every one this CPU runs)")
    p.add_argument("--tokens", default="16,64", help="prefill token counts (default 16,64)")
    p.add_argument("--stream-mb", type=float, default=256.0, help="bytes rotated per pass from memory (default 256)")
    p.add_argument("--min-seconds", type=float, default=0.25, help="least time spent timing each figure")
    p.add_argument("--kquant", default="", help="K-quant kinds to time instead of the Q40 table (e.g. q4_k,q6_k,q5_k)")
    p.add_argument("--gguf", default=None, help="also time one decode token's matmuls over every Q4_0/K-quant matrix of this GGUF file")
    p.add_argument("--attention", action="store_true", help="also time decode attention at long contexts")
    p.add_argument("--scaling", action="store_true", help="memory bandwidth and decode speed at 1..--threads threads")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--asm", action="store_true", help="also read the hot loops of the Q40 kernels in their assembly")
    return p.parse_args()


ARGS = parse_args()
# BLAS threads are fixed when numpy loads: set them before the import, so numpy gets the same count.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import platform  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import binding as llvm_binding  # noqa: E402

from mpillama import kernels, quant  # noqa: E402
from mpillama.kernels import attn, q40  # noqa: E402  (kernels timed or inspected alone)


@dataclass
class Row:
    shape: str
    layout: str
    case: str  # decode | prefill
    tokens: int
    weights: str  # memory (rotating copies) | hot (one matrix repeated)
    q40_mb: float  # one matrix's size: 'hot' is in cache only when it fits the last-level cache
    f32_mb: float
    q40_ms: float
    f32_ms: float
    q40_gws: float  # G weight-columns/s
    f32_gws: float
    ratio: float  # q40 speed / numpy float32 speed
    gbs: float  # the quantized weights' bytes read per second (GB/s): Q40 18 bytes, Q80 34 bytes per 32 weights


@dataclass
class ScalingRow:
    threads: int
    read_gbs: float  # memory read bandwidth, GB/s
    decode_gws: float  # the Q40 decode kernel on the head shape, G weights/s
    decode_gbs: float  # the Q40 bytes it reads per second, GB/s
    share: float  # decode_gbs / read_gbs


@dataclass
class AttRow:
    position: int
    ms: float  # one layer, one token
    gbs: float  # K and V bytes read per second
    read_ms: float  # reading the same bytes once, in order
    online_ms: float  # the online-softmax kernel
    ratio_read: float  # read_ms / ms: 1.0 = memory speed
    ratio_online: float  # online_ms / ms


def best_pass_seconds(a_pass, b_pass, min_seconds: float) -> tuple[float, float]:
    """Best a and b pass times. One warm-up pass each, then alternate the two until
    min_seconds have gone (at least 3 rounds), so load from other processes hits both alike."""
    a_pass()
    b_pass()
    best_a, best_b, spent, n = float("inf"), float("inf"), 0.0, 0
    while spent < min_seconds or n < 3:
        t0 = time.perf_counter()
        a_pass()
        t1 = time.perf_counter()
        b_pass()
        t2 = time.perf_counter()
        best_a, best_b, spent, n = min(best_a, t1 - t0), min(best_b, t2 - t1), spent + t2 - t0, n + 1
    return best_a, best_b


def l3_bytes() -> int | None:
    """The last-level cache size from sysfs (None if the system does not say)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 2**10, "M": 2**20}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * mult)
    return max(sizes) if sizes else None


def copy_q40(m: kernels.Q40Matrix) -> kernels.Q40Matrix:
    """An independent copy (other memory) of a packed matrix."""
    qs = m.qs.copy()
    d = qs[:, :, 256:].view("<u2") if m.layout == kernels.LAYOUT_VNNI else m.d.copy()
    return kernels.Q40Matrix(m.rows, m.cols, m.layout, qs, d)


def q40_copies(ggml: np.ndarray, layout: str, n: int) -> list[kernels.Q40Matrix]:
    m = kernels.pack_q40(ggml, layout)
    return [m] + [copy_q40(m) for _ in range(n - 1)]


def random_q40(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A random Q40 matrix as GGML bytes: random nibbles, scales 1e-3..1e-2."""
    nb = cols // 32
    ggml = np.empty((rows, nb, 18), np.uint8)  # (rows, nb, 18) Q4_0 blocks
    ggml[:, :, 2:] = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (rows, nb)).astype("<f2")  # (rows, nb) f16
    ggml[:, :, :2] = scales.view(np.uint8).reshape(rows, nb, 2)
    return ggml.reshape(rows, nb * 18)


def q80_copies(rows: int, cols: int, layout: str, n: int, rng: np.random.Generator) -> list[kernels.Q80Matrix]:
    """n independent packed copies of a random Q8_0 matrix (random int8 values, scales 1e-3..1e-2)."""
    w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.01)
    m = kernels.pack_q80w(quant.quantize_q80(w), layout)
    copies = [m]
    for _ in range(n - 1):
        qs = m.qs.copy()
        d = qs[:, :, 512:].view("<u2") if layout == "vnni" else m.d.copy()  # rows: f32 tiles
        copies.append(kernels.Q80Matrix(m.rows, m.cols, m.layout, qs, d))
    return copies


def measure_shape(rows: int, cols: int, layouts: list[str], tokens: list[int], rng: np.random.Generator) -> list[Row]:
    shape = f"{rows}x{cols}"
    q40_bytes = rows * cols // 32 * 18
    q80_bytes = rows * cols // 32 * 34
    f32_bytes = rows * cols * 4
    stream = ARGS.stream_mb * 2**20
    ggml = random_q40(rows, cols, rng)
    fs = [rng.random((rows, cols), dtype=np.float32) - 0.5 for _ in range(max(1, int(np.ceil(stream / f32_bytes))))]
    t_max = max([1] + tokens)
    acts = kernels.new_activations(t_max, cols)
    x = rng.standard_normal((t_max, cols)).astype(np.float32)  # (t_max, cols) f32
    kernels.quantize_activations(acts, x)
    rows_out: list[Row] = []

    def one(layout: str, case: str, T: int, weights: str, q_list, f_list) -> None:
        out_q = np.empty((T, rows), np.float32)  # (T, rows) f32
        out_f = np.empty((T, rows), np.float32)
        xf = x[:T]
        q80 = layout.startswith("q80-")
        matmul, q_bytes = (kernels.matmul_q80w, q80_bytes) if q80 else (kernels.matmul_q40, q40_bytes)

        def q_pass() -> None:
            for m in q_list:
                matmul(out_q, m, acts, T)

        def f_pass() -> None:
            for w in f_list:
                np.matmul(xf, w.T, out=out_f)

        tq, tf = best_pass_seconds(q_pass, f_pass, ARGS.min_seconds)
        tq, tf = tq / len(q_list), tf / len(f_list)
        work = rows * cols * T / 1e9
        sizes = (q_bytes / 2**20, f32_bytes / 2**20)
        rows_out.append(Row(shape, layout, case, T, weights, *sizes, tq * 1e3, tf * 1e3, work / tq, work / tf, tf / tq,
                            q_bytes / tq / 1e9))

    for layout in layouts:
        if layout.startswith("q80-"):
            qs = q80_copies(rows, cols, layout[4:], max(1, int(np.ceil(stream / q80_bytes))), rng)
        else:
            qs = q40_copies(ggml, layout, max(1, int(np.ceil(stream / q40_bytes))))
        one(layout, "decode", 1, "memory", qs, fs)
        for T in tokens:
            one(layout, "prefill", T, "memory", qs, fs)
        one(layout, "decode", 1, "hot", qs[:1], fs[:1])
        del qs
    return rows_out


@numba.njit(cache=True, fastmath=True)
def _read_in_order(k, v):  # pragma: no cover - timed, not tested
    # k, v (positions, n_kv, hd) f32 -> their sum: reads the bytes once, in order (the memory-speed baseline)
    s = np.float32(0.0)
    kf, vf = k.reshape(-1), v.reshape(-1)
    for i in range(kf.shape[0]):
        s += kf[i] + vf[i]
    return s


def measure_attention(positions: list[int], rng: np.random.Generator) -> list[AttRow]:
    n_heads, n_kv, hd, layers = 32, 8, 64, 16
    rows: list[AttRow] = []
    for pos in positions:
        n = pos + 1
        q = rng.standard_normal((1, n_heads, hd)).astype(np.float32)  # (1, n_heads, hd) f32
        ks = [rng.standard_normal((n, n_kv, hd)).astype(np.float32) for _ in range(layers)]  # (n, n_kv, hd) each
        vs = [rng.standard_normal((n, n_kv, hd)).astype(np.float32) for _ in range(layers)]
        out = np.zeros((1, n_heads, hd), np.float32)
        scratch = kernels.new_attention_scratch(n, n_heads, hd)

        def att() -> None:
            for k, v in zip(ks, vs):
                kernels.attention(out, q, k, v, pos, 1, scratch)

        def read() -> None:
            for k, v in zip(ks, vs):
                _read_in_order(k, v)

        def online() -> None:
            for k, v in zip(ks, vs):
                attn._attention_serial(out, q, k, v, pos, 1)

        t_att, t_read = best_pass_seconds(att, read, ARGS.min_seconds)
        _, t_online = best_pass_seconds(att, online, ARGS.min_seconds)
        t_att, t_read, t_online = t_att / layers, t_read / layers, t_online / layers
        nbytes = 2 * n * n_kv * hd * 4
        rows.append(AttRow(pos, t_att * 1e3, nbytes / t_att / 1e9, t_read * 1e3, t_online * 1e3,
                           t_read / t_att, t_online / t_att))  # fmt: skip
    return rows


# the kernels whose hot loops --asm reads, per kernel path and layout (decode, then prefill)
ASM_KERNELS = {
    ("x86-vnni", "vnni"): ["_q40v_one", "_q40v_split", "_q40v_eight", "_q40v_four", "_q40v_single"],
    ("arm-sdot", "vnni"): ["_q40s_one", "_q40v_split", "_q40s_pair", "_q40s_single"],
    ("any", "tiles"): ["_q40_tiles"],  # decode and prefill: one kernel
}


def without_cache() -> None:
    """The Q40 matmul kernels compile in this process instead of loading from numba's cache (cached
    code has no assembly to read, and a cached caller never asks for its callees)."""
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    from mpillama.kernels import arm, groups, portable, x86

    for module in (arm, groups, portable, q40, x86):
        for obj in vars(module).values():
            if isinstance(obj, Dispatcher):
                obj._cache = NullCache()


def asm_report() -> dict[str, dict[str, dict | None]]:
    """{layout: {kernel: its hot loop's mix (tests/aarch64/asm.py) or None}} for this CPU (needs without_cache()).

    A single-thread matmul of T = 1 and T = 15 (every prefill pass) compiles every kernel of the
    layout's path; each one's assembly is then read.
    """
    from tests.aarch64 import asm

    path = kernels.kernel_path()
    out: dict[str, dict[str, dict | None]] = {}
    rng = np.random.default_rng(0)
    for layout in [x for x in available_layouts() if x in (kernels.LAYOUT_TILES, kernels.LAYOUT_VNNI)]:  # Q40's
        m = kernels.pack_q40(random_q40(48, 64, rng), layout)
        acts = kernels.new_activations(15, 64)
        kernels.quantize_activations(acts, rng.standard_normal((15, 64)).astype(np.float32))
        for T in (1, 15):
            kernel, args = q40._kernel_call(np.zeros((T, 48), np.float32), m, acts, T, 1)
            kernel(*args)
        names = ASM_KERNELS.get((path, layout)) or ASM_KERNELS[("any", layout)]
        out[layout] = {}
        for name in names:
            dispatcher = asm.find_kernel(name)
            found = asm.hot_loop(dispatcher.inspect_asm(dispatcher.signatures[0]))
            out[layout][name] = found.as_dict() if found else None
    return out


def print_asm(report: dict[str, dict[str, dict | None]]) -> None:
    """One line per kernel: where its hot loop's instructions go (multiply-adds: vector products per iteration)."""
    print(f"hot loops on {platform.machine()} {numba.config.CPU_NAME or llvm_binding.get_host_cpu_name()}, "
          f"kernel path {kernels.kernel_path()}:")
    for layout, found in report.items():
        for name, mix in found.items():
            if mix is None:
                print(f"  {layout:>5} {name:<13} no loop")
                continue
            top = ", ".join(f"{n} {op}" for op, n in sorted(mix["mnemonics"].items(), key=lambda kv: (-kv[1], kv[0])))
            count = f"{mix['instructions']:4} instructions, {mix['multiply_adds']:5} multiply-adds"
            print(f"  {layout:>5} {name:<13} {count} ({mix['per_instruction']:.2f} per instruction), "
                  f"{mix['stack_loads']} stack loads: {top}")


@numba.njit(cache=True, parallel=True, fastmath=True)
def _read_all(a, n_chunks):  # pragma: no cover - timed, not tested
    # a (rows, cols) f32 -> its sum, rows split in n_chunks over the threads: reads every byte once
    parts = np.zeros(n_chunks, np.float32)
    rows = a.shape[0]
    for c in numba.prange(n_chunks):
        s = np.float32(0.0)
        for r in range(c * rows // n_chunks, (c + 1) * rows // n_chunks):
            for i in range(a.shape[1]):
                s += a[r, i]
        parts[c] = s
    return parts.sum()


def measure_scaling(max_threads: int, rng: np.random.Generator) -> list[ScalingRow]:
    rows, cols = 128256, 2048
    layout = available_layouts()[0]
    ggml = random_q40(rows, cols, rng)
    qs = q40_copies(ggml, layout, max(2, int(np.ceil(ARGS.stream_mb * 2**20 / ggml.nbytes))))
    big = np.ones((int(ARGS.stream_mb * 2**20) // 4096, 4096), np.float32)  # (rows, 4096) f32, 4x --stream-mb
    acts = kernels.new_activations(1, cols)
    kernels.quantize_activations(acts, rng.standard_normal((1, cols)).astype(np.float32))
    out = np.empty((1, rows), np.float32)
    result = []
    for k in range(1, max_threads + 1):
        numba.set_num_threads(k)

        def decode() -> None:
            for m in qs:
                kernels.matmul_q40(out, m, acts, 1)

        def read() -> None:
            _read_all(big, 64)

        t_dec, t_read = best_pass_seconds(decode, read, ARGS.min_seconds)
        gws = rows * cols * len(qs) / t_dec / 1e9
        dec_gbs = ggml.nbytes * len(qs) / t_dec / 1e9
        read_gbs = big.nbytes / t_read / 1e9
        result.append(ScalingRow(k, read_gbs, gws, dec_gbs, dec_gbs / read_gbs))
    numba.set_num_threads(max_threads)
    return result


@dataclass
class KRow:
    shape: str
    kind: str
    case: str  # decode | prefill
    tokens: int
    file_mb: float  # the GGML bytes of the matrix
    ms: float
    gws: float  # G weight-columns/s
    gbs: float  # GB/s of file bytes (decode: the bandwidth it streams)
    vs_f32: float  # numpy f32 time / K-quant time
    vs_q40: float  # Q40 time / K-quant time


def random_kquant(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A random K-quant matrix as GGML bytes: random values and sub-block scales, f16 scales 1e-3."""
    bb = quant.KQUANT_BLOCK_BYTES[kind]
    ggml = rng.integers(0, 256, (rows, cols // 256, bb), dtype=np.uint8)  # (rows, nsb, bb) blocks
    half = np.full((rows, cols // 256), 1e-3, "<f2").view(np.uint8).reshape(rows, cols // 256, 2)
    for lo in ((208,) if kind == "q6_k" else (0, 2)):
        ggml[:, :, lo : lo + 2] = half
    return ggml.reshape(rows, -1)


def measure_kquant(rows: int, cols: int, kinds: list[str], tokens: list[int], rng: np.random.Generator) -> list[KRow]:
    shape = f"{rows}x{cols}"
    stream = ARGS.stream_mb * 2**20
    t_max = max([1] + tokens)
    acts = kernels.new_activations(t_max, cols)
    x = rng.standard_normal((t_max, cols)).astype(np.float32)  # (t_max, cols) f32
    kernels.quantize_activations(acts, x)
    q40s = q40_copies(random_q40(rows, cols, rng), q40.default_layout(), max(1, int(np.ceil(stream / (rows * cols // 32 * 18)))))
    fs = [rng.random((rows, cols), dtype=np.float32) - 0.5 for _ in range(max(1, int(np.ceil(stream / (rows * cols * 4)))))]
    out: list[KRow] = []
    for kind in kinds:
        ggml = random_kquant(kind, rows, cols, rng)
        m = kernels.pack_kquant(kind, ggml)
        ks = [m] + [kernels.KQuantMatrix(m.kind, m.rows, m.cols, m.w.copy()) for _ in range(int(np.ceil(stream / ggml.nbytes)) - 1)]
        for case, T in [("decode", 1)] + [("prefill", t) for t in tokens]:
            o = np.empty((T, rows), np.float32)  # (T, rows) f32

            def k_pass() -> None:
                for mk in ks:
                    kernels.matmul_kquant(o, mk, acts, T)

            def q_pass() -> None:
                for mq in q40s:
                    kernels.matmul_q40(o, mq, acts, T)

            def f_pass() -> None:
                for w in fs:
                    np.matmul(x[:T], w.T, out=o)

            tk, tf = best_pass_seconds(k_pass, f_pass, ARGS.min_seconds)
            tk2, tq = best_pass_seconds(k_pass, q_pass, ARGS.min_seconds)
            tk, tf, tq = min(tk, tk2) / len(ks), tf / len(fs), tq / len(q40s)
            out.append(KRow(shape, kind, case, T, ggml.nbytes / 2**20, tk * 1e3, rows * cols * T / tk / 1e9,
                            ggml.nbytes / tk / 1e9, tf / tk, tq / tk))
        ks.clear()  # before the next kind's copies are made
    return out


def measure_gguf(path: str, rounds: int = 10) -> dict:
    """One decode token's matmuls over every Q4_0/K-quant matrix of a GGUF file, in file order."""
    import collections

    from gguf import GGUFReader

    kinds = {"Q4_0": "q40", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}
    reader = GGUFReader(path)
    names = {t.name for t in reader.tensors}
    mats, counts, nbytes = [], collections.Counter(), 0
    for t in reader.tensors:
        if len(t.shape) < 2 or t.tensor_type.name not in kinds or (t.name == "token_embd.weight" and "output.weight" in names):
            continue
        data = np.asarray(t.data).reshape(int(t.shape[1]), -1)  # (rows, row bytes) uint8
        kind = kinds[t.tensor_type.name]
        mats.append((kind, kernels.pack_q40(data) if kind == "q40" else kernels.pack_kquant(kind, data)))
        counts[kind] += 1
        nbytes += data.nbytes
    rng = np.random.default_rng(0)
    acts = {c: kernels.new_activations(1, c) for c in {m.cols for _, m in mats}}
    for c, a in acts.items():
        kernels.quantize_activations(a, rng.standard_normal((1, c)).astype(np.float32))
    outs = [np.empty((1, m.rows), np.float32) for _, m in mats]  # (1, rows) f32 each

    def token() -> None:
        for (kind, m), o in zip(mats, outs):
            (kernels.matmul_q40 if kind == "q40" else kernels.matmul_kquant)(o, m, acts[m.cols], 1)

    token()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        token()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"file": path, "matrices": dict(counts), "file_mb": nbytes / 2**20, "best_ms": best * 1e3,
            "median_ms": float(np.median(times)) * 1e3, "gbs": nbytes / best / 1e9}


def available_layouts() -> list[str]:
    if ARGS.layouts:
        return ARGS.layouts.split(",")
    if kernels.kernel_path() == "portable":
        return [kernels.LAYOUT_TILES, "q80-rows"]
    q80 = ["q80-vnni", "q80-rows"] if kernels.kernel_path() == "x86-vnni" else ["q80-rows"]
    return [kernels.LAYOUT_VNNI, kernels.LAYOUT_TILES, *q80]


def main() -> None:
    kernels.configure(ARGS.threads)
    if ARGS.asm:
        without_cache()
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in ARGS.tokens.split(",") if t]
    shapes = [tuple(int(v) for v in s.split("x")) for s in ARGS.shapes.split(",") if s]
    layouts = available_layouts()
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    l3 = l3_bytes()
    results: list[Row] = []
    kq_kinds = [k for k in ARGS.kquant.split(",") if k]
    kq_results: list[KRow] = []
    for rows, cols in shapes if kq_kinds else []:
        new_k = measure_kquant(rows, cols, kq_kinds, tokens, rng)
        kq_results.extend(new_k)
        if not ARGS.json:
            for r in new_k:
                print(
                    f"{r.shape:>12} {r.kind:>5} {r.case:>7} T={r.tokens:<3} memory: {r.gws:6.1f} G/s ({r.ms:8.3f} ms, "
                    f"{r.gbs:5.1f} GB/s of file bytes)  vs numpy f32 {r.vs_f32:5.2f}x  vs q40 {r.vs_q40:5.2f}x",
                    flush=True,
                )
    for rows, cols in shapes if not kq_kinds else []:
        new = measure_shape(rows, cols, layouts, tokens, rng)
        results.extend(new)
        if not ARGS.json:
            for r in new:
                fits = ""
                if r.weights == "hot" and l3:
                    fits = f"  (fits L3 {l3 >> 20} MB: q40 {r.q40_mb <= l3 / 2**20}, f32 {r.f32_mb <= l3 / 2**20})"
                kind = "q80" if r.layout.startswith("q80-") else "q40"
                print(
                    f"{r.shape:>12} {r.layout:>8} {r.case:>7} T={r.tokens:<3} {r.weights:>6}: {kind} {r.q40_gws:6.1f} G/s"
                    f" ({r.q40_ms:8.3f} ms, {r.gbs:5.1f} GB/s)  numpy f32 {r.f32_gws:6.1f} G/s ({r.f32_ms:8.3f} ms)"
                    f"  ratio {r.ratio:5.2f}x" + fits,
                    flush=True,
                )
    gguf_row = measure_gguf(ARGS.gguf) if ARGS.gguf else None
    if gguf_row and not ARGS.json:
        g = gguf_row
        print(f"{g['file']}: {g['matrices']} ({g['file_mb']:.1f} MiB): one decode token's matmuls {g['best_ms']:.1f} ms "
              f"best, {g['median_ms']:.1f} ms median ({g['gbs']:.1f} GB/s of file bytes)", flush=True)
    att = measure_attention([512, 2000, 4000], rng) if ARGS.attention else []
    if att and not ARGS.json:
        for a in att:
            print(
                f"attention pos {a.position:5}: {a.ms:7.3f} ms/layer ({a.gbs:5.1f} GB/s of K,V)  reading them once "
                f"{a.read_ms:7.3f} ms (ratio {a.ratio_read:4.2f})  online kernel {a.online_ms:7.3f} ms "
                f"(ratio {a.ratio_online:5.2f}x)",
                flush=True,
            )
    scaling = measure_scaling(ARGS.threads, rng) if ARGS.scaling else []
    if scaling and not ARGS.json:
        for r in scaling:
            print(
                f"threads {r.threads}: memory read {r.read_gbs:5.1f} GB/s ({r.read_gbs / scaling[0].read_gbs:4.2f}x)  "
                f"decode 128256x2048 {r.decode_gws:5.1f} G/s ({r.decode_gws / scaling[0].decode_gws:4.2f}x) "
                f"= {r.decode_gbs:5.1f} GB/s of Q40, {r.share:4.0%} of the read bandwidth",
                flush=True,
            )
    asm = asm_report() if ARGS.asm else None
    meta = {
        "threads": ARGS.threads,
        "threading_layer": numba.threading_layer() if results or kq_results or gguf_row or att or scaling else None,
        "layouts": layouts,
        "kernel_path": kernels.kernel_path(),
        "machine": platform.machine(),
        "cpu": numba.config.CPU_NAME or llvm_binding.get_host_cpu_name(),
        "stream_mb": ARGS.stream_mb,
        "l3_bytes": l3,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if ARGS.json:
        import json

        doc = {"meta": meta, "asm": asm, "results": [asdict(r) for r in results], "attention": [asdict(a) for a in att],
               "kquant": [asdict(r) for r in kq_results], "gguf": gguf_row,
               "scaling": [asdict(r) for r in scaling]}
        print(json.dumps(doc, indent=1))
        return
    print(
        f"threads {meta['threads']} ({meta['threading_layer']}); 'memory' rotates >= {ARGS.stream_mb:.0f} MB of copies "
        f"per pass, 'hot' repeats one matrix; G/s = rows*cols*T / time; ratio = numpy time / q40 time; "
        f"load average {meta['load_average'][0]} -> {meta['load_average'][1]} (2 cores: > 0.5 means another "
        f"process ran); {meta['seconds']} s"
    )
    if asm:
        print_asm(asm)


if __name__ == "__main__":
    main()
