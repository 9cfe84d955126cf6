"""How well `trace project` predicts runs that were really measured (issue 18's validation).

    python bench/project.py measure [--dir DIR] [--shape llama3.2-1b] [--cases l1,l2,...]
    python bench/project.py predict [--dir DIR] [--json]

measure: runs `mpillama bench --synthetic SHAPE --trace DIR/CASE.h5` for every case (skipping traces
already there), loopback cases under mpirun, cluster cases on the emulated cluster (tests/cluster;
root only), and writes the load average before and after each run to DIR/CASE.json.
predict: calibrates on the 1- and 2-rank loopback traces and predicts every other case from what a
user would know of it (its rank count, sync, rank weights, and for the cluster the link's latency: half
its own ping-pong round trip), then prints measured and predicted tok/s with the error. tok/s are the
traces' own (tokens / rank 0's step time), as `trace report` shows them. A second protocol for the
cluster calibrates on the 2-host trace at D = 0.1 ms and predicts the others from it (--delay: its own
one-way latency moved by the difference in D).

The machine has 2 cores: more than 2 ranks, on loopback or on the cluster, oversubscribe it; the
table says which cases do, and how loaded the machine was while each trace was recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from mpillama.trace.analysis import analyze, load_trace  # noqa: E402
from mpillama.trace.project import Target, calibrate, project, projected_trace  # noqa: E402
from mpillama.trace.report import report_tables  # noqa: E402

CORES = os.cpu_count() or 2
# name -> (ranks, flags, environment, cluster one-way delay in ms or None for loopback)
CASES: dict[str, tuple[int, list[str], dict[str, str], float | None]] = {
    "l1": (1, [], {}, None),
    "l2": (2, ["--sync", "allreduce"], {}, None),
    "l2again": (2, ["--sync", "allreduce"], {}, None),  # l2 measured again: how much runs differ here
    "l2star": (2, ["--sync", "star"], {}, None),
    "l3": (3, ["--sync", "allreduce"], {}, None),
    "l4": (4, ["--sync", "allreduce"], {}, None),
    "l2w13": (2, ["--sync", "allreduce", "--rank-weights", "1,3"], {}, None),
    "l2throttle": (2, ["--sync", "allreduce", "--rank-weights", "auto"], {"MPILLAMA_TEST_THROTTLE": "1:3"}, None),
    "l2slow": (2, ["--sync", "allreduce"], {"MPILLAMA_TEST_SLOW": "1:0.01"}, None),
    "c2d0.1": (2, ["--sync", "allreduce"], {}, 0.1),
    "c2d0.5": (2, ["--sync", "allreduce"], {}, 0.5),
    "c2d0.5star": (2, ["--sync", "star"], {}, 0.5),
    "c4d0.1": (4, ["--sync", "allreduce"], {}, 0.1),
    "c4d0.5": (4, ["--sync", "allreduce"], {}, 0.5),
}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def measure(args: argparse.Namespace) -> int:
    from tests.mpi_launch import run_mpillama

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    names = args.cases.split(",") if args.cases else list(CASES)
    cluster = None
    try:
        for name in names:
            ranks, flags, env, delay = CASES[name]
            trace = out / f"{name}.h5"
            if trace.exists():
                continue
            bench = ["bench", "--synthetic", args.shape, "--json", "--trace", str(trace),
                     "--prompt-tokens", str(args.prompt_tokens), "--steps", str(args.steps), *flags]
            before = loadavg()
            if delay is None:
                done = run_mpillama(ranks, *bench, timeout=7200, **env)
            else:
                from tests.cluster import Cluster, unavailable

                reason = unavailable()
                if reason:
                    print(f"{name}: no cluster here ({reason})", flush=True)
                    continue
                cluster = cluster or Cluster(4)
                cluster.set_links(delay)
                done = cluster.run_mpillama(ranks, *bench, timeout=7200, **env)
            after = loadavg()
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            (out / f"{name}.json").write_text(json.dumps({"load_before": before, "load_after": after,
                                                          "bench": result}))
            print(f"{name}: decode {result['gen_tok_s']} tok/s, load {before[0]:.1f} -> {after[0]:.1f}", flush=True)
    finally:
        if cluster is not None:
            cluster.close()
    return 0


def figures(tab: dict) -> dict:
    """tok/s, the straggler, and the link's share of a decode token: rank 0's transfer ms per token."""
    dec = tab["phases"]["decode"]
    return {"prefill": tab["phases"]["prefill"]["tok_s"], "decode": dec["tok_s"], "straggler": tab["straggler"]["rank"],
            "sync": tab["run"]["sync"], "transfer": dec["ranks"][0]["transfer_ms"]}


def measured(path: Path) -> dict:
    return figures(report_tables(analyze(load_trace(path))))


def one_way_ms(path: Path) -> float:
    t = load_trace(path)
    return float(np.median(t.ranks["clock_rtt"][1:])) / 2 * 1e3


def uneven(path: Path) -> tuple[float, ...] | None:
    shares = load_trace(path).ranks["weight_share"]
    return None if np.allclose(shares, shares[0]) else tuple(float(s) for s in shares)


def predict_row(name: str, what: str, cal, target: Target, truth: Path) -> dict:
    got = figures(report_tables(analyze(projected_trace(cal, project(cal, target)))))
    m = measured(truth)
    info_path = truth.with_suffix(".json")
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    ranks = target.n_ranks
    return {
        "case": name, "what": what, "ranks": ranks, "sync": target.sync, "oversubscribed": ranks > CORES,
        "load": info.get("load_before", [None])[0], "load_after": info.get("load_after", [None])[0],
        "decode_measured": m["decode"], "decode_predicted": got["decode"],
        "prefill_measured": m["prefill"], "prefill_predicted": got["prefill"],
        "transfer_measured": m["transfer"], "transfer_predicted": got["transfer"],
        "straggler_measured": m["straggler"], "straggler_predicted": got["straggler"],
    }


def predict(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    have = {name: d / f"{name}.h5" for name in CASES if (d / f"{name}.h5").exists()}
    rows = []
    if "l2" in have and "l1" in have:
        cal = calibrate(have["l2"], [have["l1"]])
        alone = calibrate(have["l2"])
        for name, path in have.items():
            ranks, _, _, delay = CASES[name]
            m = measured(path)
            if name in ("l1", "l2"):
                what = "calibration (the trace itself)" if name == "l2" else "calibration: 2 -> 1 rank"
                rows.append(predict_row(name, what, cal, Target(ranks, m["sync"]), path))
                continue
            if name == "l2slow":
                # the other way round: the slowed run, its slowdown removed, against the plain 2-rank run
                slow = calibrate(path, [have["l1"]])
                rows.append(predict_row("l2slow->l2", "rank 1 slowed (TEST_SLOW); --speed 1=1 predicts l2",
                                        slow, Target(2, measured(have["l2"])["sync"], speed={1: 1.0}), have["l2"]))
                continue
            target = Target(ranks, m["sync"], uneven(path), delay_ms=one_way_ms(path) if delay is not None else None)
            what = "loopback" if delay is None else f"cluster D={delay:g} ms, --delay = its ping-pong / 2"
            if uneven(path):
                what += ", shares " + ",".join(f"{s:.2f}" for s in uneven(path))
            rows.append(predict_row(name, f"from l2: {what}", cal, target, path))
            if delay is None:  # the same from l2 alone: compute then follows the weights (no fixed term)
                rows.append(predict_row(name + "'", "the same, calibrated on l2 alone", alone, target, path))
        if "c2d0.1" in have:
            base = calibrate(have["c2d0.1"], [have["l1"]])
            shift = one_way_ms(have["c2d0.1"]) - 0.1  # the switch and TCP: one-way latency beyond D
            for name in ("c2d0.5", "c2d0.5star", "c4d0.1", "c4d0.5"):
                if name not in have:
                    continue
                ranks, _, _, delay = CASES[name]
                target = Target(ranks, measured(have[name])["sync"], delay_ms=delay + shift)
                rows.append(predict_row(name, f"from c2d0.1: --delay {delay + shift:.3f}", base, target, have[name]))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'case':<12} {'ranks':>5} {'sync':>9} {'load':>9} {'decode tok/s meas':>17} {'pred':>7} {'err':>6} "
          f"{'prefill meas':>12} {'pred':>7} {'err':>6} {'xfer ms meas':>12} {'pred':>6} {'straggler m/p':>13}  what")
    def err(r: dict, key: str) -> str:
        a, b = r[f"{key}_measured"], r[f"{key}_predicted"]
        return "-" if not a or b is None else f"{100 * (b - a) / a:+.0f}%"

    for r in rows:

        load = "-" if r["load"] is None else f"{r['load']:.1f}-{r['load_after']:.1f}"
        over = "*" if r["oversubscribed"] else " "
        print(f"{r['case']:<12} {r['ranks']:>4}{over} {r['sync']:>9} {load:>9} {r['decode_measured']:>17.2f} "
              f"{r['decode_predicted']:>7.2f} {err(r, 'decode'):>6} {r['prefill_measured']:>12.2f} "
              f"{r['prefill_predicted']:>7.2f} {err(r, 'prefill'):>6} {r['transfer_measured']:>12.1f} "
              f"{r['transfer_predicted']:>6.1f} "
              f"{r['straggler_measured']!s:>6}/{r['straggler_predicted']!s:<6}  {r['what']}")
    print(f"* more ranks than this machine's {CORES} cores; load: the 1-minute load average before-after the run; "
          "xfer: rank 0's decode transfer (time in collectives after the last arrival) per token")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["measure", "predict"])
    p.add_argument("--dir", default="/tmp/mpillama-project")
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--cases", help="comma list (default: all)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    return measure(args) if args.command == "measure" else predict(args)


if __name__ == "__main__":
    raise SystemExit(main())
