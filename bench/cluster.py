"""mpillama on the emulated cluster (tests/cluster): a grid of hosts x one-way delay x sync.

    python bench/cluster.py [--synthetic llama3.2-1b | --model FILE] [--hosts 2] [--delays 0,0.1,0.5]
                            [--syncs star,allreduce] [--rate-gbit R] [--steps 32] [--prompt-tokens 64]
                            [--repeat 3] [--hop]

Root only. One rank per host, one thread per rank, mpirun by hostfile through the cluster's
launch agent; the switch adds the one-way delay D (and the rate) to every link. Per point:
prefill and decode tok/s of `mpillama bench --json` (median of --repeat), rank 0's sync ms per
decode token, and each figure's ratio to the first D (0 by default) at the same hosts and sync.
First, per D, the MPI round trip of an 8-byte message between node0 and node1 (median and best
of 2000), and how late the switch let delayed frames go. --hop also measures that round trip
through a kernel bridge: half the difference is the switch's own cost per hop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import Cluster, unavailable  # noqa: E402

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


def bench_point(cluster: Cluster, hosts: int, sync: str, args: argparse.Namespace) -> dict:
    model = ["--model", args.model] if args.model else ["--synthetic", args.synthetic]
    done = cluster.run_mpillama(hosts, "bench", *model, "--json", "--sync", sync,
                                "--buffer-float-type", args.buffer_float_type, "--steps", str(args.steps),
                                "--prompt-tokens", str(args.prompt_tokens), "--repeat", str(args.repeat),
                                timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"bench at {hosts} hosts, sync {sync} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model")
    g.add_argument("--synthetic", default="llama3.2-1b")
    p.add_argument("--hosts", default="2", help="comma list of host counts")
    p.add_argument("--delays", default="0,0.1,0.5", help="comma list of one-way delays, ms")
    p.add_argument("--syncs", default="star,allreduce")
    p.add_argument("--rate-gbit", type=float, default=None, help="link rate (default: unlimited)")
    p.add_argument("--buffer-float-type", default="q80")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--hop", action="store_true", help="also measure the switch's own cost per hop")
    args = p.parse_args()
    reason = unavailable()
    if reason:
        print(f"cluster bench: {reason}", file=sys.stderr)
        return 2
    host_counts = [int(x) for x in args.hosts.split(",")]
    delays = [float(x) for x in args.delays.split(",")]
    syncs = args.syncs.split(",")
    if args.hop:
        with Cluster(2, bridge=True) as bridged:
            median, best = mpi_rtt(bridged)
        print(f"MPI round trip through a kernel bridge: median {median:.1f} us, best {best:.1f} us")
    rows = []
    with Cluster(max(max(host_counts), 2)) as cluster:
        for d in delays:
            cluster.set_links(d, args.rate_gbit)
            before = cluster.switch_stats()
            median, best = mpi_rtt(cluster)
            after = cluster.switch_stats()
            queued = max(after["queued"] - before["queued"], 1)
            late_us = (after["late_ns_sum"] - before["late_ns_sum"]) / queued / 1e3
            print(f"MPI round trip through the switch at D = {d:g} ms: median {median:.1f} us, best {best:.1f} us "
                  f"(delayed frames left the switch {late_us:.1f} us late on average)", flush=True)
            for hosts in host_counts:
                for sync in syncs:
                    r = bench_point(cluster, hosts, sync, args)
                    rows.append({"hosts": hosts, "delay_ms": d, "sync": sync, "rtt_us": median, **r})
                    print(f"  {hosts} hosts, D {d:g} ms, {sync}: prefill {r['prompt_tok_s']:.1f} tok/s, "
                          f"decode {r['gen_tok_s']:.2f} tok/s, rank 0 sync {r['rank0_sync_ms']:.2f} ms/token",
                          flush=True)
        stats = cluster.switch_stats()
    what = args.model or f"synthetic {args.synthetic}"
    rate = f"{args.rate_gbit:g} Gbit/s" if args.rate_gbit else "unlimited rate"
    print(f"\n{what}, buffers {args.buffer_float_type}, 1 thread per rank, {rate}, "
          f"{args.prompt_tokens} prompt tokens, {args.steps} decode steps, median of {args.repeat}")
    print(f"{'hosts':>5} {'D ms':>5} {'sync':>9} {'rtt us':>7} {'prefill tok/s':>14} {'ratio':>6} "
          f"{'decode tok/s':>13} {'ratio':>6} {'sync ms/tok':>12} {'ratio':>6}")
    for r in rows:
        base = next(b for b in rows if b["hosts"] == r["hosts"] and b["sync"] == r["sync"])  # the first D
        print(f"{r['hosts']:>5} {r['delay_ms']:>5g} {r['sync']:>9} {r['rtt_us']:>7.0f} "
              f"{r['prompt_tok_s']:>14.1f} {r['prompt_tok_s'] / base['prompt_tok_s']:>6.2f} "
              f"{r['gen_tok_s']:>13.2f} {r['gen_tok_s'] / base['gen_tok_s']:>6.2f} "
              f"{r['rank0_sync_ms']:>12.2f} {r['rank0_sync_ms'] / max(base['rank0_sync_ms'], 1e-9):>6.2f}")
    print(f"switch: {stats['frames']} frames, {stats['drops']} dropped, longest queue {stats['max_queue']} frames, "
          f"latest delayed frame {stats['late_ns_max'] / 1e3:.0f} us after its time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
