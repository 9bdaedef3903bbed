"""Host-RAM tier: a fixed pool of equally sized expert buffers inside one page-aligned arena.

The arena is allocated once (anonymous mmap, pre-faulted) and never grows: its size *is* the pool's
accounting, so the budget can't be exceeded by construction. Buffers are 4 KiB aligned (what O_DIRECT
needs) and are page-locked with ``cudaHostRegister`` when CUDA is present, so host-to-device copies can be
asynchronous. Nothing here decides *which* expert a buffer holds; that is the store's job.
"""

from __future__ import annotations

import logging
import mmap

import torch

from expertflow.core import BLOCK, round_up
from expertflow.errors import BudgetError

log = logging.getLogger(__name__)


class HostPool:
    """``num_buffers`` buffers of ``buffer_nbytes`` each, carved from one arena of at most ``budget_bytes``."""

    def __init__(self, buffer_nbytes: int, budget_bytes: int, *, pin: bool | None = None) -> None:
        if buffer_nbytes <= 0:
            raise BudgetError("expert buffers must have a positive size")
        self.buffer_nbytes = round_up(buffer_nbytes, BLOCK)
        self.num_buffers = budget_bytes // self.buffer_nbytes
        if self.num_buffers < 1:
            raise BudgetError(
                f"host budget of {budget_bytes} bytes cannot hold one expert buffer of {self.buffer_nbytes} bytes"
            )
        self.nbytes = self.num_buffers * self.buffer_nbytes
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self._arena: mmap.mmap | None = mmap.mmap(-1, self.nbytes, flags=flags)
        self._view: memoryview | None = memoryview(self._arena)
        self._pinned = False
        # uint8 [num_buffers, buffer_nbytes] over the arena; compute views are typed slices of rows.
        self.tensor = torch.frombuffer(self._arena, dtype=torch.uint8).view(
            self.num_buffers, self.buffer_nbytes
        )
        if pin is None:
            pin = torch.cuda.is_available()
        if pin:
            self._pin()

    def _pin(self) -> None:
        if not torch.cuda.is_available():
            log.warning("pinned host memory needs CUDA; using ordinary page-aligned memory")
            return
        # cudaHostRegister page-locks memory we already own, keeping the 4 KiB alignment of the mmap arena.
        rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 0)
        if int(rc) != 0:
            log.warning("cudaHostRegister failed (%s); host-to-device copies will be synchronous", rc)
            return
        self._pinned = True

    @property
    def pinned(self) -> bool:
        return self._pinned

    def buffer(self, index: int) -> memoryview:
        """Writable view of buffer ``index`` (owned by the pool; valid until close())."""
        if self._view is None:
            raise BudgetError("host pool is closed")
        if not 0 <= index < self.num_buffers:
            raise IndexError(f"buffer {index} outside pool of {self.num_buffers}")
        start = index * self.buffer_nbytes
        return self._view[start : start + self.buffer_nbytes]

    def close(self) -> None:
        """Unpin and unmap. Views handed out must be gone by then (numpy/torch views keep the map alive)."""
        if self._arena is None:
            return
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._pinned = False
        self.tensor = torch.empty(0, dtype=torch.uint8)
        assert self._view is not None
        self._view.release()
        self._view = None
        try:
            self._arena.close()
        except BufferError:
            # A caller still holds a tensor over the arena; the mapping is freed when that view dies.
            log.debug("host arena still referenced at close; unmapped when the last view is dropped")
        self._arena = None
