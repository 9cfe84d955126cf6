"""The synthetic models the tests run on, written once into a folder (shared with MPI runs)."""

from __future__ import annotations

from pathlib import Path

from mpillama.formats.synth import write_synthetic

# (shape, weight type): decisive chain-head models in both types, and a tied one (f32: exact math)
TEST_MODELS = (("tiny", "q40"), ("tiny", "f32"), ("qwen3-tiny", "q40"), ("qwen3-tiny", "f32"),
               ("qwen3-tiny-tied", "f32"), ("qwen3-moe-tiny", "q40"), ("qwen3-moe-tiny", "f32"))


def make_test_models(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for shape, kind in TEST_MODELS:
        path = folder / f"{shape}-{kind}.gguf"
        if not path.exists():
            write_synthetic(shape, path, weight_type=kind, seed=7)
        out[f"{shape}-{kind}"] = path
    return out
