"""Pre-quantized Hugging Face checkpoints (GPTQ, AWQ GEMM, compressed-tensors pack-quantized), opened as they are.

Recognised by ``quantization_config`` in ``config.json``. Expert tensors are found like any others (the model
names them; a linear's ``qweight`` / ``weight_packed`` stands for its ``weight``), stored in the slots as the
checkpoint stores them (so checksums, packs and expert daemons carry the checkpoint's own bytes), and converted
once per slot fill, in place, into the layout torch's weight-only kernels read: the same integer codes, scales
and zero points, never re-quantized (:mod:`expertflow.quant.formats`). Quantized non-expert layers (attention
projections...) are dequantized once at load, into the model's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from expertflow.core import SAFETENSORS_CODES, ExpertKey, round_up, torch_dtype
from expertflow.errors import CheckpointError, UnsupportedModelError
from expertflow.model.adapters import ExpertsAdapter, KeyMapper, experts_modules
from expertflow.model.discovery import model_naming
from expertflow.model.quantized_experts import QuantizedStack
from expertflow.quant.formats import (
    IntWeight,
    kernel_group,
    read_awq,
    read_compressed,
    read_gptq,
    to_kernel_parts,
)
from expertflow.quant.scheme import QuantScheme
from expertflow.tiers.layout import ExpertLayout, ExpertName, Naming, TensorInfo
from expertflow.tiers.nvme import read_tensor

SUFFIXES: dict[str, tuple[str, ...]] = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": (
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
    ),
}
_ALIGN = 64  # converted tensors start on cache-line boundaries in the slot
SUPPORTED = (
    "GPTQ (4/8-bit, v1/v2, act-order), AWQ GEMM (4-bit) and compressed-tensors pack-quantized (W4A16/W8A16)"
)


@dataclass(frozen=True)
class PreQuantized:
    """How a pre-quantized checkpoint stores its linear layers."""

    method: str  # "gptq" | "awq" | "compressed-tensors"
    bits: int
    group_size: int  # <= 0: one group per output channel
    sym: bool = True
    v1: bool = True  # GPTQ: zero points stored minus one
    act_order: bool = False

    @property
    def suffixes(self) -> tuple[str, ...]:
        return SUFFIXES[self.method]

    @property
    def primary(self) -> str:
        return self.suffixes[0]

    def split(self, name: str) -> tuple[str, str] | None:
        """``"a.b.qweight"`` -> ``("a.b", "qweight")``; None for a tensor that is not a quantized linear's."""
        base, _, suffix = name.rpartition(".")
        return (base, suffix) if base and suffix in self.suffixes else None

    def read(self, parts: Mapping[str, torch.Tensor], *, name: str, where: str) -> IntWeight:
        weight = self._read(parts, name=name, where=where, check_only=False)
        assert weight is not None
        return weight

    def check(self, parts: Mapping[str, torch.Tensor], *, name: str, where: str) -> None:
        """Shapes, scales and ``g_idx`` of one linear (its main tensor may be on the meta device)."""
        self._read(parts, name=name, where=where, check_only=True)

    def _read(
        self, parts: Mapping[str, torch.Tensor], *, name: str, where: str, check_only: bool
    ) -> IntWeight | None:
        if self.method == "gptq":
            return read_gptq(
                parts,
                bits=self.bits,
                group_size=self.group_size,
                v1=self.v1,
                name=name,
                where=where,
                check_only=check_only,
            )
        if self.method == "awq":
            return read_awq(parts, group_size=self.group_size, name=name, where=where, check_only=check_only)
        return read_compressed(
            parts,
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.sym,
            name=name,
            where=where,
            check_only=check_only,
        )

    def kernel_scheme(self, in_features: int, where: str) -> QuantScheme:
        """The kernel layout a weight of ``in_features`` converts to (exactly: same codes, scales and zeros)."""
        if self.bits == 8:
            if self.group_size > 0 or not self.sym:
                raise UnsupportedModelError(
                    f"{self.describe()} weights: torch's int8 CPU kernel is symmetric and per channel",
                    file=where,
                )
            return QuantScheme(8, 0)
        group = kernel_group(self.group_size if self.group_size > 0 else in_features)
        if group is None:
            raise UnsupportedModelError(
                f"{self.describe()}: the int4 kernel needs groups of 32 channels", file=where
            )
        return QuantScheme(4, group, act_order=self.act_order)

    def describe(self) -> str:
        group = f"groups of {self.group_size}" if self.group_size > 0 else "per channel"
        return f"{self.method} {self.bits}-bit, {group}{', act-order' if self.act_order else ''}"


