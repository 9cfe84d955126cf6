"""TraceSession under real MPI: collection to rank 0, clock offsets, an injected straggler, SIGTERM.

Run with
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
        mpirun -n 3 --oversubscribe python -m pytest --with-mpi tests/mpi/test_trace_mpi.py
(tests/test_mpi_runs.py runs the whole of tests/mpi so at 1-4 ranks). Run as a script,
`mpirun -n 2 python tests/mpi/test_trace_mpi.py --sigterm-run FILE.h5`, this file is the
traced job that tests/test_trace.py terminates with SIGTERM.

A fake engine loop stands in for the model: time.sleep for compute, real Bcast/Gather
for the collectives, recorded the way the engine records them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpillama.comm import Comm
from mpillama.trace import session as session_mod
from mpillama.trace.analysis import analyze, collectives, load_trace, segment_problems
from mpillama.trace.recorder import (
    SEG_ATT, SEG_ATT_SYNC, SEG_CTRL_SYNC, SEG_EMBED, SEG_FFN, SEG_FFN_SYNC, SEG_LOAD, SEG_SAMPLE, NullRecorder,
)
from mpillama.trace.report import trace_report
from mpillama.trace.session import TraceSession

N_LAYERS = 3
DIM = 64


def fake_run(comm, sess: TraceSession, n_steps: int, slow_rank: int = -1, delay_s: float = 0.0,
             compute_s: float = 0.002, step_pause_s: float = 0.0) -> list[float]:
    """A forward-pass-shaped loop: ctrl Bcast, per layer att + Gather and ffn + Bcast, then sample on rank 0.

    slow_rank sleeps delay_s more in every att segment (the injected straggler) and returns
    how long each of those sleeps really took (a loaded machine oversleeps), in (step, layer) order.
    Every rank's att_sync entry times are kept in sess.att_entries (the truth the waits derive from).
    """
    delays = []
    sess.att_entries = []
    rank, size = comm.Get_rank(), comm.Get_size()
    rec = sess.recorder
    pc = time.perf_counter
    ctrl = np.zeros(4, np.int64)  # (4,) i64 control message
    part = np.zeros(DIM, np.float32)  # (dim,) f32 this rank's partial
    parts = np.zeros((size, DIM), np.float32) if rank == 0 else None  # (n_ranks, dim) f32
    y = np.zeros(DIM, np.float32)  # (dim,) f32 broadcast activations
    t = pc()
    time.sleep(compute_s)
    rec.add(SEG_LOAD, -1, t, pc())
    for step in range(n_steps):
        rec.step = step
        t = pc()
        if rank == 0:
            rec.begin_step("prefill" if step == 0 else "decode", 4 if step == 0 else 1, 0 if step == 0 else 3 + step, t)
            time.sleep(compute_s / 4)
            rec.add(SEG_EMBED, -1, t, t := pc())
        comm.Bcast(ctrl, root=0)
        rec.add(SEG_CTRL_SYNC, -1, t, t := pc(), ctrl.nbytes)
        for layer in range(N_LAYERS):
            time.sleep(compute_s)
            if rank == slow_rank:
                t_delay = pc()
                time.sleep(delay_s)
                delays.append(pc() - t_delay)
            rec.add(SEG_ATT, layer, t, t := pc())
            sess.att_entries.append(t)
            comm.Gather(part, parts, root=0)
            rec.add(SEG_ATT_SYNC, layer, t, t := pc(), part.nbytes)
            time.sleep(compute_s)
            rec.add(SEG_FFN, layer, t, t := pc())
            comm.Bcast(y, root=0)
            rec.add(SEG_FFN_SYNC, layer, t, t := pc(), y.nbytes)
        if rank == 0:
            time.sleep(compute_s / 4)
            rec.add(SEG_SAMPLE, -1, t, t := pc())
            rec.end_step(t)
        sess.end_step()
        time.sleep(step_pause_s)
    return delays


def shared_path(comm, tmp_path: Path, name: str) -> str:
    return comm.bcast(str(tmp_path / name) if comm.Get_rank() == 0 else None, root=0)


def trace_comm(comm) -> Comm:
    """The session talks through mpillama's Comm (its timeouts and tags), as in the engine."""
    return Comm(comm, timeout=120.0, chunk_bytes=1 << 20)


