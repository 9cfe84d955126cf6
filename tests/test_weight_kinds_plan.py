"""The slice plan and `inspect` follow the weight kinds kept in memory (kernels/weights.py): FFN units
on w2's block size, bytes per kind, and the Q8_0 model's groups as `inspect` shows them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mpillama.describe import describe
from mpillama.errors import MpillamaError
from mpillama.formats import open_model
from mpillama.partition import F32, Q40, Kept, matrix_bytes, plan, slice_cost
from mpillama.weight_source import ffn_unit, kept_kinds
from tests.test_partition import LLAMA_1B, TINY

Q80 = Kept("q80", 32, 34)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("unit", [32, 256])
def test_ffn_rows_fall_on_the_unit(n: int, unit: int) -> None:
    slices = plan(LLAMA_1B, n, None, unit)
    bounds = [s.ffn_rows for s in slices]
    assert bounds[0][0] == 0 and bounds[-1][1] == LLAMA_1B.hidden_dim
    assert all(a % unit == 0 and b % unit == 0 and a < b for a, b in bounds)
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(n - 1))


def test_a_hidden_size_off_the_unit_leaves_the_remainder_to_the_last_rank() -> None:
    cfg = dataclasses.replace(TINY, hidden_dim=608)  # 2 units of 256 and 96 rows
    assert [s.ffn_rows for s in plan(cfg, 2, None, 256)] == [(0, 256), (256, 608)]
    assert [s.ffn_rows for s in plan(cfg, 1, None, 256)] == [(0, 608)]
    with pytest.raises(MpillamaError, match=r"only 2 blocks of 256 rows \(the blocks of its weight type"):
        plan(cfg, 3, None, 256)


def test_matrix_bytes_per_kind() -> None:
    assert matrix_bytes(10, 64, "f32") == matrix_bytes(10, 64, F32) == 10 * 64 * 4
    assert matrix_bytes(10, 64, "q40") == matrix_bytes(10, 64, "auto") == matrix_bytes(10, 64, Q40) == 10 * 2 * 18
    assert matrix_bytes(10, 64, Q80) == 10 * 2 * 34
    s = plan(TINY, 1)[0]
    all_q80 = slice_cost(TINY, s, 16, "auto", {g: Q80 for g in ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down",
                                                                 "output", "token_embd")})
    q40 = slice_cost(TINY, s, 16, "q40")
    assert all_q80.weight_bytes * 18 == q40.weight_bytes * 34 and all_q80.kv_cache_bytes == q40.kv_cache_bytes


def test_kept_kinds_and_inspect_of_a_q80_model(models: dict[str, Path]) -> None:
    tensors = open_model(models["tiny-q80"]).tensors
    assert {k.kind for k in kept_kinds(tensors, "auto").values()} == {"q80"}
    assert {k.kind for k in kept_kinds(tensors, "q40").values()} == {"q40"}
    assert {k.kind for k in kept_kinds(tensors, "f32").values()} == {"f32"}
    assert ffn_unit(tensors, "auto") == 32
    text = describe(str(models["tiny-q80"]), 2, None, 64, "auto")
    assert "weights in memory with --weight-type auto" in text
    assert "ffn_down:      Q8_0 -> q80" in text and "token_embd:      Q8_0 -> q80" in text
    assert "units of" not in text  # 32-value blocks: the usual FFN split
    assert "Q8_0 -> q40" in describe(str(models["tiny-q80"]), 1, None, 64, "q40")
