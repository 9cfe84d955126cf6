"""Model shapes (ModelConfig) and run settings (RunConfig): the one home for defaults.

Readers in formats/ build a ModelConfig from a file header; the CLI builds a RunConfig
from flags and an optional profile. Both are frozen: nothing downstream edits them.
Imports nothing from the rest of the package but errors and files (for reading profiles).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpillama.errors import MpillamaError
from mpillama.files import kind_of, reading, shown

ARCHS = ("llama", "qwen3", "qwen3moe")  # qwen3moe: Qwen3 attention, a mixture-of-experts FFN
# How the two halves of a rotated pair sit in a head: "pairs" rotates (2i, 2i+1), the layout
# of GGUF llama and distributed-llama files; "halves" rotates (i, i + head_dim/2), the layout
# of Hugging Face checkpoints and of every Qwen model.
ROPE_STYLES = ("pairs", "halves")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (rope_type 'llama3')."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "qwen3" | "qwen3moe"
    dim: int  # residual stream width
    hidden_dim: int  # feed-forward width
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    seq_len: int  # the model's trained context
    norm_eps: float
    rope_theta: float
    rope_style: str  # see ROPE_STYLES
    rope_scaling: RopeScaling | None = None
    tied_embeddings: bool = False  # the output head reuses the embedding table
    qk_norm: bool = False  # Qwen3: rmsnorm over each q and k head before rope
    # Mixture of experts (Qwen3 MoE): every layer's FFN is n_experts SwiGLU experts of expert_hidden_dim
    # rows and a router choosing n_experts_used of them per token; 0 experts: a dense FFN of hidden_dim
    n_experts: int = 0
    n_experts_used: int = 0
    expert_hidden_dim: int = 0
    norm_topk_prob: bool = True  # the chosen experts' softmax weights renormalised to sum to 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise MpillamaError(f"unknown architecture {self.arch!r}: mpillama runs {', '.join(ARCHS)}")
        if self.rope_style not in ROPE_STYLES:
            raise MpillamaError(f"unknown rope style {self.rope_style!r} (expected one of {ROPE_STYLES})")
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise MpillamaError(f"model header has {name}={getattr(self, name)}: it must be positive")
        if self.n_heads % self.n_kv_heads:
            raise MpillamaError(
                f"model header has n_heads={self.n_heads} not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if (self.arch == "qwen3moe") != self.is_moe:
            raise MpillamaError(f"model header has architecture {self.arch} with {self.n_experts} experts: qwen3moe "
                                "models have experts and the others none")
        if self.n_experts and not 0 < self.n_experts_used <= self.n_experts:
            raise MpillamaError(f"model header has {self.n_experts_used} experts used per token of {self.n_experts}: "
                                "it must be between 1 and the expert count")
        if self.n_experts and self.expert_hidden_dim <= 0:
            raise MpillamaError(f"model header has expert_hidden_dim={self.expert_hidden_dim}: it must be positive")
        for name in ("dim", "hidden_dim", "head_dim", "expert_hidden_dim"):
            if getattr(self, name) % 32:
                raise MpillamaError(
                    f"model has {name}={getattr(self, name)}, not a multiple of 32 (one Q40 block): "
                    "mpillama cannot split it into Q40/Q80 blocks"
                )

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def ffn_dim(self) -> int:
        """Hidden rows of one FFN the ranks divide: the dense FFN's, or each expert's."""
        return self.expert_hidden_dim if self.is_moe else self.hidden_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads


def model_config_json(cfg: ModelConfig) -> str:
    """The model's shapes as JSON (a trace keeps them, so `trace project` needs no model file)."""
    return json.dumps(dataclasses.asdict(cfg))


def model_config_from_json(text: str) -> ModelConfig:
    """The inverse of model_config_json; fields this version does not know are ignored, missing ones
    take their defaults (a trace from another version)."""
    try:
        fields = json.loads(text)
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        fields = {k: v for k, v in fields.items() if k in known}
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        return ModelConfig(**fields)
    except (ValueError, TypeError, AttributeError) as e:
        raise MpillamaError(f"the recorded model shapes are not readable ({e}): pass --model FILE") from None


SYNC_KINDS = ("auto", "star", "allreduce", "replicated")  # auto: the fastest, measured at start-up
# replicated: allreduce of the FFN only; every rank computes the whole attention block (partition.plan)
FLAGS = {"weight_source": "weights"}  # RunConfig fields whose command-line flag is named otherwise
BUFFER_TYPES = ("q80", "f32")
WEIGHT_TYPES = ("auto", "q40", "f32")  # auto: each tensor as stored when a kernel runs it, else q40
WEIGHT_SOURCES = ("mmap", "scatter")  # --weights: every rank reads its own file copy, or rank 0 sends the slices


