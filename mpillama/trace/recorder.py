"""Per-rank timing recorder: the only trace code on the hot path.

Owns the segment vocabulary (SEGMENTS and the SEG_* codes) and two recorders with one
interface: Recorder writes each segment into preallocated numpy columns, NullRecorder
does nothing (used when --trace is not given). The engine calls `rec.add(...)`
unconditionally, so both must be cheap; neither allocates per call.

Conventions the engine follows (analysis relies on them):
- Compute segments are the time between collectives; a "*_sync" segment is one
  collective call: t_start when the rank entered it, t_end when it left it.
- The same collective carries the same (step, layer, seg) on every rank, and the
  n-th such call in a (step, layer, seg) is the n-th on every rank: that is how
  analysis matches a collective across ranks.
- layer is -1 for segments outside the layers (embed, head, sample, ctrl_sync, load);
  step is -1 before the first step (load).
- "other" is time no engine segment covers; the session records its own flushes as "other".
- Times come from time.perf_counter() (one monotonic clock for all processes on a host).

Imports numpy only: no MPI, no h5py.
"""

from __future__ import annotations

import time

import numpy as np

SEGMENTS: tuple[str, ...] = (
    "embed", "att", "att_sync", "ffn", "ffn_sync", "head", "head_sync", "sample", "ctrl_sync", "load", "other",
    "route", "experts",  # mixture of experts: the router, then the chosen experts (after "other": old codes stay)
)
SEG_EMBED = 0
SEG_ATT = 1
SEG_ATT_SYNC = 2
SEG_FFN = 3
SEG_FFN_SYNC = 4
SEG_HEAD = 5
SEG_HEAD_SYNC = 6
SEG_SAMPLE = 7
SEG_CTRL_SYNC = 8
SEG_LOAD = 9
SEG_OTHER = 10
SEG_ROUTE = 11  # MoE: router logits, softmax, top-k (every rank, the same work)
SEG_EXPERTS = 12  # MoE: the chosen experts' own rows (where the router's choice can unbalance ranks)
assert SEGMENTS[SEG_OTHER] == "other" and SEGMENTS[SEG_CTRL_SYNC] == "ctrl_sync"

PHASES: tuple[str, ...] = ("prefill", "decode")
_STEP_CAPACITY = 1024  # initial rows of the step table; it doubles when full (once per 1024 steps at most)