def detect(hf_config: Any, where: str) -> PreQuantized | None:
    """The checkpoint's pre-quantization from ``quantization_config``, None without one; an unsupported method
    or variant is an :class:`UnsupportedModelError` that names it."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    method = str(qc.get("quant_method", "?")).lower()

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{what} is not supported: ExpertFlow opens {SUPPORTED} checkpoints", file=where
        )

    if method == "gptq":
        bits = int(qc.get("bits", 4))
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if bits not in (4, 8):
            raise refuse(f"GPTQ {bits}-bit")
        if fmt not in ("gptq", "gptq_v2"):
            raise refuse(f"GPTQ checkpoint format {fmt!r}")
        group = int(qc.get("group_size", 128))
        return PreQuantized(
            "gptq", bits, group, bool(qc.get("sym", True)), fmt == "gptq", bool(qc.get("desc_act", False))
        )
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise refuse(f"AWQ version {version!r}")
        if int(qc.get("bits", qc.get("w_bit", 4))) != 4 or not qc.get("zero_point", True):
            raise refuse("AWQ other than 4-bit with zero points")
        return PreQuantized("awq", 4, int(qc.get("group_size", qc.get("q_group_size", 128))), False)
    if method == "compressed-tensors":
        return _compressed(qc, refuse)
    raise refuse(f"quantization method {method!r}")


def _compressed(qc: Mapping[str, Any], refuse: Callable[[str], UnsupportedModelError]) -> PreQuantized:
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise refuse(f"compressed-tensors format {fmt!r}")
    schemes = []
    for group in (qc.get("config_groups") or {}).values():
        if group.get("input_activations"):
            raise refuse("compressed-tensors with quantized activations")
        schemes.append(group.get("weights") or {})
    if not schemes or any(s != schemes[0] for s in schemes):
        raise refuse("compressed-tensors with several weight schemes")
    w = schemes[0]
    bits, strategy = int(w.get("num_bits", 0)), w.get("strategy")
    if w.get("type", "int") != "int" or bits not in (4, 8) or strategy not in ("group", "channel"):
        raise refuse(f"compressed-tensors {w.get('type')} {bits}-bit {strategy} weights")
    group = int(w.get("group_size") or 0) if strategy == "group" else 0
    act_order = w.get("actorder") not in (None, False, "static")
    return PreQuantized(
        "compressed-tensors", bits, group, bool(w.get("symmetric", True)), act_order=act_order
    )


# --- naming: a quantized linear's tensors stand for its weight ------------------------------------------


def prequantized_naming(
    model: nn.Module, mapper: KeyMapper, names: Iterable[str], fmt: PreQuantized
) -> Naming:
    """The model's naming of a pre-quantized checkpoint: ``...experts.3.w1.qweight`` is the expert tensor
    ``w1.qweight`` wherever ``...experts.3.w1.weight`` would be ``w1.weight``."""
    names = list(names)
    split = {n: s for n in names if (s := fmt.split(n)) is not None}
    standing = sorted({f"{base}.weight" for base, _ in split.values()})
    inner = model_naming(model, mapper, [*standing, *(n for n in names if n not in split)])

    def naming(name: str) -> ExpertName | None:
        parts = split.get(name)
        if parts is None:
            return inner(name)
        base, suffix = parts
        named = inner(f"{base}.weight")
        if named is None:
            return None
        if named.expert is None:
            raise UnsupportedModelError(
                f"{name} holds every expert of a layer quantized in one tensor; ExpertFlow reads quantized "
                "experts stored one linear per expert",
                tensor=name,
            )
        return named._replace(role=named.role[: -len("weight")] + suffix)

    return naming


# --- experts: converted at fill, computed by the kernels -------------------------------------------


@dataclass(frozen=True)
class Block:
    """One on-disk linear of an expert (``w1``), as rows of a parameter, converted to ``scheme`` at fill."""

    base: str  # the role prefix, e.g. "w1." or "gate_proj."
    source: str  # expert 0's tensor name prefix, for messages
    out_features: int
    in_features: int
    scheme: QuantScheme
    parts: tuple[tuple[str, str, tuple[int, ...], int], ...]  # (suffix, dtype, shape, offset in the slot)

    def views(self, store: Any) -> dict[str, torch.Tensor]:
        """Each converted part as a ``[slots, ...]`` view of the store's slots."""
        return {s: store.region(off, torch_dtype(dt), shape) for s, dt, shape, off in self.parts}


@dataclass(frozen=True)
class ConvertedFill:
    """A weight parameter of an experts module made of converted blocks (``gate_up_proj`` <- w1, w3)."""

    param: str
    blocks: tuple[Block, ...]
    deinterleave: bool = False

    def bind(self, store: Any, layer: int) -> QuantizedStack:
        return QuantizedStack.of_blocks(
            [(b.views(store), b.scheme, b.out_features, b.in_features) for b in self.blocks]
        )


