"""Tokenizer against llama.cpp's tokenizer test vectors (ggml-vocab-NAME.gguf + .inp/.out).

The vocabularies come from the llama-cpp-python sdist, downloaded once into the cache by
mpillama.formats.vocab (never committed). Each .inp holds test strings separated by a marker line;
each line of .out holds the expected ids of one string (encoded without BOS, special-token text
not parsed, as llama.cpp's test-tokenizer-0 does). The distributed-llama path is checked against
a direct transcription of its merge-by-score encoder below.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import tokenizers

from mpillama.errors import MpillamaError
from mpillama.formats.gguf import read_gguf_header
from mpillama.formats.vocab import vocab_dir, vocab_gguf
from mpillama.tokenizer import (
    Tokenizer,
    load_tokenizer,
    tokenizer_from_dllama,
    tokenizer_from_gguf_metadata,
    tokenizer_from_hf,
    unicode_to_byte,
)

REQUIRED = ["llama-bpe", "llama-spm", "qwen2"]
# Other vocabularies whose pre-tokenizers mpillama also knows; all their vectors pass too.
EXTRA = ["qwen35", "phi-3", "gpt-2", "starcoder", "refact", "mpt", "falcon", "command-r"]
# Vocabularies mpillama refuses, and the value it names in the error.
UNSUPPORTED = {"deepseek-llm": "deepseek-llm", "deepseek-coder": "deepseek-coder", "bert-bge": "bert"}
SEP = "\n__ggml_vocab_test__\n"


@lru_cache(maxsize=None)
def vocab_path(name: str) -> Path:
    try:
        return vocab_gguf(name)
    except MpillamaError as e:  # no network and no cache: nothing to test against
        pytest.skip(f"tokenizer vocabularies unavailable: {e}")


@lru_cache(maxsize=None)
def meta(name: str) -> dict:
    """The vocabulary's tokenizer.* keys under their full names, as Python values."""
    return {k: v.get() for k, v in read_gguf_header(vocab_path(name)).kv.items() if k.startswith("tokenizer.")}


@lru_cache(maxsize=None)
def gguf_tokenizer(name: str) -> Tokenizer:
    return tokenizer_from_gguf_metadata(meta(name))


def vectors(name: str) -> list[tuple[str, list[int]]]:
    vocab_path(name)
    raw = (vocab_dir() / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    texts = raw.split(SEP)
    assert texts[-1] == "", "the .inp file ends with a marker line"
    texts = texts[:-1]
    lines = (vocab_dir() / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(lines) >= len(texts)
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, lines)]


# --- llama.cpp test vectors -------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED + EXTRA)
def test_vectors_encode_to_the_expected_ids(name: str) -> None:
    tok = gguf_tokenizer(name)
    cases = vectors(name)
    assert len(cases) >= 46
    failures = [(text, ids, tok.encode(text, add_bos=False, parse_special=False))
                for text, ids in cases if tok.encode(text, add_bos=False, parse_special=False) != ids]
    assert not failures, f"{len(failures)}/{len(cases)} vectors differ, first: {failures[0]!r}"
    # none of the strings holds special-token text, so parsing it changes nothing
    assert all(tok.encode(text, add_bos=False) == ids for text, ids in cases)


@pytest.mark.parametrize("name", REQUIRED + EXTRA)
def test_vectors_decode_back_to_the_text(name: str) -> None:
    tok = gguf_tokenizer(name)
    for text, ids in vectors(name):
        assert tok.decode(ids) == text


@pytest.mark.parametrize("name", REQUIRED)
def test_stream_of_the_vectors_gives_the_text(name: str) -> None:
    tok = gguf_tokenizer(name)
    for text, ids in vectors(name):
        stream = tok.stream()
        parts = [stream.push(i) for i in ids]
        out = "".join(parts) + stream.finish()
        # SentencePiece encodes a leading space ('▁Hello'); a streamed piece keeps it, as llama.cpp's
        # token_to_piece does, while decode() drops the one it added
        expected = " " + text if name == "llama-spm" and text else text
        assert out == expected
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in parts), "a piece split a character"


@pytest.mark.parametrize("name,value", sorted(UNSUPPORTED.items()))
def test_unsupported_vocabularies_say_so(name: str, value: str) -> None:
    with pytest.raises(MpillamaError, match=value) as err:
        tokenizer_from_gguf_metadata(meta(name))
    assert "--tokenizer" in str(err.value)


