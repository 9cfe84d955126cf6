"""`trace project`: predict tokens/s, waits and the straggler of another configuration from a trace.

Owns the projection model: what it reads from a trace (measure), how compute scales with a
rank's slice (fit), what a collective costs (Link, wire), and the replay of every step of the
trace in the new configuration (simulate). The replay is itself a trace, which analysis.py
reads like a measured one: waits, straggler and tok/s of a projection are computed by the same
code, with the same definitions, as those of the run it came from.

The model
---------
Compute. Every finished step of the trace is replayed with its own tokens T and positions.
What a rank computed in each block (embed, att, ffn, head) of each layer is taken from the
trace and rescaled to the rank's new slice by a linear cost model, fitted per block and phase
(prefill, decode) by non-negative least squares over the calibration traces (the projected one
and any --calibrate ones):

    seconds = c_w x weights x T            matmuls: the weights of the slice (partition.plan)
            + c_a x heads x head_dim x P    attention: P = positions attended, summed over the T tokens
            + c_f x calls                   fixed cost of a block call (Python, kernel launches)
            + c_r x dim x T x passes        where the residual lives: rmsnorm and the adds of the partials

A mixture of experts' FFN (its route and experts segments) counts, per token, the rank's rows of
the n_experts_used experts it runs and the whole f32 router every rank runs alike.

A rank replays its own measured timings (its speed and its noise) scaled by new cost / old
cost; a new rank, and one given --speed R=F, replays the fastest rank of the trace, divided by
F. A term the calibration cannot tell from the others (no variation: the fixed cost when every
trace holds one slice size) is left out and reported; a trace at another rank count
(--calibrate) separates it. The fit needs no rank count of its own: 1 and 2 ranks suffice.

Collectives. Each rank leaves a collective at

    max(entry + own, arrival of what it waits for + overhead + hops x latency + bytes / bandwidth)

bcast from rank 0 (ctrl, star's block inputs): a binomial tree, a rank popcount(rank) hops
from the root, the payload crossing each hop; the root pays only its own call. gather to rank
0 (star's partials, the head's logits): one hop after the last sender, every sender's payload
into rank 0; senders pay only their own call. allgather (allreduce sync, q80 buffers) and
allreduce (f32 buffers): ceil(log2 M) hops after the last arrival, (M-1) payloads resp. one
payload per hop. Latency is half the trace's start-up ping-pong round trip (or --delay);
bandwidth is fitted to the trace's collectives, whose payloads range from one token to a
prefill chunk (infinite when it cannot be told), or --bandwidth; the overhead per wire is
what the trace measured beyond both. What each collective took beyond this model in the trace
(its noise) is replayed with it. So projecting a trace onto its own configuration gives back
its own timeline, and every change is the model's difference between two configurations.

Waits fall out as in the engine: the slowest arrival sets the pace.

--sync replicated (every rank holds every attention head) is replayed as allreduce without the
attention's collective, its attention compute scaled by the same linear model to all heads. That is
approximate: a replicated trace's attention features hardly vary between ranks, so the fit of the
attention block leans on the other traces; --sync auto in a projection weighs star and allreduce only.

Imports numpy and the trace, partition and format readers; no MPI, no numba.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mpillama.config import ModelConfig, model_config_from_json
from mpillama.errors import MpillamaError
from mpillama.partition import plan
from mpillama.quant import Q80_BLOCK_BYTES, QK
from mpillama.trace import analysis
from mpillama.trace.analysis import Trace
from mpillama.trace.recorder import PHASES, SEGMENTS

BLOCKS = ("embed", "att", "ffn", "head")  # compute kinds; each one's collective is "<block>_sync"
EMBED, ATT, FFN, HEAD = range(4)  # also the collective slots: ctrl_sync takes EMBED's (embed has none)
PRE, MID, POST = range(3)  # a block's compute before its first collective, between, after its last
FEATURES = ("weights", "attention", "calls", "residual")
W, A, C, R = range(4)
KINDS = ("bcast", "gather", "allgather", "allreduce")  # the wires
BCAST, GATHER, ALLGATHER, ALLREDUCE = range(4)
DECODE, PREFILL = PHASES.index("decode"), PHASES.index("prefill")
ARGMAX_BYTES = 16  # a rank's best (value, index): two f64
MOE_SEGMENTS = ("route", "experts")  # a mixture of experts' FFN: the router, then the chosen experts' rows
# The MoE router is f32 (4 bytes a weight) where the matmuls' weights are counted as Q40 (18 bytes per
# 32): in the weights feature it counts this many Q40 weights per weight, as decode reads them
ROUTER_WEIGHT = 4 / (18 / 32)


# ---------------------------------------------------------------------------------------- shapes and slices


@dataclass(frozen=True)
class Share:
    """What one rank holds (partition.Slice's counts) and its fraction of the rank weights."""

    n_heads: int
    n_kv_heads: int
    ffn_rows: int
    vocab_rows: int
    weight: float


def shares_of_plan(cfg: ModelConfig, n_ranks: int, weights: tuple[float, ...] | None,
                   replicate_attention: bool = False) -> list[Share]:
    return [Share(s.n_heads, s.n_kv_heads, s.n_ffn_rows, s.n_vocab_rows, s.weight)
            for s in plan(cfg, n_ranks, weights, replicate_attention=replicate_attention)]


def model_config(trace: Trace, model: str | Path | None) -> ModelConfig:
    """The model's shapes: from --model, else from the model file the trace names, else from the
    shapes the trace recorded (traces written since they keep them)."""
    from mpillama.formats import open_model  # the header readers: imported only when a projection runs

    path = str(model or trace.attrs.get("model", "") or "")
    if not model and not Path(path).exists() and trace.attrs.get("model_config"):
        return model_config_from_json(str(trace.attrs["model_config"]))
    if not path or not Path(path).exists():
        raise MpillamaError(
            f"{trace.path} was recorded with model {path or '(none)'}, which is not there: pass --model FILE "
            "(that model, or any file of the same shapes)"
        )
    f = open_model(path)
    try:
        return f.config
    finally:
        f.close()


def row_bytes(dim: int, buffer: str, n_ranks: int) -> int:
    """Bytes of one token's row on the wire (Q80 only when something crosses a wire, as in model.py)."""
    return dim // QK * Q80_BLOCK_BYTES if buffer == "q80" and n_ranks > 1 else dim * 4


def depth(n_ranks: int) -> np.ndarray:
    """(n_ranks,) hops from rank 0 in a binomial broadcast tree: the set bits of the rank's number."""
    return np.array([r.bit_count() for r in range(n_ranks)], np.float64)


def tree_hops(n_ranks: int) -> int:
    return 0 if n_ranks < 2 else math.ceil(math.log2(n_ranks))


# ---------------------------------------------------------------------------------------- the wire model


@dataclass(frozen=True)
class Link:
    """What a collective costs: latency (s, one way per hop), bandwidth (B/s), per wire overhead and own time (s)."""

    latency: float
    bandwidth: float
    overhead: tuple[float, ...]  # (4,) by KINDS
    own: tuple[float, ...]  # (4,) by KINDS: a rank's own call when it waits for nobody
    source: dict[str, str] = field(default_factory=dict)  # where each figure came from, for the output

    def cost(self, kind: int, hops: Any, nbytes: Any) -> Any:
        return self.overhead[kind] + hops * self.latency + nbytes / self.bandwidth


ZERO_LINK = Link(0.0, math.inf, (0.0,) * 4, (0.0,) * 4, {})


def wire(kind: int, entry: np.ndarray, payload: np.ndarray, link: Link) -> np.ndarray:
    """(n,) when each rank leaves the collective by the model (no noise). payload (n,): the bytes each
    rank contributes (a bcast: the root's; a gather: each sender's, the root's is not sent)."""
    n = len(entry)
    own = link.own[kind]
    if kind == BCAST:
        d = depth(n)
        out = np.maximum(entry + own, entry[0] + link.cost(BCAST, d, d * payload[0]))
        out[0] = entry[0] + own
        return out
    if kind == GATHER:
        out = entry + own
        out[0] = max(entry[0] + own, entry[1:].max() + link.cost(GATHER, 1, float(payload[1:].sum())))
        return out
    h = tree_hops(n)
    path = (n - 1) * payload.max() if kind == ALLGATHER else h * payload.max()
    return np.maximum(entry + own, entry.max() + link.cost(kind, h, path))


def wire_kind(sync: str, buffer: str, slot: int, occurrence: int) -> int:
    """The wire of a collective: star's first call in a block spreads the input, its second gathers."""
    if slot == EMBED:  # ctrl_sync
        return BCAST
    if sync == "star":
        return BCAST if occurrence == 0 else GATHER
    if slot == HEAD:
        return GATHER
    return ALLGATHER if buffer == "q80" else ALLREDUCE


# ---------------------------------------------------------------------------------------- what a trace holds


@dataclass(frozen=True)
class Steps:
    """The finished steps of a trace, in order: what every projection replays."""

    step: np.ndarray  # (n_steps,) i64 step ids
    phase: np.ndarray  # (n_steps,) i64 index into PHASES
    tokens: np.ndarray  # (n_steps,) i64 T
    position: np.ndarray  # (n_steps,) i64 position of the first token
    head: np.ndarray  # (n_steps,) bool: the step ran the output head

    @property
    def attended(self) -> np.ndarray:
        """(n_steps,) f64 positions attended, summed over the step's tokens (token i sees p0 + i + 1)."""
        T, p = self.tokens.astype(np.float64), self.position.astype(np.float64)
        return T * p + T * (T + 1) / 2


@dataclass(frozen=True)
class Colls:
    """The trace's complete collectives in finished steps, one row each."""

    row: np.ndarray  # (n,) i64 step row in Steps
    layer: np.ndarray  # (n,) i64, -1 outside the layers
    slot: np.ndarray  # (n,) i64 block of the collective (EMBED for ctrl_sync)
    occ: np.ndarray  # (n,) i64 call within (step, layer, slot): star's bcast 0, gather 1
    kind: np.ndarray  # (n,) i64 index into KINDS
    entry: np.ndarray  # (n, n_ranks) f64 s
    exit: np.ndarray  # (n, n_ranks) f64 s
    payload: np.ndarray  # (n, n_ranks) f64 bytes each rank contributes (see wire)


@dataclass(frozen=True)
class Measured:
    """One trace, reduced to what the projection needs."""

    trace: Trace
    cfg: ModelConfig
    sync: str  # star | allreduce | replicated (what one rank records: nothing crosses a wire either way)
    buffer: str  # q80 | f32
    shares: list[Share]
    steps: Steps
    # (n_steps, n_ranks, n_layers + 1, 4 blocks, 3 pieces) s; layer index 0: outside the layers. Pieces: PRE
    # star's rmsnorm before the bcast (rank 0), MID the block itself, POST the adds after the last collective
    comp: np.ndarray
    colls: Colls
    rtt: float | None  # s, median start-up ping-pong round trip to rank 0 (None with one rank)
    logits: str  # "argmax": each rank sends its best | "full": the whole row to rank 0
    ctrl_bytes: int
    wire_us: dict[str, float]  # --sync auto's start-up timing of one block's sync per strategy, if recorded

    @property
    def n_ranks(self) -> int:
        return len(self.shares)


def _block_of(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per segment code: its block (-1: none; ctrl_sync: EMBED's slot) and whether it is a collective."""
    block = np.full(len(names), -1)
    is_sync = np.array([n.endswith("_sync") for n in names])
    for code, name in enumerate(names):
        base = name.removesuffix("_sync")
        if base in BLOCKS:
            block[code] = BLOCKS.index(base)
        elif name in MOE_SEGMENTS:  # a mixture of experts' FFN, recorded in two parts
            block[code] = FFN
        elif name == "ctrl_sync":
            block[code] = EMBED
    return block, is_sync


def _shares_of_trace(trace: Trace, cfg: ModelConfig) -> list[Share]:
    rows, n = trace.ranks, trace.n_ranks
    weight = rows["weight_share"] if "weight_share" in rows else np.full(n, 1.0 / n)
    cols = ("n_heads", "n_kv_heads", "ffn_rows", "vocab_rows")
    if all(k in rows for k in cols) and all(np.all(rows[k] >= 0) for k in cols):
        return [Share(*(int(rows[k][r]) for k in cols), float(weight[r])) for r in range(n)]
    return shares_of_plan(cfg, n, tuple(float(w) for w in weight))


def _compute_pieces(trace: Trace, steps: np.ndarray, n_layers: int) -> np.ndarray:
    """(n_steps, n_ranks, n_layers + 1, 4, 3) s of compute per block piece (busy clock: idle gaps cut)."""
    s = trace.segments
    block_of, sync_of = _block_of(trace.segment_names)
    blk, is_sync = block_of[s.seg], sync_of[s.seg]
    row = analysis._step_index(steps, s.step)
    keep = (blk >= 0) & (row >= 0) & ((blk != EMBED) | ~is_sync)  # ctrl_sync opens the step, it is no block's
    if np.any(s.layer[keep] >= n_layers):
        raise MpillamaError(f"{trace.path} has layer {int(s.layer[keep].max())} but the model has {n_layers} "
                            "layers: pass the --model the trace was recorded with")
    key = ((s.rank.astype(np.int64) * len(steps) + row) * (n_layers + 1) + s.layer + 1) * 4 + blk  # (n_seg,)
    sync = np.nonzero(keep & is_sync)[0]
    keys, inv = np.unique(key[sync], return_inverse=True)
    first = np.full(len(keys), np.inf)  # (n_keys,) where a block's first collective began, per rank
    last = np.full(len(keys), -np.inf)  # (n_keys,) where its last one ended
    np.minimum.at(first, inv, s.t_start[sync])
    np.maximum.at(last, inv, s.t_end[sync])
    comp_rows = np.nonzero(keep & ~is_sync)[0]
    j = np.clip(np.searchsorted(keys, key[comp_rows]), 0, max(len(keys) - 1, 0))
    found = (keys[j] == key[comp_rows]) if len(keys) else np.zeros(len(comp_rows), bool)
    piece = np.full(len(comp_rows), MID)
    if len(keys):
        piece[found & (s.t_end[comp_rows] <= first[j] + 1e-9)] = PRE
        piece[found & (s.t_start[comp_rows] >= last[j] - 1e-9)] = POST
    comp = np.zeros((len(steps), trace.n_ranks, n_layers + 1, 4, 3))
    dur = analysis.busy_dur(trace)
    np.add.at(comp, (row[comp_rows], s.rank[comp_rows], s.layer[comp_rows] + 1, blk[comp_rows], piece),
              dur[comp_rows])
    # rank 0's step goes on past its last segment (choosing among the ranks' best tokens, closing the step):
    # that time is the end of the step's last block
    own = np.nonzero(keep & (s.rank == 0))[0]
    last_end = np.full(len(steps), -np.inf)
    np.maximum.at(last_end, row[own], s.t_end[own])
    step_end = trace.steps.t_end[analysis._step_index(trace.steps.step, steps)]
    tail = np.where(np.isfinite(last_end), np.maximum(step_end - last_end, 0.0), 0.0)
    head = comp[:, 0, 0, HEAD].sum(axis=1) > 0
    comp[head, 0, 0, HEAD, POST] += tail[head]
    comp[~head, 0, n_layers, FFN, POST] += tail[~head]
    return comp


def _collectives(trace: Trace, steps: np.ndarray, sync: str, buffer: str) -> tuple[Colls, str]:
    """The complete collectives in finished steps, and the head's logits mode (what its gather carried)."""
    n = trace.n_ranks
    coll = analysis.collectives(trace)
    block_of, _ = _block_of(trace.segment_names)
    row = analysis._step_index(steps, coll.step)
    ok = coll.complete & (row >= 0) & (block_of[coll.seg] >= 0)
    slot = block_of[coll.seg[ok]]
    kind = np.array([wire_kind(sync, buffer, int(b), int(o)) for b, o in zip(slot, coll.occ[ok])], np.int64)
    sent = trace.segments.nbytes[coll.index[ok]].astype(np.float64)  # (n, n_ranks) bytes each rank recorded
    payload = sent.copy()  # the engine records a bcast's payload, a gather's as sent (the root: all it got),
    payload[kind == GATHER, 0] = 0.0  # an allgather's as all of them, an allreduce's once
    payload[kind == ALLGATHER] /= n
    heads = (slot == HEAD) & (kind == GATHER)
    logits = "full" if np.any(sent[heads][:, 1:] != ARGMAX_BYTES) else "argmax"
    busy = analysis.busy_clock(trace)  # as the compute pieces: idle time between rank 0's steps cut out
    colls = Colls(row[ok], coll.layer[ok], slot, coll.occ[ok], kind, busy(coll.entry[ok]), busy(coll.exit[ok]), payload)
    return colls, logits


def _argv_logits(argv: str) -> str:
    """One rank gathers nothing: the logits mode comes from how the run was started (greedy by default)."""
    if "--dump-logits" in argv:
        return "full"
    m = re.search(r"--temperature[ =]([0-9.]+)", argv)
    return "full" if m and float(m.group(1)) > 0 else "argmax"


def _wire_timing(reason: str) -> dict[str, float]:
    """--sync auto's start-up measurement, from the trace's sync_reason."""
    m = re.search(r"measured (\d+(?:\.\d+)?) us with allreduce, (\d+(?:\.\d+)?) us with star", reason)
    return {"allreduce": float(m.group(1)), "star": float(m.group(2))} if m else {}


def measure(trace: Trace, cfg: ModelConfig) -> Measured:
    """What the projection reads from one trace (finished steps only)."""
    st = trace.steps
    done = ~np.isnan(st.t_end)
    if not done.any():
        raise MpillamaError(f"{trace.path} has no finished steps: there is nothing to project from")
    steps = st.step[done].astype(np.int64)
    sync = str(trace.attrs.get("sync") or "star")
    if sync not in ("star", "allreduce", "replicated"):
        raise MpillamaError(f"{trace.path} ran sync {sync!r}: trace project knows star, allreduce and replicated")
    buffer = str(trace.attrs.get("buffer_float_type") or "q80")
    comp = _compute_pieces(trace, steps, cfg.n_layers)
    if sync != "star" or trace.n_ranks == 1:
        # one collective per block (or none): the block's own compute, rmsnorm included, comes before it;
        # the pieces mean the same under every scheme: pre = star's rmsnorm on the root, mid = the block
        comp[..., MID] += comp[..., PRE]
        comp[..., PRE] = 0.0
    s = trace.segments
    names = trace.segment_names
    ctrl = s.seg == names.index("ctrl_sync") if "ctrl_sync" in names else np.zeros(len(s), bool)
    ctrl_bytes = int(np.median(s.nbytes[ctrl])) if ctrl.any() else 0
    n = trace.n_ranks
    if n > 1:
        colls, logits = _collectives(trace, steps, sync, buffer)
        rtt = float(np.median(trace.ranks["clock_rtt"][1:])) if "clock_rtt" in trace.ranks else None
    else:
        empty = np.zeros(0, np.int64)
        colls = Colls(empty, empty, empty, empty, empty, np.zeros((0, 1)), np.zeros((0, 1)), np.zeros((0, 1)))
        logits, rtt = _argv_logits(str(trace.attrs.get("argv", ""))), None
    return Measured(
        trace=trace, cfg=cfg, sync=sync, buffer=buffer, shares=_shares_of_trace(trace, cfg),
        steps=Steps(steps, st.phase[done].astype(np.int64), st.tokens[done].astype(np.int64),
                    st.position[done].astype(np.int64), comp[:, 0, 0, HEAD].sum(axis=1) > 0),
        comp=comp, colls=colls, rtt=rtt, logits=logits, ctrl_bytes=ctrl_bytes,
        wire_us=_wire_timing(str(trace.attrs.get("sync_reason", ""))),
    )


# ---------------------------------------------------------------------------------------- the compute model


@dataclass(frozen=True)
class Role:
    """Where a rank's residual work is: whether it holds the residual stream, and its passes over it per block."""

    owns: bool
    passes: int  # one rmsnorm + the adds of the partials
    scheme: str  # "single" | star | allreduce: the order of a block's pieces


def role(rank: int, n_ranks: int, sync: str, buffer: str) -> Role:
    if n_ranks == 1:
        return Role(True, 2, "single")
    if sync == "star":
        return Role(rank == 0, n_ranks + 1 if rank == 0 else 0, "star")
    return Role(True, n_ranks + 1 if buffer == "q80" else 2, "allreduce")


def features(cfg: ModelConfig, share: Share, rl: Role, steps: Steps) -> np.ndarray:
    """(n_steps, 4 blocks, 4 features) of one call of each block (att, ffn: one call per layer)."""
    hd, dim = cfg.head_dim, cfg.dim
    T = steps.tokens.astype(np.float64)
    owns = float(rl.owns)
    on = steps.head.astype(np.float64)
    x = np.zeros((len(T), 4, len(FEATURES)))
    x[:, EMBED, C] = owns
    x[:, EMBED, R] = owns * T * dim
    x[:, ATT, W] = ((share.n_heads * hd + 2 * share.n_kv_heads * hd) * dim + dim * share.n_heads * hd) * T
    x[:, ATT, A] = share.n_heads * hd * steps.attended
    if cfg.is_moe:  # each token runs the rank's rows of n_experts_used experts; every rank runs the whole router
        x[:, FFN, W] = (3 * share.ffn_rows * dim * cfg.n_experts_used + ROUTER_WEIGHT * cfg.n_experts * dim) * T
    else:
        x[:, FFN, W] = 3 * share.ffn_rows * dim * T
    x[:, (ATT, FFN), C] = 1.0
    x[:, (ATT, FFN), R] = (owns * T * dim * rl.passes)[:, None]
    x[:, HEAD, W] = on * share.vocab_rows * dim
    x[:, HEAD, C] = on
    x[:, HEAD, R] = on * owns * dim
    return x


def calls(cfg: ModelConfig) -> np.ndarray:
    """(4,) calls of each block per step."""
    return np.array([1.0, cfg.n_layers, cfg.n_layers, 1.0])


@dataclass(frozen=True)
class Coefficients:
    """Seconds per unit of each feature, per phase and block, and how well they fit."""

    coef: np.ndarray  # (2 phases, 4 blocks, 4 features)
    dropped: dict[str, list[str]]  # "phase block" -> features left out: not separable in the calibration
    rms_error: np.ndarray  # (2, 4) rms error / mean of the fitted seconds per step (NaN: no data)
    n_rows: np.ndarray  # (2, 4) observations (trace, step, rank) per phase and block


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 for a few columns: solve, drop the most negative term, repeat."""
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if np.all(sol >= 0):
            x[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return x


def separable(a: np.ndarray, drop_order: tuple[int, ...]) -> list[int]:
    """Columns with data, less terms in drop_order until the rest are linearly independent."""
    cols = [j for j in range(a.shape[1]) if np.any(a[:, j] > 0)]
    for j in drop_order:
        scaled = a[:, cols] / np.linalg.norm(a[:, cols], axis=0)
        if len(cols) <= 1 or np.linalg.matrix_rank(scaled, tol=1e-6) == len(cols):
            break
        if j in cols:
            cols.remove(j)
    return cols


def fit(measured: list[Measured]) -> Coefficients:
    """NNLS per phase and block over every (trace, step, rank): a block's seconds in a step against its features."""
    cfg = measured[0].cfg
    n_calls = calls(cfg)
    xs: dict[tuple[int, int], list[np.ndarray]] = {}
    ys: dict[tuple[int, int], list[np.ndarray]] = {}
    for m in measured:
        for r, share in enumerate(m.shares):
            x = features(cfg, share, role(r, m.n_ranks, m.sync, m.buffer), m.steps) * n_calls[None, :, None]
            y = m.comp[:, r].sum(axis=(1, 3))  # (n_steps, 4) s per step
            for p in (DECODE, PREFILL):
                for b in range(4):
                    use = (m.steps.phase == p) & (x[:, b].sum(axis=1) > 0)
                    xs.setdefault((p, b), []).append(x[use, b])
                    ys.setdefault((p, b), []).append(y[use, b])
    coef = np.zeros((2, 4, len(FEATURES)))
    rms = np.full((2, 4), np.nan)
    count = np.zeros((2, 4), np.int64)
    dropped: dict[str, list[str]] = {}
    for (p, b), parts in xs.items():
        a, y = np.concatenate(parts), np.concatenate(ys[(p, b)])
        count[p, b] = len(y)
        if len(y) == 0:
            continue
        cols = separable(a, (R, C, A))  # weights stay: compute following the slice is the model's premise
        lost = [FEATURES[j] for j in range(len(FEATURES)) if np.any(a[:, j] > 0) and j not in cols]
        if lost:
            dropped[f"{PHASES[p]} {BLOCKS[b]}"] = lost
        scale = np.linalg.norm(a[:, cols], axis=0)
        coef[p, b, cols] = nnls(a[:, cols] / scale, y) / scale
        rms[p, b] = float(np.sqrt(np.mean((a @ coef[p, b] - y) ** 2)) / max(float(np.mean(y)), 1e-12))
    for p, q in ((DECODE, PREFILL), (PREFILL, DECODE)):  # a phase no calibration trace ran borrows the other's
        for b in range(4):
            if count[p, b] == 0:
                coef[p, b] = coef[q, b]
    return Coefficients(coef, dropped, rms, count)


def model_seconds(m: Measured, coefs: Coefficients, share: Share, rl: Role) -> tuple[np.ndarray, np.ndarray]:
    """(n_steps, 4) model seconds per call of each block: the residual term, and the rest."""
    x = features(m.cfg, share, rl, m.steps) * coefs.coef[m.steps.phase]
    return x[..., R], x.sum(-1) - x[..., R]


# ---------------------------------------------------------------------------------------- the measured link


def fit_bandwidth(kind: np.ndarray, delivery: np.ndarray, nbytes: np.ndarray) -> float:
    """B/s from how delivery grows with bytes, one intercept per wire; inf when it does not grow or cannot be told."""
    kinds = np.unique(kind)
    if len(kinds) == 0 or np.ptp(nbytes) <= 0:
        return math.inf
    a = np.column_stack([(kind == k).astype(np.float64) for k in kinds] + [nbytes])
    if np.linalg.matrix_rank(a / np.abs(a).max(axis=0)) < a.shape[1]:
        return math.inf
    slope = np.linalg.lstsq(a, delivery, rcond=None)[0][-1]
    # growing by under a nanosecond over the range of payloads is no growth (exact traces: rounding)
    return 1.0 / slope if slope * np.ptp(nbytes) > 1e-9 else math.inf


def measured_link(m: Measured) -> Link:
    """The link as the trace saw it: ping-pong latency, fitted bandwidth, per-wire overhead and own time.

    Only collectives where a rank truly waited count as deliveries: a bcast's receivers that entered
    before the root, a gather's root that entered before the last sender, everyone in an allgather."""
    c, n = m.colls, m.n_ranks
    latency = (m.rtt or 0.0) / 2
    d = depth(n)
    kinds, deliveries, hops, nbytes, own = [], [], [], [], [[] for _ in KINDS]
    for i in range(len(c.row)):
        k, e, x, pay = int(c.kind[i]), c.entry[i], c.exit[i], c.payload[i]
        if k == BCAST:
            own[k].append(x[0] - e[0])
            early = np.nonzero(e[1:] < e[0])[0] + 1
            kinds += [k] * len(early)
            deliveries += list(x[early] - e[0])
            hops += list(d[early])
            nbytes += list(d[early] * pay[0])
        elif k == GATHER:
            own[k] += list(x[1:] - e[1:])
            if e[1:].max() > e[0]:
                kinds.append(k)
                deliveries.append(x[0] - e[1:].max())
                hops.append(1.0)
                nbytes.append(float(pay[1:].sum()))
        else:
            h = tree_hops(n)
            kinds += [k] * n
            deliveries += list(x - e.max())
            hops += [h] * n
            nbytes += [((n - 1) if k == ALLGATHER else h) * pay.max()] * n
    kind_a, deliv_a = np.array(kinds, np.int64), np.array(deliveries)
    hops_a, bytes_a = np.array(hops, np.float64), np.array(nbytes, np.float64)
    rest = deliv_a - hops_a * latency
    bandwidth = fit_bandwidth(kind_a, rest, bytes_a)
    rest = rest - bytes_a / bandwidth
    path = m.trace.path
    source = {"latency": f"half the start-up ping-pong round trip of {path}",
              "bandwidth": f"fitted to the collectives of {path}" if math.isfinite(bandwidth)
              else f"unlimited (the collectives of {path} do not slow with their size)"}
    overhead: list[float | None] = [None] * 4
    for k in range(4):
        if np.any(kind_a == k):
            overhead[k] = max(float(rest[kind_a == k].mean()), 0.0)
            source[f"overhead {KINDS[k]}"] = "measured"
    for k in (ALLGATHER, ALLREDUCE):  # star never ran them: --sync auto's start-up timing of one allgather
        if overhead[k] is None and "allreduce" in m.wire_us:
            payload = row_bytes(m.cfg.dim, "q80", n)
            model = tree_hops(n) * latency + (n - 1) * payload / bandwidth
            overhead[k] = max(m.wire_us["allreduce"] / 1e6 - model, 0.0)
            source[f"overhead {KINDS[k]}"] = "the start-up timing of the wires (--sync auto)"
    known = [v for v in overhead if v is not None]
    for k in range(4):
        if overhead[k] is None:
            overhead[k] = float(np.mean(known)) if known else 0.0
            source[f"overhead {KINDS[k]}"] = "not measured: the mean of the measured wires" if known else "0"
    own_s = tuple(float(np.mean(v)) if v else 0.0 for v in own)
    return Link(latency, bandwidth, tuple(float(v) for v in overhead), own_s, source)


def excess(m: Measured, link: Link) -> np.ndarray:
    """(n_steps, n_ranks, n_layers + 1, 4 slots, 2 calls) s each collective took beyond the model in the trace."""
    c = m.colls
    out = np.zeros((len(m.steps.step), m.n_ranks, m.cfg.n_layers + 1, 4, 2))
    for i in range(len(c.row)):
        if c.occ[i] > 1:
            continue
        out[c.row[i], :, c.layer[i] + 1, c.slot[i], c.occ[i]] = c.exit[i] - wire(int(c.kind[i]), c.entry[i],
                                                                                  c.payload[i], link)
    return out


# ---------------------------------------------------------------------------------------- projecting


@dataclass(frozen=True)
class Target:
    """The configuration to project. weights None: the trace's own shares at its rank count, else even;
    speed: rank -> factor relative to the trace's fastest rank; delay and bandwidth None: the trace's link."""

    n_ranks: int
    sync: str  # star | allreduce | replicated | auto (star and allreduce, the faster kept)
    weights: tuple[float, ...] | None = None
    speed: dict[int, float] = field(default_factory=dict)
    delay_ms: float | None = None
    bandwidth_gbit: float | None = None

    def describe(self) -> str:
        parts = [f"{self.n_ranks} rank(s)", f"sync {self.sync}"]
        if self.weights is not None:
            parts.append("rank weights " + ",".join(f"{w:g}" for w in self.weights))
        parts += [f"rank {r} speed {f:g}" for r, f in sorted(self.speed.items())]
        if self.delay_ms is not None:
            parts.append(f"delay {self.delay_ms:g} ms")
        if self.bandwidth_gbit is not None:
            parts.append(f"bandwidth {self.bandwidth_gbit:g} Gbit/s")
        return ", ".join(parts)


def check_target(t: Target) -> None:
    """Bad values -> one line saying which flag and what it takes."""
    if t.n_ranks < 1:
        raise MpillamaError(f"--ranks {t.n_ranks}: project onto 1 rank or more")
    if t.sync not in ("star", "allreduce", "replicated", "auto"):
        raise MpillamaError(f"--sync {t.sync!r}: choose star, allreduce, replicated or auto")
    for r, f in t.speed.items():
        if not 0 <= r < t.n_ranks:
            raise MpillamaError(f"--speed {r}={f:g}: there is no rank {r} among {t.n_ranks} ranks")
        if not (f > 0 and math.isfinite(f)):
            raise MpillamaError(f"--speed {r}={f:g}: the factor must be a positive number (0.5: half as fast)")
    if t.delay_ms is not None and not (t.delay_ms >= 0 and math.isfinite(t.delay_ms)):
        raise MpillamaError(f"--delay {t.delay_ms:g}: give the link's one-way latency in ms, 0 or more")
    if t.bandwidth_gbit is not None and not (t.bandwidth_gbit > 0):
        raise MpillamaError(f"--bandwidth {t.bandwidth_gbit:g}: give the link's rate in Gbit/s, more than 0")


@dataclass(frozen=True)
class Calibrated:
    """A trace ready to project: its measurements, the fitted compute model and the links."""

    measured: Measured
    calibration: list[Measured]
    coefs: Coefficients
    link: Link | None  # the measured link (of the trace, or of a calibration trace of several ranks)
    excess: np.ndarray  # see excess(); zeros for a trace of one rank
    speeds: np.ndarray  # (n_ranks,) measured compute / model compute: lower is faster


def calibrate(path: str | Path, calibration: list[str | Path] | tuple = (),
              model: str | Path | None = None) -> Calibrated:
    """Load the trace to project and any calibration traces of the same model, and fit the model to them."""
    trace = analysis.load_trace(path)
    cfg = model_config(trace, model)
    m = measure(trace, cfg)
    others = []
    for p in calibration:
        t = analysis.load_trace(p)
        if model is None:
            other = model_config(t, None)
            if replace(other, seq_len=cfg.seq_len) != cfg:
                raise MpillamaError(f"--calibrate {p} ran {t.attrs.get('model')}, whose shapes differ from "
                                    f"{trace.attrs.get('model')} of {path}: calibrate with traces of one model")
        others.append(measure(t, cfg))
    coefs = fit([m, *others])
    src = m if m.n_ranks > 1 else next((o for o in others if o.n_ranks > 1), None)
    link = measured_link(src) if src is not None else None
    exc = excess(m, link) if m.n_ranks > 1 and link is not None else np.zeros(
        (len(m.steps.step), m.n_ranks, cfg.n_layers + 1, 4, 2))
    speeds = np.ones(m.n_ranks)
    for r, share in enumerate(m.shares):
        res, rest = model_seconds(m, coefs, share, role(r, m.n_ranks, m.sync, m.buffer))
        model = float(((res + rest) * calls(cfg)).sum())
        speeds[r] = m.comp[:, r].sum() / model if model > 0 else 1.0
    return Calibrated(m, others, coefs, link, exc, speeds)


def target_link(cal: Calibrated, t: Target) -> Link:
    base = cal.link
    if base is None:
        if t.delay_ms is None and t.n_ranks > 1:
            raise MpillamaError(
                f"{cal.measured.trace.path} ran on one rank, so it measured no link: give --delay MS (and "
                "--bandwidth GBIT), or --calibrate a trace of several ranks"
            )
        base = replace(ZERO_LINK, source={"bandwidth": "unlimited", **{f"overhead {k}": "0" for k in KINDS}})
    source = dict(base.source)
    latency, bandwidth = base.latency, base.bandwidth
    if t.delay_ms is not None:
        latency, source["latency"] = t.delay_ms / 1e3, "--delay"
    if t.bandwidth_gbit is not None:
        bandwidth, source["bandwidth"] = t.bandwidth_gbit * 1e9 / 8, "--bandwidth"
    return replace(base, latency=latency, bandwidth=bandwidth, source=source)


def _ratio(a: np.ndarray, b: np.ndarray, fallback: Any) -> np.ndarray:
    return np.where(b > 0, a / np.where(b > 0, b, 1.0), fallback)


def replay_compute(cal: Calibrated, shares: list[Share], t: Target, sources: list[int]) -> np.ndarray:
    """(n_steps, M, n_layers + 1, 4, 3) s of compute per block piece in the target.

    Each rank replays its source rank's timings, per step and block scaled by new model cost / source
    model cost. In the same role (holding the residual or not, same scheme) each piece scales by its own
    term: pre and post (rmsnorm, adds) by the residual term, mid by the rest. Across roles the block's
    total scales, and the model's residual share of it goes where the new role does that work: star's
    root normalises before the bcast and adds after the gather; under allreduce every rank normalises
    inside its block and adds after the allgather."""
    m = cal.measured
    out = np.zeros((len(m.steps.step), t.n_ranks) + m.comp.shape[2:])
    for r, src in enumerate(sources):
        rl_new, rl_src = role(r, t.n_ranks, t.sync, m.buffer), role(src, m.n_ranks, m.sync, m.buffer)
        res_new, rest_new = model_seconds(m, cal.coefs, shares[r], rl_new)  # (n_steps, 4) each
        res_src, rest_src = model_seconds(m, cal.coefs, m.shares[src], rl_src)
        meas = m.comp[:, src]  # (n_steps, L + 1, 4, 3)
        new = np.zeros_like(meas)
        if rl_new.owns == rl_src.owns and rl_new.scheme == rl_src.scheme:
            new[..., MID] = meas[..., MID] * _ratio(rest_new, rest_src, 1.0)[:, None, :]
            k_res = _ratio(res_new, res_src, 1.0)[:, None, :]
            new[..., PRE], new[..., POST] = meas[..., PRE] * k_res, meas[..., POST] * k_res
        else:
            c_new, c_src = res_new + rest_new, res_src + rest_src
            total = meas.sum(-1)  # (n_steps, L + 1, 4)
            scaled = total * _ratio(c_new, c_src, 0.0)[:, None, :]
            # a block the source never ran (embed on a star worker): the model, at the source's speed
            never = (c_src[:, EMBED] <= 0) & (c_new[:, EMBED] > 0)
            scaled[never, 0, EMBED] = c_new[never, EMBED] * cal.speeds[src]
            residual = scaled * _ratio(res_new, c_new, 0.0)[:, None, :]
            norm = residual / max(rl_new.passes, 1)  # one pass is rmsnorm, the others are adds
            new[..., POST] = residual - norm
            if rl_new.scheme == "star":
                new[..., PRE], new[..., MID] = norm, scaled - residual
            else:
                new[..., MID] = scaled - new[..., POST]
        out[:, r] = new / t.speed.get(r, 1.0)
    return out


def replay_excess(cal: Calibrated, t: Target, sources: list[int]) -> np.ndarray:
    """(n_steps, M, L + 1, 4, 2): each rank replays its source's collective noise where the wire is the same."""
    m = cal.measured
    out = np.zeros((len(m.steps.step), t.n_ranks) + cal.excess.shape[2:])
    for r, src in enumerate(sources):
        same_wire = t.sync == m.sync and (t.sync != "star" or (r == 0) == (src == 0))
        if same_wire and t.n_ranks > 1 and m.n_ranks > 1:
            out[:, r] = cal.excess[:, src]
    return out


@dataclass
class Timeline:
    """Every rank's clock through the replayed steps, and the segments it records (times: rank 0's clock)."""

    n_ranks: int
    link: Link
    t: np.ndarray = field(init=False)
    cols: dict[str, list[np.ndarray]] = field(init=False)

    def __post_init__(self) -> None:
        self.t = np.zeros(self.n_ranks)  # (M,) s, where each rank is
        self.cols = {k: [] for k in ("step", "rank", "layer", "seg", "t_start", "t_end", "bytes")}
        self.ranks = np.arange(self.n_ranks)

    def record(self, step: int, layer: int, seg: int, t1: np.ndarray, nbytes: Any = 0,
               mask: np.ndarray | None = None) -> None:
        idx = self.ranks if mask is None else self.ranks[mask]
        c = self.cols
        c["step"].append(np.full(len(idx), step))
        c["rank"].append(idx)
        c["layer"].append(np.full(len(idx), layer))
        c["seg"].append(np.full(len(idx), seg))
        c["t_start"].append(self.t[idx])
        c["t_end"].append(t1[idx])
        c["bytes"].append(np.broadcast_to(np.asarray(nbytes, np.float64), (self.n_ranks,))[idx])
        self.t = t1

    def compute(self, step: int, layer: int, seg: int, dur: np.ndarray) -> None:
        self.record(step, layer, seg, self.t + dur, 0, dur > 0)

    def collective(self, step: int, layer: int, seg: int, kind: int, payload: np.ndarray, noise: np.ndarray) -> None:
        """payload (M,) bytes each rank contributes; noise (M,) s beyond the model, replayed from the trace."""
        out = np.maximum(wire(kind, self.t, payload, self.link) + noise, self.t)
        total = payload.sum()
        recorded = {BCAST: payload[0], GATHER: np.where(self.ranks == 0, total, payload),
                    ALLGATHER: total}.get(kind, payload)  # bytes as the engine records them
        self.record(step, layer, seg, out, recorded)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.cols.items()}


def simulate(m: Measured, comp: np.ndarray, noise: np.ndarray, shares: list[Share], sync: str,
             link: Link) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Replay every finished step of the trace: (segment columns, step columns) of the projected run."""
    M = comp.shape[1]
    tl = Timeline(M, link)
    seg = {name: i for i, name in enumerate(SEGMENTS)}
    code = [seg[b] for b in BLOCKS]
    sync_code = [seg["ctrl_sync"]] + [seg[b + "_sync"] for b in BLOCKS[1:]]
    row = row_bytes(m.cfg.dim, m.buffer, M)
    block_wire = ALLGATHER if m.buffer == "q80" else ALLREDUCE
    head_bytes = np.array([s.vocab_rows * 4.0 if m.logits == "full" else ARGMAX_BYTES for s in shares])
    head_bytes[0] = 0.0  # rank 0 sends nothing to itself
    st = m.steps
    t_start, t_end = np.zeros(len(st.step)), np.zeros(len(st.step))
    layers = [(layer, b) for layer in range(m.cfg.n_layers) for b in (ATT, FFN)]
    for i, step in enumerate(st.step.tolist()):
        t_start[i] = tl.t[0]
        payload = np.full(M, float(st.tokens[i] * row))
        if M > 1:
            tl.collective(step, -1, sync_code[EMBED], BCAST, np.full(M, float(m.ctrl_bytes)), noise[i, :, 0, EMBED, 0])
        tl.compute(step, -1, code[EMBED], comp[i, :, 0, EMBED].sum(-1))
        for layer, b in layers + ([(-1, HEAD)] if st.head[i] else []):
            pc = comp[i, :, layer + 1, b]  # (M, 3)
            nz = noise[i, :, layer + 1, b]  # (M, 2)
            if M == 1 or (sync == "replicated" and b == ATT):  # replicated attention: no message
                tl.compute(step, layer, code[b], pc.sum(-1))
            elif sync == "star":
                tl.compute(step, layer, code[b], pc[:, PRE])
                tl.collective(step, layer, sync_code[b], BCAST, np.full(M, float(row)) if b == HEAD else payload,
                              nz[:, 0])
                tl.compute(step, layer, code[b], pc[:, MID])
                tl.collective(step, layer, sync_code[b], GATHER, head_bytes if b == HEAD else payload, nz[:, 1])
                tl.compute(step, layer, code[b], pc[:, POST])
            else:
                tl.compute(step, layer, code[b], pc[:, PRE] + pc[:, MID])
                if b == HEAD:
                    tl.collective(step, layer, sync_code[b], GATHER, head_bytes, nz[:, 0])
                else:
                    tl.collective(step, layer, sync_code[b], block_wire, payload, nz[:, 0])
                tl.compute(step, layer, code[b], pc[:, POST])
        t_end[i] = tl.t[0]
    cols = tl.arrays()
    order = np.lexsort((cols["t_start"], cols["rank"]))
    segments = {k: v[order] for k, v in cols.items()}
    steps = {"step": st.step, "phase": st.phase, "tokens": st.tokens, "position": st.position,
             "t_start": t_start, "t_end": t_end}
    return segments, steps


@dataclass(frozen=True)
class Projection:
    """One projected configuration: the target (sync resolved), the link and shares used, and the run."""

    target: Target
    link: Link
    shares: list[Share]
    sources: list[int]  # per rank: the trace rank whose timings it replays
    segments: dict[str, np.ndarray]  # /segments columns of the projected run, rank 0's clock
    steps: dict[str, np.ndarray]  # /steps columns

    def tok_s(self) -> dict[str, float]:
        """Per phase: tokens / seconds of rank 0's steps, as analysis.phase_table measures a trace."""
        st, out = self.steps, {}
        for code, name in enumerate(PHASES):
            m = st["phase"] == code
            seconds = float((st["t_end"] - st["t_start"])[m].sum())
            if m.any() and seconds > 0:
                out[name] = float(st["tokens"][m].sum()) / seconds
        return out

    def sync_share(self, phase: str = "decode") -> float | None:
        """Rank 0's fraction of the phase's time inside collectives."""
        st, s = self.steps, self.segments
        m = st["phase"] == PHASES.index(phase)
        wall = float((st["t_end"] - st["t_start"])[m].sum())
        if wall <= 0:
            return None
        codes = [i for i, n in enumerate(SEGMENTS) if n.endswith("_sync")]
        rows = (s["rank"] == 0) & np.isin(s["seg"], codes) & np.isin(s["step"], st["step"][m])
        return float((s["t_end"] - s["t_start"])[rows].sum()) / wall


def project(cal: Calibrated, target: Target) -> Projection:
    """Replay the trace in the target configuration (--sync auto: both strategies, the faster decode kept)."""
    check_target(target)
    m = cal.measured
    if target.sync == "auto":
        runs = [project(cal, replace(target, sync=s)) for s in ("star", "allreduce")]
        return max(runs, key=lambda p: (p.tok_s().get("decode", 0.0), p.tok_s().get("prefill", 0.0)))
    replicated = target.sync == "replicated"
    if target.weights is None and target.n_ranks == m.n_ranks and replicated == (m.sync == "replicated"):
        shares = m.shares
    else:  # the trace's own rank weights at its rank count, its attention split (or not) as the target's
        same = target.weights is None and target.n_ranks == m.n_ranks
        weights = tuple(s.weight for s in m.shares) if same else target.weights
        shares = shares_of_plan(m.cfg, target.n_ranks, weights, replicated)
    link = target_link(cal, target)
    fastest = int(np.argmin(cal.speeds))
    sources = [r if r < m.n_ranks and r not in target.speed else fastest for r in range(target.n_ranks)]
    comp = replay_compute(cal, shares, target, sources)
    noise = replay_excess(cal, target, sources)
    segments, steps = simulate(m, comp, noise, shares, target.sync, link)
    return Projection(target, link, shares, sources, segments, steps)


def projected_trace(cal: Calibrated, p: Projection) -> Trace:
    """The projected run as a Trace, for analysis.py (waits, straggler) and the projection's tables."""
    m = cal.measured
    n = p.target.n_ranks
    attrs = {
        "format": "mpillama-trace", "version": 1, "n_ranks": n, "partial": False, "partial_reason": "",
        "command": "trace project", "argv": "", "model": m.trace.attrs.get("model", ""), "sync": p.target.sync,
        "sync_reason": "projected", "buffer_float_type": m.buffer, "weight_type": m.trace.attrs.get("weight_type", ""),
        "nthreads": m.trace.attrs.get("nthreads", ""), "profile": "",
        "projected_from": m.trace.path, "projection": p.target.describe(),
    }
    share_cols = {k: np.array([getattr(s, k) for s in p.shares]) for k in ("n_heads", "n_kv_heads", "ffn_rows",
                                                                           "vocab_rows")}
    ranks = {
        "rank": np.arange(n), "host": np.array(["projected"] * n, dtype=object),
        "weight_share": np.array([s.weight for s in p.shares]), **share_cols,
        "clock_offset": np.zeros(n), "clock_drift": np.zeros(n),
        "clock_rtt": np.where(np.arange(n) > 0, 2 * p.link.latency, 0.0),
        "n_records": np.bincount(p.segments["rank"].astype(np.int64), minlength=n),
        "n_dropped": np.zeros(n, np.int64), "flush_s": np.zeros(n),
    }
    s, st = p.segments, p.steps
    return Trace(
        path=f"projection of {m.trace.path} onto {p.target.describe()}", attrs=attrs, ranks=ranks,
        segments=analysis.Segments(s["step"].astype(np.int32), s["rank"].astype(np.int16), s["layer"].astype(np.int16),
                                   s["seg"].astype(np.uint8), s["t_start"], s["t_end"], s["bytes"].astype(np.int64)),
        steps=analysis.Steps(st["step"].astype(np.int32), st["phase"].astype(np.uint8), st["tokens"].astype(np.int32),
                             st["position"].astype(np.int32), st["t_start"], st["t_end"]),
        segment_names=SEGMENTS, phase_names=PHASES,
    )


def write_projection(cal: Calibrated, p: Projection, path: str | Path) -> Path:
    """The projected run as a trace file: trace report and trace compare read it like a measured one."""
    from mpillama.trace.clock import ClockFit, ClockSample
    from mpillama.trace.session import TraceData, write_trace  # the h5py writer: only for --out

    t = projected_trace(cal, p)
    s = p.segments
    records = []
    for r in range(p.target.n_ranks):
        m = s["rank"] == r
        cols = [s[k][m] for k in ("step", "layer", "seg", "t_start", "t_end", "bytes")]
        records.append(np.stack(cols, axis=1).astype(np.float64))  # (n, 6) as Recorder.take packs them
    rows = [{"host": "projected", "pid": -1, "weight_share": sh.weight, "n_heads": sh.n_heads,
             "n_kv_heads": sh.n_kv_heads, "ffn_rows": sh.ffn_rows, "vocab_rows": sh.vocab_rows} for sh in p.shares]
    fits = [ClockFit(ClockSample(0.0, 0.0, 2 * p.link.latency if r else 0.0)) for r in range(p.target.n_ranks)]
    meta = {k: v for k, v in t.attrs.items() if k not in ("format", "version", "n_ranks", "partial", "partial_reason")}
    return write_trace(path, TraceData(meta=meta, rank_rows=rows, fits=fits, records=records, steps=dict(p.steps)))
