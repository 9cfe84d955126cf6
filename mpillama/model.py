"""One rank's share of the model: its weight slices, its KV-cache slice, and its forward pass.

Knows nothing of MPI. The forward pass is written over a Slice from partition.py and a
sync object from comm.py (star or allreduce), read top to bottom as in DESIGN.md:

    x = embed(tokens)                                   rank 0 (every rank under allreduce)
    for each layer:
        y = sync.block_input(x, attn_norm)              normalise, quantise, Bcast
        partial = attention(y)                          own heads, own KV cache, own Wo columns
        sync.block_output(partial, x)                   x += sum of partials
        y = sync.block_input(x, ffn_norm)
        partial = ffn(y)                                own FFN rows, own W2 columns
        sync.block_output(partial, x)
    y = sync.block_input(x[last], output_norm); logits rows = wcls[own rows] @ y

Weights are Q40 (repacked for the kernel) or f32 (--weight-type f32). wq/wk/wv are stacked
into one matrix and w1/w3 into another, so a block runs one matmul per input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mpillama import kernels
from mpillama.config import ModelConfig
from mpillama.partition import Slice, is_group_aligned, kv_groups
from mpillama.quant import dequantize_q40
from mpillama.trace.recorder import SEG_ATT, SEG_ATT_SYNC, SEG_EMBED, SEG_FFN, SEG_FFN_SYNC, SEG_HEAD, SEG_HEAD_SYNC

Matrix = Any  # kernels.Q40Matrix, or an f32 ndarray (rows, cols) with --weight-type f32


class WeightSource(Protocol):
    """Where a rank's slices come from: the model file (mmap) or rank 0 (scatter)."""

    def matrix(self, names: list[str], rows: list[tuple[int, int]] | None, cols: tuple[int, int] | None) -> Matrix:
        """The named matrices' given row ranges (and column range), stacked by rows."""

    def vector(self, name: str) -> np.ndarray:
        """A whole 1-D tensor as f32."""

    def embedding(self) -> tuple[str, np.ndarray]:
        """('q40', uint8 (vocab, dim/32*18)) or ('f32', f32 (vocab, dim))."""


def matmul(out: np.ndarray, w: Matrix, y: np.ndarray, acts: Any, T: int) -> None:
    """out (T, rows) = y (T, cols) @ w.T, from the f32 rows or the Q80 activations of y."""
    if isinstance(w, np.ndarray):
        kernels.matmul_f32(out, w, y)
    else:
        kernels.matmul_q40(out, w, acts, T)


def matmul_local(out: np.ndarray, w: Matrix, x: np.ndarray, acts: Any, T: int) -> None:
    """out (T, rows) = x (T, cols) @ w.T for an input this rank computed itself: a Q40 weight
    needs it as Q80 activations first (filled into acts)."""
    if isinstance(w, np.ndarray):
        kernels.matmul_f32(out, w, x)
    else:
        kernels.quantize_activations(acts, x)
        kernels.matmul_q40(out, w, acts, T)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray | None  # (dim,) f32, where the residual stream lives
    ffn_norm: np.ndarray | None  # (dim,) f32
    wqkv: Matrix  # (n_heads_local*hd + 2*n_kv_local*hd, dim): own q heads, own kv heads
    wo: Matrix  # (dim, n_heads_local*hd): the columns of own q heads
    w13: Matrix  # (2*ffn_local, dim): own rows of w1 then of w3
    w2: Matrix  # (dim, ffn_local): own columns
    q_norm: np.ndarray | None  # (hd,) f32, Qwen3
    k_norm: np.ndarray | None  # (hd,) f32


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
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        layers.append(
            LayerWeights(
                attn_norm=src.vector(p + "attn_norm") if owns_residual else None,
                ffn_norm=src.vector(p + "ffn_norm") if owns_residual else None,
                wqkv=src.matrix([p + "attn_q", p + "attn_k", p + "attn_v"], [q_rows, kv_rows, kv_rows], None),
                wo=src.matrix([p + "attn_output"], None, q_rows),
                w13=src.matrix([p + "ffn_gate", p + "ffn_up"], [slc.ffn_rows, slc.ffn_rows], None),
                w2=src.matrix([p + "ffn_down"], None, slc.ffn_rows),
                q_norm=src.vector(p + "attn_q_norm") if cfg.qk_norm else None,
                k_norm=src.vector(p + "attn_k_norm") if cfg.qk_norm else None,
            )
        )
    head_name = "token_embd" if cfg.tied_embeddings else "output"
    return RankWeights(
        layers=layers,
        wcls=src.matrix([head_name], [slc.vocab_rows], None),
        output_norm=src.vector("output_norm") if owns_residual else None,
        embedding=src.embedding() if owns_residual else None,
    )


