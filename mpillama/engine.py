"""The generation loop: load a model over the ranks, prefill, decode, sample, stop.

Rank 0 drives: before every forward pass it broadcasts a small control message (what to do
next), and the workers follow in worker_loop(). Every rank runs the same forward pass over
its own slice (model.py); comm.py moves the activations. Only rank 0 tokenizes, samples and
prints.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mpillama import __version__, kernels, partition
from mpillama.atomic import atomic_write
from mpillama.comm import CMD_FORWARD, CMD_STOP, Comm, Control, abort, hostname, library_version, make_sync
from mpillama.config import ModelConfig, RunConfig
from mpillama.errors import MpillamaError
from mpillama.model import LOGITS_ARGMAX, LOGITS_FULL, LOGITS_NONE, RankModel, load_weights
from mpillama.sampler import Sampler
from mpillama.trace.recorder import SEG_CTRL_SYNC, SEG_LOAD, SEG_SAMPLE, NullRecorder, Timeline
from mpillama.trace.session import TraceSession
from mpillama.weights import open_weight_source, measure_rank_speed


def say(comm: Comm, text: str, err: bool = True, end: str = "\n") -> None:
    """Print on rank 0 only: progress to stderr, generated text to stdout."""
    if comm.rank == 0:
        stream = sys.stderr if err else sys.stdout
        stream.write(text + end)
        stream.flush()


@dataclass
class Generation:
    """What one generate() call produced, with its timings (rank 0)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # forward passes of one token
    stop_reason: str = "steps"  # steps | eos | context | until (the caller's until() said stop)

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def gen_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