@dataclass(frozen=True)
class RunConfig:
    """How to run: everything that is not the model. Defaults live here and only here."""

    nthreads: int = 1
    sync: str = "auto"
    buffer_float_type: str = "q80"
    weight_type: str = "auto"
    weight_source: str = "mmap"  # --weights
    max_seq_len: int = 4096  # clamped to the model's seq_len
    batch: int = 64  # prompt tokens per prefill forward pass
    chunk_bytes: int = 256 * 1024  # largest single MPI transfer; bigger ones go in pieces
    prefill_chunks: int = 0  # allreduce: a prefill block's output on the wire in this many pieces; 0 measures
    sync_timeout: float = 120.0  # seconds a collective may take before the job is ended
    rank_weights: tuple[float, ...] | str | None = None  # None: even; "auto": measured; or one per rank
    temperature: float = 0.0
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    seed: int | None = None
    profile: str | None = None  # the profile name or file these settings came from

    def __post_init__(self) -> None:
        choices = {
            "sync": SYNC_KINDS,
            "buffer_float_type": BUFFER_TYPES,
            "weight_type": WEIGHT_TYPES,
            "weight_source": WEIGHT_SOURCES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                flag = FLAGS.get(name, name.replace("_", "-"))
                raise MpillamaError(f"--{flag} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        positive = ("nthreads", "max_seq_len", "batch", "chunk_bytes")
        if self.prefill_chunks < 0:
            raise MpillamaError(f"--prefill-chunks must be 0 (measure) or a count, not {self.prefill_chunks}")
        for name in positive:
            if getattr(self, name) <= 0:
                raise MpillamaError(f"--{name.replace('_', '-')} must be positive, not {getattr(self, name)}")
        if not 0 < self.sync_timeout < float("inf"):
            raise MpillamaError(f"--sync-timeout must be positive seconds, not {self.sync_timeout}")
        check_sampling(self.temperature, self.top_p, self.top_k)
        if isinstance(self.rank_weights, tuple) and not all(0 < w < float("inf") for w in self.rank_weights):
            raise MpillamaError(f"--rank-weights must all be positive numbers, not {self.rank_weights}")

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """The one check of sampling settings (flags, profiles, server requests); NaN fails every test."""
    if not 0 <= temperature < float("inf"):
        raise MpillamaError(f"--temperature must be a number >= 0, not {temperature}")
    if not 0 < top_p <= 1:
        raise MpillamaError(f"--top-p must be in (0, 1], not {top_p}")
    if not top_k >= 0:
        raise MpillamaError(f"--top-k must be >= 0 (0 turns it off), not {top_k}")


DEFAULTS = RunConfig()


def parse_rank_weights(text: str | None) -> tuple[float, ...] | str | None:
    """'auto', or comma-separated positive numbers, one per rank."""
    if text is None or text == "":
        return None
    if text == "auto":
        return "auto"
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise MpillamaError(f"--rank-weights {text!r}: give 'auto' or numbers like 1,1,0.5 (one per rank)") from None
    return weights


PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)} - {"profile"}


def load_profile(name_or_path: str) -> dict[str, Any]:
    """A TOML profile: a flat table of RunConfig fields (plus free-text 'description' and 'hardware').

    A name is looked up in profiles/NAME.toml; anything with a slash or a .toml suffix is a path.
    Unknown keys are errors, so a typo cannot silently fall back to a default, and so is a value
    of the wrong kind (a string for a number, a float for an integer, NaN). Any error while
    reading the file is one line naming it.
    """
    path = Path(name_or_path)
    if not (name_or_path.endswith(".toml") or "/" in name_or_path):
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.toml")) if PROFILE_DIR.is_dir() else []
        raise MpillamaError(f"profile {name_or_path!r} not found ({path}); "
                            f"known profiles: {', '.join(known) or 'none'}")
    if kind_of(path, "profile", "give a TOML file") != "file":
        raise MpillamaError(f"profile {path} is a folder: give a TOML file")
    with reading(path, "fix the profile or give another"):
        try:
            table = tomllib.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise MpillamaError(f"profile {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                                f"{e.start}): give a TOML file") from None
        except tomllib.TOMLDecodeError as e:
            raise MpillamaError(f"profile {path} is not valid TOML: {e}") from None
        table.pop("description", None)
        table.pop("hardware", None)
        unknown = set(table) - RUN_FIELDS
        if unknown:
            raise MpillamaError(f"profile {path} has unknown keys {sorted(unknown)}; known: {sorted(RUN_FIELDS)}")
        for key, value in table.items():
            _check_profile_value(path, key, value)
        if isinstance(table.get("rank_weights"), list):
            table["rank_weights"] = tuple(float(w) for w in table["rank_weights"])
    return table


def _check_profile_value(path: Path, key: str, value: Any) -> None:
    """The kind of value the RunConfig field takes (its default's type); rank_weights a list of numbers or 'auto'."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    default = getattr(DEFAULTS, key)
    if key == "rank_weights":
        ok = value == "auto" or (isinstance(value, list) and all(number(w) for w in value))
        kind = "'auto' or a list of numbers"
    elif key == "seed" or isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = number(value), "a finite number"
    else:
        ok, kind = isinstance(value, str), "a string"
    if not ok:
        raise MpillamaError(f"profile {path}: {key} = {shown(value)}, where it takes {kind}")


def build_run_config(profile: str | None = None, **flags: Any) -> RunConfig:
    """Defaults < profile < command-line flags (flags that are None were not given)."""
    values: dict[str, Any] = {}
    if profile:
        values.update(load_profile(profile))
        values["profile"] = profile
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return RunConfig(**values)
    except TypeError as e:
        raise MpillamaError(f"bad run setting: {e}") from None

