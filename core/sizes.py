"""Memory sizes as users write them (``--kv-memory``): torch-free, so the CLI validates a size
in milliseconds, before anything loads."""

from __future__ import annotations

import re

# Single letters are binary, as in ``docker --memory 8g`` and ``java -Xmx8G``; "KB"/"MB"/...
# are decimal (SI); "KiB"/"MiB"/... binary (IEC).
_UNITS = {
    "B": 1,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
SIZE_HELP = "bytes with a unit (8GiB, 8G, 512MB) or a bare fraction of free memory in (0, 1] (0.5)"


def parse_memory(text: str) -> int | float:
    """``"8GiB"`` / ``"8G"`` -> bytes (int); ``"0.5"`` -> a fraction of free memory (float in (0, 1]).

    A bare number is always a fraction: ``"2"`` is refused rather than read as 2 bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or (match.group(2) and match.group(2).upper() not in _UNITS):
        raise ValueError(f"cannot read memory size {text!r}; use {SIZE_HELP}")
    number, unit = float(match.group(1)), match.group(2).upper()
    if not unit:
        if not 0 < number <= 1:
            raise ValueError(
                f"a bare number is a fraction of free memory and must be in (0, 1], got {text!r}; "
                f"for a size add a unit, e.g. {match.group(1)}GiB"
            )
        return number
    size = int(number * _UNITS[unit])
    if size < 1:
        raise ValueError(f"memory size must be at least 1 byte, got {text!r}")
    return size
