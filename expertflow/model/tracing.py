"""Record the routing of a model loaded by :func:`expertflow.load_model` as a :class:`RoutingTrace`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from expertflow.pipeline.traces import RoutingTrace, TraceRecorder


class RoutingRecorder:
    """Attaches to every offloaded layer's route hook; ``finish()`` gives the trace (tokens in order)."""

    def __init__(self, model: Any, meta: Mapping[str, Any] | None = None) -> None:
        self._layers = dict(sorted(model.expert_layers.items()))
        if not self._layers:
            raise ValueError("model has no offloaded expert layers to record")
        num_experts = max(layer.num_experts for layer in self._layers.values())
        self._recorder = TraceRecorder(list(self._layers), num_experts, meta)
        for layer in self._layers.values():
            layer.route_hooks.append(self._hook)

    def _hook(self, layer: int, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        self._recorder.append(layer, index, weights)

    def finish(self) -> RoutingTrace:
        for layer in self._layers.values():
            if self._hook in layer.route_hooks:
                layer.route_hooks.remove(self._hook)
        return self._recorder.finish()
