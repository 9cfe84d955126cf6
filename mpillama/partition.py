"""The slice plan: which attention heads, FFN rows and vocabulary rows each rank owns.

Pure functions of (ModelConfig, rank weights): no MPI, no numpy arrays, so the plan is
tested for any number of ranks without mpirun. The forward pass takes a Slice and never
edits the config.

- Attention is split by query heads, in whole KV groups when there are at least as many KV
  heads as ranks (so no KV head is computed twice). With more ranks than KV heads, query
  heads are still divided and a KV head is computed on every rank whose query heads need it.
- The FFN is split along the hidden dimension in units of ffn_unit rows (32 by default: one
  Q4_0/Q8_0 block; the block of w2's weight kind, e.g. 256 for K-quants), so the columns of w2 that
  a rank owns are whole blocks of its kind. A hidden size that is not a whole number of units
  leaves the remainder to the last rank.
- The output head is split by vocabulary rows.
- --sync replicated (replicate_attention): every rank holds all query and KV heads (the whole Wq, Wk,
  Wv, Wo and K/V cache) and computes the whole attention block, so the attention output needs no
  message; the FFN and the head are split as above. One collective per layer instead of two, for the
  attention weights the other ranks own (Llama-3.2-1B, Q40: +14% of a rank's weights at 2 ranks, +41% at 4).
- A mixture of experts (Qwen3 MoE) is split like the FFN, in every expert: each rank holds the same
  32-row blocks of every expert's hidden rows (its w1/w3 rows, its w2 columns) and the whole router
  (n_experts x dim, f32). Every rank computes the router from the same block input, so all pick the
  same experts with no extra message, and runs its rows of each chosen expert; the block output is
  summed as a dense FFN's (the same syncs). Work is balanced whatever the router picks.
  The alternative, experts owned by ranks (rank r holds experts [r*E/n, (r+1)*E/n) whole), runs
  fewer, larger matmuls but its load follows the router. Measured with bench/moe_split.py on
  Qwen3-30B-A3B's shape (8 of 128 experts of 768 rows; uniform random routing, the best case for
  ownership: trained routers favour some experts), busiest rank / mean per token:
      ranks  tokens   owned   rows split (extra cost of 1/n-size matmuls, 1 thread, loaded host)
        2       1     1.27    1.08
        2      64     1.04    1.08
        4       1     1.76    1.22
        4      64     1.09    1.22
  Decode, one token at a time, is where a cluster of boards spends its time, and there ownership
  makes the slowest of the ranks wait for the one that drew most of the 8 experts (27% at 2 ranks,
  76% at 4); splitting rows costs 8-22% of kernel call overhead, and none of it is waiting. Prefill
  batches even ownership out (4-9%), but a prefill batch is already grouped by expert (each chosen
  expert's weights read once per batch), so rows split keeps it. Hence rows split, for both.
Shares follow the rank weights: a rank with weight 0.5 gets about half the work of one with 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpillama.config import ModelConfig
from mpillama.errors import MpillamaError
from mpillama.quant import Q40_BLOCK_BYTES, QK  # QK: rows per FFN unit by default, one Q40 block


@dataclass(frozen=True)
class Slice:
    """One rank's share of every layer. Ranges are [start, end) in the model's numbering."""

    rank: int
    n_ranks: int
    weight: float  # this rank's share of the total rank weight (0..1]
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn_rows: tuple[int, int]
    vocab_rows: tuple[int, int]

    @property
    def n_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_ffn_rows(self) -> int:
        return self.ffn_rows[1] - self.ffn_rows[0]

    @property
    def n_vocab_rows(self) -> int:
        return self.vocab_rows[1] - self.vocab_rows[0]


def split_units(n_units: int, weights: np.ndarray) -> list[tuple[int, int]]:
    """Divide n_units (>= len(weights)) into contiguous ranges with sizes proportional to weights.

    Rounds the cumulative ideal boundaries, so the ranges tile [0, n_units) in order, then
    gives every range at least one unit: a rank with a small weight still holds some of
    every layer (the forward pass has no empty slices).
    """
    k = len(weights)
    assert n_units >= k, (n_units, k)
    cumulative = np.cumsum(weights) / np.sum(weights) * n_units
    bounds = [0] + [int(np.floor(c + 0.5)) for c in cumulative[:-1]] + [n_units]
    for i in range(1, k):
        bounds[i] = max(bounds[i], bounds[i - 1] + 1)
    for i in range(k - 1, 0, -1):
        bounds[i] = min(bounds[i], bounds[i + 1] - 1)
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def normalise_weights(n_ranks: int, rank_weights: tuple[float, ...] | None) -> np.ndarray:
    if rank_weights is None:
        return np.ones(n_ranks)
    if len(rank_weights) != n_ranks:
        raise MpillamaError(
            f"--rank-weights has {len(rank_weights)} values for {n_ranks} ranks: give one weight per rank"
        )
    weights = np.asarray(rank_weights, dtype=np.float64)
    if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
        raise MpillamaError(f"--rank-weights must be positive numbers, not {rank_weights}")
    return weights


def plan(cfg: ModelConfig, n_ranks: int, rank_weights: tuple[float, ...] | None = None,
         ffn_unit: int = QK, replicate_attention: bool = False) -> list[Slice]:
    """The slice of every rank. Raises MpillamaError when the model cannot be split that way.

    ffn_unit: FFN rows per unit of the split, the block size (in values) of w2's kept weight kind.
    replicate_attention: every rank holds every head (--sync replicated); the rest is split alike."""
    if n_ranks < 1:
        raise MpillamaError(f"cannot split a model over {n_ranks} ranks")
    if n_ranks > cfg.n_heads:
        raise MpillamaError(
            f"{n_ranks} ranks but the model has only {cfg.n_heads} attention heads: run at most {cfg.n_heads} ranks"
        )
    ffn_blocks = max(1, cfg.ffn_dim // ffn_unit)  # a mixture of experts: each expert's rows, split alike in every expert
    if n_ranks > ffn_blocks:
        what = "each expert" if cfg.is_moe else "the FFN"
        why = "" if ffn_unit == QK else " (the blocks of its weight type; --weight-type q40 splits in 32s)"
        raise MpillamaError(f"{n_ranks} ranks but {what} has only {ffn_blocks} blocks of {ffn_unit} rows{why}: "
                            f"run at most {ffn_blocks} ranks")
    weights = normalise_weights(n_ranks, rank_weights)
    group = cfg.group_size
    if replicate_attention:
        q_ranges = [(0, cfg.n_heads)] * n_ranks
    elif n_ranks <= cfg.n_kv_heads:
        q_ranges = [(a * group, b * group) for a, b in split_units(cfg.n_kv_heads, weights)]
    else:
        q_ranges = split_units(cfg.n_heads, weights)
    ffn_ranges = [(a * ffn_unit, b * ffn_unit if b < ffn_blocks else cfg.ffn_dim)
                  for a, b in split_units(ffn_blocks, weights)]
    vocab_ranges = split_units(cfg.vocab_size, weights)
    slices = []
    for r in range(n_ranks):
        q0, q1 = q_ranges[r]
        kv = (q0 // group, -(-q1 // group)) if q1 > q0 else (q0 // group, q0 // group)
        slices.append(
            Slice(
                rank=r,
                n_ranks=n_ranks,
                weight=float(weights[r] / weights.sum()),
                q_heads=(q0, q1),
                kv_heads=kv,
                ffn_rows=ffn_ranges[r],
                vocab_rows=vocab_ranges[r],
            )
        )
    return slices


def kv_groups(cfg: ModelConfig, slc: Slice) -> list[tuple[int, int, int]]:
    """(local kv head, first local q head, end local q head) for each KV head the slice computes.

    Lets attention run per KV head when a slice's query heads do not start on a group boundary.
    """
    group = cfg.group_size
    out = []
    for kv in range(*slc.kv_heads):
        a = max(slc.q_heads[0], kv * group) - slc.q_heads[0]
        b = min(slc.q_heads[1], (kv + 1) * group) - slc.q_heads[0]
        out.append((kv - slc.kv_heads[0], a, b))
    return out


def is_group_aligned(cfg: ModelConfig, slc: Slice) -> bool:
    """True when local query head h uses local KV head h // group_size."""
    return slc.q_heads[0] % cfg.group_size == 0 and slc.q_heads[1] % cfg.group_size == 0


