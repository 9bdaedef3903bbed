"""Quantized experts (issue #11): int4 / int8 packs, kept quantized from disk to kernel, checked against
the transformers model whose experts hold the dequantized values."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from expertflow.cli import main
from expertflow.config import StoreConfig
from expertflow.errors import CheckpointError, ConfigError
from expertflow.model.loader import load_model
from expertflow.model.quantize_pack import dequantized_state_dict, pack_quantized
from expertflow.quant.kernels import qlinear, qlinear_dequantized
from expertflow.quant.scheme import QuantScheme, dequantize, pack_int4, quantize, unpack_int4
from expertflow.tiers.safetensors_index import PACK_MANIFEST_NAME, open_checkpoint
from tests.checkpoints import save_checkpoint
from tests.server_helpers import logits_through_daemon

INT4 = QuantScheme(4, 32)
INT8 = QuantScheme(8, 0)
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])


# --- the kernels and the layout ----------------------------------------------------------------------


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 192])
def test_the_int4_layout_unpacks_to_the_codes_torch_packed(rows: int) -> None:
    codes = torch.randint(0, 16, (rows, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(unpack_int4(pack_int4(codes), rows, 64), codes)


@pytest.mark.parametrize("scheme", [INT4, QuantScheme(4, 128), QuantScheme(4, 32, "hqq"), INT8], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(96, 256), (40, 72)], ids=["aligned", "padded"])
def test_the_kernel_computes_with_exactly_the_dequantized_weight(
    scheme: QuantScheme, dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g)
    parts = quantize(w, scheme, dtype)
    deq = dequantize(parts, scheme, *shape)
    assert deq.shape == w.shape
    x = torch.randn(5, shape[1], generator=g).to(dtype)
    y = qlinear(x, parts, scheme, *shape)
    ref = x.float() @ deq.T
    # The kernel's only error is its accumulation/output rounding in ``dtype``.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.shape == (5, shape[0]) and y.dtype == dtype
    assert (y.float() - ref).abs().max() <= tol * ref.abs().max()
    # And the weight error is what the bits allow: int8 ~1/254 of the row range, int4 ~1/30 of a group's.
    bound = 0.01 if scheme.bits == 8 else 0.2
    assert (deq - w).pow(2).mean().sqrt() < bound


@pytest.mark.parametrize("scheme", [INT4, QuantScheme(4, 32, act_order=True), INT8], ids=str)
def test_the_device_path_dequantizes_where_the_slot_is_and_matches_the_cpu_kernel(
    scheme: QuantScheme,
) -> None:
    """The GPU path (dequantize on the device, dense product) is device-agnostic: on CPU it runs the same code
    and gives the CPU kernel's output, act-order permutation included."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 72, generator=g)
    parts = quantize(w, scheme, torch.float32)
    if scheme.act_order:
        parts["perm"] = torch.randperm(72, generator=g).to(torch.int32)  # input channel of each stored column
    x = torch.randn(3, 72, generator=g)
    want = qlinear(x, parts, scheme, 40, 72)
    got = qlinear_dequantized(x, parts, scheme, 40, 72)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", [INT4, INT8], ids=str)
def test_quantized_experts_on_a_gpu_are_computed_there(scheme: QuantScheme) -> None:  # pragma: no cover
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 256, generator=g)
    parts = quantize(w, scheme, torch.bfloat16)
    x = torch.randn(4, 256, generator=g).to(torch.bfloat16)
    want = qlinear(x, parts, scheme, 96, 256).float()
    on_gpu = {k: v.cuda() for k, v in parts.items()}
    got = qlinear(x.cuda(), on_gpu, scheme, 96, 256)
    assert got.device.type == "cuda"
    assert (got.float().cpu() - want).abs().max() <= 2e-2 * want.abs().max()


def test_hqq_refinement_lowers_the_weight_error_of_round_to_nearest() -> None:
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    errors = {}
    for method in ("rtn", "hqq"):
        scheme = QuantScheme(4, 64, method)
        errors[method] = (dequantize(quantize(w, scheme, torch.float32), scheme, 64, 512) - w).pow(2).mean()
    assert errors["hqq"] < 0.97 * errors["rtn"]


