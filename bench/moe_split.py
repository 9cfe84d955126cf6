"""Two ways to split a mixture of experts over ranks, measured for Qwen3-30B-A3B's shape.

Usage: python bench/moe_split.py [--ranks 2] [--tokens 1,16,64] [--trials 20000] [--repeat 20]

rows     every rank holds its share of every expert's hidden rows (768 / ranks): each token runs its
         8 experts on every rank, each as two matmuls of rows/ranks (w1|w3 rows, w2 columns)
owned    each rank holds whole experts (128 / ranks): a token's experts run where they live, whole
Load balance of `owned` is a property of the routing alone: for T tokens each choosing 8 of 128
experts (uniform at random here: the best case, trained routers are less even), the busiest rank's
count of (token, expert) pairs over the mean. Matmul cost: time per expert of one token (the Q40
kernel, one thread, weights streaming from memory) for a whole expert against the per-rank part of
one, so the call overhead of twice as many smaller matmuls shows. Prints both and the per-token
estimate max-rank time / mean for each split.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mpillama import kernels
from mpillama.quant import quantize_q40

DIM, HIDDEN, N_EXPERTS, K = 2048, 768, 128, 8


def owned_imbalance(ranks: int, tokens: int, trials: int, rng: np.random.Generator) -> float:
    """Mean over trials of max-rank / mean-rank pair counts when rank r owns experts [r*E/ranks, ...)."""
    per_rank = N_EXPERTS // ranks
    ratios = []
    for _ in range(trials):
        chosen = np.argsort(rng.random((tokens, N_EXPERTS)), axis=1)[:, :K]  # (T, K) distinct experts
        load = np.bincount((chosen // per_rank).reshape(-1), minlength=ranks)
        ratios.append(load.max() / load.mean())
    return float(np.mean(ratios))


class Experts:
    """`copies` experts' w1|w3 (2*rows x DIM) and w2 (DIM x rows), more than the caches hold."""

    def __init__(self, rows: int, copies: int) -> None:
        rng = np.random.default_rng(rows)
        q40 = lambda r, c: kernels.pack_q40(quantize_q40(rng.standard_normal((r, c), dtype=np.float32)))
        self.w = [(q40(2 * rows, DIM), q40(DIM, rows)) for _ in range(copies)]
        self.acts, self.h_acts = kernels.new_activations(1, DIM), kernels.new_activations(1, rows)
        self.h13, self.h = np.zeros((1, 2 * rows), np.float32), np.zeros((1, rows), np.float32)
        self.out = np.zeros((1, DIM), np.float32)
        kernels.quantize_activations(self.acts, rng.standard_normal((1, DIM), dtype=np.float32))

    def seconds(self) -> float:
        """One token through each expert in turn, per expert."""
        t = time.perf_counter()
        for w13, w2 in self.w:
            kernels.matmul_q40(self.h13, w13, self.acts, 1)
            kernels.swiglu(self.h, self.h13)
            kernels.quantize_activations(self.h_acts, self.h)
            kernels.matmul_q40(self.out, w2, self.h_acts, 1)
        return (time.perf_counter() - t) / len(self.w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", default="1,16,64")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    kernels.configure(1)
    rng = np.random.default_rng(1)
    whole_set, part_set = Experts(HIDDEN, 64), Experts(HIDDEN // a.ranks, 64 * a.ranks)
    whole, part = float("inf"), float("inf")
    for _ in range(a.repeat + 1):  # alternating, so other processes' load hits both; the best of each
        whole, part = min(whole, whole_set.seconds()), min(part, part_set.seconds())
    print(f"one expert, one token, 1 thread: whole {whole * 1e6:.0f} us, 1/{a.ranks} of its rows {part * 1e6:.0f} us "
          f"(x{a.ranks}: {a.ranks * part * 1e6:.0f} us, overhead {a.ranks * part / whole - 1:+.0%})")
    for t in (int(x) for x in a.tokens.split(",")):
        imb = owned_imbalance(a.ranks, t, a.trials, rng)
        print(f"T={t:3d}: owned experts: busiest rank / mean = {imb:.3f}; rows split: 1.000 "
              f"(per-token time vs ideal: owned {imb:.3f}, rows {a.ranks * part / whole:.3f})")
    print(f"load average {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}")


if __name__ == "__main__":
    main()
