"""``expertflow eval grid``: accuracy beside throughput, for every configuration of a grid.

A task file (JSONL) holds requests of three kinds: ``yesno`` (a question with answer yes or no; POPE-style
accuracy, precision, recall, F1 and yes-ratio, and how many answers were neither: see :func:`yes_no`),
``exact`` (the generated text must start with the answer)
and ``ppl`` (perplexity of a text). Every configuration of the grid (host budget, policy, predictor, schedule,
routing, quantized experts) runs the task file as one batch, in its own process (so its peak memory is its
own), and gives one row: accuracy, tokens/s, expert loads and bytes read per token, hit rate, peak memory.
Rows are appended to ``grid.jsonl`` as they finish; ``--resume`` skips the configurations already there.
Lossless configurations (exact routing, experts as stored) must answer identically: any difference is marked
as an error, because it is a bug.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertflow.config import POLICIES, PREDICTORS
from expertflow.errors import ConfigError

KINDS = ("yesno", "exact", "ppl")
AXES: dict[str, str] = {
    "budget": "a share of all experts' slots (0 < b <= 1) or auto",
    "policy": ", ".join(POLICIES),
    "predictor": ", ".join(PREDICTORS),
    "schedule": "fifo, experts",
    "routing": "exact, or cache-aware:MARGIN",
    "quantize": "none, int4, int8",
}
DEFAULTS: dict[str, Any] = {
    "budget": "auto",
    "policy": "lru",
    "predictor": "combined",
    "schedule": "fifo",
    "routing": "exact",
    "quantize": "none",
}


@dataclass(frozen=True)
class Task:
    id: str
    kind: str
    input_ids: tuple[int, ...]
    answer: str | None
    max_new_tokens: int
    image: str | None = None  # an image file, for MoE vision-language models


def _axis_value(axis: str, text: str) -> Any:
    if axis == "budget":
        if text == "auto":
            return text
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value <= 1:
            raise ConfigError(f"grid axis budget: {text!r} is not {AXES['budget']}")
        return value
    if axis == "routing":
        if text == "exact":
            return text
        kind, _, margin = text.partition(":")
        try:
            ok = kind == "cache-aware" and 0 <= float(margin) <= 1
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"grid axis routing: {text!r} is not {AXES['routing']} (margin in [0, 1])")
        return text
    allowed = {"policy": POLICIES, "predictor": PREDICTORS, "schedule": ("fifo", "experts")}.get(
        axis, ("none", "int4", "int8")
    )
    if text not in allowed:
        raise ConfigError(f"grid axis {axis}: unknown value {text!r}; choose from {AXES[axis]}")
    return text


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["budget=0.25,0.5", "policy=lru,predictive"]`` -> axis values; axes not given keep their default."""
    grid: dict[str, list[Any]] = {axis: [value] for axis, value in DEFAULTS.items()}
    for item in items:
        axis, sep, values = item.partition("=")
        if not sep or axis not in AXES:
            raise ConfigError(f"grid item {item!r}: write AXIS=V1,V2 with AXIS one of {', '.join(AXES)}")
        grid[axis] = [_axis_value(axis, v.strip()) for v in values.split(",") if v.strip()]
        if not grid[axis]:
            raise ConfigError(f"grid axis {axis} has no values")
    return grid


def configurations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    axes = list(AXES)
    return [dict(zip(axes, values)) for values in itertools.product(*(grid[a] for a in axes))]


def config_key(config: dict[str, Any]) -> str:
    return ",".join(f"{axis}={config[axis]}" for axis in AXES)


def lossless(config: dict[str, Any]) -> bool:
    return config["routing"] == "exact" and config["quantize"] == "none"


def read_tasks(path: str | Path, model_dir: str | Path, *, byte_tokens: bool) -> list[Task]:
    """Tasks from a JSONL file, every line checked before any work; an error names the line."""
    from expertflow.model.batch import ImageFields, jsonl_objects, positive_int
    from expertflow.model.generate import encode_prompt

    tasks: list[Task] = []
    images = ImageFields(path, model_dir)
    fields = ("kind", "prompt", "answer", "text", "image", "max_new_tokens")
    for tid, where, item in jsonl_objects(path, "task", fields):
        kind = item.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "ppl" and "image" in item:
            raise ConfigError(f"{where}: a ppl task is a text; it takes no image")
        field = "text" if kind == "ppl" else "prompt"
        content = item.get(field)
        if not isinstance(content, str) or not content:
            raise ConfigError(f"{where}: a {kind} task needs non-empty '{field}'")
        answer = item.get("answer")
        if kind == "yesno" and answer not in ("yes", "no"):
            raise ConfigError(f"{where}: a yesno task's 'answer' is yes or no, got {answer!r}")
        if kind == "exact" and not (isinstance(answer, str) and answer):
            raise ConfigError(f"{where}: an exact task needs a non-empty 'answer'")
        default_new = 3 if kind == "yesno" else max(4, len(str(answer or "")) + 2)
        n = positive_int(item, "max_new_tokens", default_new, where)
        ids = encode_prompt(model_dir, content, None, byte_tokens)
        image = images.check(item.get("image"), where, ids)
        tasks.append(Task(tid, kind, tuple(ids), answer, n, image))
    return tasks


