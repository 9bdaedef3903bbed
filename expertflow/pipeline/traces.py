"""Routing traces: record, save/load (incl. the real Mixtral-8x7B traces in shared/traces), and replay.

A trace holds, per token and per MoE layer, the top-k expert ids and their router weights. Replay runs
an eviction policy over the access sequence a decoding engine would produce, at a given cache capacity.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertflow.errors import ConfigError
from expertflow.pipeline.policy import (
    BeladyPolicy,
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    PredictivePolicy,
    StaticPolicy,
)
from expertflow.tiers.layout import ExpertKey

FORMAT = "expertflow-trace-v1"


@dataclass
class RoutingTrace:
    """``experts`` int16 ``[tokens, layers, k]``; ``weights`` float32 same shape; ``layer_ids`` model layer of each."""

    experts: np.ndarray
    weights: np.ndarray
    layer_ids: tuple[int, ...]
    num_experts: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.experts.ndim != 3:
            raise ConfigError(f"trace experts must be [tokens, layers, k], got shape {self.experts.shape}")
        if self.weights.shape != self.experts.shape:
            raise ConfigError(f"trace weights {self.weights.shape} do not match experts {self.experts.shape}")
        if len(self.layer_ids) != self.experts.shape[1]:
            raise ConfigError(f"{len(self.layer_ids)} layer ids for {self.experts.shape[1]} trace layers")
        if self.experts.size and (self.experts.min() < 0 or self.experts.max() >= self.num_experts):
            raise ConfigError(f"trace expert ids outside [0, {self.num_experts})")

    @property
    def tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])


def save(trace: RoutingTrace, path: str | Path) -> Path:
    meta = {
        "format": FORMAT,
        "layer_ids": list(trace.layer_ids),
        "num_experts": trace.num_experts,
        **trace.meta,
    }
    path = Path(path)
    with open(path, "wb") as f:
        np.savez_compressed(
            f,
            experts=trace.experts.astype(np.int16),
            weights=trace.weights.astype(np.float32),
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
    return path


def load(path: str | Path) -> dict[str, RoutingTrace]:
    """Traces in a file: ExpertFlow's own format (one trace, named by the file) or the shared Mixtral npz."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read trace file {path}: {exc}") from exc
    with data:
        names = set(data.files)
        if {"experts", "weights", "meta"} <= names:
            try:
                meta = json.loads(bytes(data["meta"]).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"trace {path} has unreadable metadata") from exc
            if meta.get("format") != FORMAT:
                raise ConfigError(f"trace {path} has format {meta.get('format')!r}, expected {FORMAT}")
            layer_ids = tuple(int(x) for x in meta.pop("layer_ids"))
            num_experts = int(meta.pop("num_experts"))
            meta.pop("format")
            trace = RoutingTrace(
                data["experts"].astype(np.int16),
                data["weights"].astype(np.float32),
                layer_ids,
                num_experts,
                meta,
            )
            return {path.stem: trace}
        seqs = sorted(n[: -len("_experts")] for n in names if n.endswith("_experts"))
        if not seqs:
            raise ConfigError(f"{path} is not a routing trace (no experts arrays)")
        out = {}
        for s in seqs:
            if f"{s}_weights" not in names:
                raise ConfigError(f"trace {path}: {s}_experts has no {s}_weights")
            experts = data[f"{s}_experts"].astype(np.int16)
            weights = data[f"{s}_weights"].astype(np.float32)
            n_exp = max(8, int(experts.max()) + 1) if experts.size else 8
            out[s] = RoutingTrace(
                experts, weights, tuple(range(experts.shape[1])), n_exp, {"source": str(path)}
            )
        return out


class TraceRecorder:
    """Collects routing as a model runs: ``append(layer, ids [tokens,k], weights)`` per MoE layer per forward."""

    def __init__(
        self, layer_ids: Sequence[int], num_experts: int, meta: Mapping[str, Any] | None = None
    ) -> None:
        self.layer_ids = tuple(layer_ids)
        self._pos = {lid: i for i, lid in enumerate(self.layer_ids)}
        self.num_experts = num_experts
        self.meta = dict(meta or {})
        self._rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)

    def append(self, layer: int, expert_ids: Any, weights: Any) -> None:
        ids = np.asarray(expert_ids.detach().cpu() if hasattr(expert_ids, "detach") else expert_ids)
        w = np.asarray(weights.detach().float().cpu() if hasattr(weights, "detach") else weights)
        if layer not in self._pos:
            raise ConfigError(f"layer {layer} is not a MoE layer of this trace")
        self._rows[layer].append((ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1])))

    def finish(self) -> RoutingTrace:
        per_layer = []
        for lid in self.layer_ids:
            rows = self._rows.get(lid, [])
            if not rows:
                raise ConfigError(f"no routing recorded for layer {lid}")
            per_layer.append((np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])))
        tokens = {p[0].shape[0] for p in per_layer}
        if len(tokens) != 1:
            raise ConfigError(f"layers recorded different token counts: {sorted(tokens)}")
        experts = np.stack([p[0] for p in per_layer], axis=1).astype(np.int16)
        weights = np.stack([p[1] for p in per_layer], axis=1).astype(np.float32)
        return RoutingTrace(experts, weights, self.layer_ids, self.num_experts, self.meta)


def access_sequence(trace: RoutingTrace) -> list[ExpertKey]:
    """The order in which decoding touches experts: token by token, layer by layer, unique per (token, layer)."""
    seq = []
    for t in range(trace.tokens):
        for li, lid in enumerate(trace.layer_ids):
            for e in dict.fromkeys(int(x) for x in trace.experts[t, li]):
                seq.append(ExpertKey(lid, e))
    return seq


