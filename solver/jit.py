"""The numba switch: ``njit`` when numba imports and ``RAY_EPLB_NUMBA`` is not ``0``, else ``None``.

Both the fresh solve's kernels (:mod:`ray_eplb.solver.compiled`) and the migration-aware
planner's (relocations, goal swaps, duplicate repair, the kept-slots bound, plan statistics) are
compiled through it, with ``cache=True`` (numba's on-disk cache), single-threaded. Without numba
the kernels stay plain Python functions that are never called: each stage runs its numpy code.

numba's cache checks only the stamp of the file a kernel is defined in, not of the files whose
kernels it calls, so a checkout updated in place (``git pull``) could keep running a kernel compiled
against the old version of another file. :func:`drop_stale_cache` prevents that: the solver's
cache entries are removed whenever any of the solver's source files changed since they were written.
"""
from __future__ import annotations

import glob
import hashlib
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def sources_digest(folder: str = _HERE) -> str:
    """BLAKE2b of the names and contents of every ``.py`` file in ``folder`` (the solver's sources)."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def drop_stale_cache(folder: str = _HERE) -> bool:
    """Remove numba's cache entries in ``folder/__pycache__`` if the sources changed since they were
    written (recorded in ``numba-sources.digest`` there). Returns whether entries were removed.
    Where the folder cannot be written (an installed package: numba then caches per user, and an
    install replaces every file), nothing is done."""
    cache = os.path.join(folder, "__pycache__")
    stamp = os.path.join(cache, "numba-sources.digest")
    digest = sources_digest(folder)
    try:
        with open(stamp) as f:
            if f.read().strip() == digest:
                return False
    except OSError:
        pass
    try:
        os.makedirs(cache, exist_ok=True)
        stale = glob.glob(os.path.join(cache, "*.nbi")) + glob.glob(os.path.join(cache, "*.nbc"))
        for path in stale:
            try:
                os.remove(path)
            except FileNotFoundError:  # another process cleaned it first
                pass
        tmp = f"{stamp}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(digest)
        os.replace(tmp, stamp)
        return bool(stale)
    except OSError:
        return False


try:
    if os.environ.get("RAY_EPLB_NUMBA", "1") == "0":
        raise ImportError("disabled by RAY_EPLB_NUMBA=0")
    from numba import njit
except ImportError:
    njit = None
else:
    drop_stale_cache()

AVAILABLE = njit is not None


def jit(fn):
    """``numba.njit(cache=True, nogil=True)`` where numba is available, ``fn`` itself otherwise."""
    return njit(cache=True, nogil=True)(fn) if AVAILABLE else fn
