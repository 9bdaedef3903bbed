"""Token scheduling: make a batch touch fewer experts, and load each missing expert once.

* :func:`plan_layer` orders one layer's experts for a batch: resident experts first (compute starts at
  once), then missing ones, most-wanted first, each requested once for every token that needs it.
* :func:`group_requests` groups queued requests whose predicted experts overlap into the same batch, so
  every batch needs fewer distinct experts (the ExpertFlow token-scheduling idea).
* :func:`count_loads` counts expert loads of a batch schedule under an LRU cache, to compare schedules.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Collection, Mapping, Sequence

import torch

from expertflow.errors import ConfigError

#: Up to this many routed ids, a layer's plan is computed in Python (decode); above it, with torch.
SMALL_ROUTING = 64


def plan_layer(expert_ids: torch.Tensor, resident: Collection[int] = ()) -> list[int]:
    """Unique experts of ``expert_ids`` ``[tokens, k]``: resident first, then by tokens wanting them (desc)."""
    flat = expert_ids.reshape(-1)
    if (
        flat.numel() <= SMALL_ROUTING
    ):  # decode: a few ids; counting them in Python beats torch.unique's overhead
        counts = Counter(flat.tolist())
        pairs = list(counts.items())
    else:
        ids, n = torch.unique(flat, return_counts=True)
        pairs = list(zip(ids.tolist(), n.tolist()))
    pairs.sort(key=lambda ec: (ec[0] not in resident, -ec[1], ec[0]))
    return [e for e, _ in pairs]


Profile = Mapping[int, Mapping[int, float] | Collection[int]]  # layer -> expert weights (or a set of ids)


def _as_weights(ids: Mapping[int, float] | Collection[int]) -> dict[int, float]:
    if isinstance(ids, Mapping):
        return {int(e): float(w) for e, w in ids.items()}
    return dict.fromkeys((int(e) for e in ids), 1.0)


def _cosine(a: Mapping[int, float], b: Mapping[int, float]) -> float:
    dot = sum(w * b.get(e, 0.0) for e, w in a.items())
    na = sum(w * w for w in a.values()) ** 0.5
    nb = sum(w * w for w in b.values()) ** 0.5
    return dot / (na * nb) if na and nb else 0.0


def profile_similarity(running: Sequence[Profile], candidate: Profile) -> float:
    """How much ``candidate``'s predicted experts overlap the ``running`` requests' together: cosine similarity
    of expert weights, summed over layers (the measure :func:`group_requests` batches by)."""
    total: dict[int, dict[int, float]] = {}
    for r in running:
        for layer, ids in r.items():
            acc = total.setdefault(layer, {})
            for e, x in _as_weights(ids).items():
                acc[e] = acc.get(e, 0.0) + x
    return sum(_cosine(total.get(layer, {}), _as_weights(ids)) for layer, ids in candidate.items())


def group_requests(requests: Sequence[Profile], batch_size: int) -> list[list[int]]:
    """Batches of request indices; a request is its predicted experts per layer, as sets or as weights
    (e.g. how often the predictor expects each expert over the request's tokens).

    Greedy: start each batch with the oldest waiting request (no request starves), then add the requests
    whose expert profile is most similar to the batch's (cosine similarity summed over layers).
    """
    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    profiles = [{layer: _as_weights(ids) for layer, ids in r.items()} for r in requests]
    waiting = list(range(len(profiles)))
    batches: list[list[int]] = []
    while waiting:
        first = waiting.pop(0)
        batch = [first]
        total: dict[int, dict[int, float]] = {layer: dict(w) for layer, w in profiles[first].items()}
        while waiting and len(batch) < batch_size:
            scores = {
                i: sum(_cosine(total.get(layer, {}), w) for layer, w in profiles[i].items()) for i in waiting
            }
            best = max(waiting, key=lambda i: (scores[i], -i))
            waiting.remove(best)
            batch.append(best)
            for layer, w in profiles[best].items():
                acc = total.setdefault(layer, {})
                for e, x in w.items():
                    acc[e] = acc.get(e, 0.0) + x
        batches.append(batch)
    return batches


def count_loads(steps: Sequence[Mapping[int, Collection[int]]], capacity_per_layer: int) -> int:
    """Expert loads for a sequence of forward steps (``{layer: experts needed}``), LRU cache per layer.

    Within a step a layer's experts are loaded once however many tokens need them.
    """
    caches: dict[int, OrderedDict[int, None]] = {}
    loads = 0
    for step in steps:
        for layer, experts in sorted(step.items()):
            cache = caches.setdefault(layer, OrderedDict())
            for e in plan_layer(torch.tensor(sorted(experts)), cache.keys()):
                if e in cache:
                    cache.move_to_end(e)
                    continue
                loads += 1
                if len(cache) >= capacity_per_layer:
                    cache.popitem(last=False)
                cache[e] = None
    return loads


def batched_steps(
    sequences: Sequence[Sequence[Mapping[int, Collection[int]]]], batches: Sequence[Sequence[int]]
) -> list[dict[int, set[int]]]:
    """Forward steps of decoding ``batches`` one after the other, each batch's sequences in lockstep."""
    steps: list[dict[int, set[int]]] = []
    for batch in batches:
        length = max(len(sequences[i]) for i in batch)
        for t in range(length):
            step: dict[int, set[int]] = {}
            for i in batch:
                if t < len(sequences[i]):
                    for layer, ids in sequences[i][t].items():
                        step.setdefault(layer, set()).update(ids)
            steps.append(step)
    return steps