class Engine:
    """A loaded model on every rank. Construct with Engine.load (collective)."""

    def __init__(self, comm: Comm, cfg: ModelConfig, run: RunConfig, slices: list[partition.Slice],
                 model: RankModel, tokenizer: Any, session: TraceSession, load_s: float) -> None:
        self.comm, self.cfg, self.run, self.slices = comm, cfg, run, slices
        self.slc = slices[comm.rank]
        self.model, self.tokenizer, self.session = model, tokenizer, session
        self.rec = session.recorder
        self.load_s = load_s
        self.max_seq_len = model.max_seq_len
        self.max_tokens = model.max_tokens
        self.ctrl = Control.new(self.max_tokens)
        self.pos = 0  # next free position in the KV cache (rank 0's view; workers get it per step)
        self.step = 0
        self.stopped = False
        self.started = False  # a forward command went out: the workers are inside a pass

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, comm: Comm, model_path: str, tokenizer_path: str | None, run: RunConfig,
             trace_path: str | None = None, argv: list[str] | None = None, verbose: bool = True,
             need_tokenizer: bool = True) -> Engine:
        """Open, plan and load on every rank; any rank's failure stops all of them cleanly."""
        loaded = slow_load_notice(comm) if verbose else threading.Event()
        try:
            return cls._load(comm, model_path, tokenizer_path, run, trace_path, argv, verbose, need_tokenizer)
        finally:
            loaded.set()

    @classmethod
    def _load(cls, comm: Comm, model_path: str, tokenizer_path: str | None, run: RunConfig,
              trace_path: str | None, argv: list[str] | None, verbose: bool, need_tokenizer: bool) -> Engine:
        t0 = time.perf_counter()
        kernels.configure(run.nthreads)
        src, cfg, error = None, None, None
        try:
            src = open_weight_source(comm, model_path, run)
            cfg = src.config
        except Exception as e:  # any rank's failure, bug or bad input, must reach every rank
            error = e
        comm.agree(error)
        assert src is not None and cfg is not None
        t_open = time.perf_counter()

        weights: tuple[float, ...] | None = None
        if run.rank_weights == "auto":
            speed = measure_rank_speed(comm.rank)
            speeds = comm.allgather_obj(speed)
            weights = tuple(float(s) for s in speeds)
            say(comm, "mpillama: measured rank speeds (G weights/s): " + ", ".join(f"{s:.1f}" for s in speeds))
        elif isinstance(run.rank_weights, tuple):
            weights = run.rank_weights
        slices = partition.plan(cfg, comm.size, weights)
        if run.rank_weights == "auto":
            say(comm, "mpillama: rank shares: " + ", ".join(f"rank {s.rank} share {s.weight:.3f}" for s in slices))
        slc = slices[comm.rank]
        max_seq_len = min(run.max_seq_len, cfg.seq_len)
        max_tokens = min(run.batch, max_seq_len)
        sync_kind = run.sync
        sync = make_sync(sync_kind, comm)
        if verbose:
            say(comm, f"mpillama: {model_path}: {cfg.arch}, {cfg.n_layers} layers, dim {cfg.dim}, "
                      f"{comm.size} rank(s), sync {sync_kind}, buffers {run.buffer_float_type}, "
                      f"weights {run.weight_type} ({run.weights})")
        model, tokenizer, tokenizer_s, error = None, None, 0.0, None
        try:
            hook_fail = os.environ.get("MPILLAMA_TEST_FAIL_LOAD")
            if hook_fail is not None and int(hook_fail) == comm.rank:
                raise MpillamaError(f"test hook MPILLAMA_TEST_FAIL_LOAD made rank {comm.rank} fail while loading")
            # rank 0 builds the tokenizer (a second of Python) while packing the weights releases the GIL.
            # Between two matrices the loader needs the GIL back: a short switch interval gives it
            # back in 0.5 ms instead of 5 (measured: weights 1.1 s instead of 1.5).
            interval = sys.getswitchinterval()
            sys.setswitchinterval(0.0005)
            try:
                with ThreadPoolExecutor(max_workers=1) as pool:
                    wants_tokenizer = comm.rank == 0 and need_tokenizer
                    pending = pool.submit(timed, src.tokenizer, tokenizer_path) if wants_tokenizer else None
                    rank_weights = load_weights(cfg, slc, src.for_rank(slc, slices), sync.owns_residual)
                    model = RankModel(cfg, slices, comm.rank, rank_weights, max_seq_len, max_tokens, sync,
                                      run.buffer_float_type)
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
            print(f"mpillama: error: rank {comm.rank}: first forward pass failed: {e!r}", file=sys.stderr, flush=True)
            abort(1)
        t_warm = time.perf_counter()
        install_test_hooks(model, comm.rank)
        load_s = t_warm - t0
        meta = {
            "argv": " ".join(argv or sys.argv), "model": str(model_path), "n_ranks": comm.size,
            "sync": sync_kind, "buffer_float_type": run.buffer_float_type, "weight_type": run.weight_type,
            "nthreads": run.nthreads, "profile": run.profile or "", "mpillama_version": __version__,
            "mpi_library_version": library_version(), "max_seq_len": max_seq_len, "batch": max_tokens,
            "load_s": load_s,
        }
        cost = partition.slice_cost(cfg, slc, max_seq_len, run.weight_type)
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
            say(comm, f"mpillama: loaded in {load_s:.1f} s (open {t_open - t0:.1f} s, "
                      f"weights {t_weights - t_open:.1f} s, warm-up {t_warm - t_weights:.1f} s{alongside})")
        return cls(comm, cfg, run, slices, model, tokenizer, session, load_s)

    # -- one forward pass on every rank --------------------------------------------------
    def _forward(self, tl: Timeline) -> int | None:
        """Run the pass described by self.ctrl (all ranks): see RankModel.forward."""
        ctrl = self.ctrl
        self.comm.context = f"step {self.step}"
        return self.model.forward(ctrl.tokens, ctrl.pos, ctrl.n_tokens, tl, ctrl.mode)

    def _broadcast_ctrl(self, tl: Timeline, idle: bool) -> None:
        self.comm.context = f"step {self.step} ctrl_sync"
        # a worker waits for the next command as long as rank 0 needs (a chat user thinking)
        self.comm.bcast(self.ctrl.buf, timeout=None if idle and self.comm.rank != 0 else -1.0)
        tl.mark(SEG_CTRL_SYNC, -1, self.ctrl.buf.nbytes)

    def _run_step(self, tokens: np.ndarray | list[int], mode: int, phase: str) -> int | None:
        """Rank 0: broadcast a forward command and run it."""
        t = time.perf_counter()
        self.rec.step = self.step
        self.rec.begin_step(phase, len(tokens), self.pos, t)
        tl = Timeline(self.rec, t)
        self.ctrl.set(CMD_FORWARD, tokens, self.pos, mode)
        self.started = True
        self._broadcast_ctrl(tl, idle=False)
        out = self._forward(tl)
        self.pos += len(tokens)
        self.rec.end_step(time.perf_counter())
        self.session.end_step()
        self.step += 1
        return out

    def worker_loop(self) -> None:
        """Ranks > 0: follow rank 0's commands until it says stop."""
        while True:
            tl = Timeline(self.rec)
            self.rec.step = self.step
            self._broadcast_ctrl(tl, idle=True)
            cmd = self.ctrl.cmd
            if cmd == CMD_STOP:
                return
            if cmd == CMD_FORWARD:
                self._forward(tl)
                self.session.end_step()
                self.step += 1

    def reset(self) -> None:
        """Rank 0: forget the conversation (the KV cache is simply overwritten from position 0)."""
        self.pos = 0

    def resume(self, cached: list[int], ids: list[int]) -> int:
        """Rank 0: keep the KV rows of the longest prefix `ids` shares with `cached` (the tokens the
        cache holds, in order) and continue after it; returns how many of `ids` need no prefill.
        At least one token (ids is not empty) is left to run, to get logits."""
        self.pos = min(common_prefix(cached, ids), len(ids) - 1)
        return self.pos

    def stop_workers(self) -> None:
        if self.comm.rank == 0 and not self.stopped:
            self.ctrl.set(CMD_STOP, [], 0, LOGITS_NONE)
            self.comm.bcast(self.ctrl.buf)
            self.stopped = True

    def close(self, summary: dict[str, Any] | None = None) -> list[tuple[float, float]]:
        """Collective: stop the workers (rank 0), write the trace; returns every rank's memory_mb()."""
        self.stop_workers()
        memory = self.comm.allgather_obj(memory_mb())
        self.session.close({**(summary or {}), "private_mb_per_rank": [m[0] for m in memory]})
        self.comm.free()
        return memory

    # -- generation (rank 0) -------------------------------------------------------------
    def generate(self, prompt_ids: list[int], steps: int, sampler: Sampler,
                 on_text: Callable[[str], None] | None = None, dump_logits: np.ndarray | None = None,
                 stop_on_eos: bool = True, until: Callable[[], bool] | None = None) -> Generation:
        """Prefill prompt_ids (continuing at self.pos) then sample up to `steps` tokens.

        until, if given, is asked after each token (after on_text): True ends the generation
        there, between passes, with stop_reason 'until' (stop strings, a client that left)."""
        assert self.comm.rank == 0
        n = len(prompt_ids)
        if n == 0:
            raise MpillamaError("the prompt is empty: give some text with --prompt")
        if self.pos + n >= self.max_seq_len:
            raise MpillamaError(
                f"the prompt needs {self.pos + n} positions but --max-seq-len is {self.max_seq_len}"
                f"{' (the model maximum)' if self.max_seq_len == self.cfg.seq_len else ''}: "
                "shorten the prompt or raise --max-seq-len"
            )
        full = dump_logits is not None or sampler.temperature > 0
        mode = LOGITS_FULL if full else LOGITS_ARGMAX
        gen = Generation(prompt_tokens=n)
        stream = self.tokenizer.stream() if self.tokenizer is not None else None
        t0 = time.perf_counter()
        token: int | None = None
        for start in range(0, n, self.max_tokens):
            chunk = prompt_ids[start : start + self.max_tokens]
            last = start + len(chunk) >= n
            token = self._run_step(chunk, mode if last else LOGITS_NONE, "prefill")
        gen.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(steps):
            ts = time.perf_counter()
            if full:
                logits = self.model.full_logits
                if dump_logits is not None:
                    dump_logits[i] = logits
                token = sampler.sample(logits)
            assert token is not None
            self.rec.add(SEG_SAMPLE, -1, ts, time.perf_counter())
            gen.tokens.append(token)
            if stream is not None:
                piece = stream.push(token)
                gen.text += piece
                if on_text is not None and piece:
                    on_text(piece)
            if stop_on_eos and self.tokenizer is not None and token in self.tokenizer.eos_ids:
                gen.stop_reason = "eos"
                break
            if until is not None and until():
                gen.stop_reason = "until"
                break
            if i == steps - 1:
                break
            if self.pos >= self.max_seq_len:
                gen.stop_reason = "context"
                break
            token = self._run_step([token], mode, "decode")
            gen.decode_steps += 1
        if stream is not None:
            tail = stream.finish()
            gen.text += tail
            if on_text is not None and tail:
                on_text(tail)
        gen.decode_s = time.perf_counter() - t1
        return gen


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """fn(*args) and the seconds it took."""
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


