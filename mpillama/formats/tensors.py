"""What every model-file reader shares: tensor descriptions, the tensors a config needs, and
reading a tensor's rows/columns out of a memory map as f32 or as Q40 bytes.

Owns: TensorInfo, the canonical tensor names and shapes (expected_tensors), the checks that a
file holds them with usable numbers (check_tensors: layer count, shapes, finite positive settings;
check_disjoint: no two tensors share bytes; check_vectors: finite, non-zero norms), TensorData
(where one tensor's bytes are in a mapped file) with read_f32 / read_q40 over any stored kind (a
NaN or infinity read, or a Q4_0 block scale that is one, is an error naming the tensor: nothing
non-finite reaches the kernels), the pairs/halves row permutations of q/k, and
the Llama 3.1 rope-factor formula used to recognise GGUF rope_freqs tensors.

Imports numpy, gguf (for dequantizing types mpillama does not run natively), mpillama.quant
and mpillama.config/errors/files. Never mpi4py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpillama.config import ModelConfig, RopeScaling
from mpillama.errors import MpillamaError
from mpillama.files import about, reading
from mpillama.mpienv import launched_rank
from mpillama.output import say
from mpillama.quant import (
    Q40_BLOCK_BYTES,
    Q80_BLOCK_BYTES,
    QK,
    dequantize_q40,
    dequantize_q80,
    quantize_q40,
    rope_frequencies_ref,
)

# rows converted per step when a whole tensor is converted, to bound temporary memory
_CHUNK_VALUES = 1 << 24
Q40_MAX = 8 * 65504.0  # largest |value| a Q4_0 block holds: 8 times the largest f16 scale


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a reader sees it. shape is in math orientation: (rows=out, cols=in), or (n,)."""

    name: str
    kind: str  # 'f32'|'f16'|'bf16'|'q40'|'q80' or a GGUF type name ('Q6_K', ...)
    shape: tuple[int, ...]


def row_bytes(kind: str, cols: int, block: tuple[int, int] | None = None) -> int:
    """Bytes of one stored row of `cols` values. `block` = (values, bytes) for foreign kinds."""
    if kind == "f32":
        return 4 * cols
    if kind in ("f16", "bf16"):
        return 2 * cols
    if kind == "q40":
        return cols // QK * Q40_BLOCK_BYTES
    if kind == "q80":
        return cols // QK * Q80_BLOCK_BYTES
    assert block is not None, f"row_bytes: kind {kind} needs its (block values, block bytes)"
    return cols // block[0] * block[1]


def block_of(kind: str, block: tuple[int, int] | None = None) -> tuple[int, int]:
    """(values, bytes) of one stored block of this kind (floats: one value). `block` for foreign kinds."""
    known = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q40": (QK, Q40_BLOCK_BYTES), "q80": (QK, Q80_BLOCK_BYTES)}
    if kind in known:
        return known[kind]
    assert block is not None, f"block_of: kind {kind} needs its (block values, block bytes)"
    return block


def type_name(kind: str, ggml_type: int | None) -> str:
    """The GGML name of a stored kind, as users know it from llama.cpp ('Q8_0', 'Q6_K', 'F16')."""
    if ggml_type is not None:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    return {"q40": "Q4_0", "q80": "Q8_0"}.get(kind, kind.upper())


