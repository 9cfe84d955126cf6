"""Runs arm64 Python under qemu-user with this checkout on its path.

    python tests/aarch64/run.py [--cpu cortex-a76|cortex-a55|cortex-a72|cortex-a53] -- PYTHON_ARGS...
    python tests/aarch64/run.py -- -m pytest -q tests/test_quant.py
    python tests/aarch64/run.py --cpu cortex-a72 -- -m mpillama generate --model M.gguf --prompt hi

Sets up the emulation root first if needed (tests/aarch64/setup.py; the first time needs root and
the network). The emulated process sees the chosen board's /proc/cpuinfo and hardware capabilities
(QEMU_CPU), imports mpillama from this checkout and the aarch64 wheels from the root, and keeps its
numba cache in the root's numba-cache/CPU, so x86 and arm never share compiled code (nor two CPUs).
Owns the emulated process's environment (command()); nothing else.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # run as a script: make `tests.aarch64` importable
    sys.path.insert(0, str(REPO))

from tests.aarch64.setup import BOARDS, DEFAULT_BOARD, Emulator, SetupError, ensure  # noqa: E402

# host settings that would point the emulated Python at x86 files
DROPPED = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONUSERBASE", "VIRTUAL_ENV",
           "LD_LIBRARY_PATH", "LD_PRELOAD", "NUMBA_CACHE_DIR")


def command(emu: Emulator, args: list[str], cpu: str = DEFAULT_BOARD, numba_cache: Path | None = None,
            env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run `python ARGS` on the emulated CPU; env defaults to this process's."""
    if cpu not in BOARDS:
        raise SetupError(f"unknown CPU {cpu!r}; emulated CPUs: {', '.join(BOARDS)}")
    out = {k: v for k, v in (os.environ if env is None else env).items() if k not in DROPPED}
    out.update(
        QEMU_CPU=BOARDS[cpu].qemu_cpu,
        QEMU_LD_PREFIX=str(emu.board(cpu)),  # the sysroot, with this board's proc/cpuinfo
        PYTHONPATH=os.pathsep.join([str(REPO), str(emu.site)]),
        PYTHONNOUSERSITE="1",  # the host's ~/.local packages are x86
        NUMBA_CACHE_DIR=str(numba_cache or emu.numba_cache(cpu)),
    )
    return [str(emu.python), *args], out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="run.py [--cpu CPU] -- PYTHON_ARGS...")
    parser.add_argument("--cpu", default=DEFAULT_BOARD, choices=list(BOARDS), help=f"default {DEFAULT_BOARD}")
    parser.add_argument("--numba-cache", type=Path, help="numba cache folder (default: the root's numba-cache/CPU)")
    args = parser.parse_args(ours)
    if not theirs:
        parser.error("give the Python arguments after --, e.g. -- -m pytest -q tests/test_quant.py")
    try:
        emu = ensure(log=lambda line: print(line, file=sys.stderr))
        cmd, env = command(emu, theirs, args.cpu, args.numba_cache)
    except SetupError as e:
        print(f"aarch64: error: {e}", file=sys.stderr)
        return 2
    return subprocess.run(cmd, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
