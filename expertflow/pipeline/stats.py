"""StoreStats: the counters of one expert store, as a plain snapshot."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StoreStats:
    """Counters of one store. Updated under the store's lock; :meth:`AsyncExpertStore.stats` returns a copy.

    ``device_*`` count expert requests of compute (a hit: resident when asked). ``host_*`` count the host level
    when the device has its own slots. ``prefetch_*``: issued (queued), used (demanded after it landed or while
    loading), wasted (evicted unused), cancelled (stale, withdrawn), dropped (refused by admission control or
    the bounded queue) and ``prefetch_refused`` (of the dropped: below the read path's load, or no victim
    scored below the incoming expert). A prefetch refused before it was queued is not counted as issued.
    ``source_errors`` count reads a source failed and passed on; ``source_skips`` the reads a source declined
    without trying (a daemon's copy of an expert whose local checksum is not known yet).
    """

    device_hits: int = 0
    device_misses: int = 0
    joined_inflight: int = 0
    host_hits: int = 0
    host_misses: int = 0
    bytes_read: dict[str, int] = field(default_factory=dict)
    reads: dict[str, int] = field(default_factory=dict)
    source_errors: dict[str, int] = field(default_factory=dict)
    source_skips: dict[str, int] = field(default_factory=dict)
    bytes_uploaded: int = 0
    fill_transforms: int = 0  # slots converted after their fill (see AsyncExpertStore.set_fill_transform)
    fill_transform_seconds: float = 0.0
    evictions: int = 0
    stall_seconds: float = 0.0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    prefetch_cancelled: int = 0
    prefetch_dropped: int = 0
    prefetch_refused: int = 0
    read_errors: int = 0
    num_slots: int = 0
    host_buffers: int = 0
    host_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.device_hits + self.device_misses
        return self.device_hits / total if total else 0.0

    def count_read(self, source: str, nbytes: int) -> None:
        self.reads[source] = self.reads.get(source, 0) + 1
        self.bytes_read[source] = self.bytes_read.get(source, 0) + nbytes

    def count_source_error(self, source: str) -> None:
        self.source_errors[source] = self.source_errors.get(source, 0) + 1

    def count_source_skip(self, source: str) -> None:
        self.source_skips[source] = self.source_skips.get(source, 0) + 1

    def copy(self) -> StoreStats:
        return StoreStats(**asdict(self))

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d
