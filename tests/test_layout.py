"""The expert layout of every MoE family: which tensors are experts, where each expert's bytes are, and what
the rest of the checkpoint is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from expertflow.core import DTYPE_SIZES, ExpertKey
from expertflow.errors import CheckpointError
from expertflow.tiers.layout import TensorInfo, TensorKind, build_layout, role_rank
from expertflow.tiers.safetensors_index import open_checkpoint, scan_checkpoint
from tests.checkpoints import FAMILIES, classify_disk_name, expected_expert_counts

# The router tensors of each family's MoE block, relative to ``layers.N.``.
ROUTERS = {
    "mixtral": {"block_sparse_moe.gate.weight"},
    "phimoe": {"block_sparse_moe.gate.weight"},
    "qwen2_moe": {"mlp.gate.weight", "mlp.shared_expert_gate.weight"},
    "qwen3_moe": {"mlp.gate.weight"},
    "olmoe": {"mlp.gate.weight"},
    "deepseek_v2": {"mlp.gate.weight"},
    "deepseek_v3": {"mlp.gate.weight", "mlp.gate.e_score_correction_bias"},
    "gpt_oss": {"mlp.router.weight", "mlp.router.bias"},
    "qwen3_vl_moe": {"mlp.gate.weight"},
}
# Shared (always active) experts, relative to ``layers.N.``.
SHARED = {
    "qwen2_moe": "mlp.shared_expert.",
    "deepseek_v2": "mlp.shared_experts.",
    "deepseek_v3": "mlp.shared_experts.",
}
ROLES = {
    "mixtral": ["w1.weight", "w3.weight", "w2.weight"],
    "phimoe": ["w1.weight", "w3.weight", "w2.weight"],
    "gpt_oss": ["gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"],
    "qwen3_vl_moe": ["gate_up_proj", "down_proj"],
}
DEFAULT_ROLES = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
_LAYER = re.compile(r"layers\.(\d+)\.(.*)$")


def _split(name: str) -> tuple[int, str] | None:
    m = _LAYER.search(name)
    return (int(m[1]), m[2]) if m else None


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_experts_per_layer_match_the_config(checkpoints, family: str) -> None:
    layout = open_checkpoint(checkpoints.get(family))
    expected = expected_expert_counts(family)
    assert expected, "every fixture family is a MoE model"
    assert layout.experts_per_layer() == expected
    assert layout.moe_layers == tuple(sorted(expected))
    assert len(layout.experts) == sum(expected.values())
    assert layout.keys(next(iter(expected))) == [
        ExpertKey(next(iter(expected)), e) for e in range(expected[next(iter(expected))])
    ]


def test_every_checkpoint_tensor_is_exactly_one_expert_part_or_non_expert(checkpoints, family: str) -> None:
    root = checkpoints.get(family)
    tensors, _, _ = scan_checkpoint(root)
    layout = open_checkpoint(root)
    sources = {t.source for s in layout.experts.values() for t in s.tensors}
    non_expert = [t.name for t, _ in layout.non_expert]
    assert len(non_expert) == len(set(non_expert))
    assert sources.isdisjoint(non_expert)
    assert sources | set(non_expert) == {t.name for t in tensors}
    assert not any(".experts." in n for n in non_expert)


def test_every_tensor_is_classified_as_the_on_disk_naming_table_says(checkpoints, family: str) -> None:
    """Cross-check against the fixtures' independent table of what ``save_pretrained`` writes per family."""
    layout = open_checkpoint(checkpoints.get(family))
    kinds = {
        "shared": TensorKind.SHARED_EXPERT,
        "router": TensorKind.ROUTER,
        "dense_mlp": TensorKind.DENSE_MLP,
        "other": TensorKind.OTHER,
    }
    expert_sources = {t.source for s in layout.experts.values() for t in s.tensors}
    for name in expert_sources:
        kind, match = classify_disk_name(family, name)
        assert kind == "experts", name
        assert match is not None and int(match["layer"]) in layout.moe_layers
    for info, kind in layout.non_expert:
        assert kinds[classify_disk_name(family, info.name)[0]] is kind, info.name


def test_expert_tensors_are_in_canonical_gate_up_down_order(checkpoints, family: str) -> None:
    layout = open_checkpoint(checkpoints.get(family))
    for spec in layout.experts.values():
        assert [t.role for t in spec.tensors] == ROLES.get(family, DEFAULT_ROLES)
        assert list(spec.tensors) == sorted(spec.tensors, key=lambda t: role_rank(t.role))
        # Back to back, each aligned to its element size.
        pos = 0
        for t, off in spec.views():
            assert off % DTYPE_SIZES[t.dtype] == 0 and pos <= off < pos + DTYPE_SIZES[t.dtype]
            pos = off + t.nbytes
        assert spec.nbytes == pos


