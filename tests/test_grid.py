"""``expertflow eval grid``: a task file run for every configuration, accuracy beside throughput; lossless
configurations must agree; rows survive an interruption; bad input is named before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertflow.cli import main
from expertflow.errors import ConfigError
from expertflow.lab.grid import Task, parse_grid, read_tasks, rescore, score, yes_no
from tests.checkpoints import save_checkpoint

TASKS = [
    {"id": "e1", "kind": "exact", "prompt": "import o", "answer": "s"},
    {"id": "e2", "kind": "exact", "prompt": "def f(", "answer": "x"},
    {"id": "y1", "kind": "yesno", "prompt": "# is 1 < 2? ", "answer": "yes"},
    {"id": "y2", "kind": "yesno", "prompt": "# is 2 < 1? ", "answer": "no"},
    {"id": "p1", "kind": "ppl", "text": "def add(a, b):\n    return a + b\n"},
]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint("mixtral", tmp_path_factory.mktemp("grid") / "mixtral", shard_size=None)


def _tasks(tmp_path: Path, extra: list[dict] | None = None) -> Path:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in [*TASKS, *(extra or [])]) + "\n")
    return path


def test_a_grid_gives_a_row_per_configuration_and_lossless_ones_agree(
    mixtral: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks, out = _tasks(tmp_path), tmp_path / "out"
    args = ["eval", "grid", str(mixtral), "--tasks", str(tasks), "--byte-tokens", "--out", str(out)]
    grid = ["--grid", "budget=0.5,auto", "schedule=experts"]
    assert main([*args, *grid, "--workdir", str(tmp_path / "work")]) == 0
    rows = [json.loads(line) for line in (out / "grid.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("error" not in r for r in rows)
    for r in rows:
        assert 0 <= r["exact_match"] <= 1 and 0 <= r["yesno_accuracy"] <= 1 and r["perplexity"] > 1
        assert r["tokens_per_second"] > 0 and r["expert_loads_per_token"] > 0 and r["peak_rss_MiB"] > 0
    assert rows[0]["answers_digest"] == rows[1]["answers_digest"]  # the budget never changes the text
    assert rows[0]["hit_rate"] < rows[1]["hit_rate"]  # but how often experts are found resident
    assert (out / "grid.md").read_text().count("| budget=") == 2 and (out / "grid.png").is_file()
    capsys.readouterr()

    # Interrupted runs keep their rows: --resume runs nothing again...
    assert main([*args, *grid, "--resume"]) == 0
    assert len((out / "grid.jsonl").read_text().splitlines()) == 2
    # ...and a lossless row whose answers differ (a bug) is marked as an error.
    first = json.loads((out / "grid.jsonl").read_text().splitlines()[0])
    lines = (out / "grid.jsonl").read_text().splitlines()
    tampered = [json.loads(line) for line in lines]
    changed = next(r for r in tampered if r["routing"] == "exact" and r["config"] != first["config"])
    changed["answers_digest"] = "0" * 16
    (out / "grid.jsonl").write_text("\n".join(json.dumps(r) for r in tampered) + "\n")
    assert main([*args, *grid, "--resume"]) == 1
    assert "lossless answers differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["size=1"], "AXIS=V1,V2"),
        (["policy=random"], "unknown value 'random'"),
        (["budget=2"], "grid axis budget"),
        (["routing=cache-aware:x"], "grid axis routing"),
    ],
)
def test_an_unknown_grid_axis_or_value_is_named(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"kind": "guess", "prompt": "x"}, "line 6: 'kind' must be one of"),
        ({"kind": "yesno", "prompt": "x", "answer": "maybe"}, "line 6: a yesno task's 'answer'"),
        (
            {"kind": "exact", "prompt": "x", "answer": "y", "image": "missing.png"},
            "line 6: image 'missing.png'",
        ),
        (
            {"kind": "exact", "prompt": "x", "answer": "y", "image": "tasks.jsonl"},
            "line 6: .* is a text-only model: it takes no image",
        ),
    ],
)
def test_a_bad_task_line_is_named_before_any_work(
    mixtral: Path, tmp_path: Path, task: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        read_tasks(_tasks(tmp_path, [task]), mixtral, byte_tokens=True)


def test_yes_no_scoring_is_pope_style() -> None:
    tasks = [Task(str(i), "yesno", (1,), a, 3) for i, a in enumerate(["yes", "yes", "no", "no"])]
    texts = {"0": "Yes, it is", "1": "no", "2": "yes", "3": " no."}
    got = score(tasks, texts, None)
    assert got["yesno_accuracy"] == 0.5 and got["yes_ratio"] == 0.5
    assert got["yesno_precision"] == 0.5 and got["yesno_recall"] == 0.5 and got["yesno_f1"] == 0.5


@pytest.mark.parametrize(
    ("text", "read"),
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("Sure, yes", "yes"),
        ("no", "no"),
        ("No, there is none", "no"),
        ("yesterday", None),
        ("nope", None),
        ("par", None),
        ("", None),
        ("yes and no", None),
    ],
)
def test_yes_and_no_are_read_as_words_not_prefixes(text: str, read: str | None) -> None:
    assert yes_no(text) == read


def test_answers_that_are_neither_yes_nor_no_are_counted_and_never_scored_as_no() -> None:
    tasks = [
        Task("a", "yesno", (1,), "no", 3),
        Task("b", "yesno", (1,), "no", 3),
        Task("c", "yesno", (1,), "yes", 3),
        Task("d", "yesno", (1,), "yes", 3),
    ]
    got = score(tasks, {"a": "par", "b": "no", "c": "yesterday", "d": "Sure, yes"}, None)
    assert got["yesno_accuracy"] == 0.5  # b and d; "par" is not a right "no"
    assert got["yesno_other"] == 2 and got["yesno_other_rate"] == 0.5
    assert got["yes_ratio"] == 0.25
    assert got["yesno_precision"] == 1.0 and got["yesno_recall"] == 0.5


def test_a_resumed_grid_is_scored_again_from_its_stored_answers(tmp_path: Path) -> None:
    tasks = [Task("a", "yesno", (1,), "no", 3), Task("b", "exact", (1,), "x = 1", 6)]
    stale = {"config": "c", "answers": {"a": "par", "b": "x = 1\n"}, "yesno_accuracy": 1.0, "perplexity": 2.0}
    row = rescore(stale, tasks)
    assert row["yesno_accuracy"] == 0.0 and row["yesno_other"] == 1 and row["exact_match"] == 1.0
    assert row["perplexity"] == pytest.approx(2.0)
