"""Peak memory of one call on CPU, where torch keeps no allocation counter (CUDA has
``torch.cuda.max_memory_allocated``).

Written by hand because no library measures it: ``tracemalloc`` does not see torch's allocations
and ``resource.getrusage`` only reports the process's lifetime peak. Linux does: writing ``5`` to
``/proc/self/clear_refs`` resets the peak resident set size (``VmHWM`` in ``/proc/self/status``),
so the peak *during* a call, minus the resident size before it, is the memory the call needed at
its worst moment. For that figure to be true, freed memory must go back to the system instead of
staying in glibc's heap (where a later call would reuse it unseen): large blocks are served by
``mmap`` (freed at once) and the heap top is trimmed, set once through ``mallopt``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
CPU_MEASURE = "CPU: peak resident memory during the call above the resident level before it (weights, libraries excluded)"
CUDA_MEASURE = "CUDA: torch.cuda.max_memory_allocated during the call (weights included)"
_LIBC = None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def available() -> bool:
    """Whether this system can measure it: Linux with a writable clear_refs, and glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            _status_kib("VmHWM")
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if not (libc.mallopt(M_MMAP_THRESHOLD, 64 << 10) and libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)):
                return False
            _LIBC = libc
        except (OSError, RuntimeError, AttributeError):
            return False
    return True


def peak_growth_bytes(fn: Callable[[], object]) -> int | None:
    """Bytes of resident memory above the level before ``fn()`` at ``fn``'s peak; None where unmeasurable.

    Run ``fn`` once before (a warm-up): its first call also pays for one-time allocations."""
    if not available():
        return None
    gc.collect()
    _LIBC.malloc_trim(0)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return max(0, _status_kib("VmHWM") - before) << 10
