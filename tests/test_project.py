"""trace project: the projection model on synthetic traces with exact answers, its command line, and one
MPI run with a known straggler.

The synthetic runs are built here from the engine's rules (who waits for whom in a bcast, a gather,
an allgather), independently of project.py: compute per block from a given cost, every collective
delivered a given time after what it waits for. A projection onto another configuration must then
give exactly the run built for that configuration.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import h5py
import numpy as np
import pytest

from mpillama.cli import main
from mpillama.config import ModelConfig, model_config_from_json, model_config_json
from mpillama.formats import open_model
from mpillama.partition import plan
from mpillama.quant import Q80_BLOCK_BYTES, QK
from mpillama.trace.analysis import analyze, load_trace, phase_table, step_times
from mpillama.trace.clock import ZERO_FIT, ClockFit, ClockSample
from mpillama.trace.project import Target, calibrate, project, projected_trace
from mpillama.trace.recorder import SEGMENTS
from mpillama.trace.report import report_tables
from mpillama.trace.session import TraceData, write_trace

SEG = {name: i for i, name in enumerate(SEGMENTS)}
C_W = 2e-9  # s per weight x token
C_F = 1e-4  # s per block call
EMBED_S = 3e-5
# (phase, tokens, position): a prefill chunk without the head, the last one with it, then decode
STEPS = [("prefill", 4, 0, False), ("prefill", 3, 4, True)] + [("decode", 1, 7 + i, True) for i in range(6)]

Cost = Callable[[int, int, int, str, int], float]  # (rank, step, layer, block, tokens) -> s


@pytest.fixture(scope="module")
def tiny(models: dict[str, Path]) -> tuple[Path, ModelConfig]:
    path = models["tiny-q40"]
    f = open_model(path)
    cfg = f.config
    f.close()
    return path, cfg


def slice_weights(cfg: ModelConfig, n: int, weights: tuple[float, ...] | None = None,
                  replicated: bool = False) -> list[dict[str, int]]:
    """The weights each rank's slice holds per block, from the plan (the engine's)."""
    hd, dim = cfg.head_dim, cfg.dim
    return [{"att": ((s.n_heads + 2 * s.n_kv_heads) * hd * dim + dim * s.n_heads * hd), "ffn": 3 * s.n_ffn_rows * dim,
             "head": s.n_vocab_rows * dim, "experts": 3 * s.n_ffn_rows * dim * cfg.n_experts_used,
             "route": cfg.n_experts * dim * 4 / (18 / 32)}  # the f32 router, every rank, in Q40 weights' bytes
            for s in plan(cfg, n, weights, replicate_attention=replicated)]


def model_cost(cfg: ModelConfig, n: int, weights: tuple[float, ...] | None = None, slow: dict[int, float] | None = None,
               replicated: bool = False) -> Cost:
    """Compute that follows the model exactly: C_W x weights x T + C_F per call; slow: rank -> extra s per att call."""
    w = slice_weights(cfg, n, weights, replicated)

    def cost(rank: int, step: int, layer: int, block: str, tokens: int) -> float:
        extra = (slow or {}).get(rank, 0.0) if block == "att" else 0.0
        if block == "route":  # the part of a MoE FFN's call that is its router
            return C_W * w[rank]["route"] * tokens
        if block == "ffn" and cfg.is_moe:
            return C_W * (w[rank]["experts"] + w[rank]["route"]) * tokens + C_F
        return C_W * w[rank][block] * (1 if block == "head" else tokens) + C_F + extra

    return cost


@dataclass
class Run:
    """A synthetic run on one clock: per rank its records, rank 0's steps. Built with the engine's rules."""

    n: int
    delivery: Callable[[int, float], float]  # (hops, bytes on the path) -> s from what a rank waits for to its exit
    t: np.ndarray = field(init=False)
    records: list[list[tuple]] = field(init=False)

    def __post_init__(self) -> None:
        self.t = np.zeros(self.n)
        self.records = [[] for _ in range(self.n)]

    def rec(self, step: int, layer: int, seg: str, t1: np.ndarray, nbytes: float | np.ndarray = 0.0) -> None:
        sent = np.broadcast_to(nbytes, (self.n,))  # bytes as each rank records them
        for r in range(self.n):
            self.records[r].append((step, layer, SEG[seg], self.t[r], t1[r], sent[r]))
        self.t = t1

    def compute(self, step: int, layer: int, seg: str, dur: np.ndarray) -> None:
        self.rec(step, layer, seg, self.t + dur)

    def bcast(self, step: int, layer: int, seg: str, nbytes: float) -> None:
        """Rank 0's nbytes down a binomial tree: rank r is popcount(r) hops away."""
        hops = [r.bit_count() for r in range(self.n)]
        out = np.array([self.t[0]] + [max(self.t[r], self.t[0] + self.delivery(hops[r], hops[r] * nbytes))
                                      for r in range(1, self.n)])
        self.rec(step, layer, seg, out, nbytes)

    def gather(self, step: int, layer: int, seg: str, nbytes: float) -> None:
        """nbytes from every other rank into rank 0, one hop; the senders leave at once."""
        out = self.t.copy()
        if self.n > 1:
            out[0] = max(self.t[0], self.t[1:].max() + self.delivery(1, (self.n - 1) * nbytes))
        self.rec(step, layer, seg, out, np.array([(self.n - 1) * nbytes] + [nbytes] * (self.n - 1)))

    def allgather(self, step: int, layer: int, seg: str, nbytes: float) -> None:
        """nbytes from every rank to every rank: log2(n) hops after the last one arrives."""
        hops = math.ceil(math.log2(self.n))
        end = self.t.max() + self.delivery(hops, (self.n - 1) * nbytes)
        self.rec(step, layer, seg, np.full(self.n, end), self.n * nbytes)


