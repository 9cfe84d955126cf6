"""Qwen3 MoE (qwen3moe): the expert tensors in GGUF and Hugging Face folders, the slice plan of
experts, and the engine's logits against the independent numpy reference (tests/reference.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from mpillama.config import ModelConfig
from mpillama.errors import MpillamaError
from mpillama.formats import open_model
from mpillama.formats.hf import write_hf
from mpillama.formats.synth import SHAPES
from mpillama.partition import QK, plan, slice_cost
from tests import reference
from tests.mpi_launch import run_mpillama
from tests.test_engine import PROMPT, STEPS, generate, prompt_ids

MOE_30B = SHAPES["qwen3-30b-a3b"].config


@pytest.fixture(scope="module")
def hf_f32(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen3-moe-tiny as a sharded Hugging Face folder (per-expert tensors, f32)."""
    folder = tmp_path_factory.mktemp("moe") / "hf"
    return write_hf(open_model(models["qwen3-moe-tiny-f32"]), folder, "f32", max_shard_bytes=50_000_000)


def test_gguf_serves_each_expert_as_a_matrix(models: dict[str, Path]) -> None:
    path = models["qwen3-moe-tiny-q40"]
    m = open_model(path)
    c = m.config
    moe = (c.arch, c.n_experts, c.n_experts_used, c.expert_hidden_dim, c.norm_topk_prob)
    assert moe == ("qwen3moe", 8, 2, 160, True)
    assert c.qk_norm and c.rope_style == "halves" and c.is_moe and c.ffn_dim == 160
    stacked = {t.name.removesuffix(".weight"): t for t in gguf.GGUFReader(path).tensors}  # the gguf package's view
    for part, rows, cols in (("ffn_gate_exps", 160, 128), ("ffn_up_exps", 160, 128), ("ffn_down_exps", 128, 160)):
        t = stacked[f"blk.1.{part}"]
        assert tuple(reversed(t.shape.tolist())) == (8, rows, cols)
        whole = gguf.quants.dequantize(t.data, t.tensor_type).reshape(8, rows, cols)
        for e in (0, 5, 7):
            assert m.tensors[f"blk.1.{part}.{e}"].shape == (rows, cols)
            assert np.array_equal(m.read_f32(f"blk.1.{part}.{e}"), whole[e])
            assert np.array_equal(m.read_f32(f"blk.1.{part}.{e}", slice(32, 64), slice(0, 96)), whole[e, 32:64, :96])
    assert m.tensors["blk.0.ffn_gate_inp"].kind == "f32"  # the router stays f32 in a Q4_0 file, as llama.cpp's


