"""Checksums of expert bytes: xxh3-64, fast enough to verify every read (~10+ GB/s)."""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

Buffer = bytes | bytearray | memoryview


def expert_checksum(data: Buffer | Iterable[Buffer]) -> int:
    """xxh3-64 of one buffer, or of several buffers taken in order as one byte string."""
    h = xxhash.xxh3_64()
    if isinstance(data, (bytes, bytearray, memoryview)):
        h.update(data)
    else:
        for part in data:
            h.update(part)
    return h.intdigest()
