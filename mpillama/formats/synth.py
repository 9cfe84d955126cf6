"""Synthetic models: random weights at real shapes, written as GGUF files llama.cpp can load.

Owns: SHAPES (the named shapes, their vocabularies and weight statistics), the end-of-turn and
add_bos facts written into the tokenizer keys (with chat.py's built-in template when a vocabulary
file carries none), and write_synthetic(), which streams one tensor at
a time (generate, quantize, write) so a 1.2 B-parameter model fits in bounded memory.

Files look like llama.cpp's own conversions: metadata under the architecture's keys, the
tokenizer.* keys of a real tokenizer vocabulary (mpillama.formats.vocab), Q4_0 for every 2-D
matrix (token_embd and output too, like `llama-quantize --pure`) or all F32, F32 norms, and
for Llama 3.x rope scaling a rope_freqs tensor of per-frequency factors (what llama.cpp's
converter writes; mpillama recognises it when reading). Llama q/k rows in GGUF are in the
'pairs' rope layout; random weights are simply generated in that layout (nothing to permute).

Imports numpy, gguf (its writer), and mpillama atomic/chat/config/errors/quant/formats. Never mpi4py.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from mpillama.atomic import atomic_write
from mpillama.chat import FALLBACK_TEMPLATES
from mpillama.config import ModelConfig, RopeScaling
from mpillama.errors import MpillamaError
from mpillama.formats.gguf import T_BOOL, T_STRING, T_UINT32, GGUFValue, read_gguf_header
from mpillama.formats.tensors import expected_tensors, llama3_rope_factors
from mpillama.formats.vocab import vocab_gguf
from mpillama.quant import QK_K, quantize_kquant, quantize_q40, quantize_q80


@dataclass(frozen=True)
class SynthShape:
    """A model shape plus how to fill it.

    Matrices are N(0, (gain / sqrt(fan_in))^2), so each projection of a unit-rms vector has unit
    variance; the embedding is N(0, embed_std^2); norms are 1 + N(0, norm_noise^2). The output
    head gets out_gain / sqrt(dim), and its rows are scaled by exp(head_spread * N(0, 1)) so the
    logits are heavy-tailed: the top token stands out from the runner-up by a clear margin more
    often than with Gaussian logits (see FIELD-NOTES: random models have flat logits).
    """

    config: ModelConfig
    vocab: str  # name for formats.vocab.vocab_gguf
    embed_std: float = 1.0
    gain: float = 1.0
    out_gain: float = 4.0  # untied head: logits of std ~4, about what trained models show
    head_spread: float = 0.0
    # > 0 (untied test shapes): output row j is chain_gain * the unit embedding of token perm[j], so
    # the next token is decided by the current one by a wide margin (see _chain_head)
    chain_gain: float = 0.0
    norm_noise: float = 0.05
    out_norm_mean: float = 1.0  # output_norm = out_norm_mean + N(0, out_norm_std^2)
    out_norm_std: float = 0.05


_LLAMA32_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)


def _llama(**kw: object) -> ModelConfig:
    base = dict(arch="llama", vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, rope_style="pairs")
    return ModelConfig(**{**base, **kw})  # type: ignore[arg-type]


def _qwen3(**kw: object) -> ModelConfig:
    base = dict(arch="qwen3", vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, rope_style="halves",
                qk_norm=True, tied_embeddings=True)  # fmt: skip
    return ModelConfig(**{**base, **kw})  # type: ignore[arg-type]


def _qwen3moe(**kw: object) -> ModelConfig:
    base = dict(arch="qwen3moe", vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, rope_style="halves",
                qk_norm=True, norm_topk_prob=True)  # fmt: skip
    return ModelConfig(**{**base, **kw})  # type: ignore[arg-type]


def _tied(dim: int) -> dict[str, float]:
    """Init for tied embeddings: logits of std ~4 from N(0, (4/sqrt(dim))^2) rows, and a zero-mean
    output_norm. With norms ~1 the residual keeps the input token's embedding, whose own logit
    then towers over the rest and greedy decoding repeats one token forever; random-sign norm
    weights cancel that self-match on average."""
    return dict(embed_std=4.0 / dim**0.5, out_norm_mean=0.0, out_norm_std=1.0)


SHAPES: dict[str, SynthShape] = {
    "llama3.2-1b": SynthShape(
        _llama(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, seq_len=131072,
               rope_scaling=_LLAMA32_ROPE, tied_embeddings=True), "llama-bpe", **_tied(2048)),  # fmt: skip
    "llama3.2-3b": SynthShape(
        _llama(dim=3072, hidden_dim=8192, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, seq_len=131072,
               rope_scaling=_LLAMA32_ROPE, tied_embeddings=True), "llama-bpe", **_tied(3072)),  # fmt: skip
    "llama3-8b": SynthShape(
        _llama(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, seq_len=8192),
        "llama-bpe"),  # fmt: skip
    "qwen3-0.6b": SynthShape(
        _qwen3(dim=1024, hidden_dim=3072, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, seq_len=40960),
        "qwen2", **_tied(1024)),  # fmt: skip
    # Test shapes: numerically decisive. Greedy tokens must be identical across precisions and rank
    # counts, but Q8_0 activations move logits by ~1% of their range, and random heads leave the
    # top two logits within that of each other on ~5% of steps. So their head is a "chain": output
    # row j is the unit embedding of token perm[j] (times chain_gain), and the embedding (std 2)
    # outweighs what the layers add (rms ratio ~0.9), so the current token's successor beats the
    # best other logit by ~4 logit std (~8 std above the mean). Layers still move every logit,
    # which the logit comparisons check; tokens walk a random permutation cycle (all distinct).
    # tiny: hidden 352 = 11 blocks of 32, so feed-forward splits are uneven; llama3 rope scaling.
    "tiny": SynthShape(
        _llama(dim=128, hidden_dim=352, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, seq_len=512,
               rope_scaling=_LLAMA32_ROPE, tied_embeddings=False), "llama-bpe", embed_std=2.0, chain_gain=4.0),  # fmt: skip
    # tiny-256: every matrix's columns whole 256-value super-blocks, for the K-quant types (--type q4_k, ...);
    # hidden 1024 = 4 super-blocks, so three ranks share the FFN unevenly
    "tiny-256": SynthShape(
        _llama(dim=256, hidden_dim=1024, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, seq_len=512,
               tied_embeddings=False), "llama-bpe", embed_std=2.0, chain_gain=4.0),  # fmt: skip
    # qwen3-tiny: head_dim 64 with dim 128, so q_dim = 256 != dim, like real Qwen3. Untied (a tied head
    # cannot be a chain); the tied path is tested with f32 weights, where there is no Q8_0 noise.
    "qwen3-tiny": SynthShape(
        _qwen3(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, seq_len=512,
               tied_embeddings=False), "qwen2", embed_std=2.0, chain_gain=4.0),  # fmt: skip
    # the same, tied, for the format tests: output_norm is zero-mean, or the residual (which keeps
    # the input token's embedding) would make greedy decoding repeat the input token forever
    "qwen3-tiny-tied": SynthShape(
        _qwen3(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, seq_len=512),
        "qwen2", embed_std=0.5, out_norm_mean=0.0, out_norm_std=1.0, head_spread=0.35),  # fmt: skip
    # qwen3-moe-tiny: 8 experts of 160 rows (5 blocks of 32: uneven splits over 2-4 ranks), 2 used per
    # token, so the router's choice changes every layer's output; a chain head as qwen3-tiny.
    "qwen3-moe-tiny": SynthShape(
        _qwen3moe(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, seq_len=512,
                  n_experts=8, n_experts_used=2, expert_hidden_dim=160),
        "qwen2", embed_std=2.0, chain_gain=4.0),  # fmt: skip
    # Qwen3-30B-A3B: 48 layers, 128 experts of 768 rows, 8 used per token (~17 GB in Q4_0)
    "qwen3-30b-a3b": SynthShape(
        _qwen3moe(dim=2048, hidden_dim=6144, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, seq_len=40960,
                  n_experts=128, n_experts_used=8, expert_hidden_dim=768), "qwen2"),  # fmt: skip
}

# per architecture: (end-of-turn token used as eos, add_bos); the chat template, when the vocabulary
# has none, is chat.py's built-in one for the architecture
_CHAT = {"llama": ("<|eot_id|>", True), "qwen3": ("<|im_end|>", False), "qwen3moe": ("<|im_end|>", False)}

# the matrices' type (and the embedding's); norms are always f32. q4_k_m mixes like llama-quantize's Q4_K_M:
# Q6_K for the output head and, in some layers (_more_bits), attn_v and ffn_down; Q4_K elsewhere
WEIGHT_TYPES = ("q40", "q80", "q4_k", "q5_k", "q6_k", "q4_k_m", "f32")
K_TYPES = {"q4_k": GGMLQuantizationType.Q4_K, "q5_k": GGMLQuantizationType.Q5_K, "q6_k": GGMLQuantizationType.Q6_K}
_ROWS_PER_CHUNK_VALUES = 1 << 22  # values generated per step: bounds memory for 128k x 4096 tensors


@dataclass(frozen=True)
class _Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]  # math orientation
    std: float  # 0 for fixed tensors (rope_freqs)
    mean: float
    row_spread: float = 0.0

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2  # 3-D: a layer's experts stacked (n_expert, rows, cols)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the model (embedding counted once when tied), as model cards count them."""
    return sum(int(np.prod(s)) for s in expected_tensors(cfg).values())


