"""The single-rank engine end to end: logits against the independent reference, exact tokens,
and the errors users see for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpillama import mpienv
from mpillama.cli import main
from tests import reference

STEPS = 32
PROMPT = "The capital of France is"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def generate(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> np.ndarray:
    dump = tmp_path / "logits.npy"
    code, out, err = run_cli(["generate", "--model", str(model), "--prompt", PROMPT, "--steps", str(STEPS),
                              "--ignore-eos", "--dump-logits", str(dump), *extra], capsys)
    assert code == 0, err
    return np.load(dump)


def prompt_ids(model: Path) -> list[int]:
    from mpillama.formats import open_model
    from mpillama.tokenizer import load_tokenizer

    return load_tokenizer(open_model(model), None).encode(PROMPT)


@pytest.mark.parametrize("shape", ["tiny", "qwen3-tiny", "qwen3-tiny-tied"])
def test_f32_logits_match_reference(shape: str, models: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = models[f"{shape}-f32"]
    logits = generate(path, tmp_path, capsys, "--weight-type", "f32")
    ref_tokens, ref_logits = reference.greedy(reference.load(str(path)), prompt_ids(path), STEPS)
    assert logits.shape == ref_logits.shape
    scale = np.abs(ref_logits).max()
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * scale)
    assert list(np.argmax(logits, axis=1)) == ref_tokens


@pytest.mark.parametrize("shape", ["tiny", "qwen3-tiny"])
def test_q40_tokens_match_reference(shape: str, models: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Q40 weights with Q80 activations (as llama.cpp) against f32 math on the dequantized weights."""
    path = models[f"{shape}-q40"]
    logits = generate(path, tmp_path, capsys)
    ref_tokens, ref_logits = reference.greedy(reference.load(str(path)), prompt_ids(path), STEPS)
    assert list(np.argmax(logits, axis=1)) == ref_tokens
    # Q80 activations: each matmul input is rounded to 8 bits per block, so logits move by ~1% of their range
    scale = np.abs(ref_logits).max()
    assert np.abs(logits - ref_logits).max() < 0.03 * scale


def test_generate_prints_text_and_stats(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["generate", "--model", str(models["tiny-q40"]), "--prompt", PROMPT, "--steps", "8",
                              "--ignore-eos"], capsys)
    assert code == 0
    assert out.strip()
    assert "generated 8 tokens" in err and "tok/s" in err


def test_sampling_is_reproducible_with_a_seed(models: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--temperature", "1.0", "--top-p", "0.95", "--seed", "42")
    a = generate(models["tiny-q40"], tmp_path, capsys, *args)
    b = generate(models["tiny-q40"], tmp_path, capsys, *args)
    np.testing.assert_array_equal(a, b)


def test_small_prefill_batches_give_the_same_logits(models: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    whole = generate(models["tiny-f32"], tmp_path, capsys, "--weight-type", "f32")
    chunked = generate(models["tiny-f32"], tmp_path, capsys, "--weight-type", "f32", "--batch", "2")
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4 * np.abs(whole).max())


def cli_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpillama", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("mpillama: error:")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_prompt_longer_than_context_is_an_error(models: dict[str, Path]) -> None:
    done = cli_subprocess("generate", "--model", str(models["tiny-q40"]), "--prompt", "word " * 100,
                          "--max-seq-len", "32", "--steps", "4")
    assert_one_line_error(done, "--max-seq-len", "prompt")


def test_truncated_model_is_an_error(models: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = models["tiny-q40"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    done = cli_subprocess("generate", "--model", str(cut), "--prompt", "hi", "--steps", "2")
    assert_one_line_error(done, str(cut))


def test_wrong_magic_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    done = cli_subprocess("generate", "--model", str(bad), "--prompt", "hi", "--steps", "2")
    assert_one_line_error(done, str(bad))


def test_missing_model_is_an_error(tmp_path: Path) -> None:
    done = cli_subprocess("generate", "--model", str(tmp_path / "none.gguf"), "--prompt", "hi", "--steps", "2")
    assert_one_line_error(done, "none.gguf")


def test_bad_flag_values_are_errors(models: dict[str, Path]) -> None:
    done = cli_subprocess("generate", "--model", str(models["tiny-q40"]), "--prompt", "hi", "--top-p", "2")
    assert_one_line_error(done, "--top-p")
    done = cli_subprocess("generate", "--model", str(models["tiny-q40"]), "--prompt", "hi", "--profile", "nope")
    assert_one_line_error(done, "profile", "nope")


def test_chat_answers_each_line_and_keeps_the_conversation(models: dict[str, Path]) -> None:
    done = subprocess.run([sys.executable, "-m", "mpillama", "chat", "--model", str(models["tiny-q40"]), "--steps", "6",
                           "--system", "You are terse."], input="Hello\nAnd again\n", capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") >= 2 and done.stdout.strip()  # each answer ends with a newline
    assert "error" not in done.stderr


@pytest.mark.parametrize("traced", [False, True])
def test_bench_prints_speeds_and_the_time_split(traced: bool, models: dict[str, Path], tmp_path: Path) -> None:
    trace = ["--trace", str(tmp_path / "bench.h5")] if traced else []  # the split also comes from a traced run
    done = cli_subprocess("bench", "--model", str(models["tiny-q40"]), "--prompt-tokens", "8", "--steps", "4", "--json",
                          *trace)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["prompt_tok_s"] > 0 and result["gen_tok_s"] > 0 and result["gen_tok_s_unrecorded"] > 0
    assert {"att", "ffn", "head"} <= set(result["split_ms"])
    assert "att_sync" not in result["split_ms"] and "ffn_sync" not in result["split_ms"]  # one rank moves nothing
    # the segments tile a decode step (compared with the same steps' span: token_ms also holds the time
    # between steps, which a busy machine stretches)
    assert 0.9 < sum(result["split_ms"].values()) / result["split_step_ms"] < 1.01, result
    assert 0 <= result["outside_matmul_share"] < 1


def test_one_rank_without_a_launcher_never_starts_mpi(models: dict[str, Path]) -> None:
    """A plain `python -m mpillama` run needs no MPI (starting it costs a second); the tokens are
    those of a run that does start MPI (MPILLAMA_MPI=1: what mpirun -n 1 gets)."""
    probe = ("import sys; from mpillama.cli import main; code = main(sys.argv[1:]); "
             "print('MPI started' if 'mpi4py.MPI' in sys.modules else 'no MPI', file=sys.stderr); sys.exit(code)")
    args = ["generate", "--model", str(models["tiny-q40"]), "--prompt", PROMPT, "--steps", "8", "--ignore-eos"]
    env = {k: v for k, v in os.environ.items() if k not in mpienv.RANK_VARIABLES and k != mpienv.FORCE_MPI}
    plain = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300, env=env)
    forced = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300,
                            env={**env, mpienv.FORCE_MPI: "1"})
    assert plain.returncode == 0 and forced.returncode == 0, plain.stderr + forced.stderr
    assert "no MPI" in plain.stderr and "MPI started" in forced.stderr
    assert plain.stdout == forced.stdout and plain.stdout.strip()

