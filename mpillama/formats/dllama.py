"""distributed-llama files: `.m` models (read and write) and `.t` tokenizers (read and write).

Owns the byte layouts, as distributed-llama's converter writes them and its loader reads them
(all little-endian int32 unless stated):

.m model:  magic 0xA00ABCD, header_size, then (key, value) int32 pairs up to header_size bytes
           (header_size counts the WHOLE header: magic and size included, so the pairs take
           header_size - 8 bytes and the first tensor starts at offset header_size). Keys:
           version 0, arch 1, dim 2, hidden_dim 3, n_layers 4, n_heads 5, n_kv_heads 6,
           n_experts 7, n_active_experts 8, vocab 9, seq_len 10, hidden_act 11 (1 silu),
           rope_theta 12 (an integer), weight_type 13 (0 f32, 1 f16, 2 q40, 3 q80),
           rope scaling 14 factor / 15 low / 16 high / 17 original seq len (integers),
           rope_type 18 (0 llama pairs, 1 falcon halves, 2 llama3.1 pairs + scaling),
           head_dim 19 (default dim / n_heads), norm_eps 20 (5 -> 1e-5, 6 -> 1e-6),
           moe_hidden_dim 21. Arch 0xABCD00 llama, 0xABCD01 qwen3 (always halves), 0xABCD02 qwen3-moe.
           Tensors follow back to back, no alignment: embedding (f32); per layer q, k, v, wo,
           w1 (gate), w2 (down), w3 (up) (qwen3-moe instead: the router (n_experts, dim) in f32, then
           per expert its w1, w2, w3 of moe_hidden_dim rows; distributed-llama always renormalises the
           top-k weights), [qwen3: q_norm, k_norm], norm_0 (attention), norm_1
           (ffn); final norm; wcls (always present, the embedding again when tied). Matrices are
           in the weight type, rows of (out_features); everything else f32. The file ends exactly
           after wcls. Llama q/k rows are permuted for adjacent-pair rope ('pairs').
.t tokenizer: magic 0x567124, header_size (whole header again), (key, value) pairs: version 0
           (must be 1), vocab_size 1, max_token_length 2, bos_id 3, eos_id 4 and chat_eos_id 6
           (older files: each adds an eos id), pad_id 5 (ignored), chat_template 7 (its byte
           length), chat_stop 8 (byte length of an ignored string that follows the header),
           n_eos_tokens 9, add_bos 10; then [chat_stop bytes], the chat template bytes,
           n_eos_tokens int32 eos ids, then per token: float32 score, uint32 length, bytes.
           The older magic 0x567123 has a fixed header (vocab_size, max_token_length, bos, eos, pad).

Imports numpy and mpillama atomic/config/errors/quant/formats.tensors. Never mpi4py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpillama.atomic import atomic_write
from mpillama.config import ModelConfig, RopeScaling
from mpillama.errors import MpillamaError
from mpillama.formats.tensors import (
    MappedTensors,
    TensorData,
    TensorInfo,
    check_tensors,
    check_vectors,
    config_error,
    expert_name,
    halves_to_pairs_rows,
    map_file,
    row_bytes,
)
from mpillama.quant import quantize_q80

MODEL_MAGIC = 0xA00ABCD
OLD_MODEL_MAGICS = (0xABCD00, 0xABCD01)
TOKENIZER_MAGIC = 0x567124
OLD_TOKENIZER_MAGIC = 0x567123

KEY_NAMES = {
    0: "version", 1: "arch", 2: "dim", 3: "hidden_dim", 4: "n_layers", 5: "n_heads", 6: "n_kv_heads",
    7: "n_experts", 8: "n_active_experts", 9: "vocab_size", 10: "seq_len", 11: "hidden_act",
    12: "rope_theta", 13: "weight_type", 14: "rope_scaling_factor", 15: "rope_scaling_low_freq_factor",
    16: "rope_scaling_high_freq_factor", 17: "rope_scaling_orig_max_seq_len", 18: "rope_type",
    19: "head_dim", 20: "norm_eps", 21: "moe_hidden_dim",
}  # fmt: skip
KEY_IDS = {name: k for k, name in KEY_NAMES.items()}
ARCH_IDS = {0xABCD00: "llama", 0xABCD01: "qwen3", 0xABCD02: "qwen3-moe"}
FLOAT_TYPES = {0: "f32", 1: "f16", 2: "q40", 3: "q80"}
ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1 = 0, 1, 2
HIDDEN_ACT_SILU = 1
NORM_EPS = {5: 1e-5, 6: 1e-6}


# ---------------------------------------------------------------- .m layout


def dllama_layout(cfg: ModelConfig, weight_kind: str) -> list[TensorInfo]:
    """Every tensor of a .m file in file order (wcls always present, as 'output')."""
    w, f = weight_kind, "f32"
    out = [TensorInfo("token_embd", f, (cfg.vocab_size, cfg.dim))]
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        out += [
            TensorInfo(b + "attn_q", w, (cfg.q_dim, cfg.dim)),
            TensorInfo(b + "attn_k", w, (cfg.kv_dim, cfg.dim)),
            TensorInfo(b + "attn_v", w, (cfg.kv_dim, cfg.dim)),
            TensorInfo(b + "attn_output", w, (cfg.dim, cfg.q_dim)),
        ]
        if cfg.is_moe:
            h = cfg.expert_hidden_dim
            out.append(TensorInfo(b + "ffn_gate_inp", f, (cfg.n_experts, cfg.dim)))
            for e in range(cfg.n_experts):
                out += [TensorInfo(expert_name(i, "ffn_gate_exps", e), w, (h, cfg.dim)),
                        TensorInfo(expert_name(i, "ffn_down_exps", e), w, (cfg.dim, h)),
                        TensorInfo(expert_name(i, "ffn_up_exps", e), w, (h, cfg.dim))]  # fmt: skip
        else:
            out += [
                TensorInfo(b + "ffn_gate", w, (cfg.hidden_dim, cfg.dim)),
                TensorInfo(b + "ffn_down", w, (cfg.dim, cfg.hidden_dim)),
                TensorInfo(b + "ffn_up", w, (cfg.hidden_dim, cfg.dim)),
            ]
        if cfg.qk_norm:
            out += [TensorInfo(b + "attn_q_norm", f, (cfg.head_dim,)),
                    TensorInfo(b + "attn_k_norm", f, (cfg.head_dim,))]  # fmt: skip
        out += [TensorInfo(b + "attn_norm", f, (cfg.dim,)), TensorInfo(b + "ffn_norm", f, (cfg.dim,))]
    out += [TensorInfo("output_norm", f, (cfg.dim,)), TensorInfo("output", w, (cfg.vocab_size, cfg.dim))]
    return out


def layer_bytes(cfg: ModelConfig, weight_kind: str) -> int:
    """Bytes of one layer's tensors in a .m file, from the config alone."""
    ffn = cfg.n_experts * cfg.expert_hidden_dim if cfg.is_moe else cfg.hidden_dim
    matrices = 2 * cfg.q_dim * cfg.dim + 2 * cfg.kv_dim * cfg.dim + 3 * ffn * cfg.dim
    vectors = 2 * cfg.dim + (2 * cfg.head_dim if cfg.qk_norm else 0) + cfg.n_experts * cfg.dim  # router: f32
    return row_bytes(weight_kind, matrices) + 4 * vectors


