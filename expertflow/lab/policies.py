"""``expertflow bench policies``: replay routing traces through every policy at several capacities, beside Belady."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from expertflow.lab.replay import compare_policies
from expertflow.lab.report import BenchResult
from expertflow.pipeline.traces import RoutingTrace, load

POLICIES = ("lru", "lfu", "static", "predictive_demand", "predictive", "belady")


def bench_policies(
    trace_files: Sequence[str | Path],
    *,
    capacities: Sequence[int] = (2, 3, 4, 6),
    partitioned: bool = True,
    log: Callable[[str], None] = print,
) -> BenchResult:
    traces: dict[str, RoutingTrace] = {}
    for f in trace_files:
        for name, t in load(f).items():
            traces[f"{Path(f).stem}:{name}"] = t
    rows = compare_policies(traces, capacities, POLICIES, partitioned=partitioned, progress=log)
    result = BenchResult("policies", rows)
    tokens = sum(t.tokens for t in traces.values())
    result.notes.append(f"{len(traces)} traces, {tokens} tokens: " + ", ".join(traces))
    result.notes.append(
        "capacity = experts cached per layer "
        + ("(one cache per layer)" if partitioned else "(one shared cache of capacity x layers)")
    )
    result.notes.append(
        "static keeps the most frequent experts of the *other* traces (no profiling on the test trace)"
    )
    result.notes.append(
        "predictive knows only what a decoding runtime knows: the routing of past tokens and, for the token"
        " being computed, of the layers already computed (no gate look-ahead: traces have no hidden states)."
        " An online model learns from past tokens only: per-layer expert frequency, layer-to-layer"
        " transitions (experts of layers l-1..l-4 of a token -> expert at layer l) and token-to-token reuse"
        " at a layer, combined naive-Bayes style into the probability that an expert is routed at its"
        " layer's next visit. Eviction drops the least probable expert."
    )
    result.notes.append(
        "No policy evicts an expert the layer being computed uses (a runtime pins a layer's experts before"
        " loading any of them); so with as many slots per layer as experts per token, every demand-only"
        " policy, Belady included, has the same hit rate."
    )
    result.notes.append(
        "predictive PREFETCHES: after each layer of a token it makes the top-k (k = experts per token)"
        " most probable experts of the next layer (the next token's first layer after the last) resident,"
        " loading those that are not, each under admission control: it may only evict an expert with a"
        " strictly lower probability, never one the token has demanded at the current or next layer. A"
        " prefetched expert that is then demanded counts as a hit (issued a full layer ahead)."
        " predictive_demand is the same model and eviction without prefetching."
    )
    result.notes.append(
        "belady is the demand-only offline optimum (evict the furthest next use, load only on a miss); a"
        " prefetching policy can exceed its hit rate in principle, at the cost of extra loads: compare"
        " *_loads_per_token (misses + prefetch loads per decoded token; all experts have the same size)."
        " predictive_prefetch_precision = prefetch loads later demanded / prefetch loads."
    )
    result.summary = {f"predictive/belady @{r['capacity']}": round(r["predictive/belady"], 3) for r in rows}
    return result


def plot_policies(result: BenchResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    caps = [r["capacity"] for r in result.rows]
    for p in POLICIES:
        style = {"linestyle": "--", "color": "black"} if p == "belady" else {"marker": "o"}
        ax.plot(caps, [r[p] for r in result.rows], label=p, **style)
    ax.set_xlabel("experts cached per layer")
    ax.set_ylabel("hit rate")
    ax.set_title("Expert cache hit rate vs capacity (replayed routing traces)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
