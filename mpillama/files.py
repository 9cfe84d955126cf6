"""The files a user names (models, tokenizers, profiles): what kind of path it is, and the one
way a file that cannot be read is reported.

Owns: `kind_of`, which decides with os.stat, before anything opens the path, whether it is a
regular file or a folder (a FIFO would block the reader forever, a device would never end);
`reading`, the one place where any error raised while reading such a file becomes a single
MpillamaError line "FILE: what is wrong [at offset N]; what to do"; and the caps that keep that
line short whatever the file holds (`shown` for quoted content, `capped` for the whole line).

Imports the stdlib and errors only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mpillama.errors import MpillamaError

MAX_QUOTE = 60  # characters of file content quoted in a message
MAX_LINE = 480  # characters of a whole error line about a file
# the words `reading` puts in a message about an error no reader check anticipated
UNANTICIPATED = "reading it failed with"

_NOT_A_FILE = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def kind_of(path: str | Path, what: str, advice: str = "check the path") -> str:
    """'file' or 'dir'; a missing path or anything else (FIFO, device, socket) is an error naming it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MpillamaError(f"{what} {path} does not exist: {advice}") from None
    except OSError as e:
        raise MpillamaError(f"{what} {path}: cannot look at it ({e.strerror}): {advice}") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    found = _NOT_A_FILE.get(stat.S_IFMT(mode), "not a regular file")
    raise MpillamaError(f"{what} {path} is {found}, which mpillama does not read from: {advice}")


def shown(value: object, limit: int = MAX_QUOTE) -> str:
    """repr(value), cut to `limit` characters with its full length said: for file content in messages."""
    text = repr(value)
    if len(text) <= limit:
        return text
    unit = "bytes" if isinstance(value, (bytes, bytearray)) else "characters"
    size = f" of {len(value)} {unit}" if isinstance(value, (str, bytes, bytearray)) else ""  # type: ignore[arg-type]
    return f"{text[:limit]}...{size}"


def capped(text: str, limit: int = MAX_LINE) -> str:
    """One line of at most `limit` characters: its start and its end (where the advice is) kept."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 5]} [...] {text[-tail:]}"


def about(path: str | Path, message: str) -> str:
    """The message with the file named (once)."""
    return message if str(path) in message else f"{path}: {message}"


@contextmanager
def reading(path: str | Path, advice: str) -> Iterator[None]:
    """Any error raised in the block becomes one MpillamaError line about `path`.

    Readers raise MpillamaError for the damage they check for (with the offset, and what to do);
    those keep their words and gain the file name. Anything else but a failed assert (a damaged
    file can make any library call fail) is said with its type and text, then `advice` (what it
    means, what to do).
    """
    try:
        yield
    except MpillamaError as e:
        raise type(e)(capped(about(path, str(e)))) from None
    except AssertionError:  # a broken invariant of the code, not of the file: it keeps its traceback
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes fail, the user gets one line
        text = capped(f"{type(e).__name__}: {e}", MAX_LINE // 2)
        raise MpillamaError(capped(f"{path}: {UNANTICIPATED} {text}: {advice}")) from None
