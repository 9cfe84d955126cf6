"""Issue 15's bad-input findings, one test per item: each failed before its fix (a hang, a traceback,
an exit code 1, damage accepted, a message of megabytes, a check after loading, a left-over .part).

Runs `generate` in-process through cli.main where that is the same path as the command line, and
the real command line where the process itself is the point (a FIFO, argv bytes, a signal).
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType as V
from gguf.constants import GGMLQuantizationType as T

from mpillama.cli import main
from mpillama.errors import MpillamaError
from mpillama.files import MAX_LINE
from tests.fuzz_files import PROMPT, base_metadata, gguf_layout, put, write_gguf
from tests.mpi_launch import run_mpillama

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--prompt", PROMPT, "--no-bos", "--steps", "2", "--max-seq-len", "16"]
LOADED = "mpillama: loaded in"  # said once the weights are in memory


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("bad-input") / "base.gguf")


def run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """cli.main(args) in this process: (exit code, stderr)."""
    capfd.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capfd.readouterr().err


def one_error(code: int, err: str, *parts: str) -> str:
    """Exit code 2, one error line (at most 2 lines in all), no traceback, naming every part."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line]
    errors = [line for line in lines if line.startswith("mpillama: error: ")]
    assert len(errors) == 1 and len(lines) <= 2, err
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def with_meta(folder: Path, **changes: tuple[Any, ...]) -> Path:
    """The base GGUF written again with metadata keys (dots as '__') changed; () removes a key."""
    meta = base_metadata()
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value:
            meta[key] = value
        else:
            meta.pop(key)
    return write_gguf(folder / "changed.gguf", meta)


def patched(base: Path, folder: Path, patch: Any) -> Path:
    data = bytearray(base.read_bytes())
    patch(data, gguf_layout(base))
    out = folder / "patched.gguf"
    out.write_bytes(bytes(data))
    return out


