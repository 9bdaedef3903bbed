"""Same input, same bits: a layer's expert outputs do not depend on which experts arrived together or in what
order (reads decide that, run to run). Each route's output is kept whole and the routes are combined at the
end as the family's own forward combines them, so greedy tokens repeat and logits are bitwise equal, in bf16
and int4 alike, and equal to transformers' own model."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from expertflow.config import StoreConfig
from expertflow.model.loader import load_model, plan_model
from expertflow.model.quantize_pack import pack_quantized
from expertflow.quant.scheme import QuantScheme
from tests.checkpoints import build_model

PROMPT = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]])
RUNS = 10


@pytest.fixture(scope="module")
def bf16_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bf16") / "mixtral"
    model = build_model("mixtral").to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def int4_mixtral(bf16_mixtral: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_quantized(
        bf16_mixtral, tmp_path_factory.mktemp("int4") / "pack", QuantScheme(4, 32), progress=False
    )


def _arrivals(store: Any, seed: int) -> Any:
    """``store.fetch_as_ready`` with its experts handed out in a shuffled order and split into random waves,
    as different read timings would."""
    real = store.fetch_as_ready
    rng = random.Random(seed)

    def fetch_as_ready(keys: Any) -> Iterator[list[Any]]:
        handles = [h for wave in real(keys) for h in wave]
        rng.shuffle(handles)
        start = 0
        while start < len(handles):
            size = rng.randint(1, len(handles) - start)
            yield handles[start : start + size]
            start += size

    return fetch_as_ready


def _runs(root: Path) -> list[tuple[torch.Tensor, list[int]]]:
    """Logits of PROMPT and 6 greedy tokens, once per arrival order; evictions between layers included."""
    slot = plan_model(root).slot_nbytes
    out = []
    # Room for one layer's 8 experts at once (the shuffle holds a layer's experts together), not for both layers.
    with load_model(root, config=StoreConfig(host_bytes=10 * slot, predictor="none")) as model:
        for seed in range(RUNS):
            model.expert_store.fetch_as_ready = _arrivals(model.expert_store, seed)
            with torch.no_grad():
                logits = model(input_ids=PROMPT).logits
                tokens = model.generate(input_ids=PROMPT, max_new_tokens=6, do_sample=False)[
                    0, PROMPT.shape[1] :
                ]
            out.append((logits, tokens.tolist()))
        assert model.expert_stats().evictions > 0
    return out


@pytest.mark.parametrize("which", ["bf16", "int4"])
def test_logits_and_greedy_tokens_repeat_bit_for_bit_whatever_order_experts_arrive_in(
    which: str, bf16_mixtral: Path, int4_mixtral: Path
) -> None:
    runs = _runs(bf16_mixtral if which == "bf16" else int4_mixtral)
    first_logits, first_tokens = runs[0]
    for logits, tokens in runs[1:]:
        assert torch.equal(logits, first_logits)
        assert tokens == first_tokens


def test_bf16_offloaded_logits_are_transformers_bit_for_bit(bf16_mixtral: Path) -> None:
    reference = transformers.MixtralForCausalLM.from_pretrained(bf16_mixtral, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = reference(input_ids=PROMPT).logits
    logits, _ = _runs(bf16_mixtral)[0]
    assert torch.equal(logits, want)


@pytest.fixture(scope="module")
def fp32_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fp32") / "mixtral"
    build_model("mixtral").save_pretrained(root)
    return root


@pytest.mark.parametrize("which", ["fp32", "bf16", "int4"])
def test_a_layer_computed_in_waves_gives_the_bits_of_one_computed_at_once(
    which: str, fp32_mixtral: Path, bf16_mixtral: Path, int4_mixtral: Path
) -> None:
    """Cold (experts read during the call, several waves), warm (all resident, one wave) and tight (evictions):
    the same logits, bit for bit. A grouped GEMM rounds an expert's rows by where they sit among other experts'
    rows, so this holds only if each expert is computed on its own."""
    root = {"fp32": fp32_mixtral, "bf16": bf16_mixtral, "int4": int4_mixtral}[which]
    slot = plan_model(root).slot_nbytes
    results = []
    for host in (None, 10 * slot):
        with load_model(root, config=StoreConfig(host_bytes=host, predictor="none")) as model:
            for _ in range(2):
                with torch.no_grad():
                    results.append(model(input_ids=PROMPT).logits)
    for logits in results[1:]:
        assert torch.equal(logits, results[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_places_routes_by_position_with_the_bits_of_the_route_search(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """One token's routes go to their experts by position instead of a search over the routes: the logits of
    the step are bitwise those of the search, unquantized and int4, in float32 and bfloat16."""
    src = tmp_path / "src"
    model = build_model("mixtral").to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(src)
    for root in (src, pack_quantized(src, tmp_path / "q", QuantScheme(4, 32), progress=False)):
        with load_model(root, config=StoreConfig(predictor="none")) as model:
            ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
            with torch.no_grad():
                cache = model(input_ids=ids, use_cache=True).past_key_values
                step = ids[:, -1:]
                direct = model(input_ids=step, past_key_values=copy.deepcopy(cache)).logits
                for layer in model.expert_layers.values():
                    layer.one_token_path = False
                searched = model(input_ids=step, past_key_values=cache).logits
        assert torch.equal(direct, searched), root
