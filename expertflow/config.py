"""StoreConfig: every knob of the expert store in one frozen, validated dataclass."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from expertflow.errors import ConfigError

ReadMode = Literal["auto", "mmap", "direct"]
PolicyName = Literal["lru", "lfu", "static", "predictive", "none"]
PredictorName = Literal["none", "lookahead", "stats", "combined"]

POLICIES: tuple[str, ...] = ("lru", "lfu", "static", "predictive", "none")
PREDICTORS: tuple[str, ...] = ("none", "lookahead", "stats", "combined")
READ_MODES: tuple[str, ...] = ("auto", "mmap", "direct")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "ki": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "mi": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "gi": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
    "ti": 1 << 40,
}


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``64GiB``, ``512MB``, ``1.5g`` or ``4096`` into bytes."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"cannot parse size {text!r}; use e.g. 512MiB, 8GiB or a byte count")
    number, unit = match.groups()
    unit = (unit or "").lower()
    if unit not in _UNITS:
        raise ConfigError(f"unknown size unit in {text!r}")
    return int(float(number) * _UNITS[unit])


def format_size(nbytes: float) -> str:
    """Human-readable binary size: ``1.50 GiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


RoutingName = Literal["exact", "cache-aware"]
ROUTINGS: tuple[str, ...] = ("exact", "cache-aware")


@dataclass(frozen=True)
class StoreConfig:
    """Budgets and behaviour of an :class:`~expertflow.ExpertStore`.

    ``device_slots``: expert slots on the compute device (on CPU a slot is a host buffer).
    ``host_bytes``: byte budget of the host-RAM buffer pool (never exceeded); None = sized from the memory
    available to the process (cgroup limit or MemAvailable) minus ``host_reserve_bytes`` (what the process
    still needs besides the pool, e.g. non-expert weights; ``load_model`` fills it in), reads in flight and a
    margin, capped at the experts' total.
    ``read_mode``: ``mmap`` (page cache) or ``direct`` (O_DIRECT, bypasses the page cache); ``auto`` (the
    default) reads ``direct`` when the budget cannot hold every expert (beyond RAM, a page-cache copy of each
    read would take memory from the pool and push out the process's own pages) and ``mmap`` when it can.
    ``policy``: eviction policy of the host and device tiers.
    ``predictor``: which experts to prefetch; ``prefetch_depth`` layers ahead (0 = adaptive).
    ``remote``: addresses of ``expertflow-store serve`` daemons, tried before NVMe.
    ``routing``: ``exact`` (the model's own routing) or ``cache-aware`` (lossy: see ``routing_margin``).
    ``embedding_from_file``: read the input embedding's rows from the checkpoint file as tokens need them
    instead of holding the table (exact; where the family's embedding is a plain, untied ``nn.Embedding``).
    ``context_tokens``: the prompt plus generated tokens the auto budget leaves room for (the KV cache and a
    prompt's forward pass, sized from the model's shape); longer requests still run, with less headroom.
    """

    device: str = "cpu"
    device_slots: int | None = None
    host_bytes: int | None = None
    read_mode: ReadMode = "auto"
    policy: PolicyName = "lru"
    predictor: PredictorName = "combined"
    prefetch_depth: int = 0
    max_prefetch_depth: int = 3
    max_concurrent_reads: int = 4
    max_inflight_bytes: int = 512 << 20
    fetch_timeout: float = 60.0
    verify_checksums: bool = True
    static_experts: tuple[tuple[int, int], ...] = ()
    remote: tuple[str, ...] = ()
    remote_replicas: int = 1
    remote_timeout: float = 5.0
    remote_retries: int = 2
    curve_server_key: str | None = None
    curve_client_secret: str | None = None
    host_reserve_bytes: int = 0
    # Lossy, opt-in: a token whose chosen expert is not resident uses a resident one whose router probability
    # is within ``routing_margin`` of it (Mixture of Cache-Conditional Experts). "exact" changes nothing.
    routing: RoutingName = "exact"
    routing_margin: float = 0.0
    embedding_from_file: bool = True
    context_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.read_mode not in READ_MODES:
            raise ConfigError(f"read_mode must be one of {READ_MODES}, got {self.read_mode!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.predictor not in PREDICTORS:
            raise ConfigError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.device_slots is not None and self.device_slots < 1:
            raise ConfigError(f"device_slots must be >= 1, got {self.device_slots}")
        if self.host_bytes is not None and self.host_bytes < 0:
            raise ConfigError(f"host_bytes must be >= 0, got {self.host_bytes}")
        if self.host_reserve_bytes < 0:
            raise ConfigError(f"host_reserve_bytes must be >= 0, got {self.host_reserve_bytes}")
        if self.prefetch_depth < 0 or self.max_prefetch_depth < 0:
            raise ConfigError("prefetch depths must be >= 0")
        if self.context_tokens < 1:
            raise ConfigError(f"context_tokens must be >= 1, got {self.context_tokens}")
        if self.max_concurrent_reads < 1:
            raise ConfigError("max_concurrent_reads must be >= 1")
        if self.max_inflight_bytes < 1:
            raise ConfigError("max_inflight_bytes must be >= 1")
        if self.fetch_timeout <= 0 or self.remote_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        if self.remote_replicas < 1:
            raise ConfigError("remote_replicas must be >= 1")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if not 0.0 <= self.routing_margin <= 1.0:
            raise ConfigError(
                f"routing_margin is a difference of router probabilities, in [0, 1]: {self.routing_margin}"
            )
        if self.remote_retries < 0:
            raise ConfigError("remote_retries must be >= 0")
        if isinstance(self.remote, str):
            raise ConfigError("remote must be a sequence of addresses, not one string")
        object.__setattr__(self, "remote", tuple(self.remote))
        for address in self.remote:
            check_endpoint(address, "remote")
        object.__setattr__(self, "static_experts", tuple(tuple(k) for k in self.static_experts))

    def with_(self, **changes: object) -> StoreConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def check_endpoint(address: str, what: str) -> None:
    """Refuse an address ZeroMQ cannot use, saying what one looks like (``localhost:5999`` lacks its scheme)."""
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ("tcp", "ipc") or not rest:
        raise ConfigError(f"{what} address {address!r}: expected tcp://host:port or ipc://path")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not (port.isdigit() or port == "*"):
            raise ConfigError(f"{what} address {address!r}: expected tcp://host:port")