def derive_prequantized_adapters(
    model: nn.Module, layout: ExpertLayout, mapper: KeyMapper, fmt: PreQuantized, dtype: torch.dtype
) -> tuple[dict[int, ExpertsAdapter], int]:
    """One adapter per MoE layer and the slot bytes the converted experts need (the layout's ``slot_floor``)."""
    modules = experts_modules(model)
    counts = layout.experts_per_layer()
    adapters: dict[int, ExpertsAdapter] = {}
    floor = 0
    dtype_name = SAFETENSORS_CODES[dtype]
    for layer in layout.moe_layers:
        spec = layout.spec(ExpertKey(layer, 0))
        by_param: dict[str, list[tuple[int, str, str]]] = {}  # param -> (source order, role prefix, source)
        path = None
        for t in spec.tensors:
            parts = fmt.split(t.source)
            if parts is None:
                raise UnsupportedModelError(
                    f"expert tensor {t.role} is not quantized ({fmt.method}): experts stored partly quantized are "
                    "not supported",
                    file=t.file,
                    tensor=t.source,
                )
            if parts[1] != fmt.primary:
                continue
            key, converter, pattern = mapper.map(f"{parts[0]}.weight")
            module_path, _, param = key.rpartition(".")
            if path is not None and module_path != path:
                raise CheckpointError(
                    f"experts of layer {layer} map to {path} and {module_path}", tensor=t.source
                )
            path = module_path
            order = (
                converter.source_patterns.index(pattern)
                if converter and pattern in converter.source_patterns
                else 0
            )
            base = t.role[: -len(fmt.primary)]
            by_param.setdefault(param, []).append((order, base, parts[0]))
        module = modules.get(path or "")
        if module is None or path is None:
            raise UnsupportedModelError(
                f"the quantized experts of layer {layer} are not in an experts module", file=layout.root
            )
        if int(getattr(module, "num_experts", -1)) != counts[layer]:
            raise CheckpointError(
                f"{path} has {getattr(module, 'num_experts', '?')} experts, the checkpoint {counts[layer]}",
                file=layout.root,
            )
        params = dict(module.named_parameters(recurse=False))
        missing = sorted(set(params) - set(by_param))
        if missing:
            raise UnsupportedModelError(
                f"{path} has parameters {missing} that the quantized checkpoint does not hold (biases of quantized "
                "experts are not supported)",
                file=layout.root,
            )
        roles = {t.role: t for t in spec.tensors}
        fills = []
        offset = 0
        transposed = bool(getattr(module, "is_transposed", False))
        for param, entries in sorted(by_param.items()):
            entries.sort()
            shape = tuple(params[param].shape[1:])
            out_total, in_features = (shape[1], shape[0]) if transposed else shape
            blocks = []
            for _, base, source in entries:
                out_b, in_b = _stored_shape(fmt, roles, base)
                if fmt.method == "compressed-tensors" and in_b - 32 // fmt.bits < in_features <= in_b:
                    in_b = in_features  # packed rows are padded to whole words; weight_shape has the width
                if in_b != in_features:
                    raise CheckpointError(
                        f"{source} has {in_b} input features, {path}.{param} expects {in_features}",
                        file=roles[base + fmt.primary].file,
                        tensor=source,
                    )
                scheme = fmt.kernel_scheme(in_b, layout.root)
                placed: list[tuple[str, str, tuple[int, ...], int]] = []
                for suffix, dt, part_shape in scheme.parts(out_b, in_b, dtype_name):
                    size = torch.Size(part_shape).numel() * torch_dtype(dt).itemsize
                    offset = round_up(offset, _ALIGN)
                    placed.append((suffix, dt, part_shape, offset))
                    offset += size
                blocks.append(Block(base, source, out_b, in_b, scheme, tuple(placed)))
            if sum(b.out_features for b in blocks) != out_total:
                raise CheckpointError(
                    f"{path}.{param} has {out_total} output features, its quantized linears "
                    f"{[b.source for b in blocks]} {sum(b.out_features for b in blocks)}",
                    file=layout.root,
                )
            fills.append(ConvertedFill(param, tuple(blocks)))
        floor = max(floor, offset)
        adapters[layer] = ExpertsAdapter(layer, path, counts[layer], dtype, tuple(fills))
    return adapters, floor


