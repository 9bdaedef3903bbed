"""Checksums of expert bytes: xxh3-64, fast enough to verify every read (~10+ GB/s)."""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

from expertflow.tiers.layout import ExpertSpec

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


def spec_checksum(spec: ExpertSpec, buf: Buffer) -> int:
    """Checksum of one expert held in ``buf`` (canonical layout): its tensors' bytes in order.

    Alignment padding between tensors is left out, so the value does not depend on what a reused buffer held
    before; for an expert without padding it equals ``expert_checksum(buf[:spec.nbytes])``.
    """
    view = memoryview(buf)
    return expert_checksum(view[off : off + t.nbytes] for t, off in spec.views())