def warm_up(comm: Comm, model: RankModel) -> None:
    """Run one 2-token and one 1-token pass on every rank (in lockstep, during loading) so that
    numba compiles, or loads from its cache, every kernel before the first real token."""
    tl = Timeline(NullRecorder())
    tokens = np.zeros(2, dtype=np.int64)
    T = min(2, model.max_tokens)
    model.forward(tokens[:T], 0, T, tl, LOGITS_FULL)
    model.forward(tokens[:1], T, 1, tl, LOGITS_ARGMAX)
    comm.barrier()


def slow_load_notice(comm: Comm, seconds: float = 5.0) -> threading.Event:
    """Say once on stderr if loading takes a while (a first run compiles the numba kernels for about
    a minute), so the job does not look hung. Set the returned event when loading is done."""
    done = threading.Event()

    def notice() -> None:
        if not done.wait(seconds):
            say(comm, "mpillama: still loading (the first run compiles numba's kernels, about a minute; "
                      "later runs load them from its cache)...")

    threading.Thread(target=notice, daemon=True).start()
    return done


def install_test_hooks(model: RankModel, rank: int) -> None:
    """Fault injection for the tests, from the environment (see tests/README.md):

    MPILLAMA_TEST_SLOW=RANK:SECONDS  rank RANK sleeps SECONDS in every attention block (a straggler).
    MPILLAMA_TEST_DIE=RANK:PASS      rank RANK kills itself (SIGKILL) at its forward pass number PASS.
    """
    slow = os.environ.get("MPILLAMA_TEST_SLOW")
    if slow and int(slow.split(":")[0]) == rank:
        seconds = float(slow.split(":")[1])
        attention = model.attention

        def slow_attention(*args: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return attention(*args, **kwargs)

        model.attention = slow_attention  # type: ignore[method-assign]
    die = os.environ.get("MPILLAMA_TEST_DIE")
    if die and int(die.split(":")[0]) == rank:
        last_pass = int(die.split(":")[1])
        forward = model.forward
        passes = [0]

        def dying_forward(*args: Any, **kwargs: Any) -> Any:
            passes[0] += 1
            if passes[0] >= last_pass:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(*args, **kwargs)

        model.forward = dying_forward  # type: ignore[method-assign]


def memory_mb() -> tuple[float, float]:
    """(private memory now, peak resident memory) of this process in MB.

    The peak counts the model file's pages that loading read through the memory map (shared,
    clean, reclaimable); private memory (RssAnon) is what the rank really holds.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    private = peak
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                private = int(line.split()[1]) / 1024
    except OSError:
        pass
    return private, peak


def install_signal_handlers(session: TraceSession) -> None:
    """SIGINT/SIGTERM: leave a readable partial trace, then stop."""

    def handler(signum: int, frame: Any) -> None:
        session.write_partial(signal.Signals(signum).name)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    with atomic_write(path) as part, open(part, "wb") as f:
        np.save(f, array)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
