"""`python -m mpillama bench`: prompt-eval and generation tok/s, and where a token's time goes.

Runs on rank 0 through a loaded Engine (the workers follow as in any run). Besides tok/s it
reports, from rank 0's segment timings of the decode steps, compute vs sync ms per token, and
the share of a token spent outside the matmul kernels (the matmuls of one decode token are
timed alone on the same weights). Each repetition also generates once without recording, so
the cost of the recorder shows as a ratio measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median
from typing import Any

import numpy as np

from mpillama import kernels
from mpillama.engine import Engine
from mpillama.sampler import Sampler
from mpillama.trace.recorder import SEGMENTS, NullRecorder, Recorder


def rank0_records(engine: Engine) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(step, segment code, start s, end s) of every record rank 0 holds: its recorder's, and under
    --trace also those already flushed to the trace session."""
    rec, n = engine.rec, engine.rec.n
    parts = [np.stack([rec.steps[:n], rec.segs[:n], rec.t_starts[:n], rec.t_ends[:n]], axis=1).astype(np.float64)]
    for packed in engine.session.flushed_records(0):  # (n, 6) rows, see Recorder.take
        parts.append(np.stack([packed[:, 0], packed[:, 2], packed[:, 3], packed[:, 4]], axis=1))
    rows = np.concatenate(parts)  # (records, 4) f64
    return rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64), rows[:, 2], rows[:, 3]


def decode_split(engine: Engine, decode_steps: set[int]) -> tuple[dict[str, float], float]:
    """ms per decode step in each segment kind, and the mean ms from a step's first record to its last
    (what the segments tile; the time between steps is the engine's own), from rank 0's records."""
    steps, segs, starts, ends = rank0_records(engine)
    mask = np.isin(steps, list(decode_steps))
    per_step = max(len(decode_steps), 1)
    dur = ends - starts
    split = {SEGMENTS[c]: float(dur[mask & (segs == c)].sum() / per_step * 1e3) for c in np.unique(segs[mask])}
    spans = [ends[steps == s].max() - starts[steps == s].min() for s in decode_steps if np.any(steps == s)]
    return split, float(np.mean(spans) * 1e3) if spans else float("nan")


def matmul_ms(engine: Engine, repeats: int = 5) -> float:
    """ms for this rank's matmuls of one decode token, alone (weights from memory, as in a pass)."""
    m = engine.model
    acts_in = kernels.new_activations(1, engine.cfg.dim)
    kernels.quantize_activations(acts_in, np.ones((1, engine.cfg.dim), dtype=np.float32))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for lw in m.w.layers:
            # a mixture of experts runs n_experts_used experts per token: time that many
            ffn = [(lw.w13, lw.w2)] if lw.experts is None else lw.experts[: engine.cfg.n_experts_used]
            for w, out, acts in ((lw.wqkv, m.qkv[:1], acts_in), (lw.wo, m.partial[:1], m.z_acts),
                                 *((w, o, a) for w13, w2 in ffn
                                   for w, o, a in ((w13, m.h13[:1], acts_in), (w2, m.partial[:1], m.h_acts)))):
                if isinstance(w, np.ndarray):
                    kernels.matmul_f32(out, w, np.ones((1, w.shape[1]), dtype=np.float32))
                else:
                    kernels.matmul_weights(out, w, acts, 1)
        if isinstance(m.w.wcls, np.ndarray):
            kernels.matmul_f32(m.logits, m.w.wcls, np.ones((1, m.w.wcls.shape[1]), dtype=np.float32))
        else:
            kernels.matmul_weights(m.logits, m.w.wcls, acts_in, 1)
        times.append(time.perf_counter() - t)
    return median(times) * 1e3


@dataclass
class Measured:
    """One repetition: a recorded generation, the matmuls alone, and the same generation unrecorded."""

    prompt_tok_s: float
    gen_tok_s: float
    split: dict[str, float]  # ms per decode step in each segment kind
    split_step_ms: float  # ms from a decode step's first record to its last, on average
    matmul_ms: float
    sync_ms: float
    outside_share: float  # of a decode token, outside the matmuls and the sync
    unrecorded_gen_tok_s: float


def measure_once(engine: Engine, prompt: list[int], steps: int, traced: bool) -> Measured:
    greedy = Sampler(temperature=0.0)
    engine.reset()
    # under --trace the session's own recorder (it flushes itself); otherwise one that holds this run
    recorder = engine.rec if traced else Recorder(0, engine.cfg.n_layers * 8 * (steps + 8) + 1024)
    with engine.recording(recorder):
        gen = engine.generate(prompt, steps + 1, greedy, stop_on_eos=False)
        split, split_step_ms = decode_split(engine, set(range(engine.step - gen.decode_steps, engine.step)))
    # the matmuls alone and the unrecorded run come right after the tokens they are compared with:
    # the shares are differences of times, so all are taken while the machine is in the same state
    mm = matmul_ms(engine)
    sync_ms = sum(v for k, v in split.items() if k.endswith("_sync"))
    engine.reset()
    with engine.recording(NullRecorder(0)):
        plain = engine.generate(prompt, steps + 1, greedy, stop_on_eos=False)
    outside = 1 - (mm + sync_ms) * gen.gen_tok_s / 1e3 if gen.gen_tok_s else float("nan")
    return Measured(gen.prompt_tok_s, gen.gen_tok_s, split, split_step_ms, mm, sync_ms, outside, plain.gen_tok_s)


def run_bench(engine: Engine, prompt_tokens: int, steps: int, repeat: int) -> dict[str, Any]:
    rng = np.random.default_rng(1234)
    prompt = [int(t) for t in rng.integers(0, engine.cfg.vocab_size, prompt_tokens)]
    # warm-up: compile and touch every kernel and weight once
    engine.reset()
    engine.generate(prompt[: min(8, prompt_tokens)], 2, Sampler(temperature=0.0), stop_on_eos=False)
    traced = isinstance(engine.rec, Recorder)  # --trace: the session's recorder (it flushes itself)
    runs = [measure_once(engine, prompt, steps, traced) for _ in range(repeat)]
    pp = median(r.prompt_tok_s for r in runs)
    tg = median(r.gen_tok_s for r in runs)
    middle = sorted(runs, key=lambda r: r.gen_tok_s)[len(runs) // 2]  # the run with the median gen tok/s
    token_ms = 1e3 / tg if tg else float("nan")
    plain = median(r.unrecorded_gen_tok_s for r in runs)
    out: dict[str, Any] = {
        "ranks": engine.comm.size,
        "nthreads": engine.run.nthreads,
        "sync": engine.model.sync.name,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": steps,
        "prompt_tok_s": round(pp, 2),
        "gen_tok_s": round(tg, 2),
        "token_ms": round(token_ms, 3),
        "rank0_matmul_ms": round(middle.matmul_ms, 3),
        "rank0_sync_ms": round(middle.sync_ms, 3),
        "outside_matmul_share": round(max(0.0, median(r.outside_share for r in runs)), 3) if tg else None,
        "gen_tok_s_unrecorded": round(plain, 2),
        "recording_cost": round(median(1 - r.gen_tok_s / r.unrecorded_gen_tok_s for r in runs), 4) if plain else None,
        "load_s": round(engine.load_s, 2),
        "split_ms": {k: round(v, 3) for k, v in middle.split.items()},
        "split_step_ms": round(middle.split_step_ms, 3),
    }
    return out
