"""load_model(): a Hugging Face MoE model whose routed experts live in an ExpertStore.

The model is built on the meta device, so no expert parameter is ever allocated. Every non-expert tensor is
read from the checkpoint (renamed the way ``from_pretrained`` renames it) onto the compute device; each fused
experts module is replaced by an :class:`~expertflow.model.moe_block.OffloadedExperts` over the store.
Anything the checkpoint and the config disagree on is an error, never a silent fallback to loading
everything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from expertflow.assemble import open_store
from expertflow.config import StoreConfig, format_size
from expertflow.core import DTYPE_SIZES, routed_top_k, torch_dtype
from expertflow.devices import check_device
from expertflow.errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    UnsupportedModelError,
    UnverifiedFamilyWarning,
)
from expertflow.model.adapters import (
    ExpertsAdapter,
    KeyMapper,
    choose_implementation,
    derive_adapters,
    experts_modules,
    fill_transform,
    model_class,
)
from expertflow.model.discovery import model_naming
from expertflow.model.file_embedding import FileEmbedding
from expertflow.model.hf_quantized import (
    PreQuantized,
    check_experts,
    conversion,
    dequantize_group,
    derive_prequantized_adapters,
    detect,
    prequantized_naming,
    quantized_groups,
)
from expertflow.model.locking import install_lock, model_lock
from expertflow.model.moe_block import OffloadedExperts, SlotStore
from expertflow.model.prefetch import attach_predictor
from expertflow.model.quantized_experts import (
    QUANTIZED_IMPLEMENTATION,
    check_scales,
    derive_quantized_adapters,
    scheme_of,
)
from expertflow.model.quantized_linear import QuantizedLinear
from expertflow.model.router_precision import float32_routers
from expertflow.model.routing import attach as attach_routing
from expertflow.model.support import check_supported
from expertflow.model.verify import FamilyCheck, cached_status, verify_family
from expertflow.model.working_set import activation_bytes
from expertflow.pipeline.planner import StorePlan, budget_sizes, check_minimum, plan_store, resolve_read_mode
from expertflow.quant.scheme import QuantScheme
from expertflow.tiers.layout import ExpertLayout, TensorInfo
from expertflow.tiers.safetensors_index import PACK_MANIFEST_NAME, open_checkpoint, scan_checkpoint

log = logging.getLogger(__name__)


class ExpertFlowModelMixin:
    """Added to the model's class: access to the store, and deterministic release of it."""

    expert_store: Any
    expert_layers: dict[int, OffloadedExperts]
    expert_top_k: int  # experts per token, validated at load
    expert_model_dir: Path  # the checkpoint it was loaded from (its config, processor settings)
    _expertflow_close: Callable[[], None]

    def close(self) -> None:
        """Close the expert store (when load_model created it), after any call running in another thread.
        Idempotent."""
        with model_lock(self):
            self._expertflow_close()

    def expert_stats(self) -> Any:
        """The store's statistics (hits, misses, bytes read, stalls, prefetches)."""
        return self.expert_store.stats()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_model(
    path: str | os.PathLike[str],
    *,
    config: StoreConfig | None = None,
    store: SlotStore | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    layout: ExpertLayout | None = None,
    trust_family: bool = False,
) -> PreTrainedModel:
    """Load the MoE checkpoint at ``path`` with its routed experts served by an ExpertStore.

    Give either ``config`` (a store is created from it and closed by ``model.close()``, the context manager or
    garbage collection) or ``store`` (shared; the caller owns it and its config applies), not both. With
    ``config.host_bytes`` unset the host budget is sized from the memory available, after the non-expert weights
    this call loads. ``device`` overrides ``config.device``. ``dtype`` defaults to the config's (``config.json``
    ``dtype``), else the experts' stored dtype; experts are computed in their stored dtype, so the two must
    agree. ``layout`` saves re-reading the headers when the caller already has ``open_checkpoint(path)``.

    Before the checkpoint's weights run, the family is proved exact on a tiny seeded instance of its config
    class (:mod:`expertflow.model.verify`; cached per family and versions, so only a family's first load pays
    for it). ``trust_family=True`` skips that proof, loudly (:class:`UnverifiedFamilyWarning`).

    Raises :class:`UnsupportedModelError` (no routed experts / no experts seam / refused by the family check),
    :class:`CheckpointError` (config and weights disagree, naming the tensor), :class:`BudgetError` (budget
    below one token's top-k) and :class:`ConfigError` (both a store and a config, or a store over other experts).
    """
    return _load_model(
        path,
        config=config,
        store=store,
        device=device,
        dtype=dtype,
        layout=layout,
        family=_TRUST if trust_family else _VERIFY,
    )