def open_session(comm, path: str | None, capacity: int = 4096) -> TraceSession:
    meta = {"argv": ["test"], "command": "test", "model": "fake", "sync": "star", "buffer_float_type": "q80",
            "nthreads": 1}
    info = {"nthreads": 1, "n_heads": 2, "ffn_rows": 64, "vocab_rows": 10, "weight_bytes": 1000,
            "weight_share": 1 / comm.Get_size()}
    return TraceSession.open(trace_comm(comm), path, meta, info, capacity)


# ---------------------------------------------------------------------------------------- under mpirun


@pytest.mark.mpi(min_size=2)
def test_injected_straggler_is_named_and_waits_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    path = shared_path(comm, tmp_path, "straggler.h5")
    writes = []
    real_write = session_mod.write_trace
    monkeypatch.setattr(session_mod, "write_trace",
                        lambda p, d, **kw: writes.append(d.partial) or real_write(p, d, **kw))
    slow, delay = size - 1, 0.1
    sess = open_session(comm, path)
    fake_run(comm, sess, n_steps=5, slow_rank=slow, delay_s=delay)
    sess.close({"note": "straggler"})
    entries = np.array(comm.gather(sess.att_entries, root=0))  # (n_ranks, n_att_sync) s, one host's clock
    counts = comm.gather(writes, root=0)
    if rank != 0:
        return
    assert counts[0][-1] is False and counts[1:] == [[]] * (size - 1), counts  # only rank 0 writes; last: final
    assert sorted(os.listdir(tmp_path)) == ["straggler.h5"]  # no .part left, one file
    trace = load_trace(path)
    a = analyze(trace)
    assert a.straggler.rank == slow, a.straggler
    assert f"straggler: rank {slow}," in trace_report(path)
    coll = a.coll
    att = (coll.seg == SEG_ATT_SYNC) & coll.complete
    assert att.sum() == 5 * N_LAYERS
    # The truth, from each rank's own clock (one host: one monotonic clock): a rank waited from its own
    # entry until the last rank's. On a loaded host any rank may oversleep, so this, not the injected
    # delay, is what the derived waits must match (within the clock-offset estimate's error).
    truth = (entries.max(axis=0)[None, :] - entries).T  # (n_att_sync, n_ranks) s
    assert (coll.last_rank[att] == entries.argmax(axis=0)).all()
    waits = coll.wait[att]  # (n_att_sync, n_ranks) s, instances in (step, layer) order
    assert np.all(np.abs(waits - truth) <= 0.1 * delay), (waits, truth)


@pytest.mark.mpi(min_size=2)
def test_schema_coverage_and_clock_offsets(tmp_path: Path) -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    path = shared_path(comm, tmp_path, "plain.h5")
    sess = open_session(comm, path, capacity=64)  # ~15 records a step: several flushes, no drops
    fake_run(comm, sess, n_steps=30, compute_s=0.001)  # long enough that one preemption between segments is < 5%
    sess.close({"decode_tok_s": 1.0})
    comm.Barrier()
    if rank != 0:
        return
    trace = load_trace(path)
    assert trace.n_ranks == size and not trace.partial
    assert trace.attrs["command"] == "test" and trace.summary["decode_tok_s"] == 1.0
    assert trace.attrs["mpi_library_version"]  # read from the communicator's module
    r = trace.ranks
    assert list(r["rank"]) == list(range(size))
    assert (r["n_dropped"] == 0).all() and (r["n_flushes"] >= 3).all(), (r["n_dropped"], r["n_flushes"])
    assert (r["n_records"] == np.bincount(trace.segments.rank, minlength=size)).all()
    # Same host, same CLOCK_MONOTONIC: the true offset is 0, so each estimate is within its rtt / 2.
    for col, rtt in (("clock_offset", "clock_rtt"), ("clock_offset_end", "clock_rtt_end")):
        assert np.all(np.abs(r[col]) <= r[rtt] / 2 + 1e-6), (r[col], r[rtt])
        assert np.all(np.abs(r[col]) < 0.01), r[col]  # and small: a loaded 2-core machine gives rtt of ms
    assert segment_problems(trace) == []
    a = analyze(trace)
    assert np.all(np.abs(a.coverage["ratio"] - 1) < 0.05), a.coverage
    # Every step has each rank's records; a collective's key matches on every rank.
    assert collectives(trace).complete.all()
    for s in trace.steps.step:
        assert set(trace.segments.rank[trace.segments.step == s]) == set(range(size))


@pytest.mark.mpi(min_size=2)
def test_untraced_session_records_nothing(tmp_path: Path) -> None:
    comm = MPI.COMM_WORLD
    sess = open_session(comm, None)
    assert isinstance(sess.recorder, NullRecorder)
    fake_run(comm, sess, n_steps=2, compute_s=0.0)
    sess.close({})
    sess.write_partial("nothing")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.mpi(min_size=2)
