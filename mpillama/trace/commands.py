"""The `trace` subcommands as the CLI calls them: each takes paths and returns the text to print.

Owns nothing but the dispatch; matplotlib is imported only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path

from mpillama.trace.compare import trace_compare
from mpillama.trace.export import trace_export
from mpillama.trace.project_report import trace_project
from mpillama.trace.report import trace_report

__all__ = ["trace_report", "trace_plot", "trace_export", "trace_compare", "trace_project"]


def trace_plot(path: str | Path, out_dir: str | Path) -> list[Path]:
    """`trace plot FILE.h5 --out DIR`: the PNGs written (rank_time, wait_heatmap, skew_hist)."""
    from mpillama.trace.plot import trace_plot as plot  # matplotlib: slow to import, needed only here

    return plot(path, out_dir)