def test_metadata_reader_matches_gguf_reader() -> None:
    from gguf import GGUFReader

    path = vocab_path("llama-spm")
    ours = meta("llama-spm")
    theirs = {k: f.contents() for k, f in GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if key == "tokenizer.ggml.scores":
            assert ours[key] == pytest.approx(value)
        else:
            assert ours[key] == value, key


# --- special tokens, BOS/EOS ------------------------------------------------------------------


def test_llama3_special_tokens_and_bos() -> None:
    tok = gguf_tokenizer("llama-bpe")
    assert tok.vocab_size == 128256 and tok.bos_id == 128000 and tok.add_bos
    assert {128001, 128009} <= tok.eos_ids  # <|end_of_text|>, <|eot_id|>
    assert tok.bos_text == "<|begin_of_text|>" and tok.eos_text == "<|end_of_text|>"
    prompt = "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
    assert tok.encode(prompt) == [128000, 128006, 882, 128007, 271, 9906, 128009]
    assert tok.encode("<|begin_of_text|>Hello") == [128000, 9906]  # no second BOS
    assert tok.encode("Hello", add_bos=False) == [9906]
    plain = tok.encode(prompt, add_bos=False, parse_special=False)
    assert not set(plain) & set(range(128000, 128256)) and tok.decode(plain) == prompt
    assert tok.decode([128000, 9906, 128009]) == "<|begin_of_text|>Hello<|eot_id|>"
    assert tok.decode([128000, 9906, 128009], special=False) == "Hello"
    assert tok.token_piece(22691) == "ĠHello"


def test_qwen2_special_tokens_and_no_bos() -> None:
    tok = gguf_tokenizer("qwen2")
    assert not tok.add_bos
    assert {151643, 151645} <= tok.eos_ids  # <|endoftext|>, <|im_end|>
    ids = tok.encode("<|im_start|>user\nHello<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645 and tok.decode(ids) == "<|im_start|>user\nHello<|im_end|>"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_sentencepiece_bos_spaces_and_special_tokens() -> None:
    tok = gguf_tokenizer("llama-spm")
    assert tok.bos_id == 1 and tok.eos_ids == {2} and tok.add_bos
    assert tok.bos_text == "<s>" and tok.eos_text == "</s>"
    hello = tok.encode("Hello", add_bos=False)
    assert tok.encode("Hello") == [1, *hello] and tok.encode("") == [1] and tok.encode("", add_bos=False) == []
    # like llama.cpp, text after a special token gets the leading space a text start gets
    assert tok.encode("Hello</s> world") == [1, *hello, 2, *tok.encode(" world", add_bos=False)]
    assert tok.token_piece(hello[0]) == "▁Hello"


def test_byte_fallback_streams_whole_characters() -> None:
    tok = gguf_tokenizer("llama-spm")
    ids = tok.encode("🦙", add_bos=False)
    assert [tok.token_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    stream = tok.stream()
    assert [stream.push(i) for i in ids] == [" ", "", "", "", "🦙"]
    assert stream.finish() == ""
    cut = tok.stream()
    assert [cut.push(i) for i in ids[:3]] == [" ", "", ""] and cut.finish() == "\ufffd"


def test_stream_hides_control_tokens_unless_asked() -> None:
    tok = gguf_tokenizer("llama-bpe")
    ids = [128000, 9906, 128009]
    hidden = tok.stream()
    assert "".join(hidden.push(i) for i in ids) == "Hello"
    shown = tok.stream(special=True)
    assert "".join(shown.push(i) for i in ids) == "<|begin_of_text|>Hello<|eot_id|>"


def test_out_of_range_ids_are_refused() -> None:
    tok = gguf_tokenizer("llama-spm")
    with pytest.raises(MpillamaError, match="outside the vocabulary"):
        tok.decode([5, 32000])


def test_metadata_keys_without_prefix() -> None:
    short = {k.removeprefix("tokenizer.ggml.").removeprefix("tokenizer."): v for k, v in meta("qwen2").items()}
    tok = tokenizer_from_gguf_metadata(short)
    assert tok.encode("Hello world") == [9707, 1879] and tok.chat_template == meta("qwen2")["tokenizer.chat_template"]


def test_metadata_from_the_model_reader() -> None:
    gguf = pytest.importorskip("mpillama.formats.gguf")
    tok = tokenizer_from_gguf_metadata(gguf.gguf_tokenizer_metadata(gguf.read_gguf_header(vocab_path("llama-spm")).kv))
    for text, ids in vectors("llama-spm"):
        assert tok.encode(text, add_bos=False, parse_special=False) == ids


def test_bad_metadata_is_refused() -> None:
    base = meta("llama-bpe")
    with pytest.raises(MpillamaError, match="'bert'"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(MpillamaError, match="'no-such-pre'"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(MpillamaError, match="no tokenizer.ggml.tokens"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(MpillamaError, match="outside the vocabulary"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.bos_token_id": 10**6})


# --- Hugging Face folders ---------------------------------------------------------------------


def _hf_folder(tmp_path: Path, name: str, config: dict, extra: dict | None = None, post_bos: str | None = None) -> Path:
    """A tokenizer.json folder holding the same tokenizer as the GGUF vocabulary `name`."""
    import json

    hf = tokenizers.Tokenizer.from_str(gguf_tokenizer(name).hf.to_str())
    if post_bos:  # what Llama 3's tokenizer.json does: the post-processor adds BOS
        bos_id = hf.token_to_id(post_bos)
        hf.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{post_bos} $A", pair=f"{post_bos} $A {post_bos} $B", special_tokens=[(post_bos, bos_id)])
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for file, content in (extra or {}).items():
        (folder / file).write_text(json.dumps(content), encoding="utf-8")
    return folder


def test_hf_folder_llama3(tmp_path: Path) -> None:
    folder = _hf_folder(
        tmp_path, "llama-bpe",
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}, "chat_template": "{{ x }}"},
        {"generation_config.json": {"eos_token_id": [128001, 128008, 128009]}},
        post_bos="<|begin_of_text|>",
    )
    tok = tokenizer_from_hf(folder)
    assert tok.bos_id == 128000 and tok.add_bos  # found from the post-processor
    assert {128001, 128008, 128009} <= tok.eos_ids and tok.chat_template == "{{ x }}"
    assert tok.eos_text == "<|eot_id|>"
    for text, ids in vectors("llama-bpe"):
        assert tok.encode(text, add_bos=False, parse_special=False) == ids
        assert tok.encode(text) == [128000, *ids]
    stream = tok.stream()
    ids = tok.encode("naïve 🦙", add_bos=False)
    assert "".join(stream.push(i) for i in ids) == "naïve 🦙"


def test_hf_folder_sentencepiece(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path, "llama-spm", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                                 "chat_template": [{"name": "default", "template": "T"}]})
    tok = tokenizer_from_hf(folder)
    assert tok.bos_id == 1 and tok.eos_ids == {2} and tok.add_bos and tok.chat_template == "T"
    for text, ids in vectors("llama-spm"):
        assert tok.encode(text, add_bos=False, parse_special=False) == ids
    stream = tok.stream()
    assert "".join(stream.push(i) for i in tok.encode("🦙", add_bos=False)) == " 🦙"


# --- distributed-llama .t ---------------------------------------------------------------------


@dataclass
class Vocab:  # the fields of mpillama.formats.dllama.DllamaVocab
    tokens: list[bytes]
    scores: list[float]
    bos_id: int
    eos_ids: list[int]
    chat_template: str | None
    add_bos: bool
    max_token_length: int


@lru_cache(maxsize=1)
def llama3_dllama_vocab() -> Vocab:
    """Llama 3's vocabulary as distributed-llama's converter writes it: raw bytes, score -id."""
    m = meta("llama-bpe")
    u2b = unicode_to_byte()
    tokens = [bytes(u2b[c] for c in t) if kind == 1 else t.encode("utf-8")
              for t, kind in zip(m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"])]
    return Vocab(tokens, [-float(i) for i in range(len(tokens))], 128000, [128001, 128009], "TEMPLATE", True,
                 max(map(len, tokens)))


def dllama_encode(vocab: Vocab, text: bytes) -> list[int]:
    """distributed-llama's Tokenizer::encode (without BOS), transcribed: the reference."""
    regular = {t: i for i, t in enumerate(vocab.tokens[:vocab.bos_id])}
    out: list[int] = []
    buf, i = b"", 0
    while i < len(text):
        special = next((j for j in range(vocab.bos_id, len(vocab.tokens)) if text.startswith(vocab.tokens[j], i)), None)
        if special is not None:
            out.append(special)
            i += len(vocab.tokens[special])
            continue
        buf, i = buf + text[i:i + 1], i + 1
        if buf in regular:
            out.append(regular[buf])
            buf = b""
    assert buf == b""
    while True:  # merge the best-scoring adjacent pair, leftmost on ties
        best = None
        for k in range(len(out) - 1):
            j = regular.get(vocab.tokens[out[k]] + vocab.tokens[out[k + 1]])
            if j is not None and (best is None or vocab.scores[j] > best[0]):
                best = (vocab.scores[j], j, k)
        if best is None:
            return out
        _, j, k = best
        out[k:k + 2] = [j]


def test_dllama_matches_its_encoder() -> None:
    vocab = llama3_dllama_vocab()
    tok = tokenizer_from_dllama(vocab)
    assert tok.vocab_size == 128256 and tok.bos_id == 128000 and tok.add_bos and tok.chat_template == "TEMPLATE"
    assert {128001, 128009} <= tok.eos_ids
    texts = [text for text, _ in vectors("llama-bpe")]
    texts.append("<|start_header_id|>user<|end_header_id|>\n\nHello, y'all! 🦙<|eot_id|>")
    for text in texts:
        ids = tok.encode(text, add_bos=False)
        assert ids == dllama_encode(vocab, text.encode("utf-8")), text
        assert tok.decode(ids) == text
    assert tok.encode("Hi")[0] == 128000


def test_dllama_without_byte_tokens_is_refused() -> None:
    vocab = Vocab([b"a", b"b", b"ab", b"<s>"], [0.0, 0.0, 1.0, 0.0], 3, [3], None, True, 3)
    with pytest.raises(MpillamaError, match="byte-level"):
        tokenizer_from_dllama(vocab)


def write_t_file(path: Path, vocab: Vocab) -> None:
    """A .t file in the layout DESIGN.md gives (key/value header, template, eos ids, then tokens)."""
    template = (vocab.chat_template or "").encode("utf-8")
    pairs = [(0, 1), (1, len(vocab.tokens)), (2, vocab.max_token_length), (3, vocab.bos_id),
             (7, len(template)), (9, len(vocab.eos_ids)), (10, int(vocab.add_bos))]
    header = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    with path.open("wb") as f:
        f.write(struct.pack("<ii", 0x567124, 8 + len(header)) + header + template)
        f.write(b"".join(struct.pack("<i", e) for e in vocab.eos_ids))
        for token, score in zip(vocab.tokens, vocab.scores):
            f.write(struct.pack("<fI", score, len(token)) + token)


def test_load_tokenizer_from_a_t_file(tmp_path: Path) -> None:
    pytest.importorskip("mpillama.formats.dllama")
    path = tmp_path / "llama3.t"
    write_t_file(path, llama3_dllama_vocab())
    tok = load_tokenizer(SimpleNamespace(format="dllama", path="model.m"), str(path))
    assert tok.kind == "dllama" and tok.encode("Hello world") == [128000, 9906, 1917]


# --- choosing a source ------------------------------------------------------------------------


def test_load_tokenizer_sources(tmp_path: Path) -> None:
    gguf_model = SimpleNamespace(format="gguf", path="m.gguf", tokenizer_metadata=lambda: meta("qwen2"))
    assert load_tokenizer(gguf_model, None).encode("Hello world") == [9707, 1879]
    from_file = load_tokenizer(SimpleNamespace(format="dllama", path="m.m"), str(vocab_path("llama-spm")))
    assert from_file.kind == "gguf-llama"
    folder = _hf_folder(tmp_path, "llama-spm", {"bos_token": "<s>", "add_bos_token": True})
    assert load_tokenizer(gguf_model, str(folder)).kind == "hf"
    assert load_tokenizer(gguf_model, str(folder / "tokenizer.json")).kind == "hf"
    hf_model = SimpleNamespace(format="hf", path=str(folder / "model.safetensors"))
    assert load_tokenizer(hf_model, None).encode("Hello") == [1, 15043]


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(MpillamaError, match="--tokenizer FILE.t"):
        load_tokenizer(SimpleNamespace(format="dllama", path="model.m"), None)
    with pytest.raises(MpillamaError, match="does not exist"):
        load_tokenizer(SimpleNamespace(format="dllama", path="model.m"), str(tmp_path / "missing.t"))
    if importlib.util.find_spec("mpillama.formats.dllama"):
        cut = tmp_path / "cut.t"
        cut.write_bytes(struct.pack("<ii", 0x567124, 64) + bytes(8))
        with pytest.raises(MpillamaError):
            load_tokenizer(SimpleNamespace(format="dllama", path="model.m"), str(cut))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01\x02\x03junk")
    with pytest.raises(MpillamaError, match="not a tokenizer"):
        load_tokenizer(SimpleNamespace(format="dllama", path="model.m"), str(junk))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(vocab_path("llama-spm").read_bytes()[:5000])
    with pytest.raises(MpillamaError, match="truncated"):
        load_tokenizer(SimpleNamespace(format="dllama", path="model.m"), str(truncated))
