"""`trace export --perfetto`: a trace as Chrome / Perfetto trace-event JSON (opens in ui.perfetto.dev).

Layout: one process per rank (pid = rank), one thread per segment kind (tid = code + 1),
plus a "steps" track on rank 0 (tid = 0). Segments are complete events (ph "X") with
ts / dur in microseconds since the first step; collectives carry their derived wait.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mpillama.atomic import atomic_write
from mpillama.trace.analysis import Trace, collectives, load_trace

STEP_TID = 0


def _wait_per_record(trace: Trace) -> np.ndarray:
    """(n_seg,) f64 s of derived wait for each segment (NaN for compute and for incomplete collectives)."""
    coll = collectives(trace)
    wait = np.full(len(trace.segments), np.nan)
    done = coll.complete
    wait[coll.index[done].reshape(-1)] = coll.wait[done].reshape(-1)
    return wait


def perfetto_events(trace: Trace) -> dict[str, Any]:
    """The trace-event JSON object for a loaded trace."""
    s = trace.segments
    starts = [trace.steps.t_start[~np.isnan(trace.steps.t_start)], s.t_start]
    origin = min((float(a.min()) for a in starts if len(a)), default=0.0)
    events: list[dict[str, Any]] = []
    hosts = trace.ranks.get("host")
    for r in range(trace.n_ranks):
        host = f" ({hosts[r]})" if hosts is not None and len(hosts) > r and hosts[r] else ""
        events.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": f"rank {r}{host}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0, "args": {"sort_index": r}})
        for code, name in enumerate(trace.segment_names):
            events.append({"ph": "M", "name": "thread_name", "pid": r, "tid": code + 1, "args": {"name": name}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": r, "tid": code + 1,
                           "args": {"sort_index": code + 1}})
    events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": STEP_TID, "args": {"name": "steps"}})
    st = trace.steps
    for i in range(len(st)):
        end = st.t_end[i] if not np.isnan(st.t_end[i]) else st.t_start[i]
        events.append({
            "ph": "X", "name": f"{trace.phase_names[int(st.phase[i])]} step {int(st.step[i])}", "cat": "step",
            "pid": 0, "tid": STEP_TID, "ts": (st.t_start[i] - origin) * 1e6, "dur": max(end - st.t_start[i], 0.0) * 1e6,
            "args": {"step": int(st.step[i]), "tokens": int(st.tokens[i]), "position": int(st.position[i]),
                     "finished": bool(not np.isnan(st.t_end[i]))},
        })
    # plain Python lists: indexing numpy arrays element by element costs more than building the events
    wait = _wait_per_record(trace)
    has_wait = (~np.isnan(wait)).tolist()
    wait_us, ts = (wait * 1e6).tolist(), ((s.t_start - origin) * 1e6).tolist()
    dur = (np.maximum(s.dur, 0.0) * 1e6).tolist()
    codes, ranks = s.seg.astype(int).tolist(), s.rank.astype(int).tolist()
    steps, layers, nbytes = s.step.astype(int).tolist(), s.layer.astype(int).tolist(), s.nbytes.astype(int).tolist()
    names = list(trace.segment_names)
    cats = ["sync" if name.endswith("_sync") else "compute" for name in names]
    for j, code in enumerate(codes):
        args: dict[str, Any] = {"step": steps[j], "layer": layers[j], "bytes": nbytes[j]}
        if has_wait[j]:
            args["wait_us"] = wait_us[j]
        events.append({"ph": "X", "name": names[code], "cat": cats[code], "pid": ranks[j], "tid": code + 1,
                       "ts": ts[j], "dur": dur[j], "args": args})
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"source": trace.path, "partial": trace.partial, "n_ranks": trace.n_ranks},
    }


def trace_export(path: str | Path, perfetto_out: str | Path) -> Path:
    """What `python -m mpillama trace export FILE.h5 --perfetto OUT.json` does. Returns OUT.json's path."""
    out = Path(perfetto_out)
    doc = perfetto_events(load_trace(path))
    text = json.dumps(doc, separators=(",", ":"))  # one call: the C encoder (json.dump writes piece by piece)
    with atomic_write(out) as part:
        part.write_text(text)
    return out
