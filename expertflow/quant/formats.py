"""Pre-quantized checkpoint formats, read into the kernel layout of :mod:`expertflow.quant.scheme` as they are.

Each reader turns one quantized linear layer's tensors into integer codes ``[out, in]``, per-group scales and
integer zero points ``[groups, out]``, and the group of every input channel; :func:`to_int4_parts` then lays
them out for the int4 kernel without re-quantizing: a code ``q`` with zero ``z`` and scale ``s`` means
``(q - z) * s``, which is ``(q - 8) * s + (8 - z) * s``, the kernel's ``(q - 8) * scale + zero``.

* **GPTQ** (AutoGPTQ / GPTQModel ``gptq`` format): ``qweight`` int32 ``[in * bits / 32, out]`` packed along the
  input dimension, lowest bits first; ``qzeros`` int32 ``[groups, out * bits / 32]`` packed along the output
  dimension; ``scales`` ``[groups, out]``; ``g_idx`` int32 ``[in]``, the group of each input channel (act-order
  permutes it). Format v1 stores each zero point minus one (``checkpoint_format`` ``gptq``); v2 (``gptq_v2``)
  stores it as is.
* **AWQ GEMM**: ``qweight`` int32 ``[in, out / 8]`` and ``qzeros`` int32 ``[groups, out / 8]`` packed along the
  output dimension in AWQ's interleaved order (0, 2, 4, 6, 1, 3, 5, 7); ``scales`` ``[groups, out]``; 4-bit,
  with zero points.
* **compressed-tensors** ``pack-quantized`` (W4A16 / W8A16, as llm-compressor writes): ``weight_packed`` int32
  ``[out, in * bits / 32]`` packed along the input dimension, values offset by ``2^(bits-1)``;
  ``weight_scale`` ``[out, groups]``; ``weight_zero_point`` ``[out, groups]`` when asymmetric; optional
  ``weight_g_idx``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from expertflow.errors import CheckpointError
from expertflow.quant.scheme import INT4_GROUP_SIZES, QuantScheme, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column of each nibble of an AWQ int32, lowest nibble first


@dataclass
class IntWeight:
    """A quantized ``[out, in]`` weight in plain form: ``w[o, i] = (codes[o, i] - zeros[g, o]) * scales[g, o]``
    with ``g = groups[i]``."""

    codes: torch.Tensor  # int32 [out, in], 0 .. 2^bits - 1
    scales: torch.Tensor  # float [groups, out]
    zeros: torch.Tensor  # int32 or float [groups, out]
    groups: torch.Tensor  # int64 [in]
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        s = self.scales.to(torch.float32)[self.groups].T  # [out, in]
        z = self.zeros.to(torch.float32)[self.groups].T
        return (self.codes.to(torch.float32) - z) * s


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[n, m]`` packing ``32 / bits`` values along dim 0 (lowest bits first) -> ``[n * 32 / bits, m]``."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, per, 1)
    values = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0] * per, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[n, m]`` packing along dim 1 (lowest bits first) -> ``[n, m * 32 / bits]``."""
    return unpack_rows(packed.T.contiguous(), bits).T.contiguous()


def _check_finite(name: str, t: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(t.to(torch.float32)).all()):
        raise CheckpointError(
            f"{int((~torch.isfinite(t.to(torch.float32))).sum())} values are NaN or infinite",
            file=where,
            tensor=name,
        )