def _nbytes(info: TensorInfo) -> int:
    rows = info.shape[0] if len(info.shape) == 2 else 1
    return rows * row_bytes(info.kind, info.shape[-1])


# ---------------------------------------------------------------- .m reading


def read_dllama_header(path: Path, buf: np.ndarray) -> tuple[int, dict[str, int]]:
    """(header_size, {key name: value}) with magic, size and every key checked."""
    size = len(buf)
    if size < 8:
        raise MpillamaError(f"{path}: truncated at offset {size}: a distributed-llama header needs at least 8 bytes")
    magic, header_size = struct.unpack_from("<ii", buf, 0)
    if magic in OLD_MODEL_MAGICS:
        raise MpillamaError(f"{path}: old distributed-llama model format (magic {magic:#x}): "
                            "re-convert it with a current distributed-llama converter")
    if magic != MODEL_MAGIC:
        raise MpillamaError(f"{path}: not a distributed-llama model: magic {magic & 0xFFFFFFFF:#x} at offset 0, "
                            f"expected {MODEL_MAGIC:#x}: give a .m model (or use open_model, which detects the format)")
    if header_size < 8 or (header_size - 8) % 8:
        raise MpillamaError(f"{path}: header size {header_size} at offset 4 is not 8 + 8*k bytes: the file is damaged")
    if header_size > size:
        raise MpillamaError(f"{path}: truncated: the header claims {header_size} bytes but the file has {size}: "
                            "the file is incomplete; convert or download it again")
    values: dict[str, int] = {}
    for off in range(8, header_size, 8):
        key, value = struct.unpack_from("<ii", buf, off)
        if key not in KEY_NAMES:
            raise MpillamaError(f"{path}: unknown header key {key} at offset {off}: the file is damaged or "
                                "from a newer distributed-llama; re-convert it")
        values[KEY_NAMES[key]] = value
    return header_size, values


