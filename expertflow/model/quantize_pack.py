"""``expertflow pack --quantize``: a pack whose experts are quantized for torch's weight-only kernels.

The experts are taken as the model holds them (after every conversion the loader does at fill), one at a
time through an ExpertStore, so any family ``load_model`` runs can be quantized, and its non-expert weights
are copied unchanged, or, with a non-expert scheme, its plain linears outside the experts (attention, output
head; never routers) are quantized too (:mod:`expertflow.model.quantized_linear`). Each weight matrix of an experts module becomes the scheme's tensors
(:mod:`expertflow.quant.scheme`); biases and other parameters are stored as they are.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from expertflow.core import ExpertKey
from expertflow.errors import CheckpointError, ConfigError
from expertflow.model.loader import load_experts, open_model_checkpoint
from expertflow.model.moe_block import OffloadedExperts
from expertflow.model.quantized_experts import WEIGHT_PARAMS, scheme_of, weight_shape
from expertflow.model.quantized_linear import quantizable_linears
from expertflow.quant.scheme import QuantScheme, dequantize, quantize
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.nvme import read_tensor
from expertflow.tiers.pack import ExpertBlockWriter, NonExpertScheme, write_pack

Tensors = list[tuple[str, str, torch.Tensor]]


def quantize_expert(layer: OffloadedExperts, params: dict[str, torch.Tensor], scheme: QuantScheme) -> Tensors:
    """One expert's pack tensors (role, source, tensor) from its parameters as the family holds them."""
    module = layer.family_module
    out: Tensors = []
    for param, value in sorted(params.items()):
        source = f"{layer.module_path}.{param}"
        if param in WEIGHT_PARAMS and value.dim() == 2:
            weight = value.T if getattr(module, "is_transposed", False) else value
            for suffix, t in quantize(weight, scheme, value.dtype).items():
                out.append((f"{param}.{suffix}", source, t.contiguous()))
        else:
            out.append((param, source, value.detach().clone().contiguous()))
    return out


def pack_quantized(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    scheme: QuantScheme,
    *,
    progress: bool = True,
    non_experts: QuantScheme | None = None,
) -> Path:
    """Write a quantized pack of the checkpoint at ``src`` to ``dst``; returns its path. ``non_experts``: a scheme
    for the non-expert linears too (:func:`non_expert_weights` says which).

    Raises :class:`ConfigError` for a weight the scheme cannot hold (naming it) and :class:`CheckpointError`
    for a source that is already quantized or bad.
    """
    source = Path(src)
    layout = open_model_checkpoint(source)
    if layout.quantization is not None:
        raise CheckpointError(
            "the source is already a quantized pack: quantize the original checkpoint", file=str(src)
        )
    qc: Any = layout.config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method is not None:
        raise CheckpointError(
            f"the source is already quantized ({method}): load_model opens it as it is, "
            "`expertflow pack` copies it without --quantize",
            file=str(src),
        )
    # Each expert is read once, as the family holds it: a store of one token's experts, and no non-expert
    # weight loaded, so memory stays the same whatever the model's size.
    model: Any = load_experts(source, layout=layout)
    with model:
        store = model.expert_store
        layers: dict[int, OffloadedExperts] = model.expert_layers
        if not layers:
            raise ConfigError("the model has no offloaded experts to quantize")
        show = progress and sys.stderr.isatty()

        def write(path: Path) -> list[dict[str, object]]:
            with (
                open(path, "wb") as f,
                tqdm(total=len(layout.experts), desc="quantizing", disable=not show) as bar,
            ):
                writer = ExpertBlockWriter(f, path)
                for key in sorted(layout.experts):
                    handles = store.fetch([key])
                    try:
                        params = layers[key.layer].slot_parameters(handles[0].slot)
                        writer.add(key, quantize_expert(layers[key.layer], params, scheme))
                    finally:
                        store.release(handles)
                    bar.update(1)
                f.flush()
                os.fsync(f.fileno())
            return writer.entries

        dtype = next(t.dtype for t in layout.spec(min(layout.experts)).tensors)
        described = {**scheme.to_json(), **scheme.layout_json(dtype)}
        extra = None
        if non_experts is not None:
            extra = NonExpertScheme(non_experts, non_expert_weights(model, layout))
            if not extra.weights:
                raise ConfigError("the model has no non-expert linear weights to quantize")
        return write_pack(layout, source, dst, write, quantization=described, non_experts=extra)


def non_expert_weights(model: Any, layout: ExpertLayout) -> dict[str, tuple[int, int]]:
    """``{checkpoint tensor: (out, in)}`` of the non-expert weights a non-expert scheme quantizes: each plain
    ``nn.Linear`` weight outside the experts modules stored under its own name (not merged or split on load, not
    tied to another weight), routers excepted."""
    from expertflow.model.loader import _num_experts, tied_keys

    paths = {layer.module_path for layer in model.expert_layers.values()}
    linears = quantizable_linears(model, paths, _num_experts(model.config))
    tied = tied_keys(model)
    out: dict[str, tuple[int, int]] = {}
    for info, _kind in layout.non_expert:
        if (
            len(info.shape) != 2
            or not info.name.endswith(".weight")
            or info.dtype not in ("BF16", "F16", "F32")
        ):
            continue
        key, converter, _ = model.expert_key_mapper.map(info.name)
        module = key.rpartition(".")[0]
        if (
            converter is None
            and key.endswith(".weight")
            and key not in tied
            and linears.get(module) == tuple(info.shape)
        ):
            out[info.name] = linears[module]
    return out


def read_expert(layout: ExpertLayout, key: ExpertKey) -> dict[str, torch.Tensor]:
    """The tensors of one expert of a pack, by role, read from disk (for references and checks, not the hot path)."""
    return {t.role: read_tensor(t) for t in layout.spec(key).tensors}


def dequantized_state_dict(pack: str | os.PathLike[str], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The experts of a quantized pack as the float parameters the kernels compute with, by state-dict key of
    ``model`` (the family's own model: ``[experts, ...]`` in each module's orientation and size)."""
    layout = open_model_checkpoint(pack)
    scheme = scheme_of(layout)
    if scheme is None:
        raise CheckpointError("not a quantized pack", file=str(pack))
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for key in sorted(layout.experts):
        tensors = read_expert(layout, key)
        sources = {t.role: t.source for t in layout.spec(key).tensors}
        for role, value in tensors.items():
            param, _, suffix = role.partition(".")
            if suffix and suffix != "qweight":
                continue
            if suffix == "qweight":
                parts = {s: tensors[f"{param}.{s}"] for s in scheme.suffixes()}
                owner = model.get_submodule(sources[role].rpartition(".")[0])
                out_features, in_features = weight_shape(owner, param)
                value = dequantize(parts, scheme, out_features, in_features)
                if getattr(owner, "is_transposed", False):
                    value = value.T
            stacks.setdefault(sources[role], {})[key.expert] = value
    return {
        name: torch.stack([by_expert[e] for e in sorted(by_expert)]) for name, by_expert in stacks.items()
    }
