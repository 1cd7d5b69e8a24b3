"""Keep freed host memory for reuse while the model runs on the CPU.

A CPU step allocates and frees every layer's activations: megabytes per tensor (a 2,048-token
step's MLP input is 2,048 x intermediate x 2 bytes). glibc's malloc serves such blocks with
``mmap`` and returns them to the OS on ``free`` (or trims them off the heap's top), so every
layer of every step page-faults its activations in again: on the 2-core development machine
a Llama MLP of 2,048 tokens took 18.8 ms this way and 6.8 ms with the settings below. vLLM's
CPU backend asks users to preload tcmalloc for the same reason; batchrun sets glibc's own
thresholds instead, once, when it builds a CPU engine:

* ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's largest dynamic value, now fixed): blocks below it
  come from the heap, where they are reused;
* ``M_TRIM_THRESHOLD`` = 1 GiB: free memory at the heap's top is kept, not handed back.

The process then holds on to its peak of activation memory, which is at most a few steps'
worth; the KV pool is a separate mapping and is not affected. Under another allocator
(tcmalloc or jemalloc preloaded) or another C library, nothing is changed.
``BATCHRUN_KEEP_FREED_MEMORY=0`` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache
def keep_freed_host_memory() -> str | None:
    """Tune glibc's malloc as described above (once per process); a short description of
    what was set, or None where nothing was (not glibc, or turned off)."""
    if os.environ.get("BATCHRUN_KEEP_FREED_MEMORY", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        return None
    if not mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES):
        return None
    return "freed activations kept for reuse (glibc malloc: mmap threshold 32 MiB, trim 1 GiB)"
