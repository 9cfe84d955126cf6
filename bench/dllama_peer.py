"""distributed-llama, the peer, on the emulated cluster: its model files, its prompt, one run.

Owns what bench/cluster.py needs to put distributed-llama's figures beside mpillama's on the same
namespaces and model: the .m (q40 weights) and .t files written from mpillama's GGUF by
mpillama.formats.dllama, cached next to the GGUF; a prompt text that distributed-llama's own
tokenizer cuts into exactly the prompt length mpillama's bench uses; and one run, `dllama worker`
in the background on node1.. and `dllama inference` on node0, with its reported tok/s parsed.

distributed-llama itself is not part of this project: the caller builds it elsewhere and passes
the binary's path. Imports mpillama's formats and tokenizer, never mpi4py.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mpillama.errors import MpillamaError
from mpillama.formats import open_model
from mpillama.formats.dllama import DllamaVocab, read_dllama_tokenizer, write_dllama, write_dllama_tokenizer
from mpillama.formats.synth import write_synthetic
from mpillama.formats.vocab import cache_dir
from mpillama.tokenizer import tokenizer_from_dllama, tokenizer_from_gguf_metadata
from tests.cluster import Cluster

PORT = 9990  # every worker listens on its own host, so one port serves all
WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps on the warm mat".split()


def source_gguf(model: str | None, synthetic: str) -> Path:
    """The GGUF mpillama's bench runs: --model, else the cached synthetic model (written if missing)."""
    if model:
        return Path(model)
    path = cache_dir() / "models" / f"{synthetic}-q40.gguf"  # the name mpillama.run.synthetic_model uses
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(synthetic, path, weight_type="q40", seed=0)
    return path


def dllama_files(gguf: Path) -> tuple[Path, Path]:
    """(.m, .t) for a GGUF: q40 weights (the GGUF's Q4_0 bytes unchanged) and its vocabulary,
    written once into the cache and rewritten when the GGUF is newer."""
    out = cache_dir() / "dllama"
    m_path, t_path = out / f"{gguf.stem}.m", out / f"{gguf.stem}.t"
    if m_path.exists() and t_path.exists() and min(m_path.stat().st_mtime, t_path.stat().st_mtime) > gguf.stat().st_mtime:
        return m_path, t_path
    out.mkdir(parents=True, exist_ok=True)
    model = open_model(gguf)
    try:
        meta = model.tokenizer_metadata()
        if meta is None:
            raise MpillamaError(f"{gguf}: no tokenizer in the file: distributed-llama needs one (.t)")
        tok = tokenizer_from_gguf_metadata(meta)
        # distributed-llama's converters store each token's bytes and score it -id (earlier ids merge first)
        vocab = DllamaVocab(tokens=list(tok.pieces), scores=[-float(i) for i in range(tok.vocab_size)],
                            bos_id=tok.bos_id if tok.bos_id is not None else tok.vocab_size,
                            eos_ids=sorted(tok.eos_ids), chat_template=tok.chat_template, add_bos=tok.add_bos)
        write_dllama_tokenizer(vocab, t_path)
        write_dllama(model, m_path, "q40")
    finally:
        model.close()
    return m_path, t_path


def prompt_text(t_path: Path, n_tokens: int) -> str:
    """Plain words that distributed-llama's tokenizer cuts into exactly n_tokens tokens (BOS not counted)."""
    tok = tokenizer_from_dllama(read_dllama_tokenizer(t_path))  # its encoder's equivalent (see there)
    text = ""
    for k in range(4 * n_tokens):
        longer = text + ("" if k == 0 else " ") + WORDS[k % len(WORDS)]
        n = len(tok.encode(longer, add_bos=False))
        if n == n_tokens:
            return longer
        if n > n_tokens:
            break
        text = longer
    raise MpillamaError(f"no prompt of plain words is exactly {n_tokens} tokens for {t_path}")


@dataclass
class DllamaRun:
    prompt_tok_s: float  # its "Evaluation tokens/s"
    gen_tok_s: float  # its "Prediction tokens/s"
    sync_ms: float  # root's mean Sync ms per predicted token (each printed as whole ms, truncated)