# ---------------------------------------------------------------- what a config needs


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor the forward pass reads (output absent when tied)."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd": (cfg.vocab_size, cfg.dim),
        "output_norm": (cfg.dim,),
    }
    if not cfg.tied_embeddings:
        shapes["output"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        shapes[b + "attn_norm"] = (cfg.dim,)
        shapes[b + "attn_q"] = (cfg.q_dim, cfg.dim)
        shapes[b + "attn_k"] = (cfg.kv_dim, cfg.dim)
        shapes[b + "attn_v"] = (cfg.kv_dim, cfg.dim)
        shapes[b + "attn_output"] = (cfg.dim, cfg.q_dim)
        if cfg.qk_norm:
            shapes[b + "attn_q_norm"] = (cfg.head_dim,)
            shapes[b + "attn_k_norm"] = (cfg.head_dim,)
        shapes[b + "ffn_norm"] = (cfg.dim,)
        if cfg.is_moe:
            shapes.update(expert_tensors(cfg, i))
            continue
        shapes[b + "ffn_gate"] = (cfg.hidden_dim, cfg.dim)
        shapes[b + "ffn_up"] = (cfg.hidden_dim, cfg.dim)
        shapes[b + "ffn_down"] = (cfg.dim, cfg.hidden_dim)
    return shapes


EXPERT_PARTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # GGUF's names of the stacked expert tensors


def expert_name(layer: int, part: str, expert: int) -> str:
    """Canonical name of one expert's 2-D matrix: blk.3.ffn_gate_exps.17. GGUF stores a layer's experts
    as one 3-D tensor and Hugging Face as one tensor per expert; readers serve both by this name."""
    return f"blk.{layer}.{part}.{expert}"


def expert_tensors(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """A mixture-of-experts layer's FFN tensors: the router and every expert's three matrices."""
    h = cfg.expert_hidden_dim
    shapes: dict[str, tuple[int, ...]] = {f"blk.{layer}.ffn_gate_inp": (cfg.n_experts, cfg.dim)}
    for e in range(cfg.n_experts):
        shapes[expert_name(layer, "ffn_gate_exps", e)] = (h, cfg.dim)
        shapes[expert_name(layer, "ffn_up_exps", e)] = (h, cfg.dim)
        shapes[expert_name(layer, "ffn_down_exps", e)] = (cfg.dim, h)
    return shapes


def check_tensors(path: Path, cfg: ModelConfig, tensors: dict[str, TensorInfo], hint: str = "",
                  layers_key: str = "n_layers") -> None:
    """The header's numbers are usable, the file holds exactly its layers, and every tensor the
    config needs exists with its shape; raise on the first that does not.

    The layers are counted before any per-layer work, so a damaged layer count (10^9) fails at
    once, and a count smaller than the file's (1 of 2 layers) is not silently half a model.
    layers_key: the header field that gave n_layers, for the message."""
    check_numbers(path, cfg)
    layers = sorted({int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()})
    if len(layers) != cfg.n_layers or layers != list(range(len(layers))):  # exactly blk.0 .. blk.{n_layers-1}
        held = f"layers {layers[0]}..{layers[-1]}" if layers else "no layers"
        raise MpillamaError(
            f"{path}: {layers_key} is {cfg.n_layers} but the file holds tensors for {held} ({len(layers)} layers): "
            f"header and tensors disagree; re-convert the model{hint}"
        )
    for name, shape in expected_tensors(cfg).items():
        info = tensors.get(name)
        if info is None:
            raise MpillamaError(
                f"{path}: tensor {name!r} is missing (the header describes a {cfg.arch} model with "
                f"{cfg.n_layers} layers{', untied output' if name == 'output' else ''}): "
                f"the file is incomplete or not a {cfg.arch} model; re-convert it{hint}"
            )
        if info.shape != shape:
            raise MpillamaError(
                f"{path}: tensor {name!r} has shape {info.shape} but the header implies {shape}: "
                f"header and tensors disagree; re-convert the model{hint}"
            )


# The warm-up runs a two-token pass and then a one-token pass (positions 0..2), so no context
# shorter than 3 can run; 1 or 2 positions would not hold even a one-token prompt and its answer.
MIN_CONTEXT = 3


def check_max_seq_len(n: int) -> None:
    """--max-seq-len (from the flag or a profile) is a context the warm-up can run."""
    if n < MIN_CONTEXT:
        raise MpillamaError(f"--max-seq-len {n} is too short: the smallest context mpillama runs is {MIN_CONTEXT} "
                            "positions")


def check_numbers(path: Path, cfg: ModelConfig) -> None:
    """The header's float settings are finite and positive and its context can run at all."""
    values = {"norm epsilon": cfg.norm_eps, "rope theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        values.update({"rope scaling factor": s.factor, "rope low_freq_factor": s.low_freq_factor,
                       "rope high_freq_factor": s.high_freq_factor,
                       "rope original context": s.original_max_position})  # fmt: skip
    for name, x in values.items():
        if not 0 < x < float("inf"):
            raise MpillamaError(f"{path}: {name} is {x}: it must be a positive number; the file is damaged, "
                                "re-convert the model")
    if cfg.rope_scaling is not None and not cfg.rope_scaling.high_freq_factor > cfg.rope_scaling.low_freq_factor:
        raise MpillamaError(f"{path}: rope high_freq_factor {cfg.rope_scaling.high_freq_factor} is not above "
                            f"low_freq_factor {cfg.rope_scaling.low_freq_factor}: the file is damaged; re-convert it")
    if cfg.seq_len < MIN_CONTEXT:
        raise MpillamaError(f"{path}: the model's context length is {cfg.seq_len}; mpillama needs at least "
                            f"{MIN_CONTEXT} positions: the file is damaged or not a usable model")


def check_vectors(path: Path, data: dict[str, TensorData]) -> None:
    """Norm weights (and rope factors) are finite, and no norm is all zeros (which zeroes its output).

    They are small (a few KB per layer) and every rank reads them whole, so all are checked at open;
    matrices are checked as each rank reads its slice (TensorData.read_f32 / read_q40)."""
    with reading(path, "the file is damaged; download or convert it again"):
        for name, d in data.items():
            if len(d.info.shape) != 1:
                continue
            x = d.read_f32()  # (n,) f32; raises for non-finite values
            if name.endswith("norm") and not x.any():
                raise MpillamaError(f"tensor {name!r} (norm weights at offset {d.offset}) is all zeros: "
                                    "the file is damaged; download or convert it again")


def config_error(path: Path, err: MpillamaError) -> MpillamaError:
    """A ModelConfig validation error, prefixed with the file it came from (once)."""
    return MpillamaError(about(path, str(err)))


# ---------------------------------------------------------------- q/k row layouts


def halves_to_pairs_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns a 'halves' q/k matrix into 'pairs' (llama.cpp's convert permute).

    Within each head, new row 2i is old row i and new row 2i+1 is old row i + head_dim/2, so
    rope on adjacent pairs of the result equals rope on halves of the original.
    """
    hd = n_rows // n_heads
    assert hd * n_heads == n_rows and hd % 2 == 0, f"{n_rows} rows do not split into {n_heads} even heads"
    idx = np.arange(n_rows).reshape(n_heads, 2, hd // 2).swapaxes(1, 2)  # (heads, hd/2, 2)
    return idx.reshape(-1)


def pairs_to_halves_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Inverse of halves_to_pairs_rows: the row order that undoes llama.cpp's permute."""
    return np.argsort(halves_to_pairs_rows(n_rows, n_heads))


# ---------------------------------------------------------------- rope scaling factors


def llama3_rope_factors(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """(head_dim//2,) f32: base frequency / scaled frequency, what llama.cpp stores as rope_freqs."""
    base = rope_frequencies_ref(head_dim, theta, None)
    return (base / rope_frequencies_ref(head_dim, theta, scaling)).astype(np.float32)


def fit_llama3_scaling(path: Path, factors: np.ndarray, head_dim: int, theta: float) -> RopeScaling | None:
    """Recognise a rope_freqs tensor as Llama 3.1 scaling (low 1, high 4, original 8192, as every Llama 3.x).

    Only the factors reach the forward pass, so any parameters that reproduce them are right.
    """
    factors = np.asarray(factors, np.float64)
    if np.allclose(factors, 1.0):
        return None
    guess = RopeScaling(float(round(factors.max(), 4)), 1.0, 4.0, 8192)
    if factors.shape == (head_dim // 2,):
        if np.allclose(llama3_rope_factors(head_dim, theta, guess), factors, rtol=1e-3):
            return guess
    raise MpillamaError(
        f"{path}: rope_freqs does not follow Llama 3.1 scaling (factor {guess.factor}, low 1, high 4, original 8192): "
        "mpillama runs no other rope variant; use a model converted from a Llama 3.x checkpoint"
    )


# ---------------------------------------------------------------- reading one tensor


def _span(s: slice | None, n: int, what: str) -> tuple[int, int]:
    if s is None:
        return 0, n
    start, stop, step = s.indices(n)
    assert step == 1, f"{what} slice {s} must have step 1"
    return start, max(start, stop)


@dataclass
class Notice:
    """Prints one line on stderr the first time it is triggered (one per file and stored type)."""

    text: str
    done: bool = False

    def __call__(self) -> None:
        if not self.done:
            say(launched_rank() or 0, self.text)  # every rank reads the same file: rank 0 says it
            self.done = True


@dataclass(frozen=True)
class TensorData:
    """Where one tensor's bytes are: a uint8 memory map of its file and an offset in it."""

    info: TensorInfo
    buf: np.ndarray = field(repr=False)  # (file_bytes,) uint8 memmap
    offset: int
    ggml_type: int | None = None  # for foreign kinds: the GGMLQuantizationType value
    block: tuple[int, int] | None = None  # for foreign kinds: (values, bytes) per block

    @property
    def rows(self) -> int:
        return self.info.shape[0] if len(self.info.shape) == 2 else 1

    @property
    def cols(self) -> int:
        return self.info.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.rows * row_bytes(self.info.kind, self.cols, self.block)

    def _raw(self) -> np.ndarray:
        """(rows, row_bytes) uint8 view of the mapped bytes (no copy)."""
        rb = row_bytes(self.info.kind, self.cols, self.block)
        return self.buf[self.offset : self.offset + self.rows * rb].reshape(self.rows, rb)

    def _spans(self, rows: slice | None, cols: slice | None) -> tuple[int, int, int, int]:
        if len(self.info.shape) == 1:
            assert cols is None, f"{self.info.name} is 1-D: slice it with rows=, not cols="
            r0, r1 = 0, 1
            c0, c1 = _span(rows, self.cols, self.info.name)
        else:
            r0, r1 = _span(rows, self.rows, self.info.name)
            c0, c1 = _span(cols, self.cols, self.info.name)
        return r0, r1, c0, c1

    def read_f32(self, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        """f32 copy of [rows, cols] ((n,) for 1-D tensors); touches only those rows of the map."""
        r0, r1, c0, c1 = self._spans(rows, cols)
        out = self._decode(r0, r1, c0, c1)  # (r, c) f32
        return out[0] if len(self.info.shape) == 1 else out

    def _decode(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """(r, c) f32 of [r0:r1, c0:c1]; a NaN or infinity stored there is an error naming the tensor."""
        out = self._values(r0, r1, c0, c1)
        if not np.isfinite(out).all():
            r, c = np.argwhere(~np.isfinite(out))[0]
            raise MpillamaError(f"tensor {self.info.name!r} ({self.info.kind}) holds {out[r, c]} at row {r0 + r}, "
                                f"column {c0 + c}: the file is damaged; download or convert it again")
        return out

    def _values(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        kind, raw = self.info.kind, self._raw()[r0:r1]
        if kind == "f32":
            return np.array(raw.view("<f4")[:, c0:c1], dtype=np.float32)
        if kind == "f16":
            return raw.view("<f2")[:, c0:c1].astype(np.float32)
        if kind == "bf16":
            bits = raw.view("<u2")[:, c0:c1].astype(np.uint32) << np.uint32(16)
            return bits.view(np.float32)
        if kind in ("q40", "q80"):
            # decode the whole blocks that cover [c0, c1), then cut
            b0, b1 = c0 // QK, -(-c1 // QK)
            bb = Q40_BLOCK_BYTES if kind == "q40" else Q80_BLOCK_BYTES
            blocks = np.ascontiguousarray(raw[:, b0 * bb : b1 * bb])
            vals = dequantize_q40(blocks) if kind == "q40" else dequantize_q80(blocks)
            return vals[:, c0 - b0 * QK : c1 - b0 * QK]
        from gguf.quants import dequantize

        assert self.ggml_type is not None, f"{self.info.name}: foreign kind {kind} without a GGML type"
        vals = dequantize(np.ascontiguousarray(raw), self.ggml_type).reshape(r1 - r0, self.cols)
        return np.array(vals[:, c0:c1], dtype=np.float32)

    def read_q40(
        self, rows: slice | None = None, cols: slice | None = None, notice: Notice | None = None, copy: bool = True
    ) -> np.ndarray:
        """uint8 (r, c//32*18) GGML Q4_0 bytes of [rows, cols]; unchanged bytes from a q40 source.

        copy=False: a q40 source's bytes are returned as a view of the map (a plain ndarray)."""
        r0, r1, c0, c1 = self._spans(rows, cols)
        assert c0 % QK == 0 and (c1 % QK == 0), f"{self.info.name}: Q40 columns [{c0}, {c1}) must be whole 32-blocks"
        if self.info.kind == "q40":
            mapped = self.read_raw(rows, cols)
            out = np.array(mapped) if copy else mapped
        else:
            if requantizes(self.info.kind) and notice is not None:
                notice()  # said once per stored type
            out = np.empty((r1 - r0, (c1 - c0) // QK * Q40_BLOCK_BYTES), np.uint8)  # (r, c//32*18) q40
            step = max(1, _CHUNK_VALUES // max(1, self.cols))
            for r in range(r0, r1, step):
                e = min(r1, r + step)
                values = self._decode(r, e, c0, c1)  # (e - r, c1 - c0) f32
                big = np.abs(values).max(initial=0.0)
                if big > Q40_MAX:  # its block scale would overflow f16 into infinity
                    raise MpillamaError(f"tensor {self.info.name!r} ({self.info.kind}) holds {big:.3g} in rows "
                                        f"{r}..{e - 1}, beyond what Q4_0 can hold ({Q40_MAX:g}): the file is damaged; "
                                        "download or convert it again")
                out[r - r0 : e - r0] = quantize_q40(values)
        return out[0] if len(self.info.shape) == 1 else out

    def read_raw(self, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        """uint8 (r, GGML bytes of c columns) of [rows, cols] as stored, not decoded: a view of the map.

        The columns must start and end on the stored type's block boundary. q40 and q80 block scales
        are checked finite (nothing non-finite reaches the kernels)."""
        r0, r1, c0, c1 = self._spans(rows, cols)
        kind = self.info.kind
        values, nbytes = block_of(kind, self.block)
        if c0 % values or c1 % values:
            raise MpillamaError(
                f"tensor {self.info.name!r} ({type_name(kind, self.ggml_type)}) columns [{c0}, {c1}) do not fall on "
                f"its blocks of {values} values: a slice of it must start and end on a block boundary "
                "(use --weight-type q40, or fewer ranks)"
            )
        mapped = np.asarray(self._raw()[r0:r1, c0 // values * nbytes : c1 // values * nbytes])
        if kind in ("q40", "q80"):
            self._check_block_scales(mapped, r0, c0, nbytes)
        return mapped

    def _check_block_scales(self, blocks: np.ndarray, r0: int, c0: int, nbytes: int) -> None:
        """Every Q4_0 / Q8_0 block scale (a little-endian f16 in the block's first 2 bytes) is finite.

        Only each scale's high byte is read, in place: an exponent of all ones there is infinity or
        NaN (0.23 s for the 700 MB of a 1B model, against 0.8 s for gathering whole scales)."""
        rows = blocks.reshape(blocks.shape[0], -1, nbytes)  # (r, blocks, 18 or 34) uint8
        bad = (rows[:, :, 1] & 0x7C) == 0x7C  # (r, blocks) bool
        if bad.any():
            r, b = np.argwhere(bad)[0]
            value = rows[r, b, :2].copy().view("<f2")[0]
            raise MpillamaError(
                f"tensor {self.info.name!r} ({self.info.kind}) has block scale {value} at row {r0 + r}, column "
                f"{c0 + QK * b}: the file is damaged; download or convert it again"
            )


def requantizes(kind: str) -> bool:
    """Whether reading a tensor of this kind as Q40 requantizes it (worth a notice): all but floats and q40."""
    return kind not in ("f32", "f16", "bf16", "q40")


KEPT_AS_STORED = "Q4_0, Q8_0"  # what --weight-type auto keeps as stored (kernels/weights.py); said in the notice


class MappedTensors:
    """What every reader shares: its tensors (TensorData over a memory map) read by name."""

    path: Path
    _data: dict[str, TensorData]
    _notices: dict[str, Notice] | None = None  # stored type -> its requantization notice, said once

    def _notice(self, d: TensorData) -> Notice:
        """The one-line notice for requantizing d's stored type to Q4_0: what is lost and what keeps it."""
        if self._notices is None:
            self._notices = {}
        name = type_name(d.info.kind, d.ggml_type)
        if name not in self._notices:
            keep = ("--weight-type auto keeps them as stored" if name in KEPT_AS_STORED.split(", ")
                    else f"mpillama keeps only {KEPT_AS_STORED} weights as stored")
            self._notices[name] = Notice(f"mpillama: {self.path}: requantizing {name} tensors to Q4_0 at load "
                                         f"(4.5 bits a weight: less precise than {name}; {keep})")
        return self._notices[name]

    def _tensor(self, name: str) -> TensorData:
        d = self._data.get(name)
        if d is None:
            raise MpillamaError(f"{self.path}: no tensor {name!r}; it has: {', '.join(list(self._data)[:8])}, ...")
        return d

    def read_f32(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        with reading(self.path, "the file is damaged; download or convert it again"):
            return self._tensor(name).read_f32(rows, cols)

    def read_q40(self, name: str, rows: slice | None = None, cols: slice | None = None,
                 copy: bool = True) -> np.ndarray:
        with reading(self.path, "the file is damaged; download or convert it again"):
            d = self._tensor(name)
            return d.read_q40(rows, cols, self._notice(d), copy)

    def read_raw(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        """uint8 GGML bytes of tensor[rows, cols] as stored (a view of the map); see TensorData.read_raw."""
        with reading(self.path, "the file is damaged; download or convert it again"):
            return self._tensor(name).read_raw(rows, cols)


def check_disjoint(path: Path, extents: dict[str, tuple[int, int]]) -> None:
    """No two tensors share bytes: name -> (offset, nbytes) in one file. A tensor table whose type
    or offset was damaged points one tensor into another's data; refuse it rather than run it."""
    spans = sorted((offset, offset + n, name) for name, (offset, n) in extents.items() if n)
    for (a0, a1, a), (b0, b1, b) in itertools.pairwise(spans):
        if b0 < a1:
            raise MpillamaError(
                f"{path}: tensors {a!r} [{a0}, {a1}) and {b!r} [{b0}, {b1}) share bytes from offset {b0}: "
                "the tensor table is damaged; download or convert the model again"
            )


def check_extent(path: Path, name: str, offset: int, nbytes: int, file_size: int) -> None:
    """A tensor's bytes [offset, offset+nbytes) lie inside the file, or say where it breaks."""
    if offset + nbytes > file_size:
        raise MpillamaError(
            f"{path}: truncated: tensor {name!r} needs bytes [{offset}, {offset + nbytes}) but the file ends at "
            f"{file_size}: the file is incomplete; download or convert it again"
        )


def map_file(path: Path) -> np.ndarray:
    """(file_bytes,) uint8 read-only memory map (an empty array for an empty file)."""
    if path.stat().st_size == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")
