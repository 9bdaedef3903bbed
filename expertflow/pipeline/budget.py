"""How much host RAM the expert pool may take: measured from the machine, not guessed by the user.

The memory a process may use is the smallest of: its memory cgroup's limit (v2 ``memory.max`` or v1
``memory.limit_in_bytes``, the tightest along the hierarchy) and the machine's RAM. What is already taken in
the cgroup by anonymous memory (this process's runtime and anything else in the group) is not available; the
page cache is, but only in part: under a cgroup that charges it, the pages of memory-mapped reads compete with
the pool, so the budget leaves them room. From what is available the plan subtracts what the process still
has to allocate (non-expert weights, activations, I/O buffers) and a safety margin, and caps the result at
the experts' total size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from expertflow.config import format_size

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge number; v2 writes "max"

#: What the runtime itself grows by while it generates, beside the tensors it allocates (the allocator's free
#: lists, Python objects, torch's thread pools): measured as the growth of the resident set over a warm
#: generation of a loaded model (``tests/test_working_set.py``; 1-7 MiB on the presets), with room to spare.
#: The margin of every plan; what the model's forward allocates is reserved apart, from its shape
#: (:mod:`expertflow.model.working_set`).
RUNTIME_SLACK = 32 << 20


@dataclass(frozen=True)
class MemoryReading:
    """What the process may use, read from the kernel. Sizes in bytes."""

    total: int  # RAM of the machine (MemTotal)
    mem_available: int  # MemAvailable of the machine
    cgroup_limit: int | None  # the tightest memory cgroup limit, if any
    cgroup_anon: int | None  # anonymous memory charged to that cgroup (not reclaimable)
    cgroup_file: int | None  # page cache charged to that cgroup (reclaimable)
    source: str  # which limit applies, for messages
    #: File pages this process has mapped and resident (its libraries' code, Python's modules): page cache, so
    #: reclaimable in principle, but the process's own working set; evicted, they fault back in from disk.
    process_file: int = 0

    @property
    def available(self) -> int:
        """Bytes the process can still take without pushing out its own working set."""
        if self.cgroup_limit is None:
            return self.mem_available
        # Under a limit that charges the page cache, the process's own mapped files compete with the pool: leave
        # them their room (measured, ~100 MB for torch and transformers), or the kernel evicts the code the
        # process runs and every token faults it back in.
        in_group = self.cgroup_limit - (self.cgroup_anon or 0) - self.process_file
        return max(0, min(in_group, self.mem_available))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _memory_stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[name] = int(value)
    except OSError:
        pass
    return out


def _meminfo(proc: Path) -> tuple[int, int]:
    values = _kib_fields(proc / "meminfo")
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", total)


def _kib_fields(path: Path) -> dict[str, int]:
    """Sizes in bytes of a ``/proc`` file's ``Name:  N kB`` lines (``meminfo``, ``<pid>/status``); none if
    unreadable."""
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                out[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _cgroup_dirs(proc: Path, root: Path) -> list[tuple[str, Path]]:
    """(version, directory) of this process's memory cgroup, innermost first, then each ancestor."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    found: list[tuple[str, Path]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "" and (root / "cgroup.controllers").exists():
            version, base = "v2", root
        elif "memory" in controllers.split(","):
            version, base = "v1", root / "memory"
        else:
            continue
        path = base / rel.lstrip("/")
        while True:
            found.append((version, path))
            if path == base or base not in path.parents:
                break
            path = path.parent
    return found


def read_memory(proc: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup") -> MemoryReading:
    """Read the machine's and the tightest memory cgroup's limits (paths overridable for tests)."""
    proc, root = Path(proc), Path(cgroup_root)
    total, available = _meminfo(proc)
    best: tuple[int, str, Path] | None = None
    for version, path in _cgroup_dirs(proc, root):
        limit = _read_int(path / ("memory.max" if version == "v2" else "memory.limit_in_bytes"))
        if limit is not None and (best is None or limit < best[0]):
            best = (limit, version, path)
    if best is None:
        return MemoryReading(total, available, None, None, None, "MemAvailable of the machine")
    limit, version, path = best
    own = _kib_fields(proc / "self" / "status")
    process_file = own.get("RssFile", 0) + own.get("RssShmem", 0)
    stat = _memory_stat(path / "memory.stat")
    if version == "v2":
        anon, file = stat.get("anon"), stat.get("file")
    else:
        anon = stat.get("total_rss", stat.get("rss"))
        file = stat.get("total_cache", stat.get("cache"))
    return MemoryReading(
        total, available, limit, anon, file, f"memory cgroup {version} limit of {path}", process_file
    )


@dataclass(frozen=True)
class BudgetPlan:
    """A host budget with the reasoning behind it, for ``inspect`` and the ``generate`` summary."""

    host_bytes: int
    reason: str
    available: int | None = None
    reserved: dict[str, int] = field(default_factory=dict)
    fits: bool = True  # False: an explicit budget that leaves the process no memory headroom

    def describe(self) -> str:
        return f"{format_size(self.host_bytes)} ({self.reason})"


def plan_host_budget(
    experts_bytes: int,
    *,
    other_bytes: int = 0,
    io_bytes: int = 0,
    reading: MemoryReading | None = None,
    margin: int = RUNTIME_SLACK,
) -> BudgetPlan:
    """The default host budget: what the process may still use, minus what it still needs, capped.

    ``experts_bytes``: what holding every expert would take (slots x experts). ``other_bytes``: what the process
    will allocate besides the pool (non-expert weights not loaded yet, activations). ``io_bytes``: page cache
    the reads need in flight (memory-mapped reads land in the page cache before they are copied). ``margin``:
    what is kept unplanned for the runtime's own growth.
    """
    reading = reading or read_memory()
    available = reading.available
    reserved = {"other": other_bytes, "io": io_bytes, "margin": margin}
    room = available - other_bytes - io_bytes - margin
    if room >= experts_bytes:
        return BudgetPlan(
            experts_bytes,
            f"every expert fits: {format_size(available)} available ({reading.source})",
            available,
            reserved,
        )
    return BudgetPlan(
        max(0, room),
        f"{format_size(available)} available ({reading.source}) - {format_size(other_bytes)} other weights and "
        f"activations - {format_size(io_bytes)} reads in flight - {format_size(margin)} margin",
        available,
        reserved,
    )


def reads_in_flight_bytes(read_mode: str, max_concurrent_reads: int, slot_nbytes: int) -> int:
    """Page cache that buffered (``mmap`` mode) reads in flight occupy; direct reads bypass the page cache."""
    return max_concurrent_reads * slot_nbytes if read_mode == "mmap" else 0


def explicit_budget_warning(
    host_bytes: int, *, other_bytes: int = 0, io_bytes: int = 0, reading: MemoryReading | None = None
) -> str | None:
    """A message when an explicit budget cannot fit beside what else the process needs; None when it fits."""
    reading = reading or read_memory()
    need = host_bytes + other_bytes + io_bytes
    if need <= reading.available:
        return None
    return (
        f"host budget {format_size(host_bytes)} + {format_size(other_bytes)} other weights and activations + "
        f"{format_size(io_bytes)} reads in flight = {format_size(need)}, but only {format_size(reading.available)} "
        f"is available ({reading.source}): the process will swap or thrash. Leave the budget unset (or 'auto') "
        "to size it from the memory available"
    )
