"""What the launcher's environment tells a process: its rank, whether to start MPI, its host's rank count."""

from __future__ import annotations

import pytest

from mpillama import mpienv


@pytest.mark.parametrize(("env", "expected"), [
    ({}, 1),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4),
    ({"MPI_LOCALNRANKS": "3"}, 3),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "2"}, 2),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
    ({"SLURM_STEP_TASKS_PER_NODE": "8", "SLURM_NODEID": "0"}, 8),
    ({"SLURM_STEP_TASKS_PER_NODE": "garbled", "SLURM_NODEID": "0"}, 1),
])
def test_ranks_on_this_host_from_the_launcher(env: dict[str, str], expected: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (*mpienv.LOCAL_SIZE_VARIABLES, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert mpienv.ranks_on_this_host() == expected


@pytest.mark.parametrize(("env", "rank", "mpi"), [
    ({}, None, False),
    ({"OMPI_COMM_WORLD_RANK": "3"}, 3, True),
    ({"PMI_RANK": "0"}, 0, True),
    ({"SLURM_PROCID": "1"}, 1, True),
    ({mpienv.FORCE_MPI: "1"}, None, True),
    ({"PMIX_RANK": "2", mpienv.FORCE_MPI: "0"}, 2, False),
])
def test_mpi_starts_only_under_a_launcher(env: dict[str, str], rank: int | None, mpi: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (*mpienv.RANK_VARIABLES, mpienv.FORCE_MPI):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert (mpienv.launched_rank(), mpienv.needs_mpi()) == (rank, mpi)