_VERIFY, _TRUST, _SKIP = "verify", "trust", "skip"  # _SKIP: the family check's own tiny instance


def _load_model(
    path: str | os.PathLike[str],
    *,
    config: StoreConfig | None,
    store: SlotStore | None,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    layout: ExpertLayout | None,
    family: str,
    experts_only: bool = False,
) -> PreTrainedModel:
    root = Path(path)
    if store is not None and config is not None:
        raise ConfigError("pass a store or a config to load_model, not both: a store brings its own config")
    if store is not None and device is not None and torch.device(device) != torch.device(store.config.device):
        raise ConfigError(f"the store computes on {store.device}, but the model is asked for {device}")
    config = store.config if store is not None else (config or StoreConfig())
    if device is not None:
        config = config.with_(device=str(check_device(device)))
    else:
        check_device(config.device)
    prep = _prepare(root, config, dtype, layout, family)
    layout, model, adapters, fmt, dtype = prep.layout, prep.model, prep.adapters, prep.fmt, prep.dtype
    if store is not None and store.layout.fingerprint() != layout.fingerprint():
        raise ConfigError(
            f"the store serves the experts of {store.layout.root}, which differ from those of {root}"
        )
    owned = store is None
    if store is None:
        config = prep.config
        store = open_store(layout, config)
    close_store: Callable[[], None] = store.close if owned else (lambda: None)
    try:
        _check_slots(store, prep.top_k)
        if store.slot_nbytes < layout.slot_floor:
            raise ConfigError(
                f"the store's {store.slot_nbytes}-byte slots cannot hold these experts converted for the kernel "
                f"({layout.slot_floor} bytes): open the store on load_model's layout"
            )
        transform = (
            conversion(adapters, store, fmt, dtype, layout.root)
            if fmt is not None
            else fill_transform(adapters, store.stacked)
        )
        if transform is not None:
            store.set_fill_transform(transform)
        # Non-expert weights and transformers' initialisation first, while the family's own experts modules
        # (meta, never allocated) are in place: an _init_weights that reaches into them touches meta
        # tensors, never the offloaded module or its slots.
        if not experts_only:  # (pack --quantize reads experts only: the rest stays on the meta device)
            _load_non_experts(model, prep.plan, prep.mapper, torch.device(config.device), dtype)
            if fmt is not None:
                _load_dequantized(model, prep.dequantized, fmt, torch.device(config.device), dtype)
            _load_quantized_linears(model, prep.quantized_linears, torch.device(config.device))
            if prep.file_embedding is not None:
                embedding = _load_file_embedding(model, *prep.file_embedding)
                close_store = _closing(embedding.close, close_store)
            _finish(model, root, {a.module_path for a in adapters.values()})
        quantized = prep.scheme is not None or fmt is not None
        expert_layers = _swap_experts(model, adapters, store, prep.hf_config, quantized=quantized)
        if prep.scheme is not None and not experts_only:  # a pack is lossy by choice: its routers in float32
            float32_routers(
                model,
                {layer: m.module_path for layer, m in expert_layers.items()},
                {layer: m.num_experts for layer, m in expert_layers.items()},
            )
        if config.routing == "cache-aware" and not experts_only:
            attach_routing(model, expert_layers, config.routing_margin)
        predictor = (
            None if experts_only else attach_predictor(model, expert_layers, store, config, prep.top_k)
        )
    except BaseException:
        close_store()
        raise
    cls = type(model)
    # Same name and module as the family's class: transformers looks some behaviour up by class name.
    model.__class__ = type(cls.__name__, (ExpertFlowModelMixin, cls), {"__module__": cls.__module__})
    extended = cast(Any, model)
    extended.expert_store = store
    extended.expert_layers = expert_layers
    extended.expert_predictor = predictor
    extended.expert_top_k = prep.top_k
    extended.expert_model_dir = Path(root)
    extended.expert_key_mapper = prep.mapper  # checkpoint tensor names -> state-dict keys (pack --quantize)
    # None: not checked (trusted, or the family check's own tiny instance).
    extended.expert_family_check = prep.family_check
    extended._expertflow_close = weakref.finalize(model, close_store)
    model.eval()
    install_lock(model)  # callers from several threads queue instead of interleaving on the store
    return model