def tensor_plan(shape: SynthShape) -> list[_Planned]:
    """Every tensor of the file in write order, with its shape and distribution."""
    c, s = shape.config, shape
    norm = s.norm_noise
    # a tied embedding is also the output head, so it carries the head's row spread
    plan = [_Planned("token_embd.weight", (c.vocab_size, c.dim), s.embed_std, 0.0,
                     s.head_spread if c.tied_embeddings else 0.0)]  # fmt: skip
    if c.rope_scaling is not None:
        plan.append(_Planned("rope_freqs.weight", (c.head_dim // 2,), 0.0, 0.0))
    for i in range(c.n_layers):
        b = f"blk.{i}."
        plan += [
            _Planned(b + "attn_norm.weight", (c.dim,), norm, 1.0),
            _Planned(b + "attn_q.weight", (c.q_dim, c.dim), s.gain / np.sqrt(c.dim), 0.0),
            _Planned(b + "attn_k.weight", (c.kv_dim, c.dim), s.gain / np.sqrt(c.dim), 0.0),
            _Planned(b + "attn_v.weight", (c.kv_dim, c.dim), s.gain / np.sqrt(c.dim), 0.0),
            _Planned(b + "attn_output.weight", (c.dim, c.q_dim), s.gain / np.sqrt(c.q_dim), 0.0),
        ]
        if c.qk_norm:
            plan += [_Planned(b + "attn_q_norm.weight", (c.head_dim,), norm, 1.0),
                     _Planned(b + "attn_k_norm.weight", (c.head_dim,), norm, 1.0)]  # fmt: skip
        if c.is_moe:
            e, h = c.n_experts, c.expert_hidden_dim
            plan += [
                _Planned(b + "ffn_norm.weight", (c.dim,), norm, 1.0),
                _Planned(b + "ffn_gate_inp.weight", (e, c.dim), s.gain / np.sqrt(c.dim), 0.0),
                _Planned(b + "ffn_gate_exps.weight", (e, h, c.dim), s.gain / np.sqrt(c.dim), 0.0),
                _Planned(b + "ffn_up_exps.weight", (e, h, c.dim), s.gain / np.sqrt(c.dim), 0.0),
                _Planned(b + "ffn_down_exps.weight", (e, c.dim, h), s.gain / np.sqrt(h), 0.0),
            ]
            continue
        plan += [
            _Planned(b + "ffn_norm.weight", (c.dim,), norm, 1.0),
            _Planned(b + "ffn_gate.weight", (c.hidden_dim, c.dim), s.gain / np.sqrt(c.dim), 0.0),
            _Planned(b + "ffn_up.weight", (c.hidden_dim, c.dim), s.gain / np.sqrt(c.dim), 0.0),
            _Planned(b + "ffn_down.weight", (c.dim, c.hidden_dim), s.gain / np.sqrt(c.hidden_dim), 0.0),
        ]
    plan.append(_Planned("output_norm.weight", (c.dim,), s.out_norm_std, s.out_norm_mean))
    if not c.tied_embeddings:
        plan.append(_Planned("output.weight", (c.vocab_size, c.dim), s.out_gain / np.sqrt(c.dim), 0.0, s.head_spread))
    return plan


_QTYPES = {"q40": GGMLQuantizationType.Q4_0, "q80": GGMLQuantizationType.Q8_0, "f32": GGMLQuantizationType.F32}


_QTYPES |= K_TYPES


def _more_bits(layer: int, n_layers: int) -> bool:
    """The layers whose attn_v and ffn_down a Q4_K_M file keeps in Q6_K: the first and last eighth, and
    every third one between (the rule llama-quantize follows)."""
    return layer < n_layers / 8 or layer >= 7 * n_layers / 8 or (layer - n_layers / 8) % 3 == 2


def _ggml_type(p: _Planned, weight_type: str, n_layers: int) -> GGMLQuantizationType:
    # the MoE router stays F32, as llama-quantize leaves it: routing is a discrete choice, worth exact inputs
    if not p.is_matrix or p.name.endswith("ffn_gate_inp.weight"):
        return GGMLQuantizationType.F32
    if weight_type != "q4_k_m":
        return _QTYPES[weight_type]
    parts = p.name.removesuffix(".weight").split(".")  # output | token_embd | blk.N.attn_v ...
    finer = parts == ["output"] or (parts[-1] in ("attn_v", "ffn_down") and _more_bits(int(parts[1]), n_layers))
    return GGMLQuantizationType.Q6_K if finer else GGMLQuantizationType.Q4_K


def _encode(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """f32 rows -> the stored rows of qtype (quant.py's GGML-exact quantizers)."""
    if qtype == GGMLQuantizationType.Q4_0:
        return quantize_q40(x)
    for kind, ktype in K_TYPES.items():
        if qtype == ktype:
            return quantize_kquant(kind, x)
    return quantize_q80(x) if qtype == GGMLQuantizationType.Q8_0 else x


def _nbytes(p: _Planned, qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(p.shape)) // block * size


def _chunks(p: _Planned, shape: SynthShape, qtype: GGMLQuantizationType, seed: int) -> Iterator[np.ndarray]:
    """The tensor's stored bytes, a block of rows at a time; deterministic from (seed, name)."""
    c = shape.config
    if p.name == "rope_freqs.weight":
        assert c.rope_scaling is not None
        yield llama3_rope_factors(c.head_dim, c.rope_theta, c.rope_scaling)
        return
    if p.name == "output.weight" and shape.chain_gain:
        yield from _chain_head(shape, qtype, seed)
        return
    rng = np.random.default_rng([seed, zlib.crc32(p.name.encode())])
    rows, cols = (int(np.prod(p.shape[:-1])), p.shape[-1]) if p.is_matrix else (1, p.shape[0])
    spread = None
    if p.row_spread:
        spread = np.exp(p.row_spread * rng.standard_normal(rows, dtype=np.float32))  # (rows,) f32
        spread /= np.sqrt(np.mean(spread * spread))  # keep the overall scale at std
    step = max(1, _ROWS_PER_CHUNK_VALUES // cols)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        x = rng.standard_normal((n, cols), dtype=np.float32)  # (n, cols) f32
        x *= np.float32(p.std)
        if p.mean:
            x += np.float32(p.mean)
        if spread is not None:
            x *= spread[r : r + n, None]
        yield _encode(x, qtype)


def _chain_head(shape: SynthShape, qtype: GGMLQuantizationType, seed: int) -> Iterator[np.ndarray]:
    """Output rows = chain_gain * unit(embedding[perm[j]]): the logit of token j is large when the
    hidden state points along the embedding of perm[j], so greedy decoding from token t goes to
    perm^-1[t]. Rebuilds the embedding from its own seed (test shapes only: it sits in memory)."""
    c = shape.config
    embedding = np.concatenate(list(_chunks(_Planned("token_embd.weight", (c.vocab_size, c.dim), shape.embed_std, 0.0),
                                            shape, GGMLQuantizationType.F32, seed)))  # (vocab, dim) f32
    perm = np.random.default_rng([seed, zlib.crc32(b"chain")]).permutation(c.vocab_size)
    step = max(1, _ROWS_PER_CHUNK_VALUES // c.dim)
    for r in range(0, c.vocab_size, step):
        rows = embedding[perm[r : r + step]]
        rows *= np.float32(shape.chain_gain) / np.linalg.norm(rows, axis=1, keepdims=True)
        yield _encode(rows, qtype)


def _tokenizer_kv(shape: SynthShape) -> dict[str, GGUFValue]:
    """The vocabulary file's tokenizer.* keys, with eos = the end-of-turn token, add_bos, and a chat template."""
    kv = {k: v for k, v in read_gguf_header(vocab_gguf(shape.vocab)).kv.items() if k.startswith("tokenizer.")}
    eot, add_bos = _CHAT[shape.config.arch]
    tokens = kv["tokenizer.ggml.tokens"].get()
    if len(tokens) != shape.config.vocab_size:
        raise MpillamaError(f"vocabulary {shape.vocab!r} has {len(tokens)} tokens, the shape needs "
                            f"{shape.config.vocab_size}: pick a vocabulary of the model's size")  # fmt: skip
    # chat models stop at the end of a turn: that is their eos (as in Llama 3.2 Instruct / Qwen3 GGUFs)
    if eot in tokens:
        kv["tokenizer.ggml.eos_token_id"] = GGUFValue(T_UINT32, tokens.index(eot))
    kv["tokenizer.ggml.add_bos_token"] = GGUFValue(T_BOOL, add_bos)
    kv.setdefault("tokenizer.chat_template", GGUFValue(T_STRING, FALLBACK_TEMPLATES[shape.config.arch]))
    return kv


def _add_metadata(w: GGUFWriter, shape: SynthShape, name: str, weight_type: str) -> None:
    c, a = shape.config, shape.config.arch
    w.add_name(f"mpillama synthetic {name}")
    file_types = {"q40": LlamaFileType.MOSTLY_Q4_0, "q80": LlamaFileType.MOSTLY_Q8_0, "q4_k": LlamaFileType.MOSTLY_Q4_K_S,
                  "q5_k": LlamaFileType.MOSTLY_Q5_K_S, "q6_k": LlamaFileType.MOSTLY_Q6_K,
                  "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M}
    w.add_file_type(file_types.get(weight_type, LlamaFileType.ALL_F32))
    if weight_type != "f32":
        w.add_quantization_version(2)
    # the architecture's keys, as formats/gguf.py's gguf_config reads them back
    uint32 = {
        "vocab_size": c.vocab_size, "context_length": c.seq_len, "embedding_length": c.dim,
        "block_count": c.n_layers, "feed_forward_length": c.hidden_dim, "attention.head_count": c.n_heads,
        "attention.head_count_kv": c.n_kv_heads, "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim, "rope.dimension_count": c.head_dim,
    }
    if c.is_moe:
        uint32.update({"expert_count": c.n_experts, "expert_used_count": c.n_experts_used,
                       "expert_feed_forward_length": c.expert_hidden_dim})  # fmt: skip
    for key, value in uint32.items():
        w.add_uint32(f"{a}.{key}", value)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", c.norm_eps)
    w.add_float32(f"{a}.rope.freq_base", c.rope_theta)
    for key, v in _tokenizer_kv(shape).items():
        w.add_key_value(key, v.get(), v.vtype, v.sub_type)


def _pad(f: BinaryIO, alignment: int) -> None:
    f.write(b"\0" * (-f.tell() % alignment))


def write_synthetic(shape: str, out: str | Path, weight_type: str = "q40", seed: int = 0) -> Path:
    """Write a random-weight GGUF of a named shape to `out` (via out + '.part', renamed when complete)."""
    if shape not in SHAPES:
        raise MpillamaError(f"unknown synthetic shape {shape!r}: choose one of {', '.join(SHAPES)}")
    return write_shape(SHAPES[shape], out, weight_type, seed, name=shape)


def write_shape(s: SynthShape, out: str | Path, weight_type: str = "q40", seed: int = 0, name: str = "custom") -> Path:
    """write_synthetic for any SynthShape (tests use variants of the named ones)."""
    if weight_type not in WEIGHT_TYPES:
        raise MpillamaError(f"synthetic weight type {weight_type!r}: choose one of {', '.join(WEIGHT_TYPES)}")
    out = Path(out)
    plan = tensor_plan(s)
    if weight_type in K_TYPES or weight_type == "q4_k_m":
        narrow = [p.name for p in plan if p.is_matrix and p.shape[-1] % QK_K]
        if narrow:
            raise MpillamaError(f"--type {weight_type} stores rows in super-blocks of {QK_K} values, and {name}'s "
                                f"{narrow[0]} has {dict((p.name, p.shape[-1]) for p in plan)[narrow[0]]} columns: "
                                "use a shape whose widths are multiples of 256 (tiny-256 for tests)")
    with atomic_write(out) as part:
        w = GGUFWriter(part, s.config.arch)
        try:
            _add_metadata(w, s, name, weight_type)
            for p in plan:
                qtype = _ggml_type(p, weight_type, s.config.n_layers)
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p, qtype), raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            assert w.fout is not None
            f = w.fout[0]
            # tensor data: each tensor starts aligned, as the offsets written in the tensor infos say
            for p in plan:
                qtype = _ggml_type(p, weight_type, s.config.n_layers)
                _pad(f, w.data_alignment)
                start = f.tell()
                for chunk in _chunks(p, s, qtype, seed):
                    f.write(np.ascontiguousarray(chunk).tobytes())
                assert f.tell() - start == _nbytes(p, qtype), f"{p.name}: wrote {f.tell() - start} bytes"
            _pad(f, w.data_alignment)
        finally:
            w.close()
    return out


def with_config(shape: SynthShape, **changes: object) -> SynthShape:
    """A copy of a shape with config fields changed (tests use it for variants)."""
    return dataclasses.replace(shape, config=dataclasses.replace(shape.config, **changes))  # type: ignore[arg-type]