def _stored_shape(fmt: PreQuantized, roles: Mapping[str, Any], base: str) -> tuple[int, int]:
    """(out, in) of a quantized linear from its main tensor's shape."""
    t = roles[base + fmt.primary]
    rows, cols = t.shape
    per = 32 // fmt.bits
    if fmt.method == "gptq":
        return cols, rows * per
    if fmt.method == "awq":
        return cols * 8, rows
    return rows, cols * per  # compressed-tensors: the padded width (weight_shape's values are not read here)


def conversion(
    adapters: Mapping[int, ExpertsAdapter], store: Any, fmt: PreQuantized, dtype: torch.dtype, root: str
) -> Callable[[ExpertKey, int], None]:
    """The fill transform: an expert's stored tensors -> the kernel layout, in its slot, never re-quantized."""
    regions = {
        layer: [(block, block.views(store)) for fill in adapter.fills for block in fill.blocks]
        for layer, adapter in adapters.items()
    }

    def transform(key: ExpertKey, slot: int) -> None:
        converted = []
        for block, views in regions[key.layer]:
            raw = {}
            for suffix in fmt.suffixes:
                try:
                    raw[suffix] = store.tensor(key, slot, block.base + suffix).clone()
                except KeyError:
                    continue
            weight = fmt.read(raw, name=f"{block.source} of expert {key}", where=root)
            weight = _fix_width(weight, block.in_features)
            scheme, parts = to_kernel_parts(
                weight, dtype, name=block.source, where=root, act_order=block.scheme.act_order
            )
            if scheme != block.scheme:
                raise CheckpointError(
                    f"expert {key}: {block.source} is {scheme.name}, not {block.scheme.name}", file=root
                )
            converted.append((views, parts))
        with torch.no_grad():
            for views, parts in converted:
                for suffix, value in parts.items():
                    views[suffix][slot].copy_(value)

    return transform


def _fix_width(w: IntWeight, in_features: int) -> IntWeight:
    if w.codes.shape[1] == in_features:
        return w
    return dataclasses.replace(w, codes=w.codes[:, :in_features], groups=w.groups[:in_features])


# --- non-expert layers: dequantized once at load ------------------------------------------------------


def quantized_groups(
    tensors: Iterable[TensorInfo], fmt: PreQuantized
) -> tuple[dict[str, dict[str, TensorInfo]], list[TensorInfo]]:
    """Non-expert tensors split into quantized linears (base -> suffix -> tensor) and the rest."""
    groups: dict[str, dict[str, TensorInfo]] = {}
    rest: list[TensorInfo] = []
    for info in tensors:
        parts = fmt.split(info.name)
        if parts is None:
            rest.append(info)
        else:
            groups.setdefault(parts[0], {})[parts[1]] = info
    return groups, rest


def dequantize_group(
    group: Mapping[str, TensorInfo], fmt: PreQuantized, base: str, dtype: torch.dtype
) -> torch.Tensor:
    """A quantized non-expert linear's weight, dequantized once, in ``dtype``."""
    from safetensors import safe_open

    parts: dict[str, torch.Tensor] = {}
    for file in {info.file for info in group.values()}:  # one linear's tensors: usually one file, opened once
        with safe_open(file, framework="pt", device="cpu") as handle:
            for suffix, info in group.items():
                if info.file == file:
                    parts[suffix] = handle.get_tensor(info.name)
    where = next(iter(group.values())).file
    if fmt.primary not in parts:
        raise CheckpointError(f"{base} has {sorted(parts)} but no {fmt.primary}", file=where, tensor=base)
    return fmt.read(parts, name=base, where=where).dequantize().to(dtype)


def check_experts(layout: ExpertLayout, fmt: PreQuantized) -> None:
    """At open: every expert's quantized linears have shapes that agree with the bits and groups, finite
    scales and a ``g_idx`` that is a permutation of the groups; a :class:`CheckpointError` names the file and
    tensor otherwise. Reads the small tensors only (scales, zero points, ``g_idx``), never the codes."""
    for key in sorted(layout.experts):
        by_base: dict[str, dict[str, Any]] = {}
        for t in layout.spec(key).tensors:
            parts = fmt.split(t.source)
            if parts is not None:
                by_base.setdefault(parts[0], {})[parts[1]] = t
        for base, tensors in by_base.items():
            values: dict[str, torch.Tensor] = {}
            for suffix, t in tensors.items():
                if suffix == fmt.primary:
                    values[suffix] = torch.empty(t.shape, dtype=torch_dtype(t.dtype), device="meta")
                else:
                    values[suffix] = read_tensor(t)
            main = tensors.get(fmt.primary)
            if main is None:
                raise CheckpointError(f"{base} has {sorted(tensors)} but no {fmt.primary}", file=layout.root)
            fmt.check(values, name=base, where=main.file)