@dataclasses.dataclass
class _Prepared:
    """Everything ``load_model`` decides before it reads a weight: the layout and skeleton, how experts run,
    which non-expert tensors load where, and the store's memory plan."""

    hf_config: PretrainedConfig
    layout: ExpertLayout
    model: PreTrainedModel
    mapper: KeyMapper
    dtype: torch.dtype
    top_k: int
    family_check: FamilyCheck | None
    fmt: PreQuantized | None
    scheme: Any
    adapters: dict[int, ExpertsAdapter]
    plan: LoadPlan  # non-expert tensors
    dequantized: dict[str, tuple[str, dict[str, TensorInfo]]]  # state key -> (linear, its tensors)
    quantized_linears: dict[str, QuantizedWeight]  # state key of a linear's weight -> its quantized tensors
    file_embedding: tuple[str, TensorInfo] | None  # the input embedding read by row: (state key, its tensor)
    config: StoreConfig  # with the reserve for what the process allocates besides the pool

    def store_plan(self) -> StorePlan:
        return plan_store(self.layout, self.config)


def _prepare(
    root: Path, config: StoreConfig, dtype: torch.dtype | None, layout: ExpertLayout | None, family: str
) -> _Prepared:
    source = layout or _scan(root)  # a bad checkpoint is said before anything else
    hf_config = _hf_config(root)
    check_supported(hf_config.model_type, file=str(root))
    fmt = detect(hf_config, str(root / "config.json"))
    layout, model, mapper, dtype = _layout_and_skeleton(root, hf_config, dtype, source, fmt)
    top_k = _top_k(hf_config, root)
    # A checkpoint or config error is said as such first; then, before any weight is read, the family check.
    family_check = _check_family(hf_config, root, family)
    scheme = scheme_of(layout)
    dequantized: dict[str, tuple[str, dict[str, TensorInfo]]] = {}
    plan_layout = layout
    if fmt is not None:
        adapters, floor = derive_prequantized_adapters(model, layout, mapper, fmt, dtype)
        check_experts(layout, fmt)
        layout = dataclasses.replace(layout, slot_floor=floor)
        groups, rest = quantized_groups((t for t, _ in layout.non_expert), fmt)
        dequantized = {mapper.map(f"{base}.weight")[0]: (base, g) for base, g in groups.items()}
        kept = set(rest)
        plan_layout = dataclasses.replace(
            layout, non_expert=tuple((t, k) for t, k in layout.non_expert if t in kept)
        )
    elif scheme is None:
        adapters = derive_adapters(model, layout, mapper, dtype)
    else:
        adapters = derive_quantized_adapters(model, layout, scheme, dtype)
        check_scales(layout)
    quantized_linears = _plan_quantized_linears(model, plan_layout, mapper)
    if quantized_linears:
        held = {t.name for q in quantized_linears.values() for t in q.tensors.values()}
        plan_layout = dataclasses.replace(
            plan_layout, non_expert=tuple((t, k) for t, k in plan_layout.non_expert if t.name not in held)
        )
    plan = _plan_non_experts(
        model,
        plan_layout,
        mapper,
        {a.module_path for a in adapters.values()},
        provided=set(dequantized) | set(quantized_linears),
    )
    check_minimum(layout, config, top_k)
    file_embedding = _plan_file_embedding(model, plan, dtype) if config.embedding_from_file else None
    # What the process still allocates besides the pool: the auto budget leaves room for it, and an explicit
    # budget that leaves none is warned about by the store.
    other = (
        _non_expert_bytes(plan, dtype)
        + sum(t.nbytes for q in quantized_linears.values() for t in q.tensors.values())
        + activation_bytes(hf_config, dtype, config.context_tokens)
    )
    config = config.with_(host_reserve_bytes=max(config.host_reserve_bytes, other))
    config = resolve_read_mode(layout, config)
    return _Prepared(
        hf_config,
        layout,
        model,
        mapper,
        dtype,
        top_k,
        family_check,
        fmt,
        scheme,
        adapters,
        plan,
        dequantized,
        quantized_linears,
        file_embedding,
        config,
    )


def plan_model(
    path: str | os.PathLike[str],
    config: StoreConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    layout: ExpertLayout | None = None,
) -> StorePlan:
    """The memory plan ``load_model(path, config=config)`` would open its store with, without reading a weight
    or running the family check (``inspect`` prints it). ``layout``: the caller's ``open_model_checkpoint``."""
    return _prepare(Path(path), config or StoreConfig(), dtype, layout, _SKIP).store_plan()


