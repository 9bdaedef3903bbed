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


# -- traps a new user hit: one-line errors, before any work ------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "ppl", "/nonexistent/model", "--text", "t.py"],
        ["eval", "ppl", "org/name", "--text", "t.py"],  # a hub id: nothing is downloaded
    ],
)
def test_eval_of_a_missing_model_directory_is_one_line(argv, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a model directory" in err and "Traceback" not in err


def test_eval_with_a_missing_reference_is_refused_before_the_text_is_read(checkpoints, capsys) -> None:
    argv = ["eval", "ppl", str(checkpoints.get("mixtral")), "--text", "/nonexistent.py"]
    assert main([*argv, "--reference", "/nonexistent/ref"]) == 2
    assert "/nonexistent/ref is not a model directory" in capsys.readouterr().err


def test_bench_decode_refuses_budgets_below_one_tokens_experts_before_running(checkpoints, tmp_path, capsys):
    argv = ["bench", "decode", "--model", str(checkpoints.get("mixtral")), "--workdir", str(tmp_path)]
    assert main([*argv, "--budgets", "0.01", "--contenders", "lru", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "below this model's minimum" in err and "--budgets" in err
    assert not (tmp_path / "o").exists()


def test_addresses_without_a_scheme_say_what_an_address_looks_like() -> None:
    from expertflow.config import StoreConfig
    from expertflow.errors import ConfigError
    from expertflow.services.server import ServerConfig

    with pytest.raises(ConfigError, match=r"'localhost:5999': expected tcp://host:port or ipc://path"):
        StoreConfig(remote=("localhost:5999",))
    with pytest.raises(ConfigError, match=r"'127.0.0.1:5601': expected tcp://host:port or ipc://path"):
        ServerConfig(binds=("127.0.0.1:5601",))
    with pytest.raises(ConfigError, match="expected tcp://host:port"):
        StoreConfig(remote=("tcp://hostonly",))
    StoreConfig(remote=("tcp://127.0.0.1:5555", "ipc:///tmp/x.sock"))  # fine


async def test_an_ipc_path_another_process_serves_is_refused_and_a_stale_one_reused(tmp_path) -> None:
    import socket

    import zmq.asyncio

    from expertflow.errors import ConfigError
    from expertflow.services.frontend import FrontendLimits, ZmtpFrontend

    path = tmp_path / "d.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)  # someone serves it
    ctx = zmq.asyncio.Context()
    front = ZmtpFrontend(ctx, "inproc://backend", FrontendLimits())
    try:
        with pytest.raises(ConfigError, match="another process is serving it"):
            front.bind(f"ipc://{path}")
        live.close()  # the socket file stays, nobody answers: a stale one of an earlier run
        assert front.bind(f"ipc://{path}") == f"ipc://{path}"
    finally:
        await front.aclose()
        ctx.term()


def test_a_pack_without_its_manifest_says_so(checkpoints, tmp_path) -> None:
    from expertflow.errors import CheckpointError
    from expertflow.tiers.pack import pack_checkpoint
    from expertflow.tiers.safetensors_index import open_checkpoint

    packed = pack_checkpoint(checkpoints.get("mixtral"), tmp_path / "p", progress=False)
    (packed / "expertflow-manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"expertflow-manifest\.json"):
        open_checkpoint(packed)


def test_version_and_defaults_in_help(capsys) -> None:
    from expertflow import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"expertflow {__version__}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens MAX_NEW_TOKENS at most this many new tokens" in text and "(default: 32)" in text
    assert (
        "--device DEVICE compute device (cpu, cuda:0) (default: cpu)" in text
    )  # added where the text had none


def test_default_bench_budgets_below_one_tokens_experts_are_left_out_with_a_note(checkpoints) -> None:
    from expertflow.lab.decode import _check_budgets, default_contenders
    from expertflow.lab.report import BenchResult
    from expertflow.pipeline.planner import all_experts_bytes
    from expertflow.tiers.safetensors_index import open_checkpoint

    path = checkpoints.get("mixtral")  # top-2 experts: 2% of all experts is less than two of them
    models = {None: (str(path), all_experts_bytes(open_checkpoint(path), "mmap"))}
    contenders = default_contenders([1.0, 0.02], ["transformers", "lru"])
    result = BenchResult("decode", [])
    kept = _check_budgets(contenders, models, "mmap", False, result, lambda _: None)
    assert [c.label for c in kept] == ["transformers (RAM)", "expertflow lru @100%"]
    assert any("default budget 0.02 is below this model's minimum" in n for n in result.notes)
