"""bench/dllama_peer.py: the files and prompt it hands distributed-llama, and how it reads its output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.dllama_peer import dllama_files, parse_output, prompt_text
from mpillama.errors import MpillamaError
from mpillama.formats import open_model
from mpillama.formats.dllama import read_dllama_tokenizer
from mpillama.tokenizer import tokenizer_from_dllama, tokenizer_from_gguf_metadata

# the shape of `dllama inference` output (its summary lines and per-token lines), 2 tokens predicted
OUTPUT = """\
💿 Weights loaded
the quick brown fox
🔷️ Eval 3631 ms Sync  120 ms | Sent     0 kB Recv     0 kB | (32 tokens)
🔷️ Eval 3009 ms Sync  118 ms | Sent     0 kB Recv     0 kB | (32 tokens)
🔶 Pred  940 ms Sync  400 ms | Sent   512 kB Recv  1024 kB | ταν
🔶 Pred 1050 ms Sync  421 ms | Sent  1024 kB Recv  2048 kB |  order

Evaluation
   nBatches: 32
    nTokens: 64
   tokens/s: 9.64 (103.77 ms/tok)
Prediction
    nTokens: 2
   tokens/s: 1.06 (944.19 ms/tok)
"""


def test_parse_output_reads_its_figures() -> None:
    r = parse_output(OUTPUT, 64, 2)
    assert (r.prompt_tok_s, r.gen_tok_s, r.sync_ms) == (9.64, 1.06, 410.5)


def test_parse_output_refuses_other_token_counts_and_no_summary() -> None:
    with pytest.raises(MpillamaError, match="evaluated 64 and predicted 2 tokens, not 63 and 2"):
        parse_output(OUTPUT, 63, 2)
    with pytest.raises(MpillamaError, match="no Evaluation/Prediction summary"):
        parse_output(OUTPUT.split("Evaluation")[0], 64, 2)


def test_dllama_files_keep_the_weights_and_tokenize_like_the_gguf(
        models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPILLAMA_CACHE", str(tmp_path))
    gguf = models["tiny-q40"]
    m_path, t_path = dllama_files(gguf)
    src, dst = open_model(gguf), open_model(m_path)
    assert dst.format == "dllama" and dst.tensors["blk.0.attn_q"].kind == "q40"
    for name in ("blk.0.attn_q", "blk.1.ffn_down", "output"):
        assert np.array_equal(dst.read_q40(name), src.read_q40(name)), name  # the Q4_0 bytes, unchanged
    g_tok = tokenizer_from_gguf_metadata(src.tokenizer_metadata())
    d_tok = tokenizer_from_dllama(read_dllama_tokenizer(t_path))
    assert d_tok.bos_id == g_tok.bos_id and d_tok.pieces == g_tok.pieces
    text = prompt_text(t_path, 40)
    ids = d_tok.encode(text, add_bos=False)
    assert len(ids) == 40 and ids == g_tok.encode(text, add_bos=False)  # llama-bpe's own pre-tokenized BPE
    stamp = m_path.stat().st_mtime_ns
    assert dllama_files(gguf) == (m_path, t_path) and m_path.stat().st_mtime_ns == stamp  # cached
