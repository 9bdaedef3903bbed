"""The command lines do what the README says, with library errors turned into clear messages."""

from __future__ import annotations

import json
import re

import pytest

from expertflow.cli import build_parser, main
from expertflow.pipeline.traces import load


def test_generate_prints_tokens_and_a_summary_under_a_small_budget(checkpoints, capsys):
    path = checkpoints.get("mixtral")
    argv = ["generate", str(path), "--token-ids", "1,2,3,4", "--max-new-tokens", "6", "--host-mem", "400KiB"]
    rc = main([*argv, "--ignore-eos"])
    captured = capsys.readouterr()
    assert rc == 0
    # No tokenizer: the tokens are shown as ids on stdout; the summary goes to stderr.
    assert re.fullmatch(r"(\[\d+\]){6}\n", captured.out)
    err = captured.err
    assert "tokens: 4 prompt + 6 generated" in err
    assert "device tier: hit rate" in err and "read from nvme" in err and "stall" in err


def test_generate_json_reports_store_counters(checkpoints, capsys):
    path = checkpoints.get("qwen3_moe")
    argv = [
        "generate",
        str(path),
        "--token-ids",
        "5,6,7",
        "--max-new-tokens",
        "4",
        "--json",
        "--policy",
        "lfu",
    ]
    rc = main([*argv, "--ignore-eos"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)  # stdout is the JSON document alone
    assert payload["new_tokens"] == 4 and len(payload["tokens"]) == 4
    assert payload["stats"]["device_misses"] > 0
    # Decode-only counters (what tokens/s covers) leave out the prefill, which read experts too.
    total, decode = payload["stats"], payload["decode_stats"]
    assert 0 < decode["device_hits"] + decode["device_misses"] < total["device_hits"] + total["device_misses"]
    assert sum(decode["bytes_read"].values()) < sum(total["bytes_read"].values())


def test_trace_records_every_token_and_moe_layer(checkpoints, tmp_path, capsys):
    path = checkpoints.get("deepseek_v2")  # dense first layer: the trace holds MoE layers only
    out = tmp_path / "run.npz"
    assert main(["trace", str(path), "--token-ids", "1,2,3", "--max-new-tokens", "5", "--out", str(out)]) == 0
    trace = load(out)["run"]
    assert trace.layer_ids == (1, 2)
    assert trace.tokens == 3 + 4  # prompt, then one forward per generated token after the first
    assert trace.top_k == 2


def test_errors_are_messages_with_exit_code_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--token-ids", "1"]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--token-ids", "x,y"]) == 2
    assert "--token-ids" in capsys.readouterr().err


def test_every_documented_command_exists():
    parser = build_parser()
    for argv in (
        ["inspect", "d"],
        ["pack", "a", "b"],
        ["generate", "d"],
        ["trace", "d", "--out", "f"],
        ["bench", "tiers"],
        ["bench", "decode"],
        ["bench", "policies", "--trace", "t"],
    ):
        assert parser.parse_args(argv).func
    with pytest.raises(SystemExit):
        parser.parse_args(["nonsense"])


_WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as after `pip install expertflow` without the bench extra
from expertflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bench_without_its_extra_says_which_extra_before_any_work(tmp_path) -> None:
    import subprocess
    import sys

    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _WITHOUT_MATPLOTLIB,
            "bench",
            "policies",
            "--trace",
            str(tmp_path / "none.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0, run.stderr  # one line, no traceback
    assert "expertflow[bench]" in run.stderr and "matplotlib" in run.stderr
