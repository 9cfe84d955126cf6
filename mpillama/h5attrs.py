"""HDF5 attribute values <-> plain Python values, for every HDF5 file mpillama writes and reads.

Owns the one conversion the trace files (trace/session.py writes, trace/analysis.py reads) and the
sweep results files (sweep_file.py) share: what h5py can store as an attribute, and how what it
hands back (bytes, numpy scalars, arrays of strings) becomes str, int, float, bool and lists again.

Imports h5py, numpy and json only.
"""

from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np


def h5_value(value: Any) -> Any:
    """A Python value as h5py stores it as an attribute: None -> "", string lists -> string arrays,
    number lists -> arrays, anything else h5py cannot store -> its JSON text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.replace("\x00", "")  # HDF5 strings end at NUL (MPI version strings may carry one)
    if isinstance(value, (bool, int, float, np.generic, np.ndarray)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return np.array([v.replace("\x00", "") for v in value], dtype=h5py.string_dtype())
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return np.asarray(value)
    return json.dumps(value, default=str)


def py_value(value: Any) -> Any:
    """An attribute (or one element of a dataset) as h5py returns it, as plain Python: bytes -> str,
    numpy scalars -> int/float/bool, string arrays -> list[str]; numeric arrays stay arrays."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OSU":
            return [v.decode() if isinstance(v, bytes) else str(v) for v in value.tolist()]
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value
