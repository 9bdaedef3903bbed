"""Helpers for store tests: a real safetensors checkpoint with Mixtral naming, and instrumented sources."""

from __future__ import annotations

import asyncio
import json
import mmap
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from expertflow.core import ExpertKey
from expertflow.errors import ExpertReadError
from expertflow.tiers.nvme import NvmeTier


def write_moe_checkpoint(
    root: Path, *, layers: int = 3, experts: int = 8, hidden: int = 32, inter: int = 48
) -> Path:
    """A real safetensors checkpoint whose expert tensors follow Mixtral's on-disk names."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(16, hidden, generator=g)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        tensors[f"{prefix}.gate.weight"] = torch.randn(experts, hidden, generator=g)
        for e in range(experts):
            tensors[f"{prefix}.experts.{e}.w1.weight"] = torch.randn(inter, hidden, generator=g)
            tensors[f"{prefix}.experts.{e}.w2.weight"] = torch.randn(hidden, inter, generator=g)
            tensors[f"{prefix}.experts.{e}.w3.weight"] = torch.randn(inter, hidden, generator=g)
    save_file(tensors, str(root / "model.safetensors"))
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_hidden_layers": layers}
    (root / "config.json").write_text(json.dumps(config))
    return root


def reference_tensors(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(root / "model.safetensors"))


class GatedSource:
    """The real NVMe tier behind gates: a test decides when each read may proceed, and sees reads start.

    ``log`` records keys in the order reads start. Keys in ``fail`` raise ExpertReadError.
    """

    name = "gated"

    def __init__(self, nvme: NvmeTier, *, gated: bool = False, fail: Iterable[ExpertKey] = ()) -> None:
        self.nvme = nvme
        self.gated = gated
        self.fail = set(fail)
        self.log: list[ExpertKey] = []
        self.started: asyncio.Queue[ExpertKey] = asyncio.Queue()
        self._gates: dict[ExpertKey, asyncio.Event] = {}
        self.reads: dict[ExpertKey, int] = {}
        self.active = 0
        self.max_active = 0

    def buffer_nbytes(self, key: ExpertKey | None = None) -> int:
        return self.nvme.buffer_nbytes(key)

    def gate(self, key: ExpertKey) -> asyncio.Event:
        return self._gates.setdefault(key, asyncio.Event())

    def open_all(self) -> None:
        self.gated = False
        for ev in self._gates.values():
            ev.set()

    async def read(self, key: ExpertKey, buf: memoryview) -> int:
        self.log.append(key)
        self.reads[key] = self.reads.get(key, 0) + 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.started.put_nowait(key)
        try:
            if self.gated:
                await self.gate(key).wait()
            else:
                await asyncio.sleep(0)
            if key in self.fail:
                raise ExpertReadError("injected read failure", key=key)
            return await self.nvme.read(key, buf)
        finally:
            self.active -= 1

    async def aclose(self) -> None:
        await self.nvme.aclose()


@contextmanager
def aligned(nbytes: int, fill: int = 0xA5) -> Iterator[memoryview]:
    """A page-aligned buffer full of junk, so that bytes a read forgets to write cannot pass as correct."""
    raw = mmap.mmap(-1, max(nbytes, 1))
    raw.write(bytes([fill]) * len(raw))
    view = memoryview(raw)
    try:
        yield view
    finally:
        view.release()
        raw.close()
