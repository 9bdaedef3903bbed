"""The predictive contender of the trace replay: the runtime's predictor, predictive policy and admission rule,
driven by a routing trace as ``generate`` drives them; prefetch with admission control; honesty."""

from __future__ import annotations

import numpy as np
import pytest

from expertflow.core import ExpertKey
from expertflow.lab.replay import (
    ReplayEvent,
    RuntimePrediction,
    access_sequence,
    compare_policies,
    replay,
)
from expertflow.pipeline.cache import admits_prefetch
from expertflow.pipeline.policy import PredictivePolicy
from expertflow.pipeline.traces import RoutingTrace


def random_trace(seed: int, tokens: int = 40, layers: int = 4, experts: int = 8) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(experts) * 0.5, size=layers)
    ids = np.array(
        [
            [rng.choice(experts, 2, replace=False, p=probs[layer]) for layer in range(layers)]
            for _ in range(tokens)
        ],
        dtype=np.int16,
    )
    return RoutingTrace(ids, np.ones(ids.shape, np.float32), tuple(range(layers)), experts)


def chained_trace(seed: int, tokens: int = 120, layers: int = 8) -> RoutingTrace:
    """Layer 0 routes at random; every later layer's experts are a fixed function of the layer before."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((tokens, layers, 2), np.int16)
    for t in range(tokens):
        ids[t, 0] = rng.choice(8, 2, replace=False)
        for layer in range(1, layers):
            ids[t, layer] = (ids[t, layer - 1] * 3 + layer) % 8  # a bijection of the 8 experts
    return RoutingTrace(ids, np.ones(ids.shape, np.float32), tuple(range(layers)), 8)


def demanded(trace: RoutingTrace, token: int, layer_pos: int) -> set[ExpertKey]:
    lid = trace.layer_ids[layer_pos]
    return {ExpertKey(lid, int(e)) for e in trace.experts[token, layer_pos]}


@pytest.mark.parametrize("partitioned", [True, False])
def test_predictive_decisions_depend_only_on_the_past_of_the_trace(partitioned):
    # Two traces share everything up to token 20, layer 1, and differ afterwards (rest of token 20 and
    # all later tokens). A policy that looked ahead would act differently on the shared part; it must not.
    a = random_trace(0)
    b_ids = a.experts.copy()
    b_ids[20, 2:] = random_trace(1).experts[20, 2:]
    b_ids[21:] = random_trace(2).experts[21:]
    b = RoutingTrace(b_ids, a.weights, a.layer_ids, 8)
    shared = len(access_sequence(RoutingTrace(a.experts[:20], a.weights[:20], a.layer_ids, 8))) + 4
    assert access_sequence(a)[:shared] == access_sequence(b)[:shared]
    assert access_sequence(a)[shared:] != access_sequence(b)[shared:]
    for cap in (1, 2, 3):
        ev_a: list[ReplayEvent] = []
        ev_b: list[ReplayEvent] = []
        ra = replay(a, "predictive", cap, partitioned=partitioned, on_event=ev_a.append)
        rb = replay(b, "predictive", cap, partitioned=partitioned, on_event=ev_b.append)
        assert ra.outcomes[:shared] == rb.outcomes[:shared]
        # every load, eviction and prefetch up to the end of token 20's layer 1 is the same too
        before = [e for e in ev_a if (e.token, e.layer) <= (20, 1)]
        assert before == [e for e in ev_b if (e.token, e.layer) <= (20, 1)]


def test_the_replay_feeds_the_runtime_predictor_each_layer_once_its_router_has_run():
    """Token by token, layer by layer, exactly the trace's routing: the predictor never sees a layer before
    its router ran (nothing of the future), and predicts right then, as the runtime does at each route."""
    trace = random_trace(3, tokens=15)
    seen: list[tuple[int, tuple[int, ...]]] = []

    class Spy(RuntimePrediction):
        def route(self, layer, experts):
            seen.append((layer, tuple(experts)))
            return super().route(layer, experts)

    replay(trace, "predictive", 2, partitioned=True, prediction=Spy(trace))
    expected = [
        (lid, tuple(dict.fromkeys(int(e) for e in trace.experts[t, li])))
        for t in range(trace.tokens)
        for li, lid in enumerate(trace.layer_ids)
    ]
    assert seen == expected


@pytest.mark.parametrize("seed", range(3))
def test_admission_control_never_evicts_what_the_current_token_demands_now_or_next(seed):
    partitioned = False  # the runtime's one cache: with a cache per layer, the next layer's is all protected
    trace = random_trace(seed)
    events: list[ReplayEvent] = []
    forced: list[ReplayEvent] = []  # a cache of one expert per layer cannot hold a top-2 layer's experts
    for cap in (1, 2, 3):
        replay(
            trace,
            "predictive",
            cap,
            partitioned=partitioned,
            on_event=(forced if cap == 1 else events).append,
        )
    events += [e for e in forced if e.kind == "prefetch"]
    prefetches = [e for e in events if e.kind == "prefetch"]
    assert prefetches and any(e.victim is not None for e in prefetches)
    for e in prefetches:
        li = trace.layer_ids.index(e.layer)
        # issued once layer li of the token is computed, for the next layer (the runtime predicts within a
        # forward: nothing after the last layer)
        assert li + 1 < trace.num_layers and e.key.layer == trace.layer_ids[li + 1]
        # never an expert of the layer being computed or of the next one (the runtime protects both)
        assert e.victim is None or e.victim.layer not in (e.layer, e.key.layer)
        assert e.victim not in demanded(trace, e.token, li)
    for e in events:
        if e.kind == "evict":  # a demand miss never evicts the other expert its layer is computing
            assert e.victim not in demanded(trace, e.token, trace.layer_ids.index(e.layer))


def test_the_admission_rule_is_the_cache_levels():
    assert admits_prefetch(0.5, 0.2, 0.0) and not admits_prefetch(0.5, 0.5, 0.0)  # only a less likely victim
    assert not admits_prefetch(0.5, 0.2, 0.45)  # 0.5 < 0.45 * 1.2: the read path is too busy for it
    assert admits_prefetch(1.0, 0.9, 0.5)  # a certain prefetch is worth a read at any load below it


def test_admit_takes_a_slot_only_from_a_strictly_less_likely_expert():
    prob = {ExpertKey(0, 0): 0.9, ExpertKey(0, 1): 0.2, ExpertKey(0, 2): 0.5, ExpertKey(0, 3): 0.2}
    pol = PredictivePolicy(prob.__getitem__, layers=[0])
    resident = [ExpertKey(0, 0), ExpertKey(0, 1)]
    assert pol.admit(ExpertKey(0, 2), resident) == ExpertKey(0, 1)
    assert pol.admit(ExpertKey(0, 3), resident) is None  # a tie does not pay for a load
    assert pol.admit(ExpertKey(0, 2), [ExpertKey(0, 0)]) is None
    assert pol.admit(ExpertKey(0, 2), []) is None


def test_prefetch_loads_are_counted_in_loads_per_token():
    trace = random_trace(4)
    events: list[ReplayEvent] = []
    r = replay(trace, "predictive", 2, on_event=events.append)
    d = replay(trace, "predictive_demand", 2)
    kinds = [e.kind for e in events]
    assert r.prefetch_loads == kinds.count("prefetch") > 0
    assert r.misses == kinds.count("miss") and r.hits == kinds.count("hit")
    assert r.loads == r.misses + r.prefetch_loads
    assert r.loads_per_token == pytest.approx(r.loads / trace.tokens)
    assert 0 < r.prefetch_used <= r.prefetch_loads
    assert r.prefetch_precision == pytest.approx(r.prefetch_used / r.prefetch_loads)
    assert d.prefetch_loads == 0 and d.loads == d.misses
    row = compare_policies({"t": trace}, capacities=(2,), policies=("lru", "predictive", "belady"))[0]
    assert row["predictive_loads_per_token"] == pytest.approx(r.loads_per_token)
    assert row["predictive_prefetch_precision"] == pytest.approx(r.prefetch_precision)
    lru = replay(trace, "lru", 2)
    assert row["lru_loads_per_token"] == pytest.approx(lru.misses / trace.tokens)
    assert "lru_prefetch_precision" not in row


def test_predictive_beats_lru_clearly_on_a_strong_layer_to_layer_pattern():
    trace = chained_trace(5)
    for cap in (2, 3):
        lru = replay(trace, "lru", cap).hit_rate
        pred = replay(trace, "predictive", cap)
        assert pred.hit_rate > lru + 0.3, (cap, lru, pred.hit_rate)
        assert pred.prefetch_precision > 0.6  # layer 0 is random: predictions of layer 1 mostly miss


@pytest.mark.parametrize("policy", ["lru", "lfu", "static", "belady", "predictive_demand"])
def test_no_policy_evicts_an_expert_its_layer_is_computing(policy):
    """As the runtime pins a layer's experts before loading any of them: a fair replay for every policy (before,
    only the predictive one was held to it, and LRU looked worse than it is)."""
    trace = random_trace(7)
    for cap in (2, 3):
        events: list[ReplayEvent] = []
        replay(trace, policy, cap, partitioned=True, on_event=events.append)
        for e in events:
            if e.kind == "evict":
                assert e.victim not in demanded(trace, e.token, trace.layer_ids.index(e.layer)), (
                    policy,
                    cap,
                    e,
                )


def test_with_a_cache_per_layer_the_runtimes_admission_leaves_prefetch_no_slot():
    """A prefetch never evicts an expert of the next layer (it would be needed as soon as the one it brings);
    with one cache per layer that is every candidate once the cache is full."""
    r = replay(chained_trace(5), "predictive", 2, partitioned=True)
    assert r.prefetch_loads == 0 and r.hits + r.misses > 0


def test_the_replay_predicts_what_generate_predicted_from_the_same_routing(checkpoints, monkeypatch):
    """``bench policies`` and ``generate`` run the same predictor: a trace recorded while generating, replayed,
    gives the runtime's predictions, call for call (stats mode: a trace has no hidden states; a one-token
    prompt, so that every forward sees one token, as the replay does)."""
    import torch

    from expertflow.config import StoreConfig
    from expertflow.model.generate import generate
    from expertflow.model.loader import load_model, plan_model
    from expertflow.model.tracing import RoutingRecorder

    root = checkpoints.get("mixtral")
    slot = plan_model(root).slot_nbytes
    config = StoreConfig(host_bytes=4 * slot, predictor="stats", prefetch_depth=1)
    with load_model(root, config=config) as model:
        predictor = model.expert_predictor
        assert predictor is not None and predictor.mode == "stats"
        # Read pressure would make the runtime skip some predictions (timing): not what is compared here.
        monkeypatch.setattr(model.expert_store, "prefetch_floor", lambda: 0.0)
        made: list[list] = []
        real_predict = predictor.predict

        def predict(layer, hidden):
            out = real_predict(layer, hidden)
            made.append(out)
            return out

        monkeypatch.setattr(predictor, "predict", predict)
        recorder = RoutingRecorder(model)
        generate(model, [7], max_new_tokens=12, ignore_eos=True)
        trace = recorder.finish()
    lab = RuntimePrediction(trace, depth=1)
    replayed = [
        lab.route(lid, [int(e) for e in trace.experts[t, li]])
        for t in range(trace.tokens)
        for li, lid in enumerate(trace.layer_ids)
    ]
    assert trace.tokens == 12 and len(made) == len(replayed)
    assert any(made) and replayed == made
    assert torch.equal(
        torch.tensor([p for ps in made for _, p in ps]), torch.tensor([p for ps in replayed for _, p in ps])
    )
