"""h5attrs: Python values stored as HDF5 attributes by h5py and read back as plain Python."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from mpillama.h5attrs import h5_value, py_value


def round_trip(tmp_path: Path, values: dict) -> dict:
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        for key, value in values.items():
            f.attrs[key] = h5_value(value)
    with h5py.File(path, "r") as f:
        return {key: py_value(value) for key, value in f.attrs.items()}


def test_values_come_back_as_plain_python(tmp_path: Path) -> None:
    back = round_trip(tmp_path, {
        "none": None, "text": "Open MPI v4\x00", "flag": True, "count": 3, "ratio": 0.25, "f32": np.float32(1.5),
        "argv": ["run", "-n", "2"], "names": ("att", "ffn"), "weights": [0.5, 1, 1], "ints": np.arange(3),
        "nested": {"a": [1, 2]}, "mixed": [1, "a"],
    })
    assert back == {
        "none": "", "text": "Open MPI v4", "flag": True, "count": 3, "ratio": 0.25, "f32": 1.5,
        "argv": ["run", "-n", "2"], "names": ["att", "ffn"], "weights": back["weights"], "ints": back["ints"],
        "nested": '{"a": [1, 2]}', "mixed": '[1, "a"]',
    }
    assert [type(back[k]) for k in ("flag", "count", "ratio", "f32")] == [bool, int, float, float]
    assert back["weights"].tolist() == [0.5, 1.0, 1.0] and back["ints"].tolist() == [0, 1, 2]


def test_empty_string_lists_and_dataset_elements(tmp_path: Path) -> None:
    assert round_trip(tmp_path, {"params": []}) == {"params": []}
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["s"] = np.array(["ok", "failed"], dtype=h5py.string_dtype())
        f["x"] = np.array([1.5, 2.0])
    with h5py.File(path, "r") as f:
        assert [py_value(v) for v in f["s"][()]] == ["ok", "failed"]
        assert [type(py_value(v)) for v in f["x"][()]] == [float, float]
