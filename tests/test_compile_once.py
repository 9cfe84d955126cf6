"""Issue 15 item 17: the first run compiles every kernel variant that later runs reach.

numba compiles a kernel per variant (threaded or not, argument types) on first call and caches
it; a variant the first run never called made a later run pause (a first 4-rank generate 51 s, a
first 2-thread bench 18 s). Here the README's kind of first run fills an empty numba cache, and
runs with other ranks, threads, syncs, buffers and weight types must add nothing to it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.mpi_launch import ROOT, mpi_command, mpi_env


def compiled(cache: Path) -> set[str]:
    """The kernel variants in numba's cache (one .nbc file each)."""
    return {p.name for p in cache.rglob("*.nbc")}


def run(cache: Path, n_ranks: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "mpillama", *args]
    done = subprocess.run(mpi_command(n_ranks, *cmd) if n_ranks > 1 else cmd, env=mpi_env(NUMBA_CACHE_DIR=str(cache)),
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_first_run_compiles_what_later_runs_call(models: dict[str, Path], tmp_path: Path) -> None:
    cache, model = tmp_path / "numba-cache", str(models["tiny-q40"])
    run(cache, 1, "generate", "--model", model, "--prompt", "The capital of France is", "--steps", "4")
    first = compiled(cache)
    assert len(first) > 20, sorted(first)  # the cache is where this test looks
    long_prompt = "word " * 100  # prefill in chunks, overlapped with the sync where that pays
    later = [
        (1, "bench", "--model", model, "--nthreads", "2", "--prompt-tokens", "16", "--steps", "4"),
        (2, "generate", "--model", model, "--prompt", long_prompt, "--steps", "4", "--sync", "star", "--nthreads", "2"),
        (2, "generate", "--model", model, "--prompt", "Hi", "--steps", "4", "--sync", "allreduce",
         "--buffer-float-type", "f32"),
        (3, "generate", "--model", model, "--prompt", "Hi", "--steps", "4", "--weight-type", "f32",
         "--temperature", "0.8"),
    ]
    for n_ranks, *args in later:
        run(cache, n_ranks, *args)
        added = compiled(cache) - first
        assert not added, f"{n_ranks} ranks {' '.join(args[:1] + args[3:])} compiled {sorted(added)}"
