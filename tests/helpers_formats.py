"""Small hand-built model files for the format tests, written with the `gguf` package's writer
and struct (not with mpillama's writers), so readers are checked against independent bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import quantize

# A one-layer llama small enough to build in milliseconds; dims of 256 so K-quant blocks fit.
SMALL = dict(dim=256, hidden=256, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64, vocab=96, ctx=64)


@dataclass
class Tensor:
    name: str  # GGUF name, with .weight
    shape: tuple[int, ...]  # math orientation (rows, cols) or (n,)
    qtype: T


def small_tensors(types: dict[str, T] | None = None, drop: str | None = None,
                  reshape: dict[str, tuple[int, ...]] | None = None) -> list[Tensor]:  # fmt: skip
    """The tensors of SMALL (untied); types overrides per canonical name (default Q4_0 matrices, F32 norms)."""
    s, types = SMALL, types or {}
    q, kv = s["n_heads"] * s["head_dim"], s["n_kv_heads"] * s["head_dim"]
    shapes = {"token_embd": (s["vocab"], s["dim"]), "output_norm": (s["dim"],), "output": (s["vocab"], s["dim"])}
    for i in range(s["n_layers"]):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm": (s["dim"],), b + "attn_q": (q, s["dim"]), b + "attn_k": (kv, s["dim"]),
                       b + "attn_v": (kv, s["dim"]), b + "attn_output": (s["dim"], q), b + "ffn_norm": (s["dim"],),
                       b + "ffn_gate": (s["hidden"], s["dim"]), b + "ffn_up": (s["hidden"], s["dim"]),
                       b + "ffn_down": (s["dim"], s["hidden"])})  # fmt: skip
    shapes.update(reshape or {})
    out = []
    for name, shape in shapes.items():
        if name == drop:
            continue
        default = T.Q4_0 if len(shape) == 2 else T.F32
        out.append(Tensor(name + ".weight", shape, types.get(name, default)))
    return out


def tensor_bytes(t: Tensor, rng: np.random.Generator) -> np.ndarray:
    """uint8 (rows, row_bytes): random values stored as t.qtype (K-quants: random blocks with sane scales)."""
    rows, cols = (t.shape[0], t.shape[1]) if len(t.shape) == 2 else (1, t.shape[0])
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
    if t.qtype == T.F32:
        return x.view(np.uint8)
    if t.qtype == T.F16:
        return x.astype(np.float16).view(np.uint8)
    if t.qtype in (T.Q4_0, T.Q8_0, T.BF16, T.Q5_0):
        return np.asarray(quantize(x, t.qtype)).view(np.uint8).reshape(rows, -1)
    assert t.qtype == T.Q6_K, t.qtype  # layout: ql[128] qh[64] scales[16] int8, d f16
    block, size = GGML_QUANT_SIZES[t.qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    raw[..., 208:210] = np.array([0.01], "<f2").view(np.uint8)
    return raw.reshape(rows, -1)


def write_small_gguf(path: Path, tensors: list[Tensor], arch: str = "llama", seed: int = 0,
                     tokens: list[str] | None = None, extra: dict[str, int] | None = None) -> Path:  # fmt: skip
    """A GGUF holding `tensors` with llama metadata for SMALL (and a tiny vocabulary if given)."""
    s, rng = SMALL, np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    for key, value in {"context_length": s["ctx"], "embedding_length": s["dim"], "block_count": s["n_layers"],
                       "feed_forward_length": s["hidden"], "attention.head_count": s["n_heads"],
                       "attention.head_count_kv": s["n_kv_heads"], **(extra or {})}.items():  # fmt: skip
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    if tokens:
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.merges", ["a b", "ab c"])
        w.add_uint32("tokenizer.ggml.bos_token_id", 1)
        w.add_uint32("tokenizer.ggml.eos_token_id", 2)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_string("tokenizer.chat_template", "{{ messages }}")
    for t in tensors:
        raw = tensor_bytes(t, rng)
        w.add_tensor(t.name, raw if len(t.shape) == 2 else raw.reshape(-1), raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensor_info_offset(data: bytes, name: str) -> int:
    """Offset of the type field of tensor `name`'s info record in a GGUF file's bytes."""
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    return at + 4 + 8 * n_dims
