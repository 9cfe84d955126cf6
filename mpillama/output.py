"""The one output path: what rank 0 says, and how one rank's failure ends the whole job.

Generated text goes to stdout, progress and speed to stderr, only from rank 0. An error is
one line on stderr, "mpillama: error: ...", tagged with the rank that hit it when that is
not rank 0. Imports comm (and so numpy) only inside end_job, for abort(): cli imports this
module, and must not load numpy before it has set the BLAS thread count (blas_threads.py).
Never imports mpi4py itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

from mpillama.errors import MpillamaError
from mpillama.mpienv import launcher_ends_job_on_failure


def say(rank: int, text: str, err: bool = True, end: str = "\n") -> None:
    """Print on rank 0 only: progress to stderr (err=True), generated text to stdout."""
    if rank == 0:
        stream = sys.stderr if err else sys.stdout
        stream.write(text + end)
        stream.flush()


def error_line(text: str, rank: int = 0) -> None:
    """One error line on stderr, from any rank, tagged with the rank unless it is 0 or already tagged."""
    prefix = "" if rank == 0 or text.startswith("rank ") else f"rank {rank}: "
    sys.stderr.write(f"mpillama: error: {prefix}{text}\n")
    sys.stderr.flush()


def exit_code(error: BaseException) -> int:
    """130 interrupted, 2 bad input (MpillamaError), 1 a bug."""
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 2 if isinstance(error, MpillamaError) else 1


def describe_error(error: BaseException) -> str:
    """Bad input in its own words; a bug with its type (its traceback is not for users)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return str(error) if isinstance(error, MpillamaError) else repr(error)


def end_job(error: BaseException, rank: int, n_ranks: int) -> NoReturn:
    """One rank failed while the others may be inside collectives: say it once and end every rank.

    With one rank this is an ordinary exit with the error's code. Under PRRTE (Open MPI 5's mpirun)
    the rank exits at once with the code and mpirun ends the others: MPI Abort would add Open MPI's
    "MPI_ABORT was invoked" notice, which Open MPI 5.0 forwards with its C string's NUL byte (it
    reached users as a NUL before this line). Other launchers get MPI Abort. The exit skips
    Python's own exit (MPI finalize would wait for ranks that are gone), so the output is flushed here.
    """
    error_line(describe_error(error), rank if not isinstance(error, KeyboardInterrupt) else 0)
    code = exit_code(error)
    if n_ranks > 1:
        if launcher_ends_job_on_failure():
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):  # a closed pipe must not stop the exit
                    stream.flush()
            os._exit(code)
        from mpillama.comm import abort

        abort(code)
    raise SystemExit(code)
