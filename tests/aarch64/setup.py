"""Installs the aarch64 emulation root: qemu-user, Debian's arm64 Python 3.11, aarch64 wheels of the host's versions.

    python tests/aarch64/setup.py          # as root on Debian bookworm; a second run returns at once

Owns everything under ROOT (env MPILLAMA_AARCH64_ROOT, default ~/.cache/mpillama/aarch64):
  debs/            Debian arm64 packages: python3.11 and the shared libraries it and the wheels load
  wheels/          aarch64 wheels (PyPI) of the versions the host has installed: an x86 run and an
                   emulated one execute the same numpy, numba and llvmlite
  sysroot/         the packages unpacked with dpkg -x, the wheels installed in sysroot/opt/site, and
                   usr/bin/python3.11-qemu, a host script that runs the arm64 python under qemu
  boards/NAME/     one per emulated CPU: symlinks to sysroot/* (usr, lib, etc, opt) and a fake
                   proc/cpuinfo. It is qemu's -L prefix (QEMU_LD_PREFIX), which also serves
                   /proc/cpuinfo, so LLVM (and numba) see that board's CPU
  numba-cache/NAME/  numba's cache for code compiled under that CPU (run.py sets NUMBA_CACHE_DIR)
  ready.json       what is installed; while it matches what this file would install, ensure() does nothing

There is no binfmt_misc on these machines: qemu-aarch64-static is called directly. Only apt-get,
dpkg and pip touch the network, and only the Debian and PyPI registries. Imports nothing from
mpillama (it runs before the package can be imported on arm).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

QEMU = "qemu-aarch64-static"
Log = Callable[[str], None]  # where progress lines go
PYTHON = "usr/bin/python3.11"  # Debian bookworm's arm64 interpreter, inside the sysroot
WRAPPER = "usr/bin/python3.11-qemu"  # host script: sys.executable of the emulated Python
SITE = "opt/site"  # the aarch64 wheels, inside the sysroot
FORMAT = 1  # bump when the layout of ROOT changes: the next ensure() rebuilds

# Debian arm64 packages whose dependency closure makes the sysroot: the interpreter, the C++
# runtime llvmlite and numba load, and libgomp for numba's OpenMP threading layer.
DEB_ROOTS = ("python3.11:arm64", "libstdc++6:arm64", "libgomp1:arm64")
DEB_SKIP = ("dpkg", "tar", "install-info")  # in the closure through maintainer tooling, never loaded

# What the kernel and quant tests, `python -m mpillama generate` and pytest import on arm,
# each at the version the host has (its own install from pyproject.toml decides them).
WHEELS = (
    "numpy", "numba", "llvmlite",  # kernels
    "gguf", "pyyaml", "tqdm",  # model files (gguf imports yaml and tqdm)
    "tokenizers", "jinja2", "markupsafe", "h5py",  # tokenizer, chat templates, traces
    "pytest", "pluggy", "iniconfig", "packaging", "pygments", "pytest-mpi",  # tests (conftest reads its option)
)  # fmt: skip
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")  # bookworm has glibc 2.36
ABIS = ("cp311", "abi3", "none")

# words in apt's and pip's output that mean the registry could not be reached (not a bad request)
NETWORK_WORDS = (
    "Temporary failure", "Could not resolve", "Failed to fetch", "Could not connect", "Connection refused",
    "Connection timed out", "Network is unreachable", "No route to host", "NewConnectionError",
    "Failed to establish a new connection", "ConnectTimeoutError", "ReadTimeoutError", "ProxyError",
    "Max retries exceeded",
)  # fmt: skip


@dataclass(frozen=True)
class Core:
    """One CPU's block in /proc/cpuinfo (values as an arm64 Linux kernel prints them)."""

    part: str  # MIDR part number: 0xd05 A55, 0xd0b A76, 0xd08 A72, 0xd03 A53
    variant: str
    revision: int
    features: str


RK3588 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
A55 = Core("0xd05", "0x2", 0, RK3588)
A76 = Core("0xd0b", "0x4", 0, RK3588)  # RK3588's two core types report the same features
A72 = Core("0xd08", "0x0", 3, "fp asimd evtstrm crc32 cpuid")
A53 = Core("0xd03", "0x0", 4, "fp asimd evtstrm crc32 cpuid")


@dataclass(frozen=True)
class Board:
    """An emulated CPU: what qemu executes (QEMU_CPU, which also sets AT_HWCAP) and what cpuinfo says."""

    what: str
    qemu_cpu: str
    cores: tuple[Core, ...]
    dotprod: bool  # HWCAP_ASIMDDP: the SDOT/UDOT instructions


