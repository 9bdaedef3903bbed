"""Weight-only quantization of expert matrices: the schemes, their on-disk tensors, quantize and dequantize.

A weight ``W`` of ``out x in`` (``y = x @ W.T``) becomes, per scheme:

* ``int4`` (group-wise, asymmetric): ``qweight`` U8 ``[out, in/2]`` in the layout torch's CPU kernel
  ``_weight_int4pack_mm_for_cpu`` reads (``_convert_weight_to_int4pack_for_cpu``: rows in blocks of 64, the
  low nibble row ``j`` and the high nibble row ``j + 32`` of a block, k-major inside it; a tail of fewer than
  64 rows pairs adjacent rows), and ``qparams`` ``[in/group, out, 2]`` of (scale, zero) in the compute dtype.
  A code ``q`` in 0..15 means ``(q - 8) * scale + zero``.
* ``int8`` (per output channel, symmetric): ``qweight`` I8 ``[out, in]`` (columns padded to 16) and ``scales``
  ``[out]`` in the compute dtype, as ``_weight_int8pack_mm`` reads them: ``q * scale``. torch has no grouped
  int8 CPU kernel, so the group is the whole row.

Round-to-nearest is the baseline; ``method="hqq"`` refines each int4 group's scale and zero by a few
half-quadratic steps that minimise the weight error under an l_p (p < 1) loss, training-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from expertflow.core import round_up
from expertflow.errors import CheckpointError, ConfigError

INT4_GROUP_SIZES = (32, 64, 128, 256)
METHODS = ("rtn", "hqq")
_BLOCK_N = 64  # rows per block of the CPU int4 layout


@dataclass(frozen=True)
class QuantScheme:
    """How an expert's weight matrices are quantized. ``group_size`` 0 means one group per output row."""

    bits: int
    group_size: int
    method: str = "rtn"
    # Input channels stored in group order (GPTQ act-order): a ``perm`` part gives the order, applied to inputs.
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"{self.bits}-bit experts are not supported: use 4 or 8")
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.bits == 4 and self.group_size not in INT4_GROUP_SIZES:
            raise ConfigError(
                f"int4 group size {self.group_size} is not one torch's int4 kernel takes: "
                f"{', '.join(map(str, INT4_GROUP_SIZES))}"
            )
        if self.bits == 8 and self.group_size != 0:
            raise ConfigError(
                "int8 experts are quantized per output channel (torch's int8 kernel has no groups): "
                "leave --group-size out"
            )
        if self.act_order and self.bits != 4:
            raise ConfigError("act-order (g_idx) weights are supported at 4 bits")
        if self.bits == 8 and self.method != "rtn":
            raise ConfigError("the hqq refinement is for int4; int8 is round-to-nearest")

    @property
    def name(self) -> str:
        group = f"-g{self.group_size}" if self.group_size else ""
        method = "" if self.method == "rtn" else f"-{self.method}"
        return f"int{self.bits}{group}{method}{'-actorder' if self.act_order else ''}"

    def layout_name(self) -> str:
        return "torch-cpu-int4pack" if self.bits == 4 else "int8-per-channel"

    def suffixes(self) -> tuple[str, ...]:
        """Names of the tensors a quantized weight becomes (``<param>.<suffix>`` in a pack)."""
        if self.bits == 8:
            return ("qweight", "scales")
        return ("qweight", "qparams", "perm") if self.act_order else ("qweight", "qparams")

    def padded(self, out_features: int, in_features: int) -> tuple[int, int]:
        """The stored ``(out, in)`` of a weight: int4 pads rows to 16 and columns to the group size with zeros
        (the kernel's constraints), so that any shape can be held; the padding never reaches the output."""
        if self.bits == 8:
            # torch's bf16 int8 kernel reads past the row when in % 16 != 0 (it crashes): pad like int4.
            return out_features, round_up(in_features, 16)
        return round_up(out_features, 16), round_up(in_features, self.group_size)

    def parts(
        self, out_features: int, in_features: int, dtype: str
    ) -> list[tuple[str, str, tuple[int, ...]]]:
        """(suffix, safetensors dtype, shape) of the tensors an ``out x in`` weight becomes, in order."""
        out_p, in_p = self.padded(out_features, in_features)
        if self.bits == 4:
            parts = [
                ("qweight", "U8", (out_p, in_p // 2)),
                ("qparams", dtype, (in_p // self.group_size, out_p, 2)),
            ]
            return [*parts, ("perm", "I32", (in_features,))] if self.act_order else parts
        return [("qweight", "I8", (out_p, in_p)), ("scales", dtype, (out_p,))]

    def layout_json(self, dtype: str) -> dict[str, str]:
        """What the pack's bytes of a weight are, for people reading a manifest (``dtype``: of the scales)."""
        if self.bits == 8:
            return {
                "layout": self.layout_name(),
                "qweight": "I8 [out, in padded to 16]: w = qweight * scales",
                "scales": f"{dtype} [out]",
            }
        out = {
            "layout": self.layout_name(),
            "qweight": "U8 [out padded to 16, in padded to the group / 2], as _convert_weight_to_int4pack_for_cpu "
            "packs codes 0..15",
            "qparams": f"{dtype} [in / group, out, 2]: (scale, zero), w = (q - 8) * scale + zero",
        }
        if self.act_order:
            out["perm"] = "I32 [in]: input channel of each stored column"
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size, "method": self.method}
        if self.act_order:
            out["act_order"] = True
        return out

    @classmethod
    def from_json(cls, data: object, where: str) -> QuantScheme:
        if not isinstance(data, Mapping):
            raise CheckpointError("manifest 'quantization' is not an object", file=where)
        try:
            bits, group, method = data["bits"], data["group_size"], data.get("method", "rtn")
            act_order = data.get("act_order", False)
            if not (
                isinstance(bits, int)
                and isinstance(group, int)
                and isinstance(method, str)
                and isinstance(act_order, bool)
            ):
                raise TypeError
            return cls(bits, group, method, act_order)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"manifest 'quantization' {dict(data)!r} is not a scheme", file=where
            ) from exc
        except ConfigError as exc:
            raise CheckpointError(f"manifest 'quantization': {exc}", file=where) from exc


# --- the CPU int4 layout --------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` codes 0..15 -> the U8 ``[out, in/2]`` tensor the CPU int4 kernel reads."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def unpack_int4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The codes (int32 ``[out, in]``) of a CPU int4 tensor; the inverse of :func:`pack_int4`. Runs on the device
    ``packed`` is on (a slot on a GPU is unpacked there)."""
    flat = packed.reshape(-1).to(torch.int32)
    codes = torch.empty(out_features, in_features, dtype=torch.int32, device=packed.device)
    full = out_features // _BLOCK_N * _BLOCK_N
    half = _BLOCK_N // 2
    if full:
        blocks = flat[: full * in_features // 2].view(full // _BLOCK_N, in_features, half)
        both = torch.cat([blocks & 0xF, blocks >> 4], dim=2)  # [block, in, 64]: rows j and j + 32
        codes[:full] = both.permute(0, 2, 1).reshape(full, in_features)
    tail = out_features - full
    if tail:
        rest = flat[full * in_features // 2 :].view(in_features, tail // 2)
        pairs = torch.stack([rest & 0xF, rest >> 4], dim=2)  # [in, tail/2, 2]: rows 2i and 2i + 1
        codes[full:] = pairs.reshape(in_features, tail).T
    return codes


# --- quantize / dequantize -----------------------------------------------------------------------


def quantize(weight: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The scheme's tensors for ``weight`` (``[out, in]``); scales and zeros in ``dtype`` (the compute dtype)."""
    w = weight.detach().to(torch.float32)
    out_features, in_features = w.shape
    out_p, in_p = scheme.padded(out_features, in_features)
    if (out_p, in_p) != (out_features, in_features):
        w = torch.nn.functional.pad(w, (0, in_p - in_features, 0, out_p - out_features))
        out_features, in_features = out_p, in_p
    if scheme.bits == 8:
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        scale = scale.to(dtype).to(torch.float32)  # the kernel sees the rounded scale: quantize against it
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scale.to(dtype)}
    groups = w.view(out_features, in_features // scheme.group_size, scheme.group_size)
    scale, zero = _minmax_params(groups)
    if scheme.method == "hqq":
        scale, zero = _hqq_refine(groups, scale, zero)
    scale, zero = scale.to(dtype).to(torch.float32), zero.to(dtype).to(torch.float32)
    codes = _codes(groups, scale, zero).view(out_features, in_features)
    qparams = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return {"qweight": pack_int4(codes), "qparams": qparams}


def _minmax_params(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    return scale, lo + 8 * scale


def _codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.int32)


def _hqq_refine(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, steps: int = 20, p: float = 0.7
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-quadratic refinement of each group's zero (scale kept): alternate a shrinkage of the residual
    under an l_p loss with the closed-form zero for the current codes; keep the best zero per group."""
    beta, kappa = 1e1, 1.01
    best_zero = zero.clone()
    best_err = _group_error(groups, scale, zero)
    for _ in range(steps):
        codes = _codes(groups, scale, zero).to(torch.float32)
        deq = (codes - 8) * scale[..., None] + zero[..., None]
        resid = groups - deq
        # Generalised soft-thresholding: the proximal step of |e|^p.
        shrunk = torch.sign(resid) * torch.relu(
            resid.abs() - (1 / beta) * resid.abs().clamp(min=1e-8).pow(p - 1)
        )
        zero = (groups - shrunk - (codes - 8) * scale[..., None]).mean(dim=-1)
        err = _group_error(groups, scale, zero)
        better = err < best_err
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
        beta *= kappa
    return scale, best_zero


def _group_error(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    deq = (_codes(groups, scale, zero).to(torch.float32) - 8) * scale[..., None] + zero[..., None]
    return (groups - deq).pow(2).sum(dim=-1)


def dequantize(
    parts: Mapping[str, torch.Tensor], scheme: QuantScheme, out_features: int, in_features: int
) -> torch.Tensor:
    """The float32 ``[out, in]`` weight the kernel computes with, on the device the parts are on."""
    if scheme.bits == 8:
        deq = parts["qweight"].to(torch.float32) * parts["scales"].to(torch.float32)[:, None]
        return deq[:out_features, :in_features]
    out_p, in_p = scheme.padded(out_features, in_features)
    codes = unpack_int4(parts["qweight"], out_p, in_p).to(torch.float32)
    qp = parts["qparams"].to(torch.float32)  # [groups, out, 2]
    scale = qp[..., 0].T.repeat_interleave(scheme.group_size, dim=1)
    zero = qp[..., 1].T.repeat_interleave(scheme.group_size, dim=1)
    stored = ((codes - 8) * scale + zero)[:out_features, :in_features]
    if not scheme.act_order:
        return stored
    # Column j of the stored weight is input channel perm[j].
    weight = torch.empty_like(stored)
    weight[:, parts["perm"].long()] = stored
    return weight


def check_tensors(
    scheme: QuantScheme, tensors: Mapping[str, tuple[str, tuple[int, ...], str]], *, file: str
) -> None:
    """Raise :class:`CheckpointError` unless the quantized tensors of one expert are what ``scheme`` makes.

    ``tensors``: role -> (safetensors dtype, shape, source name). Every ``<param>.qweight`` must come with the
    scheme's other parts, with the dtypes and shapes the scheme gives a weight of that size.
    """
    quantized = sorted(r[: -len(".qweight")] for r in tensors if r.endswith(".qweight"))
    if not quantized:
        raise CheckpointError(
            f"the manifest says {scheme.name}, but no expert tensor is quantized", file=file
        )
    for param in quantized:
        _, shape, source = tensors[f"{param}.qweight"]
        if len(shape) != 2:
            raise CheckpointError(
                f"{param}.qweight has shape {list(shape)}, not a matrix", file=file, tensor=source
            )
        out_features = shape[0]
        in_features = shape[1] * 2 if scheme.bits == 4 else shape[1]
        scales_dtype = tensors.get(f"{param}.{scheme.suffixes()[1]}", ("BF16",))[0]
        if scheme.padded(out_features, in_features) != (out_features, in_features):
            raise CheckpointError(
                f"{param}.qweight {list(shape)} is not a shape {scheme.name} stores (int4 pads rows to 16 and "
                "columns to the group size, int8 columns to 16)",
                file=file,
                tensor=source,
            )
        expected = scheme.parts(out_features, in_features, scales_dtype)
        for suffix, want_dtype, want_shape in expected:
            role = f"{param}.{suffix}"
            got = tensors.get(role)
            if got is None:
                raise CheckpointError(f"{scheme.name} weight {param} has no {role}", file=file, tensor=source)
            if got[0] != want_dtype or tuple(got[1]) != want_shape:
                raise CheckpointError(
                    f"{role} is {got[0]} {list(got[1])}, but {scheme.name} stores a {out_features}x{in_features} "
                    f"weight as {want_dtype} {list(want_shape)}: the manifest's scheme does not match its bytes",
                    file=file,
                    tensor=got[2],
                )
        if scales_dtype not in ("F32", "BF16", "F16"):
            raise CheckpointError(
                f"{param} scales are {scales_dtype}, not a float type", file=file, tensor=source
            )
