"""Expert prediction: learned statistics, gate look-ahead, measured precision/recall, adaptive depth, wiring."""

from __future__ import annotations

import torch

from expertflow.config import StoreConfig
from expertflow.core import ExpertKey
from expertflow.model.loader import load_model
from expertflow.pipeline.predictor import Predictor
from expertflow.pipeline.sync import ExpertStore
from expertflow.tiers.safetensors_index import open_checkpoint


def test_statistics_learn_a_deterministic_layer_to_layer_transition():
    p = Predictor([0, 1], 4, top_k=1, mode="stats", depth=1)
    for t in range(40):
        e = t % 4
        p.predict(0, torch.zeros(1, 8))  # before learning, predictions may be wrong
        p.observe(0, torch.tensor([[e]]))
        p.predict(0, torch.zeros(1, 8))
        p.observe(1, torch.tensor([[(e + 1) % 4]]))
    p._hits.clear()
    for e in range(4):
        p.observe(0, torch.tensor([[e]]))
        preds = p.predict(0, torch.zeros(1, 8))
        assert ExpertKey(1, (e + 1) % 4) in {k for k, _ in preds}
        p.observe(1, torch.tensor([[(e + 1) % 4]]))
    assert p.stats()["by_distance"][1]["recall"] == 1.0


def test_lookahead_with_the_true_router_predicts_perfectly_and_nearer_layers_first():
    w1, w2 = torch.randn(6, 8), torch.randn(6, 8)
    p = Predictor(
        [0, 1, 2], 6, top_k=2, mode="lookahead", depth=2, gates={1: lambda x: x @ w1.T, 2: lambda x: x @ w2.T}
    )
    x = torch.randn(1, 8)  # decode: one token
    p.observe(0, torch.tensor([[0, 1]]))
    preds = p.predict(0, x)
    assert {k.layer for k, _ in preds} == {1, 2}
    # Priority = estimated chance of use: before any scoring, 1/distance for an expert every token wants.
    assert {pr for k, pr in preds if k.layer == 1} == {1.0}
    assert {pr for k, pr in preds if k.layer == 2} == {0.5}
    p.observe(1, (x @ w1.T).topk(2).indices)
    p.observe(2, (x @ w2.T).topk(2).indices)
    by_d = p.stats()["by_distance"]
    assert by_d[1]["recall"] == by_d[2]["recall"] == 1.0 and by_d[1]["precision"] == 1.0


def test_precision_and_recall_count_exactly_what_was_predicted():
    p = Predictor(
        [0, 1],
        4,
        top_k=2,
        mode="lookahead",
        depth=1,
        gates={1: lambda x: torch.tensor([[4.0, 3.0, 0.0, 0.0]])},
    )
    p.observe(0, torch.tensor([[2, 3]]))
    p.predict(0, torch.zeros(1, 2))  # predicts {0, 1}
    p.observe(1, torch.tensor([[1, 2]]))  # one of two right
    d1 = p.stats()["by_distance"][1]
    assert (d1["precision"], d1["recall"], d1["predicted"], d1["actual"]) == (0.5, 0.5, 2, 2)


def test_adaptive_depth_grows_on_stalls_and_shrinks_when_quiet():
    p = Predictor([0, 1, 2, 3], 8, top_k=2, max_depth=3)
    assert p.depth == 1
    p.record_stall(True)
    p.record_stall(True)
    p.record_stall(True)
    assert p.depth == 3
    for _ in range(4 * 4):
        p.record_stall(False)
    assert p.depth == 2


def test_prefetch_changes_no_output_and_its_predictions_are_used(checkpoints):
    path = checkpoints.get("mixtral")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    outs = {}
    for predictor in ("none", "combined"):
        config = StoreConfig(host_bytes=400 << 10, predictor=predictor, policy="predictive", prefetch_depth=2)
        with load_model(path, config=config) as model:
            outs[predictor] = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
            stats = model.expert_store.stats()
            if predictor == "combined":
                assert model.expert_predictor is not None
                by_d = model.expert_predictor.stats()["by_distance"]
                assert by_d[1]["actual"] > 0
                assert stats.prefetch_issued > 0
            else:
                assert model.expert_predictor is None and stats.prefetch_issued == 0
    assert torch.equal(outs["none"], outs["combined"])


def test_prediction_on_the_trained_model_beats_chance(shared_model_dir):
    text = b"import json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n" * 2
    ids = torch.tensor([list(text)])
    config = StoreConfig(host_bytes=4 << 20, predictor="combined", prefetch_depth=2)
    with load_model(shared_model_dir, config=config) as model, torch.no_grad():
        past = None
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
        by_d = model.expert_predictor.stats()["by_distance"]
    assert by_d[1]["recall"] > 0.5  # random top-2 of 8 would be 0.25