# --- scoring ---------------------------------------------------------------------------------------


def _text(tokens: Sequence[int], model_dir: str, byte_tokens: bool) -> str:
    if byte_tokens:
        return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
    from expertflow.model.generate import load_tokenizer

    return str(load_tokenizer(model_dir).decode(list(tokens)))


_WORD = re.compile(r"[a-z]+")


def yes_no(text: str) -> str | None:
    """``"yes"`` or ``"no"`` when the answer holds that word (whole words, any case) and not the other; None for
    an answer that is neither, or both. "Sure, yes." is yes; "yesterday" and "no, yes" are neither. (POPE's own
    rule reads any answer without "no"/"not" as yes; here a non-answer is counted, not guessed.)"""
    words = set(_WORD.findall(text.lower()))
    said_yes, said_no = "yes" in words, "no" in words
    if said_yes == said_no:
        return None
    return "yes" if said_yes else "no"


def score(tasks: Sequence[Task], texts: dict[str, str], nll: float | None) -> dict[str, Any]:
    """Accuracy figures of one configuration from its generated texts (and the ppl tasks' mean NLL).

    yes/no answers are read by :func:`yes_no`; one that is neither is wrong, is not a "yes" for precision and
    recall, and is counted in ``yesno_other`` / ``yesno_other_rate``."""
    out: dict[str, Any] = {}
    yesno = [t for t in tasks if t.kind == "yesno"]
    if yesno:
        said = {t.id: yes_no(texts[t.id]) for t in yesno}
        truth = {t.id: t.answer for t in yesno}
        tp = sum(said[i] == "yes" and truth[i] == "yes" for i in said)
        fp = sum(said[i] == "yes" and truth[i] == "no" for i in said)
        fn = sum(said[i] != "yes" and truth[i] == "yes" for i in said)
        other = sum(said[i] is None for i in said)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out.update(
            yesno_accuracy=sum(said[i] == truth[i] for i in said) / len(said),
            yesno_precision=precision,
            yesno_recall=recall,
            yesno_f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            yes_ratio=sum(v == "yes" for v in said.values()) / len(said),
            yesno_other=other,
            yesno_other_rate=other / len(said),
        )
    exact = [t for t in tasks if t.kind == "exact"]
    if exact:
        hits = sum(texts[t.id].strip().startswith(str(t.answer).strip()) for t in exact)
        out["exact_match"] = hits / len(exact)
    if nll is not None:
        out["perplexity"] = math.exp(nll)
    return out


# --- one configuration (in its own process) ----------------------------------------------------------