def build(cfg: ModelConfig, n: int, sync: str, cost: Cost,
          delivery: Callable[[int, float], float] = lambda h, b: 0.0,
          steps: list = STEPS) -> tuple[Run, list[tuple]]:
    """Every step as the engine runs it (DESIGN.md, one token end to end)."""
    run = Run(n, delivery)
    row = cfg.dim // QK * Q80_BLOCK_BYTES if n > 1 else cfg.dim * 4
    table = []
    for s, (phase, T, pos, head) in enumerate(steps):
        t0 = run.t[0]
        run.bcast(s, -1, "ctrl_sync", 544)
        owners = np.arange(n) == 0 if sync == "star" else np.ones(n, bool)
        run.compute(s, -1, "embed", np.where(owners, EMBED_S, 0.0))
        blocks = [(layer, b) for layer in range(cfg.n_layers) for b in ("att", "ffn")]
        blocks += [(-1, "head")] if head else []
        for layer, b in blocks:
            dur = np.array([cost(r, s, layer, b, T) for r in range(n)])
            payload = row if b == "head" else T * row
            if b == "ffn" and cfg.is_moe:  # recorded as the router, then the chosen experts
                route = np.array([cost(r, s, layer, "route", T) for r in range(n)])
                assert np.all(route < dur)
                run.compute(s, layer, "route", route)
                dur = dur - route
                b_compute = "experts"
            else:
                b_compute = b
            if n == 1:
                run.compute(s, layer, b_compute, dur)
                if b == "head":
                    run.gather(s, layer, "head_sync", ARGMAX)
            elif sync == "star":
                run.bcast(s, layer, b + "_sync", payload)
                run.compute(s, layer, b_compute, dur)
                run.gather(s, layer, b + "_sync", ARGMAX if b == "head" else payload)
            elif sync == "replicated" and b == "att":  # every head on every rank: nothing to exchange
                run.compute(s, layer, b, dur)
            else:
                run.compute(s, layer, b_compute, dur)
                if b == "head":
                    run.gather(s, layer, "head_sync", ARGMAX)
                else:
                    run.allgather(s, layer, b + "_sync", payload)
        table.append((s, phase, T, pos, t0, run.t[0]))
    return run, table


ARGMAX = 16


