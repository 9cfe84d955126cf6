"""Traces of real multi-rank runs: schema and coverage, an injected straggler, a run killed mid-way."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpillama.trace.analysis import collectives, coverage, load_trace, segment_problems
from mpillama.trace import schema
from mpillama.trace.recorder import SEGMENTS
from tests.mpi_launch import ROOT, mpi_command, mpi_env, run_mpillama

DELAY = 0.05  # seconds the injected straggler sleeps in each attention block


def generate_traced(models: dict[str, Path], trace: Path, n: int, steps: int, *flags: str, **env: str) -> None:
    done = run_mpillama(n, "generate", "--model", str(models["tiny-q40"]), "--prompt", "Hello world", "--steps",
                        str(steps), "--ignore-eos", "--trace", str(trace), *flags, timeout=300, **env)
    assert done.returncode == 0, done.stderr


def report(trace: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "mpillama", "trace", "report", str(trace), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("n", [2, 4])
def test_trace_covers_every_step_on_every_rank(n: int, models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    generate_traced(models, path, n, steps=24)
    trace = load_trace(path)
    assert trace.n_ranks == n and not trace.partial
    assert segment_problems(trace) == []  # no overlaps, no negative durations, no missed steps
    ratio = coverage(trace)["ratio"]
    assert np.all(np.abs(ratio - 1) < 0.05), ratio  # per-rank segment sums match the steps' wall time
    # one host, one clock: the true offset is 0, and ping-pong's error is at most half a round trip
    offsets, rtt = np.asarray(trace.ranks["clock_offset"]), np.asarray(trace.ranks["clock_rtt"])
    assert np.all(np.abs(offsets) <= rtt / 2 + 5e-5), (offsets, rtt)
    assert np.all(np.abs(offsets) < 5e-3), offsets
    assert len(trace.steps) == 24  # prefill (one pass) + 23 decode passes


def test_injected_straggler_is_named_and_others_wait_for_it(models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "slow.h5"
    steps, n_layers = 6, 2  # the tiny model
    # allreduce: one att_sync per block, where every rank waits for the last (it selected star's second
    # collective, which an automatic choice of allreduce does not have: the checks below ran on nothing)
    generate_traced(models, path, 3, steps, "--sync", "allreduce", MPILLAMA_TEST_SLOW=f"1:{DELAY}")
    assert report(path)["straggler"]["rank"] == 1
    trace = load_trace(path)
    coll = collectives(trace)
    att_syncs = coll.complete & (coll.seg == SEGMENTS.index("att_sync"))
    assert att_syncs.sum() == steps * n_layers
    # Each instance's wait is a sleep against the other ranks' compute: on a loaded host a rank that
    # is preempted for longer than the sleep now and then arrives last instead, or oversleeps. The
    # typical instance (the median over the run, per rank) is what the straggler sets; the waits'
    # derivation itself is checked exactly against every rank's clock in tests/mpi/test_trace_mpi.py.
    assert np.mean(coll.last_rank[att_syncs] == 1) > 0.5, coll.last_rank[att_syncs]
    waits = coll.wait[att_syncs][:, [0, 2]]
    assert np.all(np.abs(np.median(waits, axis=0) - DELAY) < 0.2 * DELAY), waits


def rank0_pid(marker: str) -> int | None:
    """The pid of the rank-0 python process whose command line contains marker."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and "-m mpillama" in cmdline and b"OMPI_COMM_WORLD_RANK=0" in environ:
            return int(entry.name)
    return None


def wait_for_checkpoints(path: Path, count: int, limit: float = 120.0) -> None:
    """Until the trace file has been written `count` times (its modification time changed)."""
    seen: list[int] = []
    deadline = time.monotonic() + limit
    while len(seen) < count:
        assert time.monotonic() < deadline, f"{path} was written {len(seen)} times in {limit} s"
        if path.exists() and (not seen or path.stat().st_mtime_ns != seen[-1]):
            seen.append(path.stat().st_mtime_ns)
        time.sleep(0.1)


