"""How the tests start real MPI jobs: mpirun with the flags this machine needs.

Open MPI refuses to run as root without two environment variables, and refuses more ranks
than cores without --oversubscribe; MPICH needs neither. Binding is off so that ranks
sharing a small machine are not pinned to the same core.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launcher() -> str:
    for name in ("mpirun", "mpiexec"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no mpirun or mpiexec on PATH: install the project with its MPI extra: pip install -e '.[mpi,test]'")


def is_open_mpi(mpirun: str) -> bool:
    out = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout + ""
    return "Open MPI" in out or "OpenRTE" in out or "PRRTE" in out or "prterun" in out


def mpi_command(n: int, *args: str) -> list[str]:
    mpirun = launcher()
    flags = ["--oversubscribe", "--bind-to", "none"] if is_open_mpi(mpirun) else []
    return [mpirun, "-n", str(n), *flags, *args]


def mpi_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def run_mpi(n: int, *args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mpi_command(n, *args), env=mpi_env(**env), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def run_mpillama(n: int, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return run_mpi(n, sys.executable, "-m", "mpillama", *args, timeout=timeout, **env)