def dllama_config(path: Path, h: dict[str, int]) -> tuple[ModelConfig, str]:
    """(ModelConfig, weight kind) from header values, checking every enumerated value."""
    arch = ARCH_IDS.get(h.get("arch", -1))
    if arch is None:
        raise MpillamaError(f"{path}: unknown architecture id {h.get('arch', 'missing')} (key 1): "
                            "mpillama runs llama (0xABCD00), qwen3 (0xABCD01) and qwen3-moe (0xABCD02) models")
    moe: dict[str, object] = {}
    if arch == "qwen3-moe":
        arch = "qwen3moe"
        for key in ("n_experts", "n_active_experts", "moe_hidden_dim"):
            if key not in h:
                raise MpillamaError(f"{path}: a qwen3-moe header without {key} (key {KEY_IDS[key]}): "
                                    "the file is damaged; re-convert it")
        moe = dict(n_experts=h["n_experts"], n_experts_used=h["n_active_experts"],
                   expert_hidden_dim=h["moe_hidden_dim"], norm_topk_prob=True)
    elif h.get("n_experts", 0) > 0:
        raise MpillamaError(f"{path}: a {arch} header with n_experts {h['n_experts']} (key 7): only qwen3-moe "
                            "(0xABCD02) models have experts; the file is damaged, re-convert it")
    if "weight_type" not in h:
        raise MpillamaError(f"{path}: the header has no weight type (key 13): the file is damaged; re-convert it")
    kind = FLOAT_TYPES.get(h["weight_type"])
    if kind is None:
        raise MpillamaError(f"{path}: unknown float type {h['weight_type']} for weights (key 13): expected "
                            "0 f32, 1 f16, 2 q40 or 3 q80; re-convert the model")
    if h.get("hidden_act", HIDDEN_ACT_SILU) != HIDDEN_ACT_SILU:
        raise MpillamaError(f"{path}: hidden activation {h['hidden_act']} (key 11): mpillama runs silu (1) models only")
    eps = NORM_EPS.get(h.get("norm_eps", 5))
    if eps is None:
        raise MpillamaError(f"{path}: norm epsilon code {h['norm_eps']} (key 20): expected 5 (1e-5) or 6 (1e-6)")
    rope_type = h.get("rope_type", ROPE_LLAMA)
    if rope_type not in (ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1):
        raise MpillamaError(f"{path}: unknown rope type {rope_type} (key 18): expected 0 llama, 1 falcon, 2 llama3.1")
    scaling = None
    if rope_type == ROPE_LLAMA3_1:
        scaling = RopeScaling(
            factor=float(h.get("rope_scaling_factor", 1)),
            low_freq_factor=float(h.get("rope_scaling_low_freq_factor", 0)),
            high_freq_factor=float(h.get("rope_scaling_high_freq_factor", 0)),
            original_max_position=int(h.get("rope_scaling_orig_max_seq_len", 0)),
        )
    for key in ("dim", "hidden_dim", "n_layers", "n_heads", "vocab_size", "seq_len"):
        if key not in h:
            raise MpillamaError(f"{path}: the header has no {key} (key {KEY_IDS[key]}): "
                                "the file is damaged; re-convert it")
    n_heads = h["n_heads"]
    try:
        cfg = ModelConfig(
            arch=arch,
            dim=h["dim"],
            hidden_dim=h["hidden_dim"],
            n_layers=h["n_layers"],
            n_heads=n_heads,
            n_kv_heads=h.get("n_kv_heads", n_heads),
            head_dim=h.get("head_dim", 0) or h["dim"] // max(1, n_heads),
            vocab_size=h["vocab_size"],
            seq_len=h["seq_len"],
            norm_eps=eps,
            rope_theta=float(h.get("rope_theta", 10000)),
            # distributed-llama runs qwen3 with falcon (halves) rope whatever the header says
            rope_style="halves" if arch in ("qwen3", "qwen3moe") or rope_type == ROPE_FALCON else "pairs",
            rope_scaling=scaling,
            tied_embeddings=False,  # a .m always stores wcls
            qk_norm=arch in ("qwen3", "qwen3moe"),
            **moe,  # type: ignore[arg-type]
        )
    except MpillamaError as e:
        raise config_error(path, e) from None
    return cfg, kind


