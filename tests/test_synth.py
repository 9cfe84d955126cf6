"""Synthetic GGUF models: shapes, parameter counts, file structure, tokenizer, statistics, failure modes."""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest

from mpillama.chat import CHATML_TEMPLATE
from mpillama.errors import MpillamaError
from mpillama.formats import expected_tensors, open_model
from mpillama.formats import synth
from mpillama.formats.synth import SHAPES, param_count, with_config, write_shape, write_synthetic
from mpillama.quant import quantize_q40, rope_frequencies_ref


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("synth")
    return {f"{s}-{t}": write_synthetic(s, folder / f"{s}-{t}.gguf", t, seed=11)
            for s, t in (("tiny", "q40"), ("tiny", "f32"), ("qwen3-tiny", "q40"))}  # fmt: skip


def test_real_shapes_have_the_published_parameter_counts() -> None:
    # counts as published for the checkpoints (tied embeddings counted once)
    assert param_count(SHAPES["llama3.2-1b"].config) == 1_235_814_400
    assert param_count(SHAPES["llama3.2-3b"].config) == 3_212_749_824
    assert param_count(SHAPES["llama3-8b"].config) == 8_030_261_248
    qwen = SHAPES["qwen3-0.6b"].config  # Qwen3 report: 0.6 B total, 0.44 B without embedding
    assert round(param_count(qwen) / 1e9, 1) == 0.6
    assert round((param_count(qwen) - qwen.vocab_size * qwen.dim) / 1e9, 2) == 0.44
    assert qwen.head_dim * qwen.n_heads == 2048 != qwen.dim
    assert SHAPES["llama3.2-1b"].config.rope_scaling.factor == 32  # type: ignore[union-attr]


@pytest.mark.parametrize("key", ["tiny-q40", "tiny-f32", "qwen3-tiny-q40"])
def test_round_trip_through_open_model(files: dict[str, Path], key: str) -> None:
    shape, kind = key.rsplit("-", 1)
    m = open_model(files[key])
    assert m.format == "gguf" and m.config == SHAPES[shape].config
    want = expected_tensors(m.config)
    extra = {"rope_freqs"} if m.config.rope_scaling else set()
    assert set(m.tensors) == set(want) | extra
    for name, shp in want.items():
        info = m.tensors[name]
        assert info.shape == shp
        assert info.kind == (kind if len(shp) == 2 else "f32"), name
    assert ("output" in m.tensors) == (not SHAPES[shape].config.tied_embeddings)
    assert m.metadata["general.file_type"] == (2 if kind == "q40" else 0)


def test_test_shapes_are_what_the_tests_need() -> None:
    tiny, qwen = SHAPES["tiny"].config, SHAPES["qwen3-tiny"].config
    assert tiny.hidden_dim // 32 == 11 and not tiny.tied_embeddings and tiny.rope_scaling is not None
    assert qwen.q_dim != qwen.dim and qwen.qk_norm and qwen.rope_style == "halves" and not qwen.tied_embeddings
    assert SHAPES["qwen3-tiny-tied"].config.tied_embeddings


def test_rope_freqs_carry_llama3_scaling(files: dict[str, Path]) -> None:
    m = open_model(files["tiny-q40"])
    c = m.config
    base = rope_frequencies_ref(c.head_dim, c.rope_theta, None)
    scaled = rope_frequencies_ref(c.head_dim, c.rope_theta, c.rope_scaling)
    np.testing.assert_allclose(m.read_f32("rope_freqs"), base / scaled, rtol=1e-6)
    assert 1.0 < m.read_f32("rope_freqs")[8] < 32.0  # the tiny head has a frequency in the smooth band


def test_weights_are_deterministic_and_follow_the_seed(files: dict[str, Path], tmp_path: Path) -> None:
    m = open_model(files["tiny-q40"])
    # the stored Q4_0 bytes are the quantized N(0, 1/dim) draw for (seed, tensor name), rows = out features
    name = "blk.1.attn_k.weight"
    rng = np.random.default_rng([11, zlib.crc32(name.encode())])
    x = rng.standard_normal((64, 128), dtype=np.float32) * np.float32(1 / np.sqrt(128))
    assert np.array_equal(m.read_q40("blk.1.attn_k"), quantize_q40(x))
    again = write_synthetic("qwen3-tiny", tmp_path / "a.gguf", "q40", seed=11)
    assert again.read_bytes() == files["qwen3-tiny-q40"].read_bytes()
    other = open_model(write_synthetic("qwen3-tiny", tmp_path / "b.gguf", "q40", seed=12))
    assert not np.array_equal(other.read_q40("blk.0.attn_q"), open_model(again).read_q40("blk.0.attn_q"))


