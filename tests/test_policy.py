"""Eviction policies and trace replay, checked against sequences worked out by hand and against Belady."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from expertflow.core import ExpertKey
from expertflow.errors import ConfigError
from expertflow.lab.replay import access_sequence, compare_policies, replay
from expertflow.pipeline.policy import LFUPolicy, LRUPolicy, PredictivePolicy, StaticPolicy, make_policy
from expertflow.pipeline.traces import RoutingTrace, TraceRecorder, load, save

SHARED_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct.npz"


def one_layer_trace(experts: list[int], num_experts: int = 8) -> RoutingTrace:
    ids = np.array(experts, dtype=np.int16).reshape(-1, 1, 1)
    return RoutingTrace(ids, np.ones(ids.shape, dtype=np.float32), (0,), num_experts)


def test_lru_on_a_sequence_worked_out_by_hand():
    # capacity 2, accesses 0 1 2 0 1 3 0: every access evicts exactly what comes next -> no hit at all
    r = replay(one_layer_trace([0, 1, 2, 0, 1, 3, 0]), "lru", 2, partitioned=True)
    assert (r.hits, r.misses) == (0, 7)
    # 0 1 0 2 0 1: hits at positions 2 and 4 (0 stays most recent), 1 was evicted by 2
    r = replay(one_layer_trace([0, 1, 0, 2, 0, 1]), "lru", 2, partitioned=True)
    assert (r.hits, r.misses) == (2, 4)


def test_belady_on_a_sequence_worked_out_by_hand():
    # 0m 1m 2m(evict 1: next use 4 > 3) 0h 1m(evict 2: never used) 3m(evict 1: never again) 0h
    r = replay(one_layer_trace([0, 1, 2, 0, 1, 3, 0]), "belady", 2, partitioned=True)
    assert (r.hits, r.misses) == (2, 5)


@pytest.mark.parametrize("seed", range(5))
def test_no_demand_only_policy_beats_belady_on_random_traces(seed):
    # Belady is the optimum of demand-only caching; predictive prefetches, so only its demand-only variant
    # (same eviction score, no prefetch) is bound by it.
    rng = np.random.default_rng(seed)
    # skewed routing, 4 layers, top-2 of 8
    probs = rng.dirichlet(np.ones(8) * 0.5, size=4)
    experts = np.stack(
        [np.stack([rng.choice(8, 2, replace=False, p=probs[layer]) for layer in range(4)]) for _ in range(60)]
    ).astype(np.int16)
    trace = RoutingTrace(experts, np.ones(experts.shape, np.float32), (0, 1, 2, 3), 8)
    for cap in (2, 3, 4, 6):
        best = replay(trace, "belady", cap).hit_rate
        for p in ("lru", "lfu", "static", "predictive_demand"):
            assert replay(trace, p, cap).hit_rate <= best + 1e-12, (p, cap)


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="shared Mixtral traces not present")
def test_real_mixtral_traces_load_and_no_demand_only_policy_beats_belady():
    traces = load(SHARED_TRACE)
    assert set(traces) == {"gsm8k_p0", "gsm8k_p1", "humaneval_p0", "humaneval_p1"}
    for t in traces.values():
        assert t.num_layers == 32 and t.top_k == 2
        assert t.experts.min() >= 0 and t.experts.max() < 8
    small = {k: RoutingTrace(v.experts[:40], v.weights[:40], v.layer_ids, 8) for k, v in traces.items()}
    policies = ("lru", "lfu", "static", "predictive_demand", "predictive", "belady")
    rows = compare_policies(small, capacities=(2, 4, 6), policies=policies)
    for row in rows:
        for p in ("lru", "lfu", "static", "predictive_demand"):
            assert row[p] <= row["belady"]
            assert f"{p}_prefetch_precision" not in row  # demand-only: loads are the misses
        assert row["belady"] > 0
        assert 0 < row["predictive_prefetch_precision"] <= 1
        assert row["predictive_loads_per_token"] > 0 and row["predictive_demand_loads_per_token"] > 0
        assert (
            row["belady_lookahead"] == 1.0
            and row["belady_lookahead_loads_per_token"] == row["belady_loads_per_token"]
        )


def test_policies_only_pick_victims_among_candidates():
    keys = [ExpertKey(0, e) for e in range(6)]
    for name in ("lru", "lfu", "static", "predictive"):
        pol = make_policy(name) if name != "static" else make_policy("static", keys=keys[:2])
        for k in keys:
            pol.on_insert(k)
        for _ in range(20):
            cands = random.Random(3).sample(keys, 3)
            assert pol.choose_victim(cands) in cands
        assert pol.choose_victim([]) is None


def test_static_policy_never_evicts_its_profiled_set():
    keep = [ExpertKey(0, 1), ExpertKey(1, 2)]
    pol = StaticPolicy.from_counts({keep[0]: 10, keep[1]: 9, ExpertKey(0, 3): 1}, capacity=2)
    for k in [*keep, ExpertKey(0, 3), ExpertKey(0, 4)]:
        pol.on_insert(k)
    assert pol.choose_victim([*keep, ExpertKey(0, 4)]) == ExpertKey(0, 4)
    assert pol.choose_victim([*keep, ExpertKey(0, 3), ExpertKey(0, 4)]) == ExpertKey(0, 3)


def test_lfu_evicts_the_least_frequent_and_lru_the_oldest():
    a, b, c = ExpertKey(0, 0), ExpertKey(0, 1), ExpertKey(0, 2)
    lfu, lru = LFUPolicy(decay=1.0), LRUPolicy()
    for k in (a, b, c):
        lfu.on_insert(k)
        lru.on_insert(k)
    for _ in range(3):
        lfu.on_access(a)
        lfu.on_access(c)
    lru.on_access(a)
    assert lfu.choose_victim([a, b, c]) == b
    assert lru.choose_victim([a, b, c]) == b
    lru.on_access(b)
    assert lru.choose_victim([a, b, c]) == c


def test_predictive_policy_keeps_what_the_predictor_wants():
    wanted = ExpertKey(1, 5)
    pol = make_policy("predictive", scores=lambda k: 1.0 if k == wanted else 0.0)
    keys = [ExpertKey(1, e) for e in range(6)]
    for k in keys:
        pol.on_insert(k)
    assert pol.choose_victim(keys) != wanted
    assert pol.choose_victim([wanted]) == wanted


def test_unknown_policies_are_config_errors_and_belady_is_not_a_runtime_policy():
    with pytest.raises(ConfigError, match="unknown eviction policy"):
        make_policy("fifo")
    with pytest.raises(ConfigError, match="unknown eviction policy"):
        make_policy("belady")  # the offline optimum needs the future: the lab's replay only


def test_trace_round_trips_through_a_file(tmp_path):
    rec = TraceRecorder([1, 2], num_experts=4, meta={"model": "x"})
    rec.append(1, np.array([[0, 1], [2, 3], [1, 0]]), np.full((3, 2), 0.5))  # prefill, 3 tokens
    rec.append(2, np.array([[3, 2], [1, 1], [0, 2]]), np.full((3, 2), 0.5))
    rec.append(1, np.array([[1, 2]]), np.full((1, 2), 0.25))  # one decoded token
    rec.append(2, np.array([[2, 3]]), np.full((1, 2), 0.25))
    trace = rec.finish()
    assert trace.experts.shape == (4, 2, 2)
    back = load(save(trace, tmp_path / "t.npz"))["t"]
    assert np.array_equal(back.experts, trace.experts) and np.array_equal(back.weights, trace.weights)
    assert back.layer_ids == (1, 2) and back.num_experts == 4 and back.meta == {"model": "x"}
    assert access_sequence(back)[:3] == [ExpertKey(1, 0), ExpertKey(1, 1), ExpertKey(2, 3)]


def test_malformed_trace_files_are_config_errors(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError):
        load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ConfigError, match="not a routing trace"):
        load(tmp_path / "other.npz")
    with pytest.raises(ConfigError, match="outside"):
        RoutingTrace(np.full((1, 1, 2), 9, np.int16), np.ones((1, 1, 2), np.float32), (0,), 8)


def test_predictive_policy_evicts_the_layer_just_computed_not_the_one_needed_next():
    """In a loop over layers the layer just computed is the one needed last (LRU picks the opposite)."""
    pol = PredictivePolicy(layers=[0, 1, 2, 3])
    for layer in range(4):
        pol.on_layer(layer, [ExpertKey(layer, 0)])
    resident = [ExpertKey(layer, 0) for layer in range(4)]
    assert pol.choose_victim(resident) == ExpertKey(3, 0)
    pol.on_layer(0, [ExpertKey(0, 0)])
    assert pol.choose_victim(resident) == ExpertKey(0, 0)
    assert pol.reuse_distance(ExpertKey(1, 0)) < pol.reuse_distance(ExpertKey(2, 0))


def test_predictive_policy_learns_each_experts_chance_of_use_from_the_visits_it_sees():
    pol = PredictivePolicy(layers=[0, 1])
    often, seldom = ExpertKey(1, 0), ExpertKey(1, 1)
    for visit in range(20):
        pol.on_layer(0, [ExpertKey(0, 0)])
        pol.on_layer(1, [often] + ([seldom] if visit % 5 == 0 else []))
    assert pol.chance(often) == pytest.approx(1.0)
    assert 0.05 < pol.chance(seldom) < 0.5
    assert pol.choose_victim([often, seldom]) == seldom
    # A predictor's view, when there is one, replaces the policy's own statistics.
    informed = PredictivePolicy({often: 0.1, seldom: 0.9}.get, layers=[0, 1])
    assert informed.choose_victim([often, seldom]) == often


def test_predictive_policy_replaces_within_the_layer_being_computed_first():
    """An expert of the layer being computed that its tokens did not choose is a whole pass away for sure;
    another layer's expert looks further only by an estimated chance of use."""
    chance = {ExpertKey(1, 0): 0.5, ExpertKey(2, 0): 0.5, ExpertKey(3, 0): 0.2}
    pol = PredictivePolicy(chance.get, layers=[0, 1, 2, 3])
    pol.on_layer(1, [ExpertKey(1, 5)])
    assert pol.reuse_distance(ExpertKey(3, 0)) > pol.reuse_distance(ExpertKey(1, 0))
    assert pol.choose_victim([ExpertKey(1, 0), ExpertKey(3, 0)]) == ExpertKey(1, 0)
    assert pol.choose_victim([ExpertKey(2, 0), ExpertKey(3, 0)]) == ExpertKey(
        3, 0
    )  # none of layer 1: by distance
