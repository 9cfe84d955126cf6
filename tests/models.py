"""The synthetic models the tests run on, written once into a folder (shared with MPI runs)."""

from __future__ import annotations

from pathlib import Path

from mpillama.formats.synth import write_synthetic

TEST_SHAPES = ("tiny", "qwen3-tiny")
TEST_TYPES = ("q40", "f32")


def make_test_models(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for shape in TEST_SHAPES:
        for kind in TEST_TYPES:
            path = folder / f"{shape}-{kind}.gguf"
            if not path.exists():
                write_synthetic(shape, path, weight_type=kind, seed=7)
            out[f"{shape}-{kind}"] = path
    return out
