"""What the launcher's environment tells a process: its rank, whether to start MPI, its host's rank count."""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),  # no Open MPI launcher
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, None),  # one host: mpirun names the rank
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}, "1"),  # one rank per board
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, "1"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "1", mpienv.OPEN_MPI_FAILURE_REPORTS: "0"}, "0"),
])
def test_failure_reports_on_when_a_job_spans_hosts(env: dict[str, str], expected: str | None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", mpienv.OPEN_MPI_FAILURE_REPORTS):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mpienv.report_process_failures()
    assert os.environ.get(mpienv.OPEN_MPI_FAILURE_REPORTS) == expected  # the user's own setting is kept


def test_threads_spin_only_when_the_host_has_room() -> None:
    from mpillama.kernels.threads import spin_pays

    assert spin_pays(2, 1, 2, 0.1)  # an idle 2-core host, one rank of 2 threads
    assert not spin_pays(2, 1, 2, 1.5)  # another program keeps a core busy: sleep
    assert not spin_pays(2, 2, 2, 0.0)  # two ranks' threads oversubscribe the host
    assert not spin_pays(1, 1, 8, 0.0)  # one thread never waits for another


def test_srun_without_an_mpi_plugin_is_named(monkeypatch) -> None:
    from mpillama.mpienv import world_mismatch

    for key in list(os.environ):
        if key.startswith(("OMPI_", "PMI_", "PMIX_", "MV2_", "SLURM_")):
            monkeypatch.delenv(key)
    assert world_mismatch(1) is None  # no launcher at all
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    problem = world_mismatch(1)
    assert problem and "2 processes" in problem and "--mpi=pmix" in problem
    assert world_mismatch(2) is None  # srun --mpi=pmix: MPI sees the 2 tasks
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert world_mismatch(1) is None


def test_each_task_its_own_job_stops_with_one_line(models) -> None:
    """srun without --mpi=pmix: the task is told it is 1 of 2, MPI gives it a job of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_", "MV2_", "SLURM_"))}
    env.update(SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2")
    done = subprocess.run([sys.executable, "-m", "mpillama", "generate", "--model", str(models["tiny-q40"]),
                           "--prompt", "hi", "--steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--mpi=pmix" in lines[0], done.stderr


class Ended(Exception):
    """Stands for the end of the process in the test below."""


@pytest.mark.parametrize(("prte_launched", "expected"), [("1", "exit"), (None, "abort")])
def test_a_failing_rank_exits_under_prrte_and_aborts_elsewhere(prte_launched: str | None, expected: str,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # PRRTE ends the job on a non-zero exit (MPI Abort there printed a notice ending in a NUL byte);
    # srun without --kill-on-bad-exit would leave the other ranks running: they need MPI Abort
    from mpillama import comm, output
    from mpillama.errors import MpillamaError

    ended: list[tuple[str, int]] = []

    def end(how: str):  # noqa: ANN202
        def call(code: int) -> None:
            ended.append((how, code))
            raise Ended

        return call

    monkeypatch.setattr(output.os, "_exit", end("exit"))
    monkeypatch.setattr(comm, "abort", end("abort"))
    monkeypatch.delenv(mpienv.PRTE_LAUNCHED, raising=False)
    if prte_launched:
        monkeypatch.setenv(mpienv.PRTE_LAUNCHED, prte_launched)
    with pytest.raises(Ended):
        output.end_job(MpillamaError("the disk is full"), rank=1, n_ranks=2)
    assert ended == [(expected, 2)]
    assert capsys.readouterr().err == "mpillama: error: rank 1: the disk is full\n"
