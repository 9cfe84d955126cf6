"""Damaged input, generated from a fixed seed: every variant ends in exit code 2 with one error
line (at most 2 lines on stderr), or, where the damage leaves a valid file, a clean run. Never a
traceback, never a hang.

Variants start from the small files of tests/fuzz_files.py: a GGUF (header, metadata, tensor
table, tensor data, vocabulary), the same model as a Hugging Face folder (config.json,
safetensors header) and as distributed-llama .m + .t files, a TOML profile, and paths that are
not regular files. Each runs `generate` in-process through cli.main, the function the command
line calls (an exception other than the exit code escaping it is a failure); a sample runs
through the real command line in a subprocess.

A variant marked must_fail is damage no reader may accept; the others (random byte flips)
may leave a file that still loads, and then only have to run cleanly.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType as V
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from mpillama.cli import main
from mpillama.files import UNANTICIPATED
from tests.fuzz_files import (
    DIMS,
    PROMPT,
    SPECIALS,
    GGUFLayout,
    base_metadata,
    byte_level_chars,
    gguf_layout,
    put,
    vocab_tokens,
    write_gguf,
)

SEED = 15
ROOT = Path(__file__).resolve().parent.parent
RUN_ARGS = ["--prompt", PROMPT, "--no-bos", "--steps", "2", "--max-seq-len", "16"]  # two prompt tokens
HANG_SECONDS = 300  # far beyond any variant's run, even on a loaded machine: only a hang reaches it
SLOW_NOTICE = "mpillama: still loading"  # said after 5 s of loading, whatever the input: not an error line


@dataclass
class Bases:
    """The undamaged files and what is known about them."""

    gguf: Path
    gguf_bytes: bytes
    layout: GGUFLayout
    hf: Path  # folder: config.json + model.safetensors
    m: Path
    t: Path
    tokenizer_json: Path  # the GGUF's vocabulary as the tokenizers library writes it


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Bases:
    from mpillama.formats import open_model
    from mpillama.formats.dllama import DllamaVocab, write_dllama, write_dllama_tokenizer
    from mpillama.formats.hf import write_hf
    from mpillama.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("fuzz-bases")
    gguf = write_gguf(folder / "base.gguf")
    model = open_model(gguf)
    hf = write_hf(model, folder / "hf", "bf16")
    m = write_dllama(model, folder / "base.m", "q40")
    tokens, _ = vocab_tokens()
    to_byte = {c: b for b, c in enumerate(byte_level_chars())}
    regular = [bytes(to_byte[c] for c in t) for t in tokens[: -len(SPECIALS)]]
    t = write_dllama_tokenizer(DllamaVocab(tokens=regular + [s.encode() for s in SPECIALS],
                                           scores=[-float(i) for i in range(len(tokens))], bos_id=len(regular),
                                           eos_ids=[len(regular) + 1], chat_template="{{ x }}"), folder / "base.t")
    tokenizer_json = folder / "tok" / "tokenizer.json"
    tokenizer_json.parent.mkdir()
    tokenizer_json.write_text(load_tokenizer(model, None).hf.to_str())
    model.close()
    return Bases(gguf, gguf.read_bytes(), gguf_layout(gguf), hf, m, t, tokenizer_json)


# ---------------------------------------------------------------- variants

Rng = np.random.Generator
Make = Callable[[Bases, Path, Rng], list[str]]


@dataclass(frozen=True)
class Variant:
    id: str
    make: Make  # writes the damaged file(s) into a folder; returns the generate arguments
    must_fail: bool


def gguf_args(path: Path) -> list[str]:
    return ["--model", str(path), *RUN_ARGS]


def patched_gguf(patch: Callable[[bytearray, GGUFLayout, np.random.Generator], None]) -> Make:
    def make(b: Bases, tmp: Path, rng: np.random.Generator) -> list[str]:
        data = bytearray(b.gguf_bytes)
        patch(data, b.layout, rng)
        path = tmp / "damaged.gguf"
        path.write_bytes(bytes(data))
        return gguf_args(path)

    return make


def rebuilt_gguf(change: Callable[[dict[str, tuple[Any, ...]]], None], types: dict[str, T] | None = None) -> Make:
    """A GGUF written again by the gguf package with its metadata changed."""

    def make(b: Bases, tmp: Path, rng: np.random.Generator) -> list[str]:
        meta = base_metadata()
        change(meta)
        return gguf_args(write_gguf(tmp / "damaged.gguf", meta, types))

    return make


def set_meta(key: str, *value: Any) -> Callable[[dict[str, tuple[Any, ...]]], None]:
    def change(meta: dict[str, tuple[Any, ...]]) -> None:
        if value:
            meta[key] = value
        else:
            meta.pop(key, None)

    return change


def last_tensor_end(layout: GGUFLayout) -> int:
    return max(t.data_start + t.data_bytes for t in layout.tensors.values())


BAD_NUMBERS: list[tuple[str, tuple[Any, ...]]] = [
    ("string", (V.STRING, "abc")), ("nan", (V.FLOAT32, math.nan)), ("inf", (V.FLOAT32, math.inf)),
    ("minus1", (V.INT32, -1)), ("zero", (V.UINT32, 0)), ("one", (V.UINT32, 1)), ("two", (V.UINT32, 2)),
    ("1e9", (V.UINT64, 10**9)), ("2e63", (V.UINT64, 2**63)), ("1.5", (V.FLOAT32, 1.5)),
    ("array", (V.ARRAY, [64, 64], V.UINT32)), ("bool", (V.BOOL, True)),
]  # fmt: skip
# which of BAD_NUMBERS a key can hold in a file that still runs (context_length is clamped by
# --max-seq-len; the others are the base file's own values)
STILL_VALID = {"context_length": {"1e9", "2e63"}, "block_count": {"two"}, "attention.head_count": {"two"},
               "attention.head_count_kv": {"one"}}
FLOAT_KEYS = {"attention.layer_norm_rms_epsilon": [("nan", math.nan), ("inf", math.inf), ("zero", 0.0),
                                                   ("negative", -1e-5), ("-inf", -math.inf)],
              "rope.freq_base": [("nan", math.nan), ("inf", math.inf), ("zero", 0.0), ("negative", -10000.0)]}


def gguf_variants(rng: np.random.Generator) -> Iterator[Variant]:
    # ---- structure
    for i in range(16):
        frac = float(rng.random())

        def cut(data: bytearray, lay: GGUFLayout, r: Rng, frac: float = frac) -> None:
            del data[int(frac * last_tensor_end(lay)):]

        yield Variant(f"gguf-truncate-{frac:.3f}", patched_gguf(cut), True)
    for i in range(40):
        def flip(data: bytearray, lay: GGUFLayout, r: Rng) -> None:
            data[int(r.integers(0, lay.data_start))] ^= int(r.integers(1, 256))

        yield Variant(f"gguf-header-flip-{i}", patched_gguf(flip), False)
    for n in ("count", "kv"):
        for change in (1, -1, "zero", "huge"):
            def counts(data: bytearray, lay: GGUFLayout, r: Rng, n: str = n, change: Any = change) -> None:
                at = 8 if n == "count" else 16
                old = struct.unpack_from("<Q", data, at)[0]
                new = {"zero": 0, "huge": 2**62}[change] if isinstance(change, str) else old + change
                put(data, at, "<Q", new)

            yield Variant(f"gguf-{n}-{change}", patched_gguf(counts), True)
    for length in ("2e63", "3.3MB", "rest-of-file", "zero"):
        def key_length(data: bytearray, lay: GGUFLayout, r: Rng, length: str = length) -> None:
            kv = list(lay.kv.values())[int(r.integers(0, len(lay.kv)))]
            value = {"2e63": 2**63, "3.3MB": 3_300_000, "rest-of-file": lay.size - kv.start - 24, "zero": 0}[length]
            put(data, kv.start, "<Q", value)

        yield Variant(f"gguf-key-length-{length}", patched_gguf(key_length), True)
    for i in range(6):
        def value_type(data: bytearray, lay: GGUFLayout, r: Rng) -> None:
            kv = list(lay.kv.values())[int(r.integers(0, len(lay.kv)))]
            put(data, kv.type_at, "<I", int(r.integers(13, 2**32)))

        yield Variant(f"gguf-value-type-{i}", patched_gguf(value_type), True)
    # ---- metadata values of the wrong type or range
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.key_length"):
        for label, value in BAD_NUMBERS:
            if label in STILL_VALID.get(key, ()):
                continue
            yield Variant(f"gguf-meta-{key}-{label}", rebuilt_gguf(set_meta(f"llama.{key}", *value)), True)
    for key, values in FLOAT_KEYS.items():
        for label, x in values:
            yield Variant(f"gguf-meta-{key}-{label}", rebuilt_gguf(set_meta(f"llama.{key}", V.FLOAT32, x)), True)
        yield Variant(f"gguf-meta-{key}-string", rebuilt_gguf(set_meta(f"llama.{key}", V.STRING, "1e-5")), True)
    for label, value in [("string", (V.STRING, "x")), ("zero", (V.UINT32, 0)), ("three", (V.UINT32, 3)),
                         ("nan", (V.FLOAT32, math.nan)), ("huge", (V.UINT64, 2**40))]:  # fmt: skip
        yield Variant(f"gguf-meta-alignment-{label}", rebuilt_gguf(set_meta("general.alignment", *value)), True)
    for label, value in [("yarn", (V.STRING, "yarn")), ("number", (V.UINT32, 5)),
                         ("llama3-no-factors", (V.STRING, "llama3"))]:
        yield Variant(f"gguf-rope-scaling-{label}", rebuilt_gguf(set_meta("llama.rope.scaling.type", *value)), True)
    yield Variant("gguf-missing-block_count", rebuilt_gguf(set_meta("llama.block_count")), True)
    yield Variant("gguf-arch-number", rebuilt_gguf(set_meta("general.architecture", V.UINT32, 7)), True)
    # ---- tensor table
    names = list(tensor_names())
    for i in range(20):
        new_type = [T.F32, T.F16, T.Q8_0, T.BF16, T.Q4_0, T.Q4_1, T.Q6_K, 99, 2**31][i % 9]
        name = names[int(rng.integers(0, len(names)))]
        old_type = T.Q4_0 if len(tensor_shape(name)) == 2 else T.F32
        if new_type == old_type:
            continue

        def tensor_type(data: bytearray, lay: GGUFLayout, r: Rng, name: str = name,
                        new_type: int = new_type) -> None:
            put(data, lay.tensors[name].type_at, "<I", int(new_type))

        yield Variant(f"gguf-tensor-type-{name}-{int(new_type)}", patched_gguf(tensor_type),
                      grows(name, old_type, new_type))
    for i in range(12):
        name = names[int(rng.integers(0, len(names)))]
        label = ["zero", "one", "double", "2e40", "2e63", "plus32"][i % 6]

        def dims(data: bytearray, lay: GGUFLayout, r: Rng, name: str = name, label: str = label) -> None:
            t = lay.tensors[name]
            k = int(r.integers(0, struct.unpack_from("<I", data, t.n_dims_at)[0]))
            old = struct.unpack_from("<Q", data, t.dims_at + 8 * k)[0]
            new = {"zero": 0, "one": 1, "double": 2 * old, "2e40": 2**40, "2e63": 2**63, "plus32": old + 32}[label]
            put(data, t.dims_at + 8 * k, "<Q", new)

        yield Variant(f"gguf-dims-{name}-{label}", patched_gguf(dims), True)
    for i, n_dims in enumerate((0, 3, 5, 2**31, 1, 2)):
        name = names[int(rng.integers(0, len(names)))]
        if n_dims == len(tensor_shape(name)):
            n_dims = 4

        def rank(data: bytearray, lay: GGUFLayout, r: Rng, name: str = name, n_dims: int = n_dims) -> None:
            put(data, lay.tensors[name].n_dims_at, "<I", n_dims)

        yield Variant(f"gguf-n-dims-{name}-{n_dims}", patched_gguf(rank), True)
    for i in range(12):
        name = names[int(rng.integers(0, len(names)))]
        label = ["same-as-other", "plus1", "plus32", "2e63", "file-size", "same-as-other"][i % 6]

        def offset(data: bytearray, lay: GGUFLayout, r: Rng, name: str = name, label: str = label) -> None:
            t = lay.tensors[name]
            old = struct.unpack_from("<Q", data, t.offset_at)[0]
            others = [o for o in lay.tensors.values() if o.name != name]
            other = others[int(r.integers(0, len(others)))]
            new = {"same-as-other": other.data_start - lay.data_start, "plus1": old + 1, "plus32": old + 32,
                   "2e63": 2**63, "file-size": lay.size}[label]  # fmt: skip
            put(data, t.offset_at, "<Q", new)

        yield Variant(f"gguf-offset-{name}-{label}-{i}", patched_gguf(offset), True)
    # ---- tensor data
    norms = [n for n in names if len(tensor_shape(n)) == 1]
    matrices = [n for n in names if len(tensor_shape(n)) == 2]
    for i in range(12):
        name = norms[int(rng.integers(0, len(norms)))]
        label = ["nan", "inf", "-inf", "zero"][i % 4]

        def norm(data: bytearray, lay: GGUFLayout, r: Rng, name: str = name, label: str = label) -> None:
            t = lay.tensors[name]
            values = np.frombuffer(data, "<f4", t.data_bytes // 4, t.data_start).copy()
            if label == "zero":
                values[:] = 0
            else:
                values[int(r.integers(0, len(values)))] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[label]
            data[t.data_start : t.data_start + t.data_bytes] = values.tobytes()

        yield Variant(f"gguf-norm-{name}-{label}-{i}", patched_gguf(norm), True)
    for i in range(12):
        name = matrices[int(rng.integers(0, len(matrices)))]
        bits = [0x7E00, 0x7C00, 0xFC00][i % 3]

        def scale(data: bytearray, lay: GGUFLayout, r: Rng, name: str = name, bits: int = bits) -> None:
            t = lay.tensors[name]
            block = int(r.integers(0, t.data_bytes // 18))
            put(data, t.data_start + 18 * block, "<H", bits)

        yield Variant(f"gguf-q40-scale-{name}-{bits:#x}-{i}", patched_gguf(scale), True)
    for i in range(20):
        def data_flip(data: bytearray, lay: GGUFLayout, r: Rng) -> None:
            data[int(r.integers(lay.data_start, last_tensor_end(lay)))] ^= int(r.integers(1, 256))

        yield Variant(f"gguf-data-flip-{i}", patched_gguf(data_flip), False)
    # ---- vocabulary
    for key, n in (("tokenizer.ggml.tokens", 24), ("tokenizer.ggml.merges", 8)):
        for i in range(n):
            def string_flip(data: bytearray, lay: GGUFLayout, r: Rng, key: str = key) -> None:
                strings = lay.kv[key].parts[2:]  # after the element type and the count: (length, bytes) pairs
                at, size = strings[2 * int(r.integers(0, len(strings) // 2)) + 1]
                data[at + int(r.integers(0, size))] ^= int(r.integers(1, 256))

            yield Variant(f"gguf-{key.split('.')[-1]}-flip-{i}", patched_gguf(string_flip), False)
        for change in (1, -1, 1000, 2**63):
            def string_length(data: bytearray, lay: GGUFLayout, r: Rng, key: str = key,
                              change: int = change) -> None:
                strings = lay.kv[key].parts[2:]
                at, _ = strings[2 * int(r.integers(0, len(strings) // 2))]
                old = struct.unpack_from("<Q", data, at)[0]
                put(data, at, "<Q", max(0, old + change) if change != 2**63 else change)

            yield Variant(f"gguf-{key.split('.')[-1]}-length-{change}", patched_gguf(string_length), False)
    tokens, types = vocab_tokens()
    tok = "tokenizer.ggml."
    for label, key, value, must in [
        ("tokens-numbers", tok + "tokens", (V.ARRAY, list(range(len(tokens))), V.UINT32), True),
        ("tokens-missing", tok + "tokens", (), True),
        ("tokens-duplicate", tok + "tokens", (V.ARRAY, ["a"] + tokens[1:], V.STRING), True),
        ("types-strings", tok + "token_type", (V.ARRAY, ["x"] * len(tokens), V.STRING), True),
        ("types-short", tok + "token_type", (V.ARRAY, types[:-3], V.INT32), True),
        ("merges-numbers", tok + "merges", (V.ARRAY, [1, 2, 3], V.UINT32), True),
        ("merges-no-space", tok + "merges", (V.ARRAY, ["th"], V.STRING), True),
        ("merges-unknown-token", tok + "merges", (V.ARRAY, ["x yz"], V.STRING), True),
        ("merges-string", tok + "merges", (V.STRING, "t h"), True),
        ("bos-string", tok + "bos_token_id", (V.STRING, "1"), True),
        ("bos-outside", tok + "bos_token_id", (V.UINT32, 10**6), True),
        ("bos-negative", tok + "bos_token_id", (V.INT32, -1), True),
        ("eos-float", tok + "eos_token_id", (V.FLOAT32, 1.5), True),
        ("model-bert", tok + "model", (V.STRING, "bert"), True),
        ("model-number", tok + "model", (V.UINT32, 2), True),
        ("pre-unknown", tok + "pre", (V.STRING, "nope"), True),
        ("pre-number", tok + "pre", (V.UINT32, 5), True),
        ("template-number", "tokenizer.chat_template", (V.UINT32, 5), True),
        ("add-bos-string", tok + "add_bos_token", (V.STRING, "yes"), True),
    ]:  # fmt: skip
        yield Variant(f"gguf-tokenizer-{label}", rebuilt_gguf(set_meta(key, *value)), must)


def tensor_names() -> list[str]:
    from tests.fuzz_files import tensor_shapes

    return list(tensor_shapes())


def tensor_shape(name: str) -> tuple[int, ...]:
    from tests.fuzz_files import tensor_shapes

    return tensor_shapes()[name]


def grows(name: str, old: int, new: int) -> bool:
    """Whether a tensor relabelled from type old to new can no longer be read where it is (bigger, or unknown)."""
    try:
        block, size = GGML_QUANT_SIZES[T(new)]
    except ValueError:
        return True
    shape = tensor_shape(name)
    if shape[-1] % block:
        return True
    ob, osize = GGML_QUANT_SIZES[T(old)]
    return shape[-1] // block * size > shape[-1] // ob * osize


# ---- Hugging Face folders


def hf_args(folder: Path, b: Bases) -> list[str]:
    return ["--model", str(folder), "--tokenizer", str(b.gguf), *RUN_ARGS]


def copied_hf(b: Bases, tmp: Path) -> Path:
    folder = tmp / "hf"
    folder.mkdir()
    for f in b.hf.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def hf_config(change: Callable[[dict[str, Any]], Any]) -> Make:
    def make(b: Bases, tmp: Path, rng: np.random.Generator) -> list[str]:
        folder = copied_hf(b, tmp)
        cfg = json.loads((folder / "config.json").read_text())
        text = change(cfg)
        (folder / "config.json").write_text(text if isinstance(text, str) else json.dumps(cfg))
        return hf_args(folder, b)

    return make


def hf_header(change: Callable[[dict[str, Any], np.random.Generator], Any]) -> Make:
    """The safetensors header JSON changed (or replaced by what change returns), data unchanged."""

    def make(b: Bases, tmp: Path, rng: np.random.Generator) -> list[str]:
        folder = copied_hf(b, tmp)
        st = folder / "model.safetensors"
        data = st.read_bytes()
        (n,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(data[8 : 8 + n])
        out = change(header, rng)
        text = out if isinstance(out, bytes) else json.dumps(header if out is None else out).encode()
        st.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
        return hf_args(folder, b)

    return make


def hf_bytes(patch: Callable[[bytearray, int, np.random.Generator], None]) -> Make:
    def make(b: Bases, tmp: Path, rng: np.random.Generator) -> list[str]:
        folder = copied_hf(b, tmp)
        st = folder / "model.safetensors"
        data = bytearray(st.read_bytes())
        patch(data, struct.unpack_from("<Q", data, 0)[0], rng)
        st.write_bytes(bytes(data))
        return hf_args(folder, b)

    return make


HF_INT_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "max_position_embeddings"]  # fmt: skip
HF_BAD = [("string", "64"), ("null", None), ("nan", math.nan), ("minus1", -1), ("zero", 0), ("1.5", 1.5),
          ("1e9", 10**9), ("list", [64]), ("true", True), ("two", 2)]  # fmt: skip
HF_OPTIONAL = {"num_key_value_heads", "head_dim"}  # null falls back to a default that may fit


def hf_variants(rng: np.random.Generator) -> Iterator[Variant]:
    for key in HF_INT_KEYS:
        for label, value in HF_BAD:
            valid = ((label == "null" and key in HF_OPTIONAL) or (label == "1e9" and key == "max_position_embeddings")
                     or (label == "two" and key in ("num_hidden_layers", "num_attention_heads")))

            def change(cfg: dict[str, Any], key: str = key, value: Any = value) -> None:
                cfg[key] = value

            yield Variant(f"hf-{key}-{label}", hf_config(change), not valid)
    for key in ("rms_norm_eps", "rope_theta"):
        for label, value in [("nan", math.nan), ("inf", math.inf), ("zero", 0), ("negative", -1.0), ("string", "1e-5"),
                             ("list", [1e-5])]:  # fmt: skip
            def change(cfg: dict[str, Any], key: str = key, value: Any = value) -> None:
                cfg[key] = value

            yield Variant(f"hf-{key}-{label}", hf_config(change), True)
    for label, value in [("yarn", {"rope_type": "yarn", "factor": 2.0}), ("llama3-no-factors", {"rope_type": "llama3"}),
                         ("string", "linear"), ("number", 5), ("factor-string", {"rope_type": "llama3", "factor": "x",
                          "low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 8192}),
                         ("factor-nan", {"rope_type": "llama3", "factor": math.nan, "low_freq_factor": 1,
                          "high_freq_factor": 4, "original_max_position_embeddings": 8192})]:  # fmt: skip
        def change(cfg: dict[str, Any], value: Any = value) -> None:
            cfg["rope_scaling"] = value

        yield Variant(f"hf-rope-scaling-{label}", hf_config(change), True)
    for label, value, must in [("number", 5, True), ("list-of-numbers", [5], False),
                               ("string", "LlamaForCausalLM", True), ("unknown", ["BertModel"], True)]:
        def change(cfg: dict[str, Any], value: Any = value) -> None:
            cfg["architectures"] = value
            if value == ["BertModel"] or value == 5:
                cfg["model_type"] = "bert"

        yield Variant(f"hf-architectures-{label}", hf_config(change), must)
    yield Variant("hf-model-type-number", hf_config(lambda c: c.update(architectures=None, model_type=5)), True)
    yield Variant("hf-hidden-act-number", hf_config(lambda c: c.update(hidden_act=5)), True)
    yield Variant("hf-tie-string", hf_config(lambda c: c.update(tie_word_embeddings="yes")), False)
    for label, text in [("not-json", "{nope"), ("list", "[1, 2]"), ("empty", ""), ("nan", "NaN"),
                        ("binary", "\x00\x01ÿ")]:
        yield Variant(f"hf-config-{label}", hf_config(lambda c, text=text: text), True)
    # safetensors headers
    def entry(header: dict[str, Any], r: np.random.Generator) -> str:
        names = [k for k in header if k != "__metadata__"]
        return names[int(r.integers(0, len(names)))]

    edits: list[tuple[str, Callable[[dict[str, Any], np.random.Generator], Any]]] = [
        ("list", lambda h, r: [1, 2]),
        ("entry-number", lambda h, r: h.__setitem__(entry(h, r), 5)),
        ("dtype-number", lambda h, r: h[entry(h, r)].__setitem__("dtype", 5)),
        ("dtype-i8", lambda h, r: h[entry(h, r)].__setitem__("dtype", "I8")),
        ("shape-string", lambda h, r: h[entry(h, r)].__setitem__("shape", "x")),
        ("shape-negative", lambda h, r: h[entry(h, r)].__setitem__("shape", [-1, 64])),
        ("shape-floats", lambda h, r: h[entry(h, r)].__setitem__("shape", [1.5, 64])),
        ("offsets-reversed", lambda h, r: h[entry(h, r)]["data_offsets"].reverse()),
        ("offsets-one", lambda h, r: h[entry(h, r)].__setitem__("data_offsets", [0])),
        ("offsets-strings", lambda h, r: h[entry(h, r)].__setitem__("data_offsets", ["a", "b"])),
        ("offsets-huge", lambda h, r: h[entry(h, r)].__setitem__("data_offsets", [2**62, 2**62 + 4])),
        ("offsets-missing", lambda h, r: h[entry(h, r)].__delitem__("data_offsets")),
        ("shared-data", lambda h, r: shared_data(h, r)),
        ("metadata-number", lambda h, r: h.__setitem__("__metadata__", 5)),
        ("not-utf8", lambda h, r: json.dumps(h).encode().replace(b'"BF16"', b'"\xff\xfe"', 1)),
        ("nan-in-shape", lambda h, r: json.dumps(h).replace("[64]", "[NaN]", 1).encode()),
    ]
    for label, edit in edits:
        yield Variant(f"hf-safetensors-{label}", hf_header(edit), label != "metadata-number")
    for label, value in [("zero", 0), ("seven", 7), ("2e63", 2**63), ("minus1-of-json", -1)]:
        def length(data: bytearray, n: int, r: np.random.Generator, value: int = value) -> None:
            put(data, 0, "<Q", n + value if value == -1 else value)

        yield Variant(f"hf-safetensors-length-{label}", hf_bytes(length), True)
    for i in range(15):
        def header_flip(data: bytearray, n: int, r: np.random.Generator) -> None:
            data[int(r.integers(8, 8 + n))] ^= int(r.integers(1, 256))

        yield Variant(f"hf-safetensors-header-flip-{i}", hf_bytes(header_flip), False)
    for i in range(3):
        frac = float(rng.random())

        def cut(data: bytearray, n: int, r: np.random.Generator, frac: float = frac) -> None:
            del data[int(frac * len(data)) :]

        yield Variant(f"hf-safetensors-truncate-{frac:.3f}", hf_bytes(cut), True)


def shared_data(header: dict[str, Any], r: np.random.Generator) -> None:
    """Two same-sized tensors pointing at the same bytes."""
    norms = [k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 1]
    a, b = norms[0], norms[1]
    header[b]["data_offsets"] = header[a]["data_offsets"]


# ---- distributed-llama .m and .t


def dllama_pairs(data: bytes) -> dict[int, int]:
    """header key -> offset of its value, for a .m or .t header."""
    size = struct.unpack_from("<i", data, 4)[0]
    return {struct.unpack_from("<i", data, off)[0]: off + 4 for off in range(8, size, 8)}


def patched_dllama(which: str, patch: Callable[[bytearray, np.random.Generator], None]) -> Make:
    def make(b: Bases, tmp: Path, rng: np.random.Generator) -> list[str]:
        m, t = tmp / "damaged.m", tmp / "damaged.t"
        m.write_bytes(b.m.read_bytes())
        t.write_bytes(b.t.read_bytes())
        target = m if which == "m" else t
        data = bytearray(target.read_bytes())
        patch(data, rng)
        target.write_bytes(bytes(data))
        return ["--model", str(m), "--tokenizer", str(t), *RUN_ARGS]

    return make


M_KEYS = {"arch": 1, "dim": 2, "hidden_dim": 3, "n_layers": 4, "n_heads": 5, "n_kv_heads": 6, "vocab_size": 9,
          "seq_len": 10, "hidden_act": 11, "rope_theta": 12, "weight_type": 13, "rope_type": 18, "head_dim": 19,
          "norm_eps": 20}  # fmt: skip
T_KEYS = {"version": 0, "vocab_size": 1, "max_token_length": 2, "bos_id": 3, "chat_template": 7, "n_eos_tokens": 9,
          "add_bos": 10}  # fmt: skip
M_VALID = {("seq_len", 10**6), ("seq_len", 2**31 - 1), ("rope_theta", 10**6), ("rope_theta", 2**31 - 1),
           ("rope_theta", 1), ("rope_theta", 3), ("hidden_act", 1), ("seq_len", 3), ("n_kv_heads", 1), ("rope_type", 0),
           ("rope_type", 1), ("head_dim", 0)}  # fmt: skip (head_dim 0: the default, dim / n_heads)
ANY = (0, -1, 2**31 - 1, 10**6, 1, 3)
T_VALID = {("max_token_length", v) for v in ANY} | {("add_bos", v) for v in ANY} | {("version", 1), ("n_eos_tokens", 1)}


def dllama_variants(rng: np.random.Generator) -> Iterator[Variant]:
    for which, keys, valid in (("m", M_KEYS, M_VALID), ("t", T_KEYS, T_VALID)):
        for name, key in keys.items():
            for value in (0, -1, 2**31 - 1, 10**6, 1, 3):
                def header_value(data: bytearray, r: np.random.Generator, key: int = key, value: int = value) -> None:
                    put(data, dllama_pairs(bytes(data))[key], "<i", value)

                must = (name, value) not in valid
                yield Variant(f"{which}-{name}-{value}", patched_dllama(which, header_value), must)
        for label, value in (("zero", 0), ("odd", 12), ("huge", 2**31 - 1), ("negative", -8)):
            def header_size(data: bytearray, r: np.random.Generator, value: int = value) -> None:
                put(data, 4, "<i", value)

            yield Variant(f"{which}-header-size-{label}", patched_dllama(which, header_size), True)
        for i in range(3):
            frac = float(rng.random())

            def cut(data: bytearray, r: np.random.Generator, frac: float = frac) -> None:
                del data[max(8, int(frac * len(data))) :]

            yield Variant(f"{which}-truncate-{frac:.3f}", patched_dllama(which, cut), True)
        for i in range(8):
            def flip(data: bytearray, r: np.random.Generator) -> None:
                data[int(r.integers(0, len(data)))] ^= int(r.integers(1, 256))

            yield Variant(f"{which}-flip-{i}", patched_dllama(which, flip), False)
    yield Variant("t-extra-bytes", patched_dllama("t", lambda d, r: d.extend(b"\0\0")), True)
    yield Variant("m-norm-nan", patched_dllama("m", m_norm_nan), True)


def m_norm_nan(data: bytearray, r: np.random.Generator) -> None:
    """NaN in output_norm: the (dim,) f32 tensor just before the last one (wcls, vocab x dim Q40)."""
    vocab, dim = len(vocab_tokens()[0]), DIMS["dim"]
    at = len(data) - vocab * dim // 32 * 18 - 4 * dim
    put(data, at + 4 * int(r.integers(0, dim)), "<f", math.nan)


# ---- tokenizer.json (a Hugging Face tokenizer given with --tokenizer)


def tokenizer_files(change: Callable[[bytearray, Rng], bytes | None], name: str = "tokenizer.json") -> Make:
    """A folder holding the base tokenizer.json, with `name` in it replaced by what change returns
    (or its bytes changed in place)."""
    def make(b: Bases, tmp: Path, rng: Rng) -> list[str]:
        folder = tmp / "tok"
        folder.mkdir()
        (folder / "tokenizer.json").write_bytes(b.tokenizer_json.read_bytes())
        data = bytearray((folder / name).read_bytes()) if (folder / name).exists() else bytearray()
        out = change(data, rng)
        (folder / name).write_bytes(bytes(data) if out is None else out)
        return ["--model", str(b.gguf), "--tokenizer", str(folder), *RUN_ARGS]

    return make


def tokenizer_json_variants(rng: Rng) -> Iterator[Variant]:
    for i in range(8):
        def flip(data: bytearray, r: Rng) -> None:
            data[int(r.integers(0, len(data)))] ^= int(r.integers(1, 256))

        yield Variant(f"tokenizer-json-flip-{i}", tokenizer_files(flip), False)
    yield Variant("tokenizer-json-not-utf8", tokenizer_files(lambda d, r: b"\xff" + bytes(d)), True)
    yield Variant("tokenizer-json-truncated", tokenizer_files(lambda d, r: bytes(d[: len(d) // 2])), True)
    yield Variant("tokenizer-json-model-number", tokenizer_files(lambda d, r: b'{"model": 5}'), True)
    yield Variant("tokenizer-json-list", tokenizer_files(lambda d, r: b"[1, 2]"), True)
    for label, text in [("bos-number", b'{"bos_token": 5}'), ("template-list", b'{"chat_template": [1, {"x": 2}]}'),
                        ("add-bos-string", b'{"add_bos_token": "yes"}'), ("list", b"[1]")]:
        yield Variant(f"tokenizer-config-{label}", tokenizer_files(lambda d, r, text=text: text, "tokenizer_config.json"),
                      False)
    yield Variant("tokenizer-config-not-json", tokenizer_files(lambda d, r: b"{nope", "tokenizer_config.json"), True)


# ---- profiles and paths


def profile(text: str | bytes) -> Make:
    def make(b: Bases, tmp: Path, rng: np.random.Generator) -> list[str]:
        path = tmp / "p.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--model", str(b.gguf), "--profile", str(path), *RUN_ARGS[:-2]]  # the profile's --max-seq-len

    return make


PROFILES = [
    ("rank-weights-letters", 'rank_weights = ["a", 1]'), ("rank-weights-zero", "rank_weights = [0]"),
    ("rank-weights-negative", "rank_weights = [-1]"), ("rank-weights-string", 'rank_weights = "fast"'),
    ("rank-weights-number", "rank_weights = 5"), ("rank-weights-nan", "rank_weights = [nan]"),
    ("nthreads-string", 'nthreads = "x"'), ("nthreads-float", "nthreads = 1.5"), ("nthreads-negative", "nthreads = -1"),
    ("nthreads-bool", "nthreads = true"), ("temperature-string", 'temperature = "hot"'),
    ("temperature-nan", "temperature = nan"), ("temperature-inf", "temperature = inf"), ("top-k-float", "top_k = 1.5"),
    ("sync-number", "sync = 5"), ("seed-string", 'seed = "x"'), ("max-seq-len-one", "max_seq_len = 1"),
    ("max-seq-len-two", "max_seq_len = 2"), ("unknown-key", "threads = 2"), ("not-toml", "nthreads = = 1"),
    ("binary", b"\x00\xff\xfe\x81nthreads = 1"), ("table", "[nthreads]\nx = 1"), ("batch-array", "batch = [1]"),
    ("sync-timeout-nan", "sync_timeout = nan"), ("chunk-bytes-huge-float", "chunk_bytes = 1e300"),
]  # fmt: skip


def make_fifo(b: Bases, tmp: Path, rng: np.random.Generator) -> list[str]:
    os.mkfifo(tmp / "model.gguf")
    return gguf_args(tmp / "model.gguf")


def path_variants() -> Iterator[Variant]:
    yield Variant("path-fifo-model", make_fifo, True)
    yield Variant("path-char-device-model", lambda b, t, r: gguf_args(Path("/dev/zero")), True)
    yield Variant("path-empty-model", lambda b, t, r: gguf_args(write(t / "e.gguf", b"")), True)
    yield Variant("path-zeros-model", lambda b, t, r: gguf_args(write(t / "z.gguf", bytes(4096))), True)
    yield Variant("path-folder-model", lambda b, t, r: gguf_args(t), True)
    yield Variant("path-missing-model", lambda b, t, r: gguf_args(t / "nope.gguf"), True)

    def fifo_tokenizer(b: Bases, tmp: Path, rng: np.random.Generator) -> list[str]:
        os.mkfifo(tmp / "tok.t")
        return ["--model", str(b.m), "--tokenizer", str(tmp / "tok.t"), *RUN_ARGS]

    def fifo_profile(b: Bases, tmp: Path, rng: np.random.Generator) -> list[str]:
        os.mkfifo(tmp / "p.toml")
        return ["--model", str(b.gguf), "--profile", str(tmp / "p.toml"), *RUN_ARGS]

    yield Variant("path-fifo-tokenizer", fifo_tokenizer, True)
    yield Variant("path-fifo-profile", fifo_profile, True)
    yield Variant("path-folder-profile", lambda b, t, r: ["--model", str(b.gguf), "--profile", str(t) + "/", *RUN_ARGS],
                  True)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def all_variants() -> list[Variant]:
    rng = np.random.default_rng(SEED)
    out = [*gguf_variants(rng), *hf_variants(rng), *dllama_variants(rng), *tokenizer_json_variants(rng), *path_variants()]
    out += [Variant(f"profile-{label}", profile(text), True) for label, text in PROFILES]
    ids = [v.id for v in out]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    return out


VARIANTS = all_variants()


def test_there_are_enough_variants() -> None:
    assert len(VARIANTS) >= 300, len(VARIANTS)
    assert sum(v.must_fail for v in VARIANTS) >= 250


# ---------------------------------------------------------------- running them


@contextmanager
def memory_guard(extra: int = 4 << 30) -> Iterator[None]:
    """At most `extra` more bytes of address space in the block: a reader that allocates from a damaged
    header value raises MemoryError (a test failure) instead of taking the shared machine down."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text().splitlines()
    used = int(next(line.split()[1] for line in status if line.startswith("VmSize:"))) * 1024
    limit = used + extra if hard == resource.RLIM_INFINITY else min(hard, used + extra)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextmanager
