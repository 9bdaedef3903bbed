"""Which experts come next: gate look-ahead on the current hidden state, blended with routing statistics.

Nothing here knows about model classes: the model side hands in ``gates[layer](hidden) -> router logits``
(that layer's own pre-router norm and router applied to a residual-stream state) and reports the routing
that really happened with :meth:`Predictor.observe`. Every prediction is scored against that routing, so
precision and recall per layer distance are measured, not assumed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch

from expertflow.core import ExpertKey
from expertflow.errors import ConfigError

Mode = Literal["none", "lookahead", "stats", "combined"]

#: Decay of the per-expert usage rate: about the last 50 visits of a layer count.
USAGE_DECAY = 0.98
Gate = Callable[[torch.Tensor], torch.Tensor]


class Predictor:
    """Predicts the experts of the next ``depth`` MoE layers after each layer routes.

    ``mode``: ``lookahead`` (gates of later layers on the current state), ``stats`` (transition counts
    between consecutive MoE layers and the previous token's experts), or ``combined`` (their blend).
    ``depth`` 0 = adaptive: it grows when compute had to wait for experts and shrinks when it never does.
    """

    def __init__(
        self,
        moe_layers: Sequence[int],
        num_experts: Mapping[int, int] | int,
        top_k: int,
        *,
        mode: Mode = "combined",
        depth: int = 0,
        max_depth: int = 3,
        gates: Mapping[int, Gate] | None = None,
        stats_weight: float = 0.5,
        min_precision: float = 0.4,
        warmup: int = 64,
    ) -> None:
        if mode not in ("none", "lookahead", "stats", "combined"):
            raise ConfigError(f"unknown predictor mode {mode!r}")
        if top_k < 1 or max_depth < 1 or depth < 0:
            raise ConfigError("top_k and max_depth must be >= 1, depth >= 0")
        self.layers = tuple(sorted(moe_layers))
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        self.num_experts = (
            dict(num_experts) if isinstance(num_experts, Mapping) else dict.fromkeys(self.layers, num_experts)
        )
        self.top_k = top_k
        self.mode: Mode = mode
        self.adaptive = depth == 0
        self.max_depth = max_depth
        self._depth = 1 if depth == 0 else min(depth, max_depth)
        self.gates = dict(gates or {})
        self.stats_weight = stats_weight
        # Prefetching what will not be used costs bandwidth the demand reads need: a distance whose measured
        # precision stays below this (random top-2 of 8 is 0.25) is predicted and scored, but not prefetched.
        self.min_precision = min_precision
        self.warmup = warmup
        # transitions[l][a, b]: times expert a at MoE layer l was followed by expert b at the next MoE layer
        self._trans: dict[int, torch.Tensor] = {}
        self._prev_token: dict[int, torch.Tensor] = {}  # last token's experts per layer (as a 0/1 vector)
        self._current: dict[int, torch.Tensor] = {}  # this forward's routing so far
        # pending[target layer] = list of (distance, per-token predicted id sets)
        self._pending: dict[int, list[tuple[int, list[set[int]]]]] = defaultdict(list)
        self._scores: dict[ExpertKey, float] = {}
        self._usage: dict[int, torch.Tensor] = {}  # layer -> decayed share of tokens choosing each expert
        self._hits: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # d -> [tp, predicted, actual]
        self._quiet_layers = 0
        self.predict_cache: list[tuple[ExpertKey, float]] = []  # last predictions (kept by the model side)
        self.skipped = 0  # layers after which prediction was skipped (see skip)
        self.dormant = 0  # layer visits the predictor slept through (see doze)

    # --- configuration ---------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._depth

    def record_stall(self, stalled: bool) -> None:
        """Adaptive depth from stalls: deeper when compute waited for an expert, shallower after a quiet run."""
        if not self.adaptive:
            return
        if stalled:
            self._depth = min(self.max_depth, self._depth + 1)
            self._quiet_layers = 0
        else:
            self._quiet_layers += 1
            if self._quiet_layers >= 4 * len(self.layers) and self._depth > 1:
                self._depth -= 1
                self._quiet_layers = 0

    # --- observation -----------------------------------------------------------------------------------

    def _onehot(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        n = self.num_experts[layer]
        v = torch.zeros(ids.shape[0], n)
        v.scatter_(1, ids.long().cpu(), 1.0)
        return v

    def observe(self, layer: int, expert_ids: torch.Tensor) -> None:
        """The routing layer ``layer`` really chose (``[tokens, k]``): scores predictions, learns statistics."""
        if layer not in self._index:
            return
        ids = expert_ids.reshape(-1, expert_ids.shape[-1]).long().cpu()
        actual = [set(row.tolist()) for row in ids]
        for d, predicted in self._pending.pop(layer, []):
            if len(predicted) != len(actual):
                continue  # a different forward (e.g. a new request): not comparable
            h = self._hits[d]
            for p, a in zip(predicted, actual):
                h[0] += len(p & a)
                h[1] += len(p)
                h[2] += len(a)
        onehot = self._onehot(layer, ids)
        # How often each expert is chosen per visit of its layer (decayed): the base chance of use.
        usage = self._usage.get(layer)
        visit = onehot.mean(dim=0)
        self._usage[layer] = visit if usage is None else USAGE_DECAY * usage + (1 - USAGE_DECAY) * visit
        i = self._index[layer]
        if i == 0:  # first MoE layer: a new forward begins
            if self._current:
                last = {lid: v[-1:] for lid, v in self._current.items()}
                self._prev_token = last
            self._current = {}
        else:
            prev_layer = self.layers[i - 1]
            prev = self._current.get(prev_layer)
            if prev is not None and prev.shape[0] == onehot.shape[0]:
                n_prev = self.num_experts[prev_layer]
                t = self._trans.setdefault(prev_layer, torch.zeros(n_prev, onehot.shape[1]))
                t += prev.T @ onehot
        self._current[layer] = onehot

    # --- prediction ------------------------------------------------------------------------------------

    def _stats_probs(self, src_layer: int, target: int, tokens: int) -> torch.Tensor | None:
        """P(expert at ``target`` | this forward's routing at ``src_layer``), chaining transitions; with the
        previous token's experts at ``target`` blended in."""
        state = self._current.get(src_layer)
        probs: torch.Tensor | None = None
        if state is not None:
            i, j = self._index[src_layer], self._index[target]
            dist: torch.Tensor | None = state / state.sum(dim=1, keepdim=True).clamp(min=1)
            for step in range(i, j):
                t = self._trans.get(self.layers[step])
                if t is None or t.sum() == 0:
                    dist = None
                    break
                assert dist is not None
                dist = dist @ (t / t.sum(dim=1, keepdim=True).clamp(min=1))
            probs = dist
        prev = self._prev_token.get(target)
        if prev is not None:
            p = prev.expand(tokens, -1) / max(1, self.top_k)
            probs = p if probs is None else 0.7 * probs + 0.3 * p
        return probs

    def predict(self, layer: int, hidden: torch.Tensor) -> list[tuple[ExpertKey, float]]:
        """After ``layer`` routed: keys of the next ``depth`` MoE layers, nearer layers at higher priority."""
        if self.mode == "none" or layer not in self._index:
            return []
        i = self._index[layer]
        x = hidden.reshape(-1, hidden.shape[-1])
        tokens = x.shape[0]
        out: list[tuple[ExpertKey, float]] = []
        self._scores = {}
        for d in range(1, self._depth + 1):
            if i + d >= len(self.layers):
                break
            target = self.layers[i + d]
            probs = None
            if self.mode in ("lookahead", "combined") and target in self.gates:
                with torch.no_grad():
                    probs = torch.softmax(self.gates[target](x).float(), dim=-1).cpu()
            if self.mode in ("stats", "combined"):
                sp = self._stats_probs(layer, target, tokens)
                if sp is not None:
                    probs = sp if probs is None else (1 - self.stats_weight) * probs + self.stats_weight * sp
            if probs is None:
                continue
            k = min(self.top_k, probs.shape[1])
            top = probs.topk(k, dim=-1).indices
            sets = [set(row.tolist()) for row in top]
            self._pending[target].append((d, sets))
            want: dict[int, int] = defaultdict(int)
            for s in sets:
                for e in s:
                    want[e] += 1
            if not self.worth_prefetching(d):
                continue
            # Priority = how likely the expert is used: the precision measured at this distance (a prior of
            # 1/d until enough predictions were scored), times the share of tokens that want it. Prefetch
            # admission compares it with the score of the expert it would evict.
            precision = self.precision(d)
            for e, n in want.items():
                pr = precision * n / tokens
                key = ExpertKey(target, e)
                out.append((key, pr))
                self._scores[key] = pr
        return out

    def ceiling(self) -> float:
        """The highest priority a prediction could have now: the best precision of the distances predicted."""
        return max(self.precision(d) for d in range(1, self._depth + 1))

    def doze(self) -> None:
        """Count one layer visit the predictor slept through (see ``attach_predictor``'s dormancy)."""
        self.dormant += 1

    def skip(self) -> None:
        """Make no prediction this time (no prefetch could be admitted): scores fall back to usage rates."""
        self._scores = {}
        self.predict_cache = []
        self.skipped += 1

    def precision(self, distance: int) -> float:
        """Measured precision of predictions ``distance`` layers ahead (1/distance until warmed up)."""
        tp, npred, _ = self._hits.get(distance, (0, 0, 0))
        return tp / npred if npred >= self.warmup else 1.0 / distance

    def worth_prefetching(self, distance: int) -> bool:
        """Whether predictions at ``distance`` have been right often enough to spend bandwidth on them."""
        tp, npred, _ = self._hits.get(distance, (0, 0, 0))
        return npred < self.warmup or tp / npred >= self.min_precision

    def scores(self, key: ExpertKey) -> float:
        """Chance that ``key`` is used at its layer's next visit: the prediction if there is one, else how often
        the expert has been chosen. Prefetch admission and the predictive eviction policy use it."""
        predicted = self._scores.get(key)
        if predicted is not None:
            return predicted
        usage = self._usage.get(key.layer)
        return float(usage[key.expert]) if usage is not None and key.expert < usage.shape[0] else 0.0

    def stats(self) -> dict[str, object]:
        by_distance = {}
        for d, (tp, npred, nact) in sorted(self._hits.items()):
            by_distance[d] = {
                "precision": tp / npred if npred else 0.0,
                "recall": tp / nact if nact else 0.0,
                "predicted": npred,
                "actual": nact,
            }
        for d, v in by_distance.items():
            v["prefetching"] = self.worth_prefetching(d)
        return {
            "mode": self.mode,
            "depth": self._depth,
            "by_distance": by_distance,
            "skipped": self.skipped,
            "dormant": self.dormant,
        }
