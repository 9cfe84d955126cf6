"""K-quant models end to end with --weight-type auto: a Q4_K_M file (Q4_K, with Q6_K for the head and
some layers' attn_v and ffn_down, as llama-quantize mixes them) keeps every tensor as stored, a matrix
stacked from both kinds included; tokens equal the f32 weights of the same file, logits stay near the
f32 model and nearer than the file requantized to Q4_0; identical tokens on 1, 2 and 3 ranks come
from the MPI suite's tiny-256-q4_k_m case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpillama import kernels
from mpillama.cli import main
from mpillama.formats import open_model
from mpillama.formats.synth import write_synthetic
from mpillama.kernels.weights import StackedMatrix
from mpillama.weight_source import FileSource, tensor_kinds

STEPS = 24


def generate(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> np.ndarray:
    dump = tmp_path / f"logits{len(list(tmp_path.iterdir()))}.npy"
    code = main(["generate", "--model", str(model), "--prompt", "The capital of France is", "--steps", str(STEPS),
                 "--ignore-eos", "--dump-logits", str(dump), *extra])
    assert code == 0, capsys.readouterr().err
    return np.load(dump)


def test_a_q4_k_m_file_is_kept_as_stored(models: dict[str, Path]) -> None:
    mf = open_model(models["tiny-256-q4_k_m"])
    qkv = ["blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v"]
    assert tensor_kinds(mf.tensors, qkv, "auto") == ["q4_k", "q4_k", "q6_k"]  # layer 0 has more bits for v
    src = FileSource(mf, "auto")
    m = src.matrix(qkv, [(0, 128), (64, 128), (64, 128)], None)  # one rank's rows of each
    assert isinstance(m, StackedMatrix) and [p.kind for p in m.parts] == ["q4_k", "q6_k"]
    assert np.array_equal(kernels.unpack_kquant(m.parts[1]), mf.read_raw("blk.0.attn_v", slice(64, 128)))
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    acts = kernels.new_activations(3, 256)
    kernels.quantize_activations(acts, x)
    out = np.zeros((3, 256), np.float32)
    kernels.matmul_weights(out, m, acts, 3)  # prefill: each part into its rows
    one = np.zeros((1, 256), np.float32)
    kernels.matmul_weights(one, m, acts, 1)  # decode: in place
    w = np.concatenate([mf.read_f32("blk.0.attn_q", slice(0, 128)), mf.read_f32("blk.0.attn_k", slice(64, 128)),
                        mf.read_f32("blk.0.attn_v", slice(64, 128))])
    ref = acts.qs[:3].reshape(3, 256).astype(np.float64) * np.repeat(acts.d[:3], 32, axis=1) @ w.T.astype(np.float64)
    tol = 1e-4 * np.abs(ref).max()
    assert np.allclose(out, ref, rtol=1e-4, atol=tol) and np.allclose(one[0], ref[0], rtol=1e-4, atol=tol)
    assert tensor_kinds(mf.tensors, ["blk.0.attn_output"], "auto", (0, 128)) == ["q80"]  # cuts a 256-block
    assert tensor_kinds(mf.tensors, ["blk.0.attn_output"], "auto", (0, 256)) == ["q4_k"]


def test_q4_k_m_tokens_equal_f32_weights_and_logits_near_the_f32_model(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = models["tiny-256-q4_k_m"]
    auto = generate(path, tmp_path, capsys)
    err = capsys.readouterr().err
    assert "weights auto" in err and "requantizing" not in err
    exact = generate(path, tmp_path, capsys, "--weight-type", "f32")  # the same file's weights, dequantized
    assert list(np.argmax(auto, axis=1)) == list(np.argmax(exact, axis=1))
    f32_model = tmp_path / "tiny-256-f32.gguf"
    write_synthetic("tiny-256", f32_model, weight_type="f32", seed=7)  # the models fixture's seed: same weights
    reference = generate(f32_model, tmp_path, capsys, "--weight-type", "f32")
    q40 = generate(path, tmp_path, capsys, "--weight-type", "q40")
    scale = np.abs(reference).max()
    err_auto, err_q40 = np.abs(auto - reference).max() / scale, np.abs(q40 - reference).max() / scale
    assert err_auto < 0.1, (err_auto, err_q40)
    assert err_auto < err_q40 / 1.2, (err_auto, err_q40)  # the file's own weights beat their Q4_0 requantization


def test_k_quant_types_need_256_wide_shapes(tmp_path: Path) -> None:
    code = main(["synth", "--shape", "tiny", "--type", "q4_k_m", "--out", str(tmp_path / "x.gguf")])
    assert code == 2 and not list(tmp_path.iterdir())