def load_experts(path: str | os.PathLike[str], *, layout: ExpertLayout | None = None) -> PreTrainedModel:
    """The model's offloaded experts over a store of one token's experts, and nothing else: non-expert weights
    stay on the meta device (the model cannot run). For reading each expert once as the family holds it
    (``pack --quantize``) with memory that does not grow with the model."""
    return _load_small(Path(path), layout, tokens=1, experts_only=True)


def _load_small(
    root: Path, layout: ExpertLayout | None, *, tokens: int, experts_only: bool
) -> PreTrainedModel:
    """``root`` offloaded, unchecked, over a store of ``tokens`` tokens' top-k experts."""
    source = layout or open_model_checkpoint(root)
    top_k = _top_k(_hf_config(root), root)
    one_token = budget_sizes(source, StoreConfig().read_mode, top_k)["minimum"] or 0
    config = StoreConfig(host_bytes=tokens * one_token, predictor="none")
    if experts_only:
        config = config.with_(policy="none")  # each expert is read once: nothing to keep
    return _load_model(
        root,
        config=config,
        store=None,
        device=None,
        dtype=None,
        layout=source,
        family=_SKIP,
        experts_only=experts_only,
    )


def _check_family(hf_config: PretrainedConfig, root: Path, family: str) -> FamilyCheck | None:
    """The family check's outcome for a model that may run; a refused family raises here, before any work."""
    if family == _SKIP:
        return None
    if family == _TRUST:
        message = (
            f"{hf_config.model_type} runs WITHOUT the family check (trust_family=True): nothing proves that "
            "ExpertFlow's offloaded experts compute what this family's own module computes, so its outputs may "
            "be silently wrong"
        )
        log.warning(message)
        warnings.warn(message, UnverifiedFamilyWarning, stacklevel=4)
        return None
    result = verify_family(hf_config, _load_for_check)
    if not result.verified:
        raise result.error(str(root))
    return result


def check_family(path: str | os.PathLike[str], *, refresh: bool = False) -> FamilyCheck:
    """Run (or, unless ``refresh``, look up) the family check of the checkpoint at ``path`` without loading its
    weights; a refusal is returned, not raised (``inspect --check-family``)."""
    root = Path(path)
    hf_config = _hf_config(root)
    check_supported(hf_config.model_type, file=str(root))
    return verify_family(hf_config, _load_for_check, refresh=refresh)


def family_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What is known of the family check of the checkpoint at ``path``, without running it (``inspect``)."""
    try:
        hf_config = _hf_config(Path(path))
    except UnsupportedModelError as exc:
        return {"status": "not checkable", "detail": str(exc)}
    return cached_status(hf_config)


def _load_for_check(root: Path) -> PreTrainedModel:
    """The family check's tiny instance, offloaded with room for two layers' experts: experts are evicted and
    read again."""
    return _load_small(root, None, tokens=2, experts_only=False)


def open_model_checkpoint(path: str | os.PathLike[str]) -> ExpertLayout:
    """The checkpoint's experts as :func:`load_model` finds them: from the model's own experts modules and
    transformers' conversion mapping, wherever the family keeps them on disk (a pack lists its own)."""
    root = Path(path)
    source = _scan(root)
    hf_config = _hf_config(root)
    check_supported(hf_config.model_type, file=str(root))
    fmt = detect(hf_config, str(root / "config.json"))
    layout, _, _, _ = _layout_and_skeleton(root, hf_config, None, source, fmt)
    return layout


def open_layout(path: str | os.PathLike[str]) -> ExpertLayout:
    """The checkpoint's experts as :func:`load_model` finds them (from the model's own modules), or, for a
    checkpoint transformers cannot build a model for, by the model-free naming (``inspect``, ``pack``, the
    daemon)."""
    try:
        return open_model_checkpoint(path)
    except UnsupportedModelError:
        layout = open_checkpoint(path)
        check_supported(layout.model_type, file=str(path))  # a known limitation is said as it is
        return layout


def _scan(root: Path) -> ExpertLayout | list[TensorInfo]:
    """A pack's layout (its manifest lists its experts), else every tensor of the checkpoint, checked."""
    if (root / PACK_MANIFEST_NAME).is_file():
        return open_checkpoint(root)
    tensors, _, _ = scan_checkpoint(root)
    return tensors


