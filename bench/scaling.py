"""2 ranks against 1 on the same model, measured in one run.

    python bench/scaling.py [--shape llama3.2-1b] [--ranks 1,2] [--sync star] [--steps 32] [--prompt-tokens 64]

Runs `python -m mpillama bench --synthetic SHAPE --json` under mpirun for each rank count (one
thread per rank, no binding), then prints prompt-eval and generation tok/s, rank 0's sync ms
per token, and each count's ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mpi_launch import run_mpillama  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--sync", default="star")
    p.add_argument("--buffer-float-type", default="q80")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rows = []
    for n in (int(x) for x in args.ranks.split(",")):
        done = run_mpillama(n, "bench", "--synthetic", args.shape, "--json", "--sync", args.sync,
                            "--buffer-float-type", args.buffer_float_type, "--steps", str(args.steps),
                            "--prompt-tokens", str(args.prompt_tokens), "--repeat", str(args.repeat), timeout=1800)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{args.shape}, sync {args.sync}, buffers {args.buffer_float_type}, 1 thread per rank")
    print(f"{'ranks':>5} {'prompt tok/s':>13} {'ratio':>6} {'gen tok/s':>10} {'ratio':>6} {'token ms':>9} {'rank0 sync ms':>14}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['prompt_tok_s']:>13.1f} {r['prompt_tok_s'] / base['prompt_tok_s']:>6.2f} "
              f"{r['gen_tok_s']:>10.2f} {r['gen_tok_s'] / base['gen_tok_s']:>6.2f} {r['token_ms']:>9.2f} "
              f"{r['rank0_sync_ms']:>14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
