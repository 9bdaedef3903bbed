"""``expertflow bench policies``: replay routing traces through every policy at several capacities, beside Belady."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from expertflow.lab.replay import compare_policies
from expertflow.lab.report import BenchResult
from expertflow.pipeline.traces import RoutingTrace, load

POLICIES = ("lru", "lfu", "static", "predictive_demand", "predictive", "belady")
BOUNDS = ("belady_lookahead",)


def bench_policies(
    trace_files: Sequence[str | Path],
    *,
    capacities: Sequence[int] = (2, 3, 4, 6),
    partitioned: bool = False,
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
        "predictive is what generate runs, through the same classes: the runtime Predictor observes each"
        " layer's routing when its router has run and predicts the next layer (statistics mode: traces have no"
        " hidden states for the gate look-ahead), the runtime PredictivePolicy evicts by its chances, and each"
        " prediction is prefetched likeliest first through the cache level's admission rule (admits_prefetch,"
        " at no read load): only over a less likely expert, never one of the layer being computed or the"
        " next, never an unused prefetch. A prefetched expert that is then demanded counts as a hit."
        " predictive_demand is the same without prefetching."
    )
    result.notes.append(
        "No policy evicts an expert the layer being computed uses (a runtime pins a layer's experts before"
        " loading any of them); so with as many slots per layer as experts per token, every demand-only"
        " policy, Belady included, has the same hit rate."
    )
    result.notes.append(
        "Compare like with like: belady is the demand-only offline optimum (load only on a miss), the bound"
        " of the demand-only policies' hit rates; belady_lookahead is the bound of prefetching ones: with"
        " the future known every load can be a hit (hit rate 1) and none can need fewer loads than Belady"
        " (its loads per token). *_loads_per_token = misses + prefetch loads per decoded token (experts all"
        " have the same size: bytes); predictive_prefetch_precision = prefetches later demanded / prefetches."
    )
    result.summary = {f"predictive/belady @{r['capacity']}": round(r["predictive/belady"], 3) for r in rows}
    return result


def plot_policies(result: BenchResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    caps = [r["capacity"] for r in result.rows]
    for p in (*POLICIES, *BOUNDS):
        style = {"linestyle": "--", "color": "black"} if p.startswith("belady") else {"marker": "o"}
        if p == "belady_lookahead":
            style = {"linestyle": ":", "color": "gray"}
        ax.plot(caps, [r[p] for r in result.rows], label=p, **style)
    ax.set_xlabel("experts cached per layer")
    ax.set_ylabel("hit rate")
    ax.set_title("Expert cache hit rate vs capacity (replayed routing traces)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
