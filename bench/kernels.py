"""Q80 x Q40 matmul speed against numpy float32 on the same shapes, measured in the same run.

Usage: python bench/kernels.py [--threads N] [--shapes 2048x2048,...] [--json] [--asm]

For each Llama-3.2-1B shape (rows x cols) it times:
  decode   one token: the Q40 kernel vs numpy's float32 matrix-vector product;
  prefill  16 and 64 tokens: the Q40 kernel vs numpy's float32 matrix product;
with weights streaming from memory (each timed pass rotates through copies of the matrix
totalling >= --stream-mb, more than the caches hold), and decode again with one matrix
repeated ("hot": in cache when it fits). Figures are G weights/s (G weight-columns/s for
T tokens: rows * cols * T / time) and ratios to numpy. Warm-up passes come first.

Owns nothing the package imports; it imports mpillama.kernels and mpillama.quant only.
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
    p.add_argument("--shapes", default=SHAPES, help=f"rows x cols list (default {SHAPES})")
    p.add_argument("--tokens", default="16,64", help="prefill token counts (default 16,64)")
    p.add_argument("--stream-mb", type=float, default=256.0, help="bytes rotated per pass from memory (default 256)")
    p.add_argument("--min-seconds", type=float, default=0.25, help="least time spent timing each figure")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--asm", action="store_true", help="also compile the kernel uncached and count its vector ops")
    return p.parse_args()


ARGS = parse_args()
# BLAS threads are fixed when numpy loads: set them before the import, so numpy gets the same count.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from mpillama import kernels  # noqa: E402


@dataclass
class Row:
    shape: str
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


def best_pass_seconds(q_pass, f_pass, min_seconds: float) -> tuple[float, float]:
    """Best q40 and numpy pass times. One warm-up pass each, then alternate the two until
    min_seconds have gone (at least 3 rounds), so load from other processes hits both alike."""
    q_pass()
    f_pass()
    best_q, best_f, spent, n = float("inf"), float("inf"), 0.0, 0
    while spent < min_seconds or n < 3:
        t0 = time.perf_counter()
        q_pass()
        t1 = time.perf_counter()
        f_pass()
        t2 = time.perf_counter()
        best_q, best_f, spent, n = min(best_q, t1 - t0), min(best_f, t2 - t1), spent + t2 - t0, n + 1
    return best_q, best_f


def l3_bytes() -> int | None:
    """The last-level cache size from sysfs (None if the system does not say)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 2**10, "M": 2**20}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * mult)
    return max(sizes) if sizes else None


def q40_copies(rows: int, cols: int, n: int, rng: np.random.Generator) -> list[kernels.Q40Matrix]:
    """n independent copies of one random Q40 matrix (random nibbles, scales 1e-3..1e-2)."""
    nb = cols // 32
    ggml = np.empty((rows, nb, 18), np.uint8)  # (rows, nb, 18) Q4_0 blocks
    ggml[:, :, 2:] = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (rows, nb)).astype("<f2")  # (rows, nb) f16
    ggml[:, :, :2] = scales.view(np.uint8).reshape(rows, nb, 2)
    m = kernels.pack_q40(ggml.reshape(rows, nb * 18))
    return [m] + [kernels.Q40Matrix(m.rows, m.cols, m.qs.copy(), m.d.copy()) for _ in range(n - 1)]


