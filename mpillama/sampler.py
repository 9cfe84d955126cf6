"""Choosing the next token from the logits: greedy, or temperature + top-k + top-p with a seeded generator.

Owns the sampling rule only (rank 0 calls it once per generated token, in the 'sample' trace
segment). Needs numpy and errors; imports nothing else from the package, never mpi4py.

Rule, in order: temperature 0 -> argmax (lowest id on ties). Otherwise p = softmax(logits / T);
keep the top_k most likely tokens (0 = all); of those, renormalised, keep the smallest most-likely
set whose probability reaches top_p (1 = all); draw from what is left, renormalised, with
np.random.Generator(seed): the same seed and logits give the same tokens.
Ties in probability are ordered by lower id, so top_k=1 and a tiny top_p both equal greedy.
Cost for 128k logits: no full sort unless top-p needs most of the vocabulary (flat logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mpillama.config import RunConfig, check_sampling
from mpillama.errors import MpillamaError

# How many of the most likely tokens top-p sorts first; only when their mass falls short of top_p
# does it sort everything, so a peaked distribution never pays for that.
TOP_P_WINDOW = 256
# The draw sums blocks of this many probabilities, then scans one block: a cumulative sum over
# the whole vocabulary is a sequential loop (~1 ms for 128k), block sums are vectorised.
DRAW_BLOCK = 1024


@dataclass
class Sampler:
    temperature: float = 0.0
    top_p: float = RunConfig.top_p
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: fresh entropy each run
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k)
        self._rng = np.random.default_rng(self.seed)

    def sample(self, logits: np.ndarray) -> int:
        """logits (vocab,) f32 -> the chosen token id."""
        if logits.ndim != 1 or logits.size == 0:
            raise MpillamaError(f"the sampler needs one row of logits, got shape {logits.shape}")
        best = int(np.argmax(logits))  # with a NaN anywhere this is the first NaN
        if not np.isfinite(logits[best]):
            raise MpillamaError(f"logits are not finite (token {best} has {logits[best]}): the forward pass "
                                "produced NaN/inf; check the model file and --buffer-float-type")
        if self.temperature == 0:
            return best
        ids, weights = _top_k(logits, self.top_k, self.temperature)
        if self.top_p < 1:
            ids, weights = _top_p(ids, weights, self.top_p)
        pick = _draw(weights, self._rng.random())
        return int(ids[pick]) if ids is not None else pick


def _top_k(logits: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray | None, np.ndarray]:
    """Candidate ids (ascending; None = every id) and their weights exp((logit - max) / T), f64."""
    if 0 < k < logits.size:
        ids = np.argpartition(logits, logits.size - k)[logits.size - k:]
        # argpartition splits ties at the k-th value arbitrarily: keep the lowest tied ids
        kth = logits[ids].min()
        above = np.flatnonzero(logits > kth)
        tied = np.flatnonzero(logits == kth)[: k - above.size]
        ids = np.sort(np.concatenate([above, tied]))
        x = logits[ids].astype(np.float64)
    else:
        ids = None
        x = logits.astype(np.float64)
    x -= x.max()
    x *= 1.0 / temperature
    return ids, np.exp(x, out=x)


def _top_p(ids: np.ndarray | None, weights: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest most-likely set (ties: lower id first) holding top_p of the mass, in id order."""
    n = weights.size
    target = top_p * weights.sum()
    w = min(TOP_P_WINDOW, n)
    desc = np.sort(np.partition(weights, n - w)[n - w:] if w < n else weights)[::-1]
    cum = np.cumsum(desc)
    if cum[-1] < target and w < n:
        desc = np.sort(weights)[::-1]
        cum = np.cumsum(desc)
    n_keep = min(int(np.searchsorted(cum, target, side="left")) + 1, n)
    cut = desc[n_keep - 1]  # weight of the last token kept
    above = np.flatnonzero(weights > cut)
    tied = np.flatnonzero(weights == cut)[: n_keep - above.size]
    keep = np.sort(np.concatenate([above, tied]))
    return (keep if ids is None else ids[keep]), weights[keep]


def _draw(weights: np.ndarray, u: float) -> int:
    """Index i with probability weights[i] / sum(weights), for u uniform in [0, 1)."""
    starts = np.arange(0, weights.size, DRAW_BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(weights, starts))
    target = u * block_cdf[-1]
    b = min(int(np.searchsorted(block_cdf, target, side="right")), starts.size - 1)
    inner = np.cumsum(weights[starts[b]:starts[b] + DRAW_BLOCK])
    rest = target - (block_cdf[b - 1] if b else 0.0)
    i = min(int(np.searchsorted(inner, rest, side="right")), inner.size - 1)
    # rounding can land on a zero-weight tail; step back to the last token that can be drawn
    while weights[starts[b] + i] == 0 and i > 0:
        i -= 1
    return int(starts[b] + i)
