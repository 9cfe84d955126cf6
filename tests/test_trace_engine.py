"""Traces of real multi-rank runs: schema and coverage, an injected straggler, a run killed mid-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpillama.trace.analysis import collectives, coverage, load_trace, segment_problems
from mpillama.trace.recorder import SEGMENTS
from tests.mpi_launch import ROOT, mpi_command, mpi_env, run_mpillama

DELAY = 0.05  # seconds the injected straggler sleeps in each attention block


def generate_traced(models: dict[str, Path], trace: Path, n: int, steps: int, **env: str) -> None:
    done = run_mpillama(n, "generate", "--model", str(models["tiny-q40"]), "--prompt", "Hello world", "--steps",
                        str(steps), "--ignore-eos", "--trace", str(trace), timeout=300, **env)
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
    generate_traced(models, path, 3, steps=6, MPILLAMA_TEST_SLOW=f"1:{DELAY}")
    assert report(path)["straggler"]["rank"] == 1
    trace = load_trace(path)
    coll = collectives(trace)
    att_gathers = coll.complete & (coll.seg == SEGMENTS.index("att_sync")) & (coll.occ == 1)
    assert np.all(coll.last_rank[att_gathers] == 1)
    waits = coll.wait[att_gathers][:, [0, 2]]
    assert np.all(np.abs(waits - DELAY) < 0.2 * DELAY), waits


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
