"""Wire a :class:`~expertflow.pipeline.predictor.Predictor` into a model loaded by ``load_model``.

The model side supplies what the predictor cannot know: for each MoE layer, its pre-router norm and its
router (the gate look-ahead), and the residual stream at the point a layer routes (captured by a pre-hook on
that layer's post-attention norm). After layer ``l`` routes, the predictor's keys for layers ``l+1..l+d`` are
prefetched, nearer layers at higher priority; stale prefetches are cancelled when a new forward starts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from expertflow.config import StoreConfig
from expertflow.model.moe_block import OffloadedExperts, SlotStore
from expertflow.model.router_precision import ROUTER_NAMES
from expertflow.pipeline.predictor import Gate, Predictor

log = logging.getLogger(__name__)

_NORM_NAMES = ("post_attention_layernorm", "post_feedforward_layernorm_pre", "ln_2")


def _router_weight(router: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    bias = getattr(router, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def find_gates(
    model: nn.Module, layers: Mapping[int, OffloadedExperts]
) -> tuple[dict[int, Gate], dict[int, nn.Module]]:
    """For each offloaded layer: ``norm -> router logits`` as a function of the residual stream, and the norm."""
    names = {id(m): n for n, m in model.named_modules()}
    gates: dict[int, Gate] = {}
    norms: dict[int, nn.Module] = {}
    for layer, experts in layers.items():
        path = names.get(id(experts), "")
        block_path, _, _ = path.rpartition(".")
        decoder_path, _, _ = block_path.rpartition(".")
        try:
            block = model.get_submodule(block_path)
            decoder = model.get_submodule(decoder_path)
        except AttributeError:
            continue
        norm = next(
            (getattr(decoder, n) for n in _NORM_NAMES if isinstance(getattr(decoder, n, None), nn.Module)),
            None,
        )
        router = next(
            (getattr(block, n) for n in ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)), None
        )
        wb = _router_weight(router) if router is not None else None
        if norm is None or wb is None:
            log.info("layer %d: no norm/router found for gate look-ahead; statistics only", layer)
            continue
        weight, bias = wb

        def gate(
            x: torch.Tensor, norm: nn.Module = norm, weight: torch.Tensor = weight, bias: Any = bias
        ) -> torch.Tensor:
            # norm.forward, not norm(x): the module's hooks (the predictor's capture of the residual stream)
            # are for the model's own forward, not for a look-ahead or a request's expert profile.
            return F.linear(norm.forward(x).to(weight.dtype), weight, bias)

        gates[layer] = gate
        norms[layer] = norm
    return gates, norms


#: Forward passes a predictor that found nothing worth prefetching sleeps through before it looks again.
DORMANT_PASSES = 32


def attach_predictor(
    model: nn.Module,
    layers: Mapping[int, OffloadedExperts],
    store: SlotStore,
    config: StoreConfig,
    top_k: int,
) -> Predictor | None:
    """Install prediction + prefetch on ``model`` whose offloaded ``layers`` use ``store``; the predictor or None."""
    if config.predictor == "none" or not layers:
        return None
    if store.num_slots >= len(store.layout.experts):
        log.info("every expert has a slot: nothing to predict, prefetch is off")
        return None
    if not store.budget.fits:
        # Admission would refuse every uncertain prefetch, and at the memory limit the look-ahead's own work
        # competes with reclaim: prediction would be pure cost.
        log.info("the host budget leaves no memory headroom: prediction and prefetch are off")
        return None
    gates, norms = find_gates(model, layers)
    predictor = Predictor(
        list(layers),
        {layer: m.num_experts for layer, m in layers.items()},
        top_k,
        mode=config.predictor,
        depth=config.prefetch_depth,
        max_depth=config.max_prefetch_depth,
        gates=gates,
    )
    residual: dict[int, torch.Tensor] = {}

    def capture(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            residual[layer] = args[0]

        return hook

    handles = [norm.register_forward_pre_hook(capture(layer)) for layer, norm in norms.items()]
    order = sorted(layers)
    first = order[0]
    # Skipped visits in a row, and forward passes left to sleep through (see below).
    run = {"skipped": 0, "asleep": 0}

    def on_route(layer: int, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        if run["asleep"]:
            # Dormant: two whole passes found no prediction worth a read, so the predictor does no work at
            # all (not even its bookkeeping, ~1.3 ms a token on 8 layers) until it wakes to look again.
            if layer == first:
                run["asleep"] -= 1
            predictor.doze()
            return
        if layer == first:
            keep = [k for k, _ in predictor.predict_cache]
            store.cancel_prefetches(keep)
        pos = order.index(layer)
        if pos > 0:
            predictor.record_stall(layers[order[pos - 1]].last_stalled)
        predictor.observe(layer, index)
        if store.prefetch_floor() > predictor.ceiling():
            # The read path is so busy that admission would refuse even the likeliest prediction: the gate
            # look-ahead would be pure cost, on the compute thread.
            predictor.skip()
            run["skipped"] += 1
            if run["skipped"] >= 2 * len(order):
                # Measured decode with prediction on was 1-3 % slower than without on the scale preset, where
                # nothing was ever admitted: the predictor switches itself off, and wakes every DORMANT_PASSES
                # forward passes to see whether the read path or its precision changed.
                run["skipped"], run["asleep"] = 0, DORMANT_PASSES
            return
        run["skipped"] = 0
        state = residual.get(layer, hidden)
        preds = predictor.predict(layer, state)
        predictor.predict_cache = preds
        store.prefetch_ranked(preds)

    for m in layers.values():
        m.route_hooks.append(on_route)
    # Prefetch admission compares these scores, whatever the eviction policy; "predictive" evicts by them too.
    store.set_scorer(predictor.scores)
    model.__dict__["_expertflow_prefetch_hooks"] = handles  # kept alive with the model
    return predictor
