"""Running the engine inside a pytest-mpi test: every rank calls run_engine together."""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mpillama.comm import Comm, abort
from mpillama.config import RunConfig
from mpillama.loading import load_engine
from mpillama.sampler import Sampler

STEPS = 32
PROMPT_IDS = [128000, 791, 6864, 315, 9822, 374, 12366, 13, 578]  # fixed ids: no tokenizer needed
CASES = {  # name: (model file stem, weight type)
    "tiny-q40": ("tiny-q40", "q40"),
    "qwen3-tiny-q40": ("qwen3-tiny-q40", "q40"),
    "tiny-f32": ("tiny-f32", "f32"),
    "tiny-q80": ("tiny-q80", "auto"),  # Q8_0 weights kept as stored
    "tiny-256-q4_k_m": ("tiny-256-q4_k_m", "auto"),  # K-quants kept as stored, Q4_K and Q6_K in one matrix
    "qwen3-moe-tiny-q40": ("qwen3-moe-tiny-q40", "q40"),  # mixture of experts: every rank routes alike
    "qwen3-moe-tiny-f32": ("qwen3-moe-tiny-f32", "f32"),
}


def models_dir() -> Path:
    folder = os.environ.get("MPILLAMA_TEST_MODELS")
    assert folder, "MPILLAMA_TEST_MODELS is not set: run these tests through tests/test_mpi_runs.py"
    return Path(folder)


def run_engine(mpi_comm: Any, case: str, dump: bool = True, prompt: list[int] | None = None,
               on_done: Callable[[Any], None] | None = None,
               **fields: Any) -> tuple[list[int] | None, np.ndarray | None]:
    """Greedy tokens and logits rows on rank 0 (None elsewhere). on_done(engine) runs on every rank after
    the last forward pass, before the engine closes."""
    stem, weight_type = CASES[case]
    comm = Comm(mpi_comm, timeout=120.0, chunk_bytes=fields.pop("chunk_bytes", 256 * 1024))
    run = RunConfig(weight_type=weight_type, **fields)
    engine = load_engine(comm, str(models_dir() / f"{stem}.gguf"), None, run, verbose=False, need_tokenizer=False)
    if comm.rank != 0:
        engine.worker_loop()
        if on_done is not None:
            on_done(engine)
        engine.close()
        return None, None
    logits = np.zeros((STEPS, engine.cfg.vocab_size), dtype=np.float32) if dump else None
    try:
        gen = engine.generate(prompt or PROMPT_IDS, STEPS, Sampler(), dump_logits=logits, stop_on_eos=False)
    except BaseException:
        # the workers are waiting for rank 0's next command: end the job rather than hang the suite
        traceback.print_exc()
        abort(3)
    if on_done is not None:
        on_done(engine)
    engine.close()
    return gen.tokens, logits


def expectation_path(case: str) -> Path:
    return models_dir() / f"expect-{case}.npz"


def expected(case: str) -> tuple[list[int], np.ndarray]:
    data = np.load(expectation_path(case))
    return [int(t) for t in data["tokens"]], data["logits"]
