"""The slice plan for 1 to 9 ranks, even and uneven, without MPI."""

from __future__ import annotations

import pytest

from mpillama.config import ModelConfig
from mpillama.errors import MpillamaError
from mpillama.partition import QK, is_group_aligned, kv_groups, plan, replication_bytes, slice_cost, split_units

LLAMA_1B = ModelConfig(arch="llama", dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                       vocab_size=128256, seq_len=131072, norm_eps=1e-5, rope_theta=500000.0, rope_style="pairs",
                       tied_embeddings=True)
TINY = ModelConfig(arch="llama", dim=128, hidden_dim=352, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                   vocab_size=1000, seq_len=512, norm_eps=1e-5, rope_theta=10000.0, rope_style="pairs")


def covers(ranges: list[tuple[int, int]], total: int) -> bool:
    return ranges[0][0] == 0 and ranges[-1][1] == total and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("n", range(1, 10))
@pytest.mark.parametrize("cfg", [LLAMA_1B, TINY], ids=["1b", "tiny"])
def test_every_unit_is_owned_exactly_once(cfg: ModelConfig, n: int) -> None:
    if n > cfg.n_heads:
        with pytest.raises(MpillamaError, match="attention heads"):
            plan(cfg, n)
        return
    slices = plan(cfg, n)
    assert covers([s.q_heads for s in slices], cfg.n_heads)
    assert covers([s.ffn_rows for s in slices], cfg.hidden_dim)
    assert covers([s.vocab_rows for s in slices], cfg.vocab_size)
    for s in slices:
        assert s.n_ffn_rows % QK == 0 and s.n_heads > 0
        # every query head's KV head is computed on its rank
        for h in range(*s.q_heads):
            assert s.kv_heads[0] <= h // cfg.group_size < s.kv_heads[1]
    if n <= cfg.n_kv_heads:  # whole KV groups: no KV head computed twice
        assert covers([s.kv_heads for s in slices], cfg.n_kv_heads)
        assert all(is_group_aligned(cfg, s) for s in slices)
    assert abs(sum(s.weight for s in slices) - 1) < 1e-9


def test_more_ranks_than_kv_heads_share_kv_heads() -> None:
    slices = plan(TINY, 3)  # 2 KV heads, 4 query heads
    assert [s.q_heads for s in slices] == [(0, 1), (1, 3), (3, 4)]
    assert [s.kv_heads for s in slices] == [(0, 1), (0, 2), (1, 2)]
    assert kv_groups(TINY, slices[1]) == [(0, 0, 1), (1, 1, 2)]
    assert not is_group_aligned(TINY, slices[1])


def test_uneven_weights_move_work_to_faster_ranks() -> None:
    slices = plan(LLAMA_1B, 4, (0.5, 1.0, 1.0, 1.0))
    assert slices[0].n_ffn_rows < slices[1].n_ffn_rows
    assert slices[0].n_vocab_rows < slices[1].n_vocab_rows
    assert slices[0].n_heads <= slices[1].n_heads
    # rank 0's share of FFN rows is close to 0.5 / 3.5 of the total
    assert abs(slices[0].n_ffn_rows / LLAMA_1B.hidden_dim - 0.5 / 3.5) < 0.01


def test_split_units_rounds_cumulatively() -> None:
    import numpy as np

    assert split_units(10, np.ones(3)) == [(0, 3), (3, 7), (7, 10)]
    assert split_units(11, np.array([1.0, 0.1])) == [(0, 10), (10, 11)]
    assert split_units(4, np.array([0.4, 1.0, 1.0, 1.0])) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_units(3, np.array([1.0, 100.0, 1.0])) == [(0, 1), (1, 2), (2, 3)]


def test_bad_rank_weights_are_errors() -> None:
    with pytest.raises(MpillamaError, match="one weight per rank"):
        plan(TINY, 2, (1.0, 1.0, 1.0))
    with pytest.raises(MpillamaError, match="positive"):
        plan(TINY, 2, (1.0, -1.0))
    # a tiny weight still gets one unit of everything: no rank holds an empty slice
    small = plan(TINY, 2, (1.0, 0.01))[1]
    assert small.n_heads == TINY.group_size and small.n_ffn_rows == QK and small.n_vocab_rows == 10


def test_slice_cost_adds_up_to_the_whole_model() -> None:
    total = sum(slice_cost(LLAMA_1B, s, 4096).weight_bytes for s in plan(LLAMA_1B, 3))
    whole = slice_cost(LLAMA_1B, plan(LLAMA_1B, 1)[0], 4096).weight_bytes
    assert total >= whole  # KV heads may be computed twice, nothing is lost
    assert total == whole  # 3 ranks <= 8 KV heads: nothing is duplicated either


@pytest.mark.parametrize("n", range(1, 6))
@pytest.mark.parametrize("weights", [None, (0.4, 1.0, 2.0, 1.0, 0.7)], ids=["even", "uneven"])
@pytest.mark.parametrize("cfg", [LLAMA_1B, TINY], ids=["1b", "tiny"])
def test_replicated_attention_gives_every_rank_every_head(cfg: ModelConfig, n: int,
                                                          weights: tuple[float, ...] | None) -> None:
    """--sync replicated: all q and KV heads on every rank; the FFN and vocabulary split as without it."""
    if n > cfg.n_heads:
        return
    w = None if weights is None else weights[:n]
    split, rep = plan(cfg, n, w), plan(cfg, n, w, replicate_attention=True)
    for s, r in zip(split, rep):
        assert (r.q_heads, r.kv_heads) == ((0, cfg.n_heads), (0, cfg.n_kv_heads))
        assert (r.rank, r.n_ranks, r.weight, r.ffn_rows, r.vocab_rows) == (
            s.rank, s.n_ranks, s.weight, s.ffn_rows, s.vocab_rows)
        assert is_group_aligned(cfg, r) and kv_groups(cfg, r) == [(k, k * cfg.group_size, (k + 1) * cfg.group_size)
                                                                  for k in range(cfg.n_kv_heads)]


def test_replication_costs_the_attention_the_other_ranks_hold() -> None:
    # Llama-3.2-1B attention per layer in Q4_0 (18 bytes per 32 weights): wq and wo 2048 x 2048, wk and wv 512 x 2048
    whole = (2 * 2048 * 2048 + 2 * 512 * 2048) * 18 // 32
    assert whole == 5898240
    split = plan(LLAMA_1B, 2)
    assert [replication_bytes(LLAMA_1B, s) for s in split] == [whole // 2, whole // 2]
    assert replication_bytes(LLAMA_1B, plan(LLAMA_1B, 1)[0]) == 0
    assert replication_bytes(LLAMA_1B, split[0], "f32") == whole // 2 * 32 * 4 // 18
    for n in (2, 3, 4):  # inspect's extra memory: that, per layer, and the whole KV cache
        for s, r in zip(plan(LLAMA_1B, n), plan(LLAMA_1B, n, replicate_attention=True)):
            a, b = slice_cost(LLAMA_1B, s, 4096), slice_cost(LLAMA_1B, r, 4096)
            assert b.weight_bytes - a.weight_bytes == LLAMA_1B.n_layers * replication_bytes(LLAMA_1B, s)
            assert b.kv_cache_bytes == 2 * 16 * 4096 * 512 * 4