def _require_experts(layout: ExpertLayout, root: Path) -> None:
    if not layout.experts:
        raise UnsupportedModelError(
            f"{layout.architecture} (model_type {layout.model_type!r}) has no routed experts: no checkpoint tensor "
            "loads into a module with transformers' experts seam; ExpertFlow runs Mixture-of-Experts checkpoints "
            "only",
            file=str(root),
        )


# --- building the skeleton ------------------------------------------------------------------------


def _layout_and_skeleton(
    root: Path,
    hf_config: PretrainedConfig,
    dtype: torch.dtype | None,
    source: ExpertLayout | list[TensorInfo],
    fmt: PreQuantized | None = None,
) -> tuple[ExpertLayout, PreTrainedModel, KeyMapper, torch.dtype]:
    """The checkpoint's experts as the model names them, and the meta-device model they run in.

    ``source`` is a layout that already says where the experts are (a pack, or one the caller gave), or the
    checkpoint's tensors: then experts are found from the model (:mod:`expertflow.model.discovery`), wherever
    the family keeps them on disk.
    """
    layout = source if isinstance(source, ExpertLayout) else None
    wanted = _resolve_dtype(dtype, hf_config, layout)
    model = _meta_model(hf_config, wanted, root)
    mapper = KeyMapper(model, set(model.state_dict().keys()))
    splits_known = False  # model_naming resolves them on the mapper it is given
    if layout is None:
        assert not isinstance(source, ExpertLayout)
        names = [t.name for t in source]
        naming = (
            prequantized_naming(model, mapper, names, fmt)
            if fmt is not None
            else model_naming(model, mapper, names)
        )
        splits_known = True
        layout = open_checkpoint(root, naming=naming)
        resolved = _resolve_dtype(dtype, hf_config, layout)
        if resolved != wanted:
            model = _meta_model(hf_config, resolved, root)
            mapper = KeyMapper(model, set(model.state_dict().keys()))
            wanted = resolved
            splits_known = False
    _require_experts(layout, root)
    if not splits_known:
        # Experts one converter splits over two modules are placed by their on-disk order (KeyMapper).
        mapper.prepare_splits(sorted({t.source for spec in layout.experts.values() for t in spec.tensors}))
    return layout, model, mapper, wanted


