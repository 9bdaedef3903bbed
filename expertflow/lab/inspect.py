"""``expertflow inspect``: what a checkpoint holds and how much memory its experts need.

:func:`describe` turns a layout into plain data (JSON-ready); :func:`format_table` renders it for a person
who is about to choose ``--host-mem``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from expertflow.config import format_size
from expertflow.core import routed_top_k
from expertflow.pipeline.planner import budget_sizes
from expertflow.quant.scheme import QuantScheme
from expertflow.tiers.layout import ExpertLayout, TensorKind

_LAYER_NAMES = ("num_hidden_layers", "n_layer", "num_layers")


def _text_config(config: Mapping[str, object]) -> Mapping[str, object]:
    """The language model's config: the nested ``text_config`` of a vision-language model, else the config."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _config_int(config: Mapping[str, object], names: tuple[str, ...]) -> int | None:
    for scope in (_text_config(config), config):
        for name in names:
            value = scope.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def describe(layout: ExpertLayout) -> dict[str, Any]:
    """Everything a user needs to size budgets for ``layout``, as JSON-serialisable data.

    Host figures are what the host pool really allocates: one buffer per expert, each rounded up to 4 KiB
    (and, for direct reads, large enough for the expert's aligned read).
    """
    experts_per_layer = layout.experts_per_layer()
    num_layers = _config_int(layout.config, _LAYER_NAMES)
    if num_layers is None:
        layers_seen = [k.layer for k in layout.experts]
        num_layers = max(layers_seen) + 1 if layers_seen else 0
    top_k = routed_top_k(layout.config)
    top_k = top_k if top_k is not None and top_k > 0 else None

    first = layout.spec(layout.keys()[0]) if layout.experts else None
    signatures = {tuple((t.role, t.dtype, t.shape) for t in s.tensors) for s in layout.experts.values()}
    empty: dict[str, int | None] = {"slot": 0, "all_experts": 0, "per_layer": 0, "minimum": None}
    mmap = budget_sizes(layout, "mmap") if layout.experts else empty
    direct = budget_sizes(layout, "direct") if layout.experts else empty

    by_kind = {kind.value: 0 for kind in TensorKind}
    count_by_kind = {kind.value: 0 for kind in TensorKind}
    for info, kind in layout.non_expert:
        by_kind[kind.value] += info.nbytes
        count_by_kind[kind.value] += 1

    files: list[dict[str, Any]] = []
    for f in layout.files:
        try:
            size = os.path.getsize(f)
        except OSError:
            size = -1
        files.append({"name": os.path.basename(f), "path": f, "bytes": size})

    desc: dict[str, Any] = {
        "path": layout.root,
        "architecture": layout.architecture,
        "model_type": layout.model_type,
        "packed": layout.packed,
        "fingerprint": layout.fingerprint(),
        "has_experts": bool(layout.experts),
        "num_layers": num_layers,
        "moe_layers": list(layout.moe_layers),
        "dense_layers": [i for i in range(num_layers) if i not in experts_per_layer],
        "experts_per_layer": {str(k): v for k, v in experts_per_layer.items()},
        "num_experts": len(layout.experts),
        "experts_per_token": top_k,
        "bytes_per_expert": layout.max_expert_nbytes,
        "uniform_experts": len(signatures) <= 1,
        "expert_tensors": [
            {"role": t.role, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "source": t.source}
            for t in (first.tensors if first else ())
        ],
        "expert_dtypes": sorted({t.dtype for s in layout.experts.values() for t in s.tensors}),
        "checksums": bool(layout.experts) and all(s.checksum is not None for s in layout.experts.values()),
        "expert_bytes": layout.expert_bytes,
        "non_expert_bytes": layout.non_expert_bytes,
        "non_expert_bytes_by_kind": by_kind,
        "non_expert_tensors_by_kind": count_by_kind,
        "files": files,
        "file_bytes": sum(f["bytes"] for f in files if f["bytes"] >= 0),
        "budget": {
            "host_buffer_bytes": {"mmap": mmap["slot"], "direct": direct["slot"]},
            "host_all_experts_bytes": {"mmap": mmap["all_experts"], "direct": direct["all_experts"]},
            "host_per_layer_bytes": mmap["per_layer"],
            "host_minimum_bytes": mmap["minimum"],
            "resident_non_expert_bytes": layout.non_expert_bytes,
        },
    }
    desc["quantization"] = _quantization(layout)
    desc["prequantized"] = _prequantized(layout)
    if not layout.experts:
        desc["note"] = (
            "no routed experts found: no tensor is named like '...layers.N.mlp.experts.E...' or is a fused "
            "'...layers.N.mlp.experts.<name>' tensor. This is a dense (non-MoE) model or an unsupported "
            "layout; ExpertFlow has nothing to offload."
        )
    return desc


