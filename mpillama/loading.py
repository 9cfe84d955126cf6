"""Loading a model over the ranks: open the file, plan the slices, read and pack each rank's
weights, build the tokenizer on rank 0 alongside, warm the kernels up, open the trace.

Collective: every rank calls load_engine; any rank's failure before the first forward pass
is agreed by all of them (comm.agree) and raised on every rank as one error.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from mpillama import __version__, faults, kernels, partition
from mpillama.kernels.cache import cache_is_warm, compiled_in_this_process
from mpillama.comm import Comm, choose_overlap, choose_sync, hostname, library_version, make_sync
from mpillama.config import RunConfig, model_config_json
from mpillama.engine import Engine
from mpillama.model import LOGITS_ARGMAX, LOGITS_FULL, LOGITS_NONE, RankModel, load_weights, q80_row_bytes
from mpillama.output import end_job, say
from mpillama.quant import Q40_BLOCK_BYTES, QK
from mpillama.rank_speed import measure_rank_speed
from mpillama.trace.recorder import SEG_LOAD, NullRecorder, Timeline
from mpillama.trace.session import TraceSession
from mpillama.weight_source import describe_kinds, ffn_unit, kept_kinds, open_weight_source


WARM_UP_TIMEOUT = 900.0  # s the warm-up's collectives may wait for a rank still compiling
REPLICATED_SPEED_S = 0.1  # s of timed Q40 matmul behind --sync auto's cost of replicated attention
REPLICATED_STREAM_MB = 64  # ... rotating over this much of it, more than a board's caches: weights from memory
Q40_BYTES_PER_WEIGHT = Q40_BLOCK_BYTES / QK


def load_engine(comm: Comm, model_path: str, tokenizer_path: str | None, run: RunConfig,
                trace_path: str | None = None, argv: list[str] | None = None, verbose: bool = True,
                need_tokenizer: bool = True) -> Engine:
    """Open, plan and load on every rank; any rank's failure stops all of them cleanly."""
    loaded = slow_load_notice(comm) if verbose else threading.Event()
    try:
        return _load(comm, model_path, tokenizer_path, run, trace_path, argv, verbose, need_tokenizer)
    finally:
        loaded.set()