@pytest.mark.parametrize("target", ["rank0", "mpirun"])
def test_sigterm_mid_generation_leaves_a_partial_trace(target: str, models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / f"killed-{target}.h5"
    cmd = mpi_command(2, sys.executable, "-m", "mpillama", "generate", "--model", str(models["tiny-q40"]),
                      "--prompt", "Hello", "--steps", "400", "--ignore-eos", "--trace", str(path))
    job = subprocess.Popen(cmd, env=mpi_env(MPILLAMA_TEST_SLOW=f"1:{DELAY}"), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoints(path, 2)  # rank 0 rewrites the partial file every ~5 s: decode is under way
        assert job.poll() is None, job.communicate()[1]
        pid = rank0_pid(str(path)) if target == "rank0" else job.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    got = report(path)
    assert got["partial"] is True
    assert got["phases"]["decode"]["tokens"] >= 5  # what was recorded before the kill (or the last checkpoint)


def checkpoint_versions(path: Path, count: int, job: subprocess.Popen, limit: float = 300.0) -> list[tuple[int, int]]:
    """Each version of the partial file rank 0 writes, read while the job runs, until `count` were
    seen: (the last step it names, rank 0's flushes before it). Waits on the file, not on a clock;
    the bound only ends a hung test."""
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + limit
    while len(seen) < count:
        assert job.poll() is None, f"the job ended after {len(seen)} checkpoints"
        assert time.monotonic() < deadline, f"{len(seen)} checkpoints in {limit} s: {seen}"
        try:
            with h5py.File(path, "r") as f:  # a complete file always: each version is renamed into place
                reason, flushes = str(f.attrs["partial_reason"]), int(f[schema.RANKS]["n_flushes"][0])
        except OSError:  # not written yet
            time.sleep(0.05)
            continue
        last = int(re.fullmatch(r"checkpoint: the run had not ended \(last step (\d+)\)", reason).group(1))
        if not seen or seen[-1][0] != last:
            seen.append((last, flushes))
        time.sleep(0.05)
    return seen


def test_a_job_killed_outright_leaves_its_last_checkpoint(models: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL to every process of the job (no handler runs): the file left is the last checkpoint,
    readable, marked partial, holding every step up to the one it names on both ranks.

    Checkpoints come at every flush (about every 5 s), not every other one: consecutive versions
    are one flush apart (they were two, ~11 s, and a kill 7 s in left only the first step). The
    straggler's sleeps make every step ~0.1 s however fast the machine, so the run outlasts the test.
    """
    path = tmp_path / "killed.h5"
    cmd = mpi_command(2, sys.executable, "-m", "mpillama", "generate", "--model", str(models["tiny-q40"]),
                      "--prompt", "Hello", "--steps", "400", "--ignore-eos", "--trace", str(path))
    job = subprocess.Popen(cmd, env=mpi_env(MPILLAMA_TEST_SLOW=f"1:{DELAY}"), cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = checkpoint_versions(path, 4, job)
        os.killpg(job.pid, signal.SIGKILL)  # mpirun and both ranks at once
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.stderr.close()
    assert seen[0][0] == 0 and seen[1][0] > 5, seen  # the first after the prefill step, then decode steps
    assert min(b[1] - a[1] for a, b in zip(seen, seen[1:])) == 1, seen  # a checkpoint at each flush
    trace = load_trace(path)
    assert trace.partial and trace.partial_reason.startswith("checkpoint"), trace.partial_reason
    last = int(re.search(r"last step (\d+)", trace.partial_reason).group(1))
    assert last >= seen[-1][0]  # the last version read, or one written after it before the kill
    assert list(trace.steps.step) == list(range(last + 1)) and np.isfinite(trace.steps.t_end).all()
    for step in range(last + 1):
        assert set(trace.segments.rank[trace.segments.step == step]) == {0, 1}, step
    assert segment_problems(trace) == []
