"""One rank's share of the model: its weight slices, its KV-cache slice, and its forward pass.

Knows nothing of MPI: the whole math of a token is here, and a sync object from comm.py
(star or allreduce) is only the wire between blocks. Read top to bottom as in DESIGN.md:

    x = embed(tokens)                                   rank 0 (every rank under allreduce)
    for each layer:
        y = block_input(x, attn_norm)                   rmsnorm, Q80; star: rank 0 spreads it
        partial = attention(y)                          own heads, own KV cache, own Wo columns
        block_output(partial, x)                        x += sum of every rank's partial
                                                        (replicated: every head here, x += own, no message)
        y = block_input(x, ffn_norm)
        partial = ffn(y)                                own FFN rows, own W2 columns
                                                        (MoE: the router on every rank, then own rows of
                                                        each chosen expert, weighted: see moe())
        block_output(partial, x)
    y = block_input(x[last], output_norm); logits rows = wcls[own rows] @ y
    head: the greedy token (each rank's best row, the best of those) or the whole row on rank 0

Sync payloads are Q80 rows (--buffer-float-type q80) or f32 rows. Weights are a registered kind
(kernels/weights.py: Q40, Q80, ... laid out for their kernel) or f32 (--weight-type f32). wq/wk/wv
are stacked into one matrix and w1/w3 into another, so a block runs one matmul per input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mpillama import kernels
from mpillama.config import ModelConfig
from mpillama.formats.tensors import expert_name
from mpillama.partition import Slice, is_group_aligned, kv_groups
from mpillama.quant import Q80_BLOCK_BYTES, QK
from mpillama.trace.recorder import (
    SEG_ATT, SEG_ATT_SYNC, SEG_EMBED, SEG_EXPERTS, SEG_FFN, SEG_FFN_SYNC, SEG_HEAD, SEG_HEAD_SYNC, SEG_ROUTE, Timeline,
)

Matrix = Any  # a registered kind's matrix (kernels.weights), or an f32 ndarray (rows, cols) with --weight-type f32

# What a forward pass returns besides the KV rows it appends (the control message carries it)
LOGITS_NONE = 0  # nothing (prefill chunks before the last)
LOGITS_ARGMAX = 1  # the greedy token: each rank sends only its best (value, index)
LOGITS_FULL = 2  # the whole row on rank 0 (sampling, --dump-logits)


OVERLAP_MIN_TOKENS = 8  # a prefill chunk smaller than this would read its matrix for too little work


@dataclass(frozen=True)
class Projection:
    """A block's output projection still to run: partial (T, dim) = inp (T, cols) @ w.T.
    w None: the partial is already computed (the experts' weighted sum, see RankModel.moe)."""

    w: Matrix | None
    inp: np.ndarray  # (T, cols) f32 rows this rank computed (attention's z, the FFN's h)
    acts: Any  # Q80 scratch for inp


@dataclass(frozen=True)
class Segments:
    """The trace segments of one kind of block: its compute and its collective."""

    compute: int
    sync: int


ATT, FFN, HEAD = Segments(SEG_ATT, SEG_ATT_SYNC), Segments(SEG_FFN, SEG_FFN_SYNC), Segments(SEG_HEAD, SEG_HEAD_SYNC)


class WeightSource(Protocol):
    """Where a rank's slices come from: the model file (mmap) or rank 0 (scatter)."""

    def matrix(self, names: list[str], rows: list[tuple[int, int]] | None, cols: tuple[int, int] | None) -> Matrix:
        """The named matrices' given row ranges (and column range), stacked by rows."""

    def vector(self, name: str) -> np.ndarray:
        """A whole tensor as f32: a norm, or a MoE router (n_experts, dim), which every rank holds whole."""

    def embedding(self) -> tuple[str, np.ndarray]:
        """(a registered kind, uint8 (vocab, GGML row bytes)) or ('f32', f32 (vocab, dim))."""


def matmul(out: np.ndarray, w: Matrix, y: np.ndarray, acts: Any, T: int) -> None:
    """out (T, rows) = y (T, cols) @ w.T, from the f32 rows or the Q80 activations of y."""
    if isinstance(w, np.ndarray):
        kernels.matmul_f32(out, w, y)
    else:
        kernels.matmul_weights(out, w, acts, T)


def quantize_and_matmul(out: np.ndarray, w: Matrix, x: np.ndarray, acts: Any, T: int) -> None:
    """out (T, rows) = x (T, cols) @ w.T for f32 rows this rank computed itself: a quantized weight needs
    them as Q80 activations first (filled into acts)."""
    if isinstance(w, np.ndarray):
        kernels.matmul_f32(out, w, x)
    else:
        kernels.quantize_activations(acts, x)
        kernels.matmul_weights(out, w, acts, T)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray | None  # (dim,) f32, where the residual stream lives
    ffn_norm: np.ndarray | None  # (dim,) f32
    wqkv: Matrix  # (n_heads_local*hd + 2*n_kv_local*hd, dim): own q heads, own kv heads
    wo: Matrix  # (dim, n_heads_local*hd): the columns of own q heads
    w13: Matrix | None  # (2*ffn_local, dim): own rows of w1 then of w3 (None in a MoE layer)
    w2: Matrix | None  # (dim, ffn_local): own columns
    q_norm: np.ndarray | None  # (hd,) f32, Qwen3
    k_norm: np.ndarray | None  # (hd,) f32
    router: np.ndarray | None = None  # MoE: (n_experts, dim) f32, whole on every rank
    experts: list[tuple[Matrix, Matrix]] | None = None  # MoE: per expert (w13, w2) of own rows, as w13/w2


@dataclass
class RankWeights:
    layers: list[LayerWeights]
    wcls: Matrix  # (vocab_local, dim)
    output_norm: np.ndarray | None  # (dim,) f32
    embedding: tuple[str, np.ndarray] | None  # see WeightSource.embedding; only where x lives


def load_weights(cfg: ModelConfig, slc: Slice, src: WeightSource, owns_residual: bool) -> RankWeights:
    """Read this rank's slices of every tensor, in file order per layer."""
    hd = cfg.head_dim
    q_rows = (slc.q_heads[0] * hd, slc.q_heads[1] * hd)
    kv_rows = (slc.kv_heads[0] * hd, slc.kv_heads[1] * hd)
    layers = []
    rows = slc.ffn_rows
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        lw = LayerWeights(
            attn_norm=src.vector(p + "attn_norm") if owns_residual else None,
            ffn_norm=src.vector(p + "ffn_norm") if owns_residual else None,
            wqkv=src.matrix([p + "attn_q", p + "attn_k", p + "attn_v"], [q_rows, kv_rows, kv_rows], None),
            wo=src.matrix([p + "attn_output"], None, q_rows),
            w13=None if cfg.is_moe else src.matrix([p + "ffn_gate", p + "ffn_up"], [rows, rows], None),
            w2=None if cfg.is_moe else src.matrix([p + "ffn_down"], None, rows),
            q_norm=src.vector(p + "attn_q_norm") if cfg.qk_norm else None,
            k_norm=src.vector(p + "attn_k_norm") if cfg.qk_norm else None,
        )
        if cfg.is_moe:  # every expert's own rows, like a dense FFN's (partition.py says why)
            lw.router = src.vector(p + "ffn_gate_inp")
            lw.experts = [(src.matrix([expert_name(i, "ffn_gate_exps", e), expert_name(i, "ffn_up_exps", e)],
                                      [rows, rows], None),
                           src.matrix([expert_name(i, "ffn_down_exps", e)], None, rows))
                          for e in range(cfg.n_experts)]
        layers.append(lw)
    head_name = "token_embd" if cfg.tied_embeddings else "output"
    return RankWeights(
        layers=layers,
        wcls=src.matrix([head_name], [slc.vocab_rows], None),
        output_norm=src.vector("output_norm") if owns_residual else None,
        embedding=src.embedding() if owns_residual else None,
    )


def q80_row_bytes(n: int) -> int:
    return n // QK * Q80_BLOCK_BYTES


class RankModel:
    """Scratch buffers and KV cache sized once from the slice; forward() allocates nothing.

    slices: every rank's slice (where each rank's logits rows land on rank 0); rank, n_ranks:
    this rank's place; buffer_type: what the sync payloads carry (q80 or f32); overlap_chunks: see
    _overlapped_output (comm.choose_overlap measures whether it pays).
    """

    def __init__(self, cfg: ModelConfig, slices: list[Slice], rank: int, weights: RankWeights, max_seq_len: int,
                 max_tokens: int, sync: Any, buffer_type: str, overlap_chunks: int = 1) -> None:
        slc = slices[rank]
        self.cfg, self.slc, self.w, self.sync = cfg, slc, weights, sync
        self.rank, self.n_ranks = rank, len(slices)
        self.overlap_chunks = overlap_chunks  # prefill block outputs go on the wire in this many chunks
        self.max_seq_len, self.max_tokens = max_seq_len, max_tokens
        hd, dim = cfg.head_dim, cfg.dim
        nq, nkv, nf = slc.n_heads, slc.n_kv_heads, slc.n_ffn_rows
        self.q_dim, self.kv_dim = nq * hd, nkv * hd
        self.aligned = is_group_aligned(cfg, slc)
        self.groups = kv_groups(cfg, slc)
        T, n_ranks = max_tokens, self.n_ranks
        self.x = np.zeros((T, dim), dtype=np.float32) if sync.owns_residual else None  # (max_tokens, dim) residual
        # -- block input and output, and what the wire carries of them
        self.q80_wire = buffer_type == "q80" and n_ranks > 1  # one rank sends nothing: no rounding
        self.f32_weights = any(isinstance(lw.wqkv, np.ndarray) for lw in weights.layers)
        width = q80_row_bytes(dim) if self.q80_wire else dim * 4
        self.y = np.zeros((T, dim), dtype=np.float32)  # (max_tokens, dim) f32 normalised block input
        self.y_acts = kernels.new_activations(T, dim)  # the same as Q80 activations
        self.in_payload = np.zeros((T, width), dtype=np.uint8)  # (max_tokens, payload) block input on the wire
        self.out_payload = np.zeros((T, width), dtype=np.uint8)  # (max_tokens, payload) this rank's partial
        # star: rank 0 receives every rank's partial; allreduce (Q80): every rank receives every one
        receives = rank == 0 if sync.name == "star" else self.q80_wire
        n_recv = n_ranks if receives and n_ranks > 1 else 0
        self.recv = np.zeros((n_recv, T, width), dtype=np.uint8)  # (n_ranks, max_tokens, payload)
        self.total = np.zeros((T, dim), dtype=np.float32)  # (max_tokens, dim) f32 sum of partials (allreduce, f32)
        self.qkv = np.zeros((T, self.q_dim + 2 * self.kv_dim), dtype=np.float32)  # (max_tokens, q+k+v local) f32
        self.q = np.zeros((T, nq, hd), dtype=np.float32)  # (max_tokens, n_heads_local, hd)
        self.k = np.zeros((T, nkv, hd), dtype=np.float32)  # (max_tokens, n_kv_local, hd)
        self.z = np.zeros((T, nq, hd), dtype=np.float32)  # (max_tokens, n_heads_local, hd) attention output
        self.z_acts = kernels.new_activations(T, self.q_dim)
        self.h13 = np.zeros((T, 2 * nf), dtype=np.float32)  # (max_tokens, 2*ffn_local) w1 and w3 outputs
        self.h = np.zeros((T, nf), dtype=np.float32)  # (max_tokens, ffn_local) silu(w1 y) * w3 y
        self.h_acts = kernels.new_activations(T, nf)
        if cfg.is_moe:  # the router's output, and one expert's gathered input rows and output
            self.router_logits = np.zeros((T, cfg.n_experts), dtype=np.float32)  # (max_tokens, n_experts) f32
            self.moe_y = np.zeros((T, dim), dtype=np.float32)  # (max_tokens, dim) rows routed to one expert
            self.moe_acts = kernels.new_activations(T, dim)
            self.moe_out = np.zeros((T, dim), dtype=np.float32)  # (max_tokens, dim) one expert's partial
        self.partial = np.zeros((T, dim), dtype=np.float32)  # (max_tokens, dim) this rank's block output
        self.logits = np.zeros((1, slc.n_vocab_rows), dtype=np.float32)  # (1, vocab_local)
        self.vocab_rows = [s.vocab_rows for s in slices]
        self.full_logits = np.zeros(cfg.vocab_size if rank == 0 else 0, dtype=np.float32)  # (vocab,) rank 0
        self.best = np.zeros(2, dtype=np.float64)  # (value, index) of this rank's best logit
        self.all_best = np.zeros((n_ranks, 2), dtype=np.float64)  # (n_ranks, 2) on rank 0
        # (n_layers, max_seq_len, n_kv_local, hd) f32 each
        self.k_cache = np.zeros((cfg.n_layers, max_seq_len, nkv, hd), dtype=np.float32)
        self.v_cache = np.zeros((cfg.n_layers, max_seq_len, nkv, hd), dtype=np.float32)
        self.att_scratch = kernels.new_attention_scratch(max_seq_len, nq, hd)
        # query heads that straddle KV groups run one attention call per KV head, each its own scratch
        self.group_scratch = [] if self.aligned else [kernels.new_attention_scratch(max_seq_len, b - a, hd)
                                                      for _, a, b in self.groups]
        self.cos, self.sin = kernels.rope_tables(hd, max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.positions = np.arange(max_seq_len, dtype=np.int64)  # (max_seq_len,) sliced per call

    # -- the residual stream ------------------------------------------------------------
    def embed(self, tokens: np.ndarray, tl: Any) -> None:
        assert self.x is not None and self.w.embedding is not None
        kind, table = self.w.embedding
        T = len(tokens)
        if kind == "f32":
            self.x[:T] = table[tokens]
        else:  # a registered kind's GGML rows: only the prompt's rows are dequantized
            self.x[:T] = kernels.KINDS[kind].dequantize(table[tokens])
        tl.mark(SEG_EMBED)

    # -- blocks -----------------------------------------------------------------------
    def attention(self, layer: int, y: np.ndarray, acts: Any, pos0: int, T: int) -> Projection:
        """attention(y) for this rank's query heads, appending its K/V rows; returns the output
        projection still to run (its partial of Wo @ z: block_output runs it, maybe in chunks)."""
        lw, cfg = self.w.layers[layer], self.cfg
        hd, qd, kvd = cfg.head_dim, self.q_dim, self.kv_dim
        qkv = self.qkv[:T]
        matmul(qkv, lw.wqkv, y, acts, T)
        q, k = self.q[:T], self.k[:T]
        q.reshape(T, qd)[:] = qkv[:, :qd]
        k.reshape(T, kvd)[:] = qkv[:, qd : qd + kvd]
        if cfg.qk_norm:
            kernels.rmsnorm(q.reshape(-1, hd), q.reshape(-1, hd), lw.q_norm, cfg.norm_eps)
            kernels.rmsnorm(k.reshape(-1, hd), k.reshape(-1, hd), lw.k_norm, cfg.norm_eps)
        positions = self.positions[pos0 : pos0 + T]
        halves = cfg.rope_style == "halves"
        kernels.rope(q, positions, self.cos, self.sin, halves)
        kernels.rope(k, positions, self.cos, self.sin, halves)
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        k_cache[pos0 : pos0 + T] = k
        v_cache[pos0 : pos0 + T] = qkv[:, qd + kvd :].reshape(T, self.slc.n_kv_heads, hd)
        z = self.z[:T]
        if self.aligned:
            kernels.attention(z, q, k_cache, v_cache, pos0, T, self.att_scratch)
        else:  # query heads that straddle KV groups (more ranks than KV heads): one call per KV head
            for (kv, a, b), scratch in zip(self.groups, self.group_scratch):
                kernels.attention(z[:, a:b], q[:, a:b], k_cache[:, kv : kv + 1], v_cache[:, kv : kv + 1], pos0, T,
                                  scratch)
        return Projection(lw.wo, z.reshape(T, qd), self.z_acts)

    def ffn(self, layer: int, y: np.ndarray, acts: Any, T: int) -> Projection:
        """silu(W1 y) * W3 y over this rank's hidden rows; returns the projection by W2 still to run."""
        lw = self.w.layers[layer]
        h13, h = self.h13[:T], self.h[:T]
        matmul(h13, lw.w13, y, acts, T)
        kernels.swiglu(h, h13)
        return Projection(lw.w2, h, self.h_acts)

    def route(self, layer: int, y: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
        """The experts each token uses and their weights, (T, k) each, as Hugging Face's
        Qwen3MoeSparseMoeBlock and llama.cpp's qwen3moe graph: logits = router @ y in f32, softmax
        over all experts, the k largest, renormalised to sum to 1 (norm_topk_prob). Every rank
        computes it from the same y, so every rank picks the same experts with no message."""
        cfg, logits, router = self.cfg, self.router_logits[:T], self.w.layers[layer].router
        # a row at a time through the numba kernel (which follows --nthreads), not numpy's BLAS: its
        # threads start with numpy's import, one per core, and on a busy host a batch's router product
        # was measured at 183 ms a layer for 39 tokens instead of under 1 ms
        for t in range(T):
            kernels.matmul_f32(logits[t : t + 1], router, y[t : t + 1])
        # a stable sort of the negated logits: on a tie the lower expert index, on every rank alike
        top = np.argsort(-logits, axis=1, kind="stable")[:, : cfg.n_experts_used]  # (T, k) expert ids
        chosen = np.take_along_axis(logits, top, axis=1)  # (T, k) f32, largest first
        weights = np.exp(chosen - chosen[:, :1])  # softmax numerators, shifted by each row's largest logit
        # renormalised over the k chosen, the softmax's sum over all experts cancels: only theirs is needed
        total = weights if cfg.norm_topk_prob else np.exp(logits - chosen[:, :1])
        weights /= total.sum(axis=1, keepdims=True)
        return top, weights

    def moe(self, layer: int, y: np.ndarray, acts: Any, T: int, tl: Timeline) -> Projection:
        """The mixture of experts over this rank's rows of every expert: partial[t] = sum over the
        token's chosen experts e of weight * W2_e[:, own] silu(W1_e[own] y) * W3_e[own] y. The batch's
        tokens are grouped by expert, so each chosen expert's weights are read once per batch: its
        tokens' rows are gathered, run as one matmul, and their weighted outputs added back."""
        lw = self.w.layers[layer]
        top, weights = self.route(layer, y, T)
        tl.mark(SEG_ROUTE, layer)
        partial = self.partial[:T]
        partial[:] = 0.0
        if T == 1:  # decode: each chosen expert on the one token, in expert order as a batch sums them
            out = self.moe_out[:1]
            for j in np.argsort(top[0]).tolist():
                w13, w2 = lw.experts[int(top[0, j])]
                matmul(self.h13[:1], w13, y, acts, 1)
                kernels.swiglu(self.h[:1], self.h13[:1])
                quantize_and_matmul(out, w2, self.h[:1], self.h_acts, 1)
                out *= weights[0, j]
                partial += out
            tl.mark(SEG_EXPERTS, layer)
            return Projection(None, partial, None)
        flat = top.reshape(-1)
        order = np.argsort(flat, kind="stable")  # (T*k,) assignments grouped by expert, tokens in order
        experts, starts = np.unique(flat[order], return_index=True)
        ends = np.append(starts[1:], flat.size)
        for e, a, b in zip(experts.tolist(), starts.tolist(), ends.tolist()):
            w13, w2 = lw.experts[e]
            n = b - a
            tokens = order[a:b] // top.shape[1]  # (n,) distinct: a token picks an expert at most once
            h13, h, out = self.h13[:n], self.h[:n], self.moe_out[:n]
            if n == T:  # every token of the batch: y and its activations as they are
                matmul(h13, w13, y, acts, T)
            else:
                rows = self.moe_y[:n]
                np.take(y, tokens, axis=0, out=rows)
                quantize_and_matmul(h13, w13, rows, self.moe_acts, n)
            kernels.swiglu(h, h13)
            quantize_and_matmul(out, w2, h, self.h_acts, n)
            out *= weights.reshape(-1)[order[a:b], None]
            partial[tokens] += out
        tl.mark(SEG_EXPERTS, layer)
        return Projection(None, partial, None)

    # -- between blocks: the residual stream and the wire ---------------------------------------
    def block_input(self, x: np.ndarray | None, norm: np.ndarray | None, T: int, tl: Timeline, layer: int,
                    seg: Segments) -> tuple[np.ndarray, Any]:
        """y = rmsnorm(x) on every rank, as f32 rows and as Q80 activations for the kernels."""
        y, acts, eps = self.y[:T], self.y_acts, self.cfg.norm_eps
        if not self.sync.spreads_input:  # x is here: one rank, or allreduce
            kernels.rmsnorm(y, x, norm, eps)
            kernels.quantize_activations(acts, y)
            if self.n_ranks == 1:
                tl.mark(seg.compute, layer)
            return y, acts
        # star: rank 0 normalises and spreads y; every rank, rank 0 too, then computes with what was sent
        payload = self.in_payload[:T]
        if self.rank == 0:
            kernels.rmsnorm(y, x, norm, eps)
            self._encode(payload, y)
        tl.mark(seg.compute, layer)
        self.sync.spread(payload)
        tl.mark(seg.sync, layer, payload.nbytes)
        if self.q80_wire:
            kernels.activations_from_q80(acts, payload)
            if self.f32_weights or self.cfg.is_moe:  # f32 weights and the router read y itself: what was sent
                y[:] = 0.0
                kernels.dequantize_q80_add(y, payload)
        else:
            if self.rank != 0:
                y[:] = payload.view(np.float32)
            kernels.quantize_activations(acts, y)
        return y, acts

    def block_output(self, proj: Projection, x: np.ndarray | None, T: int, tl: Timeline, layer: int,
                     seg: Segments) -> None:
        """partial = this rank's output projection; x += the sum of every rank's partial, where x lives
        (rank 0 under star, every rank under allreduce). Replicated attention holds every head: its
        partial is the whole sum, added on every rank with no message (the same x everywhere, since
        every rank computed it from the same x)."""
        partial = self.partial[:T]
        local = self.n_ranks == 1 or (seg is ATT and self.sync.name == "replicated")  # the whole sum is here
        exchanged = not local and self.sync.name != "star" and self.q80_wire  # Q80 partials to every rank
        if exchanged and self.overlap_chunks > 1 and T >= 2 * OVERLAP_MIN_TOKENS:
            self._overlapped_output(proj, partial, x, T, tl, layer, seg)
            return
        if proj.w is not None:
            quantize_and_matmul(partial, proj.w, proj.inp, proj.acts, T)
        if local:
            x += partial
            tl.mark(seg.compute, layer)
            return
        send = self.out_payload[:T]
        if self.sync.name == "star":
            if self.rank != 0:
                self._encode(send, partial)
            tl.mark(seg.compute, layer)
            recv = [self.recv[r, :T] for r in range(self.n_ranks)] if self.rank == 0 else None
            self.sync.collect(send, recv)
            tl.mark(seg.sync, layer, send.nbytes * (self.n_ranks - 1 if self.rank == 0 else 1))
            if self.rank == 0:
                x += partial
                for r in range(1, self.n_ranks):
                    self._decode_add(x, self.recv[r, :T])
                tl.mark(seg.compute, layer)
            return
        if self.q80_wire:
            kernels.quantize_q80_into(send, partial)
            tl.mark(seg.compute, layer)
            # everyone's partial on every rank, summed in rank order: the same x everywhere
            recv = self.recv.reshape(-1)[: self.n_ranks * send.size].reshape(self.n_ranks, *send.shape)
            self.sync.exchange(send, recv)
            tl.mark(seg.sync, layer, send.nbytes * self.n_ranks)
            for r in range(self.n_ranks):
                kernels.dequantize_q80_add(x, recv[r])
        else:
            total = self.total[:T]
            total[:] = partial
            tl.mark(seg.compute, layer)
            self.sync.sum(total)
            tl.mark(seg.sync, layer, total.nbytes)
            x += total
        tl.mark(seg.compute, layer)

    def _overlapped_output(self, proj: Projection, partial: np.ndarray, x: np.ndarray, T: int, tl: Timeline,
                           layer: int, seg: Segments) -> None:
        """block_output for a prefill batch under allreduce: the projection runs in token chunks, and
        each chunk's Q80 rows go on the wire while the next chunk computes. The sum is the same
        rank-ordered sum of the same bytes as unchunked: the same x, bit for bit."""
        send, n = self.out_payload[:T], self.n_ranks
        recv = self.recv.reshape(-1)[: n * send.size].reshape(n, *send.shape)
        pending = []
        bounds = np.linspace(0, T, self.overlap_chunks + 1).astype(int)
        for c0, c1 in zip(bounds[:-1], bounds[1:]):
            if proj.w is not None:
                quantize_and_matmul(partial[c0:c1], proj.w, proj.inp[c0:c1], proj.acts, c1 - c0)
            kernels.quantize_q80_into(send[c0:c1], partial[c0:c1])
            pending.append(self.sync.start_exchange(send[c0:c1], recv[:, c0:c1]))
        tl.mark(seg.compute, layer)
        for p in pending:
            self.sync.finish(p)
        tl.mark(seg.sync, layer, send.nbytes * n)
        for r in range(n):
            kernels.dequantize_q80_add(x, recv[r])
        tl.mark(seg.compute, layer)

    def _encode(self, payload: np.ndarray, rows: np.ndarray) -> None:
        if self.q80_wire:
            kernels.quantize_q80_into(payload, rows)
        else:
            payload.view(np.float32)[:] = rows

    def _decode_add(self, acc: np.ndarray, payload: np.ndarray) -> None:
        if self.q80_wire:
            kernels.dequantize_q80_add(acc, payload)
        else:
            acc += payload.view(np.float32)

    # -- one forward pass ---------------------------------------------------------------
    def forward(self, tokens: np.ndarray | None, pos0: int, T: int, tl: Timeline, mode: int) -> int | None:
        """Run T tokens at positions pos0.. through every layer (every rank; tokens matter only where x
        lives), then the head as mode says (LOGITS_*). Returns the greedy token on rank 0 for
        LOGITS_ARGMAX; with LOGITS_FULL the whole row is in self.full_logits on rank 0."""
        x = self.x[:T] if self.x is not None else None
        if x is not None:
            self.embed(tokens, tl)
        for layer, lw in enumerate(self.w.layers):
            y, acts = self.block_input(x, lw.attn_norm, T, tl, layer, ATT)
            self.block_output(self.attention(layer, y, acts, pos0, T), x, T, tl, layer, ATT)
            y, acts = self.block_input(x, lw.ffn_norm, T, tl, layer, FFN)
            proj = self.moe(layer, y, acts, T, tl) if lw.experts is not None else self.ffn(layer, y, acts, T)
            self.block_output(proj, x, T, tl, layer, FFN)
        if mode == LOGITS_NONE:
            return None
        last = x[T - 1 : T] if x is not None else None  # only the last token's row needs the head
        y, acts = self.block_input(last, self.w.output_norm, 1, tl, -1, HEAD)
        matmul(self.logits, self.w.wcls, y, acts, 1)
        local = self.logits[0]
        v0 = self.slc.vocab_rows[0]
        if mode == LOGITS_FULL:
            recv = None
            if self.rank == 0:
                self.full_logits[v0 : v0 + local.size] = local
                recv = [self.full_logits[a:b] for a, b in self.vocab_rows]
            tl.mark(SEG_HEAD)
            self.sync.collect(local, recv)
            tl.mark(SEG_HEAD_SYNC, -1, local.nbytes)
            return None
        i = int(np.argmax(local))
        self.best[0], self.best[1] = local[i], v0 + i
        tl.mark(SEG_HEAD)
        self.sync.collect(self.best, [self.all_best[r] for r in range(self.n_ranks)] if self.rank == 0 else None)
        tl.mark(SEG_HEAD_SYNC, -1, self.best.nbytes)
        if self.rank != 0:
            return None
        self.all_best[0] = self.best
        # the highest value; on a tie the lowest vocabulary index, as np.argmax over the full row
        order = np.lexsort((self.all_best[:, 1], -self.all_best[:, 0]))
        return int(self.all_best[order[0], 1])