def hang_guard(seconds: int) -> Iterator[None]:
    """Turn a hang into a failure (SIGALRM interrupts even a blocking open of a FIFO)."""

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no result after {seconds} s: the input made it hang")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_outcome(v: Variant, code: Any, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 2), f"{v.id}: exit code {code}\n{err}"
    if v.must_fail:
        assert code == 2, f"{v.id}: damage accepted\n{err}"
    if code == 2:
        lines = [line for line in err.splitlines() if line and not line.startswith(SLOW_NOTICE)]
        assert len(lines) <= 2, f"{v.id}: {len(lines)} lines on stderr\n{err}"
        errors = [line for line in lines if line.startswith("mpillama: error: ")]
        assert len(errors) == 1, f"{v.id}: no single error line\n{err}"
        assert len(errors[0]) <= 600, f"{v.id}: an error line of {len(errors[0])} characters"
        if v.must_fail:  # aimed damage is named by a reader's own check, not by the catch-all
            assert UNANTICIPATED not in errors[0], errors[0]


@pytest.mark.parametrize("v", VARIANTS, ids=[v.id for v in VARIANTS])
def test_damaged_input_in_process(v: Variant, bases: Bases, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    args = v.make(bases, tmp_path, np.random.default_rng([SEED, VARIANTS.index(v)]))
    capfd.readouterr()
    with hang_guard(HANG_SECONDS), memory_guard():
        try:
            code: Any = main(["generate", *args])
        except SystemExit as e:  # end_job's exit after the first forward pass
            code = e.code
    _, err = capfd.readouterr()
    check_outcome(v, code, err)


# a sample through the real command line: the same outcome as a process (exit code, stderr, no hang)
CLI_SAMPLE = ["path-fifo-model", "gguf-meta-block_count-1e9", "gguf-key-length-rest-of-file", "profile-binary",
              "hf-config-binary", "m-n_layers-1000000"]
CLI_SAMPLE += [VARIANTS[i].id for i in np.random.default_rng(SEED).choice(len(VARIANTS), 5, replace=False)
               if VARIANTS[i].id not in CLI_SAMPLE]


@pytest.mark.parametrize("vid", CLI_SAMPLE)
def test_damaged_input_on_the_command_line(vid: str, bases: Bases, tmp_path: Path) -> None:
    v = next(x for x in VARIANTS if x.id == vid)
    args = v.make(bases, tmp_path, np.random.default_rng([SEED, VARIANTS.index(v)]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mpillama", "generate", *args], capture_output=True, text=True,
                          timeout=HANG_SECONDS, env=env, cwd=ROOT, check=False)
    check_outcome(v, done.returncode, done.stderr)
