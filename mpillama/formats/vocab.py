"""Real tokenizer vocabularies for synthetic models and tokenizer tests, fetched once and cached.

llama.cpp ships tokenizer-only GGUF files (ggml-vocab-NAME.gguf, with NAME.gguf.inp/.out test
vectors) in its source tree, which the llama-cpp-python sdist on PyPI vendors. We download that
sdist once with pip, extract only those files into the cache, and never commit them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mpillama.atomic import atomic_write
from mpillama.errors import MpillamaError
from mpillama.mpienv import launched_rank
from mpillama.output import say

SDIST = "llama-cpp-python"
SDIST_VERSION = "0.3.36"


def cache_dir() -> Path:
    """$MPILLAMA_CACHE, else ~/.cache/mpillama."""
    return Path(os.environ.get("MPILLAMA_CACHE", Path.home() / ".cache" / "mpillama"))


def vocab_dir() -> Path:
    return cache_dir() / f"vocab-{SDIST_VERSION}"


def vocab_gguf(name: str) -> Path:
    """Path of ggml-vocab-NAME.gguf (e.g. 'llama-bpe', 'llama-spm', 'qwen2'), downloading on first use."""
    path = vocab_dir() / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        fetch_vocabs()
    if not path.is_file():
        known = sorted(p.name[len("ggml-vocab-") : -len(".gguf")] for p in vocab_dir().glob("ggml-vocab-*.gguf"))
        raise MpillamaError(f"no vocabulary named {name!r}; known: {', '.join(known)}")
    return path


def fetch_vocabs() -> Path:
    """Download the sdist with pip and extract models/ggml-vocab-* into vocab_dir()."""
    target = vocab_dir()
    target.mkdir(parents=True, exist_ok=True)
    say(launched_rank() or 0,
        f"mpillama: fetching tokenizer vocabularies ({SDIST}=={SDIST_VERSION} sdist, ~75 MB, once) into {target}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"{SDIST}=={SDIST_VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise MpillamaError(
                f"could not download {SDIST}=={SDIST_VERSION} for its tokenizer vocabularies "
                f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no archive'}); "
                f"check network access to PyPI, or put ggml-vocab-*.gguf files in {target}"
            )
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and "/models/" in member.name and base.startswith("ggml-vocab-"):
                    data = tar.extractfile(member)
                    assert data is not None
                    with atomic_write(target / base) as part:  # a killed download leaves no half file
                        part.write_bytes(data.read())
    return target
