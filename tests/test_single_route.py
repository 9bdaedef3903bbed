"""A decode step's row through one unquantized expert skips transformers' grouping, with the grouped forward's
bits (expertflow.model.single_route)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from expertflow.config import StoreConfig
from expertflow.model.loader import load_model
from tests.checkpoints import FAMILIES, build_model

CASES = [(f, d) for f in FAMILIES for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize(("family", "dtype"), CASES, ids=[f"{f}-{str(d)[6:]}" for f, d in CASES])
def test_a_decode_step_computes_each_expert_directly_with_the_bits_of_the_grouped_forward(
    tmp_path: Path, family: str, dtype: torch.dtype
) -> None:
    src = tmp_path / "src"
    model = build_model(family).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(src)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with load_model(src, config=StoreConfig(predictor="none")) as offloaded, torch.no_grad():
        layers = list(offloaded.expert_layers.values())
        direct_layers = [layer for layer in layers if layer._direct]
        cache = offloaded(input_ids=ids, use_cache=True).past_key_values
        step = ids[:, -1:]
        direct = offloaded(input_ids=step, past_key_values=copy.deepcopy(cache)).logits
        for layer in layers:
            layer._direct = False
        grouped = offloaded(input_ids=step, past_key_values=cache).logits
    if family in ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3"):
        assert direct_layers, "the direct path should take this family's experts"
    if not direct_layers:
        pytest.skip(
            f"{family}: its experts keep the grouped forward (biases, norms or another implementation)"
        )
    assert torch.equal(direct, grouped)