def _load(comm: Comm, model_path: str, tokenizer_path: str | None, run: RunConfig,
          trace_path: str | None, argv: list[str] | None, verbose: bool, need_tokenizer: bool) -> Engine:
    t0 = time.perf_counter()
    kernels.configure(run.nthreads)
    src, cfg, path, error = None, None, None, None
    try:
        path = kernels.kernel_path()  # x86-vnni, arm-sdot or portable: a cluster may mix them
        src = open_weight_source(comm, model_path, run)
        cfg = src.config
    except Exception as e:  # any rank's failure, bug or bad input, must reach every rank
        error = e
    comm.agree(error)
    assert src is not None and cfg is not None
    paths = comm.allgather_obj(path)
    t_open = time.perf_counter()

    shares: tuple[float, ...] | None = None  # each rank's relative share of the work (None: even)
    if run.rank_weights == "auto":
        speed = measure_rank_speed(faults.throttle(comm.rank))
        speeds = comm.allgather_obj(speed)
        shares = tuple(float(s) for s in speeds)
        say(comm.rank, "mpillama: measured rank speeds (G weights/s): " + ", ".join(f"{s:.1f}" for s in speeds))
    elif isinstance(run.rank_weights, tuple):
        shares = run.rank_weights
    kinds = kept_kinds(src.tensors, run.weight_type)  # what each matrix group is kept as (its kernel, its blocks)
    unit = ffn_unit(src.tensors, run.weight_type)
    slices = partition.plan(cfg, comm.size, shares, unit)
    if run.rank_weights == "auto":
        say(comm.rank, "mpillama: rank shares: " + ", ".join(f"rank {s.rank} share {s.weight:.3f}" for s in slices))
    slc = slices[comm.rank]
    max_seq_len = min(run.max_seq_len, cfg.seq_len)
    max_tokens = min(run.batch, max_seq_len)
    extra_att_s = None  # --sync auto: seconds per layer this rank would compute more with attention replicated
    # replicated attention keeps x alike on every rank only if every rank rounds alike: one kernel path
    if run.sync == "auto" and comm.size > 1 and len(set(paths)) == 1:
        read = measure_rank_speed(faults.throttle(comm.rank), REPLICATED_SPEED_S, REPLICATED_STREAM_MB)
        extra_att_s = partition.replication_bytes(cfg, slc, run.weight_type, kinds) / (read * 1e9 * Q40_BYTES_PER_WEIGHT)
    sync_kind, sync_why = choose_sync(comm, run.sync, q80_row_bytes(cfg.dim), extra_att_s)
    if sync_kind == "replicated":  # decided before any weight is read: every rank loads every head
        slices = partition.plan(cfg, comm.size, shares, unit, replicate_attention=True)
        slc = slices[comm.rank]
    sync = make_sync(sync_kind, comm)
    overlap, overlap_why = choose_overlap(comm, sync_kind, max_tokens * q80_row_bytes(cfg.dim), run.prefill_chunks)
    if verbose:
        say(comm.rank, f"mpillama: {model_path}: {cfg.arch}, {cfg.n_layers} layers, dim {cfg.dim}, "
                  f"{comm.size} rank(s), sync {sync_kind} ({sync_why}), buffers {run.buffer_float_type}, "
                  f"weights {run.weight_type} ({describe_kinds(kinds)}; {run.weight_source}), kernels "
                  + (paths[0] if len(set(paths)) == 1 else ", ".join(f"rank {r} {p}" for r, p in enumerate(paths)))
                  + f"; prefill: {overlap_why}")
    model, tokenizer, tokenizer_s, error = None, None, 0.0, None
    try:
        faults.fail_load(comm.rank)
        # rank 0 builds the tokenizer (a second of Python) while packing the weights releases the GIL.
        # Between two matrices the loader needs the GIL back: a short switch interval gives it
        # back in 0.5 ms instead of 5 (measured: weights 1.1 s instead of 1.5).
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                wants_tokenizer = comm.rank == 0 and need_tokenizer
                pending = pool.submit(timed, src.tokenizer, tokenizer_path) if wants_tokenizer else None
                tensors = load_weights(cfg, slc, src.for_rank(slc, slices, sync_kind), sync.owns_residual)
                model = RankModel(cfg, slices, comm.rank, tensors, max_seq_len, max_tokens, sync,
                                  run.buffer_float_type, overlap)
                tokenizer, tokenizer_s = pending.result() if pending is not None else (None, 0.0)
        finally:
            sys.setswitchinterval(interval)
    except Exception as e:  # any rank's failure, bug or bad input, must reach every rank
        error = e
    comm.agree(error)
    assert model is not None
    t_weights = time.perf_counter()
    try:
        warm_up(comm, model)
    except Exception as e:  # the other ranks are inside the warm-up's collectives: end the job
        if comm.size == 1:
            raise
        end_job(RuntimeError(f"first forward pass failed: {e!r}"), comm.rank, comm.size)
    t_warm = time.perf_counter()
    faults.install(model, comm.rank)
    load_s = t_warm - t0
    meta = {
        "argv": " ".join(argv or sys.argv), "model": str(model_path), "n_ranks": comm.size,
        "sync": sync_kind, "sync_reason": f"{sync_why}; prefill {overlap_why}", "buffer_float_type": run.buffer_float_type,
        "weight_type": f"{run.weight_type} ({describe_kinds(kinds)})" if run.weight_type == "auto" else run.weight_type,
        "nthreads": run.nthreads, "profile": run.profile or "", "mpillama_version": __version__,
        "mpi_library_version": library_version(), "max_seq_len": max_seq_len, "batch": max_tokens,
        "load_s": load_s, "model_config": model_config_json(cfg),
    }
    cost = partition.slice_cost(cfg, slc, max_seq_len, run.weight_type, kinds)
    rank_info = {
        "host": hostname(), "pid": os.getpid(), "nthreads": run.nthreads, "weight_share": slc.weight,
        "n_heads": slc.n_heads, "n_kv_heads": slc.n_kv_heads, "ffn_rows": slc.n_ffn_rows,
        "vocab_rows": slc.n_vocab_rows, "weight_bytes": cost.weight_bytes, "load_s": load_s,
    }
    per_step = cfg.n_layers * 8 + 12
    session = TraceSession.open(comm, trace_path, meta, rank_info, capacity=per_step * 512)
    session.recorder.add(SEG_LOAD, -1, t0, time.perf_counter(), cost.weight_bytes)
    if verbose:
        alongside = f"; tokenizer {tokenizer_s:.1f} s alongside the weights" if tokenizer is not None else ""
        say(comm.rank, f"mpillama: loaded in {load_s:.1f} s (open {t_open - t0:.1f} s, "
                  f"weights {t_weights - t_open:.1f} s, warm-up {t_warm - t_weights:.1f} s{alongside})")
    return Engine(comm, cfg, run, slices, model, tokenizer, session, load_s)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """fn(*args) and the seconds it took."""
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t
def warm_up(comm: Comm, model: RankModel) -> None:
    """Run one 2-token and one 1-token pass on every rank (in lockstep, during loading) so that
    numba compiles, or loads from its cache, every kernel before the first real token.

    numba compiles a kernel per variant (threaded or not, argument types and layouts) when one is
    first called, and caches it: a variant this run does not call would make a later run that
    does pause to compile it (half a minute here, more on a small board). So a run that found the
    cache cold on any rank also compiles the variants other runs reach (warm_other_variants);
    a run with a warm cache skips them (loading them costs ~1 s per start).

    Compiling takes a minute, more on a small board, and ranks finish it at different times: the
    warm-up's collectives wait up to WARM_UP_TIMEOUT, not --sync-timeout (a rank that dies still
    ends the job at once)."""
    tl = Timeline(NullRecorder())
    tokens = np.zeros(2, dtype=np.int64)
    T = min(2, model.max_tokens)
    sync_timeout, comm.timeout = comm.timeout, max(comm.timeout, WARM_UP_TIMEOUT)
    try:
        model.forward(tokens[:T], 0, T, tl, LOGITS_FULL)
        model.forward(tokens[:1], T, 1, tl, LOGITS_ARGMAX)
        if any(comm.allgather_obj(compiled_in_this_process())):  # every rank runs the same passes
            warm_other_variants(model, tl)
        comm.barrier()
    finally:
        comm.timeout = sync_timeout


