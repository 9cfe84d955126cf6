"""Files appear whole or not at all: written under a temporary name beside their target, then
renamed over it (a rename within a folder is atomic), and removed if writing fails or the
process is told to stop.

SIGTERM and SIGHUP end a process on the spot by default, without running any cleanup, so a
`timeout` or a closed terminal would leave the temporary file behind (hundreds of MB for a
model). While a temporary file exists, and only if those signals still have their default
action, they raise SystemExit (exit code 128 + signal) instead; a program that handles them
itself (the engine leaves a partial trace) keeps its handler.

Imports the stdlib only.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def atomic_write(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yields the temporary name (path + '.part') to write; when the block ends it is renamed over
    path, and when the block raises (or the process is stopped) it is removed. fsync forces the
    bytes to disk before the rename, so that after a power loss the name never points at missing bytes."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    with _stop_signals_raise():
        try:
            yield part
            if fsync:
                with open(part, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """Within the block, stop signals left at their default action raise SystemExit instead."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    changed = [s for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_DFL]
    for s in changed:
        signal.signal(s, _stop)
    try:
        yield
    finally:
        for s in changed:
            signal.signal(s, signal.SIG_DFL)
