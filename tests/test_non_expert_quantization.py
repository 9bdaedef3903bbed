"""Non-expert linears quantized in a pack (``pack --quantize ... --non-experts``): which weights, what the pack
holds, and logits equal to transformers' with those weights dequantized (issue #23, memory for experts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from expertflow.cli import main
from expertflow.config import StoreConfig
from expertflow.errors import CheckpointError
from expertflow.model.loader import load_model
from expertflow.model.quantize_pack import dequantized_state_dict, pack_quantized
from expertflow.model.quantized_linear import QuantizedLinear
from expertflow.quant.scheme import QuantScheme, dequantize
from expertflow.tiers.safetensors_index import PACK_MANIFEST_NAME, open_checkpoint
from tests.checkpoints import save_checkpoint

EXPERTS = QuantScheme(4, 32)
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])


def _reference(src: Path, pack: Path) -> torch.nn.Module:
    """transformers' model with the pack's experts and quantized non-expert weights dequantized into it."""
    config = transformers.AutoConfig.from_pretrained(src)
    model = getattr(transformers, config.architectures[0]).from_pretrained(src, dtype=torch.float32).eval()
    state = dequantized_state_dict(pack, model)
    layout = open_checkpoint(pack)
    described = layout.non_expert_quantization
    assert described is not None
    scheme = QuantScheme.from_json(described, "")
    tensors = {t.name: t for t, _ in layout.non_expert}
    from safetensors import safe_open

    with safe_open(next(iter(tensors.values())).file, framework="pt") as f:
        for name, (rows, cols) in described["weights"].items():
            parts = {s: f.get_tensor(f"{name}.{s}") for s in scheme.suffixes()}
            state[name] = dequantize(parts, scheme, rows, cols).float()
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    return model


@pytest.mark.parametrize(
    ("family", "scheme"),
    [
        ("mixtral", QuantScheme(8, 0)),
        ("qwen2_moe", QuantScheme(4, 32)),  # a shared expert (its linears quantized) and its gate (kept)
        ("gpt_oss", QuantScheme(8, 0)),  # attention projections with biases
        ("deepseek_v3", QuantScheme(4, 32)),  # low-rank attention, dense first layer
    ],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_quantized_non_expert_linears_give_transformers_logits_with_those_weights_dequantized(
    tmp_path: Path, family: str, scheme: QuantScheme
) -> None:
    src = save_checkpoint(family, tmp_path / "src")
    pack = pack_quantized(src, tmp_path / "q", EXPERTS, progress=False, non_experts=scheme)
    described = open_checkpoint(pack).non_expert_quantization
    assert described is not None and described["bits"] == scheme.bits
    names = set(described["weights"])
    assert any("attn" in n for n in names) and any("lm_head" in n for n in names)
    # Routers keep full precision: a router's error picks other experts (qwen2_moe's shared-expert gate is a
    # plain linear; the routed experts' routers are router modules).
    assert not any(n.endswith(("gate.weight", "router.weight")) for n in names)
    with torch.no_grad():
        want = _reference(src, pack)(input_ids=IDS).logits
        with load_model(pack, config=StoreConfig(predictor="none")) as model:
            quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
            got = model(input_ids=IDS).logits
    assert len(quantized) == len(names)
    # fp32 activations: only the kernels' rounding separates them.
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.fixture(scope="module")
def mixtral_packs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("nonexpert")
    src = save_checkpoint("mixtral", root / "src")
    keep = pack_quantized(src, root / "keep", EXPERTS, progress=False)
    int8 = pack_quantized(src, root / "int8", EXPERTS, progress=False, non_experts=QuantScheme(8, 0))
    return src, keep, int8


def test_quantized_non_experts_leave_more_of_the_budget_for_experts(mixtral_packs) -> None:
    from expertflow.model.loader import plan_model

    _src, keep, int8 = mixtral_packs
    kept = plan_model(keep, StoreConfig()).reserve_bytes
    smaller = plan_model(int8, StoreConfig()).reserve_bytes
    assert smaller < kept
    assert (int8 / "model.safetensors").stat().st_size < (keep / "model.safetensors").stat().st_size


def test_a_manifest_whose_quantized_weight_disagrees_with_its_tensors_is_refused(
    mixtral_packs, tmp_path: Path
) -> None:
    import shutil

    _src, _keep, int8 = mixtral_packs
    bad = tmp_path / "bad"
    shutil.copytree(int8, bad)
    manifest = json.loads((bad / PACK_MANIFEST_NAME).read_text())
    name = next(iter(manifest["non_expert_quantization"]["weights"]))
    rows, cols = manifest["non_expert_quantization"]["weights"][name]
    manifest["non_expert_quantization"]["weights"][name] = [rows * 2, cols]
    (bad / PACK_MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        open_checkpoint(bad)


def test_the_cli_quantizes_non_experts_only_with_quantize(mixtral_packs, tmp_path: Path, capsys) -> None:
    src, _keep, _int8 = mixtral_packs
    assert (
        main(
            [
                "pack",
                "--no-progress",
                "--quantize",
                "int4",
                "--non-experts",
                "int8",
                str(src),
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert "int8 attention and output head" in capsys.readouterr().out
    assert open_checkpoint(tmp_path / "p").non_expert_quantization is not None
    assert main(["pack", "--no-progress", "--non-experts", "int8", str(src), str(tmp_path / "q")]) != 0


@pytest.mark.parametrize("scheme", [QuantScheme(8, 0), QuantScheme(4, 32)], ids=lambda s: s.name)
def test_a_weight_quantized_a_block_of_rows_at_a_time_has_the_bytes_of_one_quantized_whole(
    tmp_path: Path, scheme: QuantScheme, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The packer never holds a whole non-expert weight (an output head can be a GB): blocks of 64 rows here."""
    from safetensors import safe_open

    import expertflow.tiers.pack as pack_module
    from expertflow.quant.scheme import quantize

    src = save_checkpoint("mixtral", tmp_path / "src", shard_size=None)
    monkeypatch.setattr(pack_module, "COPY_CHUNK", 1)  # the smallest block: 64 rows
    pack = pack_quantized(src, tmp_path / "q", EXPERTS, progress=False, non_experts=scheme)
    weights = open_checkpoint(pack).non_expert_quantization["weights"]
    assert any(rows > 64 for rows, _ in weights.values())
    with (
        safe_open(src / "model.safetensors", framework="pt") as s,
        safe_open(pack / "model.safetensors", framework="pt") as p,
    ):
        for name in weights:
            whole = quantize(s.get_tensor(name), scheme, s.get_tensor(name).dtype)
            for suffix, tensor in whole.items():
                assert torch.equal(p.get_tensor(f"{name}.{suffix}"), tensor), f"{name}.{suffix}"


def test_non_expert_weights_are_loaded_into_memory_of_their_own_not_views_of_the_file(mixtral_packs) -> None:
    """safetensors hands out views of its file mapping, 8-byte aligned: torch's bf16 int8 kernel crashed on
    one (a 9 GB model, int8 output head), and page-cache weights are what a memory limit evicts first."""
    _src, _keep, int8 = mixtral_packs
    with load_model(int8, config=StoreConfig(predictor="none")) as model:
        tensors = [
            (n, t)
            for n, t in (*model.named_parameters(), *model.named_buffers())
            if ".experts." not in n and t.numel()
        ]
        assert any(isinstance(m, QuantizedLinear) for m in model.modules())
        misaligned = [n for n, t in tensors if t.data_ptr() % 64]
        assert not misaligned
