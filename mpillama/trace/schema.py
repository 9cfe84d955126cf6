"""The trace file's layout: the one place naming its groups, columns, attributes and version.

Writers (session.py) and readers (analysis.py) take every name from here; a change to
the layout is a change to FORMAT_VERSION, and readers refuse versions they do not know.

    /            root attributes ROOT_ATTRS (+ any run metadata, + "summary_<key>" summary values)
    /ranks       one row per rank: RANK_COLUMNS (what the engine knows) + RANK_TRACE_COLUMNS
                 (what the session measured: clock offsets, record counts)
    /segments    SEGMENT_COLUMNS, equal-length, chunked + compressed (not compressed in a partial
                 file: it is written while the run goes on); attribute "names" = SEGMENTS
    /steps       STEP_COLUMNS; attribute "phases" = PHASES

A partial file (partial=True) holds what rank 0 had when the run stopped; partial_reason
says why: the signal or error, or "checkpoint: ..." when the job was killed outright and
the last periodic checkpoint is what remains.

Times in /segments and /steps are seconds on rank 0's clock since the root attribute
"clock_origin" (rank 0's perf_counter when the session opened); every rank's times are
already corrected by its clock offset and drift (clock.py) when the file is written.

Imports numpy and errors only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpillama.errors import MpillamaError
from mpillama.trace.recorder import PHASES, SEGMENTS

FORMAT = "mpillama-trace"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

RANKS = "ranks"
SEGMENTS_GROUP = "segments"
STEPS = "steps"

# Root attributes every file has (run metadata from the engine is added beside them).
ROOT_ATTRS = (
    "format", "version", "created", "n_ranks", "partial", "partial_reason",
    "clock_origin", "mpillama_version", "mpi_library_version",
)
# Run metadata the engine is expected to pass (missing ones are written as "" so readers can rely on them).
META_ATTRS = ("argv", "command", "model", "sync", "sync_reason", "buffer_float_type", "weight_type", "nthreads",
              "profile")
SUMMARY_PREFIX = "summary_"

# name -> (dtype, default). The engine's rank_info dict may use exactly these keys.
RANK_COLUMNS: dict[str, tuple[Any, Any]] = {
    "host": (str, ""),
    "pid": (np.int64, -1),
    "nthreads": (np.int32, -1),
    "weight_share": (np.float64, np.nan),  # this rank's fraction of the work
    "n_heads": (np.int32, -1),  # query heads owned
    "n_kv_heads": (np.int32, -1),  # KV heads held (shared heads count on every rank that holds them)
    "ffn_rows": (np.int32, -1),  # rows of W1/W3 owned
    "vocab_rows": (np.int32, -1),  # rows of Wcls owned
    "weight_bytes": (np.int64, -1),  # bytes of weights held
    "kv_bytes": (np.int64, -1),  # bytes of KV cache held
    "load_s": (np.float64, np.nan),  # s this rank took to load its weights
}
# Filled by the session, not the engine.
RANK_TRACE_COLUMNS: dict[str, tuple[Any, Any]] = {
    "rank": (np.int32, -1),
    "clock_offset": (np.float64, 0.0),  # s, this rank's clock minus rank 0's, at the start
    "clock_offset_end": (np.float64, np.nan),  # s, the same at the end (NaN in a partial file)
    "clock_drift": (np.float64, 0.0),  # s/s, linear change of the offset used for correction
    "clock_rtt": (np.float64, 0.0),  # s, round trip of the ping-pong sample used at the start
    "clock_rtt_end": (np.float64, np.nan),  # s, the same at the end
    "n_records": (np.int64, 0),  # segments written for this rank
    "n_dropped": (np.int64, 0),  # segments lost to a full recorder
    "n_flushes": (np.int32, 0),
    "flush_s": (np.float64, 0.0),  # s this rank spent in trace flushes (overhead, outside any segment)
}

SEGMENT_COLUMNS: dict[str, Any] = {
    "step": np.int32,
    "rank": np.int16,
    "layer": np.int16,
    "seg": np.uint8,
    "t_start": np.float64,
    "t_end": np.float64,
    "bytes": np.int64,
}
STEP_COLUMNS: dict[str, Any] = {
    "step": np.int32,
    "phase": np.uint8,  # index into PHASES
    "tokens": np.int32,
    "position": np.int32,
    "t_start": np.float64,
    "t_end": np.float64,  # NaN if the run stopped inside the step
}
SEGMENT_NAMES_ATTR = "names"
PHASE_NAMES_ATTR = "phases"
CHUNK_ROWS = 65536  # rows per HDF5 chunk of a /segments column
COMPRESSION = "gzip"
COMPRESSION_LEVEL = 4

__all__ = [
    "FORMAT", "FORMAT_VERSION", "SUPPORTED_VERSIONS", "RANKS", "SEGMENTS_GROUP", "STEPS", "ROOT_ATTRS",
    "META_ATTRS", "SUMMARY_PREFIX", "RANK_COLUMNS", "RANK_TRACE_COLUMNS", "SEGMENT_COLUMNS", "STEP_COLUMNS",
    "SEGMENT_NAMES_ATTR", "PHASE_NAMES_ATTR", "SEGMENTS", "PHASES", "check_version", "check_rank_info",
]


def check_version(path: str, attrs: dict[str, Any]) -> int:
    """The file's version if this reader knows it; otherwise an MpillamaError saying what to do."""
    fmt = attrs.get("format")
    if fmt != FORMAT:
        raise MpillamaError(
            f"{path} is not an mpillama trace (format attribute {fmt!r}, expected {FORMAT!r}): "
            "pass a file written by --trace"
        )
    version = int(attrs.get("version", -1))
    if version not in SUPPORTED_VERSIONS:
        known = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise MpillamaError(
            f"{path} is trace format version {version}; this mpillama reads version {known}: "
            "use the mpillama release that wrote it, or record the run again"
        )
    return version


def check_rank_info(rank_info: dict[str, Any]) -> None:
    """Refuse keys the schema has no column for, before anything is allocated or sent."""
    unknown = sorted(set(rank_info) - set(RANK_COLUMNS))
    if unknown:
        raise MpillamaError(
            f"trace rank_info has unknown keys {unknown}: use the keys of "
            f"mpillama.trace.schema.RANK_COLUMNS ({', '.join(RANK_COLUMNS)}) or add a column there"
        )