def run_configuration(
    model_dir: str, tasks_path: str, config: dict[str, Any], workdir: str, byte_tokens: bool
) -> dict[str, Any]:
    """Load the model as ``config`` says, run the tasks, and measure."""
    import torch

    from expertflow.config import StoreConfig
    from expertflow.lab.accuracy import evaluate
    from expertflow.model.batch import Request, generate_many
    from expertflow.model.loader import load_model
    from expertflow.pipeline.planner import all_experts_bytes
    from expertflow.tiers.safetensors_index import open_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    path = model_dir
    if config["quantize"] != "none":
        from expertflow.lab.decode import quantized_pack

        path = str(quantized_pack(model_dir, config["quantize"], workdir, log=lambda _: None))
    layout = open_checkpoint(path)
    host = None
    if config["budget"] != "auto":
        host = int(all_experts_bytes(layout, "mmap") * float(config["budget"]))
    routing: dict[str, Any] = {}
    if config["routing"] != "exact":
        routing = {"routing": "cache-aware", "routing_margin": float(config["routing"].partition(":")[2])}
    store_config = StoreConfig(
        host_bytes=host, policy=config["policy"], predictor=config["predictor"], **routing
    )
    tasks = read_tasks(tasks_path, model_dir, byte_tokens=byte_tokens)
    model: Any = load_model(path, config=store_config)
    with model:
        generation = [t for t in tasks if t.kind != "ppl"]
        texts: dict[str, str] = {}
        answers: dict[str, list[int]] = {}
        row: dict[str, Any] = {}
        if generation:
            result = generate_many(
                model,
                [Request(t.id, t.input_ids, t.max_new_tokens, t.image) for t in generation],
                schedule=config["schedule"],
            )
            answers = result.outputs
            texts = {i: _text(tokens, model_dir, byte_tokens) for i, tokens in answers.items()}
            bytes_read = sum((result.stats.get("bytes_read") or {}).values())
            row.update(
                tokens_per_second=result.tokens_per_second,
                expert_loads_per_token=result.expert_loads_per_token,
                hit_rate=result.hit_rate,
                MiB_read_per_token=bytes_read / max(1, result.new_tokens) / 2**20,
                rerouted=result.stats.get("rerouted"),
            )
        ppl_ids = [i for t in tasks if t.kind == "ppl" for i in t.input_ids]
        nll = evaluate(model, ppl_ids, name=path, window=256).nll if ppl_ids else None
    row.update(score(tasks, texts, nll))
    row["answers_digest"] = hashlib.sha256(json.dumps(answers, sort_keys=True).encode()).hexdigest()[:16]
    row["answers"] = {i: texts[i] for i in sorted(texts)}
    row["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


# --- the driver -------------------------------------------------------------------------------------

COLUMNS = [
    "config",
    "yesno_accuracy",
    "yesno_precision",
    "yesno_recall",
    "yesno_f1",
    "yes_ratio",
    "yesno_other_rate",
    "exact_match",
    "perplexity",
    "tokens_per_second",
    "expert_loads_per_token",
    "hit_rate",
    "MiB_read_per_token",
    "peak_rss_MiB",
    "error",
]


def bench_grid(
    model_dir: str,
    tasks_path: str,
    grid: dict[str, list[Any]],
    out: str | Path,
    *,
    byte_tokens: bool,
    resume: bool = False,
    workdir: str | Path = ".bench",
    progress: bool = True,
    run: Callable[..., dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run every configuration of ``grid``; rows are appended to ``out/grid.jsonl`` as they finish."""
    from tqdm import tqdm

    tasks = read_tasks(tasks_path, model_dir, byte_tokens=byte_tokens)  # every line checked before any work
    configs = configurations(grid)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "grid.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if resume and log_path.is_file():
        for line in log_path.read_text().splitlines():
            if line.strip():
                row = rescore(json.loads(line), tasks)
                done[row["config"]] = row
    elif log_path.exists():
        log_path.unlink()
    runner = run or _run_in_subprocess
    rows: list[dict[str, Any]] = []
    for config in tqdm(configs, desc="grid", unit="config", disable=not progress):
        key = config_key(config)
        if key in done:
            rows.append(done[key])
            continue
        row = runner(model_dir, tasks_path, config, str(workdir), byte_tokens)
        row = {"config": key, **config, **row}
        with open(log_path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        rows.append(row)
    _check_lossless(rows)
    return rows


def rescore(row: dict[str, Any], tasks: Sequence[Task]) -> dict[str, Any]:
    """``row`` with its accuracy figures computed again from its stored answers (after a change of the scoring
    rules, ``--resume`` re-scores a finished grid without running a model)."""
    answers = row.get("answers")
    if not isinstance(answers, dict) or any(t.id not in answers for t in tasks if t.kind != "ppl"):
        return row
    perplexity = row.get("perplexity")
    nll = math.log(perplexity) if isinstance(perplexity, (int, float)) and perplexity > 0 else None
    return {**row, **score(tasks, answers, nll)}


def _check_lossless(rows: list[dict[str, Any]]) -> None:
    """Lossless configurations must answer alike; any difference is marked as an error (it is a bug)."""
    exact = [r for r in rows if lossless(r) and "answers_digest" in r]
    if not exact:
        return
    first = exact[0]
    for r in exact[1:]:
        if r["answers_digest"] != first["answers_digest"]:
            r["error"] = f"lossless answers differ from {first['config']}"


def _run_in_subprocess(
    model_dir: str, tasks_path: str, config: dict[str, Any], workdir: str, byte_tokens: bool
) -> dict[str, Any]:
    spec = json.dumps([model_dir, tasks_path, config, workdir, byte_tokens])
    proc = subprocess.run(
        [sys.executable, "-m", "expertflow.lab.grid", "--worker", spec],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-2:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def write_report(rows: list[dict[str, Any]], out: str | Path, command: str) -> None:
    """grid.md (table + command), grid.json and grid.png (accuracy against tokens/s)."""
    from expertflow.lab.report import markdown_table

    out_dir = Path(out)
    table = markdown_table(rows, COLUMNS)
    (out_dir / "grid.md").write_text(f"# eval grid\n\n{table}\n\nCommand: `{command}`\n")
    (out_dir / "grid.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    metric = next(
        (m for m in ("exact_match", "yesno_accuracy", "perplexity") if any(m in r for r in rows)), None
    )
    if metric is None:
        return
    # One series per combination of the axes that vary (short labels), so that points do not need captions.
    varying = [a for a in AXES if len({str(r.get(a)) for r in rows}) > 1]
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if metric in r and r.get("tokens_per_second"):
            series.setdefault(" ".join(f"{a}={r[a]}" for a in varying) or "all", []).append(r)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    markers = "os^vD<>pP*Xh"
    for i, (label, members) in enumerate(sorted(series.items())):
        ax.scatter(
            [r["tokens_per_second"] for r in members],
            [r[metric] for r in members],
            label=label,
            marker=markers[i % len(markers)],
            s=40,
        )
    ax.set_xlabel("tokens/s")
    ax.set_ylabel(metric)
    ax.set_title("accuracy beside throughput")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(out_dir / "grid.png", dpi=120)
    plt.close(fig)


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    args = parser.parse_args(argv)
    model_dir, tasks_path, config, workdir, byte_tokens = json.loads(args.worker)
    print(json.dumps(run_configuration(model_dir, tasks_path, config, workdir, byte_tokens), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