def limited_memory() -> None:
    """A child's address space capped at 4 GB: a reader that allocates per header value fails fast
    instead of taking the machine down."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def open_in_child(path: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    code = "import sys; from mpillama.formats import open_model; open_model(sys.argv[1])"
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=limited_memory,
                          check=False)


# ---------------------------------------------------------------- item 1: hangs


def test_item1_block_count_1e9_fails_at_once_naming_the_key(base: Path, tmp_path: Path) -> None:
    path = with_meta(tmp_path, llama__block_count=(V.UINT64, 10**9))
    done = open_in_child(path)  # before: still building per-layer entries after minutes, or out of memory
    assert "MpillamaError" in done.stderr and "MemoryError" not in done.stderr, done.stderr[-2000:]
    assert "llama.block_count is 1000000000" in done.stderr and "layers 0..1" in done.stderr, done.stderr[-2000:]


def test_item1_huge_dllama_layer_count_fails_at_once(base: Path, tmp_path: Path) -> None:
    from mpillama.formats import open_model
    from mpillama.formats.dllama import write_dllama

    data = bytearray(write_dllama(open_model(base), tmp_path / "m.m", "q40").read_bytes())
    at = next(off for off in range(8, 200, 8) if struct.unpack_from("<i", data, off)[0] == 4)  # key 4: n_layers
    put(data, at + 4, "<i", 2**31 - 1)
    (tmp_path / "m.m").write_bytes(bytes(data))
    done = open_in_child(tmp_path / "m.m")
    assert "2147483647 layers (n_layers, key 4)" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("flag", ["--model", "--tokenizer", "--profile"])
def test_item1_a_fifo_is_refused_without_blocking(flag: str, base: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    args = ["--model", str(base), *RUN] if flag != "--model" else RUN
    done = subprocess.run([sys.executable, "-m", "mpillama", "generate", flag, str(fifo), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    one_error(done.returncode, done.stderr, str(fifo), "FIFO")


# ---------------------------------------------------------------- item 4: tiny contexts


@pytest.mark.parametrize("n", ["1", "2"])
def test_item4_max_seq_len_below_3_is_one_line_before_loading(n: str, base: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    code, err = run(capfd, "generate", "--model", str(base), *RUN, "--max-seq-len", n)
    one_error(code, err, f"--max-seq-len {n}", "smallest context mpillama runs is 3")
    assert LOADED not in err


def test_item4_inspect_checks_max_seq_len_too(base: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, err = run(capfd, "inspect", str(base), "--max-seq-len", "-5")  # before: a plan with a negative KV cache
    one_error(code, err, "--max-seq-len -5")


def test_item4_a_model_context_of_2_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = with_meta(tmp_path, llama__context_length=(V.UINT32, 2))
    code, err = run(capfd, "generate", "--model", str(path), *RUN)
    one_error(code, err, "context length is 2", "at least 3")


def test_item4_a_context_of_3_is_the_smallest_that_runs(base: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, err = run(capfd, "generate", "--model", str(base), "--prompt", PROMPT, "--no-bos", "--steps", "2",
                    "--max-seq-len", "3")
    assert code == 0, err  # two prompt tokens and two generated ones fit three positions


# ---------------------------------------------------------------- item 5: non-finite numbers


def norm_values(name: str, value: float) -> Any:
    def patch(data: bytearray, layout: Any) -> None:
        t = layout.tensors[name]
        values = np.frombuffer(data, "<f4", t.data_bytes // 4, t.data_start).copy()
        if value == 0:
            values[:] = 0
        else:
            values[5] = value
        data[t.data_start : t.data_start + t.data_bytes] = values.tobytes()

    return patch


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0])
def test_item5_bad_norm_weights_are_named(value: float, base: Path, tmp_path: Path,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    path = patched(base, tmp_path, norm_values("blk.1.ffn_norm.weight", value))
    code, err = run(capfd, "generate", "--model", str(path), *RUN)  # before: "!!" and exit 0, or a traceback
    one_error(code, err, "'blk.1.ffn_norm'", "all zeros" if value == 0 else f"holds {value}")


@pytest.mark.parametrize("bits", [0x7E00, 0x7C00])
def test_item5_bad_q40_scales_are_named(bits: int, base: Path, tmp_path: Path,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    def patch(data: bytearray, layout: Any) -> None:
        put(data, layout.tensors["blk.0.attn_v.weight"].data_start + 18 * 3, "<H", bits)

    code, err = run(capfd, "generate", "--model", str(patched(base, tmp_path, patch)), *RUN)
    one_error(code, err, "'blk.0.attn_v'", "block scale")


@pytest.mark.parametrize("eps", [math.nan, math.inf])
def test_item5_non_finite_epsilon(eps: float, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = with_meta(tmp_path, llama__attention__layer_norm_rms_epsilon=(V.FLOAT32, eps))
    code, err = run(capfd, "generate", "--model", str(path), *RUN)
    one_error(code, err, "layer_norm_rms_epsilon", "finite number")


@pytest.mark.parametrize("qtype", [T.F16, T.Q8_0, T.BF16])
def test_item5_a_quantised_tensor_relabelled(qtype: T, base: Path, tmp_path: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    def patch(data: bytearray, layout: Any) -> None:
        put(data, layout.tensors["blk.0.ffn_up.weight"].type_at, "<I", int(qtype))

    code, err = run(capfd, "generate", "--model", str(patched(base, tmp_path, patch)), *RUN)
    one_error(code, err, "'blk.0.ffn_up.weight'", "share bytes")


def test_item5_damage_in_one_ranks_slice_stops_both_ranks_in_one_line(base: Path, tmp_path: Path) -> None:
    """A NaN scale in the last row of ffn_gate, which only rank 1 reads: every rank agrees, exit 2."""
    def patch(data: bytearray, layout: Any) -> None:
        t = layout.tensors["blk.0.ffn_gate.weight"]
        put(data, t.data_start + t.data_bytes - 18, "<H", 0x7E00)

    path = patched(base, tmp_path, patch)
    done = run_mpillama(2, "generate", "--model", str(path), *RUN, timeout=600)
    lines = [line for line in done.stderr.splitlines() if line.startswith("mpillama: error:")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert "rank 1" in lines[0] and "'blk.0.ffn_gate'" in lines[0] and "Traceback" not in done.stderr


# ---------------------------------------------------------------- item 6: tracebacks


@pytest.mark.parametrize("key, value, words", [
    ("llama__embedding_length", (V.STRING, "64"), ["'llama.embedding_length' is string '64'", "integer"]),
    ("llama__context_length", (V.FLOAT32, math.nan), ["'llama.context_length' is float32 nan"]),
    ("llama__rope__freq_base", (V.STRING, "1e4"), ["'llama.rope.freq_base' is string"]),
    ("general__alignment", (V.STRING, "32"), ["'general.alignment' is string"]),
    ("tokenizer__ggml__bos_token_id", (V.STRING, "1"), ["tokenizer.ggml.bos_token_id is str '1'"]),
    ("tokenizer__ggml__tokens", (V.ARRAY, list(range(264)), V.UINT32), ["tokenizer.ggml.tokens is a list of 264"]),
    ("tokenizer__ggml__merges", (V.ARRAY, [1, 2], V.UINT32), ["tokenizer.ggml.merges is a list of 2"]),
    ("tokenizer__ggml__merges", (V.ARRAY, ["t h", "tX e"], V.STRING), ["merges entry 1 'tX e'"]),
])  # fmt: skip
def test_item6_wrong_metadata_is_one_line(key: str, value: tuple[Any, ...], words: list[str], tmp_path: Path,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    path = with_meta(tmp_path, **{key: value})
    code, err = run(capfd, "generate", "--model", str(path), *RUN)
    one_error(code, err, str(path), *words)


def hf_folder(base: Path, folder: Path) -> Path:
    from mpillama.formats import open_model
    from mpillama.formats.hf import write_hf

    return write_hf(open_model(base), folder / "hf", "bf16")


@pytest.mark.parametrize("key, value", [("hidden_size", "64"), ("num_hidden_layers", None), ("rms_norm_eps", math.nan),
                                        ("rope_scaling", 5), ("vocab_size", 1.5), ("architectures", 5)])
def test_item6_bad_config_json_values(key: str, value: Any, base: Path, tmp_path: Path,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    folder = hf_folder(base, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    code, err = run(capfd, "generate", "--model", str(folder), "--tokenizer", str(base), *RUN)
    one_error(code, err, "config.json", f"'{key}'")


@pytest.mark.parametrize("label", ["list", "shape-string", "offsets-short", "dtype-number"])
def test_item6_bad_safetensors_headers(label: str, base: Path, tmp_path: Path,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    folder = hf_folder(base, tmp_path)
    st = folder / "model.safetensors"
    data = st.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + n])
    entry = header["model.norm.weight"]
    if label == "list":
        header = [header]
    else:
        entry.update({"shape-string": {"shape": "64"}, "offsets-short": {"data_offsets": [0]},
                      "dtype-number": {"dtype": 7}}[label])  # fmt: skip
    text = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    code, err = run(capfd, "generate", "--model", str(folder), "--tokenizer", str(base), *RUN)
    one_error(code, err, "model.safetensors")


def test_item6_damaged_dllama_files(base: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from mpillama.formats import open_model
    from mpillama.formats.dllama import DllamaVocab, write_dllama, write_dllama_tokenizer

    m = write_dllama(open_model(base), tmp_path / "m.m", "q40")
    tokens = [bytes([b]) for b in range(256)] + [b"<s>"]
    t = write_dllama_tokenizer(DllamaVocab(tokens, [0.0] * 257, bos_id=256, eos_ids=[256]), tmp_path / "t.t")
    data = bytearray(t.read_bytes())
    at = next(off for off in range(8, 200, 8) if struct.unpack_from("<i", data, off)[0] == 9)  # n_eos_tokens
    put(data, at + 4, "<i", -1)
    t.write_bytes(bytes(data))
    code, err = run(capfd, "generate", "--model", str(m), "--tokenizer", str(t), *RUN)  # before: struct.error
    one_error(code, err, "t.t", "-1 eos tokens")


@pytest.mark.parametrize("text, words", [(b'rank_weights = ["a", 1]', "rank_weights = ['a', 1]"),
                                         (b"\x00\xff\xfe binary", "not UTF-8 text")])
def test_item6_bad_profiles(text: bytes, words: str, base: Path, tmp_path: Path,
                            capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.toml").write_bytes(text)
    code, err = run(capfd, "generate", "--model", str(base), "--profile", str(tmp_path / "p.toml"), *RUN)
    one_error(code, err, "p.toml", words)


def test_a_tokenizer_larger_than_the_model_is_refused(base: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    from mpillama.formats.dllama import DllamaVocab, write_dllama_tokenizer

    tokens = [bytes([b]) for b in range(256)] + [b"x%d" % i for i in range(40)] + [b"<s>"]
    t = write_dllama_tokenizer(DllamaVocab(tokens, [0.0] * len(tokens), bos_id=296, eos_ids=[296]), tmp_path / "t.t")
    code, err = run(capfd, "generate", "--model", str(base), "--tokenizer", str(t), *RUN)
    one_error(code, err, "has 297 tokens", "only 264")


# ---------------------------------------------------------------- item 7: a prompt that is not UTF-8


def test_item7_invalid_utf8_prompt_is_one_line_before_loading(base: Path) -> None:
    args = [sys.executable, "-m", "mpillama", "generate", "--model", str(base), "--prompt", b"ab\xffcd", "--steps", "2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    one_error(done.returncode, done.stderr, "--prompt", "0xff", "UTF-8")
    assert LOADED not in done.stderr


def test_item7_the_tokenizer_refuses_surrogates(base: Path) -> None:
    from mpillama.formats import open_model
    from mpillama.tokenizer import load_tokenizer

    tok = load_tokenizer(open_model(base), None)
    with pytest.raises(MpillamaError, match="U\\+DCFF at character 2"):
        tok.encode("ab\udcffcd")  # as a server request or a chat line may carry it


# ---------------------------------------------------------------- item 8: checks before loading


@pytest.mark.parametrize("extra, words", [
    (["--dump-logits", "/nonexistent-folder/l.npy"], ["--dump-logits", "/nonexistent-folder", "does not exist"]),
    (["--trace", "/proc/x.h5"], ["--trace /proc/x.h5", "cannot create a file"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--top-k", "-1"], ["--top-k"]),
])  # fmt: skip
def test_item8_bad_outputs_and_settings_fail_before_loading(extra: list[str], words: list[str], base: Path,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    code, err = run(capfd, "generate", "--model", str(base), *RUN, *extra)
    one_error(code, err, *words)
    assert LOADED not in err


def test_item8_huge_steps_with_dump_logits_stop_at_the_context(base: Path, tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "l.npy"
    code, err = run(capfd, "generate", "--model", str(base), "--prompt", PROMPT, "--no-bos", "--max-seq-len", "8",
                    "--steps", str(10**9), "--ignore-eos", "--dump-logits", str(dump))
    assert code == 0, err  # before: a MemoryError for 10^9 rows of logits
    assert np.load(dump).shape == (7, 264)  # positions 0..7: one step per position after the prompt's first


# ---------------------------------------------------------------- item 9: capped messages


def test_item9_a_damaged_key_length_does_not_quote_the_file(base: Path, tmp_path: Path,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    def patch(data: bytearray, layout: Any) -> None:
        kv = layout.kv["tokenizer.ggml.bos_token_id"]
        put(data, kv.start, "<Q", layout.size - kv.start - 24)  # the key now runs over ~50 KB of the file

    code, err = run(capfd, "generate", "--model", str(patched(base, tmp_path, patch)), *RUN)
    line = one_error(code, err, "unknown value type")
    assert len(line) <= len("mpillama: error: ") + MAX_LINE


# ---------------------------------------------------------------- item 10: damage accepted silently


def test_item10_two_tensors_sharing_data(base: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    def patch(data: bytearray, layout: Any) -> None:
        a, b = layout.tensors["blk.0.attn_norm.weight"], layout.tensors["blk.0.ffn_norm.weight"]
        put(data, b.offset_at, "<Q", a.data_start - layout.data_start)

    code, err = run(capfd, "generate", "--model", str(patched(base, tmp_path, patch)), *RUN)
    one_error(code, err, "'blk.0.attn_norm.weight'", "'blk.0.ffn_norm.weight'", "share bytes")


def test_item10_block_count_1_on_a_2_layer_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = with_meta(tmp_path, llama__block_count=(V.UINT32, 1))
    code, err = run(capfd, "generate", "--model", str(path), *RUN)
    one_error(code, err, "llama.block_count is 1", "layers 0..1")


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_item10_zero_or_negative_epsilon(eps: float, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = with_meta(tmp_path, llama__attention__layer_norm_rms_epsilon=(V.FLOAT32, eps))
    code, err = run(capfd, "generate", "--model", str(path), *RUN)
    one_error(code, err, f"norm epsilon is {eps}", "positive")


def test_item10_unknown_rope_scaling_type(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = with_meta(tmp_path, llama__rope__scaling__type=(V.STRING, "yarn"))
    code, err = run(capfd, "generate", "--model", str(path), *RUN)
    one_error(code, err, "rope scaling type 'yarn'")


# ---------------------------------------------------------------- item 18: SIGTERM during synth


def test_item18_sigterm_to_synth_leaves_no_part_file(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    part = tmp_path / "m.gguf.part"
    # a 1B shape streams for a long while after its .part appears: the signal always lands mid-write
    proc = subprocess.Popen([sys.executable, "-m", "mpillama", "synth", "--shape", "llama3.2-1b", "--out", str(out)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    try:
        while not part.exists():  # waits for the event (the file appears), not for a time
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert not part.exists() and not out.exists()


# ---------------------------------------------------------------- item 20: synth help and sizes


def test_item20_synth_help_lists_the_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    from mpillama.formats.synth import SHAPES

    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in SHAPES), text


def test_item20_readme_states_the_tiny_shapes_real_size(models: dict[str, Path]) -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "26-28 MB as q40" in readme
    sizes = [models[name].stat().st_size / 1e6 for name in ("tiny-q40", "qwen3-tiny-q40")]
    assert all(26 <= s <= 28.5 for s in sizes), sizes