def write(path: Path, model: Path, cfg: ModelConfig, n: int, sync: str, cost: Cost, latency: float = 0.0,
          overhead: float = 0.0, rate: float = math.inf, weights: tuple[float, ...] | None = None,
          shapes: bool = False) -> Path:
    """A trace of the run built with deliveries overhead + hops x latency + bytes / rate; the ping-pong
    measured 2 x latency."""
    run, table = build(cfg, n, sync, cost, lambda h, b: overhead + h * latency + b / rate)
    rows = [{"host": f"node{r}", "pid": r, "nthreads": 1, "weight_share": s.weight, "n_heads": s.n_heads,
             "n_kv_heads": s.n_kv_heads, "ffn_rows": s.n_ffn_rows, "vocab_rows": s.n_vocab_rows}
            for r, s in enumerate(plan(cfg, n, weights, replicate_attention=sync == "replicated"))]
    fits = [ZERO_FIT] + [ClockFit(ClockSample(0.0, 0.0, 2 * latency)) for _ in range(n - 1)]
    steps = {"step": [x[0] for x in table], "phase": [["prefill", "decode"].index(x[1]) for x in table],
             "tokens": [x[2] for x in table], "position": [x[3] for x in table],
             "t_start": [x[4] for x in table], "t_end": [x[5] for x in table]}
    meta = {"argv": "mpillama bench", "command": "bench", "model": str(model), "sync": sync,
            "buffer_float_type": "q80"} | ({"model_config": model_config_json(cfg)} if shapes else {})
    records = [np.array(r, np.float64).reshape(-1, 6) for r in run.records]
    return write_trace(path, TraceData(meta=meta, rank_rows=rows, fits=fits, records=records,
                                       steps={k: np.array(v) for k, v in steps.items()}))


def tok_s(table: list[tuple]) -> dict[str, float]:
    out = {}
    for phase in ("prefill", "decode"):
        rows = [x for x in table if x[1] == phase]
        out[phase] = sum(x[2] for x in rows) / sum(x[5] - x[4] for x in rows)
    return out


# ---------------------------------------------------------------------------------------- exact cases


def test_a_trace_projected_onto_its_own_configuration_is_itself(tmp_path: Path, tiny: tuple[Path, ModelConfig]) -> None:
    """Noise in compute and in the collectives is replayed: tok/s, waits and straggler come back unchanged."""
    model, cfg = tiny
    rng = np.random.default_rng(5)
    noise = rng.uniform(0, 3e-4, size=(len(STEPS), 3, cfg.n_layers + 1, 3))
    base = model_cost(cfg, 3)

    def cost(rank: int, step: int, layer: int, block: str, tokens: int) -> float:
        kind = ("att", "ffn", "head").index(block)
        return base(rank, step, layer, block, tokens) + noise[step, rank, layer + 1, kind]

    for sync in ("star", "allreduce"):
        path = write(tmp_path / f"{sync}.h5", model, cfg, 3, sync, cost, latency=2e-5, overhead=5e-6)
        cal = calibrate(path)
        p = project(cal, Target(3, sync))
        measured = report_tables(analyze(load_trace(path)))
        projected = report_tables(analyze(projected_trace(cal, p)))
        for phase in ("prefill", "decode"):
            assert projected["phases"][phase]["tok_s"] == pytest.approx(measured["phases"][phase]["tok_s"], rel=1e-9)
            for a, b in zip(measured["phases"][phase]["ranks"], projected["phases"][phase]["ranks"]):
                assert b["wait_ms"] == pytest.approx(a["wait_ms"], rel=1e-6, abs=1e-9)
        assert projected["straggler"]["rank"] == measured["straggler"]["rank"]


@pytest.mark.parametrize("measured, n, sync, weights", [
    ("star", 4, "star", None), ("star", 3, "allreduce", None), ("star", 2, "star", (1.0, 3.0)),
    ("star", 1, "star", None),
    ("allreduce", 2, "allreduce", (1.0, 3.0)), ("allreduce", 4, "allreduce", None), ("allreduce", 3, "star", None),
])
def test_compute_follows_the_slice(tmp_path: Path, tiny: tuple[Path, ModelConfig], measured: str, n: int, sync: str,
                                   weights: tuple[float, ...] | None) -> None:
    """Calibrated on 1 and 2 ranks whose compute is C_W x weights x T + C_F, a projection onto other rank
    counts, strategies and shares gives the run built for them, to the last bit of arithmetic."""
    model, cfg = tiny
    one = write(tmp_path / "one.h5", model, cfg, 1, "star", model_cost(cfg, 1))
    two = write(tmp_path / "two.h5", model, cfg, 2, measured, model_cost(cfg, 2))
    cal = calibrate(two, [one])
    assert cal.coefs.coef[:, 1:3, 0] == pytest.approx(C_W, rel=1e-6)  # att and ffn, both phases: s per weight
    assert cal.coefs.coef[:, 1:3, 2] == pytest.approx(C_F, rel=1e-6)  # s per call
    got = project(cal, Target(n, sync, weights)).tok_s()
    _, table = build(cfg, n, sync, model_cost(cfg, n, weights))
    want = tok_s(table)
    assert got["decode"] == pytest.approx(want["decode"], rel=1e-9)
    assert got["prefill"] == pytest.approx(want["prefill"], rel=1e-9)


