"""Quantized experts in a model: slot views of the quantized tensors, and the experts forward that uses them.

A quantized pack (``expertflow pack --quantize``) stores, per expert and per weight parameter of the family's
experts module (``gate_up_proj``, ``down_proj``...), the scheme's tensors as roles ``<param>.qweight`` and
``<param>.qparams`` / ``<param>.scales``, the weight taken as ``[out, in]`` whatever the module's orientation;
other parameters (biases) are stored as the module holds them. The forward registered here as
``expertflow_quantized`` is transformers' grouped experts forward with each expert's two matrix products done
by the weight-only kernels: the family's own gate (``_apply_gate``: SwiGLU, GPT-OSS's clamped SwiGLU...),
activation, biases and post-expert norm are used as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations import moe as hf_moe
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from expertflow.core import ExpertKey, torch_dtype
from expertflow.errors import CheckpointError, ConfigError
from expertflow.model.adapters import ExpertsAdapter, ParamFill, experts_modules
from expertflow.quant import native
from expertflow.quant.kernels import NATIVE_MIN_WEIGHTS, qlinear
from expertflow.quant.scheme import QuantScheme
from expertflow.tiers.layout import ExpertLayout, TensorSlice
from expertflow.tiers.nvme import read_tensor

QUANTIZED_IMPLEMENTATION = "expertflow_quantized"
#: Parameters of an experts module that are weight matrices (quantized); the rest are kept as stored.
WEIGHT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


Block = tuple[dict[str, torch.Tensor], QuantScheme, int, int]  # (parts over slots, scheme, out, in)


class QuantizedStack:
    """One weight parameter of a layer's experts as quantized slot views (``[slots, ...]`` per part).

    A parameter may be made of row blocks quantized apart (``gate_up_proj`` of a GPTQ checkpoint: its ``w1``
    and ``w3``, each with its own groups); their outputs are concatenated, as the rows are.
    """

    def __init__(
        self, parts: Mapping[str, torch.Tensor], scheme: QuantScheme, out_features: int, in_features: int
    ) -> None:
        self.blocks: list[Block] = [(dict(parts), scheme, out_features, in_features)]

    @classmethod
    def of_blocks(cls, blocks: list[Block]) -> QuantizedStack:
        stack = cls.__new__(cls)
        stack.blocks = list(blocks)
        return stack

    def __getitem__(self, index: slice) -> QuantizedStack:
        return QuantizedStack.of_blocks(
            [({k: v[index] for k, v in parts.items()}, s, o, i) for parts, s, o, i in self.blocks]
        )

    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """``x @ W_e.T`` for expert ``e`` of the stack."""
        outs = [qlinear(x, {k: v[e] for k, v in parts.items()}, s, o, i) for parts, s, o, i in self.blocks]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@dataclass(frozen=True)
class QuantFill:
    """A weight parameter of an experts module filled from its quantized roles."""

    param: str
    roles: tuple[str, ...]  # the scheme's parts, in order (see QuantScheme.parts)
    suffixes: tuple[str, ...]
    scheme: QuantScheme
    out_features: int
    in_features: int
    deinterleave: bool = False  # quantized packs store the module's own layout: nothing to convert at fill

    def bind(self, store: Any, layer: int) -> QuantizedStack:
        parts = {s: store.stacked(layer, (role,)) for s, role in zip(self.suffixes, self.roles)}
        return QuantizedStack(parts, self.scheme, self.out_features, self.in_features)


def weight_shape(module: nn.Module, param: str) -> tuple[int, int]:
    """``(out, in)`` of one expert's ``param`` of an experts module, whatever its orientation."""
    shape = tuple(getattr(module, param).shape[1:])
    if len(shape) != 2:
        raise ConfigError(f"{param} of {type(module).__name__} is not a matrix per expert: {list(shape)}")
    return (shape[1], shape[0]) if getattr(module, "is_transposed", False) else (shape[0], shape[1])


def quantized_fills(
    module: nn.Module, roles: Mapping[str, TensorSlice], scheme: QuantScheme, where: str
) -> dict[str, QuantFill]:
    """The quantized weight parameters of ``module`` that the pack's ``roles`` hold, checked against its shapes."""
    fills: dict[str, QuantFill] = {}
    for param, _ in module.named_parameters(recurse=False):
        if f"{param}.qweight" not in roles:
            continue
        out_features, in_features = weight_shape(module, param)
        suffixes = scheme.suffixes()
        stored = roles[f"{param}.qweight"]
        want = scheme.parts(out_features, in_features, "BF16")[0][2]
        if tuple(stored.shape) != want:
            raise CheckpointError(
                f"{param}.qweight is {list(stored.shape)}, but a {out_features}x{in_features} weight of this model "
                f"is stored as {list(want)} in {scheme.name}: the pack is not of this model",
                file=stored.file,
                tensor=stored.source,
            )
        missing = [s for s in suffixes if f"{param}.{s}" not in roles]
        if missing:
            raise CheckpointError(
                f"{param} has no {', '.join(missing)} for its {scheme.name} weight", file=where
            )
        fills[param] = QuantFill(
            param, tuple(f"{param}.{s}" for s in suffixes), suffixes, scheme, out_features, in_features
        )
    return fills


