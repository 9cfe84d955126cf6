"""How many threads numpy's BLAS may start, decided from the command line before numpy loads.

OpenBLAS (and MKL, BLIS) read their thread count from the environment once, as the library
loads: set later, the variables do nothing, and every rank starts a BLAS thread per core next
to its numba threads. So the entry points (mpillama/__main__.py, cli.main for the console
script) call limit_blas_threads before anything imports numpy; this module imports only os
and sys to stay importable that early.
"""

from __future__ import annotations

import os
import sys

BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
MODEL_COMMANDS = ("generate", "chat", "serve", "bench")  # the commands that run the model (and take --nthreads)
NTHREADS_FLAG = "--nthreads"


def nthreads_flag(argv: list[str]) -> int | None:
    """The value of --nthreads in argv (also --nthreads=N and the prefixes argparse accepts), or None.

    A value that is not a whole number is left to argparse, which reports it.
    """
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if len(name) < len("--nt") or not NTHREADS_FLAG.startswith(name):  # --n alone is ambiguous (--no-bos)
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        try:
            return int(value)
        except ValueError:
            return None
    return None


def limit_blas_threads(argv: list[str]) -> None:
    """For a command that runs the model: BLAS follows --nthreads (1 when not given), like the
    numba kernels. The user's own settings of these variables win; other commands (sweep,
    which hands the environment to the ranks it launches; synth; trace) leave it untouched.

    Does nothing once numpy is loaded: its BLAS has started its threads already, and the
    variables would only leak into the processes this one starts.
    """
    if "numpy" in sys.modules or not argv or argv[0] not in MODEL_COMMANDS:
        return
    n = nthreads_flag(argv[1:])
    for var in BLAS_VARIABLES:
        os.environ.setdefault(var, str(n if n and n > 0 else 1))