class DllamaModel(MappedTensors):
    """A distributed-llama .m file opened for reading (memory-mapped)."""

    format = "dllama"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._buf = map_file(self.path)  # (file_bytes,) uint8 memmap
        header_size, values = read_dllama_header(self.path, self._buf)
        self.config, kind = dllama_config(self.path, values)
        self.metadata: dict[str, object] = {"header_size": header_size, **values}
        self._data: dict[str, TensorData] = {}
        offset, size = header_size, len(self._buf)
        layers = self.config.n_layers * layer_bytes(self.config, kind)
        if layers > size - header_size:  # said before the layout is built (a damaged n_layers can be 2^31)
            raise MpillamaError(
                f"{self.path}: the header describes {self.config.n_layers} layers (n_layers, key 4) of "
                f"{layer_bytes(self.config, kind)} bytes but the file has {size - header_size} bytes after its header: "
                "the header is damaged or the file incomplete; convert or download it again"
            )
        for info in dllama_layout(self.config, kind):
            n = _nbytes(info)
            if offset + n > size:
                raise MpillamaError(
                    f"{self.path}: truncated: tensor {info.name!r} needs bytes [{offset}, {offset + n}) but the file "
                    f"ends at {size}: the file is incomplete or its header is wrong; convert or download it again"
                )
            self._data[info.name] = TensorData(info, self._buf, offset)
            offset += n
        if offset != size:
            raise MpillamaError(f"{self.path}: {size - offset} unexpected bytes after the last tensor "
                                f"(offset {offset}): the header does not describe this file; re-convert it")
        self.tensors = {name: d.info for name, d in self._data.items()}
        check_tensors(self.path, self.config, self.tensors)
        check_vectors(self.path, self._data)

    def tokenizer_metadata(self) -> dict[str, object] | None:
        return None

    def close(self) -> None:
        self._data, self._buf = {}, np.zeros(0, np.uint8)


# ---------------------------------------------------------------- .m writing


