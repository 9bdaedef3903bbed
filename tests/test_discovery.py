"""Experts found from the model itself (issue #14): wherever a family keeps them on disk, ``load_model``, the
daemon, ``pack`` and ``inspect`` agree on where they are, through transformers' modules and conversion mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from expertflow.cli import main
from expertflow.config import StoreConfig
from expertflow.model.discovery import experts_layer_ids
from expertflow.model.loader import load_model, open_model_checkpoint
from expertflow.tiers.safetensors_index import open_checkpoint
from tests.family_fixtures import save_tiny_checkpoint
from tests.server_helpers import logits_through_daemon


def test_layer_ids_keep_a_single_stack_numbering_and_separate_two_stacks() -> None:
    one = experts_layer_ids(["model.layers.1.mlp.experts", "model.layers.3.mlp.experts"])
    assert one == {"model.layers.1.mlp.experts": 1, "model.layers.3.mlp.experts": 3}
    two = experts_layer_ids(
        [
            "model.decoder.layers.0.experts",
            "model.decoder.layers.1.experts",
            "model.encoder.language_model.layers.0.experts",
            "model.encoder.language_model.layers.1.experts",
        ]
    )
    assert sorted(two.values()) == [0, 1, 2, 3]
    assert two["model.decoder.layers.1.experts"] == 1


@pytest.fixture(scope="module")
def granite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Granite-MoE keeps each layer's experts fused as ``block_sparse_moe.input_linear/output_linear``: no
    ``experts`` in the name, so only transformers' renaming says what they are."""
    return save_tiny_checkpoint("granitemoe", tmp_path_factory.mktemp("granite") / "granitemoe")


def _reference(root: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.GraniteMoeForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _slot(root: Path) -> int:
    return -(-open_model_checkpoint(root).max_expert_nbytes // 4096) * 4096


IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


def test_experts_the_name_pattern_misses_are_found_from_the_model(granite: Path) -> None:
    assert not open_checkpoint(granite).experts  # the model-free naming sees no experts here
    layout = open_model_checkpoint(granite)
    assert layout.experts_per_layer() == {0: 8, 1: 8}
    roles = {t.role for t in layout.spec(next(iter(layout.experts))).tensors}
    assert roles == {"input_linear.weight", "output_linear.weight"}


def test_a_daemon_serves_experts_found_from_the_model(granite: Path) -> None:
    want = _reference(granite, IDS)
    slot = _slot(granite)
    got, stats = logits_through_daemon(granite, IDS, daemon_bytes=16 * slot, host_bytes=4 * slot, passes=2)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert stats.reads.get("remote", 0) > 0 and not stats.source_errors


def test_pack_and_inspect_see_experts_found_from_the_model(
    granite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(granite), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["has_experts"] and desc["num_experts"] == 16
    pack = tmp_path / "pack"
    assert main(["pack", str(granite), str(pack), "--no-progress"]) == 0
    config = StoreConfig(host_bytes=4 * _slot(granite), predictor="none")
    with load_model(pack, config=config) as model, torch.no_grad():
        got = model(input_ids=IDS).logits
    assert torch.allclose(got, _reference(granite, IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("index", ["²", "٣", "1234567890"])
def test_an_index_that_is_not_a_bounded_ascii_number_is_no_expert_id(
    index: str, tmp_path: Path, checkpoints: object
) -> None:
    """``"²".isdigit()`` is true but ``int("²")`` raises; Arabic-Indic digits parse but are not what a checkpoint
    writes; ten digits is past the bound. A tensor named with one of them in the expert's place is not taken
    for an expert: the checkpoint is read (the name is reported as unused) or refused with a typed error,
    never a ValueError."""
    from safetensors.torch import load_file, save_file

    from expertflow.errors import CheckpointError

    root = tmp_path / "m"
    root.mkdir()
    source = checkpoints.get("mixtral", sharded=False)  # type: ignore[attr-defined]
    for f in source.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(root / "model.safetensors"))
    name = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    tensors[name.format(index)] = tensors[name.format(0)].clone()
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    try:
        layout = open_model_checkpoint(root)
    except CheckpointError:
        return
    assert all(key.expert < 8 for key in layout.experts)
    assert experts_layer_ids([f"model.layers.{index}.mlp.experts"]) == {
        f"model.layers.{index}.mlp.experts": 0
    }
