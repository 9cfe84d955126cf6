"""Hugging Face folders: config.json + *.safetensors (single or sharded), read and (for tests) written.

Owns: turning config.json (LlamaForCausalLM / Qwen3ForCausalLM) into a ModelConfig, parsing
safetensors headers (8-byte little-endian header length, JSON, then data) over a memory map,
mapping Hugging Face tensor names to canonical ones, and write_hf(), which turns any ModelFile
into such a folder. numpy has no bfloat16 and the safetensors package cannot hand one over
without torch, so headers are parsed here and BF16 is widened by a 16-bit shift.

Hugging Face llama q/k rows are in the 'halves' rope layout (llama.cpp permutes them into
'pairs' when it converts to GGUF); qwen3 is 'halves' everywhere. The tokenizer (tokenizer.json)
is not read here: tokenizer_metadata() returns None.

Imports numpy and mpillama atomic/config/errors/files/formats.tensors. Never mpi4py.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mpillama.atomic import atomic_write
from mpillama.config import ModelConfig, RopeScaling
from mpillama.errors import MpillamaError
from mpillama.files import shown
from mpillama.formats.tensors import (
    MappedTensors,
    TensorData,
    TensorInfo,
    check_disjoint,
    check_tensors,
    check_vectors,
    config_error,
    expected_tensors,
    map_file,
    pairs_to_halves_rows,
)

ARCHS = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe"}
MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}
DTYPES = {"F32": ("f32", 4), "F16": ("f16", 2), "BF16": ("bf16", 2)}
INDEX_FILE = "model.safetensors.index.json"

# Hugging Face name (with {i} for the layer) -> canonical name
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",  # Qwen3 MoE: the router
}
# Qwen3 MoE: model.layers.{i}.mlp.experts.{e}.{projection} -> blk.{i}.{part}.{e} (formats.tensors.expert_name)
_EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def canonical_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q; unknown names are returned unchanged."""
    if not hf_name.endswith(".weight"):
        return hf_name
    base = hf_name[: -len(".weight")]
    if base in _TOP_NAMES:
        return _TOP_NAMES[base]
    parts = base.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        if parts[3] in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
        expert = parts[3].split(".")
        if len(expert) == 4 and expert[:2] == ["mlp", "experts"] and expert[2].isdigit() and expert[3] in _EXPERT_NAMES:
            return f"blk.{parts[2]}.{_EXPERT_NAMES[expert[3]]}.{int(expert[2])}"
    return hf_name


def hf_name(canonical: str) -> str:
    """Inverse of canonical_name for the tensors a model needs."""
    for hf, can in _TOP_NAMES.items():
        if canonical == can:
            return hf + ".weight"
    _, i, part = canonical.split(".", 2)
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    if part in inverse:
        return f"model.layers.{i}.{inverse[part]}.weight"
    part, e = part.split(".")
    return f"model.layers.{i}.mlp.experts.{e}.{ {v: k for k, v in _EXPERT_NAMES.items()}[part]}.weight"


# ---------------------------------------------------------------- config.json


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MpillamaError(f"{path}: cannot read it as JSON ({shown(str(e))}): fix or re-download the file") from None
    if not isinstance(data, dict):
        raise MpillamaError(f"{path}: expected a JSON object: fix or re-download the file")
    return data


class _Settings:
    """config.json values by the kind of JSON value they must be, with the key named when one is not."""

    def __init__(self, path: Path, c: dict[str, Any]) -> None:
        self.path, self.c = path, c

    def _bad(self, key: str, kind: str) -> MpillamaError:
        return MpillamaError(f"{self.path}: {key!r} is {shown(self.c[key])}, where config.json holds {kind}: "
                             "the file is damaged; fix or re-download it")

    def get(self, key: str, default: Any = None) -> Any:
        """The value, or default when missing or null (None: required)."""
        if self.c.get(key) is None:
            if default is None:
                raise MpillamaError(f"{self.path}: {key!r} is missing: the folder's config.json is incomplete; "
                                    "re-download it")
            return default
        return self.c[key]

    def int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(key, "an integer")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self._bad(key, "a finite number")
        return float(value)

    def typed(self, key: str, kind: type, default: Any) -> Any:
        value = self.get(key, default)
        if not isinstance(value, kind):
            raise self._bad(key, {list: "a list", dict: "an object", str: "a string", bool: "true or false"}[kind])
        return value