# The name is the CPU LLVM reads from the fake cpuinfo (RK3588's big.LITTLE mix reads as its big core).
BOARDS = {
    "cortex-a76": Board("Rock 5B (RK3588: 4x Cortex-A55 + 4x Cortex-A76)", "cortex-a76", (A55,) * 4 + (A76,) * 4, True),
    # qemu 7.2 has no Cortex-A55 model; the A76 model runs the same Armv8.2 + dotprod instructions
    "cortex-a55": Board("RK3566 (4x Cortex-A55)", "cortex-a76", (A55,) * 4, True),
    "cortex-a72": Board("Raspberry Pi 4 (BCM2711: 4x Cortex-A72, no dotprod)", "cortex-a72", (A72,) * 4, False),
    "cortex-a53": Board("Raspberry Pi 3 (BCM2837: 4x Cortex-A53, no dotprod)", "cortex-a53", (A53,) * 4, False),
}
DEFAULT_BOARD = "cortex-a76"


class SetupError(Exception):
    """Setup failed where it should have worked: a bug here or a broken machine."""


class Unavailable(SetupError):
    """Setup cannot run on this machine: not root, or the package registries cannot be reached."""


@dataclass(frozen=True)
class Emulator:
    """A ready emulation root."""

    root: Path

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def python(self) -> Path:
        """The host-executable wrapper that runs arm64 Python (needs the environment run.py builds)."""
        return self.sysroot / WRAPPER

    @property
    def site(self) -> Path:
        return self.sysroot / SITE

    def board(self, name: str) -> Path:
        return self.root / "boards" / name

    def numba_cache(self, name: str) -> Path:
        return self.root / "numba-cache" / name


def default_root() -> Path:
    return Path(os.environ.get("MPILLAMA_AARCH64_ROOT") or Path.home() / ".cache" / "mpillama" / "aarch64")


def cpuinfo(board: Board) -> str:
    blocks = [
        f"processor\t: {i}\nBogoMIPS\t: 48.00\nFeatures\t: {c.features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: {c.variant}\nCPU part\t: {c.part}\nCPU revision\t: {c.revision}\n"
        for i, c in enumerate(board.cores)
    ]
    return "\n".join(blocks) + "\n"


def host_versions() -> dict[str, str]:
    """{wheel: version installed on the host}: the emulated run gets the same ones."""
    out = {}
    for name in WHEELS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise SetupError(f"the host has no {name} installed; install mpillama with its test extras first "
                             f"(pip install -e '.[test]')") from None
    return out


def wanted() -> dict:
    """What ready.json must say for the root to be used as it is."""
    boards = hashlib.sha256(json.dumps({k: asdict(v) for k, v in BOARDS.items()}, sort_keys=True).encode())
    return {"format": FORMAT, "debs": list(DEB_ROOTS), "wheels": host_versions(), "boards": boards.hexdigest()[:16]}


def is_ready(root: Path) -> bool:
    """True when ensure(root) would do nothing (no root rights or network needed)."""
    stamp = root / "ready.json"
    try:
        return json.loads(stamp.read_text()) == wanted() and shutil.which(QEMU) is not None
    except (OSError, ValueError):
        return False


