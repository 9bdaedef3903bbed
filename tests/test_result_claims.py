"""Claims about results in the README and the docs are the result files' figures: a table typed by hand that
disagrees with the file it cites fails here (the eval grid's "says no to all six" did, about answers that
were neither)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _table(doc: str, header_start: str) -> list[list[str]]:
    """The body cells of the Markdown table whose header line starts with ``header_start``."""
    lines = (REPO / doc).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("*") for c in line.strip("|").split("|")])
    return rows


def _rows(path: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((REPO / path).read_text())["rows"]
    return rows


def _shown(value: float, text: str) -> None:
    """``text`` is ``value`` as printed: the same digits after rounding to what the text shows."""
    number = float(re.sub(r"[^0-9.]", "", text))
    decimals = len(text.split(".")[1].rstrip("x")) if "." in text else 0
    assert round(value, decimals) == pytest.approx(number), (value, text)


def test_the_readme_results_table_is_the_scale_result_files() -> None:
    files = {"1 GiB": "benchmarks/scale-1GiB/decode.json", "2 GiB": "benchmarks/scale-2GiB/decode.json"}
    labels = {
        "llama.cpp bf16, mmap": "llama.cpp bf16",
        "ExpertFlow bf16 (same tokens as transformers)": "expertflow default @auto",
        "ExpertFlow bf16": "expertflow default @auto",
        "llama.cpp Q4_0, mmap (`--repack 0`)": "llama.cpp Q4_0",
        "ExpertFlow int4 experts, int8 non-experts": "expertflow default int4 non-experts int8 @auto",
    }
    peers = {
        "expertflow default @auto": "llama.cpp bf16",
        "expertflow default int4 non-experts int8 @auto": "llama.cpp Q4_0",
    }
    table = _table("README.md", "| cgroup | contender |")
    assert len(table) == 8
    for cgroup, shown, tok_s, vs in table:
        name = shown.replace("*", "")
        rows = {r["label"]: r for r in _rows(files[cgroup])}
        row = rows[labels[name]]
        _shown(row["tokens_per_second"], tok_s)
        if "same tokens" in name:
            assert row["same_tokens_as_transformers"] is True
        if "--repack 0" in name:
            assert row["repack"] is False and "--repack 0" in row["command"]
        if vs != "—":
            _shown(row["tokens_per_second"] / rows[peers[row["label"]]]["tokens_per_second"], vs)
    rows = {r["label"]: r for r in _rows("benchmarks/beyond-ram-llamacpp/decode.json")}
    ours, cpp, acc = (
        rows[k]["tokens_per_second"]
        for k in ("expertflow default @auto", "llama.cpp bf16", "accelerate disk offload")
    )
    text = " ".join((REPO / "README.md").read_text().split())
    claim = f"decodes {ours:.2f} tok/s, {ours / cpp:.2f}x llama.cpp's bf16 mmap ({cpp:.2f}) and {ours / acc:.1f}x accelerate ({acc:.2f})"
    assert claim in text


def test_the_readme_resident_table_is_the_resident_result_files() -> None:
    labels = {
        "transformers (whole model in RAM)": "transformers (RAM)",
        "ExpertFlow bf16 (same tokens as transformers)": "expertflow lru @100%",
        "llama.cpp bf16": "llama.cpp bf16",
        "ExpertFlow int4 experts, int8 non-experts": "expertflow lru int4 non-experts int8 @100%",
        "llama.cpp Q4_0 (repacked)": "llama.cpp Q4_0",
    }
    peers = {
        "expertflow lru @100%": "llama.cpp bf16",
        "expertflow lru int4 non-experts int8 @100%": "llama.cpp Q4_0",
    }
    table = _table("README.md", "| model | contender | decode tok/s | prefill tok/s |")
    assert len(table) == 15
    rows: dict[str, Any] = {}
    for model, name, decode, prefill, split in table:
        if model:
            preset = re.search(r"`([a-z-]+)`", model).group(1)  # type: ignore[union-attr]
            rows = {r["label"]: r for r in _rows(f"benchmarks/resident-{preset}/decode.json")}
        row = rows[labels[name]]
        _shown(row["tokens_per_second"], decode.split(" ")[0])
        _shown(row["prefill_tokens_per_second"], prefill.split(" ")[0])
        if "same tokens" in name:
            assert row["same_tokens_as_transformers"] is True
            assert (
                f"{row['tokens_per_second'] / rows['transformers (RAM)']['tokens_per_second']:.2f}x transformers"
                in decode
            )
        if row["label"] in peers:
            ratio = row["tokens_per_second"] / rows[peers[row["label"]]]["tokens_per_second"]
            assert f"{ratio:.2f}x llama.cpp" in decode
        if split != "—":
            parts = [p.strip() for p in split.split("/")]
            keys = ("experts_compute_ms_per_token", "store_ms_per_token", "rest_ms_per_token")
            for key, part in zip(keys, parts, strict=True):
                _shown(row[key], part)


def test_the_readme_tiny_trained_resident_claim_is_its_result_file() -> None:
    rows = {r["label"]: r for r in _rows("benchmarks/resident-tiny-trained/decode.json")}
    ours, ref = rows["expertflow lru @100%"], rows["transformers (RAM)"]
    assert ours["same_tokens_as_transformers"] is True
    text = " ".join((REPO / "README.md").read_text().split())
    ratio = ours["tokens_per_second"] / ref["tokens_per_second"]
    claim = f"({ratio:.2f}x on the tiny trained model, `benchmarks/resident-tiny-trained`: "
    claim += f"{ours['tokens_per_second']:.0f} against {ref['tokens_per_second']:.0f} tok/s, same tokens)"
    assert claim in text


def test_the_grid_table_and_claims_are_the_grid_result_file() -> None:
    rows = _rows("benchmarks/grid/grid.json")
    by = {(r["routing"], r["quantize"]): r for r in rows if r["budget"] == 0.25 and r["schedule"] == "fifo"}
    names = {"exact": "exact", "cache-aware 0.1": "cache-aware:0.1"}
    table = _table("docs/cli.md", "| routing, experts |")
    assert len(table) == 4
    for label, exact, ppl, tok_s, loads, mib, hit in table:
        routing, experts = label.split(", ")
        row = by[(names[routing], "none" if experts == "fp32" else experts)]
        for value, text in (
            (row["exact_match"], exact),
            (row["perplexity"], ppl),
            (row["tokens_per_second"], tok_s),
            (row["expert_loads_per_token"], loads),
            (row["MiB_read_per_token"], mib),
            (row["hit_rate"], hit),
        ):
            _shown(value, text)
    # "none of its six answers is a yes or a no ... yes/no accuracy 0 and a non-answer rate of 1"
    text = " ".join((REPO / "docs" / "cli.md").read_text().split())
    assert "none of its six answers is a yes or a no" in text
    assert all(r["yesno_other"] == 6 and r["yesno_accuracy"] == 0 for r in rows)


def test_the_policy_table_is_the_policy_result_file() -> None:
    rows = {r["capacity"]: r for r in _rows("benchmarks/policies.json")}
    table = _table("benchmarks/README.md", "| experts cached per layer |")
    assert [int(r[0]) for r in table] == sorted(rows)
    for cap, lru, lfu, static, demand, pred, belady, ratio, loads in table:
        row = rows[int(cap)]
        for key, text in (
            ("lru", lru),
            ("lfu", lfu),
            ("static", static),
            ("predictive_demand", demand),
            ("predictive", pred),
            ("belady", belady),
            ("predictive/belady", ratio),
        ):
            _shown(row[key], text)
        for key, text in zip(("lru", "predictive", "belady"), loads.split(", ")):
            _shown(row[f"{key}_loads_per_token"], text)


def test_the_non_expert_accuracy_table_is_its_result_file() -> None:
    results = json.loads((REPO / "benchmarks/accuracy-non-experts/accuracy.json").read_text())["results"]
    by = {Path(r["model"]).name: r for r in results}
    packs = {
        "int4 g128, fp32 (as above)": "int4-g128",
        "int4 g128, int8": "int4-g128-nonexperts-int8",
        "int4 g128, int4 g128": "int4-g128-nonexperts-int4",
        "int8, int8": "int8-nonexperts-int8",
    }
    table = _table("docs/quantization.md", "| experts, non-experts |")
    assert [r[0] for r in table] == list(packs)
    for name, ppl, nll, kl, top1 in table:
        row = by[packs[name]]
        for value, text in (
            (row["perplexity"], ppl),
            (row["nll"], nll),
            (row["kl"], kl),
            (row["top1_agreement"], top1),
        ):
            _shown(value, text)


def test_the_readme_serve_table_is_the_serve_result_file() -> None:
    rows = {(r["contender"], r["clients"]): r for r in _rows("benchmarks/serve/serve.json")}
    table = _table("README.md", "| clients | transformers, all in RAM")
    assert [int(r[0]) for r in table] == [1, 4, 16]
    names = ("transformers (all in RAM)", "expertflow fifo", "expertflow experts")
    for clients, *cells, loads in table:
        for name, cell in zip(names, cells, strict=True):
            row = rows[(name, int(clients))]
            tok_s, ttft = (c.strip() for c in cell.split(","))
            _shown(row["output_tok_s"], tok_s)
            _shown(row["ttft_p50_ms"], ttft.removesuffix(" ms"))
        fifo, experts = (c.strip() for c in loads.split("/"))
        _shown(rows[("expertflow fifo", int(clients))]["expert_loads_per_token"], fifo)
        _shown(rows[("expertflow experts", int(clients))]["expert_loads_per_token"], experts)
    assert "bench serve" in json.loads((REPO / "benchmarks/serve/serve.json").read_text())["command"]
