"""jobs/*.slurm for real, on a one-node Slurm this test starts (slurmctld, slurmd, munge; as root).

Slurm is a system package, not a Python one: .ci/run installs Debian's slurm-wlm, libpmix2 and munge
when it runs as root; elsewhere these tests skip with the command that installs them. The cluster
has its own configuration (SLURM_CONF), ports and spool folders under the test's tmp folder, and
keeps Slurm's default MpiDefault=none, so the jobs' `srun --mpi=pmix` is what wires the ranks.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from tests.mpi_launch import ROOT

DAEMONS = ("slurmctld", "slurmd", "sbatch", "srun", "sinfo", "munged", "munge")
INSTALL = "apt-get install slurm-wlm libpmix2 munge (as root)"
JOB_TIMEOUT = 900  # s: the first job compiles the kernels on a busy 2-core machine


def _missing() -> str | None:
    """Why this machine cannot run a one-node Slurm, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing): {INSTALL}"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


def _munge_works() -> bool:
    return subprocess.run(["munge", "-n"], capture_output=True).returncode == 0


def _start_munge() -> None:
    """munged as Debian runs it (user munge, socket in /run/munge), unless one already answers."""
    if _munge_works():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        shutil.chown(key, "munge", "munge")
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    deadline = time.monotonic() + 30
    while not _munge_works():
        assert time.monotonic() < deadline, "munged started but does not answer `munge -n`"
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(folder: Path, host: str) -> Path:
    spool = folder / "spool"
    for sub in ("ctld", "d"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=mpillama-test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmUser=root
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmdSpoolDir={spool}/d
StateSaveLocation={spool}/ctld
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
NodeName={host} CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    return conf


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running one-node Slurm; yields the environment its clients and jobs use."""
    why = _missing()
    if why:
        pytest.skip(why)
    _start_munge()
    folder = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    conf = _slurm_conf(folder, host)
    bin_dir = folder / "bin"  # the jobs call `python`: make it this interpreter, whatever PATH holds
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    daemons = [subprocess.Popen([d, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for d in ("slurmctld", "slurmd")]
    try:
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if "idle" in state:
                break
            if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                logs = "\n".join((folder / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log")
                                 if (folder / f).exists())
                pytest.fail(f"the one-node Slurm did not come up (sinfo: {state.strip()!r}):\n{logs}")
            time.sleep(0.5)
        yield env
    finally:
        for d in daemons:
            d.terminate()
        for d in daemons:
            try:
                d.wait(10)
            except subprocess.TimeoutExpired:
                d.kill()


def sbatch(env: dict[str, str], cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Submit, wait for the job to end; (sbatch's result, the job's output file's text)."""
    done = subprocess.run(["sbatch", "--wait", "--parsable", "--nodes=1", "--ntasks-per-node=2",
                           "--cpus-per-task=1", "--output=job-%j.out", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    job = done.stdout.strip().split(";")[0]
    out = cwd / f"job-{job}.out"
    return done, out.read_text() if out.exists() else ""


def test_generate_job_runs_two_ranks_wired_by_pmix(slurm: dict[str, str], models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    done, out = sbatch(slurm, tmp_path, str(ROOT / "jobs" / "generate.slurm"), str(models["tiny-q40"]), "Hello")
    assert done.returncode == 0, f"{done.stderr}\n{out[-3000:]}"
    traces = list((tmp_path / "traces").glob("generate-*.h5"))
    assert len(traces) == 1, out[-3000:]
    with h5py.File(traces[0], "r") as f:
        assert int(f.attrs["n_ranks"]) == 2  # one MPI job of two ranks, not two one-rank jobs
        assert not f.attrs.get("partial", False)
    assert "decode: 63 tokens" in out  # the job's own `trace report` of its --steps 64


def test_plain_srun_without_mpi_plugin_stops_naming_the_fix(slurm: dict[str, str], models: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """MpiDefault=none and no --mpi: every task would be its own rank 0; both stop, and the launcher's
    task 0 says why in one line."""
    script = tmp_path / "plain.slurm"
    script.write_text("#!/usr/bin/env bash\n"
                      f"srun python -m mpillama generate --model {models['tiny-q40']} --prompt Hi --steps 2\n")
    done, out = sbatch(slurm, tmp_path, str(script))
    assert done.returncode != 0
    lines = [line for line in out.splitlines() if "--mpi=pmix" in line]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    # every task stopped (srun says "tasks 0-1: Exited ..." or one line per task), none ran on alone
    assert "tasks 0-1: Exited with exit code 2" in out or out.count("Exited with exit code 2") == 2, out[-3000:]


def test_sweep_job_runs_each_point_as_a_job_step(slurm: dict[str, str], models: dict[str, Path],
                                                 tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(f'model = "{models["tiny-q40"]}"\nprompt_tokens = 8\nsteps = 4\n[grid]\nranks = [1, 2]\n')
    done, out = sbatch(slurm, tmp_path, str(ROOT / "jobs" / "sweep.slurm"), str(grid), "results.h5")
    assert done.returncode == 0, f"{done.stderr}\n{out[-3000:]}"
    with h5py.File(tmp_path / "results.h5", "r") as f:
        points = f["points"]
        status = [s.decode() if isinstance(s, bytes) else s for s in points["status"][()]]
        ranks = sorted(int(r) for r in points["ranks"][()])
    assert status == ["ok", "ok"] and ranks == [1, 2], out[-3000:]
