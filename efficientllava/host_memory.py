"""A steady host heap for CPU timing: glibc keeps tensors up to a size on its heap instead of mapping fresh pages.

glibc's malloc serves large blocks (from 128 KiB, a threshold it raises as blocks are freed) with fresh `mmap`s and
returns freed heap tops to the system. A CPU forward then pays first-touch page faults for part of its activations,
how many depending on everything the process allocated before. The bigger model has the bigger activations and pays
more of them, so a faulting heap slows every forward and inflates speedups: on the toy, one saved searched model
against the dense toy measured ~1.6-1.8x in a fresh process and ~1.5x inside the search that wrote it (README,
"Speed"). `steady_heap` fixes both thresholds, so every process times in the regime a long-running one reaches on its
own. Outside glibc (macOS, musl, Windows) it changes nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MAX_MMAP_THRESHOLD_MIB = 32  # glibc refuses a larger mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # free heap top kept before it is returned to the system


class HostMemoryError(ValueError):
    """A heap setting that cannot be applied."""


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def check_threshold(mmap_threshold_mib) -> None:
    """Raise `HostMemoryError` unless the value is None, 0 or an integer from 1 to 32 (MiB)."""
    if mmap_threshold_mib is None or (mmap_threshold_mib == 0 and not isinstance(mmap_threshold_mib, bool)):
        return
    if isinstance(mmap_threshold_mib, bool) or not isinstance(mmap_threshold_mib, int) \
            or not 0 < mmap_threshold_mib <= MAX_MMAP_THRESHOLD_MIB:
        raise HostMemoryError(f"steady heap threshold is {mmap_threshold_mib!r} MiB; expected an integer from 1 to "
                              f"{MAX_MMAP_THRESHOLD_MIB} (glibc's largest mmap threshold), or null/0 to leave the "
                              "allocator alone")


def steady_heap(mmap_threshold_mib: int | None) -> str:
    """Keep blocks up to `mmap_threshold_mib` MiB on the heap and keep up to 1 GiB of freed heap (process-wide, for
    the rest of the process). None or 0 leaves the allocator alone. Returns what was done, for the run's records."""
    check_threshold(mmap_threshold_mib)
    if not mmap_threshold_mib:
        return "allocator left alone"
    libc = _libc()
    if libc is None:
        return "allocator left alone (no glibc mallopt on this system)"
    if not libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold_mib << 20) or not libc.mallopt(M_TRIM_THRESHOLD,
                                                                                         TRIM_THRESHOLD):
        raise HostMemoryError(f"glibc refused mallopt(mmap threshold {mmap_threshold_mib} MiB, trim threshold 1 GiB)")
    log.info("steady heap: blocks up to %d MiB stay on glibc's heap, 1 GiB of free heap kept", mmap_threshold_mib)
    return f"steady heap (glibc: blocks up to {mmap_threshold_mib} MiB on the heap, 1 GiB of free heap kept)"
