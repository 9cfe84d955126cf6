"""How the tests start real MPI jobs: mpirun with the flags this machine needs.

The launcher logic (finding mpirun, recognising Open MPI, its flags, the run-as-root variables)
is mpillama/launch.py; the tests always oversubscribe (more ranks than this machine's cores).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mpillama.launch import Launcher, find_launcher

ROOT = Path(__file__).resolve().parent.parent


def mpi_command(n: int, *args: str) -> list[str]:
    return Launcher(find_launcher(), oversubscribe=True).command_line(n, args)


def mpi_env(**extra: str) -> dict[str, str]:
    return Launcher(find_launcher()).env() | {"PYTHONPATH": str(ROOT), **extra}


def run_mpi(n: int, *args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mpi_command(n, *args), env=mpi_env(**env), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def run_mpillama(n: int, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return run_mpi(n, sys.executable, "-m", "mpillama", *args, timeout=timeout, **env)
