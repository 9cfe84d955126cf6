"""Loading trace files and deriving tables from them: waits, skew, stragglers, time per token.

Owns load_trace() (the reader: it checks the version and returns a Trace of numpy
columns) and the analyzers: each takes a Trace (or what an earlier analyzer returned)
and returns a table. Nothing here prints or plots. Clocks are already aligned to rank 0
in the file (clock.to_rank0, applied once when it is written).

Derived, never stored:
- a collective instance is one (step, layer, seg, occurrence) recorded by the ranks;
- entry / exit per rank; last rank = latest entry; skew = last entry - first entry;
- wait of a rank = last entry - its entry (how long the last one kept it waiting);
- blocked of a rank = min(last entry, its exit) - its entry: the part of the wait it spent
  inside this collective. They differ when a collective lets a rank leave early (an eager
  Gather to rank 0 returns on the senders at once): that wait then shows up as blocked time
  in the rank's next collective. Collective-level figures (straggler, caused wait) use wait;
  per-rank time accounting uses blocked, so that sync = blocked + transfer exactly;
- transfer of a rank = its exit - max(last entry, its entry), at least 0 (the collective's own
  cost; blocked + transfer = exit - entry);
- the straggler is the rank the others waited on longest (see Straggler).
Time between rank 0's steps (before the first, and between the end of one and the start
of the next: a chat user typing, rank 0's bookkeeping) is idle, not waiting: every
per-step figure (wait, skew, time per token, worst segments) is measured on the "busy
clock", rank 0's clock with those gaps cut out (busy_clock).

Imports numpy, h5py, h5attrs and the trace schema; no MPI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from mpillama.errors import MpillamaError
from mpillama.h5attrs import py_value
from mpillama.trace import schema


@dataclass(frozen=True)
class Segments:
    """All ranks' segments, ordered by (rank, t_start). Times: s on rank 0's clock since clock_origin."""

    step: np.ndarray  # (n_seg,) i32, -1 outside steps
    rank: np.ndarray  # (n_seg,) i16
    layer: np.ndarray  # (n_seg,) i16, -1 outside layers
    seg: np.ndarray  # (n_seg,) u8, index into Trace.segment_names
    t_start: np.ndarray  # (n_seg,) f64 s
    t_end: np.ndarray  # (n_seg,) f64 s
    nbytes: np.ndarray  # (n_seg,) i64

    @property
    def dur(self) -> np.ndarray:
        return self.t_end - self.t_start

    def __len__(self) -> int:
        return len(self.step)


@dataclass(frozen=True)
class Steps:
    """Rank 0's forward passes, in order. t_end is NaN for a step a partial run did not finish."""

    step: np.ndarray  # (n_steps,) i32
    phase: np.ndarray  # (n_steps,) u8, index into Trace.phase_names
    tokens: np.ndarray  # (n_steps,) i32
    position: np.ndarray  # (n_steps,) i32
    t_start: np.ndarray  # (n_steps,) f64 s
    t_end: np.ndarray  # (n_steps,) f64 s

    def __len__(self) -> int:
        return len(self.step)


@dataclass(frozen=True)
class Trace:
    path: str
    attrs: dict[str, Any]  # root attributes, as Python values
    ranks: dict[str, np.ndarray]  # /ranks columns, each (n_ranks,)
    segments: Segments
    steps: Steps
    segment_names: tuple[str, ...]
    phase_names: tuple[str, ...]

    @property
    def n_ranks(self) -> int:
        return int(self.attrs["n_ranks"])

    @property
    def partial(self) -> bool:
        return bool(self.attrs.get("partial", False))

    @property
    def partial_reason(self) -> str:
        return str(self.attrs.get("partial_reason", ""))

    @property
    def summary(self) -> dict[str, Any]:
        p = schema.SUMMARY_PREFIX
        return {k[len(p):]: v for k, v in self.attrs.items() if k.startswith(p)}

    def sync_codes(self) -> np.ndarray:
        return np.array([i for i, name in enumerate(self.segment_names) if name.endswith("_sync")], np.uint8)


# ---------------------------------------------------------------------------------------- loading


def _column(group: h5py.Group, name: str) -> np.ndarray:
    data = group[name][()]
    if data.dtype.kind in "OS":
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in data], dtype=object)
    return data


