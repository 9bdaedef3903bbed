"""Eviction policies for a tier's slots: LRU, LFU, static (profiled), predictive, and Belady (offline optimum).

A policy only ranks keys; the store decides what is evictable (resident and unpinned) and passes those
as candidates, so no policy can evict a pinned expert.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from expertflow.core import ExpertKey
from expertflow.errors import ConfigError


class EvictionPolicy(Protocol):
    """What a tier's slot table asks of a policy."""

    def on_insert(self, key: ExpertKey) -> None: ...

    def on_access(self, key: ExpertKey) -> None: ...

    def on_remove(self, key: ExpertKey) -> None: ...

    def choose_victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey | None: ...


class LRUPolicy:
    """Least recently used (the mixtral-offloading policy). O(1) updates."""

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def on_insert(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: ExpertKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def choose_victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey | None:
        if not candidates:
            return None
        allowed = set(candidates)
        for key in self._order:  # oldest first
            if key in allowed:
                return key
        return min(allowed)  # candidates never inserted (should not happen): deterministic choice


class LFUPolicy:
    """Least frequently used, with exponential decay so old popularity fades; LRU breaks ties.

    Counts survive eviction (an expert that was popular is kept when it comes back).
    """

    def __init__(self, decay: float = 0.999) -> None:
        if not 0 < decay <= 1:
            raise ConfigError("LFU decay must be in (0, 1]")
        self.decay = decay
        self._count: dict[ExpertKey, float] = defaultdict(float)
        self._stamp: dict[ExpertKey, int] = {}
        self._clock = 0

    def _touch(self, key: ExpertKey) -> None:
        self._clock += 1
        # Decay lazily: a count is stored relative to scale decay**clock.
        self._count[key] += self.decay ** (-self._clock) if self.decay < 1 else 1.0
        self._stamp[key] = self._clock
        if self.decay < 1 and self._clock % 10_000 == 0:
            self._rescale()

    def _rescale(self) -> None:
        factor = self.decay**self._clock
        self._count = defaultdict(float, {k: v * factor for k, v in self._count.items()})
        self._stamp = {k: s - self._clock for k, s in self._stamp.items()}
        self._clock = 0

    def on_insert(self, key: ExpertKey) -> None:
        self._touch(key)

    def on_access(self, key: ExpertKey) -> None:
        self._touch(key)

    def on_remove(self, key: ExpertKey) -> None:
        pass

    def frequency(self, key: ExpertKey) -> float:
        return self._count.get(key, 0.0) * (self.decay**self._clock if self.decay < 1 else 1.0)

    def choose_victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey | None:
        if not candidates:
            return None
        return min(candidates, key=lambda k: (self._count.get(k, 0.0), self._stamp.get(k, -math.inf), k))


class StaticPolicy:
    """A profiled set of experts stays resident; everything else is evicted LRU (and before any pinned-set key)."""

    def __init__(self, keys: Iterable[ExpertKey] = ()) -> None:
        self.keep = frozenset(keys)
        self._lru = LRUPolicy()

    @classmethod
    def from_counts(cls, counts: Mapping[ExpertKey, float], capacity: int) -> StaticPolicy:
        """Keep the ``capacity`` most frequent experts of a profile (e.g. a routing trace)."""
        ranked = sorted(counts, key=lambda k: (-counts[k], k))
        return cls(ranked[:capacity])

    def on_insert(self, key: ExpertKey) -> None:
        self._lru.on_insert(key)

    def on_access(self, key: ExpertKey) -> None:
        self._lru.on_access(key)

    def on_remove(self, key: ExpertKey) -> None:
        self._lru.on_remove(key)

    def choose_victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey | None:
        others = [k for k in candidates if k not in self.keep]
        return self._lru.choose_victim(others or list(candidates))


class PredictivePolicy:
    """Evict the expert whose next use is expected furthest away; admit a prefetch only over a less likely one.

    The estimate is Belady's rule with expectations in place of the future. An expert of a layer ``a`` layer
    visits ahead (1 = the next layer to run, ``n`` = the layer just computed, in a model of ``n`` MoE layers)
    that is chosen at a visit of its layer with chance ``p`` is next used after ``a + n(1-p)/p`` layer
    visits on average (geometric in the number of passes). ``p`` is the predictor's view when there is one
    (``scores(key)`` not None: gate look-ahead for the next layers, routing statistics otherwise), else the
    policy's own decayed share of its layer's visits that used the key, which it keeps from :meth:`on_layer`.

    :meth:`admit` is the admission control of prefetching: a predicted key may take a slot only from a
    candidate that scores strictly lower than it does. The caller passes as candidates only what may be
    evicted (resident, unpinned, not demanded by the token being computed), as for :meth:`choose_victim`.
    """

    #: The smallest chance of use an expert is given: one never seen used is still finitely far away, so
    #: distance to its layer still orders such experts.
    MIN_CHANCE = 1e-3

    def __init__(
        self,
        scores: Callable[[ExpertKey], float | None] | None = None,
        *,
        layers: Sequence[int] | None = None,
        decay: float = 0.9,
    ) -> None:
        if not 0 < decay < 1:
            raise ConfigError("the predictive policy's decay must be in (0, 1)")
        self.scores = scores
        self.decay = decay
        self._layers: list[int] = sorted(set(layers or ()))
        self._index = {layer: i for i, layer in enumerate(self._layers)}
        self._current: int | None = None
        # Per layer, the decayed share of its visits that used each expert (per layer, so a visit touches
        # only its own layer's entries).
        self._usage: dict[int, dict[int, float]] = defaultdict(dict)
        self._visits: dict[int, int] = defaultdict(int)

    def on_insert(self, key: ExpertKey) -> None:
        self._learn_layer(key.layer)

    def on_access(self, key: ExpertKey) -> None:
        pass

    def on_remove(self, key: ExpertKey) -> None:
        pass

    def _learn_layer(self, layer: int) -> None:
        if layer not in self._index:
            self._layers = sorted({*self._layers, layer})
            self._index = {lid: i for i, lid in enumerate(self._layers)}

    def on_layer(self, layer: int, keys: Iterable[ExpertKey]) -> None:
        """A visit of ``layer`` begins and uses ``keys`` (the experts routed to by any of its tokens)."""
        self._learn_layer(layer)
        self._current = layer
        used = {k.expert for k in keys if k.layer == layer}
        d = self.decay
        usage = self._usage[layer]
        for e in usage:
            usage[e] *= d
        for e in used:
            usage[e] = usage.get(e, 0.0) + (1 - d)
        self._visits[layer] += 1

    def chance(self, key: ExpertKey) -> float:
        """The chance that ``key`` is used at its layer's next visit."""
        usage = self._usage[key.layer].get(key.expert, 0.0) if key.layer in self._usage else 0.0
        visits = self._visits.get(key.layer, 0)
        if visits:
            usage /= 1 - self.decay**visits  # unbiased while few visits were seen
        predicted = self.scores(key) if self.scores is not None else None
        return min(1.0, max(self.MIN_CHANCE, usage if predicted is None else predicted))

    def _ahead(self, key: ExpertKey) -> int:
        """Layer visits until ``key``'s layer runs again: 1 for the next layer, n for the one just computed."""
        n = len(self._layers) or 1
        if self._current is None or key.layer not in self._index:
            return n
        return (self._index[key.layer] - self._index[self._current] - 1) % n + 1

    def reuse_distance(self, key: ExpertKey) -> float:
        """Expected layer visits until ``key`` is used again."""
        p = self.chance(key)
        return self._ahead(key) + len(self._layers or (0,)) * (1 - p) / p

    def score(self, key: ExpertKey) -> float:
        """Higher = keep: the negated expected reuse distance."""
        return -self.reuse_distance(key)

    def choose_victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey | None:
        """The candidate expected furthest from its next use; first among the layer being computed.

        An expert of the layer being computed that its tokens did not choose is next needed a whole pass
        later at the soonest: distance is certain there, while the chances of use that could rank another
        layer's expert further are estimates. Replacing within the layer also keeps each layer's share of the
        cache, which LRU gets for free when one pass fits (measured on the policy replay: better than ranking
        every candidate alike at every capacity, on random and on real routing).
        """
        if not candidates:
            return None
        same = [k for k in candidates if k.layer == self._current]
        return min(same or candidates, key=lambda k: (self.score(k), k))

    def admit(self, key: ExpertKey, candidates: Sequence[ExpertKey]) -> ExpertKey | None:
        """The candidate a prefetch of ``key`` may evict, or None: only one that scores strictly lower."""
        victim = self.choose_victim(candidates)
        if victim is None or self.score(victim) >= self.score(key):
            return None
        return victim


POLICY_NAMES = ("lru", "lfu", "static", "predictive")


def make_policy(name: str, **kwargs: object) -> EvictionPolicy:
    """Policy by name. ``static`` takes ``keys``; ``predictive`` takes ``scores``. (Belady's offline optimum is
    the lab's: :class:`expertflow.lab.replay.BeladyPolicy`.)"""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy(**kwargs)  # type: ignore[arg-type]
    if name == "static":
        return StaticPolicy(**kwargs)  # type: ignore[arg-type]
    if name == "predictive":
        return PredictivePolicy(**kwargs)  # type: ignore[arg-type]
    raise ConfigError(f"unknown eviction policy {name!r}; choose one of {POLICY_NAMES}")