def parse_output(text: str, prompt_tokens: int, gen_tokens: int) -> DllamaRun:
    """Figures from `dllama inference` output, checking it evaluated and predicted the expected counts."""
    found = re.search(r"Evaluation\s.*?nTokens:\s*(\d+)\s+tokens/s:\s*([\d.]+).*?"
                      r"Prediction\s+nTokens:\s*(\d+)\s+tokens/s:\s*([\d.]+)", text, re.DOTALL)
    if not found:
        raise MpillamaError(f"no Evaluation/Prediction summary in dllama's output:\n{text[-1500:]}")
    n_eval, eval_s, n_pred, pred_s = int(found[1]), float(found[2]), int(found[3]), float(found[4])
    if (n_eval, n_pred) != (prompt_tokens, gen_tokens):
        raise MpillamaError(f"dllama evaluated {n_eval} and predicted {n_pred} tokens, "
                            f"not {prompt_tokens} and {gen_tokens}")
    syncs = [int(s) for s in re.findall(r"Pred\s*\d+ ms Sync\s*(\d+) ms", text)]
    return DllamaRun(eval_s, pred_s, sum(syncs) / max(len(syncs), 1))


def _listening(cluster: Cluster, host: int, port: int) -> bool:
    """Whether something listens on TCP port in host's namespace (read from its /proc/net/tcp,
    so no probe connection reaches the worker, which would take it for the root)."""
    done = subprocess.run(cluster.on_host(host, ["cat", "/proc/net/tcp", "/proc/net/tcp6"]),
                          capture_output=True, text=True, timeout=30, check=False)
    return any(f[1].endswith(f":{port:04X}") and f[3] == "0A"
               for f in (line.split() for line in done.stdout.splitlines()[1:]) if len(f) > 3)


def run_dllama(cluster: Cluster, hosts: int, binary: Path, m_path: Path, t_path: Path, prompt: str,
               prompt_tokens: int, gen_tokens: int, buffer_float_type: str, max_seq_len: int = 4096,
               timeout: float = 1800) -> DllamaRun:
    """One `dllama inference` on node0 with `dllama worker` on node1..node<hosts-1>, one thread each."""
    common = ["--nthreads", "1"]
    workers: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="dllama-") as logs:
        try:
            for h in range(1, hosts):
                with open(Path(logs) / f"worker{h}.log", "wb") as log:  # the child keeps its own handle
                    workers.append(subprocess.Popen(
                        cluster.on_host(h, [str(binary), "worker", "--port", str(PORT), *common]),
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            for h in range(1, hosts):
                deadline = time.monotonic() + 60
                while not _listening(cluster, h, PORT):
                    if workers[h - 1].poll() is not None or time.monotonic() > deadline:
                        raise MpillamaError(f"dllama worker on node{h} did not start listening: "
                                            f"{(Path(logs) / f'worker{h}.log').read_text(errors='replace')[-800:]}")
                    time.sleep(0.2)
            root = [str(binary), "inference", "--model", str(m_path), "--tokenizer", str(t_path),
                    "--buffer-float-type", buffer_float_type, "--max-seq-len", str(max_seq_len),
                    "--prompt", prompt, "--steps", str(prompt_tokens + gen_tokens),
                    "--temperature", "0", "--seed", "1", *common]
            if hosts > 1:
                root += ["--workers", *(f"{a}:{PORT}" for a in cluster.addresses[1:hosts])]
            done = subprocess.run(cluster.on_host(0, root), capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
            if done.returncode != 0:
                tails = "".join(f"\n-- node{h}:\n" + (Path(logs) / f"worker{h}.log").read_text(errors="replace")[-800:]
                                for h in range(1, hosts))
                raise MpillamaError(f"dllama inference on {hosts} hosts failed ({done.returncode}):\n"
                                    f"{(done.stdout + done.stderr)[-1500:]}{tails}")
            return parse_output(done.stdout, prompt_tokens, gen_tokens)
        finally:
            for w in workers:  # a worker serves roots forever: stop ours, by its pid
                w.kill()
                w.wait()