def test_weight_statistics(files: dict[str, Path], tmp_path: Path) -> None:
    m = open_model(files["tiny-f32"])
    q = m.read_f32("blk.0.attn_q")
    assert abs(q.std() * np.sqrt(128) - 1) < 0.05 and abs(q.mean()) < 0.01
    down = m.read_f32("blk.0.ffn_down")
    assert abs(down.std() * np.sqrt(352) - 1) < 0.05
    norm = m.read_f32("blk.1.ffn_norm")
    assert abs(norm.mean() - 1) < 0.02 and 0.02 < norm.std() < 0.08
    # the chain head: every output row has norm chain_gain and points along one token's embedding
    out, emb = m.read_f32("output"), m.read_f32("token_embd")
    assert np.allclose(np.linalg.norm(out, axis=1), 4.0, rtol=1e-4)
    best = np.abs((out[:64] / 4.0) @ (emb / np.linalg.norm(emb, axis=1, keepdims=True)).T).max(axis=1)
    assert np.all(best > 0.999)
    tied = open_model(write_synthetic("qwen3-tiny-tied", tmp_path / "tied.gguf", "q40", seed=3))
    assert abs(tied.read_f32("output_norm").mean()) < 0.3  # zero-mean: no self-copy attractor when tied


def test_tokenizer_and_chat_templates(files: dict[str, Path]) -> None:
    env = jinja2.Environment()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}]
    meta = open_model(files["tiny-q40"]).tokenizer_metadata()
    assert meta is not None and len(meta["tokens"]) == 128256 and meta["pre"] == "llama-bpe"  # type: ignore[arg-type]
    assert meta["bos_id"] == 128000 and meta["add_bos"] is True
    assert meta["tokens"][meta["eos_id"]] == "<|eot_id|>"  # type: ignore[index]
    text = env.from_string(meta["chat_template"]).render(  # type: ignore[arg-type]
        messages=chat, bos_token="<|begin_of_text|>", add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")  # fmt: skip
    meta = open_model(files["qwen3-tiny-q40"]).tokenizer_metadata()
    assert meta is not None and len(meta["tokens"]) == 151936 and meta["add_bos"] is False  # type: ignore[arg-type]
    assert meta["tokens"][meta["eos_id"]] == "<|im_end|>"  # type: ignore[index]
    template = str(meta["chat_template"])
    text = env.from_string(template).render(messages=chat, add_generation_prompt=True)
    assert "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n" in text
    text = env.from_string(CHATML_TEMPLATE).render(messages=chat[1:], add_generation_prompt=False)
    assert text == "<|im_start|>user\n Hi <|im_end|>\n"


def test_the_file_loads_in_the_gguf_package(tmp_path: Path) -> None:
    """An independent reader agrees on keys, tensor shapes (ne) and bytes; a 32k vocabulary keeps it quick."""
    shape = dataclasses.replace(with_config(SHAPES["tiny"], vocab_size=32000), vocab="llama-spm")
    path = write_shape(shape, tmp_path / "spm.gguf", "q40", seed=2)
    r = gguf.GGUFReader(path)
    m = open_model(path)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert field("llama.feed_forward_length") == 352 and field("llama.rope.dimension_count") == 32
    assert field("llama.attention.head_count_kv") == 2 and field("tokenizer.ggml.model") == "llama"
    assert len(r.tensors) == len(m.tensors)
    for t in r.tensors:
        name = t.name.removesuffix(".weight")
        assert tuple(reversed(t.shape.tolist())) == m.tensors[name].shape, name
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(m.tensors[name].shape),
                              m.read_f32(name)), name  # fmt: skip
        want = gguf.GGMLQuantizationType.Q4_0 if len(m.tensors[name].shape) == 2 else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == want, name


def test_bad_requests_and_interrupted_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MpillamaError) as e:
        write_synthetic("llama-7b", tmp_path / "x.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "'llama-7b'" in msg and all(s in msg for s in SHAPES)
    with pytest.raises(MpillamaError, match="q8"):
        write_synthetic("tiny", tmp_path / "x.gguf", "q8")

    def broken(*args: object) -> object:
        raise OSError("disk full")

    monkeypatch.setattr(synth, "_chunks", broken)
    with pytest.raises(OSError):
        write_synthetic("qwen3-tiny", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part
