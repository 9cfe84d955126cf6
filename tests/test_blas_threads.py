"""numpy's BLAS threads in a real `python -m mpillama` process follow --nthreads (1 by default).

OpenBLAS reads its thread count once, as numpy loads; the count is read back from the loaded
library itself (ctypes), in the same process, after the command has run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpillama.blas_threads import BLAS_VARIABLES, limit_blas_threads, nthreads_flag

ROOT = Path(__file__).resolve().parent.parent

# Runs mpillama the way `python -m mpillama ARGS` does (runpy is what -m calls), or the way the
# console script does (cli.main), then reports what the BLAS numpy loaded runs on.
DRIVER = r"""
import ctypes, json, os, runpy, sys
entry, args = sys.argv[1], json.loads(sys.argv[2])
sys.argv = ["mpillama", *args]
try:
    if entry == "module":
        runpy.run_module("mpillama", run_name="__main__", alter_sys=True)
    else:
        from mpillama.cli import main
        sys.exit(main())
except SystemExit:
    pass
import numpy
threads = -1
for lib in sorted({line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()}):
    for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
        fn = getattr(ctypes.CDLL(lib), name, None)
        if fn is not None:
            threads = fn()
print(json.dumps({"blas_threads": threads, "env": os.environ.get("OPENBLAS_NUM_THREADS")}))
"""

# every variable OpenBLAS reads its count from: without them it starts a thread per core
OPENBLAS_FALLBACKS = ("GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def run_driver(entry: str, args: list[str], **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in BLAS_VARIABLES + OPENBLAS_FALLBACKS}
    done = subprocess.run([sys.executable, "-c", DRIVER, entry, json.dumps(args)], capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    if got["blas_threads"] == -1:
        pytest.skip("numpy's BLAS here is not OpenBLAS: no thread count to read back")
    return got


def generate_args(tmp_path: Path, *extra: str) -> list[str]:
    # a missing model: the command imports numpy and everything a real run does, then exits 2
    return ["generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "hi", *extra]


needs_two_cpus = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: OpenBLAS starts one thread anyway")


@needs_two_cpus
@pytest.mark.parametrize("entry", ["module", "console-script"])
def test_blas_runs_one_thread_by_default(entry: str, tmp_path: Path) -> None:
    assert run_driver(entry, generate_args(tmp_path))["blas_threads"] == 1


@needs_two_cpus
def test_blas_follows_nthreads(tmp_path: Path) -> None:
    assert run_driver("module", generate_args(tmp_path, "--nthreads", "2"))["blas_threads"] == 2


@needs_two_cpus
def test_the_users_own_blas_setting_wins(tmp_path: Path) -> None:
    got = run_driver("module", generate_args(tmp_path, "--nthreads", "1"), OPENBLAS_NUM_THREADS="2")
    assert got["blas_threads"] == 2


def test_sweep_passes_the_environment_on_untouched(tmp_path: Path) -> None:
    # sweep launches the ranks: they must get the user's variables, not ones this process made up
    got = run_driver("module", ["sweep", "--grid", str(tmp_path / "missing.toml")])
    assert got["env"] is None


def test_the_cli_module_does_not_load_numpy() -> None:
    # the console script imports mpillama.cli before main() can set the variables
    done = subprocess.run([sys.executable, "-c", "import sys, mpillama.cli; print('numpy' in sys.modules)"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("argv, expected", [
    (["--nthreads", "3"], 3), (["--nthreads=4"], 4), (["--nthr", "2"], 2), (["--model", "m", "--nthreads", "2"], 2),
    (["--nthreads", "two"], None), (["--nthreads"], None), ([], None), (["--n", "2"], None),
    (["--", "--nthreads", "2"], None),
])
def test_nthreads_is_read_from_the_command_line(argv: list[str], expected: int | None) -> None:
    assert nthreads_flag(argv) == expected


def test_nothing_is_set_once_numpy_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy  # noqa: F401  (loaded already in the test process; this makes sure)

    for var in BLAS_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    limit_blas_threads(["generate", "--nthreads", "2"])
    assert not any(var in os.environ for var in BLAS_VARIABLES)
