"""Process-wide allocator tuning for CPU inference.

glibc serves blocks above its mmap threshold (128 KiB at first) with fresh mmap calls and
returns them to the system when freed, so every request page-faults its activations and
every weight the compact executor gathers afresh. Measured on a 2-core Xeon: a gathered
256-channel 3x3 convolution on a 7x7 input took 1.25 ms instead of 0.33 ms. Raising the mmap
and trim thresholds keeps freed memory in the process for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory instead of unmapping it; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