def test_bad_trace_path_fails_on_every_rank(tmp_path: Path) -> None:
    comm = MPI.COMM_WORLD
    path = shared_path(comm, tmp_path, "no/such/dir/run.h5")
    with pytest.raises(session_mod.MpillamaError, match="does not exist"):
        open_session(comm, path)


@pytest.mark.mpi(min_size=2)
def test_checkpoints_leave_a_partial_file_during_the_run(tmp_path: Path) -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    path = shared_path(comm, tmp_path, "ckpt.h5")
    sess = TraceSession.open(trace_comm(comm), path, {"command": "test"}, {}, capacity=4096, checkpoint_s=0.02)
    fake_run(comm, sess, n_steps=10, compute_s=0.001)
    mid = load_trace(path) if rank == 0 else None  # mid-run (close not called yet); asserted after the collectives
    comm.Barrier()
    sess.close({})
    if rank != 0:
        return
    assert mid.partial and mid.partial_reason.startswith("checkpoint"), mid.partial_reason
    assert sess.n_checkpoints >= 1 and len(mid.steps) >= 1
    assert set(np.unique(mid.segments.rank)) == set(range(comm.Get_size()))
    trace = load_trace(path)
    assert not trace.partial and len(trace.steps) == 10
    assert sorted(os.listdir(tmp_path)) == ["ckpt.h5"]


# ---------------------------------------------------------------------------------------- one rank


def test_single_rank_session_and_partial(tmp_path: Path) -> None:
    comm = MPI.COMM_SELF
    path = str(tmp_path / "one.h5")
    sess = open_session(comm, path, capacity=32)
    fake_run(comm, sess, n_steps=6, compute_s=0.0005)
    sess.write_partial("test stop")
    sess.write_partial("again")  # a second call and close() do nothing
    sess.close({})
    trace = load_trace(path)
    assert trace.partial and trace.partial_reason == "test stop"
    assert len(trace.steps) == 6 and trace.ranks["n_dropped"][0] == 0
    assert "PARTIAL (test stop)" in trace_report(path)
    assert sorted(os.listdir(tmp_path)) == ["one.h5"]


def test_a_signal_during_a_checkpoint_writes_its_partial_file_after_it(tmp_path: Path) -> None:
    """A handler's write_partial that interrupts a checkpoint's write is deferred, not dropped: the
    checkpoint's write ends, then the partial file with the signal's reason is written and `then` runs."""
    comm = MPI.COMM_SELF
    path = str(tmp_path / "sig.h5")
    sess = open_session(comm, path, capacity=32)
    fake_run(comm, sess, n_steps=4, compute_s=0.0005)
    called = []
    real_write = session_mod.write_trace

    def write_interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        sess.write_partial("SIGTERM", then=lambda: called.append(True))  # the signal arrives mid-write
        assert not called  # deferred
        return real_write(*args, **kwargs)

    session_mod.write_trace = write_interrupted
    try:
        sess._write_partial("checkpoint: the run had not ended")
    finally:
        session_mod.write_trace = real_write
    assert called == [True]
    trace = load_trace(path)
    assert trace.partial and trace.partial_reason == "SIGTERM" and len(trace.steps) == 4


# ---------------------------------------------------------------------------------------- SIGTERM


def _sigterm_main(path: str) -> None:
    """Entry point for the SIGTERM test: a traced fake run that writes a partial file when terminated."""
    comm = MPI.COMM_WORLD
    sess = TraceSession.open(trace_comm(comm), path, {"command": "test"}, {}, capacity=4096, checkpoint_s=0.2)

    def on_term(signum: int, frame: object) -> None:
        # Workers carry on, so that rank 0 is never left blocked in a collective with a rank
        # that has gone; mpirun ends them once rank 0 has left. (The engine's collectives
        # poll with a timeout and so return to Python, where the handler runs, either way.)
        if comm.Get_rank() == 0:  # exits once the file is written (after a checkpoint it interrupted, if any)
            sess.write_partial(signal.Signals(signum).name, then=lambda: os._exit(0))

    signal.signal(signal.SIGTERM, on_term)
    if comm.Get_rank() == 0:
        Path(path + ".running").write_text(str(os.getpid()))
    fake_run(comm, sess, n_steps=100000, compute_s=0.001, step_pause_s=0.002)


if __name__ == "__main__" and sys.argv[1:2] == ["--sigterm-run"]:
    _sigterm_main(sys.argv[2])
