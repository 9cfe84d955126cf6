"""Fault injection for the tests, from the environment. Nothing here runs
unless one of these variables is set:

MPILLAMA_TEST_FAIL_LOAD=RANK      rank RANK fails while loading (a bad-input error on one rank).
MPILLAMA_TEST_SLOW=RANK:SECONDS   rank RANK sleeps SECONDS in every attention block (a straggler).
MPILLAMA_TEST_DIE=RANK:PASS       rank RANK kills itself (SIGKILL) at its forward pass number PASS.
MPILLAMA_TEST_THROTTLE=RANK:F     rank RANK measures its kernel speed F times slower (--rank-weights auto).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from mpillama.errors import MpillamaError


def _spec(name: str, rank: int) -> str | None:
    """The value after 'RANK:' of variable name when it names this rank (or the whole value for FAIL_LOAD)."""
    value = os.environ.get(name)
    if not value:
        return None
    target, _, arg = value.partition(":")
    return arg if int(target) == rank else None


def fail_load(rank: int) -> None:
    if _spec("MPILLAMA_TEST_FAIL_LOAD", rank) is not None:
        raise MpillamaError(f"test hook MPILLAMA_TEST_FAIL_LOAD made rank {rank} fail while loading")


def throttle(rank: int) -> float:
    """How many times slower this rank claims its kernels run (1.0 unless a test says otherwise)."""
    factor = _spec("MPILLAMA_TEST_THROTTLE", rank)
    return float(factor) if factor else 1.0


def install(model: Any, rank: int) -> None:
    """Wrap the model's methods as MPILLAMA_TEST_SLOW and MPILLAMA_TEST_DIE say (once, after warm-up)."""
    slow = _spec("MPILLAMA_TEST_SLOW", rank)
    if slow:
        seconds = float(slow)
        attention = model.attention

        def slow_attention(*args: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return attention(*args, **kwargs)

        model.attention = slow_attention
    die = _spec("MPILLAMA_TEST_DIE", rank)
    if die:
        last_pass = int(die)
        forward = model.forward
        passes = [0]

        def dying_forward(*args: Any, **kwargs: Any) -> Any:
            passes[0] += 1
            if passes[0] >= last_pass:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(*args, **kwargs)

        model.forward = dying_forward
