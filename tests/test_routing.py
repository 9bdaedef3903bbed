"""Cache-aware routing (opt-in, lossy): a missing expert is replaced by a resident one whose router probability is
within the margin; off by default, exact at margin 0, refused for routing that is not softmax top-k."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from expertflow.config import StoreConfig
from expertflow.errors import ConfigError
from expertflow.model.generate import format_summary, generate
from expertflow.model.loader import load_model
from expertflow.model.routing import CacheAwareRouting
from tests.checkpoints import save_checkpoint


def _routing(probs: list[list[float]], margin: float) -> CacheAwareRouting:
    logits = torch.log(torch.tensor(probs))
    routing = CacheAwareRouting(0, lambda h: logits, margin)
    routing._checked = True  # a hand-made router: nothing to compare with a family's routing
    return routing


def test_a_missing_choice_goes_to_the_likeliest_resident_expert_within_the_margin() -> None:
    probs = [[0.50, 0.44, 0.05, 0.01]]
    chosen = torch.tensor([[0]])
    assert _routing(probs, 0.10)(torch.zeros(1, 2), chosen, resident=[1, 2]).tolist() == [[1]]
    assert _routing(probs, 0.05)(torch.zeros(1, 2), chosen, resident=[1, 2]).tolist() == [[0]]  # 0.06 apart
    assert _routing(probs, 0.10)(torch.zeros(1, 2), chosen, resident=[0]).tolist() == [
        [0]
    ]  # already resident


def test_a_token_never_gets_one_expert_twice() -> None:
    probs = [[0.40, 0.35, 0.20, 0.05]]
    chosen = torch.tensor([[0, 1]])  # both missing; only expert 2 is resident
    routing = _routing(probs, 1.0)
    assert routing(torch.zeros(1, 2), chosen, resident=[2]).tolist() == [[2, 1]]
    assert routing.rerouted == 1 and routing.routed == 2


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint("mixtral", tmp_path_factory.mktemp("routing") / "mixtral", shard_size=None)


IDS = [3, 1, 4, 1, 5, 9, 2, 6]


def _run(path: Path, **routing: object):
    config = StoreConfig(host_bytes=600 << 10, predictor="none", **routing)
    with load_model(path, config=config) as model:
        return generate(model, IDS, 16, ignore_eos=True)


def test_margin_zero_is_exact_and_a_wide_margin_trades_accuracy_for_hits(mixtral: Path) -> None:
    exact = _run(mixtral)
    zero = _run(mixtral, routing="cache-aware", routing_margin=0.0)
    wide = _run(mixtral, routing="cache-aware", routing_margin=1.0)
    assert zero.tokens == exact.tokens and zero.stats["rerouted"] == 0
    assert "rerouted" not in exact.stats and "LOSSY" not in format_summary(exact)
    assert wide.stats["rerouted"] > 0 and "LOSSY: cache-aware routing" in format_summary(wide)
    reads = {name: sum(r.stats["reads"].values()) for name, r in (("exact", exact), ("wide", wide))}
    assert reads["wide"] < reads["exact"]
    assert wide.stats["hit_rate"] > exact.stats["hit_rate"]


def test_routing_that_is_not_softmax_top_k_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint("deepseek_v3", tmp_path / "ds", shard_size=None)  # sigmoid scores, bias, groups
    config = StoreConfig(predictor="none", routing="cache-aware", routing_margin=0.1)
    with load_model(path, config=config) as model, pytest.raises(ConfigError, match="routes otherwise"):
        model(input_ids=torch.tensor([IDS]))


def test_a_margin_outside_0_1_is_refused() -> None:
    with pytest.raises(ConfigError, match="routing_margin"):
        StoreConfig(routing="cache-aware", routing_margin=math.inf)
    with pytest.raises(ConfigError, match="routing must be one of"):
        StoreConfig(routing="nearest")  # type: ignore[arg-type]