def load_trace(path: str | Path) -> Trace:
    """Read a trace file written by session.write_trace; refuses unknown formats and versions."""
    path = Path(path)
    if not path.is_file():
        raise MpillamaError(f"trace file {path} does not exist: pass the FILE.h5 given to --trace")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise MpillamaError(f"{path} is not a readable HDF5 file ({exc}): pass a file written by --trace") from None
    with f:
        attrs = {k: py_value(v) for k, v in f.attrs.items()}
        schema.check_version(str(path), attrs)
        for group in (schema.RANKS, schema.SEGMENTS_GROUP, schema.STEPS):
            if group not in f:
                raise MpillamaError(f"{path} has no /{group} group: the file is damaged; record the run again")
        ranks = {name: _column(f[schema.RANKS], name) for name in f[schema.RANKS]}
        g = f[schema.SEGMENTS_GROUP]
        seg = {name: _column(g, name) for name in schema.SEGMENT_COLUMNS}
        names = tuple(py_value(g.attrs[schema.SEGMENT_NAMES_ATTR]))
        s = f[schema.STEPS]
        st = {name: _column(s, name) for name in schema.STEP_COLUMNS}
        phases = tuple(py_value(s.attrs[schema.PHASE_NAMES_ATTR]))
    return Trace(
        path=str(path),
        attrs=attrs,
        ranks=ranks,
        segments=Segments(
            seg["step"], seg["rank"], seg["layer"], seg["seg"], seg["t_start"], seg["t_end"], seg["bytes"],
        ),
        steps=Steps(st["step"], st["phase"], st["tokens"], st["position"], st["t_start"], st["t_end"]),
        segment_names=names,
        phase_names=phases,
    )


# ---------------------------------------------------------------------------------------- step windows


