"""The emulated cluster: N hosts as network namespaces joined by one switch, and mpirun across them.

Host i is network namespace `mlc<PID>-<K>h<i>` (PID: the process that made the cluster, K its
count of clusters) with address 10.77.0.<i+1>/24 on its eth0 and hostname `node<i>`; the switch
(switch.py) runs in `mlc<PID>-<K>sw`. Each namespace's /etc/hosts (`/etc/netns/<name>/hosts`, which `ip netns exec`
mounts over /etc/hosts) names every node, so the hostfile uses plain host names. The subnet
exists only inside these namespaces: nothing reaches the machine's own interfaces.

mpirun runs in node0's namespace under hostname node0; the launch agent (a generated shell
script, given to Open MPI as plm_ssh_agent in place of ssh) starts Open MPI's daemon on node<i>
in that host's namespace under its hostname, as ssh would on a real cluster. A host may be given
a CLOCK_MONOTONIC offset for one run (a time namespace), to test clock alignment against a
known truth.

Teardown kills what runs in the namespaces and deletes them, on close(), at exit, and at the
next start for clusters whose owner process died.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from mpillama.errors import MpillamaError
from mpillama.launch import Launcher, find_launcher
from tests.cluster.switch import Switch

PREFIX = "mlc"
SUBNET = "10.77.0.0/24"
ETC_NETNS = Path("/etc/netns")
ROOT = Path(__file__).resolve().parent.parent.parent
_serial = itertools.count()  # clusters made by this process

AGENT = """#!/bin/sh
# Launch agent of an emulated cluster, in place of ssh: AGENT [options] HOST COMMAND...
# Runs COMMAND (joined by spaces, as ssh does) in HOST's network namespace under its hostname,
# with HOST's clock offset if the cluster set one, and the folders in $FOLDER/hide made empty.
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host=$1; shift
case "$host" in
{cases}
  *) echo "cluster agent: unknown host $host" >&2; exit 255 ;;
