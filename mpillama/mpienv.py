"""What an MPI launcher told this process through its environment (without starting MPI).

Every launcher that wires processes into one MPI job (Open MPI's mpirun, MPICH/Intel MPI's
hydra, MVAPICH, Slurm's srun) leaves its rank in one of these variables. A process without
any of them is a plain `python -m mpillama ...`: a one-rank job, which needs no MPI at all.
"""

from __future__ import annotations

import os

LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
# How many processes the launcher started (Slurm's per step first: SLURM_NTASKS is the allocation's)
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
FORCE_MPI = "MPILLAMA_MPI"  # "1": always start MPI (an unknown launcher); "0": never
# Open MPI's run-time switch for process-failure reporting (ULFM, built into Open MPI 5)
OPEN_MPI_FAILURE_REPORTS = "OMPI_MCA_mpi_ft_enable"
PRTE_LAUNCHED = "PRTE_LAUNCHED"  # "1" in every process PRRTE started (Open MPI 5's mpirun, prterun)


def launched_rank() -> int | None:
    """This process's rank as the launcher set it, or None when no launcher started it."""
    for key in RANK_VARIABLES:
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return None


def launched_size() -> int | None:
    """How many processes the launcher says this job has, or None when it does not say."""
    for key in SIZE_VARIABLES:
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def world_mismatch(mpi_size: int) -> str | None:
    """Why this job is not one MPI job although a launcher started several processes, or None.

    srun without an MPI plugin (Slurm's default MpiDefault=none) starts every task as an MPI job of
    its own: each would be a rank 0 writing the same trace and the same output.
    """
    tasks = launched_size()
    if mpi_size != 1 or tasks is None or tasks == 1:
        return None
    if "SLURM_STEP_NUM_TASKS" in os.environ or "SLURM_PROCID" in os.environ:
        fix = ("srun started each task without MPI's process manager: run `srun --mpi=pmix ...` (or pmi2; "
               "`srun --mpi=list` shows what this Slurm has), or set MpiDefault=pmix in slurm.conf")
    else:
        fix = "the launcher and the MPI library mpi4py was built against do not match: use that library's mpirun"
    return f"the launcher started {tasks} processes but MPI sees a job of 1: {fix}"


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
    return slurm_tasks_on_this_node() or 1


def slurm_tasks_on_this_node() -> int | None:
    """srun's tasks on this node: SLURM_STEP_TASKS_PER_NODE ("2(x3),1": 2 on each of the first
    three nodes, 1 on the fourth) at index SLURM_NODEID; None outside a Slurm job step."""
    spec, node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", ""), os.environ.get("SLURM_NODEID", "")
    if not spec or not node.isdigit():
        return None
    counts: list[int] = []
    for part in spec.split(","):
        tasks, _, repeat = part.partition("(x")
        if not tasks.isdigit() or (repeat and not repeat.rstrip(")").isdigit()):
            return None
        counts += [int(tasks)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[int(node)] if int(node) < len(counts) else None


def report_process_failures() -> None:
    """Before MPI starts: under Open MPI, when the job spans hosts, turn on its reporting of failed
    processes (ULFM's mpi_ft_enable), unless the user set it.

    Without it, a rank killed on one host makes Open MPI's TCP transport abort the job from
    whichever peer first sees that rank's socket close, and the job's last words name that peer,
    not the rank that died. With it, the failure comes back to the waiting ranks as an MPI error,
    and comm.Comm names the failed rank and its host. Within one host nothing changes: there
    mpirun itself notices the exit first and names the rank.
    """
    size, local = os.environ.get("OMPI_COMM_WORLD_SIZE", ""), os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "")
    if size.isdigit() and local.isdigit() and int(local) < int(size):
        os.environ.setdefault(OPEN_MPI_FAILURE_REPORTS, "1")


def launcher_ends_job_on_failure() -> bool:
    """Whether the launcher ends every rank of the job as soon as one exits with a non-zero code, so
    that a failing rank may simply exit: PRRTE does (unless run with --enable-recovery). Elsewhere
    (srun ends a step only with --kill-on-bad-exit) a failing rank must call MPI Abort."""
    return os.environ.get(PRTE_LAUNCHED) == "1"