def _step_index(step_ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Row of each query step in step_ids (-1 if absent)."""
    if len(step_ids) == 0:
        return np.full(len(query), -1)
    order = np.argsort(step_ids, kind="stable")
    pos = np.clip(np.searchsorted(step_ids[order], query), 0, len(step_ids) - 1)
    found = step_ids[order][pos] == query
    return np.where(found, order[pos], -1)


def busy_clock(trace: Trace) -> Callable[[np.ndarray], np.ndarray]:
    """t (rank 0's clock) -> t minus the idle time before it: the gaps between rank 0's finished steps.

    Monotone; constant inside a gap. Times before the first step map to its start.
    """
    st = trace.steps
    order = np.argsort(st.t_start, kind="stable")
    starts, ends = st.t_start[order], st.t_end[order]
    first = starts[0] if len(starts) else 0.0
    g0, g1 = ends[:-1], starts[1:]  # (n_steps - 1,) gap between a step and the next
    ok = np.isfinite(g0) & (g1 > g0)
    g0, length = g0[ok], (g1 - g0)[ok]  # (n_gaps,) where each gap begins, and how long it lasts
    before = np.cumsum(length) - length  # (n_gaps,) idle time before each gap

    def busy(t: np.ndarray) -> np.ndarray:
        t = np.maximum(t, first)
        if not len(g0):
            return t
        i = np.searchsorted(g0, t, side="right") - 1  # the last gap that began at or before t
        j = np.maximum(i, 0)
        return t - np.where(i >= 0, before[j] + np.minimum(t - g0[j], length[j]), 0.0)

    return busy


def busy_dur(trace: Trace, busy: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(n_seg,) s of each segment on the busy clock (idle time between steps removed)."""
    busy = busy or busy_clock(trace)
    s = trace.segments
    return busy(s.t_end) - busy(s.t_start)


# ---------------------------------------------------------------------------------------- collectives


@dataclass(frozen=True)
class Collectives:
    """One row per collective instance; one column per rank (NaN where a rank has no record)."""

    step: np.ndarray  # (n_inst,) i64
    layer: np.ndarray  # (n_inst,) i64
    seg: np.ndarray  # (n_inst,) i64 segment code
    occ: np.ndarray  # (n_inst,) i64 occurrence within (step, layer, seg)
    entry: np.ndarray  # (n_inst, n_ranks) f64 s, rank 0's clock
    exit: np.ndarray  # (n_inst, n_ranks) f64 s, rank 0's clock
    complete: np.ndarray  # (n_inst,) bool: every rank recorded it
    last_rank: np.ndarray  # (n_inst,) i64, the latest entry among the ranks present
    # The rest are on the busy clock (idle between steps removed).
    skew: np.ndarray  # (n_inst,) f64 s, last entry - first entry
    wait: np.ndarray  # (n_inst, n_ranks) f64 s, last entry - own entry
    blocked: np.ndarray  # (n_inst, n_ranks) f64 s, min(last entry, own exit) - own entry: wait inside this call
    transfer: np.ndarray  # (n_inst, n_ranks) f64 s, own exit - max(last entry, own entry), >= 0
    index: np.ndarray  # (n_inst, n_ranks) i64 row in Trace.segments (-1 where a rank has no record)

    def __len__(self) -> int:
        return len(self.step)


def _runs(*keys: np.ndarray) -> np.ndarray:
    """For rows sorted by keys: (n,) bool, True where a run of equal keys begins."""
    n = len(keys[0])
    change = np.zeros(n, bool)
    if n:
        change[0] = True
        for k in keys:
            change[1:] |= k[1:] != k[:-1]
    return change


def collectives(trace: Trace) -> Collectives:
    """Match every rank's record of each collective by (step, layer, seg, occurrence)."""
    s = trace.segments
    n_ranks = trace.n_ranks
    mask = np.isin(s.seg, trace.sync_codes())
    rows = np.nonzero(mask)[0]
    rank = s.rank[rows].astype(np.int64)
    step = s.step[rows].astype(np.int64)
    assert len(step) == 0 or step.max() < (1 << 24) - 1, "step numbers above 2**24 need a wider key"
    # (step, layer, seg) packed in one int64 (step < 2**24, layer < 2**15, seg < 2**8): sorts fast
    key = ((step + 1) << 24) | ((s.layer[rows].astype(np.int64) + 1) << 8) | s.seg[rows].astype(np.int64)
    order = np.lexsort((s.t_start[rows], key, rank))  # each rank's calls of one key, in time order
    rows, rank, key = rows[order], rank[order], key[order]
    starts = _runs(rank, key)
    idx = np.arange(len(rows))
    occ = idx - np.maximum.accumulate(np.where(starts, idx, 0))  # n-th call of this key on this rank
    order = np.lexsort((rank, occ, key))  # now group the ranks' records of one instance together
    rows, rank, key, occ = rows[order], rank[order], key[order], occ[order]
    first_of = _runs(key, occ)
    inv = np.cumsum(first_of) - 1  # (n_rec,) instance of each record
    uniq = np.stack([(key[first_of] >> 24) - 1, ((key[first_of] >> 8) & 0xFFFF) - 1, key[first_of] & 0xFF,
                     occ[first_of]], axis=1)  # (n_inst, 4) i64 step, layer, seg, occ
    t0, t1 = s.t_start[rows], s.t_end[rows]
    n_inst = len(uniq)
    entry = np.full((n_inst, n_ranks), np.nan)  # (n_inst, n_ranks) f64
    exit_ = np.full((n_inst, n_ranks), np.nan)  # (n_inst, n_ranks) f64
    index = np.full((n_inst, n_ranks), -1, np.int64)  # (n_inst, n_ranks) i64
    entry[inv, rank] = t0
    exit_[inv, rank] = t1
    index[inv, rank] = rows
    present = ~np.isnan(entry)
    complete = present.all(axis=1)
    filled = np.where(present, entry, -np.inf)
    last_rank = filled.argmax(axis=1) if n_inst else np.zeros(0, np.int64)
    busy = busy_clock(trace)
    last = busy(filled.max(axis=1)) if n_inst else np.zeros(0)  # (n_inst,) busy clock from here on
    entered, left = busy(entry), busy(exit_)  # (n_inst, n_ranks) f64, NaN stays NaN
    first = np.where(present, entered, np.inf).min(axis=1) if n_inst else np.zeros(0)
    return Collectives(
        step=uniq[:, 0], layer=uniq[:, 1], seg=uniq[:, 2], occ=uniq[:, 3],
        entry=entry, exit=exit_, complete=complete, last_rank=last_rank,
        skew=last - first,
        wait=last[:, None] - entered,
        blocked=np.maximum(np.minimum(last[:, None], left) - entered, 0.0),
        transfer=np.maximum(left - np.maximum(last[:, None], entered), 0.0),
        index=index,
    )


@dataclass(frozen=True)
class Straggler:
    """Who was last into the collectives, and how long the others waited on each rank.

    `rank` is the rank the others waited on longest in total; `most_often_last` the rank
    most often last. They differ when lateness is structural but cheap: with sync=star,
    rank 0 normalises x while the workers wait, so it is last into every Bcast by a few
    microseconds, while a slow worker last into each Gather may cost milliseconds.
    """

    rank: int | None  # the others waited longest on it; None with one rank or no collectives
    most_often_last: int | None
    n_collectives: int  # complete collectives with a single last rank
    last_counts: np.ndarray  # (n_ranks,) i64 times each rank was last
    caused_wait_s: np.ndarray  # (n_ranks,) f64 s summed over the other ranks, in collectives where this rank was last
    caused_wait_mean_s: np.ndarray  # (n_ranks,) f64 s mean wait of one other rank per collective this rank was last in


def straggler(coll: Collectives, n_ranks: int) -> Straggler:
    """Counts only complete collectives with one latest rank: an exact tie names nobody."""
    at_max = (coll.entry == coll.entry.max(axis=1, initial=-np.inf)[:, None]).sum(axis=1) if len(coll) else np.zeros(0)
    done = coll.complete & (at_max == 1)
    last = coll.last_rank[done]
    counts = np.bincount(last, minlength=n_ranks).astype(np.int64)
    others_wait = np.nansum(coll.wait[done], axis=1)  # (n_complete,) the last rank's own wait is 0
    caused = np.bincount(last, weights=others_wait, minlength=n_ranks)
    mean = np.zeros(n_ranks)
    if n_ranks > 1:
        mean = np.where(counts > 0, caused / np.maximum(counts, 1) / (n_ranks - 1), 0.0)
    if n_ranks < 2 or counts.sum() == 0:
        return Straggler(None, None, int(done.sum()), counts, caused, mean)
    by_wait = int(np.lexsort((-counts, -caused))[0])  # longest caused wait; ties broken by count
    by_count = int(np.lexsort((-caused, -counts))[0])
    return Straggler(by_wait, by_count, int(done.sum()), counts, caused, mean)


def skew_distribution(trace: Trace, coll: Collectives, bins: int = 30) -> dict[str, Any]:
    """Skew of complete collectives in ms: quantiles overall and per collective kind, and a histogram."""
    def stats(x: np.ndarray) -> dict[str, float | int]:
        if len(x) == 0:
            return {"n": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
        q = np.percentile(x, [50, 90, 99])
        return {"n": int(len(x)), "mean": float(x.mean()), "p50": float(q[0]), "p90": float(q[1]),
                "p99": float(q[2]), "max": float(x.max())}

    ms = coll.skew[coll.complete] * 1e3
    kinds = coll.seg[coll.complete]
    counts, edges = np.histogram(ms, bins=bins) if len(ms) else (np.zeros(0, np.int64), np.zeros(0))
    return {
        "all": stats(ms),
        "by_kind": {trace.segment_names[k]: stats(ms[kinds == k]) for k in np.unique(kinds)},
        "hist_counts": counts,
        "hist_edges_ms": edges,
        "values_ms": ms,
    }


# ---------------------------------------------------------------------------------------- time per step


@dataclass(frozen=True)
class StepTimes:
    """Per finished step and rank: where the time went (s). wait is blocked time: sync = wait + transfer."""

    step: np.ndarray  # (n_steps,) i32 step ids, in /steps order
    phase: np.ndarray  # (n_steps,) u8
    tokens: np.ndarray  # (n_steps,) i32
    wall: np.ndarray  # (n_steps,) f64 s, rank 0's step duration
    compute: np.ndarray  # (n_steps, n_ranks) f64 s, all segments that are not collectives
    sync: np.ndarray  # (n_steps, n_ranks) f64 s, time inside collectives
    wait: np.ndarray  # (n_steps, n_ranks) f64 s, part of sync spent blocked waiting for the last rank


def step_times(trace: Trace, coll: Collectives) -> StepTimes:
    st = trace.steps
    done = ~np.isnan(st.t_end)
    ids = st.step[done]
    n, n_ranks = len(ids), trace.n_ranks
    s = trace.segments
    row = _step_index(ids, s.step)
    ok = row >= 0
    is_sync = np.isin(s.seg, trace.sync_codes())
    compute = np.zeros((n, n_ranks))  # (n_steps, n_ranks) f64
    sync = np.zeros((n, n_ranks))  # (n_steps, n_ranks) f64
    dur = busy_dur(trace)
    np.add.at(compute, (row[ok & ~is_sync], s.rank[ok & ~is_sync]), dur[ok & ~is_sync])
    np.add.at(sync, (row[ok & is_sync], s.rank[ok & is_sync]), dur[ok & is_sync])
    wait = np.zeros((n, n_ranks))  # (n_steps, n_ranks) f64
    crow = _step_index(ids, coll.step)
    use = (crow >= 0) & coll.complete
    if use.any():
        np.add.at(wait, crow[use], coll.blocked[use])
    return StepTimes(ids, st.phase[done], st.tokens[done], (st.t_end - st.t_start)[done], compute, sync, wait)


def phase_table(trace: Trace, times: StepTimes) -> dict[str, dict[str, Any]]:
    """Per phase: tokens, wall seconds, tok/s, and per rank ms per token of compute / sync / wait / transfer."""
    out: dict[str, dict[str, Any]] = {}
    for code, name in enumerate(trace.phase_names):
        m = times.phase == code
        if not m.any():
            continue
        tokens = int(times.tokens[m].sum())
        seconds = float(times.wall[m].sum())
        per_tok = 1e3 / max(tokens, 1)
        sync = times.sync[m].sum(axis=0)
        wait = times.wait[m].sum(axis=0)
        out[name] = {
            "steps": int(m.sum()),
            "tokens": tokens,
            "seconds": seconds,
            "tok_s": tokens / seconds if seconds > 0 else 0.0,
            "compute_ms_per_token": times.compute[m].sum(axis=0) * per_tok,
            "sync_ms_per_token": sync * per_tok,
            "wait_ms_per_token": wait * per_tok,
            "transfer_ms_per_token": (sync - wait) * per_tok,
        }
    return out


def wait_by_layer(trace: Trace, coll: Collectives, phase: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(layers, table): mean blocked wait per step in ms, rows = layers (-1: outside the layers), columns = ranks.

    Only steps of `phase` count when given (decode steps compare like with like; a first
    prefill step may include JIT compilation).
    """
    done = coll.complete.copy()
    if phase is not None:
        code = trace.phase_names.index(phase)
        done &= np.isin(coll.step, trace.steps.step[trace.steps.phase == code])
    layers = np.unique(coll.layer[done])
    table = np.zeros((len(layers), trace.n_ranks))  # (n_layer_rows, n_ranks) f64 ms
    if len(layers):
        row = np.searchsorted(layers, coll.layer[done])
        np.add.at(table, row, coll.blocked[done] * 1e3)
        n_steps = max(len(np.unique(coll.step[done])), 1)
        table /= n_steps
    return layers, table


def worst_segments(trace: Trace, n: int = 10) -> list[dict[str, Any]]:
    """Segments inside steps that exceed the median of their kind (same segment, same phase) the most."""
    s = trace.segments
    row = _step_index(trace.steps.step, s.step)
    inside = row >= 0
    if not inside.any():
        return []
    idx = np.nonzero(inside)[0]
    phase = trace.steps.phase[row[idx]].astype(np.int64)
    group = s.seg[idx].astype(np.int64) * 256 + phase
    dur = busy_dur(trace)[idx]
    median = np.zeros(len(idx))
    for g in np.unique(group):
        m = group == g
        median[m] = np.median(dur[m])
    excess = dur - median
    top = np.argsort(-excess, kind="stable")[:n]
    return [
        {
            "rank": int(s.rank[idx[i]]), "step": int(s.step[idx[i]]), "layer": int(s.layer[idx[i]]),
            "seg": trace.segment_names[int(s.seg[idx[i]])], "phase": trace.phase_names[int(phase[i])],
            "ms": float(dur[i] * 1e3), "median_ms": float(median[i] * 1e3), "excess_ms": float(excess[i] * 1e3),
        }
        for i in top
    ]


def coverage(trace: Trace) -> dict[str, np.ndarray]:
    """Per rank: seconds of segments inside finished steps vs the steps' wall time on rank 0."""
    done = ~np.isnan(trace.steps.t_end)
    times_wall = float((trace.steps.t_end - trace.steps.t_start)[done].sum())
    s = trace.segments
    inside = _step_index(trace.steps.step[done], s.step) >= 0
    seg_s = np.bincount(s.rank[inside], weights=busy_dur(trace)[inside], minlength=trace.n_ranks)
    return {"segment_s": seg_s, "wall_s": np.full(trace.n_ranks, times_wall),
            "ratio": seg_s / times_wall if times_wall > 0 else np.zeros(trace.n_ranks)}


def segment_problems(trace: Trace, tolerance_s: float = 1e-6) -> list[str]:
    """Broken invariants: negative durations, overlapping segments on a rank, finished steps a rank missed."""
    s = trace.segments
    problems = []
    neg = np.nonzero(s.dur < -tolerance_s)[0]
    if len(neg):
        first = f"rank {s.rank[neg[0]]} step {s.step[neg[0]]}"
        problems.append(f"{len(neg)} segments end before they start (first: {first})")
    for r in range(trace.n_ranks):
        m = np.nonzero(s.rank == r)[0]
        order = m[np.argsort(s.t_start[m], kind="stable")]
        over = np.nonzero(s.t_start[order][1:] < s.t_end[order][:-1] - tolerance_s)[0]
        if len(over):
            i = order[over[0] + 1]
            where = f"step {s.step[i]} layer {s.layer[i]}"
            problems.append(f"rank {r}: {len(over)} overlapping segments (first at {where})")
        done = trace.steps.step[~np.isnan(trace.steps.t_end)]
        missing = np.setdiff1d(done, s.step[m])
        if len(missing):
            problems.append(f"rank {r}: no segments in {len(missing)} finished steps (first: step {missing[0]})")
    return problems


def load_seconds(trace: Trace) -> np.ndarray:
    """(n_ranks,) s of 'load' segments per rank."""
    s = trace.segments
    if "load" not in trace.segment_names:
        return np.zeros(trace.n_ranks)
    m = s.seg == trace.segment_names.index("load")
    return np.bincount(s.rank[m], weights=s.dur[m], minlength=trace.n_ranks)


@dataclass(frozen=True)
class Analysis:
    """Every derived table of one trace (what report, plot and compare read)."""

    trace: Trace
    coll: Collectives
    times: StepTimes
    phases: dict[str, dict[str, Any]]
    straggler: Straggler
    skew: dict[str, Any]
    wait_phase: str | None  # the phase wait_table_ms covers (decode when there is any), None: all steps
    wait_layers: np.ndarray
    wait_table_ms: np.ndarray
    worst: list[dict[str, Any]]
    coverage: dict[str, np.ndarray]
    load_s: np.ndarray
    problems: list[str] = field(default_factory=list)
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)  # see expert_balance


def expert_balance(trace: Trace, times: StepTimes) -> dict[str, dict[str, Any]]:
    """Mixture of experts, per phase: each rank's ms per token in the router ("route") and in the chosen
    experts ("experts"), and how balanced the experts' work was: the busiest rank's time over the mean.
    Empty for a dense model (or a trace from before these segments existed)."""
    names = trace.segment_names
    if "experts" not in names:
        return {}
    s = trace.segments
    row = _step_index(times.step, s.step)
    dur = busy_dur(trace)
    per = {}
    for seg in ("route", "experts"):
        m = (row >= 0) & (s.seg == names.index(seg))
        if not m.any():
            return {}
        per[seg] = np.zeros((len(times.step), trace.n_ranks))  # (n_steps, n_ranks) s
        np.add.at(per[seg], (row[m], s.rank[m]), dur[m])
    out: dict[str, dict[str, Any]] = {}
    for code, name in enumerate(trace.phase_names):
        m = times.phase == code
        if not m.any():
            continue
        per_tok = 1e3 / max(int(times.tokens[m].sum()), 1)
        experts = per["experts"][m].sum(axis=0) * per_tok
        mean = float(experts.mean())
        out[name] = {"route_ms_per_token": per["route"][m].sum(axis=0) * per_tok, "experts_ms_per_token": experts,
                     "experts_max_over_mean": float(experts.max()) / mean if mean > 0 else float("nan")}
    return out


def analyze(trace: Trace, n_worst: int = 10) -> Analysis:
    coll = collectives(trace)
    times = step_times(trace, coll)
    times_phases = {trace.phase_names[int(p)] for p in np.unique(times.phase)}
    wait_phase = "decode" if "decode" in times_phases else None
    layers, table = wait_by_layer(trace, coll, wait_phase)
    return Analysis(
        trace=trace, coll=coll, times=times, phases=phase_table(trace, times),
        straggler=straggler(coll, trace.n_ranks), skew=skew_distribution(trace, coll),
        wait_phase=wait_phase, wait_layers=layers, wait_table_ms=table, worst=worst_segments(trace, n_worst),
        coverage=coverage(trace), load_s=load_seconds(trace), problems=segment_problems(trace),
        experts=expert_balance(trace, times),
    )
