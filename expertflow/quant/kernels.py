"""``x @ W.T`` for a quantized ``W``: the weight is never dequantized on CPU.

CPU: products of large enough matrices go to ExpertFlow's own kernels (:mod:`expertflow.quant.native`,
activations quantized to int8, integer dot products, each row computed alike however many come together)
where the machine has them; smaller products and other machines to torch's ``_weight_int4pack_mm_for_cpu``
(group-wise int4, the layout of :mod:`expertflow.quant.scheme`) and ``_weight_int8pack_mm`` (per-channel
int8). All take activations in the dtype of the scales and give the same dtype.

CUDA: the slot holds the same bytes (packs and daemons carry one layout), already on the device; the expert is
dequantized there into a scratch matrix and multiplied densely (:func:`qlinear_dequantized`). Device memory
bandwidth makes that cheap next to the host-to-device copy the quantized bytes saved, and nothing goes back
to the host.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn import functional as F

from expertflow.quant import native
from expertflow.quant.scheme import QuantScheme, dequantize

#: Below this many weights a product is too small for the native kernels' fixed cost (a ctypes call, threads).
NATIVE_MIN_WEIGHTS = 1 << 18


def qlinear(
    x: torch.Tensor,
    parts: Mapping[str, torch.Tensor],
    scheme: QuantScheme,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``x [..., in] @ W.T -> [..., out]`` in the dtype of the scales (which the pack wrote in the compute dtype)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.device.type != "cpu":
        y = qlinear_dequantized(x2, parts, scheme, out_features, in_features)
    else:
        out_p, in_p = scheme.padded(out_features, in_features)
        if scheme.act_order:  # inputs in the stored (group) order of the weight's columns
            x2 = x2.index_select(1, parts["perm"].long())
        if in_p != in_features:  # zero columns of the stored weight meet zero inputs
            x2 = F.pad(x2, (0, in_p - in_features))
        scales = parts["qparams" if scheme.bits == 4 else "scales"]
        x2 = x2.to(scales.dtype)
        native_ok = (
            native.supports(x2, scales)
            and native.library() is not None
            and (native.forced() or out_p * in_p >= NATIVE_MIN_WEIGHTS)
        )
        if scheme.bits == 4:
            if native_ok:
                y = native.int4_matmul(x2, parts["qweight"], scales, scheme.group_size, out_p)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x2, parts["qweight"], scheme.group_size, scales
                )
        elif native_ok:
            y = native.int8_matmul(x2, parts["qweight"], scales)
        else:
            y = torch._weight_int8pack_mm(x2, parts["qweight"], scales)
        if out_p != out_features:
            y = y[:, :out_features]
    return y.reshape(*lead, out_features)


def qlinear_dequantized(
    x: torch.Tensor,
    parts: Mapping[str, torch.Tensor],
    scheme: QuantScheme,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``x [tokens, in] @ W.T`` with ``W`` dequantized where the parts are (the GPU path; device-agnostic, so the
    CPU tests run the same code). Returns the dtype of the scales, like the CPU kernels."""
    dtype = parts["qparams" if scheme.bits == 4 else "scales"].dtype
    weight = dequantize(parts, scheme, out_features, in_features).to(dtype)
    return F.linear(x.to(dtype), weight)
