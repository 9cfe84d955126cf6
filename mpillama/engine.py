"""The generation loop: load a model over the ranks, prefill, decode, sample, stop.

Rank 0 drives: before every forward pass it broadcasts a small control message (what to do
next), and the workers follow in worker_loop(). Every rank runs the same forward pass over
its own slice (model.py); comm.py moves the activations. Only rank 0 tokenizes, samples and
prints.
"""

from __future__ import annotations

import resource
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mpillama import partition
from mpillama.atomic import atomic_write
from mpillama.comm import CMD_FORWARD, CMD_STOP, Comm, Control
from mpillama.config import ModelConfig, RunConfig
from mpillama.errors import ContextFull, MpillamaError
from mpillama.model import LOGITS_ARGMAX, LOGITS_FULL, LOGITS_NONE, RankModel
from mpillama.sampler import Sampler
from mpillama.trace.recorder import SEG_CTRL_SYNC, SEG_SAMPLE, NullRecorder, Recorder, Timeline
from mpillama.trace.session import TraceSession


@dataclass
class Generation:
    """What one generate() call produced, with its timings (rank 0)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # forward passes of one token
    cached_tokens: int = 0  # leading prompt tokens whose K/V rows were already in the cache
    stop_reason: str = "steps"  # steps | eos | context | until (the caller's until() said stop)

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def gen_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


class Engine:
    """A loaded model on every rank. Construct with loading.load_engine (collective)."""

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
        self.cached: list[int] = []  # rank 0: the tokens whose K/V rows the cache holds, in order
        self.step = 0
        self.stopped = False
        self.started = False  # a forward command went out: the workers are inside a pass

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
        self.cached = []

    @contextmanager
    def recording(self, recorder: Recorder | NullRecorder) -> Iterator[None]:
        """Rank 0: record the steps run inside into recorder instead of the session's (bench)."""
        kept, self.rec = self.rec, recorder
        try:
            yield
        finally:
            self.rec = kept

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
        """Run the context prompt_ids, then sample up to `steps` tokens.

        prompt_ids is the whole context (a chat: the conversation so far): the K/V rows of its
        longest prefix shared with what the cache holds are kept, and only the rest is prefilled
        (at least its last token, for the logits). until, if given, is asked after each token
        (after on_text): True ends the generation there, between passes, with stop_reason 'until'
        (stop strings, a client that left)."""
        assert self.comm.rank == 0
        if not prompt_ids:
            raise MpillamaError("the prompt is empty: give some text with --prompt")
        if len(prompt_ids) >= self.max_seq_len:
            raise ContextFull(
                f"the prompt needs {len(prompt_ids)} positions but --max-seq-len is {self.max_seq_len}"
                f"{' (the model maximum)' if self.max_seq_len == self.cfg.seq_len else ''}: "
                "shorten the prompt or raise --max-seq-len"
            )
        keep = min(common_prefix(self.cached, prompt_ids), len(prompt_ids) - 1)
        self.pos, self.cached = keep, []  # until this generation ends, the cache holds nothing certain
        context, prompt_ids = prompt_ids, prompt_ids[keep:]
        n = len(prompt_ids)
        full = dump_logits is not None or sampler.temperature > 0
        mode = LOGITS_FULL if full else LOGITS_ARGMAX
        gen = Generation(prompt_tokens=n, cached_tokens=keep)
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
        self.cached = context + gen.tokens[:-1]  # the last token was sampled, never fed
        return gen










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