@pytest.mark.parametrize("n, sync", [(1, "star"), (4, "allreduce"), (3, "star")])
def test_a_mixture_of_experts_follows_its_rows_and_router(tmp_path: Path, models: dict[str, Path], n: int,
                                                          sync: str) -> None:
    """A MoE trace (its FFN recorded as route + experts): compute follows the rank's rows of the experts
    a token runs, plus the router every rank runs whole; projections give the run built for them."""
    path = models["qwen3-moe-tiny-q40"]
    f = open_model(path)
    cfg = f.config
    f.close()
    assert cfg.is_moe
    one = write(tmp_path / "one.h5", path, cfg, 1, "star", model_cost(cfg, 1))
    two = write(tmp_path / "two.h5", path, cfg, 2, "allreduce", model_cost(cfg, 2))
    cal = calibrate(two, [one])
    assert cal.coefs.coef[:, 2, 0] == pytest.approx(C_W, rel=1e-6)  # ffn, both phases: s per weight
    got = project(cal, Target(n, sync)).tok_s()
    want = tok_s(build(cfg, n, sync, model_cost(cfg, n))[1])
    assert got["decode"] == pytest.approx(want["decode"], rel=1e-9)
    assert got["prefill"] == pytest.approx(want["prefill"], rel=1e-9)


@pytest.mark.parametrize("measured, sync", [("replicated", "replicated"), ("replicated", "allreduce"),
                                             ("allreduce", "replicated")])
def test_replicated_attention_is_replayed(tmp_path: Path, tiny: tuple[Path, ModelConfig], measured: str,
                                          sync: str) -> None:
    """--sync replicated (every head on every rank, no attention collective): a trace of it projects onto
    itself, and an allreduce trace onto it, as the runs built for them. From replicated onto allreduce the
    attention's fixed cost per call cannot be told from its per-weight cost (every rank of the trace and the
    one-rank calibration hold the same heads), so that projection is approximate: within 2% here."""
    model, cfg = tiny
    one = write(tmp_path / "one.h5", model, cfg, 1, "star", model_cost(cfg, 1))
    two = write(tmp_path / "two.h5", model, cfg, 2, measured, model_cost(cfg, 2, replicated=measured == "replicated"))
    cal = calibrate(two, [one])
    for n in (2, 3):
        got = project(cal, Target(n, sync)).tok_s()
        _, table = build(cfg, n, sync, model_cost(cfg, n, replicated=sync == "replicated"))
        want = tok_s(table)
        rel = 2e-2 if (measured, sync) == ("replicated", "allreduce") else 1e-9
        assert got["decode"] == pytest.approx(want["decode"], rel=rel)
        assert got["prefill"] == pytest.approx(want["prefill"], rel=rel)


