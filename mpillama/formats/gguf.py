"""GGUF model files: a checking header parser and the GGUFModel reader.

Owns: parsing the GGUF header (metadata key/values and tensor infos) with every read checked
against the file length, turning llama/qwen3 metadata into a ModelConfig, and reading tensors
from the memory map. Q4_0, Q8_0, F16, BF16 and F32 tensors are used as stored; any other type
the `gguf` package can dequantize is dequantized (and requantized to Q40 by read_q40, with a
one-line notice per file).

Why not gguf.GGUFReader: it builds one numpy view per string, so a file with a 128k-token
vocabulary takes ~9 s to open, and a damaged file fails with an IndexError or a reshape error
instead of the offset where it breaks. The `gguf` package is still used for its type tables,
its dequantizers, and (in synth.py) its writer. Imports nothing from mpillama but config,
errors, files, quant and formats.tensors.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from mpillama.config import ModelConfig, RopeScaling
from mpillama.errors import MpillamaError
from mpillama.files import shown
from mpillama.formats.tensors import (
    EXPERT_PARTS,
    MappedTensors,
    TensorData,
    TensorInfo,
    check_disjoint,
    check_extent,
    check_tensors,
    check_vectors,
    config_error,
    fit_llama3_scaling,
    map_file,
    row_bytes,
)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (the file format's numbering)
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(8, 13)
_SCALAR_FMT = {
    T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i",
    T_FLOAT32: "<f", T_BOOL: "<?", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d",
}  # fmt: skip
_NP_DTYPE = {
    T_UINT8: "<u1", T_INT8: "<i1", T_UINT16: "<u2", T_INT16: "<i2", T_UINT32: "<u4", T_INT32: "<i4",
    T_FLOAT32: "<f4", T_BOOL: "?", T_UINT64: "<u8", T_INT64: "<i8", T_FLOAT64: "<f8",
}  # fmt: skip
_KIND_OF_TYPE = {
    GGMLQuantizationType.F32: "f32",
    GGMLQuantizationType.F16: "f16",
    GGMLQuantizationType.BF16: "bf16",
    GGMLQuantizationType.Q4_0: "q40",
    GGMLQuantizationType.Q8_0: "q80",
}
ARCH_ROPE_STYLE = {"llama": "pairs", "qwen3": "halves", "qwen3moe": "halves"}  # GGUF llama rows are permuted for pairs
SMALL_ARRAY = 64  # longer arrays are summarised in `metadata` (the tokenizer tables)
MAX_KEY_BYTES = 65535  # the GGUF specification's limit on a metadata key
MAX_NAME_BYTES = 63  # llama.cpp's limit on a tensor name (GGML_MAX_NAME 64, with its terminating zero)
INT_TYPES = frozenset({T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_UINT64, T_INT64})
FLOAT_TYPES = frozenset({T_FLOAT32, T_FLOAT64})
TYPE_NAMES = {T_UINT8: "uint8", T_INT8: "int8", T_UINT16: "uint16", T_INT16: "int16", T_UINT32: "uint32",
              T_INT32: "int32", T_FLOAT32: "float32", T_BOOL: "bool", T_STRING: "string", T_ARRAY: "array",
              T_UINT64: "uint64", T_INT64: "int64", T_FLOAT64: "float64"}  # fmt: skip


@dataclass
class LazyStrings:
    """A string array left in the file until asked for (vocabularies are 100k+ strings)."""

    buf: np.ndarray = field(repr=False)
    offset: int
    count: int

    def decode(self) -> list[str]:
        mv, pos, out = memoryview(self.buf), self.offset, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(self.count):
            (n,) = unpack(mv, pos)
            out.append(bytes(mv[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace"))
            pos += 8 + n
        return out


@dataclass
class GGUFValue:
    """One metadata value with its GGUF type (sub_type: the element type of an array)."""

    vtype: int
    value: Any  # python scalar, str, np.ndarray (numeric array) or LazyStrings
    sub_type: int | None = None

    def get(self) -> Any:
        """The value as plain Python: scalars, str, list."""
        if isinstance(self.value, LazyStrings):
            self.value = self.value.decode()
        if isinstance(self.value, np.ndarray):
            return self.value.tolist()
        return self.value

    def count(self) -> int:
        if isinstance(self.value, LazyStrings):
            return self.value.count
        return len(self.value) if self.vtype == T_ARRAY else 1


@dataclass(frozen=True)
class GGUFTensorEntry:
    """One tensor info record: GGUF name, ggml type, ne (innermost first), data offset."""

    name: str
    ggml_type: int
    ne: tuple[int, ...]
    offset: int  # absolute, in the file
    info_offset: int  # where its record starts, for error messages


@dataclass
class GGUFHeader:
    version: int
    kv: dict[str, GGUFValue]
    tensors: list[GGUFTensorEntry]
    data_start: int
    alignment: int


class _Cursor:
    """Reads little-endian values from the mapped file, checking each read against its length."""

    def __init__(self, path: Path, buf: np.ndarray) -> None:
        self.path, self.buf, self.mv, self.size, self.pos = path, buf, memoryview(buf), len(buf), 0

    def need(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise MpillamaError(
                f"{self.path}: truncated at offset {self.pos}: {what} needs {n} bytes but the file ends at "
                f"{self.size}: the file is incomplete or damaged; download or convert it again"
            )
        start = self.pos
        self.pos += n
        return start

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = _SCALAR_FMT[vtype]
        start = self.need(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.mv, start)[0]

    def string(self, what: str, limit: int | None = None) -> str:
        at = self.pos
        n = self.scalar(T_UINT64, what + " length")
        if limit is not None and n > limit:
            raise MpillamaError(f"{self.path}: {what} at offset {at} is {n} bytes long; at most {limit} are allowed: "
                                "the file is damaged; download or convert it again")
        start = self.need(n, what)
        return bytes(self.mv[start : start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> GGUFValue:
        key = shown(key)
        if vtype in _SCALAR_FMT:
            return GGUFValue(vtype, self.scalar(vtype, f"value of {key}"))
        if vtype == T_STRING:
            return GGUFValue(vtype, self.string(f"value of {key}"))
        if vtype == T_ARRAY:
            at = self.pos
            sub = self.scalar(T_UINT32, f"element type of {key}")
            count = self.scalar(T_UINT64, f"length of {key}")
            if sub in _NP_DTYPE:
                dt = np.dtype(_NP_DTYPE[sub])
                start = self.need(count * dt.itemsize, f"{count} elements of {key}")
                return GGUFValue(vtype, np.frombuffer(self.buf, dt, count, start).copy(), sub)
            if sub == T_STRING:
                return GGUFValue(vtype, self._strings(key, count), sub)
            raise MpillamaError(
                f"{self.path}: metadata {key} at offset {at} is an array of type {sub}, which mpillama cannot "
                "read (nested arrays): the file is damaged or from a newer GGUF writer"
            )
        raise MpillamaError(
            f"{self.path}: metadata {key} has unknown value type {vtype} at offset {self.pos - 4}: "
            "the file is damaged or not a GGUF file mpillama understands"
        )

    def _strings(self, key: str, count: int) -> LazyStrings | list[str]:
        """Walk over `count` strings (checking lengths); keep long arrays lazy. key: quoted already."""
        if count * 8 > self.size - self.pos:  # each string has an 8-byte length: say so before walking them
            self.need(count * 8, f"{count} strings of {key}")
        start, pos, size, mv = self.pos, self.pos, self.size, self.mv
        unpack = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > size:
                break
            pos += 8 + unpack(mv, pos)[0]
        else:
            if pos <= size:
                self.pos = pos
                lazy = LazyStrings(self.buf, start, count)
                return lazy if count > SMALL_ARRAY else lazy.decode()
        raise MpillamaError(
            f"{self.path}: truncated at offset {min(pos, size)}: string {i} of {key} runs past the end of the "
            f"file ({size} bytes): the file is incomplete or damaged; download or convert it again"
        )


def read_gguf_header(path: Path, buf: np.ndarray | None = None) -> GGUFHeader:
    """Parse magic, version, metadata and tensor infos, checking every length and type."""
    path = Path(path)
    buf = map_file(path) if buf is None else buf
    cur = _Cursor(path, buf)
    cur.need(4, "the magic")
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise MpillamaError(f"{path}: not a GGUF file: magic {magic!r} at offset 0, expected b'GGUF': "
                            "give a .gguf model (or open it with open_model, which detects the format)")
    version = cur.scalar(T_UINT32, "the version")
    if version & 0xFFFF == 0 and version:
        raise MpillamaError(f"{path}: big-endian GGUF (version field {version:#x}): convert it to little-endian")
    if version not in SUPPORTED_VERSIONS:
        raise MpillamaError(f"{path}: GGUF version {version} at offset 4: mpillama reads versions 2 and 3; "
                            "re-convert the model with a current llama.cpp")
    n_tensors = cur.scalar(T_UINT64, "the tensor count")
    n_kv = cur.scalar(T_UINT64, "the metadata count")
    if n_tensors > cur.size // 24 or n_kv > cur.size // 12:
        raise MpillamaError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys, more than "
                            f"{cur.size} bytes can hold: the file is damaged")
    kv: dict[str, GGUFValue] = {}
    for _ in range(n_kv):
        at = cur.pos
        key = cur.string("a metadata key", MAX_KEY_BYTES)
        if key in kv:
            raise MpillamaError(f"{path}: metadata key {shown(key)} at offset {at} appears twice: the file is damaged")
        kv[key] = cur.value(cur.scalar(T_UINT32, f"the type of {shown(key)}"), key)
    entries = []
    for _ in range(n_tensors):
        at = cur.pos
        name = cur.string("a tensor name", MAX_NAME_BYTES)
        n_dims = cur.scalar(T_UINT32, f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise MpillamaError(f"{path}: tensor {name!r} (info at offset {at}) has {n_dims} dimensions: "
                                "GGUF allows 1 to 4; the file is damaged")
        ne = tuple(cur.scalar(T_UINT64, f"dimensions of {name!r}") for _ in range(n_dims))
        if min(ne) == 0 or int(np.prod(ne, dtype=object)) >= 2**63:
            raise MpillamaError(f"{path}: tensor {name!r} (info at offset {at}) has dimensions {ne}: "
                                "the file is damaged; download or convert it again")
        gtype = cur.scalar(T_UINT32, f"the type of {name!r}")
        rel = cur.scalar(T_UINT64, f"the data offset of {name!r}")
        entries.append((name, gtype, ne, rel, at))
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        alignment = int_value(path, "general.alignment", kv["general.alignment"])
    if alignment <= 0 or alignment & (alignment - 1):
        raise MpillamaError(f"{path}: general.alignment is {alignment}, not a power of two: the file is damaged")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = [GGUFTensorEntry(n, t, ne, data_start + rel, at) for n, t, ne, rel, at in entries]
    return GGUFHeader(version, kv, tensors, data_start, alignment)


# ---------------------------------------------------------------- tensors


def _kind(path: Path, e: GGUFTensorEntry) -> tuple[str, tuple[int, int]]:
    """(kind, (block values, block bytes)) of a tensor, or an error for types mpillama cannot read."""
    try:
        qtype = GGMLQuantizationType(e.ggml_type)
    except ValueError:
        raise MpillamaError(
            f"{path}: tensor {e.name!r} (info at offset {e.info_offset}) has unknown tensor type {e.ggml_type}: "
            "re-quantize the model to Q4_0, Q8_0, F16 or F32 with llama-quantize"
        ) from None
    block = GGML_QUANT_SIZES[qtype]
    if qtype in _KIND_OF_TYPE:
        return _KIND_OF_TYPE[qtype], block
    try:
        dequantize(np.zeros((1, block[1]), np.uint8), qtype)
    except (NotImplementedError, ValueError):
        raise MpillamaError(
            f"{path}: tensor {e.name!r} has type {qtype.name}, which mpillama cannot dequantize: "
            "re-quantize the model to Q4_0, Q8_0, F16 or F32 with llama-quantize"
        ) from None
    return qtype.name, block


def _canonical(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def gguf_tensors(path: Path, header: GGUFHeader, buf: np.ndarray) -> dict[str, TensorData]:
    """Canonical name -> TensorData, with every type known and every extent inside the file."""
    out: dict[str, TensorData] = {}
    extents: dict[str, tuple[int, int]] = {}
    for e in header.tensors:
        kind, block = _kind(path, e)
        if e.ne[0] % block[0]:
            raise MpillamaError(f"{path}: tensor {e.name!r} has rows of {e.ne[0]} values, not a multiple of its "
                                f"{kind} block of {block[0]}: the file is damaged")
        if (e.offset - header.data_start) % header.alignment:
            raise MpillamaError(f"{path}: tensor {e.name!r} data at offset {e.offset} is not aligned to "
                                f"{header.alignment} bytes: the file is damaged")
        shape = tuple(reversed(e.ne))
        name = _canonical(e.name)
        foreign = None if kind in _KIND_OF_TYPE.values() else e.ggml_type
        parts = [(name, shape, e.offset)]
        if len(shape) == 3 and name.rsplit(".", 1)[-1] in EXPERT_PARTS:
            # a layer's experts stacked (n_expert, rows, cols): served as one 2-D tensor per expert
            expert_bytes = shape[1] * row_bytes(kind, shape[2], block)
            parts = [(f"{name}.{x}", shape[1:], e.offset + x * expert_bytes) for x in range(shape[0])]
        elif len(shape) > 2:  # stored rows are what matter; fold the outer dimensions together
            parts = [(name, (int(np.prod(shape[:-1])), shape[-1]), e.offset)]
        for part_name, part_shape, offset in parts:
            if part_name in out:
                raise MpillamaError(f"{path}: tensor {e.name!r} (info at offset {e.info_offset}) appears twice: "
                                    "the file is damaged")
            out[part_name] = TensorData(TensorInfo(part_name, kind, part_shape), buf, offset, foreign, block)
        nbytes = int(np.prod(shape[:-1])) * row_bytes(kind, shape[-1], block)
        check_extent(path, e.name, e.offset, nbytes, len(buf))
        extents[e.name] = (e.offset, nbytes)
    check_disjoint(path, extents)
    return out


# ---------------------------------------------------------------- config


def _describe(v: GGUFValue) -> str:
    """A metadata value as a message shows it: its GGUF type and (shortened) value."""
    if v.vtype == T_ARRAY:
        return f"an array of {v.count()} {TYPE_NAMES.get(v.sub_type or -1, '?')}"
    return f"{TYPE_NAMES[v.vtype]} {shown(v.get())}"


def int_value(path: Path, key: str, v: GGUFValue) -> int:
    """An integer-typed metadata value (any GGUF integer width; not bool, float or string)."""
    if v.vtype not in INT_TYPES:
        raise MpillamaError(f"{path}: metadata {key!r} is {_describe(v)}, where GGUF stores an integer: "
                            "the file is damaged or not written by llama.cpp; re-convert it")
    return int(v.value)


def float_value(path: Path, key: str, v: GGUFValue) -> float:
    """A finite number (float or integer typed)."""
    if v.vtype not in FLOAT_TYPES | INT_TYPES or not math.isfinite(v.value):
        raise MpillamaError(f"{path}: metadata {key!r} is {_describe(v)}, where GGUF stores a finite number: "
                            "the file is damaged; re-convert it")
    return float(v.value)


def _get(path: Path, kv: dict[str, GGUFValue], key: str, kind: type, default: Any = None) -> Any:
    """Metadata `key` as `kind` (int, float or str); `default` when missing (None: required)."""
    v = kv.get(key)
    if v is None:
        if default is None:
            raise MpillamaError(f"{path}: metadata key {key!r} is missing: the file is not a complete "
                                "llama.cpp model; re-convert it with convert_hf_to_gguf.py")
        return default
    if v.vtype == T_ARRAY and v.sub_type in INT_TYPES | FLOAT_TYPES:
        raise MpillamaError(f"{path}: metadata {key!r} is a per-layer list, which mpillama does not run; "
                            "use a model with the same value in every layer")
    if kind is int:
        return int_value(path, key, v)
    if kind is float:
        return float_value(path, key, v)
    if v.vtype != T_STRING:
        raise MpillamaError(f"{path}: metadata {key!r} is {_describe(v)}, where GGUF stores a string: "
                            "the file is damaged; re-convert it")
    return v.value


def _tidy(x: float) -> float:
    """float32 header values as the decimal they were written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{float(x):.7g}")


