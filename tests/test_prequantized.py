"""Pre-quantized Hugging Face checkpoints (GPTQ, AWQ GEMM, compressed-tensors), opened as they are: experts stay
quantized from disk to slot to kernel, checked against transformers running the values the format defines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from expertflow.cli import main
from expertflow.config import StoreConfig
from expertflow.errors import CheckpointError, UnsupportedModelError
from expertflow.model.loader import load_model, open_model_checkpoint
from expertflow.model.quantize_pack import pack_quantized
from expertflow.quant.scheme import QuantScheme
from tests.checkpoints import save_checkpoint
from tests.quant_fixtures import quantize_checkpoint
from tests.server_helpers import logits_through_daemon

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
VARIANTS = {
    "gptq-asym": dict(method="gptq", sym=False),
    "gptq-sym-act-order": dict(method="gptq", sym=True, act_order=True),
    "awq-gemm": dict(method="awq"),
    "compressed-tensors-w4a16": dict(method="compressed-tensors", sym=True),
    "compressed-tensors-asym": dict(method="compressed-tensors", sym=False),
    "compressed-tensors-w8a16": dict(method="compressed-tensors", bits=8, group_size=0, sym=True),
    "gptq-8bit-per-channel": dict(method="gptq", bits=8, group_size=-1, sym=True),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint("mixtral", tmp_path_factory.mktemp("src") / "mixtral", shard_size=None)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request: pytest.FixtureRequest, source: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(request.param)
    quantize_checkpoint(source, root / "q", root / "reference", **VARIANTS[request.param])
    return request.param, root / "q", root / "reference"


@pytest.fixture(scope="module")
def gptq_pair(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A GPTQ act-order checkpoint and its dense reference."""
    root = tmp_path_factory.mktemp("gptq")
    quantize_checkpoint(source, root / "q", root / "reference", "gptq", act_order=True)
    return root / "q", root / "reference"


def _reference_logits(reference: Path) -> torch.Tensor:
    model = transformers.MixtralForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _slot(root: Path) -> int:
    return 16384  # a few KiB per converted expert of the fixture; 12 slots < 24 experts


def test_a_prequantized_checkpoint_gives_the_logits_of_the_values_its_format_defines(checkpoint) -> None:
    name, root, reference = checkpoint
    want = _reference_logits(reference)
    layout = open_model_checkpoint(root)
    roles = {t.role for t in layout.spec(next(iter(layout.experts))).tensors}
    primary = "weight_packed" if name.startswith("compressed") else "qweight"
    assert f"w1.{primary}" in roles  # the checkpoint's own tensors are the experts' stored bytes
    config = StoreConfig(host_bytes=12 * _slot(root), predictor="none")
    with load_model(root, config=config) as model, torch.no_grad():
        got = model(input_ids=IDS).logits
        stats = model.expert_stats()
        assert model.expert_store.slot_nbytes >= layout.max_expert_nbytes
    assert (
        stats.evictions > 0 and stats.fill_transforms > 0
    )  # converted at every fill, re-read after eviction
    # The kernel's (scale, zero) form rounds (8 - z) * s once: measured <= 2e-6 of the logit scale.
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_inspect_says_experts_stay_quantized_and_other_layers_are_dequantized(
    checkpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    name, root, _ = checkpoint
    assert main(["inspect", str(root), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    pre = desc["prequantized"]
    variant = VARIANTS[name]
    assert pre["method"] == variant["method"] and pre["bits"] == variant.get("bits", 4)
    layers = json.loads((root / "config.json").read_text())["num_hidden_layers"]
    assert pre["non_expert_quantized_layers"] == 4 * layers  # q, k, v, o of every layer
    assert main(["inspect", str(root)]) == 0
    assert "dequantized once at load" in capsys.readouterr().out


def test_a_pack_of_a_gptq_checkpoint_keeps_its_bytes_and_runs_the_same(gptq_pair, tmp_path: Path) -> None:
    root, reference = gptq_pair
    assert main(["pack", str(root), str(tmp_path / "pack"), "--no-progress"]) == 0
    with load_model(tmp_path / "pack", config=StoreConfig(predictor="none")) as model, torch.no_grad():
        got = model(input_ids=IDS).logits
    want = _reference_logits(reference)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(CheckpointError, match=r"already quantized \(gptq\)"):
        pack_quantized(root, tmp_path / "again", QuantScheme(4, 32), progress=False)


def test_a_daemon_serves_the_checkpoints_quantized_bytes(gptq_pair) -> None:
    root, reference = gptq_pair
    slot = _slot(root)
    got, stats = logits_through_daemon(root, IDS, daemon_bytes=64 * slot, host_bytes=12 * slot, passes=2)
    assert stats.reads.get("remote", 0) > 0 and not stats.source_errors
    want = _reference_logits(reference)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


# --- bad input: precise errors at open -----------------------------------------------------------------


def _copy_with(root: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    dst.mkdir()
    tensors = load_file(str(root / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((root / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def gptq(gptq_pair) -> Path:
    return gptq_pair[0]


EXPERT = "model.layers.1.block_sparse_moe.experts.5.w2"


def test_a_g_idx_that_is_not_a_permutation_of_the_groups_is_refused_at_open(
    gptq: Path, tmp_path: Path
) -> None:
    def edit(t: dict) -> None:
        t[f"{EXPERT}.g_idx"] = torch.zeros_like(t[f"{EXPERT}.g_idx"])

    bad = _copy_with(gptq, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match="not a permutation of the groups") as info:
        load_model(bad, config=StoreConfig(predictor="none"))
    assert info.value.tensor == f"{EXPERT}.g_idx" and info.value.file.endswith("model.safetensors")


def test_scales_that_are_nan_are_refused_at_open(gptq: Path, tmp_path: Path) -> None:
    def edit(t: dict) -> None:
        t[f"{EXPERT}.scales"][0, 0] = float("nan")

    bad = _copy_with(gptq, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match="NaN or infinite") as info:
        load_model(bad, config=StoreConfig(predictor="none"))
    assert info.value.tensor == f"{EXPERT}.scales"


def test_a_qweight_whose_shape_disagrees_with_bits_and_group_is_refused_at_open(
    gptq: Path, tmp_path: Path
) -> None:
    bad = _copy_with(
        gptq, tmp_path / "bad", edit_config=lambda c: c["quantization_config"].update(group_size=64)
    )
    with pytest.raises(CheckpointError, match="disagree with 4 bits and group size 64") as info:
        load_model(bad, config=StoreConfig(predictor="none"))
    assert info.value.tensor and info.value.file


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "'fp8'"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ 3-bit"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv'"),
        ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "format 'float-quantized'"),
    ],
)
def test_an_unsupported_method_or_variant_is_refused_naming_it(
    gptq: Path, tmp_path: Path, config: dict, named: str
) -> None:
    bad = _copy_with(gptq, tmp_path / "bad", edit_config=lambda c: c.update(quantization_config=config))
    with pytest.raises(UnsupportedModelError, match="is not supported") as info:
        load_model(bad, config=StoreConfig(predictor="none"))
    assert named in str(info.value) and info.value.file.endswith("config.json")
