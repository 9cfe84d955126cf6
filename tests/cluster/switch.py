"""The emulated cluster's switch process: compiles switch.c once into mpillama's cache folder, starts it in
a network namespace, and sets each port's one-way delay and rate over its stdin.

Knows nothing about hosts or MPI; netns.py moves the TAPs it creates into the host namespaces.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from mpillama.errors import MpillamaError
from mpillama.formats.vocab import cache_dir

SOURCE = Path(__file__).with_name("switch.c")


def build() -> Path:
    """The compiled switch, built on first use; the binary's name carries the source's hash."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = cache_dir() / "cluster" / f"switch-{digest}"
    if binary.exists():
        return binary
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise MpillamaError("the cluster switch needs a C compiler (gcc or cc) on PATH")
    binary.parent.mkdir(parents=True, exist_ok=True)
    part = binary.with_suffix(f".{os.getpid()}.part")
    done = subprocess.run([gcc, "-O2", "-Wall", "-pthread", "-o", str(part), str(SOURCE)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise MpillamaError(f"compiling {SOURCE} failed: {done.stderr.strip()}")
    part.replace(binary)
    return binary


class Switch:
    """A running switch with n_ports TAP ports t0 .. t{n-1} in namespace netns. Ends when closed
    or when this process dies (end of its stdin)."""

    def __init__(self, netns: str, n_ports: int) -> None:
        self.n_ports = n_ports
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, str(build()), str(n_ports)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        first = self._answer()
        if first != "ready":
            self.close()
            raise MpillamaError(f"the cluster switch did not start (said {first!r})")

    def _answer(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def set_link(self, port: int, delay_ms: float, rate_gbit: float | None) -> None:
        """Frames leaving through port (toward its host) arrive delay_ms after the wire sent them at rate_gbit."""
        rate_bps = 0 if rate_gbit is None else max(int(rate_gbit * 1e9), 1)
        answer = self._ask(f"set {port} {int(round(delay_ms * 1e6))} {rate_bps}")
        if answer != "ok":
            raise MpillamaError(f"the cluster switch refused port {port}: {answer}")

    def stats(self) -> dict[str, int]:
        """Since the switch started: frames, drops, max_queue (longest queue, frames), queued (frames
        that waited for their delivery time), late_ns_sum and late_ns_max (how late those left)."""
        words = self._ask("stats").split()
        return {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)}

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # end of input ends the switch
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