def gguf_config(path: Path, kv: dict[str, GGUFValue], tensors: dict[str, TensorData]) -> ModelConfig:
    arch = _get(path, kv, "general.architecture", str)
    if arch not in ARCH_ROPE_STYLE:
        raise MpillamaError(f"{path}: architecture {shown(arch)}: mpillama runs llama, qwen3 and qwen3moe models")

    def key(name: str, default: Any = None, kind: type = int) -> Any:
        return _get(path, kv, f"{arch}.{name}", kind, default)

    dim, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", dim // max(1, n_heads))
    if key("attention.value_length", head_dim) != head_dim:
        raise MpillamaError(f"{path}: key_length {head_dim} differs from value_length: mpillama needs them equal")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise MpillamaError(f"{path}: rope.dimension_count differs from the head size {head_dim} (partial rope): "
                            "mpillama rotates whole heads only")
    embd = tensors.get("token_embd")
    if embd is None:
        raise MpillamaError(f"{path}: tensor 'token_embd' is missing: the file is incomplete or not a {arch} model; "
                            "re-convert it")
    vocab = embd.info.shape[0]  # the table is what the forward pass indexes (vocabularies may be padded)
    theta = _tidy(key("rope.freq_base", 10000.0, float))
    moe: dict[str, Any] = {}
    if arch == "qwen3moe":  # llama.cpp's qwen3moe graph always renormalises the top-k weights
        moe = dict(n_experts=key("expert_count"), n_experts_used=key("expert_used_count"),
                   expert_hidden_dim=key("expert_feed_forward_length"), norm_topk_prob=True)
    try:
        return ModelConfig(
            arch=arch,
            dim=dim,
            hidden_dim=key("feed_forward_length", moe.get("expert_hidden_dim")),
            n_layers=key("block_count"),
            n_heads=n_heads,
            n_kv_heads=key("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            vocab_size=vocab,
            seq_len=key("context_length"),
            norm_eps=_tidy(key("attention.layer_norm_rms_epsilon", 1e-5, float)),
            rope_theta=theta,
            rope_style=ARCH_ROPE_STYLE[arch],
            rope_scaling=_rope_scaling(path, arch, kv, tensors, head_dim, theta),
            tied_embeddings="output" not in tensors,
            qk_norm=arch in ("qwen3", "qwen3moe"),
            **moe,
        )
    except MpillamaError as e:
        raise config_error(path, e) from None


def _rope_scaling(
    path: Path, arch: str, kv: dict[str, GGUFValue], tensors: dict[str, TensorData], head_dim: int, theta: float
) -> RopeScaling | None:
    """Llama 3.1 scaling from {arch}.rope.scaling.* keys (type 'llama3'), else from a rope_freqs tensor.

    Other scaling types change the positions the model was trained on; running them unscaled would
    give wrong text, so they are refused (a 'linear' factor of 1 scales nothing and is accepted)."""
    p = f"{arch}.rope.scaling."
    kind = _get(path, kv, p + "type", str, "none")
    if kind == "llama3":
        return RopeScaling(
            factor=_tidy(_get(path, kv, p + "factor", float)),
            low_freq_factor=_tidy(_get(path, kv, p + "low_freq_factor", float)),
            high_freq_factor=_tidy(_get(path, kv, p + "high_freq_factor", float)),
            original_max_position=_get(path, kv, p + "original_context_length", int),
        )
    if kind not in ("none", "linear") or (kind == "linear" and _get(path, kv, p + "factor", float, 1.0) != 1.0):
        raise MpillamaError(f"{path}: rope scaling type {shown(kind)}{' with a factor' * (kind == 'linear')}: "
                            "mpillama runs Llama 3.1 ('llama3') rope scaling or none; use another model")
    if "rope_freqs" in tensors:
        return fit_llama3_scaling(path, tensors["rope_freqs"].read_f32(), head_dim, theta)
    return None


# ---------------------------------------------------------------- the reader


def _summary(v: GGUFValue) -> Any:
    if v.vtype == T_ARRAY and v.count() > SMALL_ARRAY:
        kind = "string" if v.sub_type == T_STRING else np.dtype(_NP_DTYPE[v.sub_type]).name  # type: ignore[index]
        return f"[{v.count()} x {kind}]"
    return v.get()


class GGUFModel(MappedTensors):
    """A GGUF file opened for reading: config, tensor table, and row/column reads from a memory map."""

    format = "gguf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._buf = map_file(self.path)  # (file_bytes,) uint8 memmap
        header = read_gguf_header(self.path, self._buf)
        self._kv = header.kv
        self._data = gguf_tensors(self.path, header, self._buf)
        self.config = gguf_config(self.path, self._kv, self._data)
        self.tensors = {name: d.info for name, d in self._data.items()}
        check_tensors(self.path, self.config, self.tensors, layers_key=f"{self.config.arch}.block_count")
        check_vectors(self.path, self._data)
        self.metadata: dict[str, object] = {"GGUF.version": header.version}
        self.metadata.update({k: _summary(v) for k, v in self._kv.items()})

    def tokenizer_metadata(self) -> dict[str, object] | None:
        return gguf_tokenizer_metadata(self._kv)

    def close(self) -> None:
        """Drop every reference to the memory map (views already returned keep it mapped)."""
        self._data, self._kv, self._buf = {}, {}, np.zeros(0, np.uint8)


def gguf_tokenizer_metadata(kv: dict[str, GGUFValue]) -> dict[str, object] | None:
    """The tokenizer.* keys as Python values, named without their prefix, plus short aliases.

    tokenizer.ggml.tokens -> 'tokens', tokenizer.ggml.bos_token_id -> 'bos_token_id',
    tokenizer.chat_template -> 'chat_template', ...; aliases: 'bos_id', 'eos_id', 'add_bos'.
    None when the file has no vocabulary.
    """
    if "tokenizer.ggml.tokens" not in kv:
        return None
    out: dict[str, object] = {}
    for key, v in kv.items():
        if key.startswith("tokenizer.ggml."):
            out[key[len("tokenizer.ggml.") :]] = v.get()
        elif key.startswith("tokenizer."):
            out[key[len("tokenizer.") :]] = v.get()
    out["bos_id"] = out.get("bos_token_id")
    out["eos_id"] = out.get("eos_token_id")
    out["add_bos"] = out.get("add_bos_token")
    return out