def describe_checkpoint(path: str, *, read_mode: str = "mmap", check_family: bool = False) -> dict[str, Any]:
    """``inspect``: :func:`describe` of the checkpoint's experts as ``load_model`` finds them, with the store plan
    ``generate`` would open here by default (the same planner and reserve as ``load_model``) and what is known
    of the family check (``check_family``: run it now)."""
    from expertflow.config import StoreConfig
    from expertflow.errors import UnsupportedModelError
    from expertflow.model.loader import check_family as run_family_check
    from expertflow.model.loader import family_status, open_layout, plan_model
    from expertflow.model.working_set import activation_bytes, config_dtype
    from expertflow.pipeline.planner import plan_store

    layout = open_layout(path)
    desc = describe(layout)
    if layout.experts:
        config = StoreConfig(read_mode=read_mode)
        try:
            plan = plan_model(path, config, layout=layout)
        except UnsupportedModelError:
            # transformers cannot build this model (open_layout fell back to the model-free naming): the plan
            # from the files alone, non-expert weights as stored.
            reserve = activation_bytes(layout.config, config_dtype(layout.config), config.context_tokens)
            plan = plan_store(layout, config, layout.non_expert_bytes + reserve)
        desc["budget"]["default"] = plan.as_dict()
        if check_family:
            run_family_check(path, refresh=True)
        desc["family_check"] = family_status(path)
    return desc


_LINEAR_SUFFIXES = ("qweight", "weight_packed")


def _prequantized(layout: ExpertLayout) -> dict[str, Any] | None:
    """A pre-quantized checkpoint's ``quantization_config`` in short, and its quantized non-expert layers."""
    qc = layout.config.get("quantization_config")
    if not isinstance(qc, Mapping):
        return None
    layers = {
        t.name.rpartition(".")[0]
        for t, _ in layout.non_expert
        if t.name.rpartition(".")[2] in _LINEAR_SUFFIXES
    }
    quantized_bytes = sum(t.nbytes for t, _ in layout.non_expert if t.name.rpartition(".")[0] in layers)
    groups = qc.get("config_groups") or {}
    weights = next(iter(groups.values()), {}).get("weights", {}) if groups else {}
    return {
        "method": qc.get("quant_method"),
        "bits": qc.get("bits", weights.get("num_bits")),
        "group_size": qc.get("group_size", weights.get("group_size")),
        "non_expert_quantized_layers": len(layers),
        "non_expert_quantized_bytes": quantized_bytes,
    }


def _prequantized_text(q: Mapping[str, Any]) -> str:
    return (
        f"{q['method']} {q['bits']}-bit, groups of {q['group_size']}: experts stay quantized (converted to the "
        f"kernel layout at each slot fill); {q['non_expert_quantized_layers']} quantized non-expert layers "
        f"({format_size(q['non_expert_quantized_bytes'])}) are dequantized once at load"
    )


def _quantization_text(q: Mapping[str, Any] | None) -> str:
    if q is None:
        return "none (experts as the checkpoint stores them: lossless)"
    group = f"groups of {q['group_size']}" if q["group_size"] else "per output channel"
    return (
        f"{q['name']}: {q['bits']}-bit weights, {group}, {q['method']}; {q['layout']} layout; "
        f"{format_size(q['bytes_per_expert'])} per expert (lossy)"
    )


def _quantization(layout: ExpertLayout) -> dict[str, Any] | None:
    """A quantized pack's scheme: bits, group size, method, the kernel layout and the bytes per expert."""
    if layout.quantization is None:
        return None
    scheme = QuantScheme.from_json(layout.quantization, layout.root)
    return {
        **scheme.to_json(),
        "name": scheme.name,
        "layout": scheme.layout_name(),
        "bytes_per_expert": layout.max_expert_nbytes,
    }


