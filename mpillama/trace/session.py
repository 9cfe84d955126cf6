"""One run's trace: collecting every rank's records on rank 0 and writing the HDF5 file.

Owns TraceSession (open / end_step / close / write_partial: the calls the engine makes)
and write_trace (the HDF5 writer, callable without MPI from a TraceData, which is how
tests and tools write files). The file layout comes from schema.py; clock alignment
from clock.to_rank0.

Flush policy: records stay in each rank's Recorder and are gathered to rank 0 every
K steps (each flush is itself recorded, as an "other" segment). K starts at 1 (the
first flush measures how many records and seconds a step takes) and is then set by
rank 0 so that the fullest rank stays under half its capacity and a flush comes about
every CHECKPOINT_S seconds; it is broadcast at each flush, so all ranks agree without
any per-step communication.

Checkpoints: at a flush, rank 0 rewrites the file (atomically) marked partial, about every
CHECKPOINT_S seconds: at the flush nearest that mark (flushes are planned that far apart but
come a little sooner or later: "at least CHECKPOINT_S since the last one" skipped every other
flush and doubled the interval). A checkpoint that takes longer than CHECKPOINT_BUDGET of the time since the
last one spaces the next ones out, up to about CHECKPOINT_MAX_S (see checkpoint_due). Partial
files are written without compression (several times faster; the final file is compressed).
A job killed outright (mpirun kills every rank within milliseconds of its own SIGTERM, often
before a handler can finish) still leaves the last checkpoint; write_partial, when it gets to
run, replaces it with everything rank 0 holds.

Talks through comm.Comm (its --sync-timeout and its tag table); never imports mpi4py.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

import mpillama
from mpillama.atomic import atomic_write
from mpillama.comm import Comm, library_version
from mpillama.errors import MpillamaError
from mpillama.h5attrs import h5_value
from mpillama.trace import analysis, schema
from mpillama.trace.clock import ZERO_FIT, ClockFit, ClockSample, ping_pong, to_rank0
from mpillama.trace.recorder import PHASES, SEG_OTHER, SEGMENTS, NullRecorder, Recorder

DEFAULT_CAPACITY = 1 << 16  # records per rank between flushes (~2.8 MB of columns)
HEADROOM = 0.5  # flush when the fullest rank is expected to be half full: steps vary in length
CHECKPOINT_S = 5.0  # flush, and rewrite the file marked partial, about this often (s)
CHECKPOINT_BUDGET = 0.02  # at most this fraction of rank 0's time goes into checkpoints (up to CHECKPOINT_MAX_S)
CHECKPOINT_MAX_S = 10.0  # the budget never spaces checkpoints further apart than the flush nearest this (s)


@dataclass
class TraceData:
    """Everything a trace file holds, before alignment: each rank's records on its own clock."""

    meta: dict[str, Any]  # run metadata -> root attributes
    rank_rows: list[dict[str, Any]]  # per rank: schema.RANK_COLUMNS keys (+ n_dropped, n_flushes, flush_s)
    fits: list[ClockFit]  # per rank: its clock against rank 0's
    records: list[np.ndarray]  # per rank: (n_rec, 6) f64 [step, layer, seg, t_start, t_end, nbytes], own clock
    steps: dict[str, np.ndarray]  # rank 0's step table (schema.STEP_COLUMNS), rank 0's clock
    clock_origin: float = 0.0  # rank 0's perf_counter when the run began; file times count from it
    summary: dict[str, Any] = field(default_factory=dict)
    partial: bool = False
    partial_reason: str = ""

    @classmethod
    def from_recorders(
        cls,
        recorders: list[Recorder],
        meta: dict[str, Any],
        rank_infos: list[dict[str, Any]],
        fits: list[ClockFit] | None = None,
        clock_origin: float = 0.0,
        summary: dict[str, Any] | None = None,
    ) -> TraceData:
        """Recorders of every rank held in one process (tests, tools). Empties them."""
        rows = [dict(_rank_row(info), n_dropped=rec.dropped) for info, rec in zip(rank_infos, recorders)]
        return cls(
            meta=meta, rank_rows=rows, fits=fits or [ZERO_FIT] * len(recorders),
            records=[rec.take() for rec in recorders], steps=recorders[0].step_table(),
            clock_origin=clock_origin, summary=dict(summary or {}),
        )