def _hf_config(root: Path) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(root, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModelError(
            f"transformers cannot build a config from config.json: {exc}", file=str(root / "config.json")
        ) from exc


def _resolve_dtype(
    dtype: torch.dtype | None, hf_config: PretrainedConfig, layout: ExpertLayout | None
) -> torch.dtype:
    if dtype is not None:
        return dtype
    configured = getattr(hf_config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype):
        return configured
    first = next(iter(layout.experts.values()), None) if layout is not None else None
    if first is None:
        # No expert found yet (before the model names them): any dtype builds the skeleton that finds them.
        return torch.float32
    # A quantized pack's scales are in the compute dtype; otherwise experts are computed as stored.
    scales = [t for t in first.tensors if t.role.endswith((".qparams", "scales", ".weight_scale"))]
    return torch_dtype((scales or list(first.tensors))[0].dtype)


def _meta_model(hf_config: PretrainedConfig, dtype: torch.dtype, root: Path) -> PreTrainedModel:
    cls = model_class(hf_config)
    try:
        with torch.device("meta"):
            if cls is not None:
                return cls._from_config(hf_config, dtype=dtype)
            return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except ValueError as exc:
        architectures = getattr(hf_config, "architectures", None) or ["?"]
        raise UnsupportedModelError(
            f"transformers has no model class for {architectures[0]} (model_type {hf_config.model_type!r}): {exc}",
            file=str(root),
        ) from exc


def _top_k(hf_config: PretrainedConfig, root: Path) -> int:
    """Experts per token, validated: the budget, the predictor and the kernels all depend on it."""
    value = routed_top_k(hf_config)
    num_experts = _num_experts(hf_config)
    if value is None or value < 1 or (num_experts is not None and value > num_experts):
        raise CheckpointError(
            f"experts per token must be between 1 and the number of experts ({num_experts}), got {value!r}",
            file=str(root / "config.json"),
        )
    return value


def _num_experts(hf_config: PretrainedConfig) -> int | None:
    text = hf_config.get_text_config()
    for name in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _non_expert_bytes(plan: LoadPlan, dtype: torch.dtype) -> int:
    """Bytes the non-expert weights take once loaded in ``dtype`` (floating tensors are cast to it)."""
    total = 0
    for entries in plan.values():
        for info, _ in entries:
            n = info.nbytes
            if info.dtype in ("F16", "BF16", "F32", "F64"):
                n = n // DTYPE_SIZES[info.dtype] * dtype.itemsize
            total += n
    return total


def _check_slots(store: SlotStore, top_k: int) -> None:
    if store.num_slots < top_k:
        raise BudgetError(
            f"the store has {store.num_slots} expert slots but one token needs its top-{top_k} experts resident "
            f"together; give it at least {top_k} slots (host budget >= "
            f"{format_size(budget_sizes(store.layout, store.config.read_mode, top_k)['minimum'] or 0)}; "
            f"the budget was {store.budget.describe()})"
        )


# --- experts ----------------------------------------------------------------------------------------


def _swap_experts(
    model: nn.Module,
    adapters: dict[int, ExpertsAdapter],
    store: SlotStore,
    hf_config: PretrainedConfig,
    *,
    quantized: bool = False,
) -> dict[int, OffloadedExperts]:
    modules = experts_modules(model)
    requested = hf_config.get_text_config()._experts_implementation
    implementation = QUANTIZED_IMPLEMENTATION if quantized else choose_implementation(requested)
    if implementation != requested and not quantized:
        log.info(
            "offloaded experts use %s instead of %s (it skips non-resident experts)",
            implementation,
            requested,
        )
    swapped: dict[int, OffloadedExperts] = {}
    for layer, adapter in adapters.items():
        offloaded = OffloadedExperts(modules[adapter.module_path], adapter, store, implementation)
        model.set_submodule(adapter.module_path, offloaded)
        swapped[layer] = offloaded
    return swapped


# --- non-expert weights -----------------------------------------------------------------------------

LoadPlan = dict[str, list[tuple[TensorInfo, str | None]]]  # file -> (tensor on disk, state-dict key or None)


def _plan_non_experts(
    model: PreTrainedModel,
    layout: ExpertLayout,
    mapper: KeyMapper,
    expert_paths: set[str],
    *,
    provided: set[str] | None = None,
) -> LoadPlan:
    """Map and check every non-expert tensor before anything is allocated: shapes, and nothing missing.

    A tensor that transformers converts on load (q/k/v merged into one, ``in_proj`` split, ...) is planned
    with key None: :func:`_load_non_experts` hands those to transformers' own conversion code, and its shape
    is checked there, after the conversion.
    """
    state = {
        k: v for k, v in model.state_dict(keep_vars=True).items() if k.rpartition(".")[0] not in expert_paths
    }
    plan: LoadPlan = {}
    planned: set[str] = set(provided or ())  # weights loaded another way (dequantized linears)
    unexpected: list[str] = []
    for info, _kind in layout.non_expert:
        key, converter, _ = mapper.map(info.name)
        if converter is not None:
            targets = mapper.targets(key, converter)
            if not targets & set(state):
                unexpected.append(info.name)
                continue
            plan.setdefault(info.file, []).append((info, None))
            planned |= targets
            continue
        if key not in state:
            unexpected.append(info.name)
            continue
        expected = tuple(state[key].shape)
        if tuple(info.shape) != expected:
            raise CheckpointError(
                f"tensor has shape {list(info.shape)}, but the config makes {key} {list(expected)}",
                file=info.file,
                tensor=info.name,
            )
        plan.setdefault(info.file, []).append((info, key))
        planned.add(key)
    if unexpected:
        log.warning(
            "%d checkpoint tensors are not used by the model, e.g. %s", len(unexpected), unexpected[:3]
        )
    # A tied pair needs one side on disk; from_pretrained ties symmetrically, and so do we.
    tied = model.all_tied_weights_keys
    covered = set(planned)
    for tgt, src in tied.items():
        if tgt in planned or src in planned:
            covered |= {tgt, src}
    missing = sorted(k for k in set(state) - covered if not _non_persistent(model, k))
    if missing:
        raise CheckpointError(
            f"the checkpoint has no tensor for {len(missing)} model weights, e.g. {missing[:4]}",
            file=layout.root,
        )
    return plan


def _non_persistent(model: nn.Module, key: str) -> bool:
    module_path, _, name = key.rpartition(".")
    return name in model.get_submodule(module_path)._non_persistent_buffers_set


def _load_non_experts(
    model: PreTrainedModel, plan: LoadPlan, mapper: KeyMapper, device: torch.device, dtype: torch.dtype
) -> None:
    """Read the planned tensors onto ``device`` in the model's dtype, let transformers convert the ones it
    converts, then tie weights."""
    state = model.state_dict(keep_vars=True)
    fp32_patterns = list(model._get_dtype_plan(dtype))
    loaded: set[str] = set()
    converted: list[TensorInfo] = []
    with ExitStack() as files, torch.no_grad():
        for file, entries in plan.items():
            handle = files.enter_context(safe_open(file, framework="pt", device=str(device)))
            for info, key in entries:
                if key is None:
                    converted.append(info)
                    continue
                tensor = handle.get_tensor(info.name)
                current = state[key]
                target = tensor.dtype
                if tensor.is_floating_point():
                    keep_fp32 = any(p in key for p in fp32_patterns)
                    target = torch.float32 if keep_fp32 else current.dtype
                # safetensors hands out views of its file mapping: page cache, which a memory limit reclaims
                # and every token faults back in from disk, at whatever alignment the file has. A copy is
                # memory the budget planned for (anonymous), aligned for the kernels.
                tensor = tensor.to(target, copy=True)
                _set_tensor(model, key, tensor, current)
                loaded.add(key)
    if converted:
        loaded |= _load_converted(model, converted, mapper, device, dtype)
    model.tie_weights(missing_keys=set(state) - loaded, recompute_mapping=False)


def _load_converted(
    model: PreTrainedModel,
    tensors: list[TensorInfo],
    mapper: KeyMapper,
    device: torch.device,
    dtype: torch.dtype,
) -> set[str]:
    """Load non-expert tensors that need a conversion through transformers' own loading code (the same merges,
    splits and casts as ``from_pretrained``); the state-dict keys it filled."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    before = {k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta}
    load_config = LoadStateDictConfig(
        device_map={"": str(device)},
        dtype=dtype,
        dtype_plan=model._get_dtype_plan(dtype),
        weight_mapping=mapper.transforms,
    )
    with ExitStack() as files:
        handles: dict[str, Any] = {}
        sources: dict[str, Any] = {}
        for info in tensors:
            if info.file not in handles:
                handles[info.file] = files.enter_context(safe_open(info.file, framework="pt", device="cpu"))
            sources[info.name] = handles[info.file].get_slice(info.name)
        info_, _ = convert_and_load_state_dict_in_model(model, sources, load_config)
    problems = [
        *(f"{k}: shape {list(got)}, expected {list(want)}" for k, got, want in info_.mismatched_keys),
        *(f"{k}: {err}" for k, err in info_.conversion_errors.items()),
        *info_.error_msgs,
    ]
    if problems:
        raise CheckpointError(
            f"transformers could not convert {len(problems)} non-expert tensors: {'; '.join(problems[:4])}",
            file=tensors[0].file,
            tensor=tensors[0].name,
        )
    return {k for k, t in model.state_dict(keep_vars=True).items() if k in before and not t.is_meta}


def _load_dequantized(
    model: PreTrainedModel,
    dequantized: dict[str, tuple[str, dict[str, TensorInfo]]],
    fmt: PreQuantized,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Quantized non-expert linears (attention projections...), dequantized once into the model's weights."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, (base, tensors) in dequantized.items():
            current = state.get(key)
            if current is None:
                raise CheckpointError(f"{base} is quantized but the model has no {key}", tensor=base)
            weight = dequantize_group(tensors, fmt, base, dtype)
            if tuple(weight.shape) != tuple(current.shape):
                raise CheckpointError(
                    f"{base} dequantizes to {list(weight.shape)}, but the model's {key} is {list(current.shape)}",
                    file=next(iter(tensors.values())).file,
                    tensor=base,
                )
            _set_tensor(model, key, weight.to(device), current)


def tied_keys(model: PreTrainedModel) -> set[str]:
    """State keys on either side of a tied pair (an output head sharing the embedding's weight...)."""
    return {k for pair in model.all_tied_weights_keys.items() for k in pair}


def _plan_file_embedding(
    model: PreTrainedModel, plan: LoadPlan, dtype: torch.dtype
) -> tuple[str, TensorInfo] | None:
    """Take the input embedding out of ``plan`` when its rows can be read from the file as they are needed: a
    plain ``nn.Embedding``, not tied to another weight, stored in the dtype it computes in. Its (key, tensor)."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        return None
    path = next((n for n, m in model.named_modules() if m is embedding), None)
    if not path:
        return None
    key = f"{path}.weight"
    if key in tied_keys(model) or any(p in key for p in model._get_dtype_plan(dtype)):
        return None
    for entries in plan.values():
        for i, (info, planned) in enumerate(entries):
            if planned == key:
                if torch_dtype(info.dtype) != dtype or tuple(info.shape) != tuple(embedding.weight.shape):
                    return None
                del entries[i]
                return key, info
    return None


def _load_file_embedding(model: PreTrainedModel, key: str, info: TensorInfo) -> FileEmbedding:
    path = key.rpartition(".")[0]
    module = FileEmbedding(info, cast(nn.Embedding, model.get_submodule(path)).padding_idx)
    model.set_submodule(path, module)
    return module


def _closing(first: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    def close() -> None:
        try:
            first()
        finally:
            then()

    return close


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A pack's quantized non-expert linear weight: its scheme, ``(out, in)`` and tensors by suffix."""

    scheme: QuantScheme
    shape: tuple[int, int]
    tensors: dict[str, TensorInfo]


def _plan_quantized_linears(
    model: PreTrainedModel, layout: ExpertLayout, mapper: KeyMapper
) -> dict[str, QuantizedWeight]:
    """The quantized non-expert linears of a pack, by the state key of the weight they replace, each checked to
    be a plain linear of the model of the stored shape."""
    described = layout.non_expert_quantization
    if not described:
        return {}
    scheme = QuantScheme.from_json(described, layout.root)
    by_name = {t.name: t for t, _ in layout.non_expert}
    weights = cast(dict[str, list[int]], described["weights"])
    out: dict[str, QuantizedWeight] = {}
    for name, (rows, cols) in weights.items():
        key = mapper.map(name)[0]
        path = key.rpartition(".")[0]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != (rows, cols):
            raise CheckpointError(
                f"{name} is stored quantized as a {rows}x{cols} linear, but the model's {path} is "
                f"{type(module).__name__ if module is not None else 'missing'}",
                file=layout.root,
                tensor=name,
            )
        tensors = {s: by_name[f"{name}.{s}"] for s in scheme.suffixes()}
        out[key] = QuantizedWeight(scheme, (rows, cols), tensors)
    return out


def _load_quantized_linears(
    model: PreTrainedModel, linears: Mapping[str, QuantizedWeight], device: torch.device
) -> None:
    """Put each quantized linear in place of the ``nn.Linear`` it was written from, its bias kept."""
    with ExitStack() as files:
        handles: dict[str, Any] = {}
        for key, q in linears.items():
            parts = {}
            for suffix, info in q.tensors.items():
                if info.file not in handles:
                    handles[info.file] = files.enter_context(
                        safe_open(info.file, framework="pt", device=str(device))
                    )
                # A copy: aligned for torch's int8/int4 kernels (a view of the file mapping is only 8-byte
                # aligned, and the int8 kernel crashes on it) and held in memory the budget planned for.
                parts[suffix] = handles[info.file].get_tensor(info.name).clone()
            path = key.rpartition(".")[0]
            linear = cast(nn.Linear, model.get_submodule(path))
            bias = None if linear.bias is None else linear.bias.detach()
            model.set_submodule(path, QuantizedLinear(parts, q.scheme, q.shape[0], q.shape[1], bias))


def _set_tensor(
    model: nn.Module, key: str, tensor: torch.Tensor, current: torch.Tensor, *, initialized: bool = True
) -> None:
    """Put ``tensor`` in place of ``key``; ``initialized`` tells transformers' initialisation to leave it alone."""
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    if name in module._parameters:
        tensor = nn.Parameter(tensor, requires_grad=current.requires_grad)
        module._parameters[name] = tensor
    else:
        module._buffers[name] = tensor
    tensor._is_hf_initialized = initialized  # type: ignore[attr-defined]


def _finish(model: PreTrainedModel, root: Path, expert_paths: set[str]) -> None:
    """Materialise non-persistent buffers (rotary tables...) the way from_pretrained does, run transformers'
    initialisation, and check that nothing outside the experts modules (still meta) is left unloaded."""
    device = next(p.device for p in model.parameters() if not p.is_meta)
    with torch.no_grad():
        for name, buffer in list(model.named_non_persistent_buffers()):
            if buffer.is_meta:
                _set_tensor(model, name, torch.empty_like(buffer, device=device), buffer, initialized=False)
    model.initialize_weights()
    leftovers = [
        n
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_meta and n.rpartition(".")[0] not in expert_paths
    ]
    if leftovers:
        raise CheckpointError(f"weights left uninitialised: {leftovers[:4]}", file=str(root))
    if (root / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(root, local_files_only=True)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable generation_config.json: %s", exc)
