"""MPI communication: the only module that imports mpi4py.

Comm wraps a communicator with what every collective here needs: nonblocking calls on
preallocated numpy buffers (upper-case mpi4py calls, no pickle on the per-token path),
transfers split into --chunk-bytes pieces, and a --sync-timeout that ends the job naming
the ranks that never arrived instead of hanging. Gathers to rank 0 are point-to-point
receives, so rank 0 knows exactly which ranks are missing.

The sync strategies (DESIGN.md "One token, end to end") are StarSync, AllreduceSync and
ReplicatedSync (allreduce's wire, used only after the FFN: attention is computed whole on every rank):
wires only. What travels on them (a block's normalised input, the ranks' partial outputs, Q80
or f32) and what is computed from it is model.py's business.
"""

from __future__ import annotations

import pickle
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpillama.errors import MpillamaError
from mpillama.mpienv import needs_mpi, report_process_failures

# Every point-to-point tag of the job, in one table: no two kinds of message can ever match.
TAG_GATHER = 11  # gather_to_root (block partials, logits, trace records)
TAG_WEIGHTS = 21  # --weights scatter: rank 0 sends each rank its slices
TAG_PING = 31  # clock ping-pong of the trace
TAG_ALLGATHER = 41  # allgather (allreduce sync's Q80 partials)
SPIN_TESTS = 2000  # polls before a waiting rank starts yielding its core (oversubscribed runs)


class SyncTimeout(MpillamaError):
    """A collective did not complete within --sync-timeout seconds."""


class PeerLost(MpillamaError):
    """A rank's process failed mid-run (Open MPI reports it when the job spans hosts)."""


MPI: Any = None  # the mpi4py.MPI module, imported (which starts MPI) only for jobs launched by MPI


def start_mpi() -> Any:
    global MPI
    if MPI is None:
        report_process_failures()
        from mpi4py import MPI as module

        MPI = module
    return MPI


def world() -> Any:
    """MPI's world communicator, or a one-process stand-in when no MPI launcher started us."""
    return start_mpi().COMM_WORLD if needs_mpi() else SingleProcess()


def library_version() -> str:
    if MPI is None:
        return "none (one process without an MPI launcher)"
    return MPI.Get_library_version().splitlines()[0].strip()


def hostname() -> str:
    return socket.gethostname()


def abort(code: int) -> None:
    """End every rank of the job (used after one rank failed mid-run)."""
    if MPI is not None:
        MPI.COMM_WORLD.Abort(code)
    raise SystemExit(code)


class SingleProcess:
    """The subset of an mpi4py communicator a one-rank job uses, with nothing to send.

    Starting MPI costs about a second per run (Open MPI 5 in singleton mode), a third of the
    time to the first token; a `python -m mpillama ...` without mpirun never needs it.
    """

    def Dup(self) -> SingleProcess:
        return self

    def Free(self) -> None:
        pass

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def Barrier(self) -> None:
        pass

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list[Any]:
        return [obj]

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def Bcast(self, buf: Any, root: int = 0) -> None:
        pass

    def Gather(self, send: np.ndarray, recv: np.ndarray, root: int = 0) -> None:
        recv.reshape(-1)[: send.size] = send.reshape(-1)

    def Gatherv(self, send: np.ndarray, recv: Any, root: int = 0) -> None:
        out = recv[0].reshape(-1)
        out[: send.size] = send.reshape(-1)[: out.size]