def warm_other_variants(model: RankModel, tl: Timeline) -> None:
    """The kernel variants other runs reach (collective: model passes), on 1 and on 2 threads whatever
    --nthreads is: the serial and the threaded kernels, decode attention split over positions (a
    context past 2 * ATT_MIN_CHUNK), warm_other_kernels and warm_split_group_attention."""
    tokens = np.zeros(2, dtype=np.int64)
    T = min(2, model.max_tokens)
    far = 2 * kernels.ATT_MIN_CHUNK - 1  # the first position that splits decode attention
    for threads in (1, 2):
        with kernels.using_threads(threads):
            model.forward(tokens[:T], 0, T, tl, LOGITS_FULL)
            model.forward(tokens[:1], T, 1, tl, LOGITS_ARGMAX)
            if far < model.max_seq_len:
                model.forward(tokens[:1], far, 1, tl, LOGITS_NONE)
            warm_other_kernels()
            warm_split_group_attention(model.cfg.head_dim, model.max_seq_len)


def warm_other_kernels() -> None:
    """On the current threads, the kernels only some runs call, on tiny arrays typed as the model's (numba
    compiles a variant per dtype, dimensions and layout): the f32 decode matmul (--weight-type f32), the
    Q80 payload conversions that one sync or rank calls and another does not, and the Q40 packing of
    whole rows and of column slices."""
    x, payload = np.zeros((1, 32), np.float32), np.zeros((1, 34), np.uint8)  # (1, 32) f32, its (1, 34) q80 bytes
    kernels.matmul_f32(np.zeros((1, 16), np.float32), np.zeros((16, 32), np.float32), x)
    kernels.quantize_q80_into(payload, x)
    kernels.dequantize_q80_add(x, payload)
    kernels.activations_from_q80(kernels.new_activations(1, 32), payload)
    rows = np.zeros((2, 2 * 18), np.uint8)  # rows of two Q4_0 blocks, as received (--weights scatter)
    kernels.pack_q40([rows])
    rows.setflags(write=False)  # as mapped from the file (--weights mmap): whole rows, and with several
    kernels.pack_q40([rows])  # ranks column slices (wo, w2), strided
    kernels.pack_q40([rows[:, :18]])


def warm_split_group_attention(head_dim: int, max_seq_len: int) -> None:
    """On the current threads, attention as a rank calls it when its query heads straddle KV groups (more
    ranks than KV heads): on views of a range of heads and of one KV head, which numba compiles apart."""
    q = np.zeros((2, 2, head_dim), np.float32)  # (T, heads, hd): a view of one head is strided for T = 2
    cache = np.zeros((max_seq_len, 2, head_dim), np.float32)  # (positions, kv heads, hd)
    scratch = kernels.new_attention_scratch(max_seq_len, 1, head_dim)
    far = 2 * kernels.ATT_MIN_CHUNK - 1
    for pos0, T in ((0, 2), (2, 1), (far, 1)):
        if pos0 + T <= max_seq_len:
            kernels.attention(q[:T, 1:], q[:T, :1], cache[:, :1], cache[:, 1:], pos0, T, scratch)


def slow_load_notice(comm: Comm, seconds: float = 5.0) -> threading.Event:
    """Say once on stderr if loading takes a while (a first run compiles the numba kernels for about
    a minute), so the job does not look hung. Set the returned event when loading is done."""
    done = threading.Event()

    why = ("the first run compiles numba's kernels, about a minute; later runs load them from its cache"
           if not cache_is_warm() else "reading and packing the weights")

    def notice() -> None:
        if not done.wait(seconds):
            say(comm.rank, f"mpillama: still loading ({why})...")

    threading.Thread(target=notice, daemon=True).start()
    return done