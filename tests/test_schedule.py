"""Token scheduling: same outputs in any order, fewer expert loads with grouping."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from expertflow.pipeline.schedule import batched_steps, count_loads, group_requests, plan_layer
from expertflow.pipeline.traces import load

SHARED_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct.npz"


def test_plan_puts_resident_experts_first_then_most_wanted_once_each():
    ids = torch.tensor([[3, 1], [3, 2], [1, 3], [5, 2]])
    assert plan_layer(ids) == [3, 1, 2, 5]
    assert plan_layer(ids, resident={5, 2}) == [2, 5, 3, 1]


def test_layer_output_is_the_same_in_planned_and_natural_order():
    g = torch.Generator().manual_seed(0)
    w_in, w_out = torch.randn(8, 32, 16, generator=g), torch.randn(8, 16, 32, generator=g)
    x = torch.randn(20, 16, generator=g)
    logits = torch.randn(20, 8, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(2, dim=-1)

    def run(order: list[int]) -> torch.Tensor:
        out = torch.zeros(20, 16, dtype=torch.float64)
        for e in order:
            tok, pos = torch.where(ids == e)
            y = torch.relu(x[tok] @ w_in[e].T) @ w_out[e].T
            out.index_add_(0, tok, (y * weights[tok, pos, None]).double())
        return out

    natural = run(sorted(set(ids.reshape(-1).tolist())))
    planned = run(plan_layer(ids, resident={6, 0}))
    torch.testing.assert_close(planned, natural, rtol=1e-12, atol=1e-12)


def clustered_sequences(seed: int) -> list[list[dict[int, set[int]]]]:
    """Four requests in two clusters: cluster A routes to experts 0-3, cluster B to 4-7 (interleaved in the queue)."""
    rng = torch.Generator().manual_seed(seed)
    seqs = []
    for r in range(4):
        base = 0 if r % 2 == 0 else 4
        seq = []
        for _ in range(30):
            seq.append(
                {
                    layer: {base + int(torch.randint(0, 4, (1,), generator=rng)) for _ in range(2)}
                    for layer in range(4)
                }
            )
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("seed", range(3))
def test_grouping_overlapping_requests_cuts_expert_loads(seed):
    seqs = clustered_sequences(seed)
    profiles = [
        {layer: Counter(e for step in s[:8] for e in step[layer]) for layer in range(4)} for s in seqs
    ]
    groups = group_requests(profiles, batch_size=2)
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3]]
    grouped = count_loads(batched_steps(seqs, groups), capacity_per_layer=4)
    fifo = count_loads(batched_steps(seqs, [[0, 1], [2, 3]]), capacity_per_layer=4)
    assert grouped < fifo


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="shared Mixtral traces not present")
def test_grouping_on_real_mixtral_traces_pairs_like_workloads():
    traces = load(SHARED_TRACE)
    names = sorted(traces)
    seqs = [
        [{layer: set(t.experts[i, layer].tolist()) for layer in range(t.num_layers)} for i in range(t.tokens)]
        for t in (traces[n] for n in names)
    ]
    profiles = [
        {layer: Counter(e for step in s[:16] for e in step[layer]) for layer in range(32)} for s in seqs
    ]
    groups = group_requests(profiles, batch_size=2)
    assert sorted(map(sorted, groups)) == [[0, 1], [2, 3]]  # gsm8k together, humaneval together
    grouped = count_loads(batched_steps(seqs, groups), capacity_per_layer=4)
    mixed = count_loads(batched_steps(seqs, [[0, 2], [1, 3]]), capacity_per_layer=4)
    assert grouped < mixed


def test_batch_size_must_be_positive():
    from expertflow.errors import ConfigError

    with pytest.raises(ConfigError):
        group_requests([], 0)


def test_layer_plan_is_the_same_for_few_and_many_routed_tokens():
    g = torch.Generator().manual_seed(0)
    for tokens in (1, 3, 32, 40, 100):  # both sides of SMALL_ROUTING (64 ids)
        ids = torch.randint(0, 8, (tokens, 2), generator=g)
        flat = ids.reshape(-1).tolist()
        want = sorted(set(flat), key=lambda e: (e not in {3}, -flat.count(e), e))
        assert plan_layer(ids, resident={3}) == want
