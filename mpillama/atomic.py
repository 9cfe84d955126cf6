"""Files appear whole or not at all: written under a temporary name beside their target, then
renamed over it (a rename within a folder is atomic), and removed if writing fails.

Imports the stdlib only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yields the temporary name (path + '.part') to write; when the block ends it is renamed over
    path, and when the block raises it is removed. fsync forces the bytes to disk before the
    rename, so that after a power loss the name never points at missing bytes."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    try:
        yield part
        if fsync:
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