def _rank_row(rank_info: dict[str, Any]) -> dict[str, Any]:
    schema.check_rank_info(rank_info)
    row = {name: default for name, (_, default) in schema.RANK_COLUMNS.items()}
    row.update(host=socket.gethostname(), pid=os.getpid())
    row.update(rank_info)
    return row


# ---------------------------------------------------------------------------------------- writing


def aligned_columns(data: TraceData) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """/segments and /steps columns on rank 0's clock, seconds since data.clock_origin, segments by (rank, t_start)."""
    parts = []
    for rank, (rec, fit) in enumerate(zip(data.records, data.fits)):
        rec = rec.reshape(-1, 6)
        parts.append((
            rec[:, 0], np.full(len(rec), rank), rec[:, 1], rec[:, 2],
            to_rank0(rec[:, 3], fit) - data.clock_origin, to_rank0(rec[:, 4], fit) - data.clock_origin, rec[:, 5],
        ))
    names = list(schema.SEGMENT_COLUMNS)
    cols = {
        name: np.concatenate([p[i] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)
        for i, (name, dtype) in enumerate(schema.SEGMENT_COLUMNS.items())
    }
    order = np.lexsort((cols["t_start"], cols["rank"]))
    cols = {name: cols[name][order] for name in names}
    steps = {name: np.asarray(data.steps.get(name, np.zeros(0)), dtype) for name, dtype in schema.STEP_COLUMNS.items()}
    steps["t_start"] = steps["t_start"] - data.clock_origin
    steps["t_end"] = steps["t_end"] - data.clock_origin
    return cols, steps


def _rank_columns(data: TraceData, seg_cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(data.rank_rows)
    rows = [dict(row) for row in data.rank_rows]
    counts = np.bincount(seg_cols["rank"].astype(np.int64), minlength=n)
    for r, (row, fit) in enumerate(zip(rows, data.fits)):
        end = fit.end
        row.update(
            rank=r, clock_offset=fit.start.offset, clock_rtt=fit.start.rtt, clock_drift=fit.drift,
            clock_offset_end=end.offset if end else np.nan, clock_rtt_end=end.rtt if end else np.nan,
            n_records=int(counts[r]),
        )
    out = {}
    for name, (dtype, default) in {**schema.RANK_TRACE_COLUMNS, **schema.RANK_COLUMNS}.items():
        values = [row.get(name, default) for row in rows]
        out[name] = np.array(values, dtype=h5py.string_dtype()) if dtype is str else np.array(values, dtype)
    return out


def _derived_summary(seg_cols: dict[str, np.ndarray], step_cols: dict[str, np.ndarray], n_ranks: int) -> dict[str, Any]:
    """tok/s per phase and per-rank ms per token, computed from the records being written."""
    trace = analysis.Trace(
        path="", attrs={"n_ranks": n_ranks}, ranks={},
        segments=analysis.Segments(*(seg_cols[c] for c in schema.SEGMENT_COLUMNS)),
        steps=analysis.Steps(*(step_cols[c] for c in schema.STEP_COLUMNS)),
        segment_names=SEGMENTS, phase_names=PHASES,
    )
    times = analysis.step_times(trace, analysis.collectives(trace))
    out: dict[str, Any] = {}
    for phase, row in analysis.phase_table(trace, times).items():
        out[f"{phase}_tok_s"] = row["tok_s"]
    tokens = max(int(times.tokens.sum()), 1)
    out["compute_ms_per_token"] = times.compute.sum(axis=0) * 1e3 / tokens
    out["sync_ms_per_token"] = times.sync.sum(axis=0) * 1e3 / tokens
    out["wait_ms_per_token"] = times.wait.sum(axis=0) * 1e3 / tokens
    return out


def _write_columns(group: h5py.Group, cols: dict[str, np.ndarray], chunked: bool, compress: bool = True) -> None:
    for name, values in cols.items():
        if not chunked:
            group.create_dataset(name, data=values)
            continue
        packing = dict(compression=schema.COMPRESSION, compression_opts=schema.COMPRESSION_LEVEL, shuffle=True)
        group.create_dataset(
            name, data=values, maxshape=(None,), chunks=(max(1, min(len(values), schema.CHUNK_ROWS)),),
            **(packing if compress else {}),
        )


def write_trace(path: str | Path, data: TraceData, fsync: bool = True, compress: bool = True) -> Path:
    """Write data to path atomically (see mpillama.atomic). Returns path.

    fsync=False skips forcing the bytes to disk before the rename (partial writes racing a kill:
    the rename alone already guarantees no process ever sees a half-written file).
    compress=False stores /segments uncompressed (checkpoints: several times faster to write).
    """
    path = Path(path)
    seg_cols, step_cols = aligned_columns(data)
    n_ranks = len(data.rank_rows)
    summary = {**_derived_summary(seg_cols, step_cols, n_ranks), **data.summary}
    attrs: dict[str, Any] = {name: "" for name in schema.META_ATTRS}
    attrs.update(data.meta)
    attrs.update(
        format=schema.FORMAT, version=schema.FORMAT_VERSION,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        n_ranks=n_ranks, partial=bool(data.partial), partial_reason=data.partial_reason,
        clock_origin=float(data.clock_origin), mpillama_version=mpillama.__version__,
    )
    attrs.setdefault("mpi_library_version", "")
    attrs.update({schema.SUMMARY_PREFIX + k: v for k, v in summary.items()})
    with atomic_write(path, fsync) as part, h5py.File(part, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = h5_value(value)
        _write_columns(f.create_group(schema.RANKS), _rank_columns(data, seg_cols), chunked=False)
        g = f.create_group(schema.SEGMENTS_GROUP)
        _write_columns(g, seg_cols, chunked=True, compress=compress)
        g.attrs[schema.SEGMENT_NAMES_ATTR] = np.array(SEGMENTS, dtype=h5py.string_dtype())
        s = f.create_group(schema.STEPS)
        _write_columns(s, step_cols, chunked=False)
        s.attrs[schema.PHASE_NAMES_ATTR] = np.array(PHASES, dtype=h5py.string_dtype())
    return path


# ---------------------------------------------------------------------------------------- the session


def checkpoint_due(since: float, next_flush_s: float, cost: float, checkpoint_s: float) -> bool:
    """Whether a flush `since` s after the last checkpoint began, the next flush expected in
    next_flush_s, should write one, the last having taken `cost` s.

    Flushes are planned about checkpoint_s apart, but steps change speed (a busy host), so a flush
    comes a little sooner or later than planned: a checkpoint goes at the flush nearest a mark
    (waiting for the next would overshoot it more than this one falls short). "The first flush
    past the mark" would skip the flush just before it and make the interval twice as long.
    The mark is checkpoint_s, unless the budget (cost at most CHECKPOINT_BUDGET of the time since
    the last one) asks for more: then at least that long, but at the flush nearest
    CHECKPOINT_MAX_S at the latest, whatever the budget says.
    """
    nearest = since + next_flush_s / 2  # past the mark: this flush is nearer it than the next
    return nearest >= checkpoint_s and (since >= cost / CHECKPOINT_BUDGET or nearest >= CHECKPOINT_MAX_S)


def _check_writable(path: str) -> str | None:
    """Why rank 0 could not write the trace at path, or None."""
    p = Path(path)
    if p.is_dir():
        return f"--trace {path} is a directory: give a file name such as run.h5"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return f"--trace {path}: directory {parent} does not exist; create it or choose another path"
    if not os.access(parent, os.W_OK):
        return f"--trace {path}: directory {parent} is not writable; choose another path"
    return None


class TraceSession:
    """One rank's part of a traced run. Create with TraceSession.open (collective)."""

    def __init__(self, comm: Comm, path: str | None, recorder: Recorder | NullRecorder) -> None:
        self.comm = comm
        self.path = path
        self.recorder = recorder
        self.active = path is not None
        self.rank = recorder.rank
        self.meta: dict[str, Any] = {}
        self.rank_rows: list[dict[str, Any]] = []  # rank 0: one per rank, from open
        self.start_samples: list[ClockSample] = []  # rank 0: one per rank
        self.chunks: list[list[np.ndarray]] = []  # rank 0: per rank, the records flushed so far
        self.worker_dropped: np.ndarray = np.zeros(0, np.int64)  # rank 0: (n_ranks,) dropped counts at the last flush
        self.clock_origin = 0.0
        self.flush_every = 1
        self.since_flush = 0
        self.n_flushes = 0
        self.flush_s = 0.0
        self.done = False
        self.writing = False
        self.pending: tuple[str, Callable[[], None] | None] | None = None  # a write_partial that came mid-write
        self.checkpoint_s = CHECKPOINT_S
        self.n_checkpoints = 0
        self.checkpoint_cost = 0.0  # s the last checkpoint took
        self.last_checkpoint_t = 0.0  # when the last checkpoint began
        self.last_flush_t = 0.0

    @classmethod
    def open(
        cls, comm: Comm, path: str | None, meta: dict[str, Any], rank_info: dict[str, Any],
        capacity: int = DEFAULT_CAPACITY, checkpoint_s: float = CHECKPOINT_S,
    ) -> TraceSession:
        """Collective (except with path None, which communicates nothing and records nothing).

        checkpoint_s: the target seconds between flushes and partial checkpoints (<= 0: no checkpoints).
        """
        rank, size = comm.rank, comm.size
        if path is None:
            return cls(comm, None, NullRecorder(rank))
        row = _rank_row(rank_info)  # raises on every rank alike: all ranks pass the same keys
        problem = _check_writable(path) if rank == 0 else None
        problem = comm.bcast_obj(problem)
        if problem:
            raise MpillamaError(problem)
        if capacity <= 0:
            raise MpillamaError(f"trace capacity {capacity} must be positive: pass records per rank between flushes")
        self = cls(comm, str(path), Recorder(rank, capacity))
        self.checkpoint_s = checkpoint_s
        rows = comm.gather_obj(row)
        samples = ping_pong(comm)
        if rank == 0:
            self.meta = {**meta, "mpi_library_version": meta.get("mpi_library_version") or library_version()}
            self.rank_rows = rows
            self.start_samples = samples
            self.chunks = [[] for _ in range(size)]
            self.worker_dropped = np.zeros(size, np.int64)
            self.clock_origin = self.last_flush_t = time.perf_counter()
        return self

    def flushed_records(self, rank: int) -> list[np.ndarray]:
        """Rank 0: the records of rank `rank` gathered so far, as (n, 6) f64 blocks (see Recorder.take)."""
        return self.chunks[rank] if self.chunks else []

    def end_step(self) -> None:
        """Collective, after every step on every rank: flushes to rank 0 every flush_every steps."""
        if not self.active:
            return
        self.since_flush += 1
        if self.since_flush >= self.flush_every:
            self._flush()

    def _flush(self, final: bool = False) -> None:
        """Collective: every rank's held records -> rank 0; rank 0 picks and broadcasts the next interval.

        The flush is recorded as an "other" segment of the step it follows, so that a rank's
        segments still tile its time (a worker waits here while rank 0 samples).
        """
        t = time.perf_counter()
        comm, rec = self.comm, self.recorder
        size = comm.size
        held = rec.n
        packed = rec.take()  # (held, 6) f64
        if self.rank == 0:
            self.chunks[0].append(packed)  # kept before any communication: a signal mid-flush loses nothing of rank 0's
            packed = np.zeros(0, np.float64)
        counts = np.array([held, rec.dropped], np.int64)  # (2,) i64
        all_counts = np.zeros((size, 2), np.int64) if self.rank == 0 else None  # (n_ranks, 2) i64
        comm.gather_to_root(counts, list(all_counts) if all_counts is not None else None)
        if self.rank == 0:
            all_counts[0] = counts
            recv = [np.empty((int(n), 6), np.float64) for n in all_counts[:, 0]]  # per rank (held, 6) f64
            comm.gather_to_root(packed, recv)
            for r in range(1, size):
                self.chunks[r].append(recv[r])
            self.worker_dropped = all_counts[:, 1].copy()
            rate = all_counts[:, 0].max() / max(self.since_flush, 1)  # records per step, fullest rank
            step_s = max((t - self.last_flush_t) / max(self.since_flush, 1), 1e-6)
            by_capacity = max(1, int(HEADROOM * rec.capacity / max(rate, 1.0)))
            by_time = max(1, int(self.checkpoint_s / step_s)) if self.checkpoint_s > 0 else by_capacity
            nxt = np.array([min(by_capacity, by_time)], np.int64)
            self.last_flush_t = t
            if not final:
                self._checkpoint(int(nxt[0]) * step_s)
        else:
            comm.gather_to_root(packed, None)
            nxt = np.zeros(1, np.int64)
        comm.bcast(nxt)
        self.flush_every = int(nxt[0])
        self.since_flush = 0
        self.n_flushes += 1
        now = time.perf_counter()
        self.flush_s += now - t
        if not final:
            rec.add(SEG_OTHER, -1, t, now)

    def _checkpoint(self, next_flush_s: float) -> None:
        """Rank 0, inside a flush, the next expected in next_flush_s: rewrite the file marked
        partial, if one is due."""
        now = time.perf_counter()
        if self.checkpoint_s <= 0 or (self.n_checkpoints and not checkpoint_due(
                now - self.last_checkpoint_t, next_flush_s, self.checkpoint_cost, self.checkpoint_s)):
            return
        try:
            self._write_partial(f"checkpoint: the run had not ended (last step {self.recorder.step})")
        except Exception as exc:  # a failed checkpoint must not strand the other ranks in this flush
            self.checkpoint_s = 0.0  # no more tries; close() still writes (and reports) the final file
            self.meta["checkpoint_error"] = f"{type(exc).__name__}: {exc}"
            return
        self.n_checkpoints += 1
        self.last_checkpoint_t = now
        self.checkpoint_cost = time.perf_counter() - now

    def _write_partial(self, reason: str) -> None:
        """Rank 0: write what it holds now, marked partial, without forcing it to disk or compressing
        it: every partial write races a kill (the final file, written by close, is compressed)."""
        fits = [ClockFit(s) for s in self.start_samples]
        fits[0] = ZERO_FIT
        stats = [{"n_dropped": int(d)} for d in self.worker_dropped]
        stats[0] = {"n_dropped": self.recorder.dropped, "n_flushes": self.n_flushes, "flush_s": self.flush_s}
        data = self._data(fits, stats, {})
        data.partial, data.partial_reason = True, reason
        self.writing = True
        try:
            write_trace(self.path, data, fsync=False, compress=False)
        finally:
            self.writing = False
            if self.pending is not None and not self.done:  # a signal came during this write
                (reason, then), self.pending = self.pending, None
                self.write_partial(reason, then)

    def _data(self, fits: list[ClockFit], stats: list[dict[str, Any]], summary: dict[str, Any]) -> TraceData:
        """Rank 0: what it holds now, as TraceData."""
        records = [np.concatenate(c) if c else np.zeros((0, 6)) for c in self.chunks]
        records[0] = np.concatenate([records[0], self.recorder.take()])
        rows = [{**row, **st} for row, st in zip(self.rank_rows, stats)]
        return TraceData(
            meta=self.meta, rank_rows=rows, fits=fits, records=records, steps=self.recorder.step_table(),
            clock_origin=self.clock_origin, summary=summary,
        )

    def close(self, summary: dict[str, Any]) -> None:
        """Collective: final flush, end-of-run clock samples, rank 0 writes the file. A no-op after write_partial."""
        if not self.active or self.done:
            return
        self._flush(final=True)
        end_samples = ping_pong(self.comm)
        mine = {"n_dropped": self.recorder.dropped, "n_flushes": self.n_flushes, "flush_s": self.flush_s}
        stats = self.comm.gather_obj(mine)
        problem = None
        if self.rank == 0:
            fits = [ClockFit(s0, s1) for s0, s1 in zip(self.start_samples, end_samples)]
            fits[0] = ZERO_FIT
            self.writing = True
            try:
                write_trace(self.path, self._data(fits, stats, summary))
            except Exception as exc:  # any failure must reach the other ranks, or they hang in the bcast below
                problem = f"could not write trace {self.path}: {type(exc).__name__}: {exc}; check the disk and the path"
            finally:
                self.writing = False
        self.done = True
        problem = self.comm.bcast_obj(problem)  # every rank learns the outcome: the job fails as one
        if problem:
            raise MpillamaError(problem)

    def write_partial(self, reason: str, then: Callable[[], None] | None = None) -> None:
        """Rank 0 only, no communication: write what is held now, marked partial, then call `then`.
        Later calls and close() do nothing.

        Safe from a signal handler. Records other ranks made since the last flush are not in the file.
        If a checkpoint is being written at that moment (the handler interrupted it), this write is
        deferred until that one ends: the handler returns, or raises to stop the program, and the
        checkpoint's own finally writes this partial file and calls `then`.
        """
        if not self.active or self.done:
            return
        if self.writing:
            self.pending = (reason, then)
            return
        self.done = True
        if self.rank == 0:
            self._write_partial(reason)
        if then is not None:
            then()