def hf_config(path: Path, c: dict[str, Any], has_lm_head: bool) -> ModelConfig:
    """ModelConfig from a parsed config.json (path: the file, for messages)."""
    cs = _Settings(path, c)
    architectures = cs.typed("architectures", list, [])
    model_type = c.get("model_type")
    by_type = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    arch = next((ARCHS[a] for a in architectures if isinstance(a, str) and a in ARCHS), by_type)
    if arch is None:
        raise MpillamaError(f"{path}: architecture {shown(architectures or model_type)}: mpillama runs "
                            "LlamaForCausalLM, Qwen3ForCausalLM and Qwen3MoeForCausalLM models")
    if c.get("hidden_act", "silu") != "silu":
        raise MpillamaError(f"{path}: hidden_act {shown(c['hidden_act'])}: mpillama runs silu models only")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise MpillamaError(f"{path}: the model has attention/mlp biases, which mpillama does not run")
    rope_params = _Settings(path, cs.typed("rope_parameters", dict, {}))  # newer transformers keep rope settings here
    dim, n_heads = cs.int("hidden_size"), cs.int("num_attention_heads")
    moe: dict[str, Any] = {}
    if arch == "qwen3moe":
        if cs.int("decoder_sparse_step", 1) != 1 or cs.typed("mlp_only_layers", list, []):
            raise MpillamaError(f"{path}: some layers are dense (decoder_sparse_step / mlp_only_layers): mpillama "
                                "runs Qwen3 MoE models whose every layer is a mixture of experts")
        # Qwen3MoeConfig's own defaults: norm_topk_prob false (Qwen3-30B-A3B's config.json sets it true)
        moe = dict(n_experts=cs.int("num_experts"), n_experts_used=cs.int("num_experts_per_tok"),
                   expert_hidden_dim=cs.int("moe_intermediate_size"),
                   norm_topk_prob=cs.typed("norm_topk_prob", bool, False))
    try:
        return ModelConfig(
            arch=arch,
            dim=dim,
            hidden_dim=cs.int("intermediate_size"),
            n_layers=cs.int("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=cs.int("num_key_value_heads", n_heads),
            # Qwen3's head_dim is its own setting (128 with dim 1024 and 16 heads), not dim / n_heads
            head_dim=cs.int("head_dim", dim // n_heads if n_heads > 0 else 0),
            vocab_size=cs.int("vocab_size"),
            seq_len=cs.int("max_position_embeddings"),
            norm_eps=cs.number("rms_norm_eps", 1e-6),
            rope_theta=cs.number("rope_theta", rope_params.number("rope_theta", 10000.0)),
            rope_style="halves",
            rope_scaling=_rope_scaling(path, cs.typed("rope_scaling", dict, {}) or rope_params.c),
            tied_embeddings=cs.typed("tie_word_embeddings", bool, False) and not has_lm_head,
            qk_norm=arch in ("qwen3", "qwen3moe"),
            **moe,
        )
    except MpillamaError as e:
        raise config_error(path, e) from None


def _rope_scaling(path: Path, s: dict[str, Any]) -> RopeScaling | None:
    kind = s.get("rope_type", s.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise MpillamaError(f"{path}: rope scaling type {shown(kind)}: mpillama runs 'llama3' scaling or none")
    rs = _Settings(path, s)
    return RopeScaling(
        factor=rs.number("factor"),
        low_freq_factor=rs.number("low_freq_factor"),
        high_freq_factor=rs.number("high_freq_factor"),
        original_max_position=rs.int("original_max_position_embeddings"),
    )


# ---------------------------------------------------------------- safetensors


def _is_ints(x: object, n: int | None = None) -> bool:
    """A JSON list of non-negative integers (of length n if given)."""
    return (isinstance(x, list) and (n is None or len(x) == n)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x))  # fmt: skip


def safetensors_entries(path: Path, buf: np.ndarray) -> dict[str, TensorData]:
    """HF name -> TensorData for one .safetensors file, every dtype, shape and extent checked."""
    size = len(buf)
    if size < 8:
        raise MpillamaError(f"{path}: truncated at offset 0: a safetensors file needs an 8-byte header length")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if 8 + n > size:
        raise MpillamaError(f"{path}: truncated: the header claims {n} bytes at offset 8 but the file ends at {size}: "
                            "the file is incomplete; download it again")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except ValueError as e:  # UnicodeDecodeError included
        raise MpillamaError(f"{path}: the safetensors header (offsets 8..{8 + n}) is not JSON ({shown(str(e))}): "
                            "the file is damaged or not safetensors") from None
    if not isinstance(header, dict):
        raise MpillamaError(f"{path}: the safetensors header (offsets 8..{8 + n}) is not a JSON object: "
                            "the file is damaged or not safetensors")
    out: dict[str, TensorData] = {}
    extents: dict[str, tuple[int, int]] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(e, dict) and _is_ints(e.get("shape")) and _is_ints(e.get("data_offsets"), 2)):
            raise MpillamaError(f"{path}: tensor {shown(name)} is described by {shown(e)}, not a dtype, a shape and "
                                "two data offsets: the file is damaged; download it again")
        dtype = e.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise MpillamaError(f"{path}: tensor {shown(name)} has dtype {shown(dtype)}: mpillama reads F32, F16 and "
                                "BF16 safetensors; convert the checkpoint to one of those")
        kind, item = DTYPES[dtype]
        shape = tuple(e["shape"])
        begin, end = e["data_offsets"]
        needs = math.prod(shape) * item
        if end - begin != needs:
            raise MpillamaError(f"{path}: tensor {shown(name)} spans bytes [{begin}, {end}) of the data but its shape "
                                f"{shape} needs {needs}: the file is damaged")
        if 8 + n + end > size:
            raise MpillamaError(f"{path}: truncated: tensor {shown(name)} needs bytes [{8 + n + begin}, {8 + n + end}) "
                                f"but the file ends at {size}: the file is incomplete; download it again")
        extents[name] = (8 + n + begin, needs)
        if len(shape) == 2 or len(shape) == 1:
            out[name] = TensorData(TensorInfo(canonical_name(name), kind, shape), buf, 8 + n + begin)
    check_disjoint(path, extents)
    return out


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise MpillamaError(f"{index}: no weight_map: the index is damaged; re-download it")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise MpillamaError(f"{missing[0]}: listed in {INDEX_FILE} but missing: download every shard")
        return files
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        raise MpillamaError(f"{folder}: no *.safetensors files next to config.json: download the weights")
    return files


class HFModel(MappedTensors):
    """A Hugging Face model folder opened for reading (each shard memory-mapped)."""

    format = "hf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        raw = _json(self.path / "config.json")
        self._data: dict[str, TensorData] = {}
        for shard in _shard_files(self.path):
            for name, d in safetensors_entries(shard, map_file(shard)).items():
                self._data[d.info.name] = d
        self.config = hf_config(self.path / "config.json", raw, "output" in self._data)
        self.tensors = {name: d.info for name, d in self._data.items()}
        check_tensors(self.path, self.config, self.tensors, hint=" (or download the missing shard)",
                      layers_key="num_hidden_layers in config.json")
        check_vectors(self.path, self._data)
        self.metadata: dict[str, object] = dict(raw)

    def tokenizer_metadata(self) -> dict[str, object] | None:
        return None

    def close(self) -> None:
        self._data = {}


# ---------------------------------------------------------------- writing (tests, conversions)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """f32 -> uint16 bfloat16 bit patterns, rounded to nearest even (as torch does)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype("<u2")


def _hf_config_json(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": [{v: k for k, v in ARCHS.items()}[cfg.arch]],
        "model_type": {v: k for k, v in MODEL_TYPES.items()}[cfg.arch],
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tied_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype],
    }
    if cfg.is_moe:
        out.update({"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.n_experts_used,
                    "moe_intermediate_size": cfg.expert_hidden_dim, "norm_topk_prob": cfg.norm_topk_prob,
                    "decoder_sparse_step": 1, "mlp_only_layers": []})  # fmt: skip
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position}  # fmt: skip
    return out


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "bf16":
        return to_bf16_bits(x).tobytes()
    return x.astype("<f2" if dtype == "f16" else "<f4").tobytes()