def test_hf_folder_round_trip(models: dict[str, Path], hf_f32: Path) -> None:
    g = open_model(models["qwen3-moe-tiny-f32"])
    h = open_model(hf_f32)
    assert h.format == "hf" and h.config == g.config
    cfg = json.loads((hf_f32 / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["model_type"] == "qwen3_moe"
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (8, 2, 160)
    index = json.loads((hf_f32 / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index and "model.layers.0.mlp.gate.weight" in index
    for n in ("blk.0.ffn_gate_inp", "blk.1.ffn_down_exps.7", "blk.0.ffn_up_exps.3"):
        assert np.array_equal(h.read_f32(n), g.read_f32(n)), n


def test_hf_config_errors(hf_f32: Path, tmp_path: Path) -> None:
    cfg = json.loads((hf_f32 / "config.json").read_text())
    folder = tmp_path / "f"
    folder.mkdir()
    for f in hf_f32.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**cfg, "mlp_only_layers": [1]}))
    with pytest.raises(MpillamaError, match="every layer is a mixture of experts") as e:
        open_model(folder)
    assert "\n" not in str(e.value)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 9}))
    with pytest.raises(MpillamaError, match="9 experts used per token of 8") as e:
        open_model(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": 100}))
    with pytest.raises(MpillamaError, match="expert_hidden_dim=100, not a multiple of 32"):
        open_model(folder)


def test_the_router_chooses_different_experts(models: dict[str, Path]) -> None:
    """Routing matters in the test model: tokens use different experts, so a wrong top-k changes the logits."""
    m = reference.load(str(models["qwen3-moe-tiny-f32"]))
    ids = prompt_ids(models["qwen3-moe-tiny-f32"])
    x = m.w["token_embd"][np.array(ids)]
    y = reference.rmsnorm(x, m.w["blk.0.ffn_norm"], m.eps)
    chosen = {tuple(sorted(np.argsort(-(m.w["blk.0.ffn_gate_inp"] @ row))[:2])) for row in y}
    assert len(chosen) >= 3, chosen
    logits = reference.forward(m, ids)
    wrong = dataclasses.replace(m, w={**m.w, "blk.0.ffn_gate_inp": -m.w["blk.0.ffn_gate_inp"]})
    assert np.abs(reference.forward(wrong, ids) - logits).max() > 0.01 * np.abs(logits).max()


@pytest.mark.parametrize("form", ["gguf", "hf"])
def test_f32_logits_match_reference(form: str, models: dict[str, Path], hf_f32: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = models["qwen3-moe-tiny-f32"]
    model = path if form == "gguf" else hf_f32
    logits = generate(model, tmp_path, capsys, "--weight-type", "f32", "--tokenizer", str(path))
    ref_tokens, ref_logits = reference.greedy(reference.load(str(path)), prompt_ids(path), STEPS)
    scale = np.abs(ref_logits).max()
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * scale)
    assert list(np.argmax(logits, axis=1)) == ref_tokens


def test_q40_tokens_match_reference(models: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = models["qwen3-moe-tiny-q40"]
    logits = generate(path, tmp_path, capsys)
    ref_tokens, ref_logits = reference.greedy(reference.load(str(path)), prompt_ids(path), STEPS)
    assert list(np.argmax(logits, axis=1)) == ref_tokens
    assert np.abs(logits - ref_logits).max() < 0.03 * np.abs(ref_logits).max()


def test_prefill_grouped_by_expert_equals_token_by_token(models: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A batch groups its tokens by expert (one matmul per expert); one token at a time must agree."""
    path = models["qwen3-moe-tiny-f32"]
    batched = generate(path, tmp_path, capsys, "--weight-type", "f32")
    one_by_one = generate(path, tmp_path, capsys, "--weight-type", "f32", "--batch", "1")
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-5 * np.abs(batched).max())


def test_plan_splits_every_expert_in_blocks_of_32() -> None:
    for n in (1, 2, 3, 4, 8, 24):
        slices = plan(MOE_30B, n)
        rows = [s.ffn_rows for s in slices]
        assert rows[0][0] == 0 and rows[-1][1] == 768 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        assert all(s.n_ffn_rows % QK == 0 for s in slices)
        assert max(s.n_ffn_rows for s in slices) - min(s.n_ffn_rows for s in slices) <= QK
    with pytest.raises(MpillamaError, match="each expert has only 24 blocks of 32 rows"):
        plan(dataclasses.replace(MOE_30B, n_heads=64, n_kv_heads=4), 25)


def test_slice_cost_counts_every_expert() -> None:
    whole = slice_cost(MOE_30B, plan(MOE_30B, 1)[0], 4096).weight_bytes
    # Qwen3-30B-A3B in Q4_0: 48 layers of 128 experts of 3 x 768 x 2048, attention and the f32 router, and the head
    experts = 48 * 128 * 3 * 768 * 2048 // 32 * 18
    attention = 48 * (2 * 4096 * 2048 + 2 * 512 * 2048) // 32 * 18
    assert whole == experts + attention + 48 * 128 * 2048 * 4 + 151936 * 2048 // 32 * 18
    halves = [slice_cost(MOE_30B, s, 4096).weight_bytes for s in plan(MOE_30B, 2)]
    assert abs(halves[0] - halves[1]) < 0.01 * whole


def test_config_rejects_bad_expert_counts() -> None:
    base = SHAPES["qwen3-moe-tiny"].config
    with pytest.raises(MpillamaError, match="between 1 and the expert count"):
        dataclasses.replace(base, n_experts_used=0)
    with pytest.raises(MpillamaError, match="qwen3moe models have experts and the others none"):
        dataclasses.replace(base, n_experts=0, n_experts_used=0)
    assert not ModelConfig(**{**base.__dict__, "n_experts": 0, "n_experts_used": 0, "expert_hidden_dim": 0,
                              "arch": "qwen3"}).is_moe


def test_trace_has_route_and_experts_segments_and_their_balance(models: dict[str, Path], tmp_path: Path) -> None:
    from mpillama.trace.analysis import coverage, load_trace, segment_problems
    from mpillama.trace.recorder import SEGMENTS
    from tests.test_trace_engine import report

    path = tmp_path / "moe.h5"
    done = run_mpillama(2, "generate", "--model", str(models["qwen3-moe-tiny-q40"]), "--prompt", PROMPT, "--steps", "8",
                        "--ignore-eos", "--trace", str(path), timeout=300)
    assert done.returncode == 0, done.stderr
    trace = load_trace(path)
    assert segment_problems(trace) == [] and np.all(np.abs(coverage(trace)["ratio"] - 1) < 0.05)
    s = trace.segments
    for name in ("route", "experts"):  # once per layer per step on every rank, inside the layers
        m = s.seg == SEGMENTS.index(name)
        assert m.sum() == 2 * 2 * len(trace.steps) and set(s.layer[m].tolist()) == {0, 1}
    tab = report(path)
    for phase in ("prefill", "decode"):
        ex = tab["experts"][phase]
        assert len(ex["experts_ms_per_token"]) == 2 and min(ex["experts_ms_per_token"]) > 0
        assert ex["experts_max_over_mean"] >= 1.0
    assert "experts" not in load_trace(path).segment_names[:11]  # old segment codes unchanged


def test_long_prompt_same_text_on_1_2_3_ranks_with_chunked_prefill_output(models: dict[str, Path]) -> None:
    """A 26-token prompt: experts grouped over a batch, and under allreduce the block output sent in chunks."""
    prompt = ("The capital of France is Paris, and the capital of Germany is Berlin; the capital of Italy is Rome "
              "and of Spain Madrid.")
    texts = []
    for n, extra in ((1, []), (2, ["--sync", "allreduce", "--prefill-chunks", "3"]), (3, ["--sync", "star"])):
        done = run_mpillama(n, "generate", "--model", str(models["qwen3-moe-tiny-f32"]), "--weight-type", "f32",
                            "--buffer-float-type", "f32", "--prompt", prompt, "--steps", "16", "--ignore-eos", *extra,
                            timeout=300)
        assert done.returncode == 0, done.stderr
        texts.append(done.stdout)
    assert texts[0].strip() and texts[1] == texts[0] and texts[2] == texts[0]


def test_dllama_m_round_trip(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """distributed-llama's qwen3-moe .m (arch 0xABCD02, keys 7, 8, 21; f32 router, experts w1 w2 w3): written
    from the GGUF, read back tensor for tensor, and the same greedy tokens."""
    from mpillama.formats.dllama import read_dllama_header, write_dllama

    g = open_model(models["qwen3-moe-tiny-q40"])
    path = write_dllama(g, tmp_path / "moe.m")
    _, header = read_dllama_header(path, np.fromfile(path, np.uint8))
    assert (header["arch"], header["n_experts"], header["n_active_experts"], header["moe_hidden_dim"]) == (
        0xABCD02, 8, 2, 160)
    m = open_model(path)
    assert m.config == g.config and m.tensors["blk.1.ffn_gate_inp"].kind == "f32"
    for n in ("blk.1.ffn_gate_inp", "blk.0.ffn_down_exps.6", "blk.1.ffn_up_exps.0", "blk.1.ffn_norm", "output"):
        assert np.array_equal(m.read_f32(n), g.read_f32(n)), n
    tokens = [np.argmax(generate(p, tmp_path, capsys, "--tokenizer", str(models["qwen3-moe-tiny-q40"])), axis=1)
              for p in (path, models["qwen3-moe-tiny-q40"])]
    assert np.array_equal(tokens[0], tokens[1])
