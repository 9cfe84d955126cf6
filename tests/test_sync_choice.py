"""--sync auto's decision from given start-up timings (comm.pick_sync): pure, no MPI. The measuring
(time_wires, the rank speed) runs under mpirun in tests/mpi and on the emulated cluster."""

from __future__ import annotations

import pytest

from mpillama.comm import REPLICATED_MARGIN, STAR_MARGIN, pick_sync

US = 1e-6


def test_without_a_replication_cost_only_star_and_allreduce_compete() -> None:
    assert pick_sync({"star": 50 * US, "allreduce": 100 * US}, None)[0] == "star"
    assert pick_sync({"star": 95 * US, "allreduce": 100 * US}, None)[0] == "allreduce"  # within STAR_MARGIN
    kind, why = pick_sync({"star": 600 * US, "allreduce": 300 * US}, None)
    assert kind == "allreduce"
    assert why == "auto: one block's sync measured 300 us with allreduce, 600 us with star"


@pytest.mark.parametrize("extra_us, kind", [(100, "replicated"), (149, "replicated"), (151, "allreduce"),
                                            (1000, "allreduce")])
def test_replicated_only_when_the_saved_sync_clearly_exceeds_the_extra_compute(extra_us: float, kind: str) -> None:
    # allreduce pays 2 x 300 us per layer, replicated 300 us + the extra compute: it saves 300 us
    wire = {"star": 600 * US, "allreduce": 300 * US}
    assert REPLICATED_MARGIN == 0.5  # so replicated needs extra compute under 150 us
    got, why = pick_sync(wire, extra_us * US)
    assert got == kind
    assert why.startswith("auto: one block's sync measured 300 us with allreduce, 600 us with star")
    assert why.endswith(f"replicated attention would save 300 us of wire and cost {extra_us} us of compute per layer")


def test_replicated_is_weighed_against_star_when_star_is_faster() -> None:
    # star 2 x 100 us per layer against replicated 300 + extra: replication saves nothing here
    wire = {"star": 100 * US, "allreduce": 300 * US}
    assert wire["star"] < STAR_MARGIN * wire["allreduce"]
    assert pick_sync(wire, 0.0)[0] == "star"
    assert "would save -100 us of wire" in pick_sync(wire, 0.0)[1]
    # star 2 x 250 against 300 + extra: saves 200 us, so up to 100 us of extra compute pays
    wire = {"star": 250 * US, "allreduce": 300 * US}
    assert pick_sync(wire, 90 * US)[0] == "replicated"
    assert pick_sync(wire, 110 * US)[0] == "star"