esac
offset=$(cat "{folder}/$host.monotonic" 2>/dev/null)
hide=$(cat "{folder}/hide" 2>/dev/null)
exec ip netns exec "$ns" unshare --uts ${{offset:+--time --fork --kill-child --monotonic $offset}} /bin/sh -c '
  hostname "$1" || exit 255
  for dir in $2; do mount -t tmpfs hidden "$dir" || exit 255; done
  shift 2
  exec /bin/sh -c "$*"' sh "$host" "$hide" "$@"
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise MpillamaError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why no cluster can be made here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"the emulated cluster needs {tool} on PATH"
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "the emulated cluster needs a C compiler for its switch"
    if not Path("/dev/net/tun").exists():
        return "the emulated cluster needs /dev/net/tun"
    probe = f"{PREFIX}{os.getpid()}-probe"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"ip netns is not permitted here: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_processes(netns: str) -> None:
    """SIGKILL every process in netns: all were started by a cluster of ours."""
    for pid in _ip("netns", "pids", netns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_namespace(netns: str) -> None:
    """Kill what runs in netns and delete it (a namespace outlives its name while processes use it)."""
    _kill_processes(netns)
    _ip("netns", "del", netns, check=False)
    shutil.rmtree(ETC_NETNS / netns, ignore_errors=True)


def _owner(name: str) -> int | None:
    m = re.fullmatch(rf"{PREFIX}(\d+)-.+", name)
    return int(m.group(1)) if m else None


def sweep_leftovers() -> list[str]:
    """Delete the namespaces, /etc/netns and temporary folders of clusters whose owner process is gone."""
    names = {line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()}
    names |= {p.name for p in ETC_NETNS.glob(f"{PREFIX}*")} if ETC_NETNS.exists() else set()
    gone = []
    for name in sorted(names):
        owner = _owner(name)
        if owner is not None and not _pid_alive(owner):
            _kill_namespace(name)
            gone.append(name)
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        owner = _owner(folder.name)
        if owner is not None and not _pid_alive(owner) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(str(folder))
    return gone


def _per_host(value: float | None | Sequence[float | None], n: int, what: str) -> list[float | None]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n  # type: ignore[arg-type]
    if len(values) != n:
        raise MpillamaError(f"{what}: {len(values)} values for {n} hosts")
    return values


class Cluster:
    """N hosts joined by one switch; a context manager that leaves nothing behind.

    delay_ms and rate_gbit are per link: frames toward host i wait delay_ms[i] after crossing a
    wire of rate_gbit[i] (None: unlimited). A scalar applies to every host. bridge=True joins the
    hosts by a kernel bridge and veth pairs instead (no delay, no rate: the baseline that shows
    what the switch itself costs).
    """

    def __init__(self, n_hosts: int, delay_ms: float | Sequence[float] = 0.0,
                 rate_gbit: float | None | Sequence[float | None] = None, bridge: bool = False) -> None:
        if not 2 <= n_hosts <= 16:
            raise MpillamaError(f"a cluster has 2 to 16 hosts, not {n_hosts}")
        if bridge and (any(_per_host(delay_ms, n_hosts, "delay_ms")) or any(_per_host(rate_gbit, n_hosts, "rate_gbit"))):
            raise MpillamaError("a bridged cluster has no delay or rate: use the switch")
        self.n_hosts = n_hosts
        self.tag = f"{PREFIX}{os.getpid()}-{next(_serial)}"  # the owner's pid, then this process's count
        self.hosts = [f"node{i}" for i in range(n_hosts)]
        self.addresses = [f"10.77.0.{i + 1}" for i in range(n_hosts)]
        self.netns = [f"{self.tag}h{i}" for i in range(n_hosts)]
        self.switch_netns = f"{self.tag}sw"
        self.switch: Switch | None = None
        self.folder = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.hostfile = self.folder / "hostfile"
        self.agent = self.folder / "agent"
        self._closed = False
        atexit.register(self.close)
        try:
            self._start(delay_ms, rate_gbit, bridge)
        except BaseException:
            self.close()
            raise

    # -- building ---------------------------------------------------------------------------
    def _start(self, delay_ms: float | Sequence[float], rate_gbit: float | None | Sequence[float | None],
               bridge: bool) -> None:
        sweep_leftovers()
        for name in [self.switch_netns, *self.netns]:
            _ip("netns", "add", name)
        if bridge:
            self._bridge()
        else:
            self.switch = Switch(self.switch_netns, self.n_hosts)
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(self.addresses, self.hosts))
        for i, ns in enumerate(self.netns):
            (ETC_NETNS / ns).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / ns / "hosts").write_text(hosts_file)
            _ip("-n", self.switch_netns, "link", "set", f"t{i}", "netns", ns)
            _ip("-n", ns, "link", "set", f"t{i}", "name", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "address", f"02:77:00:00:00:{i + 1:02x}")
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        if self.switch is not None:
            self.set_links(delay_ms, rate_gbit)
        self.hostfile.write_text("".join(f"{h} slots=1\n" for h in self.hosts))
        cases = "\n".join(f"  {h}) ns={ns} ;;" for h, ns in zip(self.hosts, self.netns))
        self.agent.write_text(AGENT.format(cases=cases, folder=self.folder))
        self.agent.chmod(0o755)
        self.check_reachable()

    def check_reachable(self) -> None:
        """Raise unless node0 reaches every other host through the switch (a TCP connect to a closed port)."""
        probe = ("import socket, sys\n"
                 "for a in sys.argv[1:]:\n"
                 "    try: socket.create_connection((a, 9), 2).close()\n"
                 "    except ConnectionRefusedError: pass\n")
        done = subprocess.run(self.on_host(0, [sys.executable, "-c", probe, *self.addresses[1:]]),
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise MpillamaError(f"cluster hosts unreachable from node0: {done.stderr.strip()[-300:]}")

    def _bridge(self) -> None:
        """A kernel bridge in the switch namespace; host i's eth0 is named t<i> there, like a switch port."""
        _ip("-n", self.switch_netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch_netns, "link", "set", "br0", "up")
        for i in range(self.n_hosts):
            _ip("-n", self.switch_netns, "link", "add", f"t{i}", "type", "veth", "peer", "name", f"p{i}")
            _ip("-n", self.switch_netns, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch_netns, "link", "set", f"p{i}", "up")

    def set_links(self, delay_ms: float | Sequence[float] = 0.0,
                  rate_gbit: float | None | Sequence[float | None] = None) -> None:
        """Change every link's one-way delay and rate (takes effect for the next frames)."""
        if self.switch is None:
            raise MpillamaError("a bridged cluster has no delay or rate: use the switch")
        delays = _per_host(delay_ms, self.n_hosts, "delay_ms")
        rates = _per_host(rate_gbit, self.n_hosts, "rate_gbit")
        for i, (d, r) in enumerate(zip(delays, rates)):
            self.switch.set_link(i, float(d or 0.0), r)

    def switch_stats(self) -> dict[str, int]:
        return self.switch.stats() if self.switch is not None else {}

    # -- running ------------------------------------------------------------------------------
    def on_host(self, host: int, command: Sequence[str], monotonic: int | None = None) -> list[str]:
        """command run in host's namespace under its hostname (and with CLOCK_MONOTONIC moved on by
        monotonic whole seconds: unshare takes no fractions)."""
        clock = ["--time", "--fork", "--kill-child", "--monotonic", str(monotonic)] if monotonic else []
        return ["ip", "netns", "exec", self.netns[host], "unshare", "--uts", *clock,
                "/bin/sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", self.hosts[host], *command]

    def launcher(self) -> Launcher:
        return Launcher(find_launcher(), args=(
            "--hostfile", str(self.hostfile), "--map-by", "node",
            "--prtemca", "plm_ssh_agent", str(self.agent),
            "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", SUBNET,
            "--prtemca", "oob_tcp_if_include", SUBNET, "--mca", "pml", "ob1",
        ))

    def mpirun(self, n_ranks: int, program: Sequence[str], monotonic: dict[int, int] | None = None,
               hide: Sequence[Path] = ()) -> list[str]:
        """The mpirun command line, run in node0's namespace. monotonic: {host: clock offset, whole s};
        hide: folders that every host but node0 sees empty (a file present only on the first host)."""
        if not 1 <= n_ranks <= self.n_hosts:
            raise MpillamaError(f"{n_ranks} ranks on {self.n_hosts} hosts: one rank per host")
        if any(len(str(d).split()) != 1 for d in hide):
            raise MpillamaError(f"folders to hide may not contain spaces: {list(hide)}")
        (self.folder / "hide").write_text(" ".join(str(Path(d).resolve()) for d in hide))
        offsets = monotonic or {}
        for i, host in enumerate(self.hosts[1:], start=1):  # the agent reads them (node0 runs mpirun itself)
            path = self.folder / f"{host}.monotonic"
            path.unlink(missing_ok=True)
            if offsets.get(i):
                path.write_text(str(offsets[i]))
        return self.on_host(0, self.launcher().command_line(n_ranks, program), offsets.get(0))

    def env(self, **extra: str) -> dict[str, str]:
        return self.launcher().env() | {"PYTHONPATH": str(ROOT), **extra}

    def run(self, n_ranks: int, program: Sequence[str], timeout: float = 300, monotonic: dict[int, int] | None = None,
            hide: Sequence[Path] = (), **env: str) -> subprocess.CompletedProcess[str]:
        """Run an MPI program across the first n_ranks hosts; whatever it leaves running is killed."""
        try:
            return subprocess.run(self.mpirun(n_ranks, program, monotonic, hide), env=self.env(**env), cwd=ROOT,
                                  capture_output=True, text=True, timeout=timeout)
        finally:
            self.reap()

    def run_mpillama(self, n_ranks: int, *args: str, timeout: float = 300, monotonic: dict[int, int] | None = None,
                     hide: Sequence[Path] = (), **env: str) -> subprocess.CompletedProcess[str]:
        return self.run(n_ranks, [sys.executable, "-m", "mpillama", *args], timeout, monotonic, hide, **env)

    def reap(self) -> None:
        """Kill whatever still runs in the host namespaces (a job that timed out or lost a rank)."""
        for ns in self.netns:
            _kill_processes(ns)

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self.switch is not None:
            self.switch.close()
        for ns in [*self.netns, self.switch_netns]:
            _kill_namespace(ns)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
