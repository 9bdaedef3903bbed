"""The auto budget's room for running the model is sized from its shape, and covers what a real forward
allocates: measured here as the rise of the process's resident high-water mark over a long prompt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from expertflow.config import StoreConfig
from expertflow.model.loader import plan_model
from expertflow.model.working_set import activation_bytes, config_dtype, forward_bytes, kv_cache_bytes
from expertflow.pipeline.budget import RUNTIME_SLACK

MiB = 1 << 20


def _wide_mixtral(path: Path) -> Path:
    """Wide enough that a long prompt's activations (tens of MiB) stand well above the allocator's noise."""
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    MixtralForCausalLM(config).save_pretrained(path)
    return path


_CHILD = """
import gc, json, sys
from expertflow import StoreConfig, load_model
from expertflow.model.generate import generate

def status(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024

root, tokens = sys.argv[1], int(sys.argv[2])
model = load_model(root, config=StoreConfig(predictor="none"))
generate(model, [1, 2, 3], 2)  # warm: every lazily built piece exists before the measurement
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to the current resident set
before = status("VmRSS")
generate(model, [4, 5, 6], 16)  # a short request: what the runtime grows by beside its tensors
short = status("VmHWM") - before
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
generate(model, [(7 * i) % 7000 + 1 for i in range(tokens)], 4)
print(json.dumps({"peak": status("VmHWM") - before, "short": short}))
"""


def test_the_reserve_for_running_the_model_covers_a_long_prompts_measured_peak(tmp_path: Path) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the high-water mark")
    root = _wide_mixtral(tmp_path / "wide")
    tokens = 1536
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), str(tokens)], capture_output=True, text=True, check=True
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    peak = measured["peak"]
    # The margin every plan keeps is for the runtime's own growth; a short request stays well inside it.
    assert measured["short"] <= RUNTIME_SLACK / 2, measured
    config = json.loads((root / "config.json").read_text())
    reserve = activation_bytes(config, config_dtype(config), tokens + 4)
    assert peak > 8 * MiB, f"the prompt's forward should be measurable ({peak} bytes)"
    assert peak <= reserve, f"measured {peak / MiB:.1f} MiB above the reserve of {reserve / MiB:.1f} MiB"
    # An upper estimate, not a blanket one: within a few times what the forward really took.
    assert reserve <= 4 * peak, f"reserve {reserve / MiB:.1f} MiB for a measured {peak / MiB:.1f} MiB"


def test_the_reserve_grows_with_the_context_the_store_is_planned_for(tmp_path: Path) -> None:
    root = _wide_mixtral(tmp_path / "wide")
    config = json.loads((root / "config.json").read_text())
    short = plan_model(root, StoreConfig(context_tokens=32))
    long = plan_model(root, StoreConfig(context_tokens=2048))
    dtype = config_dtype(config)
    assert long.reserve_bytes - short.reserve_bytes == activation_bytes(
        config, dtype, 2048
    ) - activation_bytes(config, dtype, 32)


def test_kv_cache_and_forward_sizes_follow_the_shape() -> None:
    mixtral = {
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "num_hidden_layers": 8,
        "intermediate_size": 2816,
        "num_local_experts": 32,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
    }
    # 8 layers x 4 KV heads x (128 + 128) x 2 bytes: 16 KiB a token.
    assert kv_cache_bytes(mixtral, torch.bfloat16, 1) == 16 * 1024
    assert forward_bytes(mixtral, torch.float32, 100) == 2 * forward_bytes(
        mixtral, torch.bfloat16, 100
    ) - 2 * (2 * 32000 * 4)
    # Multi-head latent attention caches its own widths, not heads x head_dim.
    mla = {**mixtral, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
    assert kv_cache_bytes(mla, torch.bfloat16, 1) == 8 * 4 * (192 + 128) * 2
    assert config_dtype({"torch_dtype": "bfloat16"}) is torch.bfloat16 and config_dtype({}) is torch.float32