def quantized_experts_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' grouped experts forward with quantized matrix products (see the module docstring)."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape[0], hidden_states.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    x = hidden_states[perm // num_top_k]
    # Ids >= num_experts are experts outside this wave (expert-parallel sentinels): sorted last, never computed.
    counts = torch.bincount(expert_ids_g, minlength=self.num_experts + 1)[: self.num_experts].tolist()
    up = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    down_bias = self.down_proj_bias if self.has_bias else None
    out = hidden_states.new_zeros(expert_ids.shape[0], hidden_dim)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        h = up.linear(x[rows], e)
        if up_bias is not None:
            h = h + up_bias[e]
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = self.down_proj.linear(h, e)
        if down_bias is not None:
            h = h + down_bias[e]
        if self.has_post_expert_norm:
            h = self.post_expert_norm(h)
        out[rows] = h.to(out.dtype)
    weighted = out * sample_weights[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    final = weighted[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final.to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(QUANTIZED_IMPLEMENTATION, quantized_experts_forward)


def single_route_supported(module: nn.Module, stacks: Mapping[str, Any]) -> bool:
    """Whether :func:`quantized_single_route` computes this experts module: a gated or plain MLP with no biases
    and no post-expert norm (Mixtral, Qwen-MoE, OLMoE, DeepSeek...), its matrices held as quantized stacks."""
    up = "gate_up_proj" if getattr(module, "has_gate", False) else "up_proj"
    return (
        not getattr(module, "has_bias", True)
        and not getattr(module, "has_post_expert_norm", True)
        and isinstance(stacks.get(up), QuantizedStack)
        and isinstance(stacks.get("down_proj"), QuantizedStack)
    )


def quantized_single_route(
    module: Any, stacks: Mapping[str, QuantizedStack], x: torch.Tensor, slot: int
) -> torch.Tensor:
    """What :func:`quantized_experts_forward` gives one row ``x [1, hidden]`` routed, with a unit weight, to the
    expert in ``slot``: the same kernels on the same operands in the same order, without the grouping (sort,
    bincount, scatter, weighting by one, a sum over one route) that a single row makes exact no-ops. A decode
    step computes a few hundred experts a token on fine-grained models; each saves about twenty small ops."""
    h = stacks["gate_up_proj" if module.has_gate else "up_proj"].linear(x, slot)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    return stacks["down_proj"].linear(h, slot).to(x.dtype)


def fused_ffn(module: nn.Module, stacks: Mapping[str, Any]) -> int | None:
    """The intermediate size when a decode step's experts of this module can run in one native call
    (:class:`FusedRoutes`): SwiGLU experts (transformers' default gate, SiLU) with unpadded int4 weights of one
    block each, on a machine with the native kernels, large enough for them (or forced). Else None."""
    if not single_route_supported(module, stacks) or not getattr(module, "has_gate", False):
        return None
    if getattr(type(module), "_apply_gate", None) is not getattr(hf_moe, "_default_apply_gate", object()):
        return None
    if not isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation)):
        return None
    up, down = stacks["gate_up_proj"], stacks["down_proj"]
    if len(up.blocks) != 1 or len(down.blocks) != 1:
        return None
    (_, _, up_out, up_in), (_, _, down_out, down_in) = up.blocks[0], down.blocks[0]
    ffn = down_in
    if up_out != 2 * ffn or down_out != up_in:
        return None
    for parts, scheme, out_f, in_f in (up.blocks[0], down.blocks[0]):
        if scheme.bits != 4 or scheme.act_order or scheme.padded(out_f, in_f) != (out_f, in_f):
            return None
        if not native.supports(parts["qparams"], parts["qparams"]):  # CPU scales in fp32 or bf16
            return None
        if not (parts["qweight"][0].is_contiguous() and parts["qparams"][0].is_contiguous()):
            return None  # a slot's tensor must be one run of memory; slots may sit apart
    if not native.forced() and min(up_out * up_in, down_out * down_in) < NATIVE_MIN_WEIGHTS:
        return None
    return ffn if native.library() is not None else None


