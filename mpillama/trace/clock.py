"""Clock offsets between ranks: ping-pong estimation and the one function that aligns times to rank 0.

Each rank times segments with its own perf_counter. Rank 0 measures every other rank's
offset (rank clock minus rank 0 clock) by ping-pong at the start and at the end of a run,
keeping the round trip with the smallest duration: its midpoint assumption is then off by
at most rtt/2. Between the two samples the offset is taken to change linearly (drift).

Talks through comm.Comm (its timeout and its tag table); never imports mpi4py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpillama.comm import TAG_PING

ROUNDS = 32  # round trips per rank; the shortest one is kept


@dataclass(frozen=True)
class ClockSample:
    """One offset estimate: at the rank's local time t_local its clock read `offset` s more than rank 0's."""

    t_local: float
    offset: float
    rtt: float  # s, round trip of the sample (error bound: |true - offset| <= rtt / 2)


@dataclass(frozen=True)
class ClockFit:
    """A rank's offset over the run: the start sample, and the end sample when the run finished."""

    start: ClockSample
    end: ClockSample | None = None

    def _resolved(self) -> bool:
        """True when the two samples differ by more than their error bounds: only then is drift measured."""
        if self.end is None or self.end.t_local <= self.start.t_local:
            return False
        return abs(self.end.offset - self.start.offset) > 0.5 * (self.start.rtt + self.end.rtt)

    @property
    def base(self) -> ClockSample:
        """The sample the correction starts from: the start one, or the tighter of two that agree."""
        if self.end is not None and not self._resolved() and self.end.rtt < self.start.rtt:
            return self.end
        return self.start

    @property
    def drift(self) -> float:
        """s of offset change per s of local time; 0 when the samples agree within their error
        (a noisy round trip over a short run would otherwise invent a large drift)."""
        if not self._resolved():
            return 0.0
        assert self.end is not None
        return (self.end.offset - self.start.offset) / (self.end.t_local - self.start.t_local)


ZERO_FIT = ClockFit(ClockSample(0.0, 0.0, 0.0), ClockSample(0.0, 0.0, 0.0))  # rank 0 against itself


def to_rank0(t_local: np.ndarray, fit: ClockFit) -> np.ndarray:
    """Times read on a rank's clock -> the same instants on rank 0's clock. The only place clocks are aligned."""
    base = fit.base
    offset = base.offset + fit.drift * (t_local - base.t_local)
    return t_local - offset


def ping_pong(comm: Any, rounds: int = ROUNDS) -> list[ClockSample] | None:
    """Collective over a comm.Comm. On rank 0: one sample per rank (rank 0's own is zero); on the others: None."""
    rank, size = comm.rank, comm.size
    buf = np.zeros(1, np.float64)  # (1,) f64: the ping carries nothing, the pong the worker's clock
    comm.barrier()
    if rank != 0:
        for _ in range(rounds):
            comm.recv(buf, 0, TAG_PING, timeout=2 * comm.timeout + 1.0)  # rank 0 pings the ranks in turn
            buf[0] = time.perf_counter()
            comm.send(buf, 0, TAG_PING)
        return None
    samples = [ClockSample(0.0, 0.0, 0.0)]
    for peer in range(1, size):
        best: ClockSample | None = None
        for _ in range(rounds):
            t1 = time.perf_counter()
            comm.send(buf, peer, TAG_PING)
            comm.recv(buf, peer, TAG_PING)
            t2 = time.perf_counter()
            sample = ClockSample(t_local=float(buf[0]), offset=float(buf[0]) - 0.5 * (t1 + t2), rtt=t2 - t1)
            if best is None or sample.rtt < best.rtt:
                best = sample
        assert best is not None
        samples.append(best)
    return samples
