"""mpillama on the emulated cluster (tests/cluster): a grid of hosts x one-way delay x sync.

    python bench/cluster.py [--synthetic llama3.2-1b | --model FILE] [--hosts 2] [--delays 0,0.1,0.5]
                            [--syncs star,allreduce,replicated,auto] [--rate-gbit R] [--steps 32] [--prompt-tokens 64]
                            [--repeat 1] [--rounds 3] [--dllama PATH] [--hop]

Root only. One rank per host, one thread per rank, mpirun by hostfile through the cluster's
launch agent; the switch adds the one-way delay D (and the rate) to every link. Per point:
prefill and decode tok/s of `mpillama bench --json` (median of --repeat inside one run), rank 0's
sync ms per decode token, and each figure's ratio to the first D (0 by default) at the same hosts
and sync. replicated holds every attention head on every rank: one sync per layer instead of two, for
more weights read per token (auto takes it only where the start-up timings say it pays). --rounds R runs the whole grid R times, interleaved (every D and system once per round),
and takes the median of each figure over the rounds.
First, per D, the MPI round trip of an 8-byte message between node0 and node1 (median and best
of 2000), and how late the switch let delayed frames go. --hop also measures that round trip
through a kernel bridge: half the difference is the switch's own cost per hop.

--dllama PATH (a `dllama` binary built from distributed-llama's source, outside this project)
adds distributed-llama on the same hosts and model (q40 .m and .t written from the GGUF, see
bench/dllama_peer.py): root on node0, a worker on each other host, one thread each, the same
buffer type, prompt length and generated tokens, --max-seq-len 4096. Its figures are the ones it
prints (Evaluation and Prediction tokens/s; root's Sync ms per predicted token, whole ms each), and
a second table gives mpillama / distributed-llama per sync. distributed-llama's threads busy-wait,
so on a loaded host its figures suffer more than mpillama's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import dllama_peer  # noqa: E402
from tests.cluster import Cluster, unavailable  # noqa: E402

DLLAMA = "dllama"  # the sync column's name for distributed-llama's rows

PING_PONG = """
import time, numpy as np
from mpi4py import MPI
comm, buf = MPI.COMM_WORLD, np.zeros(1)
times = []
for i in range({rounds} + 100):  # the first 100 warm the connection up
    comm.Barrier()
    t = time.perf_counter()
    if comm.rank == 0:
        comm.Send(buf, 1); comm.Recv(buf, 1)
    else:
        comm.Recv(buf, 0); comm.Send(buf, 0)
    times.append(time.perf_counter() - t)
if comm.rank == 0:
    us = np.array(times[100:]) * 1e6
    print(f"{{np.median(us):.1f}} {{us.min():.1f}}")
"""


def mpi_rtt(cluster: Cluster, rounds: int = 2000) -> tuple[float, float]:
    """(median, best) round trip in us of an 8-byte MPI message between node0 and node1."""
    done = cluster.run(2, [sys.executable, "-c", PING_PONG.format(rounds=rounds)], timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"ping-pong failed: {done.stderr[-2000:]}")
    median, best = (float(x) for x in done.stdout.split()[-2:])
    return median, best


def link_report(cluster: Cluster, d: float) -> float:
    """Print the MPI round trip at this D and how late the switch let delayed frames go; the median, us."""
    before = cluster.switch_stats()
    med, best = mpi_rtt(cluster)
    after = cluster.switch_stats()
    queued = max(after["queued"] - before["queued"], 1)
    late_us = (after["late_ns_sum"] - before["late_ns_sum"]) / queued / 1e3
    print(f"MPI round trip through the switch at D = {d:g} ms: median {med:.1f} us, best {best:.1f} us "
          f"(delayed frames left the switch {late_us:.1f} us late on average)", flush=True)
    return med


def bench_point(cluster: Cluster, hosts: int, sync: str, args: argparse.Namespace) -> dict:
    """One `mpillama bench` across the first `hosts` hosts: its JSON line."""
    model = ["--model", args.model] if args.model else ["--synthetic", args.synthetic]
    done = cluster.run_mpillama(hosts, "bench", *model, "--json", "--sync", sync,
                                "--buffer-float-type", args.buffer_float_type, "--steps", str(args.steps),
                                "--prompt-tokens", str(args.prompt_tokens), "--repeat", str(args.repeat),
                                timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"bench at {hosts} hosts, sync {sync} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dllama_point(cluster: Cluster, hosts: int, peer: dict, args: argparse.Namespace) -> dict:
    """One distributed-llama run across the first `hosts` hosts, in bench_point's keys."""
    r = dllama_peer.run_dllama(cluster, hosts, args.dllama, peer["m"], peer["t"], peer["prompt"],
                               args.prompt_tokens, args.steps, args.buffer_float_type)
    return {"sync": DLLAMA, "prompt_tok_s": r.prompt_tok_s, "gen_tok_s": r.gen_tok_s, "rank0_sync_ms": r.sync_ms}


