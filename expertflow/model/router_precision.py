"""Routers of a quantized pack run in float32.

A pack written by ``expertflow pack --quantize`` is lossy by choice; its routers are not quantized (a router's
error changes which experts run), and in a bf16 or fp16 model they still round their logits to the model's
dtype. Held in float32 and fed float32 inputs, they pick experts closer to what the unrounded model would,
and the product is cheaper too: on the CPU, torch's bf16 product of a decode step's one row costs ~110 us a
layer inside the model (oneDNN's path, run cold after the experts' kernel) against ~30 us in float32, 1.8 ms
a token on a 16-layer model. transformers itself keeps about half the families' routers in float32
(``_keep_in_fp32_modules_strict``), and llama.cpp's GGUF files keep them in F32 too.

Only the router module changes: its weight (and bias) become float32 and its floating-point inputs are cast
on the way in, so the family's own routing code (softmax, top-k, normalisation, biases) runs unchanged on
float32 logits. Lossless loads (no pack) keep the checkpoint's routers untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

ROUTER_NAMES = ("gate", "router")


def find_router(block: nn.Module, num_experts: int) -> nn.Module | None:
    """The child of an MoE block that scores its ``num_experts`` experts: named ``gate`` or ``router``, with a
    2-D weight of one row per expert (not a shared expert's one-output gate)."""
    for name in ROUTER_NAMES:
        module = getattr(block, name, None)
        weight = getattr(module, "weight", None)
        is_scorer = isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[0] == num_experts
        if isinstance(module, nn.Module) and is_scorer:
            return module
    return None


def _cast(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


def _to_float32(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    # Routers take the hidden states first (positionally in every family seen); other arguments are rare.
    if args and not kwargs:
        return (_cast(args[0]), *args[1:]), kwargs
    return tuple(_cast(a) for a in args), {k: _cast(v) for k, v in kwargs.items()}


def float32_routers(
    model: nn.Module, experts_paths: Mapping[int, str], num_experts: Mapping[int, int]
) -> int:
    """Make the router of each offloaded layer (``experts_paths``: layer -> the experts module's path) run in
    float32; returns how many were changed (routers already in float32 are left alone)."""
    changed = 0
    for layer, path in experts_paths.items():
        block = model.get_submodule(path.rpartition(".")[0])
        router = find_router(block, num_experts[layer])
        weight = getattr(router, "weight", None)
        if router is None or not isinstance(weight, torch.Tensor):
            continue
        if weight.dtype == torch.float32 or not weight.is_floating_point():
            continue
        router.float()
        router.register_forward_pre_hook(_to_float32, with_kwargs=True)
        changed += 1
    return changed
