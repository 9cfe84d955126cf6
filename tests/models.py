"""The synthetic models the tests run on, written once into a folder (shared with MPI runs)."""

from __future__ import annotations

from pathlib import Path

from mpillama.formats.synth import write_synthetic

# (shape, weight type): decisive chain-head models in both types, a tied one (f32: exact math), models
# whose weights are kept as stored (Q8_0; Q4_K_M: Q4_K and Q6_K mixed), and a mixture of experts
TEST_MODELS = (("tiny", "q40"), ("tiny", "f32"), ("qwen3-tiny", "q40"), ("qwen3-tiny", "f32"), ("qwen3-tiny-tied", "f32"),
               ("tiny", "q80"), ("tiny-256", "q4_k_m"), ("qwen3-moe-tiny", "q40"), ("qwen3-moe-tiny", "f32"))


def make_test_models(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for shape, kind in TEST_MODELS:
        path = folder / f"{shape}-{kind}.gguf"
        if not path.exists():
            write_synthetic(shape, path, weight_type=kind, seed=7)
        out[f"{shape}-{kind}"] = path
    return out
