"""Checks of a run's settings that must fail before any model loads, not after it.

Owns: before_loading(), which every command that runs the model calls once all ranks share a
communicator: the context length is one the warm-up can run, the prompt is text, and the files
rank 0 will write at the end (--trace, --dump-logits) can be created where they are asked for.
Only rank 0 writes them, so only rank 0 probes; every rank then agrees on the outcome, so a bad
path stops the whole job at once with one line.

Imports comm (for the agreement), config, errors, tokenizer (check_text) and formats.tensors
(check_max_seq_len); never mpi4py itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mpillama.comm import Comm
from mpillama.config import RunConfig
from mpillama.errors import MpillamaError
from mpillama.formats.tensors import check_max_seq_len
from mpillama.tokenizer import check_text


def before_loading(comm: Comm, run: RunConfig, trace: str | None = None, dump_logits: str | None = None,
                   prompt: str | None = None) -> None:
    """Collective: raise the first problem (the same MpillamaError on every rank), or return."""
    error = None
    try:
        check_max_seq_len(run.max_seq_len)
        if prompt is not None:
            check_text(prompt, "--prompt")
        if comm.rank == 0:
            for flag, path in (("--trace", trace), ("--dump-logits", dump_logits)):
                if path:
                    check_writable(path, flag)
    except MpillamaError as e:
        error = e
    comm.agree(error)


def check_writable(path: str, flag: str) -> None:
    """A file can be created at `path` (its folder exists and takes a new file; the path is no folder).

    Probed by creating and removing a file beside it: permission bits alone do not tell (root may
    write anywhere by them, yet not into /proc or a read-only mount)."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise MpillamaError(f"{flag} {path} is a folder: give a file name")
    if not folder.is_dir():
        raise MpillamaError(f"{flag} {path}: the folder {folder} does not exist: create it or choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
    except OSError as e:
        raise MpillamaError(f"{flag} {path}: cannot create a file in {folder} ({e.strerror}): "
                            "choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)