@dataclass(frozen=True)
class SliceCost:
    """Memory a slice needs, for `inspect` and the README's table."""

    weight_bytes: int
    kv_cache_bytes: int
    root_bytes: int  # embedding table and norms, held by rank 0 (every rank under allreduce)


@dataclass(frozen=True)
class Kept:
    """What a group of matrices is kept as in memory: a kind and its block (values, bytes); f32 is (1, 4)."""

    kind: str
    block_values: int
    block_bytes: int


F32, Q40 = Kept("f32", 1, 4), Kept("q40", QK, Q40_BLOCK_BYTES)
# the matrix groups of a layer (and the head, the embedding), as weight_source.kept_kinds names them
GROUPS = ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down", "output", "token_embd")


def matrix_bytes(rows: int, cols: int, weight_type: str | Kept) -> int:
    """Bytes of a (rows, cols) matrix kept as weight_type ('f32', 'q40' or 'auto' as q40) or a Kept kind."""
    kept = weight_type if isinstance(weight_type, Kept) else F32 if weight_type == "f32" else Q40
    return rows * (cols // kept.block_values) * kept.block_bytes


def attention_bytes(cfg: ModelConfig, n_heads: int, n_kv_heads: int, kind: str | Kept = "q40",
                    out_kind: str | Kept | None = None) -> int:
    """Bytes of one layer's attention weights for n_heads query and n_kv_heads KV heads: wq, wk, wv rows
    (kept as kind) and wo columns (out_kind, else kind)."""
    hd = cfg.head_dim
    return (matrix_bytes(n_heads * hd, cfg.dim, kind) + 2 * matrix_bytes(n_kv_heads * hd, cfg.dim, kind)
            + matrix_bytes(cfg.dim, n_heads * hd, kind if out_kind is None else out_kind))


def replication_bytes(cfg: ModelConfig, slc: Slice, weight_type: str = "q40",
                      kinds: dict[str, Kept] | None = None) -> int:
    """Attention weight bytes per layer that slc (a split plan's) does not hold: what --sync replicated
    adds to it, and what it reads more per token and layer."""
    k = {g: (kinds or {}).get(g, weight_type) for g in ("attn_qkv", "attn_output")}
    whole = attention_bytes(cfg, cfg.n_heads, cfg.n_kv_heads, k["attn_qkv"], k["attn_output"])
    return whole - attention_bytes(cfg, slc.n_heads, slc.n_kv_heads, k["attn_qkv"], k["attn_output"])


def slice_cost(cfg: ModelConfig, slc: Slice, max_seq_len: int, weight_type: str = "q40",
               kinds: dict[str, Kept] | None = None) -> SliceCost:
    """kinds: group (GROUPS) -> what it is kept as, when known from the file (else weight_type for all)."""
    hd = cfg.head_dim
    k = {g: (kinds or {}).get(g, weight_type) for g in GROUPS}
    per_layer = (
        matrix_bytes(slc.n_heads * hd, cfg.dim, k["attn_qkv"])  # wq
        + 2 * matrix_bytes(slc.n_kv_heads * hd, cfg.dim, k["attn_qkv"])  # wk, wv
        + matrix_bytes(cfg.dim, slc.n_heads * hd, k["attn_output"])  # wo columns
    )
    ffn = 2 * matrix_bytes(slc.n_ffn_rows, cfg.dim, k["ffn_gate_up"]) + matrix_bytes(cfg.dim, slc.n_ffn_rows, k["ffn_down"])
    if cfg.is_moe:  # own rows of every expert, and the whole f32 router on every rank
        per_layer += cfg.n_experts * ffn + cfg.n_experts * cfg.dim * 4
    else:  # w1, w3 rows and w2 columns
        per_layer += ffn
    head = matrix_bytes(slc.n_vocab_rows, cfg.dim, k["output"])
    kv = 2 * cfg.n_layers * max_seq_len * slc.n_kv_heads * hd * 4
    root = matrix_bytes(cfg.vocab_size, cfg.dim, k["token_embd"]) + (2 * cfg.n_layers + 1) * cfg.dim * 4
    return SliceCost(weight_bytes=cfg.n_layers * per_layer + head, kv_cache_bytes=kv, root_bytes=root)
