"""Every MoE family the installed transformers ships, found by itself: each family whose modeling file uses
the experts seam gets a tiny seeded checkpoint (``tests/family_fixtures.py``), and ExpertFlow must load it
lossless with experts evicted and read again, or refuse it at load with a typed error (the family check).
Only wrong numbers fail on an unknown transformers release: its new families join this sweep without an
edit. With the pinned transformers (``constraints.txt``), every family the sweep's record
(``docs/families.json``) lists as verified must load lossless, and docs/formats.md must state that record.

Families ExpertFlow declares it cannot run (``expertflow.model.support.UNSUPPORTED``) must be refused with
their reason, and must still fail without their entry. A family that fails for another reason would go in
``NOT_YET`` with its cause, as a strict expected failure (none does today).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from expertflow.cli import main
from expertflow.config import StoreConfig
from expertflow.core import routed_top_k
from expertflow.errors import CheckpointError, UnsupportedModelError
from expertflow.model import loader
from expertflow.model.loader import load_model, open_model_checkpoint
from expertflow.model.quantize_pack import dequantized_state_dict, pack_quantized
from expertflow.model.router_precision import find_router
from expertflow.model.support import UNSUPPORTED
from expertflow.quant.scheme import QuantScheme
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.safetensors_index import open_checkpoint
from tests.family_fixtures import (
    build_tiny_model,
    discover_expert_families,
    model_class_name,
    runnable_model_type,
    save_tiny_checkpoint,
)
from tests.sweep import FAMILIES_DOC, families_block, is_pinned_transformers, load_record

pytestmark = pytest.mark.timeout(120)

#: family -> why it does not load lossless yet, for a failure that is not a declared limitation (none today:
#: families ExpertFlow cannot run are in ``expertflow.model.support.UNSUPPORTED``, tested below).
NOT_YET: dict[str, str] = {}

FAMILIES = discover_expert_families()
RECORD = load_record()
RECORDED: dict[str, dict[str, str]] = RECORD["families"]


def test_discovery_finds_the_families_of_the_installed_transformers() -> None:
    assert len(FAMILIES) >= 60
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "gpt_oss"} <= set(FAMILIES)
    assert set(NOT_YET) <= set(FAMILIES), "a family in NOT_YET is no longer shipped: remove it"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in UNSUPPORTED])
def test_a_family_loads_lossless_with_experts_evicted_and_read_again(
    family: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if family in NOT_YET:
        request.applymarker(pytest.mark.xfail(strict=True, reason=NOT_YET[family]))
    runnable = runnable_model_type(family)  # an Omni family is run through its thinker
    root = save_tiny_checkpoint(runnable, tmp_path / family)
    class_name, _ = model_class_name(runnable)  # the class the fixture was built with
    reference = getattr(transformers, class_name).from_pretrained(root, dtype=torch.float32).eval()
    want = _forward(reference)
    del reference
    layout = open_model_checkpoint(root)
    try:
        got, stats = _offloaded(root, layout)
    except UnsupportedModelError as exc:
        _refusal_allowed(family, exc)
        return
    # What the model-free naming finds, the model finds alike, except a layer whose one on-disk list the model
    # splits over two modules of different sizes: the name pattern cannot know, and refuses the mixed sizes.
    try:
        by_pattern = open_checkpoint(root)
    except CheckpointError as exc:
        assert "has tensors" in str(exc)  # experts of two sizes in one on-disk list
    else:
        model_counts, pattern_counts = layout.experts_per_layer(), by_pattern.experts_per_layer()
        for key, spec in by_pattern.experts.items():
            if model_counts.get(key.layer) == pattern_counts[key.layer]:
                assert layout.spec(key) == spec
    scale = max(want.abs().max().item(), 1.0)
    assert (got - want).abs().max().item() <= 1e-5 * scale
    if stats.device_misses > stats.num_slots:
        assert stats.evictions > 0  # more experts than slots: some were evicted and read again


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in UNSUPPORTED])
def test_a_family_runs_int4_experts_like_transformers_with_the_dequantized_weights(
    family: str, tmp_path: Path
) -> None:
    """Every family also runs from an int4 pack (``pack --quantize``): its logits are those of its transformers
    model whose experts hold the dequantized values, with experts evicted and read again."""
    runnable = runnable_model_type(family)
    root = save_tiny_checkpoint(runnable, tmp_path / family)
    pack = pack_quantized(root, tmp_path / f"{family}-int4", QuantScheme(4, 32), progress=False)
    class_name, _ = model_class_name(runnable)
    reference = getattr(transformers, class_name).from_pretrained(root, dtype=torch.float32).eval()
    loaded = reference.load_state_dict(dequantized_state_dict(pack, reference), strict=False)
    assert not loaded.unexpected_keys
    want = _forward(reference)
    del reference
    try:
        got, _ = _offloaded(pack, open_checkpoint(pack))
    except UnsupportedModelError as exc:
        _refusal_allowed(family, exc)
        return
    scale = max(want.abs().max().item(), 1.0)
    assert (got - want).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in UNSUPPORTED])
def test_a_bf16_familys_int4_pack_routes_in_float32_closer_to_the_unrounded_model(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack is lossy by choice, and its routers run in float32 (as transformers itself keeps about half the
    families' routers): on a bf16 model, each router found is float32 at load, the family's own routing code
    runs on it, and the logits are at least as close to the float32 model with the dequantized experts as with
    the routers left in bf16."""
    runnable = runnable_model_type(family)
    model = build_tiny_model(runnable, seed=0).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp_path / "bf16")
    del model
    pack = pack_quantized(tmp_path / "bf16", tmp_path / "int4", QuantScheme(4, 32), progress=False)
    class_name, _ = model_class_name(runnable)
    reference = (
        getattr(transformers, class_name).from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    )
    reference.load_state_dict(dequantized_state_dict(pack, reference), strict=False)
    want = _forward(reference)
    del reference
    errors, dtypes = [], []
    for keep_bf16 in (False, True):
        if keep_bf16:
            monkeypatch.setattr(loader, "float32_routers", lambda *args: 0)
        try:
            with load_model(pack, config=StoreConfig(predictor="none")) as offloaded:
                got = _forward(offloaded)
                routers = [
                    router
                    for m in offloaded.expert_layers.values()
                    if (
                        router := find_router(
                            offloaded.get_submodule(m.module_path.rpartition(".")[0]), m.num_experts
                        )
                    )
                    is not None
                ]
        except UnsupportedModelError as exc:
            _refusal_allowed(family, exc)
            return
        assert torch.isfinite(got).all()
        dtypes.append(got.dtype)  # the family's own output dtype, whatever the routers' precision
        if not keep_bf16:
            assert all(r.weight.dtype == torch.float32 for r in routers)
        errors.append(((got.float() - want).norm() / want.norm()).item())
    assert errors[0] <= errors[1] * 1.05 + 1e-4, (
        f"{family}: float32 routers {errors[0]:.4g}, bf16 {errors[1]:.4g}"
    )


