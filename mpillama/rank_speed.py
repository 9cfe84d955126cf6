"""--rank-weights auto: how fast this rank's kernels run, measured at start-up.

The shares of the slice plan follow these figures, so a slower board (or a busy rank 0) gets less.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from mpillama import kernels
from mpillama.quant import quantize_q40

def measure_rank_speed(throttle: float = 1.0, seconds: float = 0.3, stream_mb: float = 0.0) -> float:
    """G weights/s of this rank's Q40 kernel on 2048x2048 matvecs.

    stream_mb 0: one matrix, repeated (in cache: the kernel's own speed, for --rank-weights auto's
    relative shares); otherwise the matvecs rotate over copies totalling at least stream_mb, so
    the weights come from memory, as a model's do (--sync auto's cost of replicated attention: an
    in-cache figure made it several times too cheap). throttle: report that many times slower
    (faults.throttle: a test's slow rank).
    """
    rng = np.random.default_rng(0)
    w = kernels.pack_q40(quantize_q40(rng.standard_normal((2048, 2048), dtype=np.float32)))
    copies = [w] + [replace(w, qs=w.qs.copy()) for _ in range(int(stream_mb * 1e6 // w.qs.nbytes))]
    acts = kernels.new_activations(1, 2048)
    kernels.quantize_activations(acts, rng.standard_normal((1, 2048), dtype=np.float32))
    out = np.zeros((1, 2048), dtype=np.float32)
    kernels.matmul_q40(out, w, acts, 1)  # compile / warm up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        kernels.matmul_q40(out, copies[n % len(copies)], acts, 1)
        n += 1
    elapsed = (time.perf_counter() - start) * throttle
    return n * 2048 * 2048 / elapsed / 1e9