class RankModel:
    """Scratch buffers and KV cache sized once from the slice; forward() allocates nothing."""

    def __init__(self, cfg: ModelConfig, slc: Slice, weights: RankWeights, max_seq_len: int, max_tokens: int,
                 sync: Any) -> None:
        self.cfg, self.slc, self.w, self.sync = cfg, slc, weights, sync
        self.max_seq_len, self.max_tokens = max_seq_len, max_tokens
        hd, dim = cfg.head_dim, cfg.dim
        nq, nkv, nf = slc.n_heads, slc.n_kv_heads, slc.n_ffn_rows
        self.q_dim, self.kv_dim = nq * hd, nkv * hd
        self.aligned = is_group_aligned(cfg, slc)
        self.groups = kv_groups(cfg, slc)
        self.residual = sync.owns_residual()
        T = max_tokens
        self.x = np.zeros((T, dim), dtype=np.float32) if self.residual else None  # (max_tokens, dim) residual
        self.qkv = np.zeros((T, self.q_dim + 2 * self.kv_dim), dtype=np.float32)  # (max_tokens, q+k+v local) f32
        self.q = np.zeros((T, nq, hd), dtype=np.float32)  # (max_tokens, n_heads_local, hd)
        self.k = np.zeros((T, nkv, hd), dtype=np.float32)  # (max_tokens, n_kv_local, hd)
        self.z = np.zeros((T, nq, hd), dtype=np.float32)  # (max_tokens, n_heads_local, hd) attention output
        self.z_acts = kernels.new_activations(T, self.q_dim)
        self.h13 = np.zeros((T, 2 * nf), dtype=np.float32)  # (max_tokens, 2*ffn_local) w1 and w3 outputs
        self.h = np.zeros((T, nf), dtype=np.float32)  # (max_tokens, ffn_local) silu(w1 y) * w3 y
        self.h_acts = kernels.new_activations(T, nf)
        self.partial = np.zeros((T, dim), dtype=np.float32)  # (max_tokens, dim) this rank's block output
        self.logits = np.zeros((1, slc.n_vocab_rows), dtype=np.float32)  # (1, vocab_local)
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
        if kind == "q40":
            self.x[:T] = dequantize_q40(table[tokens])
        else:
            self.x[:T] = table[tokens]
        tl.mark(SEG_EMBED)

    # -- blocks -----------------------------------------------------------------------
    def attention(self, layer: int, y: np.ndarray, acts: Any, pos0: int, T: int) -> np.ndarray:
        """This rank's partial of Wo @ attention(y) for its query heads; appends its K/V rows."""
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
        partial = self.partial[:T]
        matmul_local(partial, lw.wo, z.reshape(T, qd), self.z_acts, T)
        return partial

    def ffn(self, layer: int, y: np.ndarray, acts: Any, T: int) -> np.ndarray:
        """This rank's partial of W2 @ (silu(W1 y) * W3 y) over its hidden rows."""
        lw = self.w.layers[layer]
        h13, h = self.h13[:T], self.h[:T]
        matmul(h13, lw.w13, y, acts, T)
        kernels.swiglu(h, h13)
        partial = self.partial[:T]
        matmul_local(partial, lw.w2, h, self.h_acts, T)
        return partial

    # -- one forward pass ---------------------------------------------------------------
    def forward(self, tokens: np.ndarray | None, pos0: int, T: int, tl: Any, want_logits: bool) -> np.ndarray | None:
        """Run T tokens at positions pos0.. through every layer; returns this rank's logits rows
        for the last token (or None when want_logits is False, e.g. a prefill chunk)."""
        sync, eps = self.sync, self.cfg.norm_eps
        x = self.x[:T] if self.x is not None else None
        if x is not None:
            self.embed(tokens, tl)
        for layer, lw in enumerate(self.w.layers):
            y, acts = sync.block_input(x, lw.attn_norm, eps, T, tl, layer, SEG_ATT, SEG_ATT_SYNC)
            partial = self.attention(layer, y, acts, pos0, T)
            sync.block_output(partial, x, T, tl, layer, SEG_ATT, SEG_ATT_SYNC)
            y, acts = sync.block_input(x, lw.ffn_norm, eps, T, tl, layer, SEG_FFN, SEG_FFN_SYNC)
            partial = self.ffn(layer, y, acts, T)
            sync.block_output(partial, x, T, tl, layer, SEG_FFN, SEG_FFN_SYNC)
        if not want_logits:
            return None
        last = x[T - 1 : T] if x is not None else None
        y, acts = sync.block_input(last, self.w.output_norm, eps, 1, tl, -1, SEG_HEAD, SEG_HEAD_SYNC)
        matmul(self.logits, self.w.wcls, y, acts, 1)
        tl.mark(SEG_HEAD)
        return self.logits[0]
