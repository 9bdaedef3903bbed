"""The seam between the store and the places experts come from (NVMe, expert daemons)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from expertflow.core import ExpertKey


@runtime_checkable
class ExpertSource(Protocol):
    """Something that can fill a host buffer with one expert in canonical layout (``ExpertSpec.offsets``).

    Implementations: :class:`~expertflow.tiers.nvme.NvmeTier`, :class:`~expertflow.tiers.remote.RemoteTier`.
    ``read`` must not touch ``buf`` after it returns or raises (also when cancelled). Buffers are 4 KiB
    aligned (``core.BLOCK``) and at least ``buffer_nbytes(key)`` long.
    """

    name: str

    def buffer_nbytes(self, key: ExpertKey | None = None) -> int: ...

    async def read(self, key: ExpertKey, buf: memoryview) -> int: ...

    async def aclose(self) -> None: ...