class FusedRoutes:
    """The experts in chosen slots applied to one row ``x [1, hidden]`` with unit weights, in one native call
    (see :func:`fused_ffn`): ``[len(slots), hidden]``; :meth:`rows` takes many rows grouped by expert. Each
    route's output depends on its own row and slot alone, so which routes share a call changes no bit. The
    call's fixed arguments are prepared once (again after ``native.reset()``)."""

    #: Routes per native call of :meth:`rows`: bounds its scratch memory (~ routes * (2 * ffn + hidden) floats).
    ROWS_PER_CALL = 512

    def __init__(self, stacks: Mapping[str, QuantizedStack], ffn: int) -> None:
        self._stacks = stacks
        self.ffn = ffn
        self._call: native.Int4Swiglu | None = None

    def _prepare(self) -> native.Int4Swiglu:
        (up_parts, up_s, _, _), (down_parts, down_s, _, _) = (
            self._stacks["gate_up_proj"].blocks[0],
            self._stacks["down_proj"].blocks[0],
        )
        return native.Int4Swiglu(
            (up_parts["qweight"], up_parts["qparams"], up_s.group_size),
            (down_parts["qweight"], down_parts["qparams"], down_s.group_size),
            self.ffn,
        )

    def _ready(self) -> native.Int4Swiglu:
        call = self._call
        if call is None or call.generation != native.generation():
            call = self._call = self._prepare()
        return call

    def __call__(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        y = self._ready()(x.reshape(-1), slots)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def rows(self, x: torch.Tensor, groups: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Rows of ``x [m, hidden]`` through the experts of their slots, ``groups`` being ``(slot, rows)`` pairs:
        ``[routes, hidden]``, each group's rows in turn, each with the bits :meth:`__call__` gives that row. In
        as few native calls as the scratch bound allows (each reads a group's weights once for all its rows)."""
        call = self._ready()
        parts: list[torch.Tensor] = []
        batch: list[tuple[int, list[int]]] = []
        size = 0
        for slot, members in groups:
            for i in range(0, len(members), self.ROWS_PER_CALL):
                piece = members[i : i + self.ROWS_PER_CALL]
                if size + len(piece) > self.ROWS_PER_CALL:
                    parts.append(call.rows(x, batch))
                    batch, size = [], 0
                batch.append((slot, piece))
                size += len(piece)
        if batch:
            parts.append(call.rows(x, batch))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def scheme_of(layout: ExpertLayout) -> QuantScheme | None:
    """The quantization scheme of a pack's experts, or None for experts stored as the model holds them."""
    data = layout.quantization
    return None if data is None else QuantScheme.from_json(data, layout.root)


def derive_quantized_adapters(
    model: nn.Module, layout: ExpertLayout, scheme: QuantScheme, dtype: torch.dtype
) -> dict[int, ExpertsAdapter]:
    """One adapter per MoE layer of a quantized pack, checked against the (meta-device) ``model``."""
    modules = experts_modules(model)
    counts = layout.experts_per_layer()
    adapters: dict[int, ExpertsAdapter] = {}
    for layer in layout.moe_layers:
        spec = layout.spec(ExpertKey(layer, 0))
        paths = {t.source.rpartition(".")[0] for t in spec.tensors}
        path = paths.pop() if len(paths) == 1 else None
        module = modules.get(path or "")
        if module is None or path is None:
            raise CheckpointError(
                f"the quantized experts of layer {layer} belong to {sorted(paths | {path or ''})}, not to one "
                "experts module of this model",
                file=layout.root,
            )
        if int(getattr(module, "num_experts", -1)) != counts[layer]:
            raise CheckpointError(
                f"{path} has {getattr(module, 'num_experts', '?')} experts, the pack {counts[layer]}",
                file=layout.root,
            )
        roles = {t.role: t for t in spec.tensors}
        quantized = quantized_fills(module, roles, scheme, layout.root)
        fills: list[ParamFill | QuantFill] = []
        for param, value in sorted(module.named_parameters(recurse=False)):
            if param in quantized:
                fills.append(quantized[param])
                continue
            t = roles.get(param)
            if t is None:
                raise CheckpointError(f"the pack has no tensor for {path}.{param}", file=layout.root)
            if tuple(t.shape) != tuple(value.shape[1:]) or torch_dtype(t.dtype) != dtype:
                raise CheckpointError(
                    f"{path}.{param} is stored as {t.dtype} {list(t.shape)}, the model expects {dtype} "
                    f"{list(value.shape[1:])}",
                    file=t.file,
                    tensor=t.source,
                )
            fills.append(ParamFill(param, (param,)))
        adapters[layer] = ExpertsAdapter(layer, path, counts[layer], dtype, tuple(fills))
    unmapped = sorted(set(modules) - {a.module_path for a in adapters.values()})
    if unmapped:
        raise CheckpointError(f"the pack has no experts for {unmapped[:4]}", file=layout.root)
    return adapters


def check_scales(layout: ExpertLayout) -> None:
    """Raise :class:`CheckpointError` naming the file and tensor if any expert's scales or zeros are NaN or
    infinite. Reads only those tensors (a few percent of the experts' bytes)."""
    scheme = scheme_of(layout)
    if scheme is None:
        return
    for spec in layout.experts.values():
        for t in spec.tensors:
            if not t.role.endswith((".qparams", ".scales")):
                continue
            values = read_tensor(t)
            if not bool(torch.isfinite(values).all()):
                raise CheckpointError(
                    f"expert {spec.key}: {int((~torch.isfinite(values)).sum())} values of {t.role} are NaN or "
                    "infinite",
                    file=t.file,
                    tensor=f"{t.source} ({t.role})",
                )
