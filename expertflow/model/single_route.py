"""One row through one expert of an unquantized experts module, with the bits of transformers' grouped forward.

A decode step sends one row to each of a layer's experts, each expert computed alone (see
:class:`~expertflow.model.moe_block.OffloadedExperts`). transformers' ``grouped_mm`` forward spends about twenty
small ops per call on grouping (sort, histogram, offsets, gathers, a weighting by one, a sum over one route)
that one row makes exact no-ops; fine-grained models make a few hundred such calls a token. This path makes the
same two ``_grouped_linear`` calls on the same operands (a one-expert view of the slot, offsets ``[1]``), with the
family's own gate or activation between them, and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.integrations import moe as hf_moe

#: The expert implementation whose bits this path reproduces.
IMPLEMENTATION = "grouped_mm"

_ONE_GROUP = torch.ones(1, dtype=torch.int32)  # cumulative rows per expert: one expert, one row


def supported(module: nn.Module, views: Mapping[str, Any], implementation: str) -> bool:
    """Whether :func:`single_route` computes this module: transformers' grouped forward, weights as slot tensors,
    no biases, no post-expert norm and no expert-parallel sentinels to mask."""
    up = "gate_up_proj" if getattr(module, "has_gate", False) else "up_proj"
    return (
        implementation == IMPLEMENTATION
        and callable(getattr(hf_moe, "_grouped_linear", None))
        and not getattr(module, "has_bias", True)
        and not getattr(module, "has_post_expert_norm", True)
        and isinstance(views.get(up), torch.Tensor)
        and isinstance(views.get("down_proj"), torch.Tensor)
        and set(views) == {up, "down_proj"}
    )


def single_route(module: Any, views: Mapping[str, torch.Tensor], x: torch.Tensor, slot: int) -> torch.Tensor:
    """What the grouped forward gives one row ``x [1, hidden]`` routed, with a unit weight, to the expert in
    ``slot`` (see the module docstring)."""
    offsets = _ONE_GROUP if x.device.type == "cpu" else _ONE_GROUP.to(x.device)
    up = views["gate_up_proj" if module.has_gate else "up_proj"][slot : slot + 1]
    h = hf_moe._grouped_linear(x, up, offsets, is_transposed=module.is_transposed)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    down = views["down_proj"][slot : slot + 1]
    out = hf_moe._grouped_linear(h, down, offsets, is_transposed=module.is_transposed)
    return out.to(x.dtype)