class Recorder:
    """One rank's segments, in columns of fixed capacity; the session empties them at each flush."""

    __slots__ = (
        "rank", "capacity", "step", "n", "dropped",
        "steps", "layers", "segs", "t_starts", "t_ends", "nbytes", "_views",
        "n_steps", "step_ids", "step_phase", "step_tokens", "step_position", "step_t_start", "step_t_end",
    )

    def __init__(self, rank: int, capacity: int) -> None:
        assert capacity > 0, capacity
        self.rank = rank
        self.capacity = capacity
        self.step = -1  # set by the engine at each step; -1 before the first (load)
        self.n = 0  # records held since the last flush
        self.dropped = 0  # records lost because the columns were full (the flush policy should prevent it)
        self.steps = np.zeros(capacity, np.int32)  # (capacity,) i32
        self.layers = np.zeros(capacity, np.int16)  # (capacity,) i16, -1 outside the layers
        self.segs = np.zeros(capacity, np.uint8)  # (capacity,) u8, index into SEGMENTS
        self.t_starts = np.zeros(capacity, np.float64)  # (capacity,) f64 s, this rank's perf_counter
        self.t_ends = np.zeros(capacity, np.float64)  # (capacity,) f64 s
        self.nbytes = np.zeros(capacity, np.int64)  # (capacity,) i64 bytes moved (collectives)
        # Item assignment through memoryviews skips numpy's scalar dispatch: ~250 ns per add
        # instead of ~360 ns (measured here), for the same bytes in the same arrays.
        columns = (self.steps, self.layers, self.segs, self.t_starts, self.t_ends, self.nbytes)
        self._views = tuple(memoryview(a) for a in columns)
        # The step table (kept by rank 0 only, but harmless elsewhere).
        self.n_steps = 0
        self._alloc_steps(_STEP_CAPACITY)

    def _alloc_steps(self, rows: int) -> None:
        old = self.n_steps
        def grow(name: str, dtype: type, fill: float = 0) -> np.ndarray:
            new = np.full(rows, fill, dtype)
            if old:
                new[:old] = getattr(self, name)[:old]
            return new
        self.step_ids = grow("step_ids", np.int32)  # (step_rows,) i32
        self.step_phase = grow("step_phase", np.uint8)  # (step_rows,) u8 index into PHASES
        self.step_tokens = grow("step_tokens", np.int32)  # (step_rows,) i32 tokens in this forward pass
        self.step_position = grow("step_position", np.int32)  # (step_rows,) i32 position of its first token
        self.step_t_start = grow("step_t_start", np.float64, np.nan)  # (step_rows,) f64 s
        self.step_t_end = grow("step_t_end", np.float64, np.nan)  # (step_rows,) f64 s, NaN while open

    def add(self, seg: int, layer: int, t_start: float, t_end: float, nbytes: int = 0) -> None:
        """Record one segment of the current step. O(1), no allocation."""
        i = self.n
        if i >= self.capacity:
            self.dropped += 1
            return
        steps, layers, segs, t0, t1, nb = self._views
        steps[i] = self.step
        layers[i] = layer
        segs[i] = seg
        t0[i] = t_start
        t1[i] = t_end
        nb[i] = nbytes
        self.n = i + 1

    def begin_step(self, phase: str, tokens: int, position: int, t: float) -> None:
        """Rank 0: a forward pass over `tokens` tokens starting at `position` begins (step = self.step)."""
        j = self.n_steps
        if j >= len(self.step_ids):
            self._alloc_steps(2 * len(self.step_ids))
        self.step_ids[j] = self.step
        self.step_phase[j] = PHASES.index(phase)
        self.step_tokens[j] = tokens
        self.step_position[j] = position
        self.step_t_start[j] = t
        self.n_steps = j + 1

    def end_step(self, t: float) -> None:
        """Rank 0: the step opened by the last begin_step ends."""
        if self.n_steps:
            self.step_t_end[self.n_steps - 1] = t

    def take(self) -> np.ndarray:
        """The held records packed as (n, 6) f64 [step, layer, seg, t_start, t_end, nbytes]; empties the columns.

        float64 holds every field exactly (ints far below 2**53), so one Gatherv moves them all.
        """
        n = self.n
        packed = np.empty((n, 6), np.float64)  # (n, 6) f64
        for col, arr in enumerate((self.steps, self.layers, self.segs, self.t_starts, self.t_ends, self.nbytes)):
            packed[:, col] = arr[:n]
        self.n = 0
        return packed

    def step_table(self) -> dict[str, np.ndarray]:
        """Copies of the recorded steps, keyed by the /steps column names."""
        k = self.n_steps
        return {
            "step": self.step_ids[:k].copy(),
            "phase": self.step_phase[:k].copy(),
            "tokens": self.step_tokens[:k].copy(),
            "position": self.step_position[:k].copy(),
            "t_start": self.step_t_start[:k].copy(),
            "t_end": self.step_t_end[:k].copy(),
        }


class NullRecorder:
    """Same interface as Recorder, records nothing: the cost of tracing when it is off is one empty call."""

    __slots__ = ("rank", "step")
    capacity = 0
    n = 0
    dropped = 0
    n_steps = 0

    def __init__(self, rank: int = 0, capacity: int = 0) -> None:
        self.rank = rank
        self.step = -1

    def add(self, seg: int, layer: int, t_start: float, t_end: float, nbytes: int = 0) -> None:
        pass

    def begin_step(self, phase: str, tokens: int, position: int, t: float) -> None:
        pass

    def end_step(self, t: float) -> None:
        pass


class Timeline:
    """Contiguous segments of one rank: each mark() closes the segment that began at the previous mark."""

    def __init__(self, recorder: Recorder | NullRecorder, t: float | None = None) -> None:
        self.rec = recorder
        self.t = time.perf_counter() if t is None else t

    def mark(self, seg: int, layer: int = -1, nbytes: int = 0) -> None:
        now = time.perf_counter()
        self.rec.add(seg, layer, self.t, now, nbytes)
        self.t = now