def test_dense_layers_are_not_reported_as_experts(checkpoints, family: str) -> None:
    layout = open_checkpoint(checkpoints.get(family))
    moe = set(layout.moe_layers)
    dense_layers = set()
    for info, kind in layout.non_expert:
        parts = _split(info.name)
        if parts and re.fullmatch(r"mlp\.(gate|up|down)_proj\.weight", parts[1]):
            assert kind is TensorKind.DENSE_MLP, info.name
            dense_layers.add(parts[0])
    assert dense_layers.isdisjoint(moe)
    if family.startswith("deepseek"):
        first_dense = int(layout.config["first_k_dense_replace"])
        assert first_dense >= 1, "the DeepSeek fixtures must have dense first layers to test this"
        assert dense_layers == set(range(first_dense))
        assert min(moe) == first_dense


def test_routers_are_non_expert_router_tensors(checkpoints, family: str) -> None:
    layout = open_checkpoint(checkpoints.get(family))
    routers: dict[int, set[str]] = {}
    for info, kind in layout.non_expert:
        if kind is TensorKind.ROUTER:
            parts = _split(info.name)
            assert parts is not None, info.name
            routers.setdefault(parts[0], set()).add(parts[1])
    assert routers == {layer: ROUTERS[family] for layer in layout.moe_layers}


def test_shared_experts_are_non_expert_shared_tensors(checkpoints, family: str) -> None:
    layout = open_checkpoint(checkpoints.get(family))
    shared: dict[int, set[str]] = {}
    for info, kind in layout.non_expert:
        parts = _split(info.name)
        is_shared = parts is not None and family in SHARED and parts[1].startswith(SHARED[family])
        assert (kind is TensorKind.SHARED_EXPERT) == is_shared, info.name
        if is_shared:
            assert parts is not None
            shared.setdefault(parts[0], set()).add(parts[1][len(SHARED[family]) :])
    if family in SHARED:
        assert shared == {
            layer: {"gate_proj.weight", "up_proj.weight", "down_proj.weight"} for layer in layout.moe_layers
        }
    else:
        assert not shared


def test_gpt_oss_fused_tensors_are_split_into_per_expert_slices(checkpoints) -> None:
    root = checkpoints.get("gpt_oss")
    tensors, _, _ = scan_checkpoint(root)
    by_name = {t.name: t for t in tensors}
    layout = open_checkpoint(root)
    for key, spec in layout.experts.items():
        for t in spec.tensors:
            fused = by_name[t.source]
            assert t.source.endswith(f"layers.{key.layer}.mlp.experts.{t.role}")
            n = fused.shape[0]
            assert n == layout.experts_per_layer()[key.layer]
            assert t.shape == fused.shape[1:]
            assert t.nbytes * n == fused.nbytes
            assert t.offset == fused.offset + key.expert * t.nbytes
            assert t.file == fused.file


def test_qwen3_vl_moe_vision_weights_are_non_expert(checkpoints) -> None:
    layout = open_checkpoint(checkpoints.get("qwen3_vl_moe"))
    visual = [(t, kind) for t, kind in layout.non_expert if ".visual." in t.name]
    assert visual, "the fixture has a vision tower"
    assert all(kind is TensorKind.OTHER for _, kind in visual)
    # Vision blocks have an MLP too; none of it may be taken for an expert or a router.
    assert any(".mlp." in t.name for t, _ in visual)
    assert all(".visual." not in t.source for s in layout.experts.values() for t in s.tensors)
    text = layout.config["text_config"]
    assert isinstance(text, dict)
    per_layer = text.get("num_experts", text.get("num_local_experts"))
    assert set(layout.experts_per_layer().values()) == {per_layer}


def test_single_file_and_sharded_checkpoints_have_the_same_layout(checkpoints) -> None:
    single = open_checkpoint(checkpoints.mixtral_single_file)
    assert len(single.files) == 1 and Path(single.files[0]).name == "model.safetensors"
    assert single.experts_per_layer() == expected_expert_counts("mixtral")
    assert single.architecture == "MixtralForCausalLM" and single.model_type == "mixtral"


# --- inconsistent expert sets (crafted tensor lists, no files needed) ---------------------------------


def _info(name: str, shape: tuple[int, ...], offset: int = 0, dtype: str = "BF16") -> TensorInfo:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return TensorInfo(name, "/m/model.safetensors", offset, n, dtype, shape)


