"""`trace plot`: three PNGs from one trace, drawn with matplotlib's Agg canvas.

Only the plot command imports this module (matplotlib is slow to import and needed
nowhere else). It uses Figure + FigureCanvasAgg directly, so no global backend or
pyplot state is touched. The tables come from analysis.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mpillama.errors import MpillamaError
from mpillama.trace.analysis import Analysis, analyze, load_trace

COLORS = {"compute": "#4c72b0", "transfer": "#55a868", "wait": "#c44e52"}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _robust_top(total: np.ndarray) -> float:
    """A y limit that shows the typical steps: the largest, unless a few steps dwarf the rest."""
    if total.size == 0:
        return 1.0
    top, typical = float(total.max()), float(np.percentile(total, 90))
    return max(1.3 * typical, 1e-3) if top > 3 * typical else max(1.05 * top, 1e-3)


def plot_rank_time(a: Analysis, path: Path) -> Path:
    """Per rank, over steps: compute / transfer / wait ms per token, stacked."""
    t = a.times
    n = a.trace.n_ranks
    fig = Figure(figsize=(10, 1.8 + 1.6 * n))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    tokens = np.maximum(t.tokens, 1)[:, None]
    parts = {
        "compute": t.compute * 1e3 / tokens,
        "transfer": (t.sync - t.wait) * 1e3 / tokens,
        "wait": t.wait * 1e3 / tokens,
    }
    total = sum(parts.values())  # (n_steps, n_ranks) ms per token
    top = _robust_top(total)
    for r, ax in enumerate(axes):
        if len(t.step):
            ax.stackplot(t.step, *(p[:, r] for p in parts.values()), labels=list(parts),
                         colors=[COLORS[k] for k in parts], step="mid")
            ax.set_ylim(0, top)
            for i in np.nonzero(total[:, r] > top)[0]:  # outliers (a first step that compiled) stay readable
                ax.annotate(f"{total[i, r]:.0f}", (t.step[i], top), ha="center", va="top", fontsize="x-small")
        ax.set_ylabel(f"rank {r}\nms/token")
        ax.grid(alpha=0.3)
    if len(t.step):
        axes[0].legend(loc="upper right", fontsize="small", ncols=3)
    else:
        axes[0].text(0.5, 0.5, "no finished steps", ha="center", va="center", transform=axes[0].transAxes)
    axes[-1].set_xlabel("step")
    fig.suptitle("time per token by rank: compute, transfer (sync minus wait), wait")
    return _save(fig, path)


def plot_wait_heatmap(a: Analysis, path: Path) -> Path:
    """Mean wait per step (ms) in the collectives of each layer, by rank."""
    fig = Figure(figsize=(2.5 + 0.9 * a.trace.n_ranks, 2 + 0.25 * max(len(a.wait_layers), 1)))
    ax = fig.subplots()
    table = a.wait_table_ms if len(a.wait_layers) else np.zeros((1, a.trace.n_ranks))
    im = ax.imshow(table, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks(range(a.trace.n_ranks), [str(r) for r in range(a.trace.n_ranks)])
    labels = ["head/ctrl" if layer < 0 else str(layer) for layer in a.wait_layers] or ["-"]
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set_xlabel("rank")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="wait, ms per step")
    ax.set_title(f"wait in collectives ({a.wait_phase or 'all'} steps)")
    fig.tight_layout()
    return _save(fig, path)


def plot_skew_hist(a: Analysis, path: Path) -> Path:
    """Histogram of skew (last entry - first entry) over all complete collectives."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    values = a.skew["values_ms"]
    if len(values):
        # log-spaced bins: skew spans microseconds (noise) to seconds (a compiling first step)
        lo = max(float(values[values > 0].min()) if (values > 0).any() else 1e-3, 1e-4)
        hi = max(float(values.max()), lo * 10)
        ax.hist(np.clip(values, lo, None), bins=np.geomspace(lo, hi, 41), color=COLORS["wait"])
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no complete collectives", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("skew, ms (last entry - first entry)")
    ax.set_ylabel("collectives")
    ax.set_title(f"skew of {len(values)} collectives")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_projection_grid(rows: list[dict], measured: dict, path: Path) -> Path:
    """`trace project --grid PNG`: projected decode tok/s against ranks, one line per link and sync; the
    measured run as a point."""
    if path.parent and not path.parent.is_dir():
        raise MpillamaError(f"--grid {path}: directory {path.parent} does not exist")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.setdefault((r["latency_us"], r["bandwidth_gbit"], r["sync"]), []).append(r)
    for (latency, bw, sync), pts in lines.items():
        pts = sorted(pts, key=lambda r: r["ranks"])
        label = f"{latency / 1e3:g} ms one way, {sync}" + ("" if bw is None else f", {bw:g} Gbit/s")
        ax.plot([r["ranks"] for r in pts], [r["decode_tok_s"] or 0.0 for r in pts], marker="o", label=label)
    if measured.get("decode_tok_s"):
        ax.plot([measured["ranks"]], [measured["decode_tok_s"]], marker="*", markersize=14, linestyle="none",
                color="black", label=f"measured ({measured['sync']})")
    ax.set_xlabel("ranks")
    ax.set_ylabel("decode tok/s")
    ax.set_title("projected decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def trace_plot(path: str | Path, out_dir: str | Path) -> list[Path]:
    """What `python -m mpillama trace plot FILE.h5 --out DIR` does. Returns the PNGs written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MpillamaError(f"--out {out} is a file: give a directory for the PNGs")
    out.mkdir(parents=True, exist_ok=True)
    a = analyze(load_trace(path))
    return [
        plot_rank_time(a, out / "rank_time.png"),
        plot_wait_heatmap(a, out / "wait_heatmap.png"),
        plot_skew_hist(a, out / "skew_hist.png"),
    ]
