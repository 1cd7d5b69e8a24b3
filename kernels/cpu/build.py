"""Compile the CPU kernels once per machine and load them with ctypes.

The kernels (paged attention, RMSNorm, rotary embedding, SiLU-and-multiply) are C++ files and a header with
no dependency beyond the compiler's OpenMP (no torch headers, so they build in seconds, not
the minute a ``torch.utils.cpp_extension`` build of the same code takes), into one library. It is
compiled with ``-march=native`` for the CPU it runs on, into a cache keyed by the sources,
the compiler, its flags and the CPU's instruction sets, so a home directory shared by
machines of different CPUs keeps one build per CPU.
Its OpenMP runtime is torch's own: torch loads ``libgomp.so.1`` first and the dynamic
linker reuses it, so the kernel and torch's operators share one thread pool.

Where no compiler is found or the build fails, ``load`` raises ``KernelUnavailable`` with
the reason and batchrun runs the torch reference instead (``choose_backend`` logs why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from batchrun.kernels.backend import BackendUnavailable

SOURCES = tuple(
    Path(__file__).with_name(n)
    for n in ("paged_attention.cpp", "rms_norm.cpp", "rotary.cpp", "silu_mul.cpp", "kv_write.cpp")
)
HEADERS = (Path(__file__).with_name("microkernels.h"),)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
BUILD_TIMEOUT_S = 300
# The kernels' element types at their C entry points (microkernels.h's DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class KernelUnavailable(BackendUnavailable):
    """The CPU kernel cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    """``$BATCHRUN_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/batchrun/kernels`` (~/.cache)."""
    if override := os.environ.get("BATCHRUN_KERNEL_CACHE"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchrun" / "kernels"


def compiler() -> str | None:
    """``$CXX``, else the first of c++, g++, clang++ on the PATH."""
    if cxx := os.environ.get("CXX"):
        return cxx
    return next((found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None)


@functools.cache
def load() -> ctypes.CDLL:
    """The compiled kernel library (built on first use, then reused from the cache)."""
    if platform.system() != "Linux":
        raise KernelUnavailable(f"is built for Linux only, not {platform.system()}")
    cxx = compiler()
    if cxx is None:
        raise KernelUnavailable("needs a C++ compiler (none of $CXX, c++, g++, clang++ found)")
    library = cache_dir() / f"batchrun_cpu-{_build_key(cxx)}.so"
    if not library.exists():
        _compile(cxx, library)
    try:
        return ctypes.CDLL(str(library))
    except OSError as exc:
        raise KernelUnavailable(f"could not load {library}: {exc}") from exc


def _build_key(cxx: str) -> str:
    digest = hashlib.sha256()
    for header in (*SOURCES, *HEADERS):
        digest.update(header.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(_compiler_version(cxx).encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def _compiler_version(cxx: str) -> str:
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"cannot run the compiler {cxx!r}: {exc}") from exc
    return done.stdout.splitlines()[0] if done.stdout else cxx


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (what ``-march=native`` compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(cxx: str, library: Path) -> None:
    """Build into a temporary file beside ``library`` and rename it into place, so
    concurrent first runs (several workers) never load a half-written library."""
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
        os.close(fd)
    except OSError as exc:
        raise KernelUnavailable(f"cannot write its build to {library.parent}: {exc}") from exc
    try:
        done = subprocess.run(
            [cxx, *FLAGS, *map(str, SOURCES), "-o", partial],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            detail = "\n".join(done.stderr.strip().splitlines()[:5])
            raise KernelUnavailable(f"failed to compile with {cxx}: {detail}")
        os.replace(partial, library)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"failed to compile with {cxx}: {exc}") from exc
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