def format_table(desc: Mapping[str, Any]) -> str:
    """A readable report of :func:`describe`'s output, ending with the budgets to choose from."""
    rows: list[tuple[str, str]] = [
        ("model", f"{desc['architecture']} (model_type {desc['model_type']})"),
        ("path", str(desc["path"])),
        (
            "format",
            "ExpertFlow pack (expert-major, 4 KiB aligned, checksummed)" if desc["packed"] else "safetensors",
        ),
        ("fingerprint", str(desc["fingerprint"])),
    ]
    check = desc.get("family_check")
    if check is not None:
        # verified / refused / not yet checked: whether the offloaded experts are proved exact for this family
        rows.append(
            (
                "family check",
                f"{check['status']}: {check['detail']}",
            )
        )
    lines: list[str] = []
    if not desc["has_experts"]:
        rows.append(("layers", str(desc["num_layers"])))
        rows.append(("weights", format_size(desc["non_expert_bytes"])))
        lines += _rows(rows)
        lines += ["", f"NO EXPERTS: {desc['note']}"]
        lines += ["", *_files(desc)]
        return "\n".join(lines)

    per_layer = desc["experts_per_layer"]
    counts = sorted(set(per_layer.values()))
    moe = desc["moe_layers"]
    rows += [
        (
            "layers",
            f"{desc['num_layers']} ({len(moe)} MoE: {_ranges(moe)}"
            + (f"; dense: {_ranges(desc['dense_layers'])})" if desc["dense_layers"] else ")"),
        ),
        (
            "experts per layer",
            ", ".join(str(c) for c in counts)
            + (f" (top-{desc['experts_per_token']} per token)" if desc["experts_per_token"] else ""),
        ),
        ("experts", str(desc["num_experts"])),
        (
            "bytes per expert",
            f"{format_size(desc['bytes_per_expert'])} ({desc['bytes_per_expert']} B)"
            + ("" if desc["uniform_experts"] else ", largest; experts differ across layers"),
        ),
        ("expert dtypes", ", ".join(desc["expert_dtypes"])),
        (
            "quantization",
            _prequantized_text(desc["prequantized"])
            if desc.get("prequantized")
            else _quantization_text(desc.get("quantization")),
        ),
        ("checksums", "yes (verified on every read)" if desc["checksums"] else "no (pack to add them)"),
    ]
    lines += _rows(rows)
    lines += ["", "tensors of one expert (canonical order):"]
    tensor_rows = [
        (t["role"], t["dtype"], "x".join(str(d) for d in t["shape"]) or "scalar", format_size(t["nbytes"]))
        for t in desc["expert_tensors"]
    ]
    lines += _grid(("role", "dtype", "shape", "size"), tensor_rows)

    total = desc["expert_bytes"] + desc["non_expert_bytes"]
    lines += ["", "bytes:"]
    bytes_rows = [("experts", format_size(desc["expert_bytes"]), _pct(desc["expert_bytes"], total))]
    bytes_rows.append(
        ("non-expert", format_size(desc["non_expert_bytes"]), _pct(desc["non_expert_bytes"], total))
    )
    for kind, n in desc["non_expert_bytes_by_kind"].items():
        if n:
            count = desc["non_expert_tensors_by_kind"][kind]
            bytes_rows.append(
                (f"  {kind.replace('_', ' ')} ({count} tensors)", format_size(n), _pct(n, total))
            )
    lines += _grid(("part", "size", "share"), bytes_rows)

    lines += ["", *_files(desc)]

    budget = desc["budget"]
    all_mmap, all_direct = (
        budget["host_all_experts_bytes"]["mmap"],
        budget["host_all_experts_bytes"]["direct"],
    )
    lines += ["", "budgets (host buffers are 4 KiB aligned, one per resident expert):"]
    all_text = format_size(all_mmap)
    if all_direct != all_mmap:
        all_text += f" ({format_size(all_direct)} with --read-mode direct, until `expertflow pack`)"
    lines.append(
        f"  host budget for all experts: {all_text}; per layer: {format_size(budget['host_per_layer_bytes'])}"
    )
    if budget["host_minimum_bytes"]:
        lines.append(
            f"  minimum host budget (top-{desc['experts_per_token']} experts resident): "
            f"{format_size(budget['host_minimum_bytes'])}"
        )
    lines.append(
        f"  always resident (non-expert weights): {format_size(budget['resident_non_expert_bytes'])}"
    )
    default = budget.get("default")
    if default:
        lines.append(
            f"  default host budget on this machine (what `generate` opens): {format_size(default['host_bytes'])} "
            f"({default['slots']} of {default['experts']} experts in {format_size(default['slot_bytes'])} slots, "
            f"{default['reads_in_flight']} reads in flight): {default['reason']}"
        )
    return "\n".join(lines)


def _files(desc: Mapping[str, Any]) -> list[str]:
    rows = [(f["name"], format_size(f["bytes"]) if f["bytes"] >= 0 else "missing") for f in desc["files"]]
    rows.append(("total", format_size(desc["file_bytes"])))
    return [f"files ({len(desc['files'])}):", *_grid(("file", "size"), rows)]


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def _grid(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    if not values:
        return "none"
    parts = []
    start = prev = values[0]
    for v in values[1:]:
        if v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        start = prev = v
    parts.append(f"{start}-{prev}" if prev > start else str(start))
    return ", ".join(parts)