def _groups(
    g_idx: torch.Tensor | None, in_features: int, groups: int, size: int, name: str, where: str
) -> torch.Tensor:
    """The group of each input channel: ``g_idx`` checked, or consecutive groups of ``size`` without one."""
    g = (torch.arange(in_features) // size) if g_idx is None else g_idx.long()
    _check_groups(g, in_features, groups, size, name, where)
    return g


def _check_groups(
    g_idx: torch.Tensor, in_features: int, groups: int, group_size: int, name: str, where: str
) -> None:
    """A ``g_idx`` must give each group exactly ``group_size`` input channels (act-order permutes, never drops)."""
    if g_idx.shape != (in_features,) or g_idx.min() < 0 or g_idx.max() >= groups:
        raise CheckpointError(
            f"g_idx of shape {list(g_idx.shape)} with groups {int(g_idx.min())}..{int(g_idx.max())} does not "
            f"assign {in_features} input channels to {groups} groups",
            file=where,
            tensor=name,
        )
    counts = torch.bincount(g_idx.long(), minlength=groups)
    if bool((counts != group_size).any()):
        bad = int((counts != group_size).nonzero()[0])
        raise CheckpointError(
            f"g_idx is not a permutation of the groups: group {bad} has {int(counts[bad])} input channels, "
            f"not {group_size}",
            file=where,
            tensor=name,
        )


def read_gptq(
    t: Mapping[str, torch.Tensor],
    *,
    bits: int,
    group_size: int,
    v1: bool,
    name: str,
    where: str,
    check_only: bool = False,
) -> IntWeight | None:
    """A GPTQ linear (``qweight``, ``qzeros``, ``scales``, optional ``g_idx``) in plain form."""
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    if bits not in (4, 8) or qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CheckpointError(
            f"GPTQ {bits}-bit with {qweight.dtype} qweight is not supported (4 or 8 bits, int32)",
            file=where,
            tensor=name,
        )
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    size = in_features if group_size <= 0 else group_size
    if scales.shape != (-(-in_features // size), out_features) or qzeros.shape != (
        groups,
        out_features * bits // 32,
    ):
        raise CheckpointError(
            f"GPTQ qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)} and scales {list(scales.shape)} "
            f"disagree with {bits} bits and group size {group_size}",
            file=where,
            tensor=name,
        )
    _check_finite(f"{name}.scales", scales, where)
    g = _groups(t.get("g_idx"), in_features, groups, size, f"{name}.g_idx", where)
    if check_only:  # shapes, scales and g_idx checked; qweight's values are not needed
        return None
    zeros = unpack_cols(qzeros, bits) + (1 if v1 else 0)
    codes = unpack_rows(qweight, bits).T.contiguous()  # [out, in]
    return IntWeight(codes, scales, zeros, g, bits, size)


def read_awq(
    t: Mapping[str, torch.Tensor], *, group_size: int, name: str, where: str, check_only: bool = False
) -> IntWeight | None:
    """An AWQ GEMM linear (``qweight``, ``qzeros``, ``scales``), 4-bit, in plain form."""
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    if scales.shape != (in_features // group_size, out_features) or qzeros.shape != (
        groups,
        qweight.shape[1],
    ):
        raise CheckpointError(
            f"AWQ qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)} and scales {list(scales.shape)} "
            f"disagree with 4 bits and group size {group_size}",
            file=where,
            tensor=name,
        )
    _check_finite(f"{name}.scales", scales, where)
    if check_only:
        return None
    order = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])

    def unpack(p: torch.Tensor) -> torch.Tensor:
        raw = unpack_cols(p, 4).view(p.shape[0], p.shape[1], 8)  # nibble j holds column AWQ_ORDER[j]
        return raw[:, :, order].reshape(p.shape[0], p.shape[1] * 8)

    codes = unpack(qweight).T.contiguous()
    return IntWeight(codes, scales, unpack(qzeros), torch.arange(in_features) // group_size, 4, group_size)


def read_compressed(
    t: Mapping[str, torch.Tensor],
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    name: str,
    where: str,
    check_only: bool = False,
) -> IntWeight | None:
    """A compressed-tensors ``pack-quantized`` linear (``weight_packed``, ``weight_scale``...) in plain form."""
    packed, scale = t["weight_packed"], t["weight_scale"]
    shape = t.get("weight_shape")
    out_features = packed.shape[0]
    in_features = int(shape[1]) if shape is not None else packed.shape[1] * 32 // bits
    size = in_features if group_size <= 0 else group_size
    groups = -(-in_features // size)
    if scale.shape != (out_features, groups) or packed.shape[1] * 32 // bits < in_features:
        raise CheckpointError(
            f"weight_packed {list(packed.shape)} and weight_scale {list(scale.shape)} disagree with {bits} bits "
            f"and group size {group_size} for a {out_features}x{in_features} weight",
            file=where,
            tensor=name,
        )
    _check_finite(f"{name}.weight_scale", scale, where)
    g = _groups(t.get("weight_g_idx"), in_features, groups, size, f"{name}.weight_g_idx", where)
    if check_only:
        return None
    codes = unpack_cols(packed, bits)[:, :in_features]  # stored as value + 2^(bits-1)
    offset = 1 << (bits - 1)
    zp = t.get("weight_zero_point")
    if symmetric or zp is None:
        zeros = torch.full((groups, out_features), offset, dtype=torch.int32)
    else:
        # Asymmetric zero points are packed like the weight, along the output dimension.
        packed_zp = zp.dtype == torch.int32 and zp.shape[0] != out_features
        zeros = unpack_rows(zp, bits)[:out_features].T if packed_zp else zp.to(torch.int32).T + offset
        if tuple(zeros.shape) != (groups, out_features):
            raise CheckpointError(
                f"weight_zero_point {list(zp.shape)} does not give {groups} groups of {out_features} outputs",
                file=where,
                tensor=f"{name}.weight_zero_point",
            )
    return IntWeight(codes.contiguous(), scale.T.contiguous(), zeros, g, bits, size)


def kernel_group(size: int) -> int | None:
    """The int4 kernel group a format's group of ``size`` input channels is cut into (None: no such group)."""
    return next((k for k in sorted(INT4_GROUP_SIZES, reverse=True) if size % k == 0), None)


def to_kernel_parts(
    w: IntWeight, dtype: torch.dtype, *, name: str, where: str, act_order: bool | None = None
) -> tuple[QuantScheme, dict[str, torch.Tensor]]:
    """The kernel tensors of ``w``: int4 for 4-bit weights, int8 for symmetric per-channel 8-bit ones.
    ``act_order`` forces the input permutation part (a checkpoint's layers all have it, identity or not)."""
    if w.bits == 4:
        return to_int4_parts(w, dtype, act_order=act_order)
    one_group = w.scales.shape[0] == 1
    if w.bits == 8 and one_group and bool((w.zeros == 128).all()):
        scheme = QuantScheme(8, 0)
        out_features, in_features = w.codes.shape
        q = (w.codes - 128).to(torch.int8)
        _, in_p = scheme.padded(out_features, in_features)
        if in_p != in_features:
            q = torch.nn.functional.pad(q, (0, in_p - in_features))
        return scheme, {"qweight": q.contiguous(), "scales": w.scales[0].to(dtype).contiguous()}
    kind = "per channel, asymmetric" if one_group else f"in groups of {w.group_size}"
    raise CheckpointError(
        f"{w.bits}-bit weights {kind} are not supported: torch's int8 CPU kernel is symmetric and per channel "
        "(4-bit weights of any group size and 8-bit symmetric per-channel ones are)",
        file=where,
        tensor=name,
    )


def to_int4_parts(
    w: IntWeight, dtype: torch.dtype, *, act_order: bool | None = None
) -> tuple[QuantScheme, dict[str, torch.Tensor]]:
    """The int4 kernel's tensors for ``w`` (no re-quantization); act-order adds ``perm``, the input channels
    in group order, which the kernel applies to its input."""
    if w.bits != 4:
        raise CheckpointError(f"{w.bits}-bit weights cannot use the int4 kernel")
    if w.group_size not in INT4_GROUP_SIZES:
        # A group the kernel does not take (e.g. one per channel) is cut into equal kernel groups sharing it.
        size = kernel_group(w.group_size)
        if size is None:
            raise CheckpointError(
                f"group size {w.group_size} is not a multiple of 32: the int4 kernel cannot take it"
            )
        rep = w.group_size // size
        w = IntWeight(
            w.codes,
            w.scales.repeat_interleave(rep, dim=0),
            w.zeros.repeat_interleave(rep, dim=0),
            w.groups * rep + (torch.arange(w.groups.shape[0]) % w.group_size) // size,
            4,
            size,
        )
    out_features, in_features = w.codes.shape
    perm = torch.argsort(w.groups, stable=True)
    if act_order is None:
        act_order = not torch.equal(perm, torch.arange(in_features))
    elif not act_order and not torch.equal(perm, torch.arange(in_features)):
        raise CheckpointError("the weight's g_idx permutes its input channels, but act-order is off")
    scheme = QuantScheme(4, w.group_size, act_order=act_order)
    codes = w.codes[:, perm] if act_order else w.codes
    scales = w.scales.to(torch.float32)
    zero = (8 - w.zeros.to(torch.float32)) * scales
    out_p, in_p = scheme.padded(out_features, in_features)
    if (out_p, in_p) != (out_features, in_features):
        codes = torch.nn.functional.pad(codes, (0, in_p - in_features, 0, out_p - out_features), value=8)
        pad_groups = in_p // w.group_size - scales.shape[0]
        scales = torch.nn.functional.pad(scales, (0, out_p - out_features, 0, pad_groups))
        zero = torch.nn.functional.pad(zero, (0, out_p - out_features, 0, pad_groups))
    parts = {
        "qweight": pack_int4(codes),
        "qparams": torch.stack([scales, zero], dim=-1).to(dtype).contiguous(),
    }
    if act_order:
        parts["perm"] = perm.to(torch.int32)
    return scheme, parts