def prepare_dllama(args: argparse.Namespace, host_counts: list[int]) -> dict | None:
    """The peer's files and prompt, or None when --dllama is not given (its column is skipped)."""
    if args.dllama is None:
        return None
    if not os.access(args.dllama, os.X_OK):
        raise SystemExit(f"--dllama {args.dllama}: not an executable file (build distributed-llama's `dllama`)")
    odd = [h for h in host_counts if h & (h - 1)]
    if odd:  # distributed-llama runs on 1, 2, 4, 8... nodes only
        print(f"distributed-llama skipped at {odd} hosts: it takes a power of two", file=sys.stderr)
    m, t = dllama_peer.dllama_files(dllama_peer.source_gguf(args.model, args.synthetic))
    return {"m": m, "t": t, "prompt": dllama_peer.prompt_text(t, args.prompt_tokens)}


def median_row(runs: list[dict]) -> dict:
    """The median of each figure over interleaved rounds; auto's choice as it was made (all rounds)."""
    row = {k: median(r[k] for r in runs) for k in ("prompt_tok_s", "gen_tok_s", "rank0_sync_ms")}
    row["chose"] = "/".join(sorted({r["sync"] for r in runs}))
    return row


def print_tables(rows: list[dict], args: argparse.Namespace) -> None:
    what = args.model or f"synthetic {args.synthetic}"
    rate = f"{args.rate_gbit:g} Gbit/s" if args.rate_gbit else "unlimited rate"
    print(f"\n{what}, buffers {args.buffer_float_type}, 1 thread per rank, {rate}, {args.prompt_tokens} prompt "
          f"tokens, {args.steps} decode steps, median of {args.rounds} interleaved round(s) "
          f"(mpillama: each the median of {args.repeat} inside its run)")
    print(f"{'hosts':>5} {'D ms':>5} {'sync':>18} {'rtt us':>7} {'prefill tok/s':>14} {'ratio':>6} "
          f"{'decode tok/s':>13} {'ratio':>6} {'sync ms/tok':>12} {'ratio':>6}")
    for r in rows:
        base = next(b for b in rows if b["hosts"] == r["hosts"] and b["sync"] == r["sync"])  # the first D
        name = r["sync"] if r["sync"] == r["chose"] or r["sync"] == DLLAMA else f"{r['sync']} -> {r['chose']}"
        print(f"{r['hosts']:>5} {r['delay_ms']:>5g} {name:>18} {r['rtt_us']:>7.0f} "
              f"{r['prompt_tok_s']:>14.1f} {r['prompt_tok_s'] / base['prompt_tok_s']:>6.2f} "
              f"{r['gen_tok_s']:>13.2f} {r['gen_tok_s'] / base['gen_tok_s']:>6.2f} "
              f"{r['rank0_sync_ms']:>12.2f} {r['rank0_sync_ms'] / max(base['rank0_sync_ms'], 1e-9):>6.2f}")
    peers = {(r["hosts"], r["delay_ms"]): r for r in rows if r["sync"] == DLLAMA}
    if not peers:
        return
    print("\nmpillama / distributed-llama on the same hosts and link (decode, prefill)")
    print(f"{'hosts':>5} {'D ms':>5} {'sync':>18} {'decode tok/s':>13} {'dllama':>7} {'ratio':>6} "
          f"{'prefill tok/s':>14} {'dllama':>7} {'ratio':>6}")
    for r in rows:
        peer = peers.get((r["hosts"], r["delay_ms"]))
        if peer is None or r["sync"] == DLLAMA:
            continue
        name = r["sync"] if r["sync"] == r["chose"] else f"{r['sync']} -> {r['chose']}"
        print(f"{r['hosts']:>5} {r['delay_ms']:>5g} {name:>18} {r['gen_tok_s']:>13.2f} {peer['gen_tok_s']:>7.2f} "
              f"{r['gen_tok_s'] / peer['gen_tok_s']:>6.2f} {r['prompt_tok_s']:>14.1f} "
              f"{peer['prompt_tok_s']:>7.1f} {r['prompt_tok_s'] / peer['prompt_tok_s']:>6.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model")
    g.add_argument("--synthetic", default="llama3.2-1b")
    p.add_argument("--hosts", default="2", help="comma list of host counts")
    p.add_argument("--delays", default="0,0.1,0.5", help="comma list of one-way delays, ms")
    p.add_argument("--syncs", default="star,allreduce,replicated,auto")
    p.add_argument("--rate-gbit", type=float, default=None, help="link rate (default: unlimited)")
    p.add_argument("--buffer-float-type", default="q80")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1, help="mpillama bench's --repeat inside each run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved passes over the grid (median per point)")
    p.add_argument("--dllama", type=Path, help="distributed-llama's `dllama` binary: adds it beside mpillama")
    p.add_argument("--hop", action="store_true", help="also measure the switch's own cost per hop")
    args = p.parse_args()
    reason = unavailable()
    if reason:
        print(f"cluster bench: {reason}", file=sys.stderr)
        return 2
    host_counts = [int(x) for x in args.hosts.split(",")]
    delays = [float(x) for x in args.delays.split(",")]
    syncs = args.syncs.split(",")
    peer = prepare_dllama(args, host_counts)
    if args.hop:
        with Cluster(2, bridge=True) as bridged:
            med, best = mpi_rtt(bridged)
        print(f"MPI round trip through a kernel bridge: median {med:.1f} us, best {best:.1f} us")
    rtts: dict[float, float] = {}
    runs: dict[tuple[int, float, str], list[dict]] = {}
    with Cluster(max(max(host_counts), 2)) as cluster:
        # rounds outermost: every D and system once per round, so a host whose load drifts
        # over the minutes shifts all points of a round alike rather than one D
        for k in range(args.rounds):
            for d in delays:
                cluster.set_links(d, args.rate_gbit)
                if d not in rtts:
                    rtts[d] = link_report(cluster, d)
                for hosts in host_counts:
                    for s in syncs + ([DLLAMA] if peer and not hosts & (hosts - 1) else []):
                        r = dllama_point(cluster, hosts, peer, args) if s == DLLAMA else bench_point(cluster, hosts, s, args)
                        runs.setdefault((hosts, d, s), []).append(r)
                        print(f"  round {k + 1}, {hosts} hosts, D {d:g} ms, {s if s == r['sync'] else s + ' -> ' + r['sync']}: "
                              f"prefill {r['prompt_tok_s']:.1f} tok/s, decode {r['gen_tok_s']:.2f} tok/s, "
                              f"rank 0 sync {r['rank0_sync_ms']:.2f} ms/token, load {os.getloadavg()[0]:.1f}", flush=True)
        stats = cluster.switch_stats()
    rows = [{"hosts": h, "delay_ms": d, "sync": s, "rtt_us": rtts[d], **median_row(r)}
            for (h, d, s), r in sorted(runs.items(), key=lambda kv: (kv[0][0], delays.index(kv[0][1])))]
    print_tables(rows, args)
    print(f"switch: {stats['frames']} frames, {stats['drops']} dropped, longest queue {stats['max_queue']} frames, "
          f"latest delayed frame {stats['late_ns_max'] / 1e3:.0f} us after its time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
