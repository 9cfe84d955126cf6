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
    kind = weights.registered(tensors[group_tensors(tensors)["ffn_down"][0]].kind)
    return kind.name if kind is not None and kind.quantize is not None else "q40"


SPLIT_BLOCKS_KIND = "q80"  # what a slice of columns that would cut a stored block is kept as (finer than any K-quant)


def tensor_kinds(tensors: dict[str, Any], names: list[str], weight_type: str,
                 cols: tuple[int, int] | None = None) -> list[str]:
    """What each named tensor (its columns cols) is kept as in memory: 'f32' or a registered kind.

    --weight-type f32 / q40: that, for every tensor. auto: the stored type when the registry keeps
    it, else main_kind (requantized; Q4_0 with the reader's notice). F16/BF16/F32 matrices of a
    float file are requantized to q40. Tensors stacked into one matrix may differ (a Q4_K_M file's
    wq, wk in Q4_K and wv in Q6_K): each keeps its own (weights.pack_stack). A slice of columns
    that does not fall on the stored type's blocks (wo split by heads across more ranks than it has
    256-column blocks) is requantized to SPLIT_BLOCKS_KIND, whose 32-value blocks any head ends on."""
    if weight_type in ("f32", "q40"):
        return [weight_type] * len(names)
    assert weight_type == "auto", weight_type
    kinds = []
    for name in names:
        kind = weights.registered(tensors[name].kind)
        if kind is None:
            kinds.append(main_kind(tensors))
        elif cols is not None and (cols[0] % kind.block_values or cols[1] % kind.block_values):
            kinds.append(SPLIT_BLOCKS_KIND)
        else:
            kinds.append(kind.name)
    return kinds


def matrix_kind(tensors: dict[str, Any], names: list[str], weight_type: str) -> str:
    """What the named tensors, stacked, are kept as: their kind, or for a mixed stack the first
    tensor's (the largest, wq: what memory accounting and `inspect` count it as)."""
    return tensor_kinds(tensors, names, weight_type)[0]


GROUP_TENSORS = {  # partition.GROUPS -> the tensors of layer 0 stacked into that matrix
    "attn_qkv": ["blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v"], "attn_output": ["blk.0.attn_output"],
    "ffn_gate_up": ["blk.0.ffn_gate", "blk.0.ffn_up"], "ffn_down": ["blk.0.ffn_down"],
}
MOE_FFN_TENSORS = {  # the same for a mixture of experts: its first expert stands for all
    "ffn_gate_up": ["blk.0.ffn_gate_exps.0", "blk.0.ffn_up_exps.0"], "ffn_down": ["blk.0.ffn_down_exps.0"],
}


def group_tensors(tensors: dict[str, Any]) -> dict[str, list[str]]:
    """GROUP_TENSORS, with the first expert's tensors for the FFN of a mixture of experts."""
    return GROUP_TENSORS if "blk.0.ffn_down" in tensors else {**GROUP_TENSORS, **MOE_FFN_TENSORS}


def kept_kinds(tensors: dict[str, Any], weight_type: str) -> dict[str, Kept]:
    """partition.GROUPS -> what each group of matrices is kept as (from layer 0 and the header alone)."""
    head = "output" if "output" in tensors else "token_embd"
    names = {**group_tensors(tensors), "output": [head], "token_embd": ["token_embd"]}
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
               kinds: list[str]) -> list[np.ndarray]:
    """The named matrices' row ranges (and column range), in order, each as its kind (tensor_kinds):
    GGML bytes (views of the mapped file where it stores that kind, so that packing reads each byte
    once; requantized from other types) or f32 copies."""
    parts = []
    for i, (name, kind) in enumerate(zip(names, kinds, strict=True)):
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


def finish_matrix(parts: list[np.ndarray], kinds: list[str]) -> Any:
    """Row blocks -> the matrix this rank computes with: packed for their kinds' kernels, or f32 stacked."""
    if kinds[0] != "f32":
        return weights.pack_stack(kinds, parts)
    return np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts), dtype=np.float32)


def raw_shapes(tensors: dict[str, Any], names: list[str], rows: list[tuple[int, int]] | None,
               cols: tuple[int, int] | None, kinds: list[str]) -> list[tuple[tuple[int, int], Any]]:
    """Shape and dtype of each of read_parts' blocks, computed from the header alone."""
    out = []
    for i, (name, kind) in enumerate(zip(names, kinds, strict=True)):
        n_rows = rows[i][1] - rows[i][0] if rows is not None else tensors[name].shape[0]
        n_cols = cols[1] - cols[0] if cols is not None else tensors[name].shape[1]
        if kind != "f32":
            out.append(((n_rows, weights.KINDS[kind].row_bytes(n_cols)), np.uint8))
        else:
            out.append(((n_rows, n_cols), np.float32))
    return out


class FileSource:
    """A rank's slices read straight from its own copy of the model file."""

    def __init__(self, mf: ModelFile, weight_type: str) -> None:
        self.mf, self.weight_type = mf, weight_type

    def matrix(self, names: list[str], rows: list[tuple[int, int]] | None, cols: tuple[int, int] | None) -> Any:
        kinds = tensor_kinds(self.mf.tensors, names, self.weight_type, cols)
        return finish_matrix(read_parts(self.mf, names, rows, cols, kinds), kinds)

    def vector(self, name: str) -> np.ndarray:
        return self.mf.read_f32(name)

    def embedding(self) -> tuple[str, np.ndarray]:
        kind = matrix_kind(self.mf.tensors, ["token_embd"], self.weight_type)
        if kind == "f32":
            return "f32", self.mf.read_f32("token_embd")
        # GGML rows, a view of the map where stored so: embedding dequantizes only the prompt's rows
        # (pages), and the 140 MB table of a 128k vocabulary is neither copied at start-up nor private memory
        return kind, read_parts(self.mf, ["token_embd"], None, None, [kind])[0]


class SendingSource:
    """Rank 0 walks another rank's load order, reading each piece and sending it there."""

    def __init__(self, mf: ModelFile, weight_type: str, comm: Comm, dest: int) -> None:
        self.mf, self.weight_type, self.comm, self.dest = mf, weight_type, comm, dest
        self.sent = 0

    def _send(self, data: np.ndarray) -> None:
        self.comm.send(data, self.dest, TAG_WEIGHTS)
        self.sent += data.nbytes

    def matrix(self, names: list[str], rows: list[tuple[int, int]] | None, cols: tuple[int, int] | None) -> None:
        kinds = tensor_kinds(self.mf.tensors, names, self.weight_type, cols)
        for part in read_parts(self.mf, names, rows, cols, kinds):  # one message a tensor: kinds may differ
            self._send(np.ascontiguousarray(part))

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
        kinds = tensor_kinds(self.tensors, names, self.weight_type, cols)
        parts = [self._recv(shape, dtype) for shape, dtype in raw_shapes(self.tensors, names, rows, cols, kinds)]
        return finish_matrix(parts, kinds)

    def vector(self, name: str) -> np.ndarray:
        return self._recv(self.tensors[name].shape, np.float32)

    def embedding(self) -> tuple[str, np.ndarray]:
        kind = matrix_kind(self.tensors, ["token_embd"], self.weight_type)
        [(shape, dtype)] = raw_shapes(self.tensors, ["token_embd"], None, None, [kind])
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
                owns_residual = sync_kind != "star"
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
