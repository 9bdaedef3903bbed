"""Which module holds a layer's routed experts, and how the tensors of a slot fill its parameters.

No table per model family lives here. transformers already declares, in ``conversion_mapping.py``, how the
per-expert tensors on disk become the fused parameters of its ``*Experts`` modules: renames
(``block_sparse_moe`` -> ``mlp``), stacking experts (``MergeModulelist``), concatenating gate and up
(``Concatenate``), transposing (``Transpose``). We replay those declarations on tensor *names* only, so every
family with the ``@use_experts_implementation`` seam is covered by the same code:

* Mixtral / Phi-MoE: ``gate_up_proj <- ("w1.weight", "w3.weight")``, ``down_proj <- "w2.weight"``;
* Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3: ``gate_up_proj <- ("gate_proj.weight", "up_proj.weight")``;
* GPT-OSS (fused on disk, no conversion): ``gate_up_proj``, ``gate_up_proj_bias``, ``down_proj``, ...;
* Qwen3-VL-MoE (fused on disk, transposed in the official files): ``gate_up_proj <- "gate_up_proj"``, ``.T``.

A conversion we cannot express as a view of slot memory (interleaving, chunking, dequantising) makes the
family unsupported with a precise error rather than a silent copy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    ErnieFuseAndSplitTextVisionExperts,
    Inkling2LoopDequantizeExperts,
    Interleave,
    MergeModulelist,
    Transpose,
    WeightConverter,
    WeightRenaming,
    apply_renamings,
    rename_source_key,
)

from expertflow.core import ExpertKey, name_index, torch_dtype
from expertflow.errors import CheckpointError, ConfigError, UnsupportedModelError
from expertflow.tiers.layout import ExpertLayout, ExpertSpec, TensorSlice

# Expert kernels of transformers' ExpertsInterface that skip routing entries whose expert id is
# ``>= num_experts`` once the module is flagged expert-parallel (that is how transformers' own expert
# parallelism masks experts that live on another rank; our "other rank" is "not resident yet"):
# ``grouped_mm`` sorts them past the last group and never multiplies them; ``batched_mm`` clamps the id and
# zeroes the weight. The families' eager loops are not uniform (GPT-OSS one-hot encodes ids with exactly
# ``num_experts`` classes and would fail), so eager is never used for offloaded experts.
SENTINEL_SAFE_IMPLEMENTATIONS: tuple[str, ...] = ("grouped_mm", "batched_mm")
DEFAULT_IMPLEMENTATION = "grouped_mm"


def choose_implementation(requested: str | None) -> str:
    """The expert kernel for offloaded experts: the model's own choice when it handles sentinels, else grouped_mm."""
    return requested if requested in SENTINEL_SAFE_IMPLEMENTATIONS else DEFAULT_IMPLEMENTATION


def model_class(config: Any) -> type[PreTrainedModel] | None:
    """The transformers class ``config.architectures`` names (e.g. a VLM's ForConditionalGeneration), if any."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return None


def is_experts_module(module: nn.Module) -> bool:
    """True for an instance of a class decorated with transformers' ``@use_experts_implementation``."""
    return hasattr(module, "_is_expert_parallel") and hasattr(module, "is_concatenated")


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every fused routed-experts module of ``model`` by its qualified name."""
    return {name: m for name, m in model.named_modules() if is_experts_module(m)}


@dataclass(frozen=True)
class ParamFill:
    """One parameter of an experts module as a view of slot memory.

    ``roles`` are the expert's on-disk tensors, adjacent in the slot, concatenated along their first dimension
    (``store.stacked(layer, roles)``); ``transpose`` swaps the two per-expert dimensions of that view.
    """

    param: str
    roles: tuple[str, ...]
    transpose: bool = False
    # Rows stored interleaved (gate0, up0, gate1, ...): converted when a slot fills.
    deinterleave: bool = False

    def view(self, stacked: torch.Tensor) -> torch.Tensor:
        """``stacked`` is ``[num_slots, *per_expert]``; returns the parameter's ``[num_slots, ...]`` view."""
        return stacked.transpose(1, 2) if self.transpose else stacked

    def bind(self, store: Any, layer: int) -> torch.Tensor:
        """The parameter over every slot of ``layer`` of ``store``; sliced per wave."""
        return self.view(store.stacked(layer, self.roles))


