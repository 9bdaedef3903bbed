"""Typed tensor views over raw slot memory: one expert's tensor in one slot, or a layer's tensor over all slots."""

from __future__ import annotations

import torch

from expertflow.core import ExpertKey, torch_dtype
from expertflow.errors import ConfigError
from expertflow.tiers.layout import ExpertLayout


class SlotViews:
    """Views of ``arena`` (uint8 ``[num_slots, slot_nbytes]``) typed by the experts' canonical layout."""

    def __init__(self, layout: ExpertLayout, arena: torch.Tensor) -> None:
        self.layout = layout
        self.arena = arena
        self.num_slots = int(arena.shape[0])
        self._stacked: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}

    def tensor(self, key: ExpertKey, slot: int, role: str) -> torch.Tensor:
        """Tensor ``role`` of expert ``key`` as held in ``slot``."""
        spec = self.layout.spec(key)
        for t, off in spec.views():
            if t.role == role:
                raw = self.arena[slot, off : off + t.nbytes]
                return raw.view(torch_dtype(t.dtype)).view(t.shape)
        raise KeyError(f"expert {key} has no tensor {role!r}; it has {[t.role for t in spec.tensors]}")

    def stacked(self, layer: int, roles: str | tuple[str, ...]) -> torch.Tensor:
        """Typed ``[num_slots, *shape]`` view of tensor(s) ``roles`` of ``layer``'s experts over every slot.

        Several roles must be adjacent in the slot, same dtype and trailing shape; they come back concatenated
        along the expert tensor's first dimension (``("w1.weight", "w3.weight")`` -> ``[slots, 2I, H]``).
        """
        roles_t = (roles,) if isinstance(roles, str) else tuple(roles)
        cache_key = (layer, roles_t)
        cached = self._stacked.get(cache_key)
        if cached is not None:
            return cached
        first_key = next((k for k in self.layout.experts if k.layer == layer), None)
        if first_key is None:
            raise ConfigError(f"layer {layer} has no routed experts in {self.layout.root}")
        by_role = {t.role: (t, off) for t, off in self.layout.spec(first_key).views()}
        missing = [r for r in roles_t if r not in by_role]
        if missing:
            raise ConfigError(f"layer {layer} experts have no tensors {missing}; they have {sorted(by_role)}")
        parts = [by_role[r] for r in roles_t]
        first, start = parts[0]
        pos = start
        for t, off in parts:
            if off != pos or t.dtype != first.dtype or tuple(t.shape[1:]) != tuple(first.shape[1:]):
                raise ConfigError(
                    f"tensors {roles_t} of layer {layer} are not adjacent slices of one dtype/shape"
                )
            pos += t.nbytes
        dtype = torch_dtype(first.dtype)
        el = dtype.itemsize
        shape = (sum(t.shape[0] for t, _ in parts), *first.shape[1:]) if first.shape else ()
        numel = (pos - start) // el
        typed = self.arena.view(dtype)  # [num_slots, slot_nbytes / el]
        view = typed[:, start // el : start // el + numel].view(self.num_slots, *shape)
        self._stacked[cache_key] = view
        return view

    def region(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Typed ``[num_slots, *shape]`` view of the bytes at ``offset`` of every slot: a form a fill transform
        writes there (e.g. experts converted to a kernel's layout), beside or over the stored one."""
        el = dtype.itemsize
        numel = 1
        for d in shape:
            numel *= d
        if offset % el or offset + numel * el > self.arena.shape[1]:
            raise ConfigError(
                f"a {dtype} region of {numel * el} bytes at {offset} does not fit a {self.arena.shape[1]}-byte slot"
            )
        typed = self.arena.view(dtype)
        return typed[:, offset // el : offset // el + numel].view(self.num_slots, *shape)

    def close(self) -> None:
        self._stacked.clear()
        self.arena = torch.empty(0, dtype=torch.uint8)