@pytest.mark.parametrize("n, sync", [(2, "star"), (4, "star"), (4, "allreduce")])
def test_link_latency_and_hops(tmp_path: Path, tiny: tuple[Path, ModelConfig], n: int, sync: str) -> None:
    """A trace whose collectives took overhead + hops x latency (its ping-pong said latency) projected onto
    --delay D is the run built with overhead + hops x D: bcast trees, one-hop gathers, log2 allgathers."""
    model, cfg = tiny
    one = write(tmp_path / "one.h5", model, cfg, 1, "star", model_cost(cfg, 1))  # separates C_W from C_F
    path = write(tmp_path / "run.h5", model, cfg, 2, "star", model_cost(cfg, 2), latency=1e-4, overhead=2e-5)
    cal = calibrate(path, [one])
    assert cal.link.latency == pytest.approx(1e-4)
    assert cal.link.overhead[0] == pytest.approx(2e-5, abs=1e-12)  # bcast
    assert cal.link.overhead[1] == pytest.approx(2e-5, abs=1e-12)  # gather
    assert math.isinf(cal.link.bandwidth)  # deliveries do not grow with the payload
    got = project(cal, Target(n, sync, delay_ms=0.5)).tok_s()
    _, table = build(cfg, n, sync, model_cost(cfg, n), lambda h, b: 2e-5 + h * 5e-4)
    assert got["decode"] == pytest.approx(tok_s(table)["decode"], rel=1e-9)


def test_bandwidth_is_fitted_and_can_be_given(tmp_path: Path, tiny: tuple[Path, ModelConfig]) -> None:
    """Deliveries that grow with their payload (one token's row in decode, T rows in prefill) give the rate
    back; --bandwidth puts another rate in its place."""
    model, cfg = tiny
    rate, latency = 2e7, 3e-5  # B/s, s
    one = write(tmp_path / "one.h5", model, cfg, 1, "star", model_cost(cfg, 1))
    path = write(tmp_path / "run.h5", model, cfg, 2, "star", model_cost(cfg, 2), latency=latency, rate=rate)
    cal = calibrate(path, [one])
    assert cal.link.bandwidth == pytest.approx(rate, rel=1e-6)
    assert cal.link.overhead[:2] == pytest.approx((0.0, 0.0), abs=1e-9)
    for n in (2, 3):
        got = project(cal, Target(n, "star", bandwidth_gbit=8 * 5e7 / 1e9)).tok_s()
        _, table = build(cfg, n, "star", model_cost(cfg, n), lambda h, b: h * latency + b / 5e7)
        for phase in ("prefill", "decode"):
            assert got[phase] == pytest.approx(tok_s(table)[phase], rel=1e-9)


def test_a_straggler_removed_by_speed(tmp_path: Path, tiny: tuple[Path, ModelConfig]) -> None:
    """Rank 1 spends X more in every att block: it is the straggler; --speed 1=1 runs it like the fastest
    rank, and the run is then the one built without the extra time."""
    model, cfg = tiny
    x = 2e-3
    path = write(tmp_path / "slow.h5", model, cfg, 2, "star", model_cost(cfg, 2, slow={1: x}), latency=1e-5)
    cal = calibrate(path)
    assert int(np.argmin(cal.speeds)) == 0
    measured = report_tables(analyze(load_trace(path)))
    assert measured["straggler"]["rank"] == 1
    p = project(cal, Target(2, "star", speed={1: 1.0}))
    _, table = build(cfg, 2, "star", model_cost(cfg, 2), lambda h, b: h * 1e-5)
    assert p.tok_s()["decode"] == pytest.approx(tok_s(table)["decode"], rel=1e-9)
    projected = report_tables(analyze(projected_trace(cal, p)))
    assert projected["straggler"]["caused_wait_ms"][1] < 0.01 * measured["straggler"]["caused_wait_ms"][1]
    # and half as fast as rank 0: rank 1 is the straggler again, by its whole att + ffn time per layer
    half = project(cal, Target(2, "star", speed={1: 0.5}))
    assert report_tables(analyze(projected_trace(cal, half)))["straggler"]["rank"] == 1
    assert half.tok_s()["decode"] < p.tok_s()["decode"]


