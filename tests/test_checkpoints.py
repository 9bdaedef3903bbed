"""The tiny checkpoint fixtures are real: transformers loads them back to the same model, they are sharded as
promised, deterministic, non-degenerate, and their on-disk names are what ``ON_DISK_EXPERT_NAMES`` says."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.checkpoints import (
    FAMILIES,
    ON_DISK_EXPERT_NAMES,
    auto_class,
    build_model,
    classify_disk_name,
    expected_expert_counts,
    family_config,
    save_checkpoint,
)

INDEX = "model.safetensors.index.json"
_EXPERTS_PATH = re.compile(r"layers\.(\d+)\.mlp\.experts$")


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert name not in out, f"{name} stored twice"
                out[name] = f.get_tensor(name)
    return out


def _prompt(model: torch.nn.Module, seed: int = 5, length: int = 10, batch: int = 2) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _experts_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    return {int(m[1]): mod for name, mod in model.named_modules() if (m := _EXPERTS_PATH.search(name))}


def test_saved_checkpoint_loads_back_to_the_same_weights_and_logits(checkpoints, family: str) -> None:
    root = checkpoints.get(family)
    reference = build_model(family)
    loaded = auto_class(family).from_pretrained(root, dtype=torch.float32).eval()
    assert type(loaded) is type(reference)

    # Nothing missing (randomly re-initialised by the loader) and nothing changed on the way.
    want, got = reference.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name

    prompt = _prompt(reference)
    with torch.no_grad():
        expected = reference(prompt).logits
        actual = loaded(prompt).logits
    assert expected.shape == (*prompt.shape, reference.config.get_text_config().vocab_size)
    assert torch.isfinite(expected).all() and expected.std() > 0.1
    # Bitwise-equal weights, yet CPU kernels may pick other code paths for the loader's differently aligned
    # (mmap-backed) buffers: allow float32 round-off, nothing more.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))


def test_sharded_checkpoint_has_an_index_naming_several_shards(checkpoints, family: str) -> None:
    root = checkpoints.get(family)
    weight_map = json.loads((root / INDEX).read_text())["weight_map"]
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    assert len(shards) > 1
    assert sorted(set(weight_map.values())) == shards
    assert set(weight_map) == set(_tensors(root))
    assert (root / "config.json").is_file()
    assert (
        json.loads((root / "config.json").read_text())["architectures"] == family_config(family).architectures
    )


def test_single_file_checkpoint_has_no_index_and_the_same_tensors_as_the_sharded_one(checkpoints) -> None:
    single = checkpoints.mixtral_single_file
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]
    assert not (single / INDEX).exists()
    sharded = _tensors(checkpoints.get("mixtral"))
    flat = _tensors(single)
    assert flat.keys() == sharded.keys()
    assert all(torch.equal(flat[k], sharded[k]) for k in flat)


def test_single_file_fixture_is_the_cached_single_file_checkpoint(mixtral_single_file, checkpoints) -> None:
    assert mixtral_single_file == checkpoints.mixtral_single_file
    assert (mixtral_single_file / "model.safetensors").is_file()


def test_same_seed_writes_identical_files_and_another_seed_different_weights(tmp_path: Path) -> None:
    a = save_checkpoint("qwen3_moe", tmp_path / "a", seed=3)
    b = save_checkpoint("qwen3_moe", tmp_path / "b", seed=3)
    c = save_checkpoint("qwen3_moe", tmp_path / "c", seed=4)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ta, tc = _tensors(a), _tensors(c)
    assert ta.keys() == tc.keys()
    assert not any(torch.equal(ta[k], tc[k]) for k in ta)


def test_building_a_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    build_model("olmoe")
    assert torch.equal(torch.rand(4), expected)


def test_expected_expert_counts_match_the_instantiated_model(family: str) -> None:
    model = build_model(family)
    counts = {layer: int(mod.gate_up_proj.shape[0]) for layer, mod in _experts_modules(model).items()}
    assert counts == expected_expert_counts(family)
    assert all(4 <= n <= 8 for n in counts.values())
    text = model.config.get_text_config()
    assert 2 <= text.num_hidden_layers <= 4 and text.num_experts_per_tok == 2
    if family.startswith("deepseek"):
        assert min(counts) == text.first_k_dense_replace >= 1


def test_routing_differs_between_tokens_and_reaches_every_expert(family: str) -> None:
    model = build_model(family)
    chosen: dict[int, list[torch.Tensor]] = defaultdict(list)
    handles = [
        mod.register_forward_pre_hook(
            lambda _m, args, layer=layer: chosen[layer].append(args[1].reshape(-1, 2))
        )
        for layer, mod in _experts_modules(model).items()
    ]
    try:
        with torch.no_grad():
            model(_prompt(model, seed=9, length=32, batch=4))
    finally:
        for h in handles:
            h.remove()
    counts = expected_expert_counts(family)
    assert chosen.keys() == counts.keys()
    for layer, picks in chosen.items():
        top = torch.cat(picks).sort(dim=-1).values  # [tokens, 2]
        assert len(torch.unique(top, dim=0)) >= 4, f"{family} layer {layer}: routing barely varies"
        assert set(top.flatten().tolist()) == set(range(counts[layer])), (
            f"{family} layer {layer}: idle experts"
        )


def test_expert_weights_differ_between_experts(family: str) -> None:
    for layer, mod in _experts_modules(build_model(family)).items():
        w = mod.gate_up_proj.detach()
        assert w.std() > 0.05, f"{family} layer {layer}: weights too small to matter"
        for e in range(1, w.shape[0]):
            assert not torch.allclose(w[e], w[0]), f"{family} layer {layer}: expert {e} equals expert 0"


def test_no_saved_tensor_is_constant(checkpoints, family: str) -> None:
    # Zero router biases, unit norms or zero score corrections would hide bugs that drop or misplace them.
    for name, t in _tensors(checkpoints.get(family)).items():
        assert t.numel() > 1 and t.std() > 0.01, name


def test_on_disk_names_follow_the_documented_patterns(checkpoints, family: str) -> None:
    names = ON_DISK_EXPERT_NAMES[family]
    tensors = _tensors(checkpoints.get(family))
    counts = expected_expert_counts(family)
    layers = family_config(family).get_text_config().num_hidden_layers
    experts: dict[int, set[tuple[int | None, str]]] = defaultdict(set)
    found: dict[str, set[int]] = defaultdict(set)
    for name in tensors:
        kind, m = classify_disk_name(family, name)
        if kind == "other":
            assert ".experts." not in name and not re.search(r"\.(gate|router)\.", name), name
            continue
        assert m is not None
        layer = int(m["layer"])
        found[kind].add(layer)
        if kind == "experts":
            experts[layer].add((None if names.fused else int(m["expert"]), m["role"]))
    assert found["experts"] == found["router"] == set(counts)
    assert found.get("shared", set()) == (set(counts) if names.shared else set())
    assert found.get("dense_mlp", set()) == (set(range(layers)) - set(counts) if names.dense_mlp else set())
    for layer, n in counts.items():
        ids = [None] if names.fused else list(range(n))
        assert experts[layer] == {(e, role) for e in ids for role in names.roles}
        if names.fused:
            assert all(
                tensors[k].shape[0] == n for k in tensors if classify_disk_name(family, k)[0] == "experts"
            )


def test_disk_expert_tensors_are_exactly_the_in_memory_expert_parameters(checkpoints, family: str) -> None:
    names = ON_DISK_EXPERT_NAMES[family]
    tensors = _tensors(checkpoints.get(family))
    modules = _experts_modules(build_model(family))
    checked = 0
    for name, t in tensors.items():
        kind, m = classify_disk_name(family, name)
        if kind != "experts":
            continue
        assert m is not None
        mod = modules[int(m["layer"])]
        if names.fused:
            assert torch.equal(t, getattr(mod, m["role"]).detach()), name
        else:
            gate, up, down = names.roles
            e, inter = int(m["expert"]), mod.down_proj.shape[-1]
            part = {
                gate: mod.gate_up_proj[e, :inter],
                up: mod.gate_up_proj[e, inter:],
                down: mod.down_proj[e],
            }[m["role"]]
            assert torch.equal(t, part.detach()), name
        checked += 1
    assert checked == sum(1 if names.fused else n for n in expected_expert_counts(family).values()) * len(
        names.roles
    )


def test_vision_language_checkpoint_holds_a_dense_vision_tower(checkpoints) -> None:
    tensors = _tensors(checkpoints.get("qwen3_vl_moe"))
    visual = [k for k in tensors if k.startswith("model.visual.")]
    assert any(".mlp." in k for k in visual)
    assert all(classify_disk_name("qwen3_vl_moe", k)[0] == "other" for k in visual)


def test_unknown_family_is_a_key_error(checkpoints) -> None:
    with pytest.raises(KeyError, match="unknown family"):
        build_model("llama")
    with pytest.raises(KeyError, match="unknown family"):
        checkpoints.get("llama")


def test_shared_trained_model_uses_the_same_on_disk_names_as_the_mixtral_fixture(
    shared_model_dir: Path,
) -> None:
    config = json.loads((shared_model_dir / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    kinds: dict[str, set[int]] = defaultdict(set)
    for file in shared_model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                kind, m = classify_disk_name("mixtral", name)
                if m is not None:
                    kinds[kind].add(int(m["layer"]))
    layers = set(range(config["num_hidden_layers"]))
    assert kinds == {"experts": layers, "router": layers}
