"""Where each rank's weight slices come from.

--weights mmap (default): every rank opens the model file (every host has a copy) and reads
only the rows and columns of its own slice. --weights scatter: only rank 0 opens the file;
it reads every other rank's slices and sends them in --chunk-bytes pieces, one rank after
another, so no host but rank 0 needs the file.

Either way a rank ends up with the same arrays: a registered weight kind laid out for its kernel
(kernels/weights.py), or f32. matrix_kind decides which from --weight-type and the stored types,
from the header alone, so a rank that receives its slices knows their shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpillama.comm import TAG_WEIGHTS, Comm
from mpillama.output import end_job
from mpillama.config import ModelConfig, RunConfig
from mpillama.errors import MpillamaError
from mpillama.formats import ModelFile, open_model
from mpillama.kernels import weights
from mpillama.model import load_weights
from mpillama.partition import F32, Kept, Slice
from mpillama.quant import QK


_CHUNK_VALUES = 1 << 24  # values requantized per step: bounds the temporary f32 rows


def main_kind(tensors: dict[str, Any]) -> str:
    """The kind a model's other tensors are requantized to under auto: its FFN matrices' stored kind when
    that is registered with a quantizer (a Q8_0 .m file's f32 embedding becomes Q8_0), else q40."""
    kind = weights.registered(tensors["blk.0.ffn_down"].kind)
    return kind.name if kind is not None and kind.quantize is not None else "q40"


def matrix_kind(tensors: dict[str, Any], names: list[str], weight_type: str) -> str:
    """What the named tensors, stacked, are kept as in memory: 'f32' or a registered kind.

    --weight-type f32 / q40: that, for every tensor. auto: the stored type when the registry keeps
    it and all the stacked tensors share it (a matrix has one kernel), else main_kind (requantized;
    Q4_0 with the reader's notice). F16/BF16/F32 matrices of a float file are requantized to q40."""
    if weight_type in ("f32", "q40"):
        return weight_type
    assert weight_type == "auto", weight_type
    stored = {weights.kind_name(tensors[n].kind) for n in names}
    kind = stored.pop()
    return kind if not stored and kind in weights.KINDS else main_kind(tensors)


GROUP_TENSORS = {  # partition.GROUPS -> the tensors of layer 0 stacked into that matrix
    "attn_qkv": ["blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v"], "attn_output": ["blk.0.attn_output"],
    "ffn_gate_up": ["blk.0.ffn_gate", "blk.0.ffn_up"], "ffn_down": ["blk.0.ffn_down"],
}


def kept_kinds(tensors: dict[str, Any], weight_type: str) -> dict[str, Kept]:
    """partition.GROUPS -> what each group of matrices is kept as (from layer 0 and the header alone)."""
    head = "output" if "output" in tensors else "token_embd"
    names = {**GROUP_TENSORS, "output": [head], "token_embd": ["token_embd"]}
    out = {}
    for group, group_names in names.items():
        kind = matrix_kind(tensors, group_names, weight_type)
        w = weights.KINDS.get(kind)
        out[group] = F32 if w is None else Kept(kind, w.block_values, w.block_bytes)
    return out


def describe_kinds(kinds: dict[str, Kept]) -> str:
    """'q80', or 'q40, output q80' when groups differ: what the start-up line says the weights are kept as."""
    main = kinds["ffn_down"].kind
    others = [f"{g} {k.kind}" for g, k in kinds.items() if k.kind != main]
    return ", ".join([main, *others])


def ffn_unit(tensors: dict[str, Any], weight_type: str) -> int:
    """FFN rows per unit of the slice plan: the block of w2's kept kind (its columns are sliced)."""
    return max(QK, kept_kinds(tensors, weight_type)["ffn_down"].block_values)


def _requantized(mf: ModelFile, name: str, rows: slice | None, cols: slice | None, kind: str) -> np.ndarray:
    """GGML rows of `kind` for tensor[rows, cols] stored as another type: decoded and quantized a chunk at a time."""
    quantize = weights.KINDS[kind].quantize
    assert quantize is not None, f"{kind} has no quantizer"
    r0, r1, _ = (rows or slice(None)).indices(mf.tensors[name].shape[0])
    step = max(1, _CHUNK_VALUES // mf.tensors[name].shape[1])
    return np.concatenate([quantize(mf.read_f32(name, slice(r, min(r1, r + step)), cols)) for r in range(r0, r1, step)])


def read_parts(mf: ModelFile, names: list[str], rows: list[tuple[int, int]] | None, cols: tuple[int, int] | None,
               kind: str) -> list[np.ndarray]:
    """The named matrices' row ranges (and column range), in order, as matrix_kind's kind: GGML bytes
    (views of the mapped file where it stores that kind, so that packing reads each byte once;
    Q4_0 requantized from other types) or f32 copies."""
    parts = []
    for i, name in enumerate(names):
        r = slice(*rows[i]) if rows is not None else None
        c = slice(*cols) if cols is not None else None
        if kind == "f32":
            parts.append(mf.read_f32(name, r, c))
        elif weights.kind_name(mf.tensors[name].kind) == kind:
            parts.append(mf.read_raw(name, r, c))
        elif kind == "q40":
            parts.append(mf.read_q40(name, r, c, copy=False))
        else:
            parts.append(_requantized(mf, name, r, c, kind))
    return parts


def finish_matrix(parts: list[np.ndarray], kind: str) -> Any:
    """Row blocks -> the matrix this rank computes with: the kind's, packed for its kernel, or f32 stacked."""
    if kind != "f32":
        return weights.pack(kind, parts)
    return np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts), dtype=np.float32)