# ---------------------------------------------------------------------------------------- the command


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["trace", "project", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_command_text_json_out_and_compare(tmp_path: Path, tiny: tuple[Path, ModelConfig],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model, cfg = tiny
    one = write(tmp_path / "one.h5", model, cfg, 1, "star", model_cost(cfg, 1))
    two = write(tmp_path / "two.h5", model, cfg, 2, "star", model_cost(cfg, 2), latency=5e-5)
    code, text, err = run_cli(capsys, str(two), "--calibrate", str(one), "--ranks", "4", "--delay", "0.2",
                              "--out", str(tmp_path / "p4.h5"))
    assert code == 0, err
    assert re.search(r"decode tok/s\s+\d+\.\d+\s+\d+\.\d+", text) and "latency 200.0 us" in text
    assert "replays" in text and "rank 0" in text
    code, out, err = run_cli(capsys, str(two), "--calibrate", str(one), "--ranks", "4", "--delay", "0.2", "--json")
    tab = json.loads(out)
    want = tok_s(build(cfg, 4, "star", model_cost(cfg, 4), lambda h, b: h * 2e-4)[1])
    assert tab["projected"]["decode_tok_s"] == pytest.approx(want["decode"], rel=1e-9)
    assert tab["measured"]["ranks"] == 2 and tab["projected"]["ranks"] == 4 and len(tab["projected"]["per_rank"]) == 4
    # the projected run is a trace: report and compare read it, with the same tok/s as the projection
    projected = load_trace(tmp_path / "p4.h5")
    assert projected.attrs["projected_from"] == str(two)
    table = phase_table(projected, step_times(projected, analyze(projected).coll))
    assert table["decode"]["tok_s"] == pytest.approx(want["decode"], rel=1e-9)
    assert main(["trace", "compare", str(two), str(tmp_path / "p4.h5")]) == 0
    out = capsys.readouterr().out
    assert "projection of" in out and "decode tok/s" in out


def test_grid_and_plot(tmp_path: Path, tiny: tuple[Path, ModelConfig], capsys: pytest.CaptureFixture[str]) -> None:
    model, cfg = tiny
    two = write(tmp_path / "two.h5", model, cfg, 2, "star", model_cost(cfg, 2), latency=5e-5)
    png = tmp_path / "grid.png"
    code, out, err = run_cli(capsys, str(two), "--ranks", "1,2,3,4", "--delay", "0.1,0.5", "--sync", "star,allreduce",
                             "--grid", str(png))
    assert code == 0, err
    assert png.stat().st_size > 1000
    rows = [line for line in out.splitlines() if re.match(r"\s+\d\s+(star|allreduce)\s", line)]
    assert len(rows) == 16
    code, out, err = run_cli(capsys, str(two), "--ranks", "2,4", "--sync", "auto", "--json")
    points = json.loads(out)["points"]
    assert [p["ranks"] for p in points] == [2, 4] and all(p["sync"] in ("star", "allreduce") for p in points)


def test_bad_input_is_one_line(tmp_path: Path, tiny: tuple[Path, ModelConfig],
                               capsys: pytest.CaptureFixture[str]) -> None:
    model, cfg = tiny
    two = write(tmp_path / "two.h5", model, cfg, 2, "star", model_cost(cfg, 2))
    one = write(tmp_path / "one.h5", model, cfg, 1, "star", model_cost(cfg, 1))
    text = tmp_path / "notes.txt"
    text.write_text("not a trace")
    cases = [
        ([str(tmp_path / "missing.h5")], "does not exist"),
        ([str(text)], "not a readable HDF5 file"),
        ([str(two), "--ranks", "0"], "--ranks 0"),
        ([str(two), "--ranks", "x"], "--ranks 'x'"),
        ([str(two), "--ranks", "99"], "attention heads"),
        ([str(two), "--speed", "5=1"], "no rank 5"),
        ([str(two), "--speed", "fast"], "RANK=FACTOR"),
        ([str(two), "--speed", "1=0"], "positive"),
        ([str(two), "--rank-weights", "1,1,1"], "3 values for 2 ranks"),
        ([str(two), "--sync", "ring"], "star, allreduce, replicated or auto"),
        ([str(two), "--delay", "-1"], "--delay -1"),
        ([str(two), "--model", str(text)], "unknown format"),
        ([str(two), "--ranks", "2,4", "--out", str(tmp_path / "x.h5")], "--out writes one"),
        ([str(one), "--ranks", "2"], "measured no link"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, *args)
        assert code == 2, (args, out)
        assert out == "" and len(err.strip().splitlines()) == 1 and message in err, (args, err)


def test_the_model_file_can_be_given_when_the_recorded_one_is_gone(tmp_path: Path, tiny: tuple[Path, ModelConfig],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model, cfg = tiny
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(model.read_bytes())
    path = write(tmp_path / "two.h5", gone, cfg, 2, "star", model_cost(cfg, 2))
    gone.unlink()
    code, _, err = run_cli(capsys, str(path))
    assert code == 2 and "pass --model" in err
    code, _, err = run_cli(capsys, str(path), "--model", str(model), "--ranks", "3")
    assert code == 0, err


def test_the_shapes_recorded_in_the_trace_stand_in_for_a_missing_model(
        tmp_path: Path, tiny: tuple[Path, ModelConfig], capsys: pytest.CaptureFixture[str]) -> None:
    model, cfg = tiny
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(model.read_bytes())
    path = write(tmp_path / "two.h5", gone, cfg, 2, "star", model_cost(cfg, 2), shapes=True)
    with_file = run_cli(capsys, str(path), "--ranks", "3", "--json")
    gone.unlink()
    without = run_cli(capsys, str(path), "--ranks", "3", "--json")
    assert with_file[0] == without[0] == 0 and without[1] == with_file[1], without[2]
    assert model_config_from_json(model_config_json(cfg)) == cfg


def test_an_engine_trace_records_the_model_shapes(tmp_path: Path, models: dict[str, Path]) -> None:
    trace = tmp_path / "run.h5"
    done = subprocess.run([sys.executable, "-m", "mpillama", "generate", "--model", str(models["qwen3-tiny-q40"]),
                           "--prompt", "Hi", "--steps", "2", "--trace", str(trace)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with h5py.File(trace) as f:
        recorded = model_config_from_json(f.attrs["model_config"])
    f = open_model(models["qwen3-tiny-q40"])
    assert recorded == f.config
    f.close()


# ---------------------------------------------------------------------------------------- a measured run


def test_a_slowed_rank_projected_without_its_slowdown(tmp_path: Path, models: dict[str, Path]) -> None:
    """Two ranks, rank 1 sleeping S in every attention block (MPILLAMA_TEST_SLOW): a known straggler.

    Projected onto the same run with rank 1 as fast as rank 0 (--speed 1=1), each decode step must
    lose about the sleep of its n_layers blocks. Both figures come from the same run, so this holds
    however loaded the machine is; the projection of the trace onto itself gives its own tok/s.
    """
    from tests.mpi_launch import run_mpillama

    sleep, steps = 0.03, 8
    trace = tmp_path / "slow.h5"
    done = run_mpillama(2, "generate", "--model", str(models["tiny-q40"]), "--prompt", "Hello world", "--steps",
                        str(steps), "--ignore-eos", "--sync", "star", "--trace", str(trace),
                        MPILLAMA_TEST_SLOW=f"1:{sleep}")
    assert done.returncode == 0, done.stderr[-3000:]
    cal = calibrate(trace)
    cfg = cal.measured.cfg
    measured = report_tables(analyze(cal.measured.trace))
    assert measured["straggler"]["rank"] == 1
    same = project(cal, Target(2, "star")).tok_s()
    # the replay of a trace onto itself: 1e-4 on a quiet host; a loaded one left 7e-4 (one CI run), not yet
    # explained (see issue 18), so this bounds it at 1e-2, well inside the saving checked below
    assert same["decode"] == pytest.approx(measured["phases"]["decode"]["tok_s"], rel=1e-2)
    removed = project(cal, Target(2, "star", speed={1: 1.0})).tok_s()
    saved = 1 / measured["phases"]["decode"]["tok_s"] - 1 / removed["decode"]  # s per decode token
    # what rank 1's sleeps really added, from the same run: its attention time per decode token over
    # rank 0's (a loaded host oversleeps: the nominal n_layers * sleep is only what was asked for)
    tr = cal.measured.trace
    seg, decode = tr.segments, tr.steps.step[tr.steps.phase == tr.phase_names.index("decode")]
    att = (seg.seg == tr.segment_names.index("att")) & np.isin(seg.step, decode)
    att_s = [seg.dur[att & (seg.rank == r)].sum() / len(decode) for r in (0, 1)]
    slowed = att_s[1] - att_s[0]
    assert slowed > 0.8 * cfg.n_layers * sleep, (att_s, cfg.n_layers * sleep)  # a sleep never ends early
    assert 0.8 < saved / slowed < 1.25, (saved, slowed)
