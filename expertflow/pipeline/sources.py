"""The source chain: where a missing expert's bytes come from, in order (expert daemons, then NVMe).

A read goes to the first source; a source that fails for reasons of its own (a daemon down, a reply with bad
bytes) is counted and the next source is tried. The last source's failure is the read's failure. The chain
owns its sources and closes them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from expertflow.core import ExpertKey
from expertflow.errors import (
    ChecksumError,
    ConfigError,
    ExpertReadError,
    RemoteError,
    UnverifiableExpertError,
)
from expertflow.pipeline.stats import StoreStats
from expertflow.tiers.base import ExpertSource

log = logging.getLogger(__name__)


class SourceChain:
    """Ordered, owned :class:`ExpertSource` s with fall-through on remote and checksum failures."""

    def __init__(self, sources: Sequence[ExpertSource]) -> None:
        if not sources:
            raise ConfigError("an expert store needs at least one source of expert bytes")
        self.sources: tuple[ExpertSource, ...] = tuple(sources)
        self._closed = False
        # Time during which at least one read was in flight: how busy the read path is (see busy_seconds).
        self._inflight = 0
        self._busy_since = 0.0
        self._busy_total = 0.0
        self._warned: set[tuple[str, str]] = set()  # (source, error kind) already logged as a warning

    def buffer_needs(self) -> list[int]:
        """Bytes each source needs in a buffer to receive any expert (inputs to ``core.slot_nbytes``)."""
        return [s.buffer_nbytes() for s in self.sources]

    def busy_seconds(self) -> float:
        """Seconds so far with at least one read in flight (monotonic; compare two calls for a rate)."""
        if self._inflight:
            return self._busy_total + time.monotonic() - self._busy_since
        return self._busy_total

    async def read(self, key: ExpertKey, buf: memoryview, stats: StoreStats) -> int:
        """Fill ``buf`` with ``key`` from the first source that can; returns the expert's byte count."""
        if self._inflight == 0:
            self._busy_since = time.monotonic()
        self._inflight += 1
        try:
            return await self._read(key, buf, stats)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._busy_total += time.monotonic() - self._busy_since

    async def _read(self, key: ExpertKey, buf: memoryview, stats: StoreStats) -> int:
        last: BaseException | None = None
        for source in self.sources:
            try:
                n = await source.read(key, buf)
            except UnverifiableExpertError as exc:
                if source is self.sources[-1]:
                    raise
                stats.count_source_skip(source.name)
                last = exc
                continue
            except (RemoteError, ChecksumError) as exc:
                if source is self.sources[-1]:
                    raise
                stats.count_source_error(source.name)
                kind = (source.name, getattr(exc, "code", None) or type(exc).__name__)
                level = logging.DEBUG if kind in self._warned else logging.WARNING
                self._warned.add(kind)
                log.log(level, "source %s failed for %s: %s; trying the next source", source.name, key, exc)
                last = exc
                continue
            stats.count_read(source.name, n)
            return n
        raise ExpertReadError(f"every source failed; last error: {last}", key=key)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self.sources:
            try:
                await s.aclose()
            except Exception:  # closing must go on for the others
                log.exception("closing source %s failed", s.name)
