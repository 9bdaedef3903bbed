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
from expertflow.pipeline.budget import RUNTIME_SLACK
from expertflow.pipeline.planner import TIGHT_MARGIN, plan_store, slot_size
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
    few = plan_store(layout, StoreConfig(host_bytes=4 * slot, max_inflight_bytes=2 * slot, read_mode="mmap"))
    assert few.reads_in_flight == 2
    many = plan_store(layout, StoreConfig(host_bytes=4 * slot, max_concurrent_reads=3, read_mode="mmap"))
    assert many.reads_in_flight == 3
    assert few.num_slots == 4 and few.host_bytes == 4 * slot


MiB = 1 << 20


def _reading(available: int) -> budget_module.MemoryReading:
    return budget_module.MemoryReading(64 << 30, available, None, None, None, "MemAvailable of the machine")


def test_a_tight_machine_gets_one_read_in_flight_and_a_thin_margin_instead_of_a_refusal(
    tmp_path: Path,
) -> None:
    """The default budget does not refuse while one token's experts fit once reads in flight and the margin
    shrink: it runs with one read at a time, and says so."""
    layout: Any = open_checkpoint(save_checkpoint("mixtral", tmp_path / "m", shard_size=None))
    mmap = StoreConfig(read_mode="mmap")
    # The usual margin leaves no room at all; one read in flight and half the margin, room for many experts.
    tight = plan_store(layout, mmap, reserve=0, reading=_reading(RUNTIME_SLACK))
    assert tight.num_slots >= 2 and tight.reads_in_flight == 1 and "TIGHT" in tight.budget.reason
    roomy = plan_store(layout, mmap, reserve=0, reading=_reading(8 << 30))
    assert roomy.reads_in_flight == 4 and "TIGHT" not in roomy.budget.reason
    hopeless = plan_store(layout, mmap, reserve=0, reading=_reading(TIGHT_MARGIN))
    assert hopeless.num_slots < 2 and "TIGHT" not in hopeless.budget.reason  # below even the thin margin


def test_buffered_reads_in_flight_take_at_most_a_quarter_of_the_room(tmp_path: Path) -> None:
    """Reads in flight are sized from the budget: each buffered read holds a page-cache copy of an expert, so
    a machine with room for 8 experts reads 2 at a time (and pools 6), not the configured 4."""
    layout: Any = open_checkpoint(save_checkpoint("mixtral", tmp_path / "m", shard_size=None))
    slot = slot_size(layout, "mmap")
    plan = plan_store(
        layout, StoreConfig(read_mode="mmap"), reserve=0, reading=_reading(RUNTIME_SLACK + 8 * slot)
    )
    assert plan.reads_in_flight == 2 and plan.io_bytes == 2 * slot and plan.num_slots == 6
    # Direct reads land in the pool's own slots: nothing is set aside for them, the configured count runs.
    direct = plan_store(
        layout, StoreConfig(read_mode="direct"), reserve=0, reading=_reading(RUNTIME_SLACK + 8 * slot)
    )
    assert direct.reads_in_flight == 4 and direct.io_bytes == 0


def test_load_model_starts_on_a_tight_machine_and_runs_with_one_read_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    root = save_checkpoint("mixtral", tmp_path / "m", shard_size=None)
    plan = plan_model(root, StoreConfig(predictor="none"))
    tight = _reading(plan.reserve_bytes + RUNTIME_SLACK)
    monkeypatch.setattr(budget_module, "read_memory", lambda *a, **k: tight)
    with load_model(root, config=StoreConfig(predictor="none")) as model:
        plan = model.expert_store.plan
        assert plan.reads_in_flight == 1 and plan.num_slots >= 2 and "TIGHT" in plan.budget.reason
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))


def test_auto_reads_directly_only_when_the_budget_cannot_hold_every_expert(
    tmp_path: Path, still_memory: None
) -> None:
    """Beyond RAM a buffered read leaves a page-cache copy of each expert beside the pool's, charged to the
    memory limit: auto then reads with O_DIRECT (and reserves nothing for reads in flight)."""
    from expertflow.pipeline.planner import resolve_read_mode

    layout: Any = open_checkpoint(save_checkpoint("mixtral", tmp_path / "m", shard_size=None))
    roomy = _reading(64 << 30)
    assert resolve_read_mode(layout, StoreConfig(), reading=roomy).read_mode == "mmap"
    tight = StoreConfig(host_bytes=4 * slot_size(layout, "auto"))
    assert resolve_read_mode(layout, tight).read_mode == "direct"
    plan = plan_store(layout, tight)
    assert plan.io_bytes == 0 and plan.num_slots == 4
    buffered = plan_store(layout, tight.with_(read_mode="mmap"))
    assert buffered.io_bytes > 0