def raw_shape(tensors: dict[str, Any], names: list[str], rows: list[tuple[int, int]] | None,
              cols: tuple[int, int] | None, kind: str) -> tuple[tuple[int, int], Any]:
    """Shape and dtype of read_parts' blocks stacked, computed from the header alone."""
    n_rows = sum(b - a for a, b in rows) if rows is not None else sum(tensors[n].shape[0] for n in names)
    n_cols = cols[1] - cols[0] if cols is not None else tensors[names[0]].shape[1]
    if kind != "f32":
        return (n_rows, weights.KINDS[kind].row_bytes(n_cols)), np.uint8
    return (n_rows, n_cols), np.float32


class FileSource:
    """A rank's slices read straight from its own copy of the model file."""

    def __init__(self, mf: ModelFile, weight_type: str) -> None:
        self.mf, self.weight_type = mf, weight_type

    def matrix(self, names: list[str], rows: list[tuple[int, int]] | None, cols: tuple[int, int] | None) -> Any:
        kind = matrix_kind(self.mf.tensors, names, self.weight_type)
        return finish_matrix(read_parts(self.mf, names, rows, cols, kind), kind)

    def vector(self, name: str) -> np.ndarray:
        return self.mf.read_f32(name)

    def embedding(self) -> tuple[str, np.ndarray]:
        kind = matrix_kind(self.mf.tensors, ["token_embd"], self.weight_type)
        if kind == "f32":
            return "f32", self.mf.read_f32("token_embd")
        # GGML rows, a view of the map where stored so: embedding dequantizes only the prompt's rows
        # (pages), and the 140 MB table of a 128k vocabulary is neither copied at start-up nor private memory
        return kind, read_parts(self.mf, ["token_embd"], None, None, kind)[0]


