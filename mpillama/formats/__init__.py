"""Model files: open_model() picks a reader from the file's content and returns a ModelFile.

Owns: the ModelFile protocol every reader implements (gguf.GGUFModel, dllama.DllamaModel,
hf.HFModel), and format detection. Readers check magic, version, types and every tensor's
extent against the file length before anything is allocated, and check that every tensor the
ModelConfig needs exists with its shape; any error while opening becomes one line naming the file
(mpillama.files.reading). Tensors use canonical (GGUF) names without '.weight':
token_embd, output_norm, output (absent when tied), blk.{i}.attn_norm/attn_q/attn_k/attn_v/
attn_output[/attn_q_norm/attn_k_norm]/ffn_norm/ffn_gate/ffn_up/ffn_down; 2-D shapes are
(rows=out_features, cols=in_features).

Imports no mpi4py; readers are imported when a file of their format is opened.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Protocol

import numpy as np

from mpillama.config import ModelConfig
from mpillama.errors import MpillamaError
from mpillama.files import kind_of, reading
from mpillama.formats.tensors import TensorInfo, expected_tensors

__all__ = ["ModelFile", "TensorInfo", "expected_tensors", "open_model", "detect_format", "ACCEPTED"]

ACCEPTED = "GGUF (.gguf), distributed-llama model (.m), or a Hugging Face folder with config.json + *.safetensors"


class ModelFile(Protocol):
    path: Path
    format: str  # 'gguf' | 'dllama' | 'hf'
    config: ModelConfig
    tensors: dict[str, TensorInfo]
    metadata: dict[str, object]  # header key/values for `inspect` (big tokenizer arrays summarised)

    def read_f32(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        """f32 copy of tensor[rows, cols]: (r, c), or (n,) for 1-D tensors (slice those with rows=)."""
        ...

    def read_q40(self, name: str, rows: slice | None = None, cols: slice | None = None,
                 copy: bool = True) -> np.ndarray:
        """uint8 (r, c//32*18) GGML Q4_0 bytes of tensor[rows, cols]; cols must be whole 32-blocks.

        copy=False: a read-only view of the mapped file where the tensor is stored as Q4_0."""
        ...

    def read_raw(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        """uint8 GGML bytes of tensor[rows, cols] as stored, not decoded (a view of the map); the
        columns must fall on the stored type's block boundaries (an MpillamaError otherwise)."""
        ...

    def tokenizer_metadata(self) -> dict[str, object] | None:
        """GGUF: the tokenizer.* keys as Python values; other formats: None."""
        ...

    def close(self) -> None: ...


def detect_format(path: Path) -> str:
    """'gguf' | 'dllama' | 'hf' from the content (never the name), or an error saying what was found.

    What the path is comes first, from os.stat: a FIFO or a device is refused without opening it."""
    if kind_of(path, "model", f"give the path of a {ACCEPTED}") == "dir":
        if (path / "config.json").is_file():
            return "hf"
        raise MpillamaError(f"model {path} is a folder without config.json: give a {ACCEPTED}")
    from mpillama.formats.dllama import MODEL_MAGIC  # the .m layout's owner; numpy is all it costs

    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return "gguf"
    if len(head) == 4 and struct.unpack("<i", head)[0] == MODEL_MAGIC:
        return "dllama"
    found = f"magic {head!r}" if head else "an empty file"
    if path.suffix == ".safetensors":
        found += "; a .safetensors file is read from its folder: pass the folder holding it and config.json"
    raise MpillamaError(f"model {path}: unknown format ({found} at offset 0): mpillama reads a {ACCEPTED}")


def open_model(path: str | Path) -> ModelFile:
    """Open a model file or folder with the reader its content calls for."""
    path = Path(path)
    with reading(path, "the file is damaged or not a model mpillama reads; download or convert it again"):
        fmt = detect_format(path)
        if fmt == "gguf":
            from mpillama.formats.gguf import GGUFModel

            return GGUFModel(path)
        if fmt == "dllama":
            from mpillama.formats.dllama import DllamaModel

            return DllamaModel(path)
        from mpillama.formats.hf import HFModel

        return HFModel(path)
