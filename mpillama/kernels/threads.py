"""configure(nthreads): numba's threading layer and thread count, set once at start-up.

Owns the choice of OpenMP (where libgomp loads) and of its wait policy; the kernels read the
count back with numba.get_num_threads(). Imports numba, mpillama.{errors, mpienv} and bits.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numba

from mpillama.errors import MpillamaError
from mpillama.kernels.bits import _f16_value
from mpillama.mpienv import ranks_on_this_host


def _omp_available() -> bool:
    """True when numba's OpenMP threading layer can load (libgomp present)."""
    try:
        from numba.np.ufunc import omppool  # noqa: F401  (only probing that it loads)
    except ImportError:
        return False
    return True


def spin_pays(nthreads: int, ranks_here: int, cpus: int, load: float) -> bool:
    """Whether this rank's threads may busy-wait between parallel regions: only with several threads,
    and only when this host's ranks' threads and the load already running (the 1-minute load
    average: at start-up it is other programs', ours have not run yet) fit its cores. A spinning
    thread that shares its core with other work made a 2-thread bench 100x slower than sleeping."""
    return nthreads > 1 and nthreads * ranks_here + round(load) <= cpus  # load in whole busy cores


def configure(nthreads: int) -> None:
    """Pick the omp threading layer when available (before any parallel launch) and set numba's threads.

    Under omp a parallel launch costs ~1-2 us against 20-40 us under numba's default workqueue.
    With more than one thread, and no more threads on this host (over all its ranks) than the
    CPUs this process may run on, OpenMP's threads busy-wait between parallel regions
    (OMP_WAIT_POLICY=ACTIVE, unless the environment sets it): a decode token opens ~80
    regions, and threads that sleep in between take so long to wake that 2 threads decoded
    only ~1.15x faster than 1 (~1.6x spinning). The price: the threads spin on their cores
    between regions, also while the program waits for input; set OMP_WAIT_POLICY=PASSIVE to
    trade speed for that. Ranks that share a host with more threads than cores, or a host already
    busy with other work, always sleep: spinning there would take the cores others compute on.
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if nthreads < 1 or nthreads > limit:
        raise MpillamaError(
            f"--nthreads {nthreads}: numba can run 1..{limit} threads here; "
            f"choose one in that range (or set NUMBA_NUM_THREADS to raise the limit)"
        )
    try:
        numba.threading_layer()  # raises ValueError until the first parallel launch
        started = True
    except ValueError:
        started = False
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not started and spin_pays(nthreads, ranks_on_this_host(), cpus, os.getloadavg()[0]):
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # libgomp reads it once, as it loads (below)
    if not started and _omp_available():
        numba.config.THREADING_LAYER = "omp"
    numba.set_num_threads(nthreads)
    # numba's one-off start-up (its runtime and type registries, ~0.4 s of Python) happens at the
    # first kernel call: have it here, before the loader runs the tokenizer in a second thread
    _f16_value(0)


@contextmanager
def using_threads(n: int) -> Iterator[int]:
    """Run the block on n numba threads (at most numba's limit), then restore the count.

    For the warm-up only: on a cold cache it runs passes on 1 and on 2 threads whatever --nthreads
    is, so that numba compiles both kinds of kernel now rather than in a later run."""
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield numba.get_num_threads()
    finally:
        numba.set_num_threads(before)
