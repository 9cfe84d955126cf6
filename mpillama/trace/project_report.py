"""`trace project` as the user sees it: flags to Targets, and the projection beside the measured run.

Owns the parsing of the command's values (lists for a grid, R=F speed factors), the tables
(projection_tables: plain JSON-ready dicts) and their text. Every figure comes from project.py
(the model) and analysis.py (waits, straggler: the same code reads the measured trace and the
projected one). matplotlib is imported only for --grid's plot.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mpillama.config import parse_rank_weights
from mpillama.errors import MpillamaError
from mpillama.trace.analysis import Analysis, analyze
from mpillama.trace.project import (
    BLOCKS, FEATURES, KINDS, Calibrated, Projection, Target, calibrate, project, projected_trace, write_projection,
)
from mpillama.trace.recorder import PHASES
from mpillama.trace.report import plain, report_tables

UNITS = {"weights": ("ns per weight x token", 1e9), "attention": ("ns per head x dim x position", 1e9),
         "calls": ("us per call", 1e6), "residual": ("ns per element", 1e9)}


def parse_values(text: str | None, kind: type, flag: str) -> list[Any]:
    """'1,2,4' -> [1, 2, 4]; None -> [None] (the trace's own)."""
    if text is None:
        return [None]
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise MpillamaError(f"{flag} {text!r}: give a value or a comma-separated list of them") from None
    if not values:
        raise MpillamaError(f"{flag} {text!r}: give a value or a comma-separated list of them")
    return values


def parse_speed(items: list[str] | None) -> dict[int, float]:
    """['1=0.5', '3=2,4=1'] -> {1: 0.5, 3: 2.0, 4: 1.0}."""
    out: dict[int, float] = {}
    for item in items or []:
        for part in item.split(","):
            rank, sep, factor = part.partition("=")
            try:
                if not sep:
                    raise ValueError
                out[int(rank)] = float(factor)
            except ValueError:
                raise MpillamaError(f"--speed {part!r}: give RANK=FACTOR, e.g. 3=0.5 for a rank half as fast") from None
    return out


def targets(cal: Calibrated, ranks: str | None, delay: str | None, bandwidth: str | None, sync: str | None,
            rank_weights: str | None, speed: list[str] | None) -> list[Target]:
    """Every combination of the values given (one Target without lists)."""
    m = cal.measured
    weights = parse_rank_weights(rank_weights)
    if weights == "auto":
        raise MpillamaError("--rank-weights auto measures the ranks at start-up; to project, give one weight per rank")
    out = []
    # ranks innermost: the grid reads as one line of the plot after another
    grid = itertools.product(parse_values(sync, str, "--sync"), parse_values(delay, float, "--delay"),
                             parse_values(bandwidth, float, "--bandwidth"), parse_values(ranks, int, "--ranks"))
    for s, d, b, n in grid:
        n = m.n_ranks if n is None else n
        if weights is not None and len(weights) != n:
            raise MpillamaError(f"--rank-weights has {len(weights)} values for {n} ranks: give one weight per rank")
        out.append(Target(n, s or m.sync, weights, parse_speed(speed), d, b))
    return out


# ---------------------------------------------------------------------------------------- tables


def run_summary(a: Analysis) -> dict[str, Any]:
    """tok/s per phase, rank 0's decode sync share, per-rank decode ms per token, straggler: measured or projected."""
    tab = report_tables(a)
    t = a.trace
    out: dict[str, Any] = {"ranks": t.n_ranks, "sync": t.attrs.get("sync", "")}
    for phase in PHASES:
        out[f"{phase}_tok_s"] = tab["phases"][phase]["tok_s"] if phase in tab["phases"] else None
    dec = tab["phases"].get("decode") or next(iter(tab["phases"].values()), None)
    out["sync_share"] = None
    out["per_rank"] = []
    if dec is not None:
        token_ms = 1e3 * dec["seconds"] / max(dec["tokens"], 1)
        out["sync_share"] = dec["ranks"][0]["sync_ms"] / token_ms if token_ms > 0 else None
        share = t.ranks.get("weight_share", np.full(t.n_ranks, np.nan))
        out["per_rank"] = [{"rank": r["rank"], "share": float(share[r["rank"]]), "compute_ms": r["compute_ms"],
                            "sync_ms": r["sync_ms"], "wait_ms": r["wait_ms"]} for r in dec["ranks"]]
    out["straggler"] = tab["straggler"]["rank"]
    return out


def model_table(cal: Calibrated) -> dict[str, Any]:
    c = cal.coefs
    rows = {}
    for p, phase in ((PHASES.index("decode"), "decode"), (PHASES.index("prefill"), "prefill")):
        for b, block in enumerate(BLOCKS):
            terms = {UNITS[f][0]: float(c.coef[p, b, j] * UNITS[f][1]) for j, f in enumerate(FEATURES)}
            rows[f"{phase} {block}"] = {**terms, "fit_error": c.rms_error[p, b], "observations": int(c.n_rows[p, b])}
    return {"terms": rows, "not_separable": c.dropped,
            "rank_speed": [float(s) for s in cal.speeds]}


def link_table(p: Projection) -> dict[str, Any]:
    k = p.link
    return {"latency_us": k.latency * 1e6,
            "bandwidth_gbit": k.bandwidth * 8 / 1e9 if math.isfinite(k.bandwidth) else None,
            "overhead_us": {name: k.overhead[i] * 1e6 for i, name in enumerate(KINDS)},
            "own_us": {name: k.own[i] * 1e6 for i, name in enumerate(KINDS)},
            "source": k.source}


def projection_tables(cal: Calibrated, p: Projection, measured: Analysis) -> dict[str, Any]:
    """Everything `trace project` prints for one target, as a JSON-ready dict."""
    t = p.target
    return plain({
        "trace": cal.measured.trace.path,
        "calibration": [m.trace.path for m in cal.calibration],
        "model": cal.measured.trace.attrs.get("model", ""),
        "target": {"ranks": t.n_ranks, "sync": t.sync, "rank_weights": t.weights,
                   "speed": {str(r): f for r, f in t.speed.items()}, "delay_ms": t.delay_ms,
                   "bandwidth_gbit": t.bandwidth_gbit},
        "sources": p.sources,
        "compute_model": model_table(cal),
        "link": link_table(p),
        "measured": run_summary(measured),
        "projected": run_summary(analyze(projected_trace(cal, p))),
    })


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def format_projection(tab: dict[str, Any]) -> str:
    me, pr, link = tab["measured"], tab["projected"], tab["link"]
    cal = ", ".join(tab["calibration"])
    lines = [f"projection of {tab['trace']} ({me['ranks']} rank(s), sync {me['sync']})"
             + (f", calibrated with {cal}" if cal else ""),
             f"model {tab['model'] or '-'}", ""]
    lines.append("compute model, per step of each block (fit error: rms / mean over the calibration's steps):")
    lines.append(f"  {'phase block':<14} {'ns/weight':>10} {'ns/attn':>9} {'us/call':>9} {'ns/resid':>9} {'error':>7}")
    for name, row in tab["compute_model"]["terms"].items():
        v = list(row.values())
        lines.append(f"  {name:<14} {v[0]:>10.4f} {v[1]:>9.4f} {v[2]:>9.1f} {v[3]:>9.3f} {_pct(row['fit_error']):>7}")
    lost: dict[str, list[str]] = {}
    for name, terms in tab["compute_model"]["not_separable"].items():
        for term in terms:
            lost.setdefault(term, []).append(name)
    if lost:
        lines.append("  left out, the calibration cannot tell them from the other terms: "
                     + "; ".join(f"{term} in {', '.join(where)}" for term, where in lost.items())
                     + " (--calibrate with a trace at another rank count)")
    bw = link["bandwidth_gbit"]
    lines.append(f"link: latency {link['latency_us']:.1f} us one way per hop ({link['source'].get('latency', '-')}); "
                 f"bandwidth {'unlimited' if bw is None else f'{bw:.2f} Gbit/s'} "
                 f"({link['source'].get('bandwidth', '-')})")
    lines.append("  overhead per collective, us: " + ", ".join(
        f"{k} {v:.1f} ({link['source'].get('overhead ' + k, '-')})" for k, v in link["overhead_us"].items()))
    lines.append("")
    width = 28
    lines.append(f"{'':<{width}} {'measured':>14} {'projected':>14}")
    rows = [("ranks", me["ranks"], pr["ranks"]), ("sync", me["sync"], pr["sync"]),
            ("prefill tok/s", _f(me["prefill_tok_s"]), _f(pr["prefill_tok_s"])),
            ("decode tok/s", _f(me["decode_tok_s"]), _f(pr["decode_tok_s"])),
            ("sync share (rank 0, decode)", _pct(me["sync_share"]), _pct(pr["sync_share"])),
            ("straggler", "-" if me["straggler"] is None else f"rank {me['straggler']}",
             "-" if pr["straggler"] is None else f"rank {pr['straggler']}")]
    for name, a, b in rows:
        lines.append(f"{name:<{width}} {a!s:>14} {b!s:>14}")
    lines.append("")
    lines.append("decode, ms per token      measured                            projected")
    lines.append(f"  {'rank':>4}   {'share':>6} {'compute':>8} {'sync':>8} {'wait':>8}   "
                 f"{'share':>6} {'compute':>8} {'sync':>8} {'wait':>8}  replays")
    n = max(len(me["per_rank"]), len(pr["per_rank"]))
    for r in range(n):
        a = me["per_rank"][r] if r < len(me["per_rank"]) else None
        b = pr["per_rank"][r] if r < len(pr["per_rank"]) else None
        left = (f"{_f(a['share'], 3):>6} {_f(a['compute_ms']):>8} {_f(a['sync_ms']):>8} {_f(a['wait_ms']):>8}"
                if a else " " * 35)
        right = (f"{_f(b['share'], 3):>6} {_f(b['compute_ms']):>8} {_f(b['sync_ms']):>8} {_f(b['wait_ms']):>8}"
                 f"  rank {tab['sources'][r]}" if b else "")
        lines.append(f"  {r:>4}   {left}   {right}".rstrip())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- grids


def grid_rows(cal: Calibrated, points: list[Target]) -> list[dict[str, Any]]:
    rows = []
    for t in points:
        p = project(cal, t)
        tok = p.tok_s()
        rows.append({"ranks": t.n_ranks, "sync": p.target.sync, "delay_ms": t.delay_ms,
                     "bandwidth_gbit": t.bandwidth_gbit, "latency_us": p.link.latency * 1e6,
                     "prefill_tok_s": tok.get("prefill"), "decode_tok_s": tok.get("decode"),
                     "sync_share": p.sync_share()})
    return rows


def format_grid(rows: list[dict[str, Any]], measured: dict[str, Any], path: str) -> str:
    head = (f"projections of {path} (measured: {measured['ranks']} rank(s), sync {measured['sync']}, "
            f"prefill {_f(measured['prefill_tok_s'])} tok/s, decode {_f(measured['decode_tok_s'])} tok/s)")
    columns = (f"{'ranks':>5} {'sync':>9} {'latency us':>10} {'Gbit/s':>7} {'prefill tok/s':>13} {'decode tok/s':>12} "
               f"{'sync share':>10}")
    lines = [head, columns]
    for r in rows:
        bw = "trace" if r["bandwidth_gbit"] is None else f"{r['bandwidth_gbit']:g}"
        lines.append(f"{r['ranks']:>5} {r['sync']:>9} {r['latency_us']:>10.1f} {bw:>7} {_f(r['prefill_tok_s']):>13} "
                     f"{_f(r['decode_tok_s']):>12} {_pct(r['sync_share']):>10}")
    return "\n".join(lines) + "\n"


def trace_project(path: str | Path, ranks: str | None = None, delay: str | None = None, bandwidth: str | None = None,
                  sync: str | None = None, rank_weights: str | None = None, speed: list[str] | None = None,
                  calibration: list[str] | None = None, model: str | None = None, as_json: bool = False,
                  grid: str | None = None, out: str | None = None) -> str:
    """What `python -m mpillama trace project FILE.h5 ...` prints."""
    cal = calibrate(path, calibration or [], model)
    points = targets(cal, ranks, delay, bandwidth, sync, rank_weights, speed)
    measured = analyze(cal.measured.trace)
    if len(points) == 1 and grid is None:
        p = project(cal, points[0])
        if out:
            write_projection(cal, p, out)
        tab = projection_tables(cal, p, measured)
        return json.dumps(tab, indent=1) + "\n" if as_json else format_projection(tab)
    if out:
        raise MpillamaError("--out writes one projected run: give single values to --ranks, --delay, --bandwidth and "
                            "--sync")
    rows = grid_rows(cal, points)
    me = run_summary(measured)
    if grid:
        from mpillama.trace.plot import plot_projection_grid  # matplotlib: only for the plot

        plot_projection_grid(rows, me, Path(grid))
    if as_json:
        return json.dumps(plain({"trace": str(path), "measured": me, "points": rows}), indent=1) + "\n"
    return format_grid(rows, me, str(path)) + (f"plot: {grid}\n" if grid else "")
