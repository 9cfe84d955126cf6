"""The sweep results file (HDF5) and its table: the one place naming its attributes and columns.

    /         attrs: format "mpillama-sweep", version 1, created, updated, grid (the TOML text), model,
              launcher (its command and args, without -n and the Open MPI flags), program (what the
              ranks run before `-m mpillama bench`), parameters (the grid keys, in column order),
              n_points (planned), n_done, complete (False while running or after an interruption),
              mpillama_version
    /points   equal-length columns, one row per point run so far:
              index (1-based, as in the progress lines and trace names), one column per grid key
              (integers as int64, sync_timeout float64, the rest utf-8 strings; rank_weights "even",
              "auto" or "0.6,1,1,1"), status ("ok" | "failed" | "timeout"), METRICS (float64, NaN
              when the point failed), wall_s, trace (path relative to the results file's folder, or
              ""), error (the line that says why it failed), json (bench's JSON result, or "")

Imports h5py, numpy, errors, atomic and h5attrs only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import mpillama
from mpillama.atomic import atomic_write
from mpillama.errors import MpillamaError
from mpillama.h5attrs import h5_value, py_value

FORMAT = "mpillama-sweep"
VERSION = 1
METRICS = ("prompt_tok_s", "gen_tok_s", "token_ms", "rank0_sync_ms", "load_s")
INT_COLUMNS = ("index", "ranks", "nthreads", "batch", "chunk_bytes", "max_seq_len")
FLOAT_COLUMNS = (*METRICS, "wall_s", "sync_timeout")


@dataclass
class PointResult:
    index: int
    point: dict[str, Any]  # grid key -> value (rank_weights: None even, "auto", or a tuple)
    status: str  # "ok" | "failed" | "timeout"
    metrics: dict[str, Any]  # bench's JSON result ({} unless ok)
    wall_s: float
    trace: str | None
    error: str


@dataclass
class SweepData:
    attrs: dict[str, Any]
    parameters: list[str]
    rows: list[dict[str, Any]]  # column name -> value, one dict per point


def value_text(value: Any) -> str:
    """A grid value as the flag takes it and the file stores it."""
    if value is None:
        return "even"
    if isinstance(value, tuple):
        return ",".join(f"{w:g}" for w in value)
    return str(value)


def column_names(parameters: list[str]) -> list[str]:
    return ["index", *parameters, "status", *METRICS, "wall_s", "trace", "error", "json"]


def _row(r: PointResult) -> dict[str, Any]:
    row: dict[str, Any] = {"index": r.index}
    row.update({k: v if k in INT_COLUMNS or k in FLOAT_COLUMNS else value_text(v) for k, v in r.point.items()})
    row["status"] = r.status
    row.update({m: float(r.metrics[m]) if isinstance(r.metrics.get(m), (int, float)) else math.nan for m in METRICS})
    row.update(wall_s=r.wall_s, trace=r.trace or "", error=r.error, json=json.dumps(r.metrics) if r.metrics else "")
    return row


def _column(name: str, values: list[Any]) -> np.ndarray:
    if name in INT_COLUMNS:
        return np.array(values, dtype=np.int64)
    if name in FLOAT_COLUMNS:
        return np.array(values, dtype=np.float64)
    # HDF5 strings end at a NUL; a killed job's stderr can hold some
    return np.array([str(v).replace("\x00", "") for v in values], dtype=h5py.string_dtype())


def write_results(path: str | Path, meta: dict[str, str], parameters: list[str], results: list[PointResult],
                  planned: int, complete: bool) -> None:
    """Write every point so far to path atomically (a temporary name renamed over it).
    meta: the string attributes grid, model, created, launcher, program."""
    path = Path(path)
    names = column_names(parameters)
    rows = [_row(r) for r in results]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with atomic_write(path) as part, h5py.File(part, "w") as f:
        attrs = {**meta, "format": FORMAT, "version": VERSION, "updated": now, "n_points": planned,
                 "n_done": len(results), "complete": complete, "mpillama_version": mpillama.__version__,
                 "parameters": parameters}
        for key, value in attrs.items():
            f.attrs[key] = h5_value(value)
        g = f.create_group("points")
        for name in names:
            g.create_dataset(name, data=_column(name, [row[name] for row in rows]))


def read_results(path: str | Path) -> SweepData:
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: py_value(v) for k, v in f.attrs.items()}
            if attrs.get("format") != FORMAT:
                raise MpillamaError(f"{path} is not a sweep results file (format {attrs.get('format')!r})")
            if attrs.get("version") != VERSION:
                raise MpillamaError(f"{path}: sweep file version {attrs.get('version')} is not supported "
                                    f"(this mpillama reads {VERSION}); use the mpillama that wrote it")
            parameters = attrs["parameters"]
            columns = {name: [py_value(v) for v in f["points"][name][()]] for name in f["points"]}
    except OSError as e:
        raise MpillamaError(f"{path}: cannot read it as HDF5 ({e})") from None
    order = [*column_names(parameters), *columns]
    columns = {name: columns[name] for name in dict.fromkeys(order) if name in columns}
    n = len(columns.get("index", []))
    return SweepData(attrs, parameters, [{k: v[i] for k, v in columns.items()} for i in range(n)])


def _ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ok points by generation speed, fastest first, then the others in run order."""
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["gen_tok_s"])
    return ok + [r for r in rows if r["status"] != "ok"]


def _num(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def format_table(data: SweepData, path: str) -> str:
    a, rows = data.attrs, _ranked(data.rows)
    ok = sum(r["status"] == "ok" for r in rows)
    state = "complete" if a["complete"] else "incomplete: interrupted or still running"
    lines = [f"sweep {path}: model {a['model']}, {a['n_done']} of {a['n_points']} points run, {ok} ok ({state})"]
    head = ["", "#", *data.parameters, "gen tok/s", "prompt tok/s", "token ms", "sync ms", "load s", "wall s", "status"]
    table = [head]
    for i, r in enumerate(rows):
        table.append(["*" if i == 0 and r["status"] == "ok" else "", str(r["index"]),
                      *(value_text(r[p]) for p in data.parameters),
                      _num(r["gen_tok_s"], 1), _num(r["prompt_tok_s"], 1), _num(r["token_ms"], 3),
                      _num(r["rank0_sync_ms"], 3), _num(r["load_s"], 2), _num(r["wall_s"], 0), r["status"]])
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    if ok:
        best = rows[0]
        setting = " ".join(f"{p}={value_text(best[p])}" for p in data.parameters)
        lines.append(f"* best: point {best['index']} ({setting}), {best['gen_tok_s']:.1f} tok/s generation")
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"point {r['index']} {r['status']}: {r['error']}")
    return "\n".join(lines)


def results_json(data: SweepData) -> dict[str, Any]:
    """What `sweep report --json` prints: the attributes and one object per point (NaN as null)."""
    points = []
    for row in data.rows:
        point = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items() if k != "json"}
        point["result"] = json.loads(row["json"]) if row["json"] else None
        points.append(point)
    return {**data.attrs, "points": points}
