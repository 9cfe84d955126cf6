"""Sampler: greedy, determinism, and draws that follow softmax / top-k / top-p.

References are written out here: softmax in float64, the nucleus by a full sort. Distribution
checks use a fixed seed and a chi-square bound at p = 0.001, so they are deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpillama.errors import MpillamaError
from mpillama.sampler import TOP_P_WINDOW, Sampler, _top_p

# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def nucleus(p: np.ndarray, top_p: float) -> set[int]:
    """The reference top-p set: most likely first (lower id on ties) until the mass reaches top_p."""
    order = sorted(range(p.size), key=lambda i: (-p[i], i))
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    return set(kept)


def draws(sampler: Sampler, logits: np.ndarray, n: int) -> np.ndarray:
    return np.array([sampler.sample(logits) for _ in range(n)])


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax_lowest_id_on_ties() -> None:
    s = Sampler()
    assert s.sample(np.array([0.1, 3.0, -2.0, 3.0], np.float32)) == 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert s.sample(logits) == int(np.argmax(logits))


def test_bad_settings_and_logits_are_refused() -> None:
    for kwargs in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"temperature": float("nan")}):
        with pytest.raises(MpillamaError):
            Sampler(**kwargs)
    for temperature in (0.0, 1.0):
        with pytest.raises(MpillamaError, match="not finite"):
            Sampler(temperature=temperature).sample(np.array([0.0, np.nan, 1.0], np.float32))
    with pytest.raises(MpillamaError, match="one row"):
        Sampler().sample(np.zeros((2, 3), np.float32))


def test_same_seed_same_tokens() -> None:
    logits = np.random.default_rng(1).standard_normal(32000).astype(np.float32)
    for kwargs in ({"temperature": 0.9}, {"temperature": 0.7, "top_k": 50}, {"temperature": 1.1, "top_p": 0.8}):
        a = draws(Sampler(seed=42, **kwargs), logits, 40)
        b = draws(Sampler(seed=42, **kwargs), logits, 40)
        c = draws(Sampler(seed=43, **kwargs), logits, 40)
        assert (a == b).all()
        assert (a != c).any()


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        logits = rng.standard_normal(5000).astype(np.float32)
        logits[rng.integers(0, 5000, 3)] = logits.max()  # ties at the top: the lowest id wins
        greedy = Sampler().sample(logits)
        assert greedy == int(np.flatnonzero(logits == logits.max())[0])
        assert Sampler(temperature=1.0, top_k=1, seed=3).sample(logits) == greedy
        assert Sampler(temperature=1.0, top_p=1e-9, seed=3).sample(logits) == greedy


def test_draws_follow_softmax() -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 1.5], np.float32)
    for temperature in (0.7, 1.0, 1.6):
        counts = np.bincount(draws(Sampler(temperature=temperature, top_p=1.0, seed=7), logits, 20000), minlength=6)
        assert chi2(counts, softmax(logits / temperature)) < CHI2_999[5]


def test_draws_follow_top_k() -> None:
    logits = np.array([0.3, 2.0, -1.0, 1.2, 1.9, 0.0], np.float32)
    counts = np.bincount(draws(Sampler(temperature=1.0, top_k=3, top_p=1.0, seed=8), logits, 20000), minlength=6)
    kept = [1, 3, 4]
    assert counts[[0, 2, 5]].sum() == 0
    assert chi2(counts[kept], softmax(logits[kept])) < CHI2_999[2]


def test_draws_follow_top_p() -> None:
    probs = np.array([0.05, 0.4, 0.15, 0.3, 0.1])
    logits = np.log(probs).astype(np.float32)
    counts = np.bincount(draws(Sampler(temperature=1.0, top_p=0.75, seed=9), logits, 20000), minlength=5)
    kept = sorted(nucleus(softmax(logits), 0.75))
    assert kept == [1, 2, 3]  # 0.4 + 0.3 = 0.7 falls short, 0.85 reaches it
    assert counts[[0, 4]].sum() == 0
    assert chi2(counts[kept], probs[kept] / probs[kept].sum()) < CHI2_999[2]


def test_top_k_then_top_p_renormalises() -> None:
    # top-k keeps [1, 3, 4] (p = .4, .3, .15 of the whole); renormalised .47/.35/.18, so top_p = .8 keeps [1, 3]
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = np.log(probs).astype(np.float32)
    counts = np.bincount(draws(Sampler(temperature=1.0, top_k=3, top_p=0.8, seed=10), logits, 10000), minlength=5)
    assert set(np.flatnonzero(counts)) == {1, 3}
    assert chi2(counts[[1, 3]], np.array([0.4, 0.3]) / 0.7) < CHI2_999[1]


def test_draws_across_blocks_of_a_large_vocabulary() -> None:
    # the draw scans blocks; mass spread over block edges and -inf (zero-probability) logits elsewhere
    logits = np.full(5000, -np.inf, np.float32)
    ids = np.array([5, 1023, 1024, 2047, 2048, 3500, 4998, 4999])
    logits[ids] = np.array([0.5, 1.0, 0.0, 1.5, 0.2, 0.8, 1.2, 0.3], np.float32)
    counts = np.bincount(draws(Sampler(temperature=1.0, top_p=1.0, seed=11), logits, 20000), minlength=logits.size)
    assert counts.sum() == counts[ids].sum()
    assert chi2(counts[ids], softmax(logits[ids])) < CHI2_999[7]


@pytest.mark.parametrize("scale,top_p", [(6.0, 0.9), (1.0, 0.9), (1.0, 0.3), (3.0, 0.999)])
def test_nucleus_matches_a_full_sort(scale: float, top_p: float) -> None:
    # peaked logits cut inside the first window; flat ones need the whole sort
    logits = (np.random.default_rng(12).standard_normal(20000) * scale).astype(np.float32)
    logits[[17, 900, 15000]] = logits.max()  # ties
    p = softmax(logits)
    ids, weights = _top_p(None, p, top_p)
    assert set(ids.tolist()) == nucleus(p, top_p)
    assert (np.diff(ids) > 0).all() and np.allclose(weights, p[ids])
    if scale == 1.0 and top_p == 0.9:
        assert ids.size > TOP_P_WINDOW  # this case did take the full-sort path


def test_default_top_p_is_run_configs() -> None:
    """One home for defaults: a Sampler built without top_p samples like the command line's default."""
    from mpillama.config import DEFAULTS

    assert Sampler().top_p == DEFAULTS.top_p
