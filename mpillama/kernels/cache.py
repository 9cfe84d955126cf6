"""One numba cache stamp for the whole package: editing any of its files recompiles all its kernels.

numba keys a cached kernel on its own source file only, but the machine code it caches includes
the helpers it calls from the package's other files (bits.py's exp inlined into attn.py's
softmax, vector.py's intrinsics in every vector kernel). So a kernel function of this package is
cached by numba's own locator (same place on disk), with a stamp over every file of the package
for its source's: an edit anywhere invalidates every kernel, as when the kernels were one file.

Registered at import (the package's __init__ imports this first, before any kernel is
decorated); it touches no function outside this directory. Imports numba only.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from numba.core.caching import CacheImpl, _CacheLocator

_LOCATORS = CacheImpl._locator_classes  # the locators numba tries in turn (numba 0.60 to 0.68 at least)
PACKAGE_DIR = Path(__file__).resolve().parent


def package_stamp(directory: Path = PACKAGE_DIR) -> str:
    """A hash of the contents of every .py file in directory (re-read only when one's stat changes)."""
    files = sorted(directory.glob("*.py"))
    return _hash_files(tuple((str(f), st.st_mtime_ns, st.st_size) for f in files for st in [f.stat()]))


@functools.cache
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for path, _, _ in files:
        h.update(Path(path).read_bytes())
    return h.hexdigest()


class PackageLocator(_CacheLocator):
    """numba's own locator for a function of this package, stamped with package_stamp()."""

    def __init__(self, inner: _CacheLocator) -> None:
        self._inner = inner

    def get_cache_path(self) -> str:
        return self._inner.get_cache_path()

    def get_disambiguator(self) -> str:
        return self._inner.get_disambiguator()

    def get_source_stamp(self) -> str:
        return package_stamp()

    @classmethod
    def from_function(cls, py_func, py_file):  # noqa: ANN001, ANN206 (numba's locator protocol)
        if Path(os.path.abspath(py_file)).parent != PACKAGE_DIR:
            return None
        for other in _LOCATORS:
            inner = None if other is cls else other.from_function(py_func, py_file)
            if inner is not None:
                return cls(inner)
        return None


if PackageLocator not in _LOCATORS:
    _LOCATORS.insert(0, PackageLocator)


def cache_is_warm() -> bool:
    """A guess, for the start-up notice only (numba itself decides what to load): True when numba's
    cache of this package holds index files newer than every source file of the package."""
    from mpillama.kernels.bits import _f16_value  # any kernel of the package: they share one folder

    locator = PackageLocator.from_function(_f16_value.py_func, _f16_value.py_func.__code__.co_filename)
    if locator is None:
        return False
    folder = Path(locator.get_cache_path())
    newest_source = max(f.stat().st_mtime for f in PACKAGE_DIR.glob("*.py"))
    return sum(1 for f in folder.glob("*.nbi") if f.stat().st_mtime >= newest_source) >= 10


def compiled_in_this_process() -> bool:
    """Whether numba compiled (rather than loaded from its cache) any kernel of this package so far."""
    import sys

    from numba.core.dispatcher import Dispatcher

    prefix = f"{__package__}."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix):
            for obj in vars(module).values():
                if isinstance(obj, Dispatcher) and sum(obj.stats.cache_misses.values()):
                    return True
    return False