def _int_header_value(name: str, value: float) -> int:
    if not float(value).is_integer():
        raise MpillamaError(f"{name} = {value} cannot be stored in a distributed-llama header (integers only): "
                            "use GGUF for this model")
    return int(value)


def dllama_header(cfg: ModelConfig, weight_kind: str) -> bytes:
    """The .m header bytes for a config (see the module docstring)."""
    eps = {1e-5: 5, 1e-6: 6}.get(cfg.norm_eps)
    if eps is None:
        raise MpillamaError(f"norm_eps {cfg.norm_eps} cannot be stored in a distributed-llama header "
                            "(1e-5 or 1e-6 only): use GGUF for this model")
    values = {
        "version": 0,
        "arch": {"llama": 0xABCD00, "qwen3": 0xABCD01, "qwen3moe": 0xABCD02}[cfg.arch],
        "dim": cfg.dim, "hidden_dim": cfg.hidden_dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads, "n_experts": cfg.n_experts, "n_active_experts": cfg.n_experts_used,
        "vocab_size": cfg.vocab_size,
        "seq_len": cfg.seq_len, "hidden_act": HIDDEN_ACT_SILU,
        "rope_theta": _int_header_value("rope_theta", cfg.rope_theta),
        "weight_type": {v: k for k, v in FLOAT_TYPES.items()}[weight_kind],
    }  # fmt: skip
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        values["rope_scaling_factor"] = _int_header_value("rope scaling factor", s.factor)
        values["rope_scaling_low_freq_factor"] = _int_header_value("rope low_freq_factor", s.low_freq_factor)
        values["rope_scaling_high_freq_factor"] = _int_header_value("rope high_freq_factor", s.high_freq_factor)
        values["rope_scaling_orig_max_seq_len"] = s.original_max_position
    qwen = cfg.arch in ("qwen3", "qwen3moe")
    values["rope_type"] = ROPE_FALCON if qwen else ROPE_LLAMA3_1 if cfg.rope_scaling else ROPE_LLAMA
    values["head_dim"] = cfg.head_dim
    values["norm_eps"] = eps
    if cfg.is_moe:
        if not cfg.norm_topk_prob:
            raise MpillamaError("a mixture of experts without norm_topk_prob cannot be stored in a .m file "
                                "(distributed-llama always renormalises): use GGUF for this model")
        values["moe_hidden_dim"] = cfg.expert_hidden_dim
    pairs = b"".join(struct.pack("<ii", KEY_IDS[k], v) for k, v in values.items())
    return struct.pack("<ii", MODEL_MAGIC, 8 + len(pairs)) + pairs


def _encode(m: object, name: str, rows: slice, kind: str, row_order: np.ndarray | None) -> bytes:
    """Stored bytes of tensor[rows] of model m in `kind` (rows reordered first if asked)."""
    if row_order is not None:
        sel = row_order[rows]
        if kind == "q40":
            return m.read_q40(name)[sel].tobytes()  # type: ignore[attr-defined]
        x = m.read_f32(name)[sel]  # type: ignore[attr-defined]
    elif kind == "q40":
        return m.read_q40(name, rows=rows).tobytes()  # type: ignore[attr-defined]
    else:
        x = m.read_f32(name, rows=rows)  # type: ignore[attr-defined]
    if kind == "f16":
        return x.astype("<f2").tobytes()
    if kind == "q80":
        return quantize_q80(x).tobytes()
    return x.astype("<f4").tobytes()


