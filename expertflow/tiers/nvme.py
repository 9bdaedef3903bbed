"""NVMe tier: read one expert (all its tensors) from disk into a caller-provided host buffer.

Two read modes, same result (the expert's tensors back to back in canonical order, see ``ExpertSpec``):

* ``mmap``: buffered reads through the page cache, one ``pread`` per tensor. (The mode keeps its name; it
  no longer maps the files: a memory map dies of SIGBUS when its file shrinks under it, a read just comes
  back short, which becomes an :class:`ExpertReadError`.)
* ``direct``: ``O_DIRECT`` preads of 4 KiB-aligned spans straight into the (page-aligned) buffer, bypassing
  the page cache, then an in-place compaction of the tensors to their canonical offsets. A packed checkpoint
  (``expertflow pack``) is laid out so that this is a single read with nothing to move.

Blocking reads run in a thread pool owned by the tier; the async API bounds concurrent reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import stat
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import torch

from expertflow.core import BLOCK, ExpertKey, torch_dtype
from expertflow.errors import (
    CheckpointChangedError,
    CheckpointError,
    ChecksumError,
    ConfigError,
    ExpertReadError,
    StoreClosedError,
)
from expertflow.tiers.checksum import spec_checksum
from expertflow.tiers.layout import ExpertLayout, ExpertSpec, TensorSlice

if TYPE_CHECKING:
    from expertflow.tiers.local_checksums import LocalChecksums

log = logging.getLogger(__name__)

ReadMode = Literal["mmap", "direct"]


def buffer_address(buf: memoryview) -> int:
    """Address of a writable buffer's first byte."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) if len(buf) else 0


@dataclass(frozen=True)
class _Run:
    """One aligned read: ``length`` bytes of ``file`` from ``file_offset`` into the buffer at ``buf_offset``."""

    file: str
    file_offset: int
    length: int
    buf_offset: int
    # (index of tensor in spec, position of its first byte in the buffer after the read)
    placed: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Plan:
    runs: tuple[_Run, ...]
    extent: int  # bytes of buffer the raw reads touch
    needs_move: bool  # some tensor is not already at its canonical offset
    in_place: bool  # canonical offsets never exceed raw positions, so ascending memmove is safe


