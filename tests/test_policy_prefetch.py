"""The predictive contender of the trace replay: online routing model, prefetch with admission control, honesty."""

from __future__ import annotations

import numpy as np
import pytest

from expertflow.core import ExpertKey
from expertflow.lab.replay import (
    OnlineRoutingModel,
    ReplayEvent,
    access_sequence,
    compare_policies,
    replay,
)
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


def test_online_model_learns_a_token_only_once_it_is_finished():
    model = OnlineRoutingModel((0, 1, 2), 8, 2)
    uniform = model.probabilities(1).copy()
    np.testing.assert_allclose(uniform, np.full(8, 0.25))
    model.observe_layer(0, (3, 4))
    model.observe_layer(1, (5, 6))
    assert model.use.sum() == 0 and model.tokens_seen == 0  # nothing learned mid-token
    np.testing.assert_allclose(model.probabilities(2), uniform)  # layer 2 not computed: nothing known yet
    model.observe_layer(2, (7, 0))
    model.end_token()
    assert model.tokens_seen == 1 and model.use.sum() == 6 and not model.current
    # the next token routes 3 at layer 0: its layer 1 now leans to what followed 3 last time
    model.observe_layer(0, (3, 1))
    p = model.probabilities(1)
    assert p[5] == p[6] == p.max() and p[5] > 0.25


def test_replay_feeds_the_model_only_finished_tokens_and_computed_layers():
    trace = random_trace(3, tokens=15)
    seen: list[tuple[int, int, int]] = []

    class Spy(OnlineRoutingModel):
        def probabilities(self, layer: int) -> np.ndarray:
            seen.append((self.tokens_seen, int(self.use.sum()), max(self.current, default=-1)))
            return super().probabilities(layer)

    replay(trace, "predictive", 2, partitioned=True, model=Spy(trace.layer_ids, 8, 2))
    assert seen
    for tokens_seen, uses, _ in seen:
        assert uses == 2 * trace.num_layers * tokens_seen  # counts of finished tokens only
    assert max(s[0] for s in seen) == trace.tokens  # learned all of them by the end, not before


@pytest.mark.parametrize("partitioned", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_admission_control_never_evicts_what_the_current_token_demands_now_or_next(seed, partitioned):
    trace = random_trace(seed)
    events: list[ReplayEvent] = []
    pol_scores: list[tuple[float, float]] = []
    original = PredictivePolicy.admit

    def admit(self, key, candidates):
        victim = original(self, key, candidates)
        if victim is not None:
            pol_scores.append((self.score(victim), self.score(key)))
        return victim

    PredictivePolicy.admit = admit
    forced: list[ReplayEvent] = []  # a cache of one expert per layer cannot hold a top-2 layer's experts
    try:
        for cap in (1, 2, 3):
            replay(
                trace,
                "predictive",
                cap,
                partitioned=partitioned,
                on_event=(forced if cap == 1 else events).append,
            )
    finally:
        PredictivePolicy.admit = original
    events += [e for e in forced if e.kind == "prefetch"]
    prefetches = [e for e in events if e.kind == "prefetch"]
    assert prefetches and any(e.victim is not None for e in prefetches)
    for e in prefetches:
        li = trace.layer_ids.index(e.layer)
        # issued once layer li of the token is computed, for the next layer (next token's first after the last)
        assert e.key.layer == trace.layer_ids[(li + 1) % trace.num_layers]
        # what the token demanded so far at the current and next layer: the current layer's experts only
        # (the next layer has not routed yet, so which of its experts the token will want is not known)
        assert e.victim not in demanded(trace, e.token, li)
    for e in events:
        if e.kind == "evict":  # a demand miss never evicts the other expert its layer is computing
            assert e.victim not in demanded(trace, e.token, trace.layer_ids.index(e.layer))
    assert pol_scores and all(victim < key for victim, key in pol_scores)  # only ever a less likely expert


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
    r = replay(trace, "predictive", 2, partitioned=True, on_event=events.append)
    d = replay(trace, "predictive_demand", 2, partitioned=True)
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
    lru = replay(trace, "lru", 2, partitioned=True)
    assert row["lru_loads_per_token"] == pytest.approx(lru.misses / trace.tokens)
    assert "lru_prefetch_precision" not in row


def test_predictive_beats_lru_clearly_on_a_strong_layer_to_layer_pattern():
    trace = chained_trace(5)
    for cap in (2, 3):
        lru = replay(trace, "lru", cap, partitioned=True).hit_rate
        pred = replay(trace, "predictive", cap, partitioned=True)
        assert pred.hit_rate > lru + 0.3, (cap, lru, pred.hit_rate)
        assert pred.prefetch_precision > 0.7  # layer 0 is random: its prefetches mostly miss


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
