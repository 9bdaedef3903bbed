"""One store planner: what ``inspect`` says ``generate`` will open is what ``load_model`` opens, for plain
checkpoints, int4 packs and pre-quantized checkpoints, with the budget sized automatically or given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import expertflow.pipeline.budget as budget_module
from expertflow.cli import main as cli_main
from expertflow.config import StoreConfig
from expertflow.model.loader import load_model, plan_model
from expertflow.model.quantize_pack import pack_quantized
from expertflow.pipeline.planner import plan_store, slot_size
from expertflow.quant.scheme import QuantScheme
from expertflow.tiers.safetensors_index import open_checkpoint
from tests.checkpoints import save_checkpoint
from tests.quant_fixtures import quantize_checkpoint


@pytest.fixture
def still_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """One reading of the machine's memory for the whole test (free memory moves between calls)."""
    reading = budget_module.read_memory()
    monkeypatch.setattr(budget_module, "read_memory", lambda *a, **k: reading)


@pytest.fixture(scope="module")
def checkpoints_to_plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    mixtral = save_checkpoint("mixtral", root / "mixtral", shard_size=None)
    out = {
        "mixtral": mixtral,
        "gpt_oss": save_checkpoint("gpt_oss", root / "gpt_oss"),
        "int4-pack": pack_quantized(mixtral, root / "int4", QuantScheme(4, 32), progress=False),
    }
    quantize_checkpoint(mixtral, root / "gptq", root / "gptq-reference", "gptq")
    out["gptq"] = root / "gptq"
    return out


CASES = ("mixtral", "gpt_oss", "int4-pack", "gptq")


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("host_bytes", [None, "three slots"])
def test_the_plan_inspect_and_plan_model_give_is_the_plan_load_model_opens(
    name: str,
    host_bytes: str | None,
    checkpoints_to_plan: dict[str, Path],
    still_memory: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = checkpoints_to_plan[name]
    config = StoreConfig(predictor="none")
    if host_bytes is not None:
        config = config.with_(host_bytes=3 * plan_model(root).slot_nbytes)
    planned = plan_model(root, config)
    with load_model(root, config=config) as model:
        opened = model.expert_store.plan
        assert opened == planned
        assert model.expert_store.num_slots == planned.num_slots
        assert model.expert_store.slot_nbytes == planned.slot_nbytes
    if host_bytes is None:
        assert cli_main(["inspect", str(root), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["budget"]["default"] == planned.as_dict()


def test_a_pre_quantized_slot_holds_the_kernel_layout_so_inspect_cannot_size_it_from_the_file_alone(
    checkpoints_to_plan: dict[str, Path], still_memory: None
) -> None:
    """The case that made inspect and generate disagree: GPTQ experts are converted for the kernel, whose layout
    is larger than the stored expert, and the planner sizes the slot for it."""
    root = checkpoints_to_plan["gptq"]
    stored = slot_size(open_checkpoint(root), "mmap")
    assert plan_model(root).slot_nbytes > stored


def test_reads_in_flight_are_bounded_by_bytes_and_count(tmp_path: Path, still_memory: None) -> None:
    layout: Any = open_checkpoint(save_checkpoint("mixtral", tmp_path / "m", shard_size=None))
    slot = slot_size(layout, "mmap")
    few = plan_store(layout, StoreConfig(host_bytes=4 * slot, max_inflight_bytes=2 * slot))
    assert few.reads_in_flight == 2
    many = plan_store(layout, StoreConfig(host_bytes=4 * slot, max_concurrent_reads=3))
    assert many.reads_in_flight == 3
    assert few.num_slots == 4 and few.host_bytes == 4 * slot