def plan_direct(spec: ExpertSpec, block: int = BLOCK) -> _Plan:
    """Aligned reads for one expert: tensors close together on disk (in canonical order) share one read.

    "Close" is a forward gap shorter than a block: reading a few padding bytes is cheaper than another
    request, and it keeps a packed expert (whose tensors sit at their canonical, possibly padded, offsets)
    one read with nothing to move.
    """
    groups: list[list[int]] = []
    for i, t in enumerate(spec.tensors):
        if groups:
            prev = spec.tensors[groups[-1][-1]]
            gap = t.offset - (prev.offset + prev.nbytes)
            if prev.file == t.file and 0 <= gap < block:
                groups[-1].append(i)
                continue
        groups.append([i])
    runs = []
    pos = 0
    needs_move = False
    in_place = True
    for group in groups:
        first, last = spec.tensors[group[0]], spec.tensors[group[-1]]
        start = first.offset // block * block
        end = -(-(last.offset + last.nbytes) // block) * block
        placed = []
        for i in group:
            raw = pos + spec.tensors[i].offset - start
            placed.append((i, raw))
            needs_move |= raw != spec.offsets[i]
            in_place &= raw >= spec.offsets[i]
        runs.append(_Run(first.file, start, end - start, pos, tuple(placed)))
        pos += end - start
    return _Plan(tuple(runs), pos, needs_move, in_place)


def read_tensor(t: TensorSlice) -> torch.Tensor:
    """One tensor of an expert read from its file as it is stored (for checks and references at open, not the
    hot path: that reads whole experts into slots)."""
    try:
        with open(t.file, "rb") as f:
            raw = bytearray(os.pread(f.fileno(), t.nbytes, t.offset))
    except OSError as exc:
        raise CheckpointError(
            f"cannot read tensor {t.role}: {exc.strerror}", file=t.file, tensor=t.source
        ) from exc
    if len(raw) != t.nbytes:
        raise CheckpointError(
            f"short read of {t.role} ({len(raw)}/{t.nbytes} bytes)", file=t.file, tensor=t.source
        )
    dtype = torch_dtype(t.dtype)
    return (
        torch.frombuffer(raw, dtype=dtype).reshape(t.shape) if t.nbytes else torch.empty(t.shape, dtype=dtype)
    )


def read_need(layout: ExpertLayout, mode: str) -> int:
    """Bytes a buffer needs to receive any expert of ``layout`` read in ``mode``: the expert itself, or for a
    direct read the whole aligned extent it lands."""
    need = layout.max_expert_nbytes
    if mode not in ("direct", "auto"):
        return need
    extent = _largest_extent(layout)
    if mode == "direct" or _extent_fits(layout, extent):  # auto may become direct: room for that
        need = max(need, extent)
    return need


def direct_fits(layout: ExpertLayout) -> bool:
    """Whether direct reads suit ``layout``: each expert's aligned extent is not much more than its bytes. An
    expert whose tensors lie far apart in the file (a fused tensor's slice here, the next one's there) would be
    read with everything between them."""
    return _extent_fits(layout, _largest_extent(layout))


def _largest_extent(layout: ExpertLayout) -> int:
    return max((plan_direct(s).extent for s in layout.experts.values()), default=0)


def _extent_fits(layout: ExpertLayout, extent: int) -> bool:
    return extent <= 1.25 * layout.max_expert_nbytes + 2 * BLOCK


class NvmeTier:
    """Reads experts of one checkpoint from disk. Owns its file descriptors, maps and read threads."""

    name = "nvme"

    def __init__(
        self,
        layout: ExpertLayout,
        mode: ReadMode | Literal["auto"] = "mmap",
        *,
        max_concurrent_reads: int = 4,
        verify_checksums: bool = True,
        checksums: LocalChecksums | None = None,
    ) -> None:
        if mode not in ("mmap", "direct"):
            hint = (
                " (an 'auto' read mode is resolved by the planner: resolve_read_mode)"
                if mode == "auto"
                else ""
            )
            raise ConfigError(f"read mode must be 'mmap' or 'direct', got {mode!r}{hint}")
        if max_concurrent_reads < 1:
            raise ConfigError("max_concurrent_reads must be >= 1")
        self.layout = layout
        self.mode: ReadMode = cast(ReadMode, mode)
        self.verify_checksums = verify_checksums
        # Where the local copy's checksums of an unpacked checkpoint are recorded (for checking daemons).
        self.checksums = checksums
        self.max_concurrent_reads = max_concurrent_reads
        self._closed = False
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._identity: dict[str, tuple[int, int, int, int]] = {}  # file -> (device, inode, size, mtime)
        self._direct_ok = True
        self._plans: dict[ExpertKey, _Plan] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        self.bytes_read = 0
        self.reads = 0
        try:
            self._open_files()
            if mode == "direct":
                self._plans = {k: plan_direct(s) for k, s in layout.experts.items()}
        except BaseException:
            self.close()
            raise

    # --- resources -------------------------------------------------------------------------------

    def _open_files(self) -> None:
        files = sorted({t.file for s in self.layout.experts.values() for t in s.tensors})
        for file in files:
            # O_NONBLOCK: opening a FIFO put where a file was must not hang; non-regular files are refused below.
            flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            fd = -1
            if self.mode == "mmap":
                try:
                    self._fds[file] = os.open(file, flags)
                except OSError as exc:
                    raise CheckpointError(f"cannot open file: {exc.strerror}", file=file) from exc
                continue
            if self._direct_ok and hasattr(os, "O_DIRECT"):
                try:
                    fd = os.open(file, flags | os.O_DIRECT)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise CheckpointError(f"cannot open file: {exc.strerror}", file=file) from exc
                    self._direct_ok = False
            if fd < 0:
                if self._direct_ok is False or not hasattr(os, "O_DIRECT"):
                    log.warning(
                        "O_DIRECT is refused by the filesystem of %s; falling back to buffered reads "
                        "(reads now go through the page cache)",
                        file,
                    )
                    self._direct_ok = False
                try:
                    fd = os.open(file, flags)
                except OSError as exc:
                    raise CheckpointError(f"cannot open file: {exc.strerror}", file=file) from exc
            self._fds[file] = fd
        for file, fd in self._fds.items():
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError("not a regular file", file=file)
            os.set_blocking(fd, True)
            self._identity[file] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        for s in self.layout.experts.values():
            for t in s.tensors:
                size = self._identity[t.file][2]
                if t.offset + t.nbytes > size:
                    raise CheckpointError(
                        f"expert {s.key} needs bytes up to {t.offset + t.nbytes} but the file has {size}",
                        file=t.file,
                        tensor=t.source,
                    )

    @property
    def direct_io(self) -> bool:
        """True when reads really bypass the page cache."""
        return self.mode == "direct" and self._direct_ok

    async def aclose(self) -> None:
        """:meth:`close` off the event loop (it joins the reader threads)."""
        try:
            await asyncio.to_thread(self.close)
        except RuntimeError:  # the loop's executor is gone (interpreter exit): close here, it is short then
            self.close()

    def close(self) -> None:
        """Release threads, maps and descriptors. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> NvmeTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sizes -----------------------------------------------------------------------------------

    def buffer_nbytes(self, key: ExpertKey | None = None) -> int:
        """Bytes a host buffer needs to receive an expert (``key``) or any expert (``None``) in this mode."""
        if self.mode == "mmap":
            return self.layout.spec(key).nbytes if key is not None else self.layout.max_expert_nbytes
        if key is not None:
            return max(self._plans[key].extent, self.layout.spec(key).nbytes)
        return read_need(self.layout, self.mode)

    # --- reads -----------------------------------------------------------------------------------

    def read_into(self, key: ExpertKey, buf: memoryview) -> int:
        """Read every tensor of ``key`` into ``buf`` (canonical layout); returns the expert's nbytes.

        Blocking; safe to call from several threads at once on different buffers.
        """
        if self._closed:
            raise StoreClosedError("NVMe tier is closed")
        spec = self.layout.spec(key)
        need = self.buffer_nbytes(key)
        if len(buf) < need:
            raise ExpertReadError(f"buffer of {len(buf)} bytes is smaller than the {need} needed", key=key)
        if buf.readonly:
            raise ExpertReadError("buffer is read-only", key=key)
        try:
            for file in {t.file for t in spec.tensors}:
                self._check_unchanged(file, key)
            if self.mode == "mmap":
                self._read_buffered(spec, buf)
            else:
                self._read_direct(spec, self._plans[key], buf)
        except OSError as exc:
            raise ExpertReadError(f"read failed: {exc.strerror or exc}", key=key) from exc
        if self.verify_checksums and spec.checksum is not None:
            got = spec_checksum(spec, buf)
            if got != spec.checksum:
                raise ChecksumError(
                    f"expert {key}: checksum {got:016x} != recorded {spec.checksum:016x} (corrupt pack file)",
                    file=spec.tensors[0].file,
                )
        elif self.checksums is not None and spec.checksum is None and self.checksums.get(key) is None:
            self.checksums.record(key, spec_checksum(spec, buf))
        self.reads += 1
        self.bytes_read += spec.nbytes
        return spec.nbytes

    def _check_unchanged(self, file: str, key: ExpertKey) -> None:
        """Refuse to read a file that was truncated, rewritten or replaced since it was opened."""
        st = os.fstat(self._fds[file])
        now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        was = self._identity[file]
        if now != was:
            what = f"size {was[2]} -> {st.st_size}" if st.st_size != was[2] else "modified in place"
            raise CheckpointChangedError(
                f"{file} changed since it was opened ({what}): its experts are no longer the ones this "
                "store serves; restart on the new checkpoint",
                key=key,
            )

    def _read_buffered(self, spec: ExpertSpec, buf: memoryview) -> None:
        for t, off in spec.views():
            got = os.preadv(self._fds[t.file], [buf[off : off + t.nbytes]], t.offset)
            if got < t.nbytes:
                raise ExpertReadError(
                    f"short read of {t.source} in {t.file}: {got} of {t.nbytes} bytes (file truncated?)",
                    key=spec.key,
                )

    def _read_direct(self, spec: ExpertSpec, plan: _Plan, buf: memoryview) -> None:
        if self._direct_ok and buffer_address(buf) % BLOCK:
            raise ExpertReadError(f"direct reads need a {BLOCK}-byte aligned buffer", key=spec.key)
        for run in plan.runs:
            dest = buf[run.buf_offset : run.buf_offset + run.length]
            got = os.preadv(self._fds[run.file], [dest], run.file_offset)
            last_needed = max(p + spec.tensors[i].nbytes for i, p in run.placed) - run.buf_offset
            if got < last_needed:
                raise ExpertReadError(
                    f"short read in {run.file}: {got} of {last_needed} bytes at offset {run.file_offset} "
                    "(file truncated?)",
                    key=spec.key,
                )
        if not plan.needs_move:
            return
        placed = [(i, p) for run in plan.runs for i, p in run.placed]
        if plan.in_place:
            base = buffer_address(buf)
            for i, raw in placed:  # ascending canonical offsets, each at or below its raw position
                if raw != spec.offsets[i]:
                    ctypes.memmove(base + spec.offsets[i], base + raw, spec.tensors[i].nbytes)
        else:
            staged = bytes(buf[: plan.extent])
            for i, raw in placed:
                n = spec.tensors[i].nbytes
                buf[spec.offsets[i] : spec.offsets[i] + n] = staged[raw : raw + n]

    def read_expert(self, key: ExpertKey) -> bytearray:
        """Convenience for tools: a fresh buffer holding the expert (not for the hot path)."""
        raw = mmap.mmap(-1, max(self.buffer_nbytes(key), 1))
        try:
            with memoryview(raw) as mv:
                n = self.read_into(key, mv)
                return bytearray(mv[:n])
        finally:
            raw.close()

    # --- async -----------------------------------------------------------------------------------

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem = asyncio.Semaphore(self.max_concurrent_reads)
            self._sem_loop = loop
        return self._sem

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise StoreClosedError("NVMe tier is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_concurrent_reads, thread_name_prefix="ef-nvme")
            return self._executor

    async def read(self, key: ExpertKey, buf: memoryview) -> int:
        """Async :meth:`read_into`, at most ``max_concurrent_reads`` at once.

        If the caller is cancelled, the read still runs to completion before the cancellation propagates,
        so the buffer is never written after the caller gets it back.
        """
        async with self._semaphore():
            fut = asyncio.get_running_loop().run_in_executor(self._pool(), self.read_into, key, buf)
            cancelled = False
            # A thread cannot be stopped: however often we are cancelled, wait for the read to end.
            while not fut.done():
                try:
                    await asyncio.shield(fut)
                except asyncio.CancelledError:
                    cancelled = True
                except BaseException:
                    break
            if cancelled:
                with contextlib.suppress(BaseException):
                    fut.result()  # the read's outcome no longer matters, only that it has ended
                raise asyncio.CancelledError
            return fut.result()

    async def read_many(self, items: Sequence[tuple[ExpertKey, memoryview]]) -> list[int]:
        """Read several experts concurrently (bounded); nbytes of each, in order.

        On the first failure (or cancellation) the other reads are cancelled, and this returns only once none
        of them can still write into its buffer; then the first failure is raised.
        """
        tasks = [asyncio.ensure_future(self.read(k, b)) for k, b in items]
        if not tasks:
            return []
        cancelled = False
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            cancelled = True
        if cancelled or any(t.done() and not t.cancelled() and t.exception() for t in tasks):
            for t in tasks:
                t.cancel()
        while not all(t.done() for t in tasks):
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
