"""Start to first token: how long `generate` takes from launch until the first text appears.

    python bench/startup.py [--shape llama3.2-1b] [--repeat 5] [--ranks 1]

Runs `python -m mpillama generate --steps 1` on the cached synthetic model (one rank without
mpirun, or --ranks N under mpirun) and times, from the moment the process is started, the
first byte of generated text on stdout. The first run fills numba's cache and the page cache
and is reported apart ("cold"); the median of the others is the warm figure. The model's
load breakdown (`loaded in ...`) is printed as mpillama reports it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mpi_launch import mpi_command, mpi_env  # noqa: E402


def time_to_first_token(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds to the first stdout byte, seconds to exit, stderr) of one run."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    proc.stdout.read()
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0 or not first:
        raise SystemExit(f"run failed ({proc.returncode}):\n{err}")
    return t_first, time.perf_counter() - t0, err


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--ranks", type=int, default=1, help="1: plain python (no mpirun); N: under mpirun")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    from mpillama.formats.vocab import cache_dir

    model = cache_dir() / "models" / f"{args.shape}-q40.gguf"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "mpillama", "synth", "--shape", args.shape, "--out", str(model)],
                       check=True)
    run = [sys.executable, "-m", "mpillama", "generate", "--model", str(model), "--prompt", "Hello", "--steps", "1"]
    command, env = (run, dict(os.environ)) if args.ranks == 1 else (mpi_command(args.ranks, *run), mpi_env())
    cold = time_to_first_token(command, env)
    warm = [time_to_first_token(command, env) for _ in range(args.repeat)]
    loaded = [line for line in warm[-1][2].splitlines() if "loaded in" in line]
    print(f"model {args.shape}, {args.ranks} rank(s), {os.cpu_count()} CPUs")
    print(f"cold (first) run: first token after {cold[0]:.2f} s")
    print(f"warm runs ({args.repeat}): first token after {median(w[0] for w in warm):.2f} s median "
          f"(min {min(w[0] for w in warm):.2f}, max {max(w[0] for w in warm):.2f}); "
          f"exit after {median(w[1] for w in warm):.2f} s")
    if loaded:
        print(loaded[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