def _refusal_allowed(family: str, exc: UnsupportedModelError) -> None:
    """A family refused at load is not a wrong answer; with the pinned transformers, a family its record says is
    verified must not be refused (a regression)."""
    if is_pinned_transformers() and RECORDED.get(family, {}).get("status") == "verified":
        pytest.fail(f"{family} is verified in docs/families.json but refused at load: {exc}")
    pytest.skip(f"{family} is refused at load (transformers {transformers.__version__}): {exc}")


def test_every_unsupported_entry_is_a_shipped_family_refused_precisely_that_still_needs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A guard on the table (empty with transformers 5.24): each entry is refused with its reason and still
    fails without the entry, with a typed error before any number is computed; the day it would load, this
    test says the entry must go."""
    for family, reason in sorted(UNSUPPORTED.items()):
        assert family in FAMILIES, f"{family} is in UNSUPPORTED but no longer shipped: remove it"
        root = save_tiny_checkpoint(runnable_model_type(family), tmp_path / family)
        _assert_refused(root, family, reason, capsys)
        with monkeypatch.context() as patch:
            patch.setattr("expertflow.model.support.UNSUPPORTED", {})
            with pytest.raises((UnsupportedModelError, CheckpointError)):
                load_model(root, config=StoreConfig(predictor="none"))


def test_a_family_in_the_unsupported_table_is_refused_by_inspect_and_load_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table is empty with transformers 5.24; its mechanism is proved on a family that does load."""
    root = save_tiny_checkpoint("olmoe", tmp_path / "olmoe")
    reason = "its experts are kept where no checkpoint of it stores them"
    monkeypatch.setattr("expertflow.model.support.UNSUPPORTED", {"olmoe": reason})
    _assert_refused(root, "olmoe", reason, capsys)


