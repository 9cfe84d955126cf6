"""What an MPI launcher told this process through its environment (without starting MPI).

Every launcher that wires processes into one MPI job (Open MPI's mpirun, MPICH/Intel MPI's
hydra, MVAPICH, Slurm's srun) leaves its rank in one of these variables. A process without
any of them is a plain `python -m mpillama ...`: a one-rank job, which needs no MPI at all.
"""

from __future__ import annotations

import os

LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
FORCE_MPI = "MPILLAMA_MPI"  # "1": always start MPI (an unknown launcher); "0": never


def launched_rank() -> int | None:
    """This process's rank as the launcher set it, or None when no launcher started it."""
    for key in RANK_VARIABLES:
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return None


def needs_mpi() -> bool:
    """Start MPI only when a launcher started this process (or MPILLAMA_MPI=1 says so)."""
    forced = os.environ.get(FORCE_MPI, "")
    if forced in ("0", "1"):
        return forced == "1"
    return launched_rank() is not None


def ranks_on_this_host() -> int:
    """How many ranks of this job share this host, as the launcher says (1 if it does not)."""
    for key in LOCAL_SIZE_VARIABLES:
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1
