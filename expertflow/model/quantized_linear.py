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

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from expertflow.quant import native
from expertflow.quant.kernels import NATIVE_MIN_WEIGHTS, qlinear
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
        self._fast: tuple[int, Any] | None = None  # (kernel-choice generation, the product plan) once planned

    def parts(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, f"weight_{s}") for s in self.suffixes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step calls each of these ~4 times a layer; the checks qlinear makes per call are made once
        # per module instead (re-made when the kernel choice changes), and the product goes straight to the
        # native kernel: the same call with the same arguments, so the same bits.
        fast = self._fast
        if fast is None or fast[0] != native.generation():
            fast = self._fast = (native.generation(), self._native_product())
        product = fast[1]
        if product is not None and x.dtype == product[0] and x.device.type == "cpu":
            y = product[1](x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        else:
            y = qlinear(x, self.parts(), self.scheme, self.out_features, self.in_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._fast = None  # the plan holds the tensors; .to() and friends replace them
        return super()._apply(fn, recurse)

    def _native_product(self) -> tuple[torch.dtype, Callable[[torch.Tensor], torch.Tensor]] | None:
        """``(input dtype, x2 -> y2)`` when every product of this module goes to the native kernels unchanged
        (what :func:`qlinear` would decide for any input of the scales' dtype on the CPU), else None."""
        parts = self.parts()
        scales = parts["qparams" if self.scheme.bits == 4 else "scales"]
        out_p, in_p = self.scheme.padded(self.out_features, self.in_features)
        if (
            scales.device.type != "cpu"
            or self.scheme.act_order
            or (out_p, in_p) != (self.out_features, self.in_features)
            or native.library() is None
            or not native.supports(scales, scales)
            or not (native.forced() or out_p * in_p >= NATIVE_MIN_WEIGHTS)
        ):
            return None
        qweight = parts["qweight"]
        if self.scheme.bits == 4:
            group, out = self.scheme.group_size, out_p
            return scales.dtype, lambda x2: native.int4_matmul(x2, qweight, scales, group, out)
        return scales.dtype, lambda x2: native.int8_matmul(x2, qweight, scales)

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