def test_distances_predicted_no_better_than_chance_are_not_prefetched():
    g = torch.Generator().manual_seed(0)
    p = Predictor([0, 1], 8, top_k=2, mode="stats", depth=1, warmup=32)
    for _ in range(100):  # random routing: nothing to learn
        p.observe(0, torch.randperm(8, generator=g)[:2].view(1, 2))
        p.predict(0, torch.zeros(1, 4))
        p.observe(1, torch.randperm(8, generator=g)[:2].view(1, 2))
    d1 = p.stats()["by_distance"][1]
    assert d1["precision"] < 0.4 and not d1["prefetching"]
    p.observe(0, torch.tensor([[0, 1]]))
    assert p.predict(0, torch.zeros(1, 4)) == []  # still scored against the routing, but nothing fetched
    p.observe(1, torch.tensor([[2, 3]]))
    assert p.stats()["by_distance"][1]["predicted"] > d1["predicted"]


def test_unpredicted_experts_score_their_observed_chance_of_use():
    p = Predictor([0, 1], 4, top_k=1, mode="stats", depth=1)
    for _ in range(200):
        p.observe(0, torch.tensor([[3]]))
        p.observe(1, torch.tensor([[0]]))
    assert p.scores(ExpertKey(0, 3)) > 0.9  # chosen at every visit
    assert p.scores(ExpertKey(0, 2)) == 0.0  # never chosen
    assert p.scores(ExpertKey(5, 0)) == 0.0  # a layer it never saw


def test_no_prediction_runs_when_the_budget_leaves_no_memory_headroom(checkpoints):
    path = checkpoints.get("mixtral")
    # Besides the pool, the process "needs" a terabyte: the explicit budget cannot fit, so every uncertain
    # prefetch would be refused and the look-ahead would be pure cost.
    tight = StoreConfig(host_bytes=400 << 10, predictor="combined", host_reserve_bytes=1 << 40)
    with load_model(path, config=tight) as model:
        assert not model.expert_store.budget.fits and model.expert_predictor is None
    roomy = StoreConfig(host_bytes=400 << 10, predictor="combined")
    with load_model(path, config=roomy) as model:
        assert model.expert_store.budget.fits and model.expert_predictor is not None


class _SaturatedStore(ExpertStore):
    """A store whose reads are fully busy: admission would refuse every prefetch short of a certain one."""

    def prefetch_floor(self) -> float:
        return 1.0


def test_no_look_ahead_runs_while_reads_are_too_busy_to_admit_any_prediction(checkpoints):
    path = checkpoints.get("mixtral")
    layout = open_checkpoint(path)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    config = StoreConfig(host_bytes=400 << 10, predictor="combined", policy="predictive", prefetch_depth=1)
    runs = {}
    for name, kind in (("idle", ExpertStore), ("saturated", _SaturatedStore)):
        with kind(layout, config) as store:
            model = load_model(path, store=store, layout=layout)
            out = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False)
            runs[name] = (out, model.expert_predictor, store.stats())
    idle, saturated = runs["idle"][1], runs["saturated"][1]
    assert idle.skipped == 0
    # While the precision is a prior (1.0 at distance 1) a prediction could be certain, so it is made; once
    # measured below 1, no prediction can reach the floor and the look-ahead is skipped at every layer.
    precision = saturated.precision(1)
    assert precision < 1.0 and saturated.skipped > 0
    assert saturated.stats()["by_distance"][1]["predicted"] < idle.stats()["by_distance"][1]["predicted"]
    # Nothing was posted to the store after that: every prefetch it saw was a certain one or none at all.
    assert runs["saturated"][2].prefetch_issued < runs["idle"][2].prefetch_issued
    assert torch.equal(runs["idle"][0], runs["saturated"][0])


def test_a_predictor_that_finds_nothing_worth_a_read_switches_itself_off_and_wakes_to_look_again(checkpoints):
    """Prediction must not cost decode time when nothing it predicts can be admitted: after two whole passes of
    skips it does no work at all (not even its bookkeeping) for DORMANT_PASSES passes, then looks again."""
    from expertflow.model import prefetch

    path = checkpoints.get("mixtral")
    layout = open_checkpoint(path)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    config = StoreConfig(host_bytes=400 << 10, predictor="combined", prefetch_depth=1)
    with _SaturatedStore(layout, config) as store:
        model = load_model(path, store=store, layout=layout)
        predictor = model.expert_predictor
        events: list[str] = []
        real_observe, real_doze = predictor.observe, predictor.doze
        predictor.observe = lambda layer, ids: (events.append("observe"), real_observe(layer, ids))[1]
        predictor.doze = lambda: (events.append("doze"), real_doze())[1]
        passes = 80  # forward passes: the prompt's, then one per new token but the last
        model.generate(input_ids=ids, max_new_tokens=passes, do_sample=False, min_new_tokens=passes)
        layers = len(model.expert_layers)
        stats = predictor.stats()
    # Every visit is either observed or slept through, and sleeping covers most of them.
    assert len(events) == passes * layers
    assert stats["dormant"] == events.count("doze") >= prefetch.DORMANT_PASSES * layers
    # Asleep only after two whole passes of skips; awake again (observing) after sleeping.
    first_doze = events.index("doze")
    assert first_doze >= 2 * layers
    assert "observe" in events[first_doze + prefetch.DORMANT_PASSES * layers :]
