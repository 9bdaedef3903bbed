"""``expertflow inspect``: the figures a user sizes budgets with, as data and as a table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from expertflow.cli import main as cli_main
from expertflow.config import format_size
from expertflow.core import BLOCK
from expertflow.lab.inspect import describe, format_table
from expertflow.pipeline import budget as budget_module
from expertflow.tiers.layout import TensorKind
from expertflow.tiers.pack import pack_checkpoint
from expertflow.tiers.safetensors_index import open_checkpoint, scan_checkpoint
from tests.checkpoints import FAMILIES, expected_expert_counts, save_dense_checkpoint


def round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real dense (non-MoE) checkpoint."""
    return save_dense_checkpoint(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("family", FAMILIES)
def test_description_matches_the_checkpoint(checkpoints: Any, family: str) -> None:
    root = checkpoints.get(family)
    layout = open_checkpoint(root)
    desc = describe(layout)
    expected = expected_expert_counts(family)

    assert desc["has_experts"] and not desc["packed"]
    assert desc["model_type"] == family
    assert desc["experts_per_layer"] == {str(k): v for k, v in expected.items()}
    assert desc["moe_layers"] == sorted(expected)
    assert desc["num_experts"] == sum(expected.values())
    assert sorted(desc["moe_layers"] + desc["dense_layers"]) == list(range(desc["num_layers"]))
    assert desc["bytes_per_expert"] == max(s.nbytes for s in layout.experts.values())
    assert [t["role"] for t in desc["expert_tensors"]] == [
        t.role for t in layout.spec(layout.keys()[0]).tensors
    ]
    assert sum(t["nbytes"] for t in desc["expert_tensors"]) <= desc["bytes_per_expert"]

    # Every byte of tensor data is accounted for once: experts + non-expert = what the files hold.
    tensors, _, files = scan_checkpoint(root)
    assert desc["expert_bytes"] + desc["non_expert_bytes"] == sum(t.nbytes for t in tensors)
    assert sum(desc["non_expert_bytes_by_kind"].values()) == desc["non_expert_bytes"]
    assert set(desc["non_expert_bytes_by_kind"]) == {k.value for k in TensorKind}
    assert desc["non_expert_bytes_by_kind"]["router"] > 0
    assert {f["name"]: f["bytes"] for f in desc["files"]} == {f.name: f.stat().st_size for f in files}

    slot = round_up(desc["bytes_per_expert"])
    budget = desc["budget"]
    assert budget["host_buffer_bytes"]["mmap"] == slot
    assert budget["host_all_experts_bytes"]["mmap"] == slot * desc["num_experts"]
    assert budget["host_all_experts_bytes"]["direct"] >= budget["host_all_experts_bytes"]["mmap"]
    assert budget["host_per_layer_bytes"] == slot * max(expected.values())
    assert budget["host_minimum_bytes"] == slot * desc["experts_per_token"]
    assert budget["resident_non_expert_bytes"] == desc["non_expert_bytes"]


def test_shared_experts_and_dense_layers_are_broken_out(checkpoints: Any) -> None:
    qwen = describe(open_checkpoint(checkpoints.get("qwen2_moe")))
    assert qwen["non_expert_bytes_by_kind"]["shared_expert"] > 0
    ds = describe(open_checkpoint(checkpoints.get("deepseek_v3")))
    first_dense = ds["num_layers"] - len(ds["moe_layers"])
    assert first_dense >= 1
    assert ds["dense_layers"] == list(range(first_dense))
    assert ds["non_expert_bytes_by_kind"]["dense_mlp"] > 0
    assert ds["non_expert_bytes_by_kind"]["shared_expert"] > 0
    mixtral = describe(open_checkpoint(checkpoints.get("mixtral")))
    assert mixtral["non_expert_bytes_by_kind"]["shared_expert"] == 0
    assert mixtral["dense_layers"] == []


def test_vision_language_model_counts_its_text_layers(checkpoints: Any) -> None:
    desc = describe(open_checkpoint(checkpoints.get("qwen3_vl_moe")))
    text = open_checkpoint(checkpoints.get("qwen3_vl_moe")).config["text_config"]
    assert isinstance(text, dict)
    assert desc["num_layers"] == text["num_hidden_layers"]
    assert desc["experts_per_token"] == text["num_experts_per_tok"]
    assert desc["non_expert_bytes_by_kind"]["other"] > 0  # the vision tower


def test_table_states_the_budgets_a_user_needs(checkpoints: Any) -> None:
    desc = describe(open_checkpoint(checkpoints.get("mixtral")))
    table = format_table(desc)
    budget = desc["budget"]
    assert f"host budget for all experts: {format_size(budget['host_all_experts_bytes']['mmap'])}" in table
    assert f"per layer: {format_size(budget['host_per_layer_bytes'])}" in table
    assert (
        f"top-{desc['experts_per_token']} experts resident): {format_size(budget['host_minimum_bytes'])}"
        in table
    )
    assert desc["architecture"] in table and desc["fingerprint"] in table
    for f in desc["files"]:
        assert f["name"] in table
    for t in desc["expert_tensors"]:
        assert t["role"] in table and "x".join(map(str, t["shape"])) in table
    assert "router" in table


def test_json_output_round_trips_through_the_cli(
    checkpoints: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The two CLI calls below each read the machine's memory; hold the reading still between them (free
    # memory moves by megabytes between calls, which made the printed budget differ in the last digit).
    reading = budget_module.read_memory()
    monkeypatch.setattr(budget_module, "read_memory", lambda *a, **k: reading)
    root = checkpoints.get("gpt_oss")
    desc = describe(open_checkpoint(root))
    assert json.loads(json.dumps(desc)) == desc
    assert cli_main(["inspect", str(root), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # The CLI adds the default budget this machine would get, sized from its memory, and says why.
    default = printed["budget"].pop("default")
    check = printed.pop("family_check")  # and what is known of the family check (tests/test_family_check.py)
    assert check["status"] in ("verified", "not yet checked")
    assert printed == desc
    assert 0 < default["host_bytes"] <= desc["budget"]["host_all_experts_bytes"]["mmap"]
    assert default["slots"] >= 1 and "available" in default["reason"]
    desc["budget"]["default"] = default
    desc["family_check"] = check
    assert cli_main(["inspect", str(root)]) == 0
    assert capsys.readouterr().out.strip() == format_table(desc)
    assert "default host budget on this machine" in format_table(desc)


def test_pack_is_described_as_packed_with_the_source_fingerprint(checkpoints: Any, tmp_path: Path) -> None:
    src = checkpoints.get("olmoe")
    source = describe(open_checkpoint(src))
    packed = describe(open_checkpoint(pack_checkpoint(src, tmp_path / "p", progress=False)))
    assert packed["packed"] and packed["checksums"] and not source["checksums"]
    assert packed["fingerprint"] == source["fingerprint"]
    assert packed["expert_bytes"] == source["expert_bytes"]
    assert packed["non_expert_bytes_by_kind"] == source["non_expert_bytes_by_kind"]
    assert sorted(f["name"] for f in packed["files"]) == ["experts.bin", "model.safetensors"]
    # A packed expert is one aligned read, so direct reads need no bigger buffers than mmap ones.
    assert (
        packed["budget"]["host_all_experts_bytes"]["direct"]
        == packed["budget"]["host_all_experts_bytes"]["mmap"]
    )
    assert "ExpertFlow pack" in format_table(packed)


def test_dense_model_opens_but_inspect_says_it_has_no_experts(
    dense_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = open_checkpoint(dense_model)
    assert not layout.experts and layout.non_expert
    desc = describe(layout)
    assert not desc["has_experts"] and desc["num_experts"] == 0 and desc["moe_layers"] == []
    assert desc["dense_layers"] == [0, 1]
    assert desc["expert_bytes"] == 0 and desc["non_expert_bytes_by_kind"]["dense_mlp"] > 0
    assert "dense (non-MoE) model" in desc["note"]
    assert json.loads(json.dumps(desc)) == desc
    assert cli_main(["inspect", str(dense_model)]) == 0
    out = capsys.readouterr().out
    assert "NO EXPERTS" in out and "LlamaForCausalLM" in out
    assert "host budget" not in out


def test_inspect_of_a_directory_without_weights_is_a_clear_error(
    dense_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "config.json").write_bytes((dense_model / "config.json").read_bytes())
    assert cli_main(["inspect", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no model.safetensors" in err and str(root) in err
    assert cli_main(["inspect", os.fspath(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_checkpoint_transformers_cannot_build_is_still_described_with_a_default_plan(
    checkpoints: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its experts are found by the model-free naming; the default plan is sized from the files alone (the
    family check cannot run on it, and says so)."""
    root = tmp_path / "madeup"
    root.mkdir()
    for f in checkpoints.get("mixtral", sharded=False).iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    config = json.loads((root / "config.json").read_text())
    config.update(model_type="madeup_moe", architectures=["MadeUpForCausalLM"])
    (root / "config.json").write_text(json.dumps(config))
    assert cli_main(["inspect", str(root), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["num_experts"] == 24 and desc["budget"]["default"]["slots"] >= 1
    assert desc["family_check"]["status"] == "not checkable"
