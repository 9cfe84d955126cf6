"""Q8_0 models end to end with --weight-type auto (weights kept as stored): the matrices in memory,
tokens equal to the f32 weights of the same file, logits near the f32 model, GGUF and .m inputs,
and the errors for a bad weight type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpillama import kernels
from mpillama.cli import main
from mpillama.config import RunConfig
from mpillama.errors import MpillamaError
from mpillama.formats import open_model
from mpillama.formats.dllama import write_dllama
from mpillama.weight_source import FileSource, matrix_kind

STEPS = 24


def generate(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> np.ndarray:
    dump = tmp_path / f"logits{len(list(tmp_path.iterdir()))}.npy"
    code = main(["generate", "--model", str(model), "--prompt", "The capital of France is", "--steps", str(STEPS),
                 "--ignore-eos", "--dump-logits", str(dump), *extra])
    assert code == 0, capsys.readouterr().err
    return np.load(dump)


def test_auto_keeps_q80_and_requantizes_the_rest(models: dict[str, Path]) -> None:
    mf = open_model(models["tiny-q80"])
    names = ["blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v"]
    assert matrix_kind(mf.tensors, names, "auto") == "q80"
    f32 = open_model(models["tiny-f32"]).tensors
    assert matrix_kind(f32, names, "auto") == "q40"  # a float file: requantized to Q4_0 as before auto
    assert matrix_kind(mf.tensors, names, "q40") == "q40" and matrix_kind(mf.tensors, names, "f32") == "f32"
    src = FileSource(mf, "auto")
    m = src.matrix(names, [(0, 64), (16, 32), (16, 32)], None)
    assert isinstance(m, kernels.Q80Matrix) and (m.rows, m.cols) == (96, 128)
    stacked = np.concatenate([mf.read_raw("blk.0.attn_q", slice(0, 64)), mf.read_raw("blk.0.attn_k", slice(16, 32)),
                              mf.read_raw("blk.0.attn_v", slice(16, 32))])
    assert np.array_equal(kernels.unpack_q80w(m), stacked)  # the file's bytes, unchanged
    w2 = src.matrix(["blk.1.ffn_down"], None, (64, 160))  # a column slice on block boundaries
    assert np.array_equal(kernels.unpack_q80w(w2), mf.read_raw("blk.1.ffn_down", None, slice(64, 160)))
    kind, table = src.embedding()
    assert kind == "q80" and table.shape == (mf.config.vocab_size, 128 // 32 * 34) and not table.flags.owndata
    assert isinstance(FileSource(mf, "q40").matrix(names, None, None), kernels.Q40Matrix)


def test_q80_tokens_equal_f32_weights_and_logits_near_the_f32_model(models: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    q80 = models["tiny-q80"]
    auto = generate(q80, tmp_path, capsys)  # the default: --weight-type auto
    err = capsys.readouterr().err
    assert "weights auto" in err and "requantizing" not in err
    exact = generate(q80, tmp_path, capsys, "--weight-type", "f32")  # the same file's weights, dequantized
    assert list(np.argmax(auto, axis=1)) == list(np.argmax(exact, axis=1))
    f32_model = generate(models["tiny-f32"], tmp_path, capsys, "--weight-type", "f32")  # same seed, never quantized
    q40 = generate(q80, tmp_path, capsys, "--weight-type", "q40")
    assert "requantizing Q8_0 tensors to Q4_0" in capsys.readouterr().err
    scale = np.abs(f32_model).max()
    err_auto, err_q40 = np.abs(auto - f32_model).max() / scale, np.abs(q40 - f32_model).max() / scale
    assert err_auto < 0.02, err_auto
    assert err_auto < err_q40 / 4, (err_auto, err_q40)  # 8-bit weights: far nearer than their Q4_0 requantization


def test_dllama_q80_file_runs_its_own_weights(models: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    m = write_dllama(open_model(models["tiny-f32"]), tmp_path / "tiny-q80.m", "q80")  # weight_type 3
    tensors = open_model(m).tensors
    assert tensors["blk.0.ffn_up"].kind == "q80" and tensors["token_embd"].kind == "f32"
    assert matrix_kind(tensors, ["token_embd"], "auto") == "q80"  # the model's own kind, not Q4_0
    auto = generate(m, tmp_path, capsys, "--tokenizer", str(models["tiny-f32"]))
    assert "requantizing" not in capsys.readouterr().err
    exact = generate(m, tmp_path, capsys, "--tokenizer", str(models["tiny-f32"]), "--weight-type", "f32")
    assert list(np.argmax(auto, axis=1)) == list(np.argmax(exact, axis=1))
    assert np.abs(auto - exact).max() < 0.01 * np.abs(exact).max()  # Q8_0 activations and embedding against f32


def test_bad_weight_types_are_errors() -> None:
    with pytest.raises(MpillamaError, match=r"--weight-type 'q80': choose one of auto, q40, f32"):
        RunConfig(weight_type="q80")  # a stored kind, not a choice: auto keeps Q8_0 files as Q8_0
    with pytest.raises(SystemExit):
        main(["generate", "--model", "x.gguf", "--prompt", "hi", "--weight-type", "q8_0"])


def test_bench_times_the_q80_kernels(models: dict[str, Path]) -> None:
    """bench's matmul-alone timing runs each matrix's own kernel (it once ran the Q40 one on Q8_0 bytes)."""
    done = subprocess.run([sys.executable, "-m", "mpillama", "bench", "--model", str(models["tiny-q80"]),
                           "--prompt-tokens", "8", "--steps", "4", "--json"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["gen_tok_s"] > 0 and result["rank0_matmul_ms"] > 0