def write_dllama(model: object, out: str | Path, weight_type: str | None = None) -> Path:
    """Write any ModelFile as a .m (weight_type f32|f16|q40|q80; None: q40 if its matrices are q40, else f32).

    Q40 sources give their bytes unchanged. Llama q/k rows end in the 'pairs' layout .m files
    use: a 'halves' source (Hugging Face) is permuted like distributed-llama's converter does.
    """
    cfg: ModelConfig = model.config  # type: ignore[attr-defined]
    tensors: dict[str, TensorInfo] = model.tensors  # type: ignore[attr-defined]
    if weight_type is None:
        weight_type = "q40" if tensors["blk.0.attn_q"].kind == "q40" else "f32"
    if weight_type not in FLOAT_TYPES.values():
        raise MpillamaError(f"distributed-llama weight type {weight_type!r}: "
                            f"choose one of {', '.join(FLOAT_TYPES.values())}")
    out = Path(out)
    header = dllama_header(cfg, weight_type)
    permute = cfg.arch == "llama" and cfg.rope_style == "halves"
    with atomic_write(out) as part, open(part, "wb") as f:
        f.write(header)
        for info in dllama_layout(cfg, weight_type):
            src = "token_embd" if info.name == "output" and "output" not in tensors else info.name
            order = None
            if permute and info.name.endswith(("attn_q", "attn_k")):
                heads = cfg.n_heads if info.name.endswith("attn_q") else cfg.n_kv_heads
                order = halves_to_pairs_rows(info.shape[0], heads)
            # a block of rows at a time bounds memory (a 128k x 4096 embedding is 2 GB in f32);
            # 1-D tensors and permuted q/k are small and go whole
            rows = info.shape[0]
            step = rows if len(info.shape) == 1 or order is not None else max(1, (1 << 22) // info.shape[1])
            for r in range(0, rows, step):
                f.write(_encode(model, src, slice(r, min(rows, r + step)), info.kind, order))
    return out


# ---------------------------------------------------------------- .t tokenizer


@dataclass
class DllamaVocab:
    """The content of a .t tokenizer file."""

    tokens: list[bytes]
    scores: list[float]
    bos_id: int
    eos_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None
    add_bos: bool = True
    max_token_length: int = 0  # 0: computed when written

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)


TOKENIZER_KEYS = {0: "version", 1: "vocab_size", 2: "max_token_length", 3: "bos_id", 4: "eos_id", 5: "pad_id",
                  6: "chat_eos_id", 7: "chat_template", 8: "chat_stop", 9: "n_eos_tokens", 10: "add_bos"}  # fmt: skip


