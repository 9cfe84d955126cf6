"""Model-file readers and writers: GGUF, distributed-llama .m/.t, Hugging Face folders.

References are independent of the code under test: gguf.GGUFReader and gguf.quants.dequantize
for GGUF bytes, struct-packed files in the layout DESIGN.md gives for .m/.t, and rope applied
to both q/k layouts for the pairs <-> halves permutation.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from mpillama.errors import MpillamaError
from mpillama.formats import open_model
from mpillama.formats.dllama import (
    DllamaVocab,
    read_dllama_tokenizer,
    write_dllama,
    write_dllama_tokenizer,
)
from mpillama.formats.hf import to_bf16_bits, write_hf
from mpillama.formats.synth import write_synthetic
from mpillama.formats.tensors import halves_to_pairs_rows, pairs_to_halves_rows
from mpillama.quant import dequantize_q80, quantize_q40, rope_ref
from tests.helpers_formats import small_tensors, tensor_info_offset, write_small_gguf


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("synth")
    return {
        "tiny-q40": write_synthetic("tiny", folder / "tiny-q40.gguf", "q40", seed=3),
        "tiny-f32": write_synthetic("tiny", folder / "tiny-f32.gguf", "f32", seed=3),
        "qwen3-q40": write_synthetic("qwen3-tiny-tied", folder / "qwen3-q40.gguf", "q40", seed=3),
    }


def one_line_error(excinfo: pytest.ExceptionInfo[MpillamaError], *parts: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


def matrices(names: object) -> list[str]:
    return [n for n in names if not n.endswith("norm") and n != "rope_freqs"]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- GGUF against gguf.GGUFReader


def test_gguf_reader_matches_the_gguf_package(tmp_path: Path) -> None:
    types = {"token_embd": T.F16, "output": T.Q8_0, "blk.0.attn_q": T.BF16, "blk.0.attn_k": T.F32,
             "blk.0.ffn_down": T.Q6_K, "blk.0.ffn_up": T.Q5_0}  # fmt: skip
    path = write_small_gguf(tmp_path / "small.gguf", small_tensors(types), tokens=[f"t{i}" for i in range(96)])
    m = open_model(path)
    ref = gguf.GGUFReader(path)
    assert m.format == "gguf" and len(ref.tensors) == len(m.tensors)
    kinds = {"token_embd": "f16", "output": "q80", "blk.0.attn_q": "bf16", "blk.0.attn_k": "f32",
             "blk.0.ffn_down": "Q6_K", "blk.0.ffn_up": "Q5_0", "blk.0.attn_v": "q40"}  # fmt: skip
    for t in ref.tensors:
        name = t.name.removesuffix(".weight")
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        assert m.tensors[name].shape == want.shape
        assert np.array_equal(m.read_f32(name), want), name
        if want.ndim == 2:  # a block of rows and whole-block columns
            assert np.array_equal(m.read_f32(name, slice(3, 9), slice(32, 96)), want[3:9, 32:96]), name
    for name, kind in kinds.items():
        assert m.tensors[name].kind == kind
    c = m.config
    assert (c.arch, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.seq_len) == (
        "llama", 256, 256, 1, 4, 2, 64, 96, 64)
    assert c.rope_style == "pairs" and not c.tied_embeddings and c.rope_scaling is None and c.norm_eps == 1e-5
    meta = m.tokenizer_metadata()
    assert meta is not None and meta["tokens"] == [f"t{i}" for i in range(96)] and meta["merges"] == ["a b", "ab c"]
    assert (meta["bos_id"], meta["eos_id"], meta["add_bos"], meta["chat_template"]) == (1, 2, True, "{{ messages }}")
    assert m.metadata["llama.embedding_length"] == 256 and m.metadata["tokenizer.ggml.tokens"] == "[96 x string]"


def test_requantization_notice_once_per_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    types = {"output": T.Q8_0, "blk.0.ffn_down": T.Q6_K, "blk.0.attn_q": T.F16}
    m = open_model(write_small_gguf(tmp_path / "mixed.gguf", small_tensors(types)))
    assert capfd.readouterr().err == ""
    m.read_q40("blk.0.attn_q")  # f16 -> q40 is a conversion, not a requantization
    assert capfd.readouterr().err == ""
    for name in ("output", "blk.0.ffn_down", "output"):
        got = m.read_q40(name)
        assert np.array_equal(got, quantize_q40(m.read_f32(name)))
    err = capfd.readouterr().err  # one line per stored type, saying what is lost and what keeps it
    assert err.count("\n") == 2 and "mixed.gguf" in err
    assert "requantizing Q8_0 tensors to Q4_0 at load" in err and "--weight-type auto keeps them as stored" in err
    assert "requantizing Q6_K tensors to Q4_0 at load" in err and "mpillama keeps only Q4_0, Q8_0 weights" in err


def test_read_q40_slices_equal_slices_of_the_whole(synth: dict[str, Path]) -> None:
    for key in ("tiny-q40", "tiny-f32"):
        m = open_model(synth[key])
        for name in ("blk.0.ffn_gate", "blk.1.ffn_down", "output"):
            full_q, full_f = m.read_q40(name), m.read_f32(name)
            rows, cols = slice(5, 77), slice(64, 128)
            part = m.read_q40(name, rows, cols)
            assert np.array_equal(part, full_q[5:77, 64 // 32 * 18 : 128 // 32 * 18])
            assert np.array_equal(m.read_f32(name, rows, cols), full_f[5:77, 64:128])
            assert part.flags.owndata  # a copy, not a view of the memory map
        norm = m.read_f32("blk.0.attn_norm", slice(10, 20))
        assert norm.shape == (10,) and np.array_equal(norm, m.read_f32("blk.0.attn_norm")[10:20])
        with pytest.raises(AssertionError):
            m.read_q40("blk.0.ffn_gate", cols=slice(0, 40))  # not whole blocks
    # f32 source: read_q40 quantizes exactly what read_f32 gives
    m = open_model(synth["tiny-f32"])
    assert np.array_equal(m.read_q40("blk.0.attn_q"), quantize_q40(m.read_f32("blk.0.attn_q")))


# ---------------------------------------------------------------- detection and bad input


def test_open_model_detects_by_content(synth: dict[str, Path], tmp_path: Path) -> None:
    renamed = tmp_path / "model.m"
    renamed.write_bytes(synth["qwen3-q40"].read_bytes())
    assert open_model(renamed).format == "gguf"
    with pytest.raises(MpillamaError) as e:
        open_model(tmp_path / "nope.gguf")
    one_line_error(e, "nope.gguf", "does not exist", "GGUF")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(MpillamaError) as e:
        open_model(junk)
    one_line_error(e, "junk.bin", "b'PK\\x03\\x04'", "GGUF", "distributed-llama", "Hugging Face")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(MpillamaError) as e:
        open_model(empty)
    one_line_error(e, "empty file")
    (tmp_path / "folder").mkdir()
    with pytest.raises(MpillamaError) as e:
        open_model(tmp_path / "folder")
    one_line_error(e, "config.json")


def test_gguf_wrong_magic_and_version(tmp_path: Path) -> None:
    from mpillama.formats.gguf import GGUFModel

    path = write_small_gguf(tmp_path / "s.gguf", small_tensors())
    data = path.read_bytes()
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUG" + data[4:])
    with pytest.raises(MpillamaError) as e:
        GGUFModel(bad)
    one_line_error(e, "magic.gguf", "not a GGUF file", "b'GGUG'", "offset 0")
    bad.write_bytes(data[:4] + struct.pack("<I", 7) + data[8:])
    with pytest.raises(MpillamaError) as e:
        GGUFModel(bad)
    one_line_error(e, "version 7", "offset 4")


def test_gguf_truncated(synth: dict[str, Path], tmp_path: Path) -> None:
    data = synth["tiny-q40"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1000])  # inside the last tensor's data
    with pytest.raises(MpillamaError) as e:
        open_model(cut)
    one_line_error(e, "cut.gguf", "truncated", "'output.weight'", f"file ends at {len(data) - 1000}")
    cut.write_bytes(data[:3_000_000])  # inside the vocabulary
    with pytest.raises(MpillamaError) as e:
        open_model(cut)
    one_line_error(e, "truncated at offset", "tokenizer.ggml.")
    cut.write_bytes(data[:20])  # inside the fixed header
    with pytest.raises(MpillamaError) as e:
        open_model(cut)
    one_line_error(e, "truncated at offset 16", "metadata count")


def test_gguf_unknown_tensor_type(tmp_path: Path) -> None:
    path = write_small_gguf(tmp_path / "s.gguf", small_tensors())
    data = bytearray(path.read_bytes())
    at = tensor_info_offset(bytes(data), "blk.0.attn_v.weight")
    assert struct.unpack_from("<I", data, at)[0] == T.Q4_0
    struct.pack_into("<I", data, at, 99)
    path.write_bytes(bytes(data))
    with pytest.raises(MpillamaError) as e:
        open_model(path)
    one_line_error(e, "'blk.0.attn_v.weight'", "unknown tensor type 99", "Q4_0")


def test_gguf_missing_tensor_and_wrong_shape(tmp_path: Path) -> None:
    path = write_small_gguf(tmp_path / "missing.gguf", small_tensors(drop="blk.0.ffn_down"))
    with pytest.raises(MpillamaError) as e:
        open_model(path)
    one_line_error(e, "missing.gguf", "'blk.0.ffn_down' is missing")
    path = write_small_gguf(tmp_path / "shape.gguf", small_tensors(reshape={"blk.0.attn_k": (64, 256)}))
    with pytest.raises(MpillamaError) as e:
        open_model(path)
    one_line_error(e, "'blk.0.attn_k'", "(64, 256)", "(128, 256)")
    path = write_small_gguf(tmp_path / "tied.gguf", small_tensors(drop="output"))
    assert open_model(path).config.tied_embeddings  # no output tensor: the embedding is the head


def test_gguf_unsupported_architecture(tmp_path: Path) -> None:
    path = write_small_gguf(tmp_path / "g.gguf", small_tensors(), arch="gemma")
    with pytest.raises(MpillamaError) as e:
        open_model(path)
    one_line_error(e, "'gemma'", "llama, qwen3 and qwen3moe")


# ---------------------------------------------------------------- distributed-llama .m


def assert_same_model(a: object, b: object, names: list[str]) -> None:
    for n in names:
        assert np.array_equal(a.read_f32(n), b.read_f32(n)), n  # type: ignore[attr-defined]


def test_dllama_round_trip_q40(synth: dict[str, Path], tmp_path: Path) -> None:
    g = open_model(synth["tiny-q40"])
    m = open_model(write_dllama(g, tmp_path / "tiny.m"))
    assert m.format == "dllama" and m.config == g.config
    names = [n for n in g.tensors if n != "rope_freqs"]
    assert set(m.tensors) == set(names) and m.tensors["token_embd"].kind == "f32"
    assert_same_model(g, m, names)
    for n in matrices(names):
        if n != "token_embd":
            assert m.tensors[n].kind == "q40" and np.array_equal(m.read_q40(n), g.read_q40(n)), n  # bytes unchanged
    assert not list(tmp_path.glob("*.part"))


def test_dllama_round_trip_f32_and_qwen3_tied(synth: dict[str, Path], tmp_path: Path) -> None:
    g = open_model(synth["tiny-f32"])
    m = open_model(write_dllama(g, tmp_path / "f32.m"))
    assert m.config == g.config and m.tensors["blk.0.attn_q"].kind == "f32"
    assert_same_model(g, m, [n for n in g.tensors if n != "rope_freqs"])
    q = open_model(synth["qwen3-q40"])
    mq = open_model(write_dllama(q, tmp_path / "qwen3.m"))
    assert mq.config.rope_style == "halves" and mq.config.qk_norm and mq.config.head_dim == 64
    assert mq.config == q.config.__class__(**{**q.config.__dict__, "tied_embeddings": False})
    assert np.array_equal(mq.read_q40("output"), q.read_q40("token_embd"))  # wcls = the tied embedding
    assert_same_model(q, mq, list(q.tensors))


def test_dllama_f16_and_q80_weights(synth: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    g = open_model(synth["tiny-f32"])
    m16 = open_model(write_dllama(g, tmp_path / "f16.m", "f16"))
    assert m16.tensors["blk.1.ffn_up"].kind == "f16"
    want = g.read_f32("blk.1.ffn_up").astype(np.float16).astype(np.float32)
    assert np.array_equal(m16.read_f32("blk.1.ffn_up"), want)
    m80 = open_model(write_dllama(g, tmp_path / "q80.m", "q80"))
    assert m80.tensors["output"].kind == "q80"
    x = g.read_f32("output")
    assert np.abs(m80.read_f32("output") - x).max() <= np.abs(x).max() / 127 * 0.51 + 1e-6
    capfd.readouterr()
    m80.read_q40("blk.0.attn_q")
    m80.read_q40("output")
    assert capfd.readouterr().err.count("requantizing Q8_0 tensors to Q4_0") == 1
    # read as stored: the file's own Q8_0 bytes, sliced on block boundaries, and nothing else
    raw = m80.read_raw("blk.0.ffn_down", slice(3, 9), slice(32, 96))
    assert raw.shape == (6, 2 * 34) and not raw.flags.owndata
    assert np.array_equal(dequantize_q80(raw), m80.read_f32("blk.0.ffn_down", slice(3, 9), slice(32, 96)))
    with pytest.raises(MpillamaError, match=r"columns \[16, 96\) do not fall on its blocks of 32 values"):
        m80.read_raw("blk.0.ffn_down", cols=slice(16, 96))


def m_header(pairs: dict[int, int]) -> bytes:
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs.items())
    return struct.pack("<ii", 0xA00ABCD, 8 + len(body)) + body


SMALL_M = {0: 0, 1: 0xABCD00, 2: 64, 3: 96, 4: 1, 5: 2, 6: 1, 7: 0, 8: 0, 9: 32, 10: 16, 11: 1, 12: 10000, 13: 0}


def small_m_bytes(header: dict[int, int]) -> bytes:
    """A one-layer f32 .m built by hand in DESIGN.md's layout (head_dim 32, vocab 32)."""
    dim, hidden, vocab, hd = 64, 96, 32, 32
    order = [(vocab, dim), (2 * hd, dim), (hd, dim), (hd, dim), (dim, 2 * hd), (hidden, dim), (dim, hidden),
             (hidden, dim), (dim,), (dim,), (dim,), (vocab, dim)]  # fmt: skip
    values = np.arange(sum(int(np.prod(s)) for s in order), dtype=np.float32) / 1000
    return m_header(header) + values.tobytes()