@dataclass
class ReplayResult:
    policy: str
    capacity: int
    hits: int
    misses: int
    per_layer: dict[int, float]

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


class _OnlineStats:
    """Routing statistics learned from the past of the trace only: the honest input of the predictive policy."""

    def __init__(self) -> None:
        self.next_layer: dict[ExpertKey, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.prev: dict[int, set[int]] = {}
        self.current: dict[int, set[int]] = {}

    def score(self, key: ExpertKey) -> float:
        s = 0.0
        # experts of the previous token at the same layer tend to come back
        if key.expert in self.prev.get(key.layer, ()):
            s += 0.5
        # transitions from the experts chosen at the layer before, for the current token
        before = self.current.get(key.layer - 1, set())
        total = 0.0
        for e in before:
            row = self.next_layer[ExpertKey(key.layer - 1, e)]
            n = sum(row.values())
            if n:
                total += row.get(key.expert, 0.0) / n
        if before:
            s += total / len(before)
        return s

    def observe_token(self, routing: Mapping[int, set[int]]) -> None:
        layers = sorted(routing)
        for a, b in itertools.pairwise(layers):
            for e in routing[a]:
                for f in routing[b]:
                    self.next_layer[ExpertKey(a, e)][f] += 1.0
        self.prev = {lid: set(es) for lid, es in routing.items()}


def replay(
    trace: RoutingTrace,
    policy: str,
    capacity_per_layer: int,
    *,
    partitioned: bool = False,
    static_profile: Mapping[ExpertKey, float] | None = None,
) -> ReplayResult:
    """Simulate a cache of ``capacity_per_layer * layers`` experts (or one of that size per layer)."""
    seq = access_sequence(trace)
    n_layers = trace.num_layers

    def build(cap: int, future: Sequence[ExpertKey]) -> EvictionPolicy:
        if policy == "lru":
            return LRUPolicy()
        if policy == "lfu":
            return LFUPolicy()
        if policy == "static":
            counts = static_profile or _counts(seq)
            return StaticPolicy.from_counts(counts, cap)
        if policy == "predictive":
            return PredictivePolicy(stats.score, num_layers=n_layers)
        if policy == "belady":
            return BeladyPolicy(future)
        raise ConfigError(f"unknown policy {policy!r}")

    stats = _OnlineStats()
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, k in enumerate(seq):
        groups[k.layer if partitioned else 0].append(i)
    caches: dict[Any, tuple[EvictionPolicy, set[ExpertKey], int]] = {}
    for g, idx in groups.items():
        cap = capacity_per_layer if partitioned else capacity_per_layer * n_layers
        caches[g] = (build(cap, [seq[i] for i in idx] if partitioned else seq), set(), cap)
    local_pos: dict[Any, int] = defaultdict(int)
    hits = misses = 0
    layer_hits: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    routing: dict[int, set[int]] = {}
    last_layer = -1
    for key in seq:
        if key.layer < last_layer:  # a new token starts
            stats.observe_token(routing)
            routing = {}
            stats.current = {}
        last_layer = key.layer
        g = key.layer if partitioned else 0
        pol, resident, cap = caches[g]
        if isinstance(pol, BeladyPolicy):
            pol.advance(local_pos[g])
        local_pos[g] += 1
        if key in resident:
            hits += 1
            layer_hits[key.layer][0] += 1
            pol.on_access(key)
        else:
            misses += 1
            layer_hits[key.layer][1] += 1
            if len(resident) >= cap:
                victim = pol.choose_victim(sorted(resident))
                if victim is not None:
                    resident.discard(victim)
                    pol.on_remove(victim)
            resident.add(key)
            pol.on_insert(key)
            pol.on_access(key)
        routing.setdefault(key.layer, set()).add(key.expert)
        stats.current.setdefault(key.layer, set()).add(key.expert)
    per_layer = {lid: h / (h + m) if h + m else 0.0 for lid, (h, m) in sorted(layer_hits.items())}
    return ReplayResult(policy, capacity_per_layer, hits, misses, per_layer)


def _counts(seq: Iterable[ExpertKey]) -> dict[ExpertKey, float]:
    counts: dict[ExpertKey, float] = defaultdict(float)
    for k in seq:
        counts[k] += 1
    return counts


def compare_policies(
    traces: Mapping[str, RoutingTrace],
    capacities: Sequence[int] = (2, 3, 4, 6),
    policies: Sequence[str] = ("lru", "lfu", "static", "predictive", "belady"),
    *,
    partitioned: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Hit rate of every policy at every per-layer capacity, summed over the traces, beside Belady's."""
    rows = []
    for cap in capacities:
        totals: dict[str, list[int]] = {p: [0, 0] for p in policies}
        for name, tr in traces.items():
            if progress:
                progress(f"capacity {cap}: {name}")
            # The static profile comes from the other traces: profiling on the evaluated trace would cheat.
            others = [access_sequence(t) for n, t in traces.items() if n != name] or [access_sequence(tr)]
            profile = _counts(k for s in others for k in s)
            for p in policies:
                r = replay(tr, p, cap, partitioned=partitioned, static_profile=profile)
                totals[p][0] += r.hits
                totals[p][1] += r.misses
        rates = {p: h / (h + m) if h + m else 0.0 for p, (h, m) in totals.items()}
        row: dict[str, Any] = {"capacity": cap}
        row.update({p: rates[p] for p in policies})
        if rates.get("belady"):
            row.update({f"{p}/belady": rates[p] / rates["belady"] for p in policies if p != "belady"})
        rows.append(row)
    return rows
