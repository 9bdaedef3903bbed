"""The seam between the store and the places experts come from (NVMe, remote daemons)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from expertflow.tiers.layout import ExpertKey


@runtime_checkable
class ExpertSource(Protocol):
    """Something that can fill a host buffer with one expert in canonical layout (``ExpertSpec.offsets``).

    Implementations: :class:`~expertflow.tiers.nvme.NvmeTier`, :class:`~expertflow.tiers.remote.RemoteTier`.
    ``read`` must not touch ``buf`` after it returns or raises (also when cancelled).
    """

    name: str

    @property
    def buffer_alignment(self) -> int: ...

    def buffer_nbytes(self, key: ExpertKey | None = None) -> int: ...

    async def read(self, key: ExpertKey, buf: memoryview) -> int: ...

    def close(self) -> None: ...
