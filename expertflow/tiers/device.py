"""Device tier: a fixed number of expert slots on the compute device, allocated once.

Two implementations behind one interface:

* :class:`SharedDeviceTier` — the compute device is the CPU: a slot *is* a host-pool buffer, so no byte is
  held twice and an "upload" is free.
* :class:`CopyDeviceTier` — slots live in their own arena (CUDA, or CPU when asked to, which is how the
  two-level logic is tested without a GPU). On CUDA, copies run on a dedicated stream and completion is an
  event that the compute stream waits on: the host never synchronises on the hot path.
"""

from __future__ import annotations

import asyncio

import torch

from expertflow.tiers.host import HostPool


class SharedDeviceTier:
    """CPU compute: slot ``i`` is host buffer ``i``."""

    def __init__(self, pool: HostPool) -> None:
        self.device = torch.device("cpu")
        self.num_slots = pool.num_buffers
        self.slot_nbytes = pool.buffer_nbytes
        self.arena = pool.tensor

    async def upload(self, pool: HostPool, host_index: int, slot: int, nbytes: int) -> None:
        if host_index != slot:
            raise ValueError("shared device tier: slot and host buffer must coincide")

    def wait_ready(self, slot: int) -> None:
        """Nothing to wait for: the read into the host buffer was the upload."""

    def close(self) -> None:
        self.arena = torch.empty(0, dtype=torch.uint8)


class CopyDeviceTier:
    """Slots in their own arena on ``device``; uploads copy from a host buffer."""

    def __init__(self, device: torch.device | str, num_slots: int, slot_nbytes: int) -> None:
        self.device = torch.device(device)
        self.num_slots = num_slots
        self.slot_nbytes = slot_nbytes
        self.arena = torch.zeros(num_slots, slot_nbytes, dtype=torch.uint8, device=self.device)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._events: dict[int, torch.cuda.Event] = {}

    async def upload(self, pool: HostPool, host_index: int, slot: int, nbytes: int) -> None:
        """Copy ``nbytes`` of host buffer ``host_index`` into ``slot``.

        On CUDA the copy is queued on the copy stream (non-blocking from pinned memory) and an event is
        recorded; a worker thread waits for it, so the loop never blocks and never polls. The compute stream
        waits on the same event in :meth:`wait_ready`, so ordering holds even if the host moves on early.
        """
        src = pool.tensor[host_index, :nbytes]
        dst = self.arena[slot, :nbytes]
        if self._stream is None:
            await asyncio.to_thread(dst.copy_, src)
            return
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=pool.pinned)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._events[slot] = event
        await asyncio.to_thread(event.synchronize)

    def wait_ready(self, slot: int) -> None:
        """Make the current (compute) stream wait for the slot's last copy; no host synchronisation."""
        event = self._events.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def close(self) -> None:
        self._events.clear()
        self.arena = torch.empty(0, dtype=torch.uint8, device=self.device)
