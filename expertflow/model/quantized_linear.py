"""Non-expert linears held quantized: attention projections and the output head of a pack written with
``pack --quantize ... --non-experts int8`` (or ``int4``).

Beyond RAM, every byte the non-expert weights keep resident is a byte the expert pool does not get: a 32k-token
output head in bf16 is 131 MB, the size of fifteen int4 experts of a 9 GB model. The weights stay in the
scheme's tensors (:mod:`expertflow.quant.scheme`) and are multiplied by torch's weight-only kernels
(:func:`expertflow.quant.kernels.qlinear`); they are never dequantized on the CPU. Lossy, opt-in, and measured
with ``expertflow eval ppl`` like quantized experts.

Routers are never quantized: a router's error changes which experts run, not only how close their outputs
are, and it is small.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from expertflow.quant.kernels import qlinear
from expertflow.quant.scheme import QuantScheme


class QuantizedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` in the tensors of ``scheme``; a drop-in for the ``nn.Linear`` it replaces."""

    def __init__(
        self,
        parts: Mapping[str, torch.Tensor],
        scheme: QuantScheme,
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.out_features = out_features
        self.in_features = in_features
        self.suffixes = tuple(parts)
        for suffix, tensor in parts.items():
            self.register_buffer(f"weight_{suffix}", tensor)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def parts(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, f"weight_{s}") for s in self.suffixes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = qlinear(x, self.parts(), self.scheme, self.out_features, self.in_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.name}"


def is_router(name: str, module: nn.Module, num_experts: int | None) -> bool:
    """Whether the linear at ``name`` scores experts (kept in full precision)."""
    leaf = name.rpartition(".")[2]
    out = getattr(module, "out_features", None)
    return (num_experts is not None and out == num_experts) or leaf in (
        "gate",
        "router",
        "shared_expert_gate",
    )


def quantizable_linears(
    model: nn.Module, skip_under: set[str], num_experts: int | None
) -> dict[str, tuple[int, int]]:
    """``{module path: (out, in)}`` of the plain ``nn.Linear`` modules a non-expert scheme may quantize: not
    inside an experts module (``skip_under``), not a router."""
    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or any(name == s or name.startswith(f"{s}.") for s in skip_under):
            continue
        if is_router(name, module, num_experts):
            continue
        out[name] = (module.out_features, module.in_features)
    return out
