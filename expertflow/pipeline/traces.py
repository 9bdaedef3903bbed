"""Routing traces: the file format, save/load (incl. the real Mixtral-8x7B traces in shared/traces), and the
recorder a running model fills. Replaying a trace through cache policies is the lab's
(:mod:`expertflow.lab.replay`).

A trace holds, per token and per MoE layer, the top-k expert ids and their router weights.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertflow.errors import ConfigError

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
