"""Benchmark checkpoints: random-weight safetensors files with the expert shapes of real MoE models.

The shapes come from the published configs of real models; the weights are random (nothing is
downloaded). Files are written by ``safetensors`` itself, sharded like ``save_pretrained`` output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from expertflow.config import format_size


@dataclass(frozen=True)
class ExpertShape:
    """Per-expert dimensions of a real MoE family (from its public config.json)."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    layers: int
    top_k: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def expert_nbytes(self) -> int:
        return 3 * self.hidden * self.intermediate * self.dtype.itemsize


PRESETS: dict[str, ExpertShape] = {
    # hidden_size, intermediate_size (per expert), num experts, layers, top-k
    "mixtral-8x7b": ExpertShape("mixtral-8x7b", 4096, 14336, 8, 32, 2),
    "qwen3-30b-a3b": ExpertShape("qwen3-30b-a3b", 2048, 768, 128, 48, 8),
    "olmoe-1b-7b": ExpertShape("olmoe-1b-7b", 2048, 1024, 64, 16, 8),
    "deepseek-v2-lite": ExpertShape("deepseek-v2-lite", 2048, 1408, 64, 26, 6),
}


def write_expert_file(
    root: str | Path,
    shape: ExpertShape,
    total_bytes: int,
    *,
    shard_bytes: int = 1 << 30,
    seed: int = 0,
    on_shard: Callable[[int, int], None] | None = None,
) -> Path:
    """A Mixtral-named safetensors checkpoint holding as many experts of ``shape`` as fit in ``total_bytes``.

    Layers are filled in order; the result is sharded with an index, as ``save_pretrained`` would write it.
    Existing complete output (index present) is reused.
    """
    root = Path(root)
    index_path = root / "model.safetensors.index.json"
    if index_path.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    n_experts = max(1, total_bytes // shape.expert_nbytes)
    keys = [(layer, e) for layer in range(shape.layers) for e in range(shape.experts)][:n_experts]
    per_shard = max(1, shard_bytes // shape.expert_nbytes)
    shards = [keys[i : i + per_shard] for i in range(0, len(keys), per_shard)]
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for layer, e in shard:
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            for w, dims in (
                ("w1", (shape.intermediate, shape.hidden)),
                ("w3", (shape.intermediate, shape.hidden)),
            ):
                tensors[f"{prefix}.{w}.weight"] = _random(dims, shape.dtype, g)
            tensors[f"{prefix}.w2.weight"] = _random((shape.hidden, shape.intermediate), shape.dtype, g)
        save_file(tensors, str(root / fname))
        weight_map.update(dict.fromkeys(tensors, fname))
        if on_shard is not None:
            on_shard(i + 1, len(shards))
    layers = math.ceil(len(keys) / shape.experts)
    config = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_local_experts": shape.experts,
        "num_hidden_layers": layers,
        "num_experts_per_tok": shape.top_k,
        "expertflow_bench": {"preset": shape.name, "experts_written": len(keys)},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    total = sum((root / f).stat().st_size for f in set(weight_map.values()))
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return root


def _random(dims: tuple[int, int], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    # Small normal values: realistic bf16 bit patterns, no NaNs, cheap to generate.
    return (torch.randn(dims, generator=g) * 0.02).to(dtype)


def describe(shape: ExpertShape) -> str:
    return f"{shape.name}: expert {format_size(shape.expert_nbytes)} ({shape.hidden}x{shape.intermediate} x3, bf16)"