def _assert_refused(root: Path, family: str, reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(root)]) == 2
    assert f"{family} is not supported: {reason}" in capsys.readouterr().err
    with pytest.raises(UnsupportedModelError, match="is not supported"):
        load_model(root, config=StoreConfig(predictor="none"))


def test_experts_stored_quantized_are_refused_naming_the_tensors(tmp_path: Path) -> None:
    """Inkling2-Loop's loader dequantizes NVFP4/MXFP8 experts when their scales are stored beside them; without
    scales the step is the identity and the family loads (the sweep). With them: a precise refusal."""
    from safetensors.torch import load_file, save_file

    root = save_tiny_checkpoint("inkling2_loop", tmp_path / "loop")
    (shard,) = root.glob("*.safetensors")
    tensors = load_file(str(shard))
    weight = next(n for n in tensors if n.endswith("layers.0.mlp.experts.w13_weight"))
    experts, rows, cols = tensors[weight].shape
    tensors[weight + "_scale"] = torch.full((experts, rows, cols // 32 or 1), 127.0)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"stored quantized .*w13_weight_scale"):
        load_model(root, config=StoreConfig(predictor="none"))


IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


def _forward(model: Any) -> torch.Tensor:
    """The model's output on :data:`IDS`; a family whose forward samples (block diffusion draws its noise)
    sees the same draws every time."""
    with torch.no_grad():
        torch.manual_seed(0)
        return _output(model(input_ids=IDS))


def _offloaded(path: Path, layout: ExpertLayout) -> tuple[torch.Tensor, Any]:
    """The output of ``path`` loaded with room for two layers' top-k experts, and the store's statistics."""
    top_k = routed_top_k(transformers.AutoConfig.from_pretrained(path)) or 2
    slot = -(-layout.max_expert_nbytes // 4096) * 4096
    with load_model(path, config=StoreConfig(host_bytes=2 * top_k * slot, predictor="none")) as model:
        return _forward(model), model.expert_stats()


def _output(out: object) -> torch.Tensor:
    """Logits, or the last hidden state of a family whose head is not a language model head."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state  # type: ignore[attr-defined]


def test_the_record_and_the_docs_state_the_pinned_sweep_as_it_is() -> None:
    """docs/families.json is the sweep of the pinned transformers (regenerated by ``python -m tests.sweep
    --write``), and the families paragraph of docs/formats.md is generated from it. With another transformers installed
    (``make test-latest``) the record describes the pins, not what is installed: there is nothing to compare."""
    if not is_pinned_transformers():
        pytest.skip(f"the record is of the pinned transformers; {transformers.__version__} is installed")
    assert RECORD["transformers"] == transformers.__version__
    assert sorted(RECORD["families"]) == sorted(FAMILIES)
    verified = {f for f, r in RECORDED.items() if r["status"] == "verified"}
    assert verified == set(FAMILIES) - set(NOT_YET) - set(UNSUPPORTED)
    assert families_block(RECORD) in FAMILIES_DOC.read_text()
