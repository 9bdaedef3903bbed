"""The load-time family check: a family is proved exact on a tiny seeded instance of its config class before
its real weights run, refused with a typed error when it is not, and checked once per family and versions."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import expertflow.model.verify as verify
from expertflow.cli import main as cli_main
from expertflow.config import StoreConfig
from expertflow.errors import UnsupportedModelError, UnverifiedFamilyWarning
from expertflow.model.loader import load_model, open_model_checkpoint
from expertflow.pipeline.planner import slot_size
from tests.fake_families import IdScaledConfig, NormedConfig, reference_logits, save_fake_checkpoint

IDS = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of the test's own, and no process-wide memory of earlier checks."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("EXPERTFLOW_CACHE_DIR", str(folder))
    monkeypatch.setattr(verify, "_memory", {})
    return folder


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model types whose family check actually ran (not looked up)."""
    seen: list[str] = []
    real = verify.run_check

    def counted(hf_config: Any, load: Any) -> verify.FamilyCheck:
        seen.append(hf_config.model_type)
        return real(hf_config, load)

    monkeypatch.setattr(verify, "run_check", counted)
    return seen


def _small() -> StoreConfig:
    return StoreConfig(host_bytes=1 << 20, predictor="none")


def test_a_family_whose_experts_override_forward_with_expert_ids_is_refused_at_load(
    tmp_path: Path, cache: Path
) -> None:
    root = save_fake_checkpoint(IdScaledConfig, tmp_path / "idscaled")
    with pytest.raises(UnsupportedModelError) as refused:
        load_model(root, config=_small())
    message = str(refused.value)
    assert "expertflow_test_idscaled is refused" in message
    assert "model.layers.0.mlp.experts differs first" in message  # which module
    assert "logit scale" in message and "logits differ by" in message
    assert "trust_family=True" in message


def test_a_per_expert_table_inside_the_experts_module_is_indexed_by_expert_and_runs_exactly(
    tmp_path: Path, cache: Path
) -> None:
    """Rows per route and a ``[num_experts, hidden]`` scale in a submodule (Ergo's pattern): verified, and the
    real checkpoint's logits equal transformers' with experts evicted and read again."""
    root = save_fake_checkpoint(NormedConfig, tmp_path / "normed")
    want = reference_logits(root, IDS)
    slot = slot_size(open_model_checkpoint(root), "mmap")
    with load_model(root, config=StoreConfig(host_bytes=4 * slot, predictor="none")) as model:
        assert model.expert_family_check.verified
        with torch.no_grad():
            got = model(input_ids=IDS).logits
        stats = model.expert_stats()
    assert stats.evictions > 0
    assert (got - want).abs().max().item() <= 1e-5 * max(want.abs().max().item(), 1.0)


def test_the_check_runs_once_per_family_and_versions_and_is_kept_in_the_cache_folder(
    checkpoints: Any, cache: Path, runs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = checkpoints.get("mixtral")
    load_model(root, config=_small()).close()
    load_model(root, config=_small()).close()
    assert runs == ["mixtral"]
    saved = json.loads((cache / verify.CACHE_FILE).read_text())
    (entry,) = saved["checks"].values()
    assert entry["status"] == "verified" and entry["model_type"] == "mixtral"
    assert f"transformers {transformers.__version__}" in entry["versions"]
    monkeypatch.setattr(verify, "_memory", {})  # a new process reads the file
    load_model(root, config=_small()).close()
    assert runs == ["mixtral"]
    monkeypatch.setattr(transformers, "__version__", "99.0.0")  # another transformers: checked again
    load_model(root, config=_small()).close()
    assert runs == ["mixtral", "mixtral"]


def test_a_refusal_is_cached_and_refused_again_without_running(
    tmp_path: Path, cache: Path, runs: list[str]
) -> None:
    root = save_fake_checkpoint(IdScaledConfig, tmp_path / "idscaled")
    for _ in range(2):
        with pytest.raises(UnsupportedModelError, match="is refused"):
            load_model(root, config=_small())
    assert runs == ["expertflow_test_idscaled"]


def test_trust_family_runs_a_refused_family_only_with_a_warning(tmp_path: Path, cache: Path) -> None:
    root = save_fake_checkpoint(IdScaledConfig, tmp_path / "idscaled")
    with pytest.warns(UnverifiedFamilyWarning, match="WITHOUT the family check"):
        model = load_model(root, config=_small(), trust_family=True)
    with model:
        assert model.expert_family_check is None
        with torch.no_grad():
            model(input_ids=IDS)


def test_a_corrupt_cache_file_is_ignored_and_replaced(
    checkpoints: Any, cache: Path, runs: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    cache.mkdir(parents=True)
    (cache / verify.CACHE_FILE).write_text('{"version": 1, "checks": {"mixtral|')
    load_model(checkpoints.get("mixtral"), config=_small()).close()
    assert runs == ["mixtral"]
    assert "ignoring unreadable family-check cache" in caplog.text
    assert json.loads((cache / verify.CACHE_FILE).read_text())["version"] == 1


def test_an_unwritable_cache_folder_costs_a_check_per_process_not_an_error(
    checkpoints: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: list[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EXPERTFLOW_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(verify, "_memory", {})
    load_model(checkpoints.get("mixtral"), config=_small()).close()
    load_model(checkpoints.get("mixtral"), config=_small()).close()
    assert runs == ["mixtral"]


def test_the_check_leaves_the_callers_random_state_alone(checkpoints: Any, cache: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(checkpoints.get("mixtral"), config=_small()).close()
    assert torch.equal(torch.rand(3), expected)


def test_inspect_says_not_yet_checked_verified_and_refused(
    checkpoints: Any, tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = checkpoints.get("mixtral")
    assert cli_main(["inspect", str(root)]) == 0
    assert "family check       not yet checked" in capsys.readouterr().out
    load_model(root, config=_small()).close()
    assert cli_main(["inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family_check"]["status"] == "verified"
    fake = save_fake_checkpoint(IdScaledConfig, tmp_path / "idscaled")
    assert cli_main(["inspect", str(fake), "--check-family"]) == 0
    assert "family check       refused: logits differ by" in capsys.readouterr().out


def test_generate_refuses_a_refused_family_and_runs_it_with_trust_family(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = save_fake_checkpoint(IdScaledConfig, tmp_path / "idscaled")
    argv = ["generate", str(root), "--token-ids", "1,2,3", "--max-new-tokens", "2", "--host-mem", "1MiB"]
    assert cli_main(argv) == 2
    assert "is refused" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedFamilyWarning)
        assert cli_main([*argv, "--trust-family"]) == 0
    assert "WARNING: --trust-family" in capsys.readouterr().err
