"""Give freed native memory back to the OS (glibc's malloc_trim): without it the server's
resident memory follows the high-water mark of every allocator arena, and grew in steps over
a soak (bench/soak.py); with it, it follows the working set."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    """The C library, if it has malloc_trim (glibc); None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def malloc_trim() -> bool:
    """Release free heap memory to the OS; True when some was released."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))


async def trim_every(seconds: float) -> None:
    """malloc_trim every `seconds`, off the event loop, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(seconds)
        await loop.run_in_executor(None, malloc_trim)