def test_dllama_reads_a_hand_built_file(tmp_path: Path) -> None:
    path = tmp_path / "hand.m"
    path.write_bytes(small_m_bytes(SMALL_M))
    m = open_model(path)
    c = m.config
    assert (c.arch, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (
        "llama", 64, 96, 1, 2, 1, 32, 32)
    assert c.rope_style == "pairs" and c.rope_theta == 10000.0 and c.norm_eps == 1e-5
    # tensors follow in order: embedding, q, k, v, wo, w1 (gate), w2 (down), w3 (up), norms, wcls
    start = 32 * 64
    assert m.read_f32("token_embd")[1, 0] == np.float32(64 / 1000)
    assert m.read_f32("blk.0.attn_q")[0, 0] == np.float32(start / 1000)
    gate_at = start + 64 * 64 + 2 * 32 * 64 + 64 * 64
    assert m.read_f32("blk.0.ffn_gate")[0, 0] == np.float32(gate_at / 1000)
    assert m.read_f32("blk.0.ffn_down")[0, 0] == np.float32((gate_at + 96 * 64) / 1000)
    assert m.metadata["header_size"] == 8 + 8 * len(SMALL_M)


def test_dllama_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.m"
    path.write_bytes(small_m_bytes({**SMALL_M, 13: 7}))
    with pytest.raises(MpillamaError) as e:
        open_model(path)
    one_line_error(e, "bad.m", "unknown float type 7", "key 13")
    path.write_bytes(small_m_bytes(SMALL_M)[:-100])
    with pytest.raises(MpillamaError) as e:
        open_model(path)
    one_line_error(e, "truncated", "'output'", "file ends at")
    path.write_bytes(small_m_bytes(SMALL_M) + b"\0" * 4)
    with pytest.raises(MpillamaError) as e:
        open_model(path)
    one_line_error(e, "4 unexpected bytes")
    path.write_bytes(small_m_bytes({**SMALL_M, 42: 1}))
    with pytest.raises(MpillamaError) as e:
        open_model(path)
    one_line_error(e, "unknown header key 42", "offset")
    path.write_bytes(small_m_bytes({**SMALL_M, 1: 0xABCD02}))
    with pytest.raises(MpillamaError) as e:
        open_model(path)
    one_line_error(e, "qwen3-moe header without moe_hidden_dim", "key 21")
    path.write_bytes(struct.pack("<ii", 0xA00ABCD, 4096) + bytes(16))
    with pytest.raises(MpillamaError) as e:
        open_model(path)
    one_line_error(e, "truncated", "4096")
    path.write_bytes(struct.pack("<ii", 0xABCD00, 8))
    with pytest.raises(MpillamaError) as e:
        open_model(path)  # old magic: not recognised as any format
    one_line_error(e, "unknown format")


# ---------------------------------------------------------------- distributed-llama .t


def test_dllama_tokenizer_round_trip(tmp_path: Path) -> None:
    vocab = DllamaVocab(tokens=[b"<unk>", b"a", b"\xff\xfe", "é".encode(), b"<|end|>"],
                        scores=[0.0, -1.0, -2.5, 3.0, 0.0], bos_id=0, eos_ids=[4, 2],
                        chat_template="{{ bos_token }}ü", add_bos=False)  # fmt: skip
    path = write_dllama_tokenizer(vocab, tmp_path / "t.t")
    back = read_dllama_tokenizer(path)
    assert back.tokens == vocab.tokens and back.scores == vocab.scores and back.eos_ids == [4, 2]
    assert (back.bos_id, back.chat_template, back.add_bos, back.max_token_length) == (0, "{{ bos_token }}ü", False, 7)
    # the bytes are the layout DESIGN.md gives
    template = "{{ bos_token }}ü".encode()
    head = struct.unpack_from("<ii", path.read_bytes(), 0)
    assert head[0] == 0x567124 and path.read_bytes()[head[1] : head[1] + len(template)] == template


def test_dllama_tokenizer_hand_built_variants(tmp_path: Path) -> None:
    tokens = [b"x", b"yy", b"zzz"]
    body = b"".join(struct.pack("<fI", float(i), len(t)) + t for i, t in enumerate(tokens))
    # an older header: eos in the header (key 4), a chat stop string (key 8) before the template
    pairs = [(0, 1), (1, 3), (2, 3), (3, 0), (4, 2), (5, 0), (8, 4), (7, 2)]
    hdr = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    path = tmp_path / "old.t"
    path.write_bytes(struct.pack("<ii", 0x567124, 8 + len(hdr)) + hdr + b"STOP" + b"T!" + body)
    v = read_dllama_tokenizer(path)
    assert v.tokens == tokens and v.eos_ids == [2] and v.chat_template == "T!" and v.scores == [0.0, 1.0, 2.0]
    path.write_bytes(struct.pack("<iIIiii", 0x567123, 3, 3, 0, 1, -1) + body)  # the oldest fixed header
    v = read_dllama_tokenizer(path)
    assert v.tokens == tokens and v.eos_ids == [1] and v.bos_id == 0
    path.write_bytes(struct.pack("<iIIiii", 0x567123, 3, 3, 0, 1, -1) + body[:-2])
    with pytest.raises(MpillamaError) as e:
        read_dllama_tokenizer(path)
    one_line_error(e, "old.t", "truncated", "token 2")
    path.write_bytes(struct.pack("<ii", 0x1234, 8))
    with pytest.raises(MpillamaError) as e:
        read_dllama_tokenizer(path)
    one_line_error(e, "not a distributed-llama tokenizer", "0x1234")


# ---------------------------------------------------------------- Hugging Face folders


def test_permutation_is_the_rope_layout_change() -> None:
    """Rope on halves of W_halves @ x equals (pairs rope of W_pairs @ x) re-ordered: the permutation is right."""
    rng = np.random.default_rng(0)
    heads, hd, dim = 3, 8, 16
    w_halves = rng.standard_normal((heads * hd, dim)).astype(np.float32)
    to_pairs = halves_to_pairs_rows(heads * hd, heads)
    w_pairs = w_halves[to_pairs]
    assert np.array_equal(w_pairs[pairs_to_halves_rows(heads * hd, heads)], w_halves)
    x = rng.standard_normal((1, dim)).astype(np.float32)
    pos = np.array([5])
    h = rope_ref((x @ w_halves.T).reshape(1, heads, hd), pos, hd, 10000.0, None, halves=True).reshape(-1)
    p = rope_ref((x @ w_pairs.T).reshape(1, heads, hd), pos, hd, 10000.0, None, halves=False).reshape(-1)
    np.testing.assert_allclose(p, h[to_pairs], rtol=1e-5, atol=1e-5)
    # attention scores (q.k per head) agree between the two layouts
    assert np.allclose((h.reshape(heads, hd) ** 2).sum(1), (p.reshape(heads, hd) ** 2).sum(1), rtol=1e-5)


def unpermuted(m: object, name: str) -> np.ndarray:
    """An HF tensor in GGUF llama row order ('pairs')."""
    x = m.read_f32(name)  # type: ignore[attr-defined]
    c = m.config  # type: ignore[attr-defined]
    if c.arch == "llama" and name.endswith(("attn_q", "attn_k")):
        x = x[halves_to_pairs_rows(x.shape[0], c.n_heads if name.endswith("attn_q") else c.n_kv_heads)]
    return x


def test_hf_round_trip_f32_sharded(synth: dict[str, Path], tmp_path: Path) -> None:
    g = open_model(synth["tiny-q40"])
    folder = write_hf(g, tmp_path / "hf", "f32", max_shard_bytes=40_000_000)
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1
    h = open_model(folder)
    assert h.format == "hf" and h.config.rope_style == "halves"
    assert h.config == g.config.__class__(**{**g.config.__dict__, "rope_style": "halves"})
    for n in (n for n in g.tensors if n != "rope_freqs"):
        assert np.array_equal(unpermuted(h, n), g.read_f32(n)), n
    assert not np.array_equal(h.read_f32("blk.0.attn_q"), g.read_f32("blk.0.attn_q"))  # it was un-permuted
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["tie_word_embeddings"] is False
    # HF (halves) -> .m puts llama q/k back into pairs: the same .m as straight from the GGUF
    a = open_model(write_dllama(g, tmp_path / "a.m"))
    b = open_model(write_dllama(h, tmp_path / "b.m", "q40"))
    for n in a.tensors:
        assert np.array_equal(a.read_f32(n), b.read_f32(n)), n
    assert b.config.rope_style == "pairs"


def test_hf_bf16_qwen3_tied(synth: dict[str, Path], tmp_path: Path) -> None:
    q = open_model(synth["qwen3-q40"])
    folder = write_hf(q, tmp_path / "qwen", "bf16")
    h = open_model(folder)
    assert h.config == q.config and h.tensors["blk.0.attn_q"].kind == "bf16" and "output" not in h.tensors
    assert json.loads((folder / "config.json").read_text())["head_dim"] == 64  # not dim / n_heads
    for n in q.tensors:
        want = (to_bf16_bits(q.read_f32(n)).astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(h.read_f32(n), want), n
        np.testing.assert_allclose(h.read_f32(n), q.read_f32(n), rtol=2**-8, atol=0)
    assert h.tokenizer_metadata() is None
    assert np.array_equal(h.read_q40("blk.1.ffn_up"), quantize_q40(h.read_f32("blk.1.ffn_up")))


def write_raw_safetensors(path: Path, entries: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    header, data = {}, b""
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_hf_bad_folders(synth: dict[str, Path], tmp_path: Path) -> None:
    folder = write_hf(open_model(synth["qwen3-q40"]), tmp_path / "q", "bf16")
    st = folder / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:-10])
    with pytest.raises(MpillamaError) as e:
        open_model(folder)
    one_line_error(e, "model.safetensors", "truncated", "'model.layers.1.mlp.down_proj.weight'", "file ends at")
    st.write_bytes(data)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(MpillamaError) as e:
        open_model(folder)
    one_line_error(e, "num_hidden_layers in config.json is 3", "tensors for layers 0..1")
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(MpillamaError) as e:
        open_model(folder)
    one_line_error(e, "GPT2LMHeadModel", "LlamaForCausalLM")
    (folder / "config.json").write_text(json.dumps(cfg))
    write_raw_safetensors(folder / "extra.safetensors", {"model.layers.0.extra.weight": ("I32", (4,), bytes(16))})
    with pytest.raises(MpillamaError) as e:
        open_model(folder)
    one_line_error(e, "extra.safetensors", "dtype 'I32'", "BF16")
