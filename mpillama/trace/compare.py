"""`trace compare A.h5 B.h5`: the report's figures of two runs side by side, with B / A ratios.

Owns the list of compared metrics (flattened from report.report_tables) and their
rendering; the figures themselves come from analysis.py through report.py. Either file may
be a projection written by `trace project --out` (it is a trace): it is labelled as one, so a
projection sits beside the run measured in its configuration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mpillama.trace.analysis import Trace, analyze, load_trace
from mpillama.trace.report import plain, report_tables


def metrics(tab: dict[str, Any]) -> dict[str, float | int | str | None]:
    """A report's headline figures as one flat name -> value map (names stable across runs)."""
    out: dict[str, Any] = {"ranks": tab["n_ranks"]}
    for phase, ph in tab["phases"].items():
        out[f"{phase} tok/s"] = ph["tok_s"]
        out[f"{phase} tokens"] = ph["tokens"]
        for row in ph["ranks"]:
            for key in ("compute_ms", "sync_ms", "wait_ms", "transfer_ms"):
                out[f"{phase} rank {row['rank']} {key.replace('_ms', '')} ms/token"] = row[key]
    st = tab["straggler"]
    out["straggler rank"] = "-" if st["rank"] is None else str(st["rank"])
    out["most often last rank"] = "-" if st["most_often_last"] is None else str(st["most_often_last"])
    if st["rank"] is not None:
        out["straggler last fraction"] = st["last_fraction"][st["rank"]]
        out["straggler caused wait ms"] = st["caused_wait_ms"][st["rank"]]
    for q in ("mean", "p50", "p90", "p99", "max"):
        out[f"skew {q} ms"] = tab["skew_ms"]["all"][q]
    return out


def label(trace: Trace) -> str:
    """'' for a measured run; what it projects for a file written by trace project --out."""
    source = trace.attrs.get("projected_from")
    return f"projection of {source} onto {trace.attrs.get('projection', '?')}" if source else ""


def compare_tables(tab_a: dict[str, Any], tab_b: dict[str, Any], labels: tuple[str, str] = ("", "")) -> dict[str, Any]:
    """Rows of (metric, a, b, b/a); metrics present in only one run show None on the other side."""
    ma, mb = metrics(tab_a), metrics(tab_b)
    names = list(ma) + [k for k in mb if k not in ma]
    rows = []
    for name in names:
        a, b = ma.get(name), mb.get(name)
        numeric = isinstance(a, (int, float)) and isinstance(b, (int, float))
        ratio = (b / a) if numeric and a not in (0, None) else None
        rows.append({"metric": name, "a": a, "b": b, "ratio": ratio})
    partial = [tab_a["partial"], tab_b["partial"]]
    return plain({"a": tab_a["file"], "b": tab_b["file"], "partial": partial, "labels": list(labels), "rows": rows})


def format_compare(cmp: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    width = max([len(r["metric"]) for r in cmp["rows"]] + [6])
    labels = cmp.get("labels") or ["", ""]
    names = [f"{side} = {cmp[side.lower()]}" + ("  (partial)" if cmp["partial"][i] else "")
             + (f"  ({labels[i]})" if labels[i] else "") for i, side in enumerate("AB")]
    lines = [*names,
             f"{'metric':<{width}} {'A':>12} {'B':>12} {'B/A':>8}"]
    for r in cmp["rows"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"{r['metric']:<{width}} {cell(r['a']):>12} {cell(r['b']):>12} {ratio:>8}")
    return "\n".join(lines) + "\n"


def trace_compare(path_a: str | Path, path_b: str | Path, as_json: bool = False) -> str:
    """What `python -m mpillama trace compare A.h5 B.h5 [--json]` prints."""
    a, b = load_trace(path_a), load_trace(path_b)
    cmp = compare_tables(report_tables(analyze(a)), report_tables(analyze(b)), (label(a), label(b)))
    return json.dumps(cmp, indent=1) + "\n" if as_json else format_compare(cmp)