class Comm:
    """A communicator with timeouts and chunked transfers."""

    def __init__(self, mpi_comm: Any, timeout: float, chunk_bytes: int) -> None:
        # A private duplicate (collective): nothing another user of mpi_comm sends or starts, nor a
        # previous engine in the same process, can ever match this engine's messages.
        if not isinstance(mpi_comm, SingleProcess):
            start_mpi()
        self.mpi = mpi_comm.Dup()
        self.rank: int = mpi_comm.Get_rank()
        self.size: int = mpi_comm.Get_size()
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.context = ""  # e.g. "step 12 layer 3 att_sync", set by the caller for error messages
        self.hosts: list[str] = [hostname()]
        self.hosts = self.allgather_obj(hostname())  # every rank's host, to name it when it goes missing

    def free(self) -> None:
        """Release the duplicate communicator (collective)."""
        self.mpi.Free()

    # -- waiting -------------------------------------------------------------------------
    def wait(self, reqs: list[Any], peers: list[int], timeout: float | None = -1.0) -> None:
        """Complete all requests; past the timeout, raise naming the peers of unfinished ones."""
        if timeout == -1.0:
            timeout = self.timeout
        if self._done(reqs, peers):
            return
        start = time.perf_counter()
        polls = 0
        while not self._done(reqs, peers):
            polls += 1
            if polls < SPIN_TESTS:
                continue
            waited = time.perf_counter() - start
            if timeout is not None and waited > timeout:
                missing = sorted({p for r, p in zip(reqs, peers) if not r.Test()})
                who = ", ".join(self.name_of(p) for p in missing) if missing else "unknown"
                raise SyncTimeout(
                    f"rank {self.rank}: {self.context or 'collective'} did not complete in {timeout:g} s; "
                    f"ranks that never arrived: {who}. Check those ranks' hosts, or raise --sync-timeout"
                )
            time.sleep(0 if waited < 0.005 else 0.0005)  # yield the core to ranks still computing

    def _done(self, reqs: list[Any], peers: list[int]) -> bool:
        """Whether every request completed; a peer's process that failed (reported when the job spans
        hosts: mpienv.report_process_failures) raises PeerLost naming it."""
        try:
            return MPI.Request.Testall(reqs)
        except MPI.Exception:
            raise PeerLost(f"rank {self.rank}: lost {self._failed(reqs, peers)} in {self.context or 'a collective'}: "
                           "its process ended mid-run. Check that host (a crash, a kill, its power), then start the job "
                           "again") from None

    def _failed(self, reqs: list[Any], peers: list[int]) -> str:
        """'rank 2 (host node2)': the failed ranks as MPI reports them, else the peers of failed requests."""
        ranks: list[int] = []
        try:
            group = self.mpi.Get_failed()
            ranks = [r for r in MPI.Group.Translate_ranks(group, list(range(group.Get_size())), self.mpi.Get_group())
                     if r >= 0]
            group.Free()
        except MPI.Exception:
            pass
        if not ranks:
            for req, peer in zip(reqs, peers):
                try:
                    req.Test()
                except MPI.Exception:
                    ranks.append(peer)
        ranks = sorted({r for r in ranks if r >= 0})
        if not ranks:
            return "a peer"
        return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(self.name_of(r) for r in ranks)

    def name_of(self, rank: int) -> str:
        """'3 (host rock4)', or just the number for a peer of a collective (-1: any rank)."""
        if 0 <= rank < len(self.hosts):
            return f"{rank} (host {self.hosts[rank]})"
        return str(rank) if rank >= 0 else "at least one rank"

    def chunks(self, buf: np.ndarray) -> list[np.ndarray]:
        """Byte views of buf, each at most chunk_bytes long."""
        flat = buf.reshape(-1).view(np.uint8)
        step = self.chunk_bytes
        return [flat[i : i + step] for i in range(0, max(flat.size, 1), step)] if flat.size else []

    # -- collectives ----------------------------------------------------------------------
    def bcast(self, buf: np.ndarray, root: int = 0, timeout: float | None = -1.0) -> None:
        if self.size == 1:
            return
        reqs = [self.mpi.Ibcast(part, root=root) for part in self.chunks(buf)]
        if timeout == -1.0 and self.rank != root:
            # the root may itself be waiting for a missing rank: let it time out first and name it
            timeout = 2 * self.timeout + 1.0
        self.wait(reqs, [root] * len(reqs), timeout)

    def gather_to_root(self, send: np.ndarray, recv: list[np.ndarray] | None) -> None:
        """Rank r's `send` lands in recv[r] on rank 0 (recv ignored elsewhere; recv[0] unused)."""
        if self.size == 1:
            return
        if self.rank == 0:
            assert recv is not None and len(recv) == self.size
            reqs, peers = [], []
            for r in range(1, self.size):
                for part in self.chunks(recv[r]):
                    reqs.append(self.mpi.Irecv(part, source=r, tag=TAG_GATHER))
                    peers.append(r)
            self.wait(reqs, peers)
        else:
            reqs = [self.mpi.Isend(part, dest=0, tag=TAG_GATHER) for part in self.chunks(send)]
            self.wait(reqs, [0] * len(reqs))

    def send(self, buf: np.ndarray, dest: int, tag: int, timeout: float | None = -1.0) -> None:
        """buf to rank dest, in chunks (the receiver must post recv with the same size and tag)."""
        reqs = [self.mpi.Isend(part, dest=dest, tag=tag) for part in self.chunks(np.ascontiguousarray(buf))]
        self.wait(reqs, [dest] * len(reqs), timeout)

    def recv(self, buf: np.ndarray, source: int, tag: int, timeout: float | None = -1.0) -> None:
        """Fill buf (contiguous) from rank source's send of the same size and tag."""
        reqs = [self.mpi.Irecv(part, source=source, tag=tag) for part in self.chunks(buf)]
        self.wait(reqs, [source] * len(reqs), timeout)

    def allreduce_sum(self, buf: np.ndarray) -> None:
        """In-place sum over ranks (f32). Chunks are reduced separately."""
        if self.size == 1:
            return
        flat = buf.reshape(-1)
        step = max(self.chunk_bytes // flat.itemsize, 1)
        reqs = [self.mpi.Iallreduce(MPI.IN_PLACE, flat[i : i + step], op=MPI.SUM) for i in range(0, flat.size, step)]
        self.wait(reqs, [-1] * len(reqs))

    def allgather(self, send: np.ndarray, recv: np.ndarray) -> None:
        """recv[r] = send of rank r, for every rank (recv[r] contiguous).

        Point to point, every rank to every other at once: one trip on the wire whatever the rank
        count (a tree allgather takes log2(n)), and a rank that never sends is named by the others.
        """
        self.finish(self.start_allgather(send, recv))

    def start_allgather(self, send: np.ndarray, recv: np.ndarray) -> tuple[list[Any], list[int]]:
        """allgather's messages posted, not waited for: finish() them (compute may run meanwhile)."""
        recv[self.rank] = send
        reqs: list[Any] = []
        peers: list[int] = []
        if self.size == 1:
            return reqs, peers
        for r in range(self.size):
            if r != self.rank:
                reqs += [self.mpi.Irecv(part, source=r, tag=TAG_ALLGATHER) for part in self.chunks(recv[r])]
                peers += [r] * (len(reqs) - len(peers))
        for r in range(self.size):
            if r != self.rank:
                reqs += [self.mpi.Isend(part, dest=r, tag=TAG_ALLGATHER) for part in self.chunks(send)]
                peers += [r] * (len(reqs) - len(peers))
        return reqs, peers

    def finish(self, pending: tuple[list[Any], list[int]]) -> None:
        """Wait for messages start_allgather posted (with the timeout, naming missing peers)."""
        reqs, peers = pending
        if reqs:
            self.wait(reqs, peers)

    # -- start-up (pickle is fine here) ---------------------------------------------------
    def agree(self, error: BaseException | None) -> None:
        """Collective check-point: if any rank failed, every rank raises the first failure.

        Every rank calls it after local work (loading, validation), so one rank's bad input
        stops the job cleanly instead of leaving the others waiting in a collective.
        """
        # bad input (our errors, unreadable files) is said in one line; a bug keeps its traceback
        user_error = isinstance(error, (MpillamaError, OSError))
        message = None if error is None else (str(error) if user_error else repr(error))
        if self.size == 1:
            failures = [(0, message)] if message else []
        else:
            req = self.mpi.Iallgather(np.array([0 if message is None else 1], dtype=np.int32),
                                      flags := np.zeros(self.size, dtype=np.int32))
            self.wait([req], [-1])
            failures = []
            if flags.any():
                messages = self.mpi.allgather(message)
                failures = [(r, m) for r, m in enumerate(messages) if m]
        if failures:
            rank, text = failures[0]
            if user_error or rank != self.rank or error is None:
                raise MpillamaError(text if rank == 0 else f"rank {rank}: {text}")
            raise error

    # Python objects (start-up, trace metadata): pickled into byte buffers, so that they keep the timeout
    def bcast_obj(self, obj: Any, timeout: float | None = -1.0) -> Any:
        """Rank 0's obj on every rank."""
        if self.size == 1:
            return obj
        data = pickle.dumps(obj) if self.rank == 0 else b""
        n = np.array([len(data)], np.int64)  # (1,) i64 pickled length
        self.bcast(n, timeout=timeout)
        buf = np.frombuffer(data, np.uint8).copy() if self.rank == 0 else np.empty(int(n[0]), np.uint8)
        self.bcast(buf, timeout=timeout)
        return obj if self.rank == 0 else pickle.loads(buf.tobytes())

    def gather_obj(self, obj: Any) -> list[Any] | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        n = np.array([data.size], np.int64)  # (1,) i64
        sizes = np.zeros((self.size, 1), np.int64) if self.rank == 0 else None  # (n_ranks, 1) i64 on rank 0
        self.gather_to_root(n, list(sizes) if sizes is not None else None)
        if self.rank != 0:
            self.gather_to_root(data, None)
            return None
        assert sizes is not None
        recv = [np.empty(int(k), np.uint8) for k in sizes[:, 0]]
        self.gather_to_root(data, recv)
        return [obj] + [pickle.loads(r.tobytes()) for r in recv[1:]]

    def allgather_obj(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        return self.bcast_obj(self.gather_obj(obj))

    def barrier(self) -> None:
        if self.size > 1:
            self.wait([self.mpi.Ibarrier()], [-1])


# -- control messages: what the workers do next --------------------------------------------
CMD_FORWARD = 1
CMD_STOP = 2


@dataclass
class Control:
    """Rank 0 broadcasts one of these before every forward pass."""

    buf: np.ndarray  # (4 + max_tokens,) int64: cmd, n_tokens, position, logits mode, tokens...

    @classmethod
    def new(cls, max_tokens: int) -> Control:
        return cls(np.zeros(4 + max_tokens, dtype=np.int64))

    def set(self, cmd: int, tokens: np.ndarray | list[int], pos: int, mode: int) -> None:
        self.buf[0], self.buf[1], self.buf[2], self.buf[3] = cmd, len(tokens), pos, mode
        self.buf[4 : 4 + len(tokens)] = tokens

    @property
    def cmd(self) -> int:
        return int(self.buf[0])

    @property
    def n_tokens(self) -> int:
        return int(self.buf[1])

    @property
    def pos(self) -> int:
        return int(self.buf[2])

    @property
    def mode(self) -> int:
        return int(self.buf[3])

    @property
    def tokens(self) -> np.ndarray:
        return self.buf[4 : 4 + self.n_tokens]


# -- the sync strategies: wires between the blocks of model.py's forward pass ----------------
class StarSync:
    """Rank 0 keeps the residual stream: it spreads each block's input (Bcast) and collects the
    ranks' partial outputs (Gather)."""

    name = "star"

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.owns_residual = comm.rank == 0
        self.spreads_input = comm.size > 1  # the block input crosses the wire (not under one rank)

    def spread(self, payload: np.ndarray) -> None:
        """Rank 0's payload to every rank."""
        self.comm.bcast(payload)

    def collect(self, send: np.ndarray, recv: list[np.ndarray] | None) -> None:
        """Rank r's send into recv[r] on rank 0."""
        self.comm.gather_to_root(send, recv)


class AllreduceSync:
    """Every rank keeps the residual stream; the partials are exchanged so every rank sums them."""

    name = "allreduce"

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.owns_residual = True
        self.spreads_input = False

    def exchange(self, send: np.ndarray, recv: np.ndarray) -> None:
        """recv[r] = rank r's send, on every rank (Q80 partials: each rank sums them in rank order)."""
        self.comm.allgather(send, recv)

    def start_exchange(self, send: np.ndarray, recv: np.ndarray) -> tuple[list[Any], list[int]]:
        """exchange, posted only: finish() it (the next chunk of a prefill block computes meanwhile)."""
        return self.comm.start_allgather(send, recv)

    def finish(self, pending: tuple[list[Any], list[int]]) -> None:
        self.comm.finish(pending)

    def sum(self, buf: np.ndarray) -> None:
        """buf = the sum over ranks of buf, in place (f32 partials)."""
        self.comm.allreduce_sum(buf)

    def collect(self, send: np.ndarray, recv: list[np.ndarray] | None) -> None:
        """Rank r's send into recv[r] on rank 0 (the logits)."""
        self.comm.gather_to_root(send, recv)


class ReplicatedSync(AllreduceSync):
    """allreduce's wire after the FFN only: every rank holds every attention head (partition.plan with
    replicate_attention) and adds the whole attention output to its own residual stream, no message."""

    name = "replicated"


SYNCS = {"star": StarSync, "allreduce": AllreduceSync, "replicated": ReplicatedSync}
STAR_MARGIN = 0.9  # --sync auto picks star only when its measured block sync is this much faster
# --sync auto replicates attention only when the extra compute per layer is under this share of the wire
# time per layer it saves: the speed is measured from memory on a short run, the wire on its fastest round
REPLICATED_MARGIN = 0.5
WIRE_ROUNDS = 12  # timed passes of each wire pattern at start-up (--sync auto); the fastest counts
WIRE_RUN = 8  # syncs back to back per pass: the skew a barrier leaves (a one-way trip) spreads over them
OVERLAP_ROUNDS = 6  # rounds timing a full prefill block's exchange
OVERLAP_MIN_S = 5e-4  # overlap prefill chunks only when a block's exchange takes longer than this
OVERLAP_CHUNKS = 2  # token chunks of an overlapped prefill block output


def make_sync(kind: str, comm: Comm) -> StarSync | AllreduceSync | ReplicatedSync:
    return SYNCS[kind](comm)


def time_wires(comm: Comm, payload_bytes: int, rounds: int = WIRE_ROUNDS) -> dict[str, float]:
    """Collective. Seconds one block's sync takes under each strategy, timed on this link with a
    decode token's payload (one Q80 row of dim): star = Bcast of the input + Gather of the partials,
    allreduce = one Allgather of the partials. Rounds alternate between the two, so both see the
    same state of the machine; the fastest round of each is rank 0's figure, shared with every rank:
    other load only ever adds to a round, so the fastest is what the link itself costs.
    A round is WIRE_RUN syncs back to back, as a token's blocks run them: a barrier lets the ranks go a
    one-way trip apart, and a single sync timed after it would count that trip too (at 0.5 ms one way
    the allgather measured two trips, as long as star's Bcast + Gather)."""
    send = np.zeros(payload_bytes, np.uint8)  # (payload,) one rank's Q80 row
    recv = np.zeros((comm.size, payload_bytes), np.uint8)  # (n_ranks, payload)
    gathered = list(recv) if comm.rank == 0 else None
    star, allreduce = [], []
    for _ in range(rounds):
        comm.barrier()
        t = time.perf_counter()
        for _ in range(WIRE_RUN):
            comm.bcast(send)
            comm.gather_to_root(send, gathered)
        star.append((time.perf_counter() - t) / WIRE_RUN)
        comm.barrier()
        t = time.perf_counter()
        for _ in range(WIRE_RUN):
            comm.allgather(send, recv)
        allreduce.append((time.perf_counter() - t) / WIRE_RUN)
    comm.barrier()
    mine = {"star": float(np.min(star)), "allreduce": float(np.min(allreduce))}
    return comm.bcast_obj(mine)


def choose_overlap(comm: Comm, sync_kind: str, block_bytes: int, requested: int = 0) -> tuple[int, str]:
    """(chunks, why): in how many token chunks a prefill block's output goes on the wire, each while
    the next chunk computes (allreduce, Q80). Chunks re-read the output matrix once each, so they
    pay only where the wire is slow: when one full prefill block output (block_bytes per rank)
    takes more than OVERLAP_MIN_S to exchange, measured here."""
    if sync_kind == "star" or comm.size == 1:
        return 1, "no overlap: " + ("one rank" if comm.size == 1 else "star sync")
    if requested:
        return requested, f"--prefill-chunks {requested}"
    send = np.zeros(block_bytes, np.uint8)  # (payload,) one rank's prefill block output
    recv = np.zeros((comm.size, block_bytes), np.uint8)  # (n_ranks, payload)
    times = []
    comm.barrier()
    for _ in range(OVERLAP_ROUNDS):
        t = time.perf_counter()
        comm.allgather(send, recv)
        times.append(time.perf_counter() - t)
        comm.barrier()
    t_wire = comm.bcast_obj(float(np.min(times)))  # the link's own cost: load only adds
    chunks = OVERLAP_CHUNKS if t_wire > OVERLAP_MIN_S else 1
    return chunks, f"a prefill block output takes {t_wire * 1e3:.2f} ms on the wire: {chunks} chunk(s)"


def pick_sync(wire: dict[str, float], extra_att_s: float | None) -> tuple[str, str]:
    """(strategy, why) from start-up timings: wire = seconds of one block's sync per strategy (time_wires),
    extra_att_s = the seconds per layer the slowest rank would compute more with attention replicated
    (None: not measured, replicated not considered). Pure: the measuring is choose_sync's.

    Per layer, star and allreduce pay two block syncs; replicated pays one allreduce exchange (after
    the FFN) and computes the attention weights the other ranks held: it is picked only when that
    extra compute is under REPLICATED_MARGIN of the wire time it saves."""
    # star only when clearly faster: within the noise, allreduce's single trip per block is the safer bet
    kind = "star" if wire["star"] < STAR_MARGIN * wire["allreduce"] else "allreduce"
    why = (f"auto: one block's sync measured {wire['allreduce'] * 1e6:.0f} us with allreduce, "
           f"{wire['star'] * 1e6:.0f} us with star")
    if extra_att_s is None:
        return kind, why
    saved = 2 * wire[kind] - wire["allreduce"]  # per layer: two of the chosen syncs become one exchange
    replicate = extra_att_s < REPLICATED_MARGIN * saved
    why += (f"; replicated attention would save {saved * 1e6:.0f} us of wire and cost "
            f"{extra_att_s * 1e6:.0f} us of compute per layer")
    return ("replicated" if replicate else kind), why


def choose_sync(comm: Comm, requested: str, payload_bytes: int,
                extra_att_s: float | None = None) -> tuple[str, str]:
    """(strategy, why): what --sync asked for, or under 'auto' the fastest by what is measured here.

    star and allreduce compute the same tokens; they differ in hops per block (star: a Bcast and a
    Gather, two one-way trips; allreduce: one exchange) and in who adds the partials (rank 0 alone,
    or every rank: a few microseconds at these sizes). So the link decides, and it is measured,
    not guessed: on shared memory the two are close, on a network allreduce's single trip wins.
    replicated trades hops for compute: extra_att_s is this rank's measured extra seconds per layer
    (None: do not consider it); the slowest rank's counts, since every layer waits for it.
    """
    if requested != "auto":
        return requested, "--sync " + requested
    if comm.size == 1:
        return "star", "auto: one rank, nothing crosses a wire"
    t = time_wires(comm, payload_bytes)
    extra = comm.allgather_obj(extra_att_s)
    return pick_sync(t, None if None in extra else max(extra))
