"""Which checkpoint tensors are a model's routed experts, found from the model itself.

The modules decorated with transformers' experts seam say where experts live in memory; transformers' own
conversion mapping (:class:`~expertflow.model.adapters.KeyMapper`) says which on-disk tensor becomes which
in-memory parameter. Together they name every expert tensor wherever a family keeps it on disk
(``ffn.experts.E.w1``, ``mixer.experts.E.up_proj``, ``layers.L.experts.gate_up_proj``, granite's
``block_sparse_moe.input_linear``...), with no table of families here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from torch import nn

from expertflow.core import name_index
from expertflow.model.adapters import KeyMapper, experts_modules
from expertflow.tiers.layout import ExpertName, Naming, name_by_pattern


def experts_layer_ids(paths: Iterable[str]) -> dict[str, int]:
    """A layer id per experts module: the last number in its path (``layers.3``, ``blocks.3``), offset per
    stack of layers.

    A model with two stacks (an encoder and a decoder, each with ``layers.0..``) gets the second stack's ids
    after the first's, so that every experts module has its own id and a one-stack model keeps its numbers.
    """
    by_stack: dict[str, dict[str, int]] = defaultdict(dict)
    for i, path in enumerate(sorted(paths)):
        parts = path.split(".")
        at = [j for j, part in enumerate(parts) if name_index(part) is not None]
        if at:
            j = at[-1]  # the stack is the path around the number (text_moe and vision_moe are two stacks)
            stack = f"{'.'.join(parts[:j])}#{'.'.join(parts[j + 1 :])}"
            by_stack[stack][path] = int(parts[j])
        else:
            by_stack[path][path] = i
    ids: dict[str, int] = {}
    offset = 0
    for stack in sorted(by_stack):
        layers = by_stack[stack]
        for path, n in layers.items():
            ids[path] = offset + n
        offset += max(layers.values()) + 1
    return ids


def model_naming(model: nn.Module, mapper: KeyMapper, names: Iterable[str]) -> Naming:
    """The naming of the checkpoint tensors ``names`` for ``model`` (on the meta device is enough).

    A tensor is an expert's when transformers loads it into a parameter of an experts module. Per-expert
    tensors carry the expert id as a name component (the ``*`` of transformers' merge patterns); a tensor
    without one is fused, with the expert as its leading dimension. The role is the name below the module's
    on-disk prefix (``w1.weight``, ``input_linear.weight``).
    """
    modules = experts_modules(model)
    layer_of = experts_layer_ids(modules)
    names = list(names)
    mapper.prepare_splits(names)
    by_module: dict[str, list[str]] = defaultdict(list)
    for name in names:
        key, _, _ = mapper.map(name)
        path = key.rpartition(".")[0]
        if path in modules:
            by_module[path].append(name)
    table: dict[str, ExpertName] = {}
    for path, tensor_names in by_module.items():
        for name, named in _name_module(layer_of[path], tensor_names).items():
            local = mapper.split_expert(name)  # an expert of a list split over modules has a local id
            table[name] = named if local is None else named._replace(expert=local)
    return table.get


def _name_module(layer: int, names: list[str]) -> dict[str, ExpertName]:
    """Expert names for the on-disk tensors of one experts module."""
    parts = [n.split(".") for n in names]
    # The module's on-disk prefix: the components every tensor of it shares (the expert id differs, unless
    # there is only one expert, so fall back to the usual convention for that case).
    prefix = 0
    while all(len(p) > prefix + 1 for p in parts) and len({p[prefix] for p in parts}) == 1:
        prefix += 1
    out: dict[str, ExpertName] = {}
    for name, p in zip(names, parts):
        rest = p[prefix:]
        expert = name_index(rest[0]) if len(rest) > 1 else None
        if expert is not None:
            out[name] = ExpertName(layer, expert, ".".join(rest[1:]))
        elif len(names) == 1 or len({q[prefix] for q in parts}) > 1:
            out[name] = ExpertName(layer, None, ".".join(rest))
        else:
            named = name_by_pattern(name)
            if named is not None:
                out[name] = ExpertName(layer, named.expert, named.role)
    return out
