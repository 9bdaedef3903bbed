"""load_model() refuses bad input with a precise, typed error and never falls back to loading everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from expertflow.config import StoreConfig
from expertflow.errors import BudgetError, CheckpointError, ConfigError, UnsupportedModelError
from expertflow.model.loader import load_model
from expertflow.pipeline.sync import ExpertStore
from expertflow.tiers.safetensors_index import open_checkpoint

TINY = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)


def _save(root: Path, model_type: str, dtype: torch.dtype = torch.float32, **overrides: object) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(root)
    return root


def _edit_config(root: Path, **changes: object) -> None:
    path = root / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def mixtral4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral with 4 experts per layer, top-2."""
    return _save(tmp_path_factory.mktemp("mixtral4"), "mixtral", num_local_experts=4, num_experts_per_tok=2)


def test_dense_model_is_unsupported_because_it_has_no_routed_experts(tmp_path: Path) -> None:
    root = _save(tmp_path / "llama", "llama")
    with pytest.raises(UnsupportedModelError, match="no routed experts"):
        load_model(root)


def test_expert_count_mismatch_names_the_tensor(mixtral4: Path, tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    for f in mixtral4.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    _edit_config(root, num_local_experts=8)
    with pytest.raises(CheckpointError, match="8 experts, but the checkpoint has 4") as info:
        load_model(root)
    assert info.value.tensor is not None and "experts.0." in info.value.tensor


def test_hidden_size_mismatch_names_the_tensor(mixtral4: Path, tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    for f in mixtral4.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    _edit_config(root, hidden_size=32)
    with pytest.raises(CheckpointError, match=r"expects \[") as info:
        load_model(root)
    assert info.value.tensor is not None
    assert info.value.tensor in str(info.value)


def test_missing_non_expert_tensor_is_a_checkpoint_error(mixtral4: Path, tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    for f in mixtral4.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(root / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"no tensor for 1 model weights.*model\.norm\.weight"):
        load_model(root)


def test_host_budget_below_top_k_experts_says_the_minimum(mixtral4: Path) -> None:
    layout = open_checkpoint(mixtral4)
    one_expert = -(-layout.max_expert_nbytes // 4096) * 4096
    with pytest.raises(BudgetError, match=f"minimum of .*{2 * one_expert} bytes"):
        load_model(mixtral4, config=StoreConfig(host_bytes=2 * one_expert - 1, read_mode="mmap"))


def test_device_slots_below_top_k_say_the_minimum(mixtral4: Path) -> None:
    with pytest.raises(BudgetError, match="below the minimum of 2"):
        load_model(mixtral4, config=StoreConfig(device_slots=1))


def test_dtype_other_than_the_stored_experts_is_refused(tmp_path: Path) -> None:
    root = _save(
        tmp_path / "bf16", "mixtral", dtype=torch.bfloat16, num_local_experts=4, num_experts_per_tok=2
    )
    with pytest.raises(ConfigError, match=r"dtype=torch\.bfloat16"):
        load_model(root, dtype=torch.float32)


def test_directory_without_config_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_model(tmp_path)


def test_a_store_over_other_experts_is_refused(mixtral4: Path, tmp_path: Path) -> None:
    other = _save(tmp_path / "other", "mixtral", num_local_experts=6, num_experts_per_tok=2)
    with ExpertStore(open_checkpoint(other)) as store, pytest.raises(ConfigError, match="differ"):
        load_model(mixtral4, store=store)


@pytest.mark.parametrize("top_k", [-1, 0, 5])
def test_invalid_experts_per_token_is_refused_at_load_and_leaks_nothing(
    mixtral4: Path, tmp_path: Path, top_k: int
) -> None:
    import gc
    import os
    import shutil
    import threading

    root = tmp_path / "bad"
    shutil.copytree(mixtral4, root)
    _edit_config(root, num_experts_per_tok=top_k)
    gc.collect()
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(CheckpointError, match="experts per token"):
            load_model(root)
    gc.collect()
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_failure_after_the_store_exists_closes_it(mixtral4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    import os
    import threading

    import expertflow.model.loader as loader

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected failure after the store was created")

    monkeypatch.setattr(loader, "attach_predictor", broken)
    gc.collect()
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(RuntimeError, match="injected"):
            load_model(mixtral4, config=StoreConfig(host_bytes=None))
    gc.collect()
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_non_expert_tensor_that_transformers_converts_is_converted_and_a_bad_one_named(
    tmp_path: Path,
) -> None:
    """bailing_hybrid merges q/k/v conv1d weights on load: transformers' own conversion does it for us, and a
    source of the wrong shape is a CheckpointError naming the conversion, not a crash or wrong weights."""
    from tests.family_fixtures import save_tiny_checkpoint

    root = save_tiny_checkpoint("bailing_hybrid", tmp_path / "bailing")
    config = StoreConfig(host_bytes=64 << 20, predictor="none")
    with load_model(root, config=config) as model:
        merged = model.get_parameter("model.layers.0.self_attn.conv1d.weight")
        assert not merged.is_meta
    (shard,) = root.glob("*.safetensors")
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith("layers.0.attention.k_conv1d.weight"))
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="could not convert"):
        load_model(root, config=config)