class SendingSource:
    """Rank 0 walks another rank's load order, reading each piece and sending it there."""

    def __init__(self, mf: ModelFile, weight_type: str, comm: Comm, dest: int) -> None:
        self.mf, self.weight_type, self.comm, self.dest = mf, weight_type, comm, dest
        self.sent = 0

    def _send(self, data: np.ndarray) -> None:
        self.comm.send(data, self.dest, TAG_WEIGHTS)
        self.sent += data.nbytes

    def matrix(self, names: list[str], rows: list[tuple[int, int]] | None, cols: tuple[int, int] | None) -> None:
        kind = matrix_kind(self.mf.tensors, names, self.weight_type)
        self._send(np.concatenate(read_parts(self.mf, names, rows, cols, kind)))

    def vector(self, name: str) -> None:
        self._send(self.mf.read_f32(name))

    def embedding(self) -> None:
        self._send(FileSource(self.mf, self.weight_type).embedding()[1])


class ReceivingSource:
    """A worker without the model file receives its slices from rank 0 in load order."""

    def __init__(self, tensors: dict[str, Any], weight_type: str, comm: Comm) -> None:
        self.tensors, self.weight_type, self.comm = tensors, weight_type, comm

    def _recv(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        # rank 0 serves the ranks one after another: waiting for our turn is not a timeout
        self.comm.recv(out, 0, TAG_WEIGHTS, timeout=None)
        return out

    def matrix(self, names: list[str], rows: list[tuple[int, int]] | None, cols: tuple[int, int] | None) -> Any:
        kind = matrix_kind(self.tensors, names, self.weight_type)
        shape, dtype = raw_shape(self.tensors, names, rows, cols, kind)
        return finish_matrix([self._recv(shape, dtype)], kind)

    def vector(self, name: str) -> np.ndarray:
        return self._recv(self.tensors[name].shape, np.float32)

    def embedding(self) -> tuple[str, np.ndarray]:
        kind = matrix_kind(self.tensors, ["token_embd"], self.weight_type)
        shape, dtype = raw_shape(self.tensors, ["token_embd"], None, None, kind)
        return kind, self._recv(shape, dtype)


class ModelSource:
    """The model as this rank sees it: its config, and where its slices come from."""

    def __init__(self, comm: Comm, mf: ModelFile | None, config: ModelConfig, tensors: dict[str, Any],
                 run: RunConfig) -> None:
        self.comm, self.mf, self.config, self.tensors, self.run = comm, mf, config, tensors, run

    def for_rank(self, slc: Slice, slices: list[Slice], sync_kind: str) -> Any:
        """Where this rank's slices come from; under scatter rank 0 first sends every other rank its own
        (with the norms and the embedding when sync_kind keeps the residual stream on every rank)."""
        wt = self.run.weight_type
        if self.run.weight_source == "mmap":
            assert self.mf is not None
            return FileSource(self.mf, wt)
        if self.comm.rank != 0:
            return ReceivingSource(self.tensors, wt, self.comm)
        assert self.mf is not None
        try:  # a failure here would leave the workers waiting: end the whole job
            for other in slices[1:]:
                owns_residual = sync_kind == "allreduce"
                load_weights(self.config, other, SendingSource(self.mf, wt, self.comm, other.rank), owns_residual)
        except Exception as e:
            end_job(MpillamaError(f"sending weights failed: {e}"), self.comm.rank, self.comm.size)
        return FileSource(self.mf, wt)

    def tokenizer(self, tokenizer_path: str | None) -> Any:
        from mpillama.tokenizer import load_tokenizer

        assert self.mf is not None
        return load_tokenizer(self.mf, tokenizer_path)


def open_weight_source(comm: Comm, path: str, run: RunConfig) -> ModelSource:
    """Open the model where this mode needs it (collective under scatter: rank 0 shares the header)."""
    if run.weight_source == "mmap":
        mf = open_model(path)
        return ModelSource(comm, mf, mf.config, mf.tensors, run)
    mf, header, error = None, None, None
    if comm.rank == 0:
        try:
            mf = open_model(path)
            header = (mf.config, mf.tensors)
        except MpillamaError as e:
            error = e
    comm.agree(error)
    config, tensors = comm.bcast_obj(header)
    return ModelSource(comm, mf, config, tensors, run)
