"""Checksum of one expert held in a buffer laid out canonically (the byte-level hash is ``core.expert_checksum``)."""

from __future__ import annotations

from expertflow.core import Buffer, expert_checksum
from expertflow.tiers.layout import ExpertSpec


def spec_checksum(spec: ExpertSpec, buf: Buffer) -> int:
    """Checksum of one expert held in ``buf`` (canonical layout): its tensors' bytes in order.

    Alignment padding between tensors is left out, so the value does not depend on what a reused buffer held
    before; for an expert without padding it equals ``expert_checksum(spec.key, buf[:spec.nbytes])``.
    """
    view = memoryview(buf)
    return expert_checksum(spec.key, (view[off : off + t.nbytes] for t, off in spec.views()))
