"""`trace report`: the derived tables of one trace as text, or as JSON for scripts.

Owns report_tables() (an Analysis -> plain JSON-ready dict) and its text rendering.
Computes nothing itself: every figure comes from analysis.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mpillama.trace.analysis import Analysis, analyze, load_trace


def plain(value: Any) -> Any:
    """numpy values and containers -> JSON types (NaN and inf -> None)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def collectives_per_step(a: Analysis, phase: str) -> float:
    """Collectives in a finished step of this phase (each is one wait for the slowest rank)."""
    st = a.trace.steps
    steps = st.step[st.phase == a.trace.phase_names.index(phase)]
    if len(steps) == 0:
        return 0.0
    return float(np.isin(a.coll.step, steps).sum() / len(steps))


def hops_per_collective(n_ranks: int) -> int:
    """One-way trips one collective costs at most: 1 between two ranks, a tree's depth beyond."""
    return 0 if n_ranks < 2 else max(1, math.ceil(math.log2(n_ranks)))


def report_tables(a: Analysis) -> dict[str, Any]:
    """Everything `trace report` shows, as one JSON-ready dict."""
    t = a.trace
    ranks = t.ranks
    n = t.n_ranks
    st = a.straggler
    total_last = max(int(st.last_counts.sum()), 1)
    return plain({
        "file": t.path,
        "partial": t.partial,
        "partial_reason": t.partial_reason,
        "run": {k: t.attrs.get(k, "") for k in ("command", "argv", "model", "sync", "sync_reason", "buffer_float_type",
                                                "weight_type",
                                                "nthreads", "profile", "created", "mpillama_version",
                                                "mpi_library_version", "version")},
        "n_ranks": n,
        "summary": t.summary,
        "phases": {
            name: {
                "steps": row["steps"], "tokens": row["tokens"], "seconds": row["seconds"], "tok_s": row["tok_s"],
                "collectives_per_step": collectives_per_step(a, name),
                "hops_per_step": collectives_per_step(a, name) * hops_per_collective(n),
                "ranks": [
                    {"rank": r, "compute_ms": row["compute_ms_per_token"][r], "sync_ms": row["sync_ms_per_token"][r],
                     "wait_ms": row["wait_ms_per_token"][r], "transfer_ms": row["transfer_ms_per_token"][r]}
                    for r in range(n)
                ],
            }
            for name, row in a.phases.items()
        },
        "experts": a.experts,
        "straggler": {
            "rank": st.rank,
            "most_often_last": st.most_often_last,
            "collectives": st.n_collectives,
            "last_counts": st.last_counts,
            "last_fraction": st.last_counts / total_last,
            "caused_wait_ms": st.caused_wait_s * 1e3,
            "caused_wait_mean_ms": st.caused_wait_mean_s * 1e3,
        },
        "skew_ms": {"all": a.skew["all"], "by_kind": a.skew["by_kind"],
                    "hist_counts": a.skew["hist_counts"], "hist_edges": a.skew["hist_edges_ms"]},
        "wait_by_layer_ms_per_step": {
            "phase": a.wait_phase or "all", "layers": a.wait_layers, "ranks": a.wait_table_ms,
        },
        "worst_segments": a.worst,
        "ranks": [
            {
                "rank": r,
                "host": str(ranks["host"][r]) if "host" in ranks else "",
                "clock_offset_us": float(ranks["clock_offset"][r]) * 1e6 if "clock_offset" in ranks else 0.0,
                "clock_drift_ppm": float(ranks["clock_drift"][r]) * 1e6 if "clock_drift" in ranks else 0.0,
                "clock_rtt_us": float(ranks["clock_rtt"][r]) * 1e6 if "clock_rtt" in ranks else 0.0,
                "records": int(ranks["n_records"][r]) if "n_records" in ranks else 0,
                "dropped": int(ranks["n_dropped"][r]) if "n_dropped" in ranks else 0,
                "flush_ms": float(ranks["flush_s"][r]) * 1e3 if "flush_s" in ranks else 0.0,
                "load_ms": float(a.load_s[r]) * 1e3,
                "coverage": float(a.coverage["ratio"][r]),
            }
            for r in range(n)
        ],
        "problems": a.problems,
    })


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_report(tab: dict[str, Any]) -> str:
    lines = [f"trace {tab['file']}" + (f"   PARTIAL ({tab['partial_reason']})" if tab["partial"] else "")]
    run = tab["run"]
    lines.append(
        f"{tab['n_ranks']} ranks  model {run['model'] or '-'}  sync {run['sync'] or '-'}"
        f"{' (' + run['sync_reason'] + ')' if run.get('sync_reason') else ''}  "
        f"buffers {run['buffer_float_type'] or '-'}  weights {run['weight_type'] or '-'}  "
        f"nthreads {run['nthreads'] or '-'}  profile {run['profile'] or '-'}"
    )
    if run["argv"]:
        lines.append(f"argv: {run['argv'] if isinstance(run['argv'], str) else ' '.join(run['argv'])}")
    lines.append("")
    for name, ph in tab["phases"].items():
        lines.append(f"{name}: {ph['tokens']} tokens in {ph['steps']} steps, "
                     f"{_f(ph['seconds'], 3)} s = {_f(ph['tok_s'])} tok/s; per step {ph['collectives_per_step']:.0f} "
                     f"collectives, at most {ph['hops_per_step']:.0f} one-way hops")
        lines.append(f"  {'rank':>4} {'compute':>9} {'sync':>9} {'wait':>9} {'transfer':>9}   ms per token")
        for row in ph["ranks"]:
            lines.append(f"  {row['rank']:>4} {_f(row['compute_ms'], 3):>9} {_f(row['sync_ms'], 3):>9} "
                         f"{_f(row['wait_ms'], 3):>9} {_f(row['transfer_ms'], 3):>9}")
        ex = tab.get("experts", {}).get(name)
        if ex:  # mixture of experts: how evenly the chosen experts' work fell on the ranks
            lines.append(f"  experts ms per token by rank: {' '.join(_f(v, 3) for v in ex['experts_ms_per_token'])}; "
                         f"busiest / mean {_f(ex['experts_max_over_mean'], 3)}; router "
                         f"{' '.join(_f(v, 3) for v in ex['route_ms_per_token'])}")
    if not tab["phases"]:
        lines.append("no finished steps")
    st = tab["straggler"]
    lines.append("")
    if st["rank"] is None:
        lines.append(f"straggler: none ({st['collectives']} complete collectives, {tab['n_ranks']} rank(s))")
    else:
        r, c = st["rank"], st["most_often_last"]
        lines.append(
            f"straggler: rank {r}, the others waited {_f(st['caused_wait_ms'][r], 3)} ms on it "
            f"(mean {_f(st['caused_wait_mean_ms'][r], 3)} ms per rank per collective); last into "
            f"{st['last_counts'][r]} of {st['collectives']} collectives ({100 * st['last_fraction'][r]:.0f}%)"
        )
        if c != r:
            lines.append(
                f"  most often last: rank {c}, into {st['last_counts'][c]} collectives "
                f"({100 * st['last_fraction'][c]:.0f}%), the others waited {_f(st['caused_wait_ms'][c], 3)} ms on it"
            )
        lines.append("  last into: " + ", ".join(f"rank {i} {n}" for i, n in enumerate(st["last_counts"])))
    sk = tab["skew_ms"]["all"]
    lines.append(f"skew (last - first entry), ms: n {sk['n']}  mean {_f(sk['mean'], 3)}  p50 {_f(sk['p50'], 3)}  "
                 f"p90 {_f(sk['p90'], 3)}  p99 {_f(sk['p99'], 3)}  max {_f(sk['max'], 3)}")
    for kind, k in tab["skew_ms"]["by_kind"].items():
        lines.append(f"  {kind:<10} n {k['n']:>6}  p50 {_f(k['p50'], 3):>8}  p99 {_f(k['p99'], 3):>8}  "
                     f"max {_f(k['max'], 3):>8}")
    lines.append("")
    lines.append("worst segments (excess over the median of the same segment and phase):")
    lines.append(f"  {'rank':>4} {'step':>5} {'layer':>5} {'segment':<10} {'phase':<8} "
                 f"{'ms':>9} {'median':>9} {'excess':>9}")
    for w in tab["worst_segments"]:
        lines.append(f"  {w['rank']:>4} {w['step']:>5} {w['layer']:>5} {w['seg']:<10} {w['phase']:<8} "
                     f"{_f(w['ms'], 3):>9} {_f(w['median_ms'], 3):>9} {_f(w['excess_ms'], 3):>9}")
    lines.append("")
    lines.append(f"  {'rank':>4} {'host':<16} {'offset us':>10} {'drift ppm':>10} {'rtt us':>8} {'records':>9} "
                 f"{'dropped':>8} {'load ms':>9} {'flush ms':>9} {'coverage':>9}")
    for r in tab["ranks"]:
        lines.append(f"  {r['rank']:>4} {r['host'][:16]:<16} {_f(r['clock_offset_us'], 1):>10} "
                     f"{_f(r['clock_drift_ppm'], 2):>10} "
                     f"{_f(r['clock_rtt_us'], 1):>8} {r['records']:>9} {r['dropped']:>8} {_f(r['load_ms'], 1):>9} "
                     f"{_f(r['flush_ms'], 2):>9} {_f(100 * r['coverage'], 1):>8}%")
    for p in tab["problems"]:
        lines.append(f"warning: {p}")
    return "\n".join(lines) + "\n"


def trace_report(path: str | Path, as_json: bool = False) -> str:
    """What `python -m mpillama trace report FILE.h5 [--json]` prints."""
    tab = report_tables(analyze(load_trace(path)))
    return json.dumps(tab, indent=1) + "\n" if as_json else format_report(tab)
