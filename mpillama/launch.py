"""How to start an MPI job from outside it: find the launcher, recognise Open MPI, build the command.

Used by the sweep (which starts one job per grid point) and by the tests. Never imports mpi4py:
the process that launches is not a rank.

Open MPI refuses to run as root without two environment variables and refuses more ranks than
slots without --oversubscribe, and binds each rank to one core by default (which would put all
numba threads of a rank on that core); MPICH's mpiexec and Slurm's srun need none of this.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from mpillama.errors import MpillamaError

ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def find_launcher(command: str | None = None) -> str:
    """The launcher's full path: command if given, else mpirun or mpiexec on PATH."""
    for name in [command] if command else ["mpirun", "mpiexec"]:
        path = shutil.which(name)
        if path:
            return path
    if command:
        raise MpillamaError(f"launcher {command!r} not found on PATH: install it or give its full path")
    raise MpillamaError("no mpirun or mpiexec on PATH: install an MPI (pip install -e '.[mpi]') "
                        "or name a launcher such as srun")


@lru_cache(maxsize=None)
def is_open_mpi(launcher: str) -> bool:
    """Whether launcher is Open MPI's mpirun/mpiexec (Open MPI 4: OpenRTE, 5: PRRTE)."""
    try:
        done = subprocess.run([launcher, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = done.stdout + done.stderr
    return any(mark in text for mark in ("Open MPI", "OpenRTE", "PRRTE", "prterun"))


@dataclass(frozen=True)
class Launcher:
    """A launcher and the extra arguments it gets before the program, e.g. ('--hostfile', 'rocks')."""

    command: str  # full path, from find_launcher
    args: tuple[str, ...] = field(default=())
    oversubscribe: bool = False  # Open MPI only: allow more ranks than slots

    @property
    def open_mpi(self) -> bool:
        return is_open_mpi(self.command)

    def command_line(self, n_ranks: int, program: Sequence[str]) -> list[str]:
        flags: list[str] = []
        if self.open_mpi:
            flags += ["--oversubscribe"] if self.oversubscribe else []
            # threads of one rank need more than the one core Open MPI binds it to; args may choose otherwise
            flags += [] if "--bind-to" in self.args else ["--bind-to", "none"]
        return [self.command, "-n", str(n_ranks), *flags, *self.args, *program]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """base (default os.environ) plus what Open MPI needs to run as root, when we are root."""
        env = dict(os.environ if base is None else base)
        if self.open_mpi and os.geteuid() == 0:
            env.update(ROOT_ENV)
        return env