def write_hf(model: Any, folder: str | Path, dtype: str = "bf16", max_shard_bytes: int | None = None) -> Path:
    """Write any ModelFile as a Hugging Face folder (config.json + safetensors; sharded with an index
    when max_shard_bytes is given). Llama q/k rows in 'pairs' order are put back into 'halves',
    the inverse of llama.cpp's convert permute. No tokenizer files are written."""
    if dtype not in ("bf16", "f16", "f32"):
        raise MpillamaError(f"safetensors dtype {dtype!r}: choose bf16, f16 or f32")
    cfg: ModelConfig = model.config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    item = 4 if dtype == "f32" else 2
    names = list(expected_tensors(cfg))
    sizes = {n: int(np.prod(model.tensors[n].shape)) * item for n in names}
    shards: list[list[str]] = [[]]
    for n in names:
        if max_shard_bytes and shards[-1] and sum(sizes[m] for m in shards[-1]) + sizes[n] > max_shard_bytes:
            shards.append([])
        shards[-1].append(n)
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])  # fmt: skip
    for file, group in zip(files, shards):
        _write_safetensors(model, folder / file, group, dtype, sizes)
    if len(shards) > 1:
        weight_map = {hf_name(n): f for f, g in zip(files, shards) for n in g}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(_hf_config_json(cfg, dtype), indent=2))
    return folder


def _write_safetensors(model: Any, path: Path, names: list[str], dtype: str, sizes: dict[str, int]) -> None:
    cfg: ModelConfig = model.config
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in names:
        header[hf_name(n)] = {"dtype": dtype.upper(), "shape": list(model.tensors[n].shape),
                              "data_offsets": [offset, offset + sizes[n]]}  # fmt: skip
        offset += sizes[n]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the safetensors writer pads
    with atomic_write(path) as part, open(part, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for n in names:
            x = model.read_f32(n)  # (rows, cols) or (n,) f32
            if cfg.arch == "llama" and cfg.rope_style == "pairs" and n.endswith((".attn_q", ".attn_k")):
                heads = cfg.n_heads if n.endswith(".attn_q") else cfg.n_kv_heads
                x = x[pairs_to_halves_rows(x.shape[0], heads)]
            f.write(_encode(x, dtype))