def _expert(
    layer: int, e: int, role: str, shape: tuple[int, ...] = (4, 2), dtype: str = "BF16"
) -> TensorInfo:
    return _info(f"model.layers.{layer}.mlp.experts.{e}.{role}", shape, dtype=dtype)


CONFIG = {"model_type": "toy", "architectures": ["ToyForCausalLM"]}


def _layout(tensors: list[TensorInfo]):
    return build_layout(tensors, root="/m", config=CONFIG, files=["/m/model.safetensors"])


def test_layer_with_a_missing_expert_is_rejected() -> None:
    tensors = [_expert(0, e, "gate_proj.weight") for e in (0, 1, 3)]
    with pytest.raises(CheckpointError, match=r"layer 0 is missing experts \[2\]"):
        _layout(tensors)


def test_huge_expert_index_is_rejected_without_allocating_for_it() -> None:
    tensors = [_expert(0, 0, "gate_proj.weight"), _expert(0, 999_999_999, "gate_proj.weight")]
    with pytest.raises(CheckpointError, match=r"missing experts \[1, 2, 3"):
        _layout(tensors)


def test_absurdly_long_index_is_not_an_expert() -> None:
    name = "model.layers.0.mlp.experts." + "9" * 5000 + ".gate_proj.weight"
    layout = _layout([_info(name, (2,))])
    assert not layout.experts and layout.non_expert[0][0].name == name


def test_expert_with_a_missing_tensor_is_rejected() -> None:
    tensors = [_expert(0, e, r) for e in (0, 1) for r in ("gate_proj.weight", "up_proj.weight")]
    tensors.pop()  # expert 1 loses up_proj
    with pytest.raises(CheckpointError, match=r"expert L0\.E1 has tensors"):
        _layout(tensors)


def test_experts_of_a_layer_disagreeing_in_shape_or_dtype_are_rejected() -> None:
    base = [_expert(0, 0, "gate_proj.weight")]
    with pytest.raises(CheckpointError, match=r"expert L0\.E1"):
        _layout([*base, _expert(0, 1, "gate_proj.weight", shape=(4, 3))])
    with pytest.raises(CheckpointError, match=r"expert L0\.E1"):
        _layout([*base, _expert(0, 1, "gate_proj.weight", dtype="F32")])


def test_layers_may_differ_from_each_other() -> None:
    tensors = [_expert(0, e, "gate_proj.weight") for e in range(2)]
    tensors += [_expert(1, e, "gate_proj.weight", shape=(8, 2)) for e in range(3)]
    layout = _layout(tensors)
    assert layout.experts_per_layer() == {0: 2, 1: 3}
    assert layout.max_expert_nbytes == 32


def test_fused_tensors_disagreeing_on_the_expert_count_are_rejected() -> None:
    tensors = [
        _info("model.layers.0.mlp.experts.gate_up_proj", (4, 2, 6)),
        _info("model.layers.0.mlp.experts.down_proj", (3, 3, 2)),
    ]
    with pytest.raises(CheckpointError, match="disagree on the expert count"):
        _layout(tensors)


def test_fused_tensor_without_experts_is_rejected() -> None:
    with pytest.raises(CheckpointError, match="no experts") as info:
        _layout([_info("model.layers.0.mlp.experts.gate_up_proj", (0, 2, 6))])
    assert info.value.tensor == "model.layers.0.mlp.experts.gate_up_proj"


def test_fingerprint_depends_on_shapes_not_on_files_or_offsets() -> None:
    a = _layout([_expert(0, e, "gate_proj.weight") for e in range(2)])
    moved = [
        TensorInfo(t.name, "/elsewhere/x.safetensors", t.offset + 4096, t.nbytes, t.dtype, t.shape)
        for t in (_expert(0, e, "gate_proj.weight") for e in range(2))
    ]
    assert _layout(moved).fingerprint() == a.fingerprint()
    wider = _layout([_expert(0, e, "gate_proj.weight", shape=(4, 4)) for e in range(2)])
    assert wider.fingerprint() != a.fingerprint()
    more = _layout([_expert(0, e, "gate_proj.weight") for e in range(3)])
    assert more.fingerprint() != a.fingerprint()


def test_unknown_expert_key_is_a_checkpoint_error() -> None:
    layout = _layout([_expert(0, 0, "gate_proj.weight")])
    with pytest.raises(CheckpointError, match=r"no expert L5\.E0"):
        layout.spec(ExpertKey(5, 0))