@dataclass(frozen=True)
class ExpertsAdapter:
    """How layer ``layer``'s experts module (at ``module_path``) runs on slots."""

    layer: int
    module_path: str
    num_experts: int
    dtype: torch.dtype
    # ParamFill, or QuantFill (expertflow.model.quantized_experts) for a quantized pack: both bind() to slot views.
    fills: tuple[Any, ...]


class KeyMapper:
    """On-disk tensor name -> in-memory state-dict key, the way ``from_pretrained`` renames it."""

    def __init__(self, model: PreTrainedModel, meta_state_keys: set[str]) -> None:
        transforms = get_model_conversion_mapping(model)
        # What transformers' loader takes as its weight mapping (it uses only these two kinds).
        self.transforms: list[WeightConverter | WeightRenaming] = [
            t for t in transforms if isinstance(t, (WeightRenaming, WeightConverter))
        ]
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.prefix: str = getattr(model, "base_model_prefix", "") or ""
        # rename_source_key only needs membership tests on the meta state dict.
        self._keys = dict.fromkeys(meta_state_keys, True)
        self._split: dict[str, tuple[str, int]] = {}  # on-disk expert tensor -> (its module's key, local id)
        # Every tensor name is mapped by discovery, by the split resolution and again by the loader's plan:
        # the renaming regexes run once per name.
        self._mapped: dict[str, tuple[str, WeightConverter | None, str | None]] = {}

    def prepare_splits(self, names: Iterable[str]) -> None:
        """Resolve experts that one converter splits over several modules (ERNIE-4.5-VL keeps text and vision
        experts in one on-disk list, which ``ErnieFuseAndSplitTextVisionExperts`` cuts into equal chunks in
        order): which module, and which expert of it, each on-disk expert tensor becomes."""
        groups: dict[str, list[str]] = defaultdict(list)
        split_targets: dict[str, list[str]] = {}
        for name in names:
            key, converter, _ = self._map(name)
            if converter is None or len(converter.target_patterns) < 2:
                continue
            if not any(isinstance(op, ErnieFuseAndSplitTextVisionExperts) for op in converter.operations):
                continue
            groups[key].append(name)
            split_targets[key] = list(converter.target_patterns)
        self._split = {}
        for key, members in groups.items():
            ids = _expert_ids(members)
            if ids is None:
                continue
            order = sorted(set(ids.values()))
            targets = split_targets[key]
            chunk = -(-len(order) // len(targets))
            for name, expert in ids.items():
                i = order.index(expert)
                self._split[name] = (key.replace(targets[0], targets[i // chunk]), i % chunk)

    def split_expert(self, name: str) -> int | None:
        """The expert id of ``name`` inside the module a split sends it to (None: no split applies)."""
        found = self._split.get(name)
        return found[1] if found is not None else None

    def map(self, name: str) -> tuple[str, WeightConverter | None, str | None]:
        """The in-memory key, the converter that matched (if any) and the converter's source pattern."""
        key, converter, pattern = self._map(name)
        split = self._split.get(name)
        return (split[0], converter, pattern) if split is not None else (key, converter, pattern)

    def _map(self, name: str) -> tuple[str, WeightConverter | None, str | None]:
        found = self._mapped.get(name)
        if found is None:
            found = self._mapped[name] = self._rename(name)
        return found

    def _rename(self, name: str) -> tuple[str, WeightConverter | None, str | None]:
        renamed = apply_renamings(name, self.renamings)
        converter: WeightConverter | None = None
        pattern: str | None = None
        for c in self.converters:
            out, pat = c.rename_source_key(renamed)
            if pat is not None:
                renamed, converter, pattern = out, c, pat
                break
        key, _ = rename_source_key(renamed, [], [], self.prefix or None, self._keys)
        if key not in self._keys:
            # As transformers' loader does: a name the renamings broke (``model.norm`` -> ``model.kv_norm``)
            # that the model has as it is keeps its own name.
            plain, _ = rename_source_key(name, [], [], self.prefix or None, self._keys)
            if plain in self._keys:
                return plain, None, None
        return key, converter, pattern

    @staticmethod
    def targets(key: str, converter: WeightConverter) -> set[str]:
        """Every state-dict key a converter fills from a source mapped to ``key`` (a split fills several)."""
        first = converter.target_patterns[0]
        return {key.replace(first, t) for t in converter.target_patterns} if first in key else {key}


def _expert_ids(names: list[str]) -> dict[str, int] | None:
    """The expert id in each of ``names`` (tensors of one fused target): the numeric name component that
    varies among them."""
    parts = [n.split(".") for n in names]
    if len({len(p) for p in parts}) != 1:
        return None
    for i in range(len(parts[0])):
        column = [p[i] for p in parts]
        if all(name_index(c) is not None for c in column) and len(set(column)) > 1:
            return {n: int(p[i]) for n, p in zip(names, parts)}
    return None


class _Ops(NamedTuple):
    """What a converter does to an expert tensor, as ExpertFlow runs it."""

    transpose: bool = False  # a view
    deinterleave: bool = False  # a row permutation at slot fill
    dequantize_if_scaled: bool = False  # the identity unless scale tensors come with the weight


def _check_ops(converter: WeightConverter, fused_on_disk: bool, arch: str, tensor: str) -> _Ops:
    """Whether the converter's operations can run on slots, and how."""
    transpose = deinterleave = dequantize = False
    for op in converter.operations:
        if isinstance(op, MergeModulelist) and op.dim == 0 and not fused_on_disk:
            continue
        if isinstance(op, Concatenate) and op.dim == 1:
            continue
        if (
            isinstance(op, ErnieFuseAndSplitTextVisionExperts)
            and op.stack_dim == 0
            and op.concat_dim == 1
            and not fused_on_disk
        ):
            continue  # stack per-expert tensors, concatenate gate and up, split the list: KeyMapper places them
        if isinstance(op, Transpose) and {op.dim0, op.dim1} == {1, 2}:
            transpose = True
            continue
        if isinstance(op, Interleave) and op.dim == 1 and not op.inverse:
            # Not a view, but a permutation of each expert's rows: done once when its slot is filled.
            deinterleave = True
            continue
        if isinstance(op, Inkling2LoopDequantizeExperts):
            # Returns its one input unchanged when no scales come with the weight (an unquantized checkpoint).
            dequantize = True
            continue
        raise UnsupportedModelError(
            f"{arch} converts its expert tensors with {type(op).__name__}"
            f"({', '.join(f'{k}={v}' for k, v in vars(op).items())}), which is not a view of the stored bytes; "
            "ExpertFlow cannot compute on such experts in place",
            tensor=tensor,
        )
    if transpose and deinterleave:
        raise UnsupportedModelError(
            f"{arch} both transposes and de-interleaves its expert tensors; ExpertFlow does only one of them",
            tensor=tensor,
        )
    return _Ops(transpose, deinterleave, dequantize)


def _per_expert_shape(slices: list[TensorSlice]) -> tuple[int, ...]:
    first = slices[0].shape
    if not first:
        return ()
    return (sum(t.shape[0] for t in slices), *first[1:])


# One tensor of a slot as the parameter it fills: (position among the converter's sources, slice, what the
# converter does to it).
_FillEntry = tuple[int, TensorSlice, _Ops]


def derive_adapters(
    model: nn.Module, layout: ExpertLayout, mapper: KeyMapper, dtype: torch.dtype
) -> dict[int, ExpertsAdapter]:
    """One adapter per MoE layer of ``layout``, checked against the (meta-device) ``model`` it will run in.

    Raises :class:`UnsupportedModelError` when an expert tensor does not belong to a fused experts module, and
    :class:`CheckpointError` when the checkpoint and the config disagree (expert count, shapes, missing tensors).
    """
    modules = experts_modules(model)
    if not modules:
        raise UnsupportedModelError(
            f"{layout.architecture} has no fused routed-experts module (transformers' "
            "@use_experts_implementation seam); ExpertFlow cannot offload its experts",
            file=layout.root,
        )
    counts = layout.experts_per_layer()
    adapters: dict[int, ExpertsAdapter] = {}
    for layer in layout.moe_layers:
        adapters[layer] = _layer_adapter(layer, layout, modules, mapper, dtype, counts)
    _check_all_modules_mapped(modules, adapters, layout.root)
    return adapters


def _layer_adapter(
    layer: int,
    layout: ExpertLayout,
    modules: dict[str, nn.Module],
    mapper: KeyMapper,
    dtype: torch.dtype,
    counts: dict[int, int],
) -> ExpertsAdapter:
    """The adapter of one MoE layer, from the tensors of its expert 0."""
    spec = layout.spec(ExpertKey(layer, 0))
    module_path, by_param = _tensors_by_param(layer, spec, layout, modules, mapper)
    module = modules[module_path]
    num_experts = int(getattr(module, "num_experts", -1))
    if num_experts != counts[layer]:
        raise CheckpointError(
            f"the config gives {module_path} {num_experts} experts, but the checkpoint has {counts[layer]} "
            f"in layer {layer}",
            file=spec.tensors[0].file,
            tensor=spec.tensors[0].source,
        )
    params = dict(module.named_parameters(recurse=False))
    missing = sorted(set(params) - set(by_param))
    if missing:
        raise CheckpointError(
            f"the checkpoint has no tensors for {', '.join(f'{module_path}.{p}' for p in missing)} "
            f"(layer {layer} has {[t.role for t in spec.tensors]})",
            file=layout.root,
        )
    fills = _param_fills(by_param, params, dtype, module_path)
    return ExpertsAdapter(layer, module_path, num_experts, dtype, fills)


def _tensors_by_param(
    layer: int,
    spec: ExpertSpec,
    layout: ExpertLayout,
    modules: dict[str, nn.Module],
    mapper: KeyMapper,
) -> tuple[str, dict[str, list[_FillEntry]]]:
    """The experts module of ``layer`` and, per parameter of it, the expert tensors that fill it."""
    by_param: dict[str, list[_FillEntry]] = {}
    module_path: str | None = None
    for t in spec.tensors:
        # Per-expert names carry the expert id; map expert 0's name, as transformers' patterns use ``*``.
        key, converter, pattern = mapper.map(t.source)
        path, _, param = key.rpartition(".")
        if modules.get(path) is None:
            raise UnsupportedModelError(
                f"expert tensor maps to {key!r}, which is not a parameter of a fused experts module of "
                f"{layout.architecture}; ExpertFlow cannot offload these experts",
                file=t.file,
                tensor=t.source,
            )
        if module_path is not None and path != module_path:
            raise CheckpointError(
                f"experts of layer {layer} map to two modules: {module_path} and {path}", tensor=t.source
            )
        module_path = path
        by_param.setdefault(param, []).append(_fill_entry(t, converter, pattern, layout.architecture))
    if module_path is None:
        raise CheckpointError(f"layer {layer} has an expert without tensors", file=layout.root)
    return module_path, by_param


def _fill_entry(
    t: TensorSlice, converter: WeightConverter | None, pattern: str | None, arch: str
) -> _FillEntry:
    """Where ``t`` goes in its parameter: its rank among the converter's sources, and what the converter does."""
    if converter is None:
        return (0, t, _Ops())
    # A fused tensor holds every expert; a per-expert one has the expert id just before its role.
    owner = t.source[: -len(t.role)].rstrip(".") if t.source.endswith(t.role) else t.source
    fused_on_disk = name_index(owner.rsplit(".", 1)[-1]) is None
    ops = _check_ops(converter, fused_on_disk, arch, t.source)
    order = converter.source_patterns.index(pattern) if pattern in converter.source_patterns else 0
    return (order, t, ops)


def _param_fills(
    by_param: dict[str, list[_FillEntry]],
    params: dict[str, nn.Parameter],
    dtype: torch.dtype,
    module_path: str,
) -> tuple[ParamFill, ...]:
    """A checked :class:`ParamFill` per parameter, in parameter-name order."""
    fills = []
    for param, entries in sorted(by_param.items()):
        if param not in params:
            raise CheckpointError(
                f"expert tensor maps to {module_path}.{param}, which that module does not have",
                tensor=entries[0][1].source,
            )
        entries.sort(key=lambda e: e[0])
        slices = [t for _, t, _ in entries]
        if any(ops.dequantize_if_scaled for _, _, ops in entries) and len(entries) > 1:
            raise UnsupportedModelError(
                f"{module_path}.{param} is stored quantized ({', '.join(t.role for t in slices)}: NVFP4/MXFP8 "
                "codes with their scales), which transformers dequantizes on load; ExpertFlow computes experts "
                "as stored and does not run quantized experts yet",
                tensor=slices[0].source,
            )
        fill = _fill(
            param, slices, any(ops.transpose for _, _, ops in entries), params[param], dtype, module_path
        )
        if any(ops.deinterleave for _, _, ops in entries):
            fill = ParamFill(fill.param, fill.roles, fill.transpose, deinterleave=True)
        fills.append(fill)
    return tuple(fills)


def _check_all_modules_mapped(
    modules: dict[str, nn.Module], adapters: dict[int, ExpertsAdapter], root: str
) -> None:
    """Every experts module of the model must get the checkpoint's tensors of some layer."""
    unmapped = sorted(set(modules) - {a.module_path for a in adapters.values()})
    if unmapped:
        raise CheckpointError(
            f"the config has routed experts at {unmapped[:4]}{' ...' if len(unmapped) > 4 else ''}, "
            "but the checkpoint has no expert tensors for them",
            file=root,
        )


def _fill(
    param: str,
    slices: list[TensorSlice],
    may_transpose: bool,
    target: torch.Tensor,
    dtype: torch.dtype,
    module_path: str,
) -> ParamFill:
    expected = tuple(target.shape[1:])
    shape = _per_expert_shape(slices)
    name = slices[0].source
    # Like transformers' Transpose(check_dims=True): transpose only when the stored shape is the other way round.
    transpose = False
    if shape != expected:
        if may_transpose and len(shape) == 2 and shape[::-1] == expected:
            transpose = True
        else:
            raise CheckpointError(
                f"expert tensors {[t.role for t in slices]} give {module_path}.{param} a per-expert shape of "
                f"{list(shape)}, but the config expects {list(expected)}",
                file=slices[0].file,
                tensor=name,
            )
    stored = {torch_dtype(t.dtype) for t in slices}
    if stored != {dtype}:
        raise ConfigError(
            f"expert tensor {name} is stored as {sorted(map(str, stored))} but the model would run in {dtype}; "
            f"experts are computed in place without conversion, so load with dtype={stored.pop()}"
        )
    return ParamFill(param, tuple(t.role for t in slices), transpose)


def fill_transform(
    adapters: dict[int, ExpertsAdapter], stacked: Callable[[int, tuple[str, ...]], torch.Tensor]
) -> Callable[[ExpertKey, int], None] | None:
    """What a slot needs once filled, for adapters with a de-interleaved parameter (None if no layer needs it).

    ``stacked(layer, roles)`` is the store's ``[num_slots, ...]`` view of a layer's tensors. Rows stored as
    (gate0, up0, gate1, up1, ...) become (gate..., up...), in place, as transformers' ``Interleave`` does on load.
    """
    plans = {
        layer: [fill.roles for fill in adapter.fills if fill.deinterleave]
        for layer, adapter in adapters.items()
    }
    plans = {layer: roles for layer, roles in plans.items() if roles}
    if not plans:
        return None

    def transform(key: ExpertKey, slot: int) -> None:
        for roles in plans.get(key.layer, ()):
            rows = stacked(key.layer, roles)[slot]
            pairs = rows.reshape(rows.shape[0] // 2, 2, *rows.shape[1:])
            with torch.no_grad():
                rows.copy_(pairs.transpose(0, 1).reshape(rows.shape))

    return transform