class _Reader:
    """Sequential little-endian reads from a whole file, each checked against its length."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MpillamaError(f"{self.path}: truncated at offset {self.pos}: {what} needs {n} bytes but the file "
                                f"ends at {len(self.data)}: the file is incomplete; convert or download it again")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def unpack(self, fmt: str, what: str) -> tuple:  # type: ignore[type-arg]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def read_dllama_tokenizer(path: str | Path) -> DllamaVocab:
    """Read a .t file (either magic), checking every length against the file."""
    path = Path(path)
    if not path.is_file():
        raise MpillamaError(f"tokenizer {path} does not exist: give a distributed-llama .t file")
    r = _Reader(path, path.read_bytes())
    (magic,) = r.unpack("<i", "the magic")
    eos: list[int] = []
    template = None
    add_bos = True
    if magic == OLD_TOKENIZER_MAGIC:
        vocab_size, max_len, bos, eos_id, _pad = r.unpack("<IIiii", "the header")
        eos.append(eos_id)
    elif magic == TOKENIZER_MAGIC:
        (header_size,) = r.unpack("<i", "the header size")
        if header_size < 8 or (header_size - 8) % 8:
            raise MpillamaError(f"{path}: header size {header_size} at offset 4 is not 8 + 8*k bytes: "
                                "the file is damaged")
        h: dict[str, int] = {}
        for _ in range((header_size - 8) // 8):
            at = r.pos
            key, value = r.unpack("<ii", "a header key/value pair")
            if key not in TOKENIZER_KEYS:
                raise MpillamaError(f"{path}: unknown tokenizer header key {key} at offset {at}: the file is damaged "
                                    "or from a newer distributed-llama")
            if key in (4, 6):  # older files: single eos ids in the header
                eos.append(value)
            h[TOKENIZER_KEYS[key]] = value
        if h.get("version") != 1:
            raise MpillamaError(f"{path}: tokenizer version {h.get('version')}: mpillama reads version 1; "
                                "regenerate the tokenizer with a current distributed-llama converter")
        for key in ("vocab_size", "max_token_length", "bos_id"):
            if key not in h:
                raise MpillamaError(f"{path}: the tokenizer header has no {key}: the file is damaged")
        vocab_size, max_len, bos = h["vocab_size"], h["max_token_length"], h["bos_id"]
        r.take(h.get("chat_stop", 0), "the chat stop string")
        if h.get("chat_template", 0) > 0:
            template = r.take(h["chat_template"], "the chat template").decode("utf-8", errors="replace")
        n_eos = h.get("n_eos_tokens", 0)
        if n_eos < 0:
            raise MpillamaError(f"{path}: the header gives {n_eos} eos tokens (key 9): the file is damaged")
        eos += list(r.unpack(f"<{n_eos}i", "the eos token ids"))
        add_bos = h.get("add_bos", 1) == 1
    else:
        raise MpillamaError(f"{path}: not a distributed-llama tokenizer: magic {magic & 0xFFFFFFFF:#x} at offset 0, "
                            f"expected {TOKENIZER_MAGIC:#x}: give a .t file from distributed-llama's converter")
    if vocab_size <= 0 or vocab_size > len(r.data) // 8:
        raise MpillamaError(f"{path}: vocab_size {vocab_size} does not fit a {len(r.data)}-byte file: "
                            "the file is damaged")
    tokens, scores = [], []
    for i in range(vocab_size):
        score, n = r.unpack("<fI", f"the score and length of token {i}")
        tokens.append(r.take(n, f"token {i}"))
        scores.append(score)
    if r.pos != len(r.data):
        raise MpillamaError(f"{path}: {len(r.data) - r.pos} unexpected bytes after token {vocab_size - 1} "
                            f"(offset {r.pos}): the header's vocab_size does not match the file; "
                            "regenerate the tokenizer")
    if not 0 <= bos < vocab_size:
        raise MpillamaError(f"{path}: bos_id {bos} is outside the vocabulary of {vocab_size} tokens: "
                            "the file is damaged; regenerate the tokenizer")
    return DllamaVocab(tokens, scores, bos, eos, template, add_bos, max_len)


def write_dllama_tokenizer(vocab: DllamaVocab, path: str | Path) -> Path:
    """Write a .t file (magic 0x567124, version 1), the layout distributed-llama reads."""
    path = Path(path)
    if len(vocab.tokens) != len(vocab.scores):
        raise MpillamaError(f"tokenizer has {len(vocab.tokens)} tokens but {len(vocab.scores)} scores: "
                            "give one score per token")
    empty = next((i for i, t in enumerate(vocab.tokens) if not t), None)
    if empty is not None:
        raise MpillamaError(f"token {empty} is empty: distributed-llama tokenizers need every token to have bytes")
    template = vocab.chat_template.encode("utf-8") if vocab.chat_template else b""
    keys = [(3, vocab.bos_id), (0, 1), (1, len(vocab.tokens)),
            (2, vocab.max_token_length or max(len(t) for t in vocab.tokens))]  # fmt: skip
    if template:
        keys.append((7, len(template)))
    keys += [(9, len(vocab.eos_ids)), (10, 1 if vocab.add_bos else 0)]
    pairs = b"".join(struct.pack("<ii", k, v) for k, v in keys)
    body = [struct.pack("<ii", TOKENIZER_MAGIC, 8 + len(pairs)), pairs, template]
    body.append(struct.pack(f"<{len(vocab.eos_ids)}i", *vocab.eos_ids))
    body += [struct.pack("<fI", s, len(t)) + t for t, s in zip(vocab.tokens, vocab.scores)]
    with atomic_write(path) as part:
        part.write_bytes(b"".join(body))
    return path
