"""glibc's malloc tuned for the engine's step-sized CPU buffers.

glibc serves an allocation above its mmap threshold (at most 32 MiB, however it adapts) with a
fresh mapping and unmaps it on free, so the next one is page-faulted in from zeroed pages
again. Each decode step allocates its logits anew: at 256 sequences the LM head's bf16 output
(25 MB) and its float32 copy (50 MB) cost ~12 ms of page faults per step, 3-4% of the step
(Zen 4, `.float()` of 256 x 49152: 10-20 ms -> 3-6 ms). Raising the threshold to 64 MiB and
the trim threshold to 256 MiB keeps such buffers in the heap for reuse; larger ones (the KV
cache, a long prompt's logits) still get their own mappings and go back to the kernel.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_done = False


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process (glibc only; a no-op elsewhere or when
    INFERD_CPU_KEEP_FREED_MEMORY=0). True when they are in force."""
    global _done
    from inferd import envs
    if _done:
        return True
    if not sys.platform.startswith("linux") or not envs.INFERD_CPU_KEEP_FREED_MEMORY:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and friends have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD,
                                                                   TRIM_THRESHOLD) != 1:
        logger.debug("mallopt refused the thresholds; glibc's defaults stay")
        return False
    _done = True
    return True
