"""The undamaged files the fuzz test starts from, and where their fields are.

A two-layer llama with a 264-token byte-level BPE vocabulary, written with the `gguf` package's
writer (not mpillama's), small enough to load and run in a fraction of a second; the same model
as a Hugging Face folder and as distributed-llama .m + .t files (those through mpillama's
writers: they are starting points here, not references). `gguf_layout` finds every header
field's offset with gguf.GGUFReader, so damage can be aimed at a field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import quantize

DIMS = {"dim": 64, "hidden": 96, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32, "ctx": 64}
MERGES = ["t h", "th e", "Ġ c", "Ġc a", "Ġca t", "a t"]
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>"]
PROMPT = "the cat"


def byte_level_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (the byte-level BPE alphabet)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def vocab_tokens() -> tuple[list[str], list[int]]:
    """(tokens, token types): 256 bytes, one token per merge, then the control tokens."""
    tokens = byte_level_chars() + [m.replace(" ", "") for m in MERGES] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    return tokens, types


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape (rows, cols) or (n,), in file order."""
    d = DIMS
    vocab = len(vocab_tokens()[0])
    q, kv = d["n_heads"] * d["head_dim"], d["n_kv_heads"] * d["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, d["dim"])}
    for i in range(d["n_layers"]):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (d["dim"],), b + "attn_q.weight": (q, d["dim"]),
                       b + "attn_k.weight": (kv, d["dim"]), b + "attn_v.weight": (kv, d["dim"]),
                       b + "attn_output.weight": (d["dim"], q), b + "ffn_norm.weight": (d["dim"],),
                       b + "ffn_gate.weight": (d["hidden"], d["dim"]), b + "ffn_up.weight": (d["hidden"], d["dim"]),
                       b + "ffn_down.weight": (d["dim"], d["hidden"])})  # fmt: skip
    shapes["output_norm.weight"] = (d["dim"],)
    shapes["output.weight"] = (vocab, d["dim"])
    return shapes


# metadata value: (GGUFValueType, value[, element type for arrays])
Meta = dict[str, tuple[Any, ...]]


def base_metadata() -> Meta:
    d, a = DIMS, "llama"
    u32 = GGUFValueType.UINT32
    tokens, types = vocab_tokens()
    arr = GGUFValueType.ARRAY
    return {
        f"{a}.context_length": (u32, d["ctx"]), f"{a}.embedding_length": (u32, d["dim"]),
        f"{a}.block_count": (u32, d["n_layers"]), f"{a}.feed_forward_length": (u32, d["hidden"]),
        f"{a}.attention.head_count": (u32, d["n_heads"]), f"{a}.attention.head_count_kv": (u32, d["n_kv_heads"]),
        f"{a}.attention.key_length": (u32, d["head_dim"]), f"{a}.rope.dimension_count": (u32, d["head_dim"]),
        f"{a}.attention.layer_norm_rms_epsilon": (GGUFValueType.FLOAT32, 1e-5),
        f"{a}.rope.freq_base": (GGUFValueType.FLOAT32, 10000.0),
        "tokenizer.ggml.model": (GGUFValueType.STRING, "gpt2"),
        "tokenizer.ggml.pre": (GGUFValueType.STRING, "llama-bpe"),
        "tokenizer.ggml.tokens": (arr, tokens, GGUFValueType.STRING),
        "tokenizer.ggml.token_type": (arr, types, GGUFValueType.INT32),
        "tokenizer.ggml.merges": (arr, MERGES, GGUFValueType.STRING),
        "tokenizer.ggml.bos_token_id": (u32, tokens.index(SPECIALS[0])),
        "tokenizer.ggml.eos_token_id": (u32, tokens.index(SPECIALS[1])),
        "tokenizer.ggml.add_bos_token": (GGUFValueType.BOOL, True),
        "tokenizer.chat_template": (GGUFValueType.STRING, "{% for m in messages %}{{ m.content }}{% endfor %}"),
    }  # fmt: skip


def tensor_values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """f32 values: norms near 1, matrices N(0, 1/fan_in), the embedding N(0, 1)."""
    if len(shape) == 1:
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    std = 1.0 if name.startswith("token_embd") else 1.0 / np.sqrt(shape[1])
    return (std * rng.standard_normal(shape)).astype(np.float32)


def write_gguf(path: Path, meta: Meta | None = None, types: dict[str, T] | None = None, seed: int = 0) -> Path:
    """The base model (meta replaces the base metadata when given): Q4_0 matrices, F32 norms."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, "llama")
    for key, (vtype, value, *sub) in (base_metadata() if meta is None else meta).items():
        w.add_key_value(key, value, vtype, sub[0] if sub else None)
    for name, shape in tensor_shapes().items():
        qtype = (types or {}).get(name, T.Q4_0 if len(shape) == 2 else T.F32)
        x = tensor_values(name, shape, rng)
        raw = x if qtype == T.F32 else np.asarray(quantize(x.reshape(-1, shape[-1]), qtype))
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- where the fields are


@dataclass
class KVField:
    key: str
    start: int  # the key's length field
    type_at: int  # its value type field
    value_at: int  # the value (for arrays: the element type field)
    parts: list[tuple[int, int]]  # (offset, nbytes) of every part after the type


@dataclass
class TensorField:
    name: str
    start: int  # the name's length field
    n_dims_at: int
    dims_at: int
    type_at: int
    offset_at: int  # the data offset field (relative to the data start)
    data_start: int  # absolute offset of its data
    data_bytes: int
    ggml_type: int


@dataclass
class GGUFLayout:
    size: int
    data_start: int
    kv: dict[str, KVField] = field(default_factory=dict)
    tensors: dict[str, TensorField] = field(default_factory=dict)


def gguf_layout(path: Path) -> GGUFLayout:
    """Every metadata and tensor-info field's offset, found with the gguf package's reader."""
    r = GGUFReader(path)
    base = r.data.__array_interface__["data"][0]

    def at(part: np.ndarray) -> int:
        return part.__array_interface__["data"][0] - base

    out = GGUFLayout(size=len(r.data), data_start=r.data_offset)
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        parts = [(at(p), p.nbytes) for p in f.parts]
        out.kv[f.name] = KVField(f.name, f.offset, parts[2][0], parts[3][0], parts[3:])
    for t in r.tensors:
        parts = [at(p) for p in t.field.parts]
        out.tensors[t.name] = TensorField(t.name, t.field.offset, parts[2], parts[3], parts[4], parts[5],
                                          int(t.data_offset), int(t.n_bytes), int(t.tensor_type))
    return out


def put(data: bytearray, offset: int, fmt: str, value: Any) -> None:
    struct.pack_into(fmt, data, offset, value)
