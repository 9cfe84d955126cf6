"""N ranks give the tokens of one rank: run under mpirun with 1, 2, 3 and 4 ranks (pytest-mpi).

tests/test_mpi_runs.py writes the one-rank expectations, then launches this file.
Tokens must be identical (the test models' logits are decisive by construction). Logits:
with f32 weights and f32 sync buffers the partial sums differ from one rank's only by float
rounding (EXACT_TOLERANCE); as soon as anything is rounded to Q8_0 (Q80 buffers, or the Q8_0
activations that Q40 weights multiply), a float-rounding difference in a sum can move a value
across a rounding boundary, and logits stay within Q8_TOLERANCE of one rank's. Both are
fractions of the largest logit. A mixture of experts adds a discrete choice: where a token's k-th and
(k+1)-th router logits nearly tie (gaps of 0.002 occur in the test model, Q8_0 rounding of the
router's input moves its logits by about that), Q80 buffers can pick the other expert, and that
token's FFN output, and through its K/V every later logit, moves by up to ~10% of the largest
(measured 0.103): MOE_Q8_TOLERANCE. Tokens stay identical.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from mpi4py import MPI

from mpillama.comm import Comm, choose_sync
from tests.mpi.common import CASES, PROMPT_IDS, expected, run_engine

EXACT_TOLERANCE = 1e-4
Q8_TOLERANCE = 0.03
MOE_Q8_TOLERANCE = 0.2

WORLD = MPI.COMM_WORLD


def check(case: str, tokens: list[int] | None, logits: np.ndarray | None, buffer: str) -> None:
    if WORLD.Get_rank() != 0:
        return
    want_tokens, want_logits = expected(case)
    assert tokens == want_tokens
    if logits is not None:
        scale = np.abs(want_logits).max()
        exact = buffer == "f32" and CASES[case][1] == "f32"
        tol = EXACT_TOLERANCE if exact else MOE_Q8_TOLERANCE if "moe" in case and buffer == "q80" else Q8_TOLERANCE
        assert np.abs(logits - want_logits).max() <= tol * scale


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("buffer", ["f32", "q80"])
@pytest.mark.parametrize("sync", ["star", "allreduce"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_tokens_as_one_rank(case: str, sync: str, buffer: str) -> None:
    tokens, logits = run_engine(WORLD, case, sync=sync, buffer_float_type=buffer)
    check(case, tokens, logits, buffer)


def state_digest(engine: object) -> str:
    """The residual stream and the KV cache of a rank, bit for bit."""
    m = engine.model  # type: ignore[attr-defined]
    h = hashlib.sha256()
    for a in (m.x, m.k_cache, m.v_cache):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("buffer", ["f32", "q80"])
@pytest.mark.parametrize("case", ["tiny-q40", "qwen3-tiny-q40", "qwen3-moe-tiny-q40", "tiny-f32"])
def test_replicated_attention_same_tokens_and_the_same_state_everywhere(case: str, buffer: str) -> None:
    """--sync replicated: every rank holds every head and computes the whole attention from its own x; the
    residual stream and the whole KV cache must be the same bits on every rank (else the ranks drift)."""
    seen: list[tuple[bool, str]] = []
    tokens, logits = run_engine(WORLD, case, sync="replicated", buffer_float_type=buffer,
                                on_done=lambda e: seen.append((e.model.slc.n_heads == e.cfg.n_heads, state_digest(e))))
    check(case, tokens, logits, buffer)
    everywhere = WORLD.allgather(seen[0])
    assert everywhere[0][0] and len(set(everywhere)) == 1, everywhere


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("sync", ["star", "allreduce", "replicated"])
def test_greedy_without_full_logits(sync: str) -> None:
    """Greedy decoding gathers only each rank's best (value, index), not the whole row."""
    tokens, _ = run_engine(WORLD, "tiny-q40", dump=False, sync=sync, buffer_float_type="f32")
    check("tiny-q40", tokens, None, "f32")


@pytest.mark.mpi(min_size=2)
def test_uneven_rank_weights() -> None:
    weights = tuple([0.4] + [1.0] * (WORLD.Get_size() - 1))
    tokens, logits = run_engine(WORLD, "tiny-q40", rank_weights=weights, buffer_float_type="f32")
    check("tiny-q40", tokens, logits, "f32")


@pytest.mark.mpi(min_size=2)
def test_scatter_weights_and_small_chunks() -> None:
    tokens, logits = run_engine(WORLD, "qwen3-tiny-q40", weight_source="scatter", chunk_bytes=4096, buffer_float_type="f32")
    check("qwen3-tiny-q40", tokens, logits, "f32")


@pytest.mark.mpi(min_size=2)
def test_scatter_q80_weights() -> None:
    """Rank 0 sends Q8_0 slices as stored: each receiving rank sizes them from the header."""
    tokens, logits = run_engine(WORLD, "tiny-q80", weight_source="scatter", chunk_bytes=4096, buffer_float_type="f32")
    check("tiny-q80", tokens, logits, "f32")


@pytest.mark.mpi(min_size=2)
def test_scatter_mixed_kquant_weights() -> None:
    """A Q4_K_M matrix stacks Q4_K and Q6_K tensors: rank 0 sends them one message a tensor, each as stored
    (or as Q8_0 where a rank's column slice cuts a 256-value block)."""
    tokens, logits = run_engine(WORLD, "tiny-256-q4_k_m", weight_source="scatter", chunk_bytes=4096,
                                buffer_float_type="f32")
    check("tiny-256-q4_k_m", tokens, logits, "f32")


@pytest.mark.mpi(min_size=2)
def test_auto_sync_is_measured_and_agreed() -> None:
    """--sync auto times both wires on this link; every rank must take the same choice."""
    comm = Comm(WORLD, timeout=120.0, chunk_bytes=1 << 20)
    kind, why = choose_sync(comm, "auto", 2048 // 32 * 34)
    kinds = WORLD.allgather(kind)
    assert kind in ("star", "allreduce") and len(set(kinds)) == 1, kinds
    assert why.startswith("auto: one block's sync measured") and " us with star" in why
    assert choose_sync(comm, "star", 64) == ("star", "--sync star")
    assert choose_sync(comm, "replicated", 64) == ("replicated", "--sync replicated")
    # replicated attention weighed with the slowest rank's extra compute: 10 s per layer on one rank never pays
    extra = 0.0 if comm.rank == 0 else 10.0
    kind, why = choose_sync(comm, "auto", 2048 // 32 * 34, extra)
    assert kind in ("star", "allreduce") and len(set(WORLD.allgather(kind))) == 1
    assert why.endswith("and cost 10000000 us of compute per layer"), why


@pytest.mark.mpi(min_size=2)
def test_prefill_overlap_gives_the_same_bits() -> None:
    """A prefill block's output sent in chunks while the next computes is the same sum of the same bytes."""
    prompt = PROMPT_IDS * 3  # 27 tokens: chunks of at least OVERLAP_MIN_TOKENS
    plain_tokens, plain_logits = run_engine(WORLD, "tiny-q40", prompt=prompt, sync="allreduce", prefill_chunks=1)
    tokens, logits = run_engine(WORLD, "tiny-q40", prompt=prompt, sync="allreduce", prefill_chunks=3)
    if WORLD.Get_rank() == 0:
        assert tokens == plain_tokens
        assert np.array_equal(logits, plain_logits)