def test_schemes_the_kernels_cannot_run_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="group size 16"):
        QuantScheme(4, 16)
    with pytest.raises(ConfigError, match="per output channel"):
        QuantScheme(8, 128)
    with pytest.raises(ConfigError, match="3-bit"):
        QuantScheme(3, 128)


# --- packs of real families ---------------------------------------------------------------------


def _reference(src: Path, pack: Path) -> torch.nn.Module:
    """The family's transformers model with its experts replaced by the pack's dequantized values."""
    config = transformers.AutoConfig.from_pretrained(src)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(src, dtype=torch.float32).eval()
    result = model.load_state_dict(dequantized_state_dict(pack, model), strict=False)
    assert not result.unexpected_keys
    return model


def _slot(pack: Path) -> int:
    return math.ceil(open_checkpoint(pack).max_expert_nbytes / 4096) * 4096


FAMILY_SCHEMES = [
    ("mixtral", INT4),
    ("mixtral", INT8),
    ("qwen2_moe", INT4),  # shared expert beside the routed ones
    ("olmoe", QuantScheme(4, 32, "hqq")),
    ("deepseek_v3", INT4),
    ("phimoe", INT8),
    ("gpt_oss", INT4),  # transposed weights, biases, clamped SwiGLU
    ("qwen3_vl_moe", INT4),  # a VLM: transposed fused experts on disk
]


@pytest.mark.parametrize(
    ("family", "scheme"), FAMILY_SCHEMES, ids=[f"{f}-{s.name}" for f, s in FAMILY_SCHEMES]
)
def test_a_quantized_pack_gives_the_logits_of_transformers_with_the_dequantized_experts(
    tmp_path: Path, family: str, scheme: QuantScheme
) -> None:
    src = save_checkpoint(family, tmp_path / "src")
    pack = pack_quantized(src, tmp_path / "q", scheme, progress=False)
    layout = open_checkpoint(pack)
    assert layout.quantization == scheme.to_json()
    assert layout.expert_bytes < 0.4 * open_checkpoint(src).expert_bytes or scheme.bits == 8
    with torch.no_grad():
        want = _reference(src, pack)(input_ids=IDS).logits
        # Room for two layers' worth of top-k only: experts are evicted and read back (quantized) mid-forward.
        top_k = 2
        with load_model(
            pack, config=StoreConfig(host_bytes=2 * top_k * _slot(pack), predictor="none")
        ) as model:
            got = model(input_ids=IDS).logits
            stats = model.expert_stats()
    assert stats.evictions > 0
    # fp32 activations: the kernels' own rounding, measured at <= 2e-6 of the logit scale on these families.
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.fixture(scope="module")
def mixtral_int4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixtral-int4")
    src = save_checkpoint("mixtral", root / "src")
    return src, pack_quantized(src, root / "q", INT4, progress=False)


def test_the_manifest_records_the_scheme_and_checksums_cover_the_quantized_bytes(
    mixtral_int4: tuple[Path, Path], tmp_path: Path
) -> None:
    _, pack = mixtral_int4
    manifest = json.loads((pack / PACK_MANIFEST_NAME).read_text())
    scheme = manifest["quantization"]
    assert {k: scheme[k] for k in ("bits", "group_size", "method")} == {
        "bits": 4,
        "group_size": 32,
        "method": "rtn",
    }
    assert scheme["layout"] == "torch-cpu-int4pack" and "(scale, zero)" in scheme["qparams"]
    entry = manifest["experts"][0]
    roles = {t["role"]: t for t in entry["tensors"]}
    assert roles["gate_up_proj.qweight"]["dtype"] == "U8" and roles["gate_up_proj.qparams"]["dtype"] == "F32"
    assert all(e["checksum"] for e in manifest["experts"])
    # A flipped bit in a quantized weight is caught by the checksum when the expert is read.
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in pack.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "experts.bin").read_bytes())
    for e in manifest["experts"]:  # one bit of every expert's quantized weight
        data[e["offset"] + roles["gate_up_proj.qweight"]["offset"]] ^= 0x10
    (copy / "experts.bin").write_bytes(bytes(data))
    config = StoreConfig(host_bytes=8 * _slot(copy), predictor="none")
    with load_model(copy, config=config) as model, pytest.raises(Exception, match="checksum"):
        model(input_ids=IDS)


