"""Putting a store together from a StoreConfig: the source chain (expert daemons, then NVMe) and the store.

This is the one place that knows every kind of source, so that neither the store (``pipeline``) nor the
storage tiers (``tiers``) depend on the network client (``services``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from expertflow.config import StoreConfig
from expertflow.pipeline.store import AsyncExpertStore
from expertflow.pipeline.sync import ExpertStore
from expertflow.tiers.base import ExpertSource
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.local_checksums import LocalChecksums
from expertflow.tiers.nvme import NvmeTier
from expertflow.tiers.remote import RemoteTier


async def build_sources(layout: ExpertLayout, config: StoreConfig) -> Sequence[ExpertSource]:
    """The sources ``config`` asks for, in the order a read tries them: expert daemons, then the local disk.

    With daemons and an unpacked checkpoint, the local disk records each expert's checksum as it reads it
    (:class:`LocalChecksums`), and the daemons' replies are checked against those values.
    """
    checksums = None
    if config.remote and not layout.packed:  # a pack's manifest already holds every expert's checksum
        checksums = await asyncio.to_thread(LocalChecksums.open, layout)
    nvme = NvmeTier(
        layout,
        config.read_mode,
        max_concurrent_reads=config.max_concurrent_reads,
        verify_checksums=config.verify_checksums,
        checksums=checksums,
    )
    if not config.remote:
        return [nvme]
    try:
        remote = await RemoteTier.connect(layout, config, checksums=checksums)
    except BaseException:
        await nvme.aclose()
        if checksums is not None:
            checksums.close()
        raise
    return [remote, nvme]


def open_store(
    layout_or_path: ExpertLayout | str | Path,
    config: StoreConfig | None = None,
    *,
    separate_device: bool | None = None,
) -> ExpertStore:
    """A synchronous :class:`ExpertStore` with every source ``config`` names (daemons, then NVMe)."""
    return ExpertStore(layout_or_path, config, build_sources=build_sources, separate_device=separate_device)


async def open_async_store(
    layout_or_path: ExpertLayout | str | Path,
    config: StoreConfig | None = None,
    *,
    separate_device: bool | None = None,
) -> AsyncExpertStore:
    """An :class:`AsyncExpertStore` on the running loop with every source ``config`` names."""
    return await AsyncExpertStore.open(
        layout_or_path, config, build_sources=build_sources, separate_device=separate_device
    )