def ensure(root: Path | None = None, log: Log = print) -> Emulator:
    """Install whatever is missing under root (see the module docstring); instant when it is all there."""
    root = root or default_root()
    if is_ready(root):
        return Emulator(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if not is_ready(root):  # another process may have finished it while we waited
            _install(root, log)
    return Emulator(root)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _install(root: Path, log: Log) -> None:
    if os.geteuid() != 0:
        raise Unavailable(f"the aarch64 root {root} is not set up and setting it up needs root (apt-get, dpkg)")
    stamp = root / "ready.json"
    stamp.unlink(missing_ok=True)
    started = time.monotonic()
    apt = _Apt(log)
    if "arm64" not in _run(["dpkg", "--print-foreign-architectures"]).stdout.split():
        _run(["dpkg", "--add-architecture", "arm64"])
    known = subprocess.run(["apt-cache", "show", DEB_ROOTS[0]], capture_output=True, check=False).returncode == 0
    if shutil.which(QEMU) is None or not known:
        apt.update()  # one update serves both: package lists for arm64 and for qemu
    if shutil.which(QEMU) is None:
        log("aarch64 setup: installing qemu-user-static")
        apt.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-user-static"])
    debs = _download_debs(root / "debs", apt, log)
    wheels = _download_wheels(root / "wheels", log)
    _build_sysroot(root / "sysroot", debs, wheels, log)
    _build_boards(root)
    stamp.write_text(json.dumps(wanted(), indent=1) + "\n")
    log(f"aarch64 setup: ready in {root} ({time.monotonic() - started:.0f} s)")


class _Apt:
    """apt-get, with its network failures told apart from other ones."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.update_output = ""

    def update(self) -> None:
        self.log("aarch64 setup: apt-get update")
        done = self.run(["apt-get", "update", "-q"])
        self.update_output = done.stdout + done.stderr  # its warnings: lists it could not fetch

    def run(self, cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        return _run(cmd, cwd=cwd, env=env, fetch=True, earlier=self.update_output)


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, fetch: bool = False,
         earlier: str = "") -> subprocess.CompletedProcess:
    """Run cmd; raise Unavailable when it failed for a registry out of reach, SetupError for any other failure."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return done
    text = (done.stdout + done.stderr).strip()
    last = text.splitlines()[-1] if text else f"exit code {done.returncode}"
    # apt-get update exits 0 when it could not fetch, so its output counts for the command after it
    if fetch and any(word in text + earlier for word in NETWORK_WORDS):
        raise Unavailable(f"cannot reach the package registry: {' '.join(cmd[:3])}: {last}")
    raise SetupError(f"{' '.join(cmd)} failed: {last}")


def _download_debs(folder: Path, apt: _Apt, log: Log) -> list[Path]:
    """apt-get download the arm64 closure of DEB_ROOTS (recommends and maintainer tooling left out)."""
    flags = ["--recurse", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces",
             "--no-enhances"]
    tree = _run(["apt-cache", "depends", *flags, *DEB_ROOTS]).stdout
    names = sorted({line for line in tree.splitlines() if line.endswith(":arm64") and not line.startswith(" ")}
                   - {f"{name}:arm64" for name in DEB_SKIP})
    shutil.rmtree(folder, ignore_errors=True)  # only the current versions, nothing left from older runs
    folder.mkdir(parents=True)
    log(f"aarch64 setup: apt-get download {len(names)} arm64 packages")
    apt.run(["apt-get", "download", "-q", *names], cwd=folder)
    return sorted(folder.glob("*.deb"))


def _download_wheels(folder: Path, log: Log) -> list[Path]:
    """pip download the host's versions of WHEELS for aarch64 Linux (files already there are kept)."""
    specs = [f"{name}=={version}" for name, version in host_versions().items()]
    log(f"aarch64 setup: pip download {len(specs)} aarch64 wheels")
    folder.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *_tags(), *specs], fetch=True)
    names = {_canonical(name): version for name, version in host_versions().items()}
    return sorted(w for w in folder.glob("*.whl")
                  if names.get(_canonical(w.name.split("-")[0])) == w.name.split("-")[1])


def _tags() -> list[str]:
    tags = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    for platform in PLATFORMS:
        tags += ["--platform", platform]
    for abi in ABIS:
        tags += ["--abi", abi]
    return tags


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _build_sysroot(sysroot: Path, debs: list[Path], wheels: list[Path], log: Log) -> None:
    log(f"aarch64 setup: unpacking {len(debs)} packages and installing {len(wheels)} wheels into {sysroot}")
    shutil.rmtree(sysroot, ignore_errors=True)
    sysroot.mkdir(parents=True)
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(sysroot)])
    if not (sysroot / PYTHON).exists():
        raise SetupError(f"no {PYTHON} after unpacking the arm64 packages into {sysroot}")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(sysroot / SITE),
          *_tags(), *map(str, wheels)])
    wrapper = sysroot / WRAPPER
    # -0 "$0": the emulated sys.executable is this script, so a subprocess of sys.executable runs
    # under qemu too. QEMU_LD_PREFIX (boards/NAME) and QEMU_CPU come from run.py's environment.
    wrapper.write_text(
        "#!/bin/sh\n# Written by tests/aarch64/setup.py: arm64 Python under qemu-user (run it through run.py).\n"
        f'exec {shutil.which(QEMU)} -0 "$0" "$(dirname "$0")/python3.11" "$@"\n'
    )
    wrapper.chmod(0o755)


def _build_boards(root: Path) -> None:
    shutil.rmtree(root / "boards", ignore_errors=True)
    for name, board in BOARDS.items():
        folder = root / "boards" / name
        (folder / "proc").mkdir(parents=True)
        for top in (root / "sysroot").iterdir():  # usr, lib, etc, opt: what dpkg -x and pip made
            (folder / top.name).symlink_to(Path("..", "..", "sysroot", top.name))
        (folder / "proc" / "cpuinfo").write_text(cpuinfo(board))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, help="default: $MPILLAMA_AARCH64_ROOT or ~/.cache/mpillama/aarch64")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        emu = ensure(args.root)
    except SetupError as e:
        print(f"aarch64 setup: error: {e}", file=sys.stderr)
        return 2
    print(f"aarch64 setup: {emu.root} is ready ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