def _edited_copy(pack: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in pack.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((dst / PACK_MANIFEST_NAME).read_text())
    edit(manifest)
    (dst / PACK_MANIFEST_NAME).write_text(json.dumps(manifest))
    return dst


def test_a_manifest_whose_scheme_does_not_match_its_bytes_is_refused_naming_the_tensor(
    mixtral_int4: tuple[Path, Path], tmp_path: Path
) -> None:
    _, pack = mixtral_int4
    wrong_group = _edited_copy(pack, tmp_path / "g", lambda m: m["quantization"].update(group_size=64))
    with pytest.raises(CheckpointError, match=r"_proj\.q.* int4-g64") as info:
        open_checkpoint(wrong_group)
    assert info.value.file.endswith(PACK_MANIFEST_NAME) and "experts" in info.value.tensor
    wrong_bits = _edited_copy(pack, tmp_path / "b", lambda m: m["quantization"].update(bits=8, group_size=0))
    with pytest.raises(CheckpointError, match=r"int8 .*does not match its bytes"):
        open_checkpoint(wrong_bits)


def test_a_qweight_whose_shape_disagrees_with_its_bits_and_group_is_refused(
    mixtral_int4: tuple[Path, Path], tmp_path: Path
) -> None:
    _, pack = mixtral_int4

    def odd_shape(m: dict) -> None:
        for e in m["experts"]:
            for t in e["tensors"]:
                if t["role"] == "down_proj.qweight":
                    rows, cols = t["shape"]
                    t["shape"] = [rows * 2, cols // 2]  # same bytes, a shape int4 never stores

    bad = _edited_copy(pack, tmp_path / "s", odd_shape)
    with pytest.raises(CheckpointError, match="down_proj") as info:
        open_checkpoint(bad)
    assert "down_proj" in (info.value.tensor or "")


def test_scales_that_are_nan_or_infinite_are_refused_at_open(
    mixtral_int4: tuple[Path, Path], tmp_path: Path
) -> None:
    _, pack = mixtral_int4
    copy = _edited_copy(pack, tmp_path / "nan", lambda m: None)
    manifest = json.loads((copy / PACK_MANIFEST_NAME).read_text())
    entry = manifest["experts"][-1]
    qparams = next(t for t in entry["tensors"] if t["role"] == "down_proj.qparams")
    data = bytearray((copy / "experts.bin").read_bytes())
    at = entry["offset"] + qparams["offset"]
    data[at : at + 4] = torch.tensor([float("nan")], dtype=torch.float32).view(torch.uint8).numpy().tobytes()
    (copy / "experts.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="NaN or infinite") as info:
        load_model(copy, config=StoreConfig(predictor="none"))
    assert info.value.file.endswith("experts.bin") and "down_proj" in info.value.tensor
    assert f"({entry['layer']}, {entry['expert']})" in str(info.value) or "expert" in str(info.value)


def test_inspect_shows_bits_group_size_and_bytes_per_expert(
    mixtral_int4: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, pack = mixtral_int4
    assert main(["inspect", str(pack), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    q = desc["quantization"]
    assert (q["bits"], q["group_size"], q["layout"]) == (4, 32, "torch-cpu-int4pack")
    assert q["bytes_per_expert"] == open_checkpoint(pack).max_expert_nbytes
    assert main(["inspect", str(pack)]) == 0
    assert "int4-g32: 4-bit weights, groups of 32" in capsys.readouterr().out
    assert main(["inspect", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] is None


def test_the_cli_packs_quantized_and_refuses_options_without_quantize(tmp_path: Path) -> None:
    src = save_checkpoint("olmoe", tmp_path / "src")
    assert main(["pack", str(src), str(tmp_path / "q"), "--quantize", "int8", "--no-progress"]) == 0
    assert open_checkpoint(tmp_path / "q").quantization == {"bits": 8, "group_size": 0, "method": "rtn"}
    assert main(["pack", str(src), str(tmp_path / "p"), "--group-size", "64"]) != 0
    assert not (tmp_path / "p").exists()


def test_a_daemon_serves_quantized_experts_with_their_checksums(mixtral_int4: tuple[Path, Path]) -> None:
    src, pack = mixtral_int4
    slot = _slot(pack)
    with torch.no_grad():
        want = _reference(src, pack)(input_ids=IDS).logits
    got, stats = logits_through_daemon(pack, IDS, daemon_bytes=64 * slot, host_bytes=4 * slot)
    assert stats.reads.get("remote", 0) > 0 and not stats.source_errors
    assert stats.bytes_read.get("remote", 0) % open_checkpoint(pack).max_expert_nbytes == 0
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_quantized_pack_is_not_quantized_again(mixtral_int4: tuple[Path, Path], tmp_path: Path) -> None:
    _, pack = mixtral_int4
    with pytest.raises(CheckpointError, match="already a quantized pack"):
        pack_quantized(pack, tmp_path / "again", INT4, progress=False)


SINGLE_ROUTE = [
    ("mixtral", INT4),
    ("mixtral", INT8),
    ("qwen2_moe", INT4),
    ("deepseek_v3", INT4),
    ("qwen3_vl_moe", INT4),
]


@pytest.mark.parametrize(("family", "scheme"), SINGLE_ROUTE, ids=[f"{f}-{s.name}" for f, s in SINGLE_ROUTE])
def test_a_decode_step_computes_each_expert_directly_with_the_bits_of_the_grouped_forward(
    tmp_path: Path, family: str, scheme: QuantScheme
) -> None:
    """One row per expert (every decode step) skips the family's grouping; the step's logits are bitwise those
    of the grouped forward, in the model's own dtype."""
    src = save_checkpoint(family, tmp_path / "src")
    pack = pack_quantized(src, tmp_path / "q", scheme, progress=False)
    with load_model(pack, config=StoreConfig(predictor="none")) as model:
        layers = model.expert_layers.values()
        assert all(layer._single_route for layer in layers)
        with torch.no_grad():
            prefill = model(input_ids=IDS, use_cache=True)
            step = IDS[:, -1:]
            cache = prefill.past_key_values
            direct = model(input_ids=step, past_key_values=copy.deepcopy(cache)).logits
            for layer in layers:
                layer._single_route = False
            grouped = model(input_ids=step, past_key_values=cache).logits
    assert torch.equal(direct, grouped)


def test_experts_with_biases_keep_the_grouped_forward(tmp_path: Path) -> None:
    src = save_checkpoint("gpt_oss", tmp_path / "src")
    pack = pack_quantized(src, tmp_path / "q", INT4, progress=False)
    with load_model(pack, config=StoreConfig(predictor="none")) as model:
        assert not any(layer._single_route for layer in model.expert_layers.values())


def test_a_packs_routers_compute_in_float32_and_a_lossless_load_keeps_the_checkpoints(tmp_path: Path) -> None:
    """bf16 Mixtral: loaded as it is, its routers are the checkpoint's (bf16, transformers' own product); from an
    int4 pack (lossy by choice) each router holds the same values in float32 and computes its logits from the
    bf16 hidden states in float32, exactly F.linear in float32."""
    from tests.checkpoints import build_model

    model = build_model("mixtral").to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp_path / "bf16")
    del model
    pack = pack_quantized(tmp_path / "bf16", tmp_path / "q", QuantScheme(4, 32), progress=False)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with load_model(tmp_path / "bf16", config=StoreConfig(predictor="none")) as lossless:
        routers = [layer.mlp.gate for layer in lossless.model.layers]
        assert all(r.weight.dtype == torch.bfloat16 and not r._forward_pre_hooks for r in routers)
        stored = [r.weight.detach().clone() for r in routers]
    with load_model(pack, config=StoreConfig(predictor="none")) as packed, torch.no_grad():
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        router = packed.model.layers[0].mlp.gate
        assert all(layer.mlp.gate.weight.dtype == torch.float32 for layer in packed.model.layers)
        assert torch.equal(router.weight, stored[0].float())
        router.register_forward_hook(lambda m, args, out: seen.append((args[0], out[0])))
        packed(input_ids=ids)
    (hidden, logits), *_ = seen
    assert hidden.dtype == torch.float32 and logits.dtype == torch.float32
    assert torch.equal(logits, torch.nn.functional.linear(hidden, stored[0].float()))
