"""Every MoE family the installed transformers ships, found by itself: each family whose modeling file uses
the experts seam gets a tiny seeded checkpoint (``tests/family_fixtures.py``), and ExpertFlow must load it
lossless with experts evicted and read again. Nothing here names the families that pass: a new transformers
release adds its new families to this sweep without an edit.

Families that do not load yet are listed in ``NOT_YET`` with the cause the sweep shows (issue #14). Each of
them is a strict expected failure: the day one starts to pass, this test fails until it leaves the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from expertflow.config import StoreConfig
from expertflow.core import routed_top_k
from expertflow.model.loader import load_model, open_model_checkpoint
from expertflow.tiers.safetensors_index import open_checkpoint
from tests.family_fixtures import discover_expert_families, model_class_name, save_tiny_checkpoint

pytestmark = pytest.mark.timeout(120)

_FIXTURE = "the tiny fixture does not run in transformers itself"

#: family -> why it does not load lossless yet (the stage and error the sweep shows).
NOT_YET: dict[str, str] = {
    "ernie4_5_vl_moe": "text and vision experts of two sizes in one layer",
    "inkling2": "expert conversion is an interleave, not a view of the stored bytes",
    "inkling2_loop": "expert conversion is a dequantize step, not a view of the stored bytes",
    "dots3_note": "the vision tower's experts are missing from the checkpoint the fixture saves",
    "qwen3_omni_moe": _FIXTURE + " (its top-level class has no forward; the thinker is not picked)",
    "inkling_mm_model": _FIXTURE + " (it needs scipy)",
}

FAMILIES = discover_expert_families()


def test_discovery_finds_the_families_of_the_installed_transformers() -> None:
    assert len(FAMILIES) >= 60
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "gpt_oss"} <= set(FAMILIES)
    assert set(NOT_YET) <= set(FAMILIES), "a family in NOT_YET is no longer shipped: remove it"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_loads_lossless_with_experts_evicted_and_read_again(
    family: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if family in NOT_YET:
        request.applymarker(pytest.mark.xfail(strict=True, reason=NOT_YET[family]))
    root = save_tiny_checkpoint(family, tmp_path / family)
    class_name, _ = model_class_name(family)  # the class the fixture was built with
    reference = getattr(transformers, class_name).from_pretrained(root, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.manual_seed(
            0
        )  # a family whose forward samples (block diffusion draws its noise) sees the same draws
        want = _output(reference(input_ids=ids))
    del reference
    layout = open_model_checkpoint(root)
    by_pattern = open_checkpoint(root)
    if by_pattern.experts:  # where the model-free naming finds experts, it must find the same ones
        assert by_pattern.fingerprint() == layout.fingerprint()
    top_k = routed_top_k(transformers.AutoConfig.from_pretrained(root)) or 2
    slot = -(-layout.max_expert_nbytes // 4096) * 4096
    config = StoreConfig(host_bytes=2 * top_k * slot, predictor="none")
    with load_model(root, config=config) as model, torch.no_grad():
        torch.manual_seed(0)
        got = _output(model(input_ids=ids))
        stats = model.expert_stats()
    scale = max(want.abs().max().item(), 1.0)
    assert (got - want).abs().max().item() <= 1e-5 * scale
    if stats.device_misses > stats.num_slots:
        assert stats.evictions > 0  # more experts than slots: some were evicted and read again


def _output(out: object) -> torch.Tensor:
    """Logits, or the last hidden state of a family whose head is not a language model head."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state  # type: ignore[attr-defined]


def test_the_readme_states_the_sweep_as_it_is() -> None:
    """The README's family counts are checked against this sweep: fixing a family means updating both."""
    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    version = ".".join(transformers.__version__.split(".")[:2])
    assert f"({len(FAMILIES)} in transformers {version})" in text
    assert f"{len(FAMILIES) - len(NOT_YET)} families load with logits equal" in text
    assert f"the {len(NOT_YET)} others are in its `NOT_YET` table" in text