def measure_shape(rows: int, cols: int, tokens: list[int], rng: np.random.Generator) -> list[Row]:
    shape = f"{rows}x{cols}"
    q40_bytes = rows * cols // 32 * 18
    f32_bytes = rows * cols * 4
    stream = ARGS.stream_mb * 2**20
    qs = q40_copies(rows, cols, max(1, int(np.ceil(stream / q40_bytes))), rng)
    fs = [rng.random((rows, cols), dtype=np.float32) - 0.5 for _ in range(max(1, int(np.ceil(stream / f32_bytes))))]
    t_max = max([1] + tokens)
    acts = kernels.new_activations(t_max, cols)
    x = rng.standard_normal((t_max, cols)).astype(np.float32)  # (t_max, cols) f32
    kernels.quantize_activations(acts, x)
    rows_out: list[Row] = []

    def one(case: str, T: int, weights: str, q_list, f_list) -> None:
        out_q = np.empty((T, rows), np.float32)  # (T, rows) f32
        out_f = np.empty((T, rows), np.float32)
        xf = x[:T]

        def q_pass() -> None:
            for m in q_list:
                kernels.matmul_q40(out_q, m, acts, T)

        def f_pass() -> None:
            for w in f_list:
                np.matmul(xf, w.T, out=out_f)

        tq, tf = best_pass_seconds(q_pass, f_pass, ARGS.min_seconds)
        tq, tf = tq / len(q_list), tf / len(f_list)
        work = rows * cols * T / 1e9
        sizes = (q40_bytes / 2**20, f32_bytes / 2**20)
        rows_out.append(Row(shape, case, T, weights, *sizes, tq * 1e3, tf * 1e3, work / tq, work / tf, tf / tq))

    one("decode", 1, "memory", qs, fs)
    for T in tokens:
        one("prefill", T, "memory", qs, fs)
    one("decode", 1, "hot", qs[:1], fs[:1])
    return rows_out


def asm_report() -> str:
    """Compile the Q40 tile kernel afresh (cached code cannot be inspected) and count its key vector ops."""
    import re
    from collections import Counter

    fresh = numba.njit(fastmath=True, error_model="numpy")(kernels._q40_tiles.py_func)
    m = kernels.pack_q40(np.zeros((kernels.TILE, 18), np.uint8))
    a = kernels.new_activations(1, 32)
    out = np.zeros((1, kernels.TILE), np.float32)
    fresh(out, m.qs, m.d, a.qs, a.d, a.corr, 1, kernels.TILE, 0, 1, a.isum[0], a.wsf[0], a.wsu[0], a.acc[0])
    asm = fresh.inspect_asm(fresh.signatures[0])
    wanted = r"vpmullw|vpmaddwd|vpdpbusd|vpmaddubsw|vpaddw|vfmadd\w*ps"
    ops = Counter(re.findall(rf"^\s+({wanted})\s+[^\n]*?(zmm|ymm|xmm)", asm, re.M))
    return ", ".join(f"{op} {reg}: {n}" for (op, reg), n in sorted(ops.items())) or "none of the expected vector ops"


def main() -> None:
    kernels.configure(ARGS.threads)
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in ARGS.tokens.split(",") if t]
    shapes = [tuple(int(v) for v in s.split("x")) for s in ARGS.shapes.split(",")]
    t0 = time.perf_counter()
    l3 = l3_bytes()
    results: list[Row] = []
    for rows, cols in shapes:
        results.extend(measure_shape(rows, cols, tokens, rng))
        if not ARGS.json:
            for r in results[-(len(tokens) + 2) :]:
                fits = ""
                if r.weights == "hot" and l3:
                    fits = f"  (fits L3 {l3 >> 20} MB: q40 {r.q40_mb <= l3 / 2**20}, f32 {r.f32_mb <= l3 / 2**20})"
                print(
                    f"{r.shape:>12} {r.case:>8} T={r.tokens:<3} {r.weights:>6}: q40 {r.q40_gws:6.1f} G/s"
                    f" ({r.q40_ms:8.3f} ms)  numpy f32 {r.f32_gws:6.1f} G/s ({r.f32_ms:8.3f} ms)  ratio {r.ratio:5.2f}x"
                    + fits,
                    flush=True,
                )
    asm = asm_report() if ARGS.asm else None
    meta = {
        "threads": ARGS.threads,
        "threading_layer": numba.threading_layer(),
        "stream_mb": ARGS.stream_mb,
        "l3_bytes": l3,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if ARGS.json:
        import json

        print(json.dumps({"meta": meta, "asm": asm, "results": [asdict(r) for r in results]}, indent=1))
        return
    print(
        f"threads {meta['threads']} ({meta['threading_layer']}); 'memory' rotates >= {ARGS.stream_mb:.0f} MB of copies "
        f"per pass, 'hot' repeats one matrix; G/s = rows*cols*T / time; ratio = numpy time / q40 time; "
        f"{meta['seconds']} s"
    )
    if asm:
        print(f"q40 kernel asm: {asm}")


if __name__ == "__main__":
    main()
