"""Tiny seeded checkpoints for every Mixture-of-Experts family the installed transformers ships.

``discover_expert_families`` finds the families whose modeling file uses the experts seam
(``@use_experts_implementation``) by reading source text; ``tiny_config`` shrinks a family's default config
with the library's generic rules (:mod:`expertflow.model.tiny`, which the load-time family check uses too),
plus a few per-family ``OVERRIDES``; ``build_tiny_model`` and ``save_tiny_checkpoint`` give a real transformers
model of that family with seeded random weights.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto import configuration_auto, modeling_auto

from expertflow.model.tiny import EXPERT_INTERMEDIATE, HEAD_DIM, HEADS, merge, randomise, shrink_arguments
from tests.checkpoints import instantiate

SEAM = "@use_experts_implementation"


# Per-family fixes on top of the generic shrinking, merged into the config's arguments (nested dicts for
# sub-configs). Keep this minimal; every entry says why it is needed.
OVERRIDES: dict[str, dict[str, Any]] = {
    # Per-layer kinds default to None and the model indexes them: real checkpoints always set them.
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse"]}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # n_shared_experts defaults to None, which the MoE block multiplies by: real checkpoints set it.
    "dots1": {"n_shared_experts": 1},
    # The text tower's M-RoPE sections default to [22, 22, 20] in the modeling code, not in the config.
    # Text and vision experts of two sizes, as the real model has (the generic shrink makes them equal).
    "ernie4_5_vl_moe": {
        "text_config": {"rope_parameters": {"mrope_section": [3, 3, 2]}, "moe_intermediate_size": [48, 32]}
    },
    # The talker's MoE block reads shared_expert_intermediate_size, which its config class does not define.
    "qwen3_omni_moe": {
        "talker_config": {
            "spatial_merge_size": 2,
            "text_config": {"shared_expert_intermediate_size": EXPERT_INTERMEDIATE},
        }
    },
    # M-RoPE sections default to [8, 12, 12] in the modeling code, not in the config.
    "glm4v_moe": {"text_config": {"rope_parameters": {"mrope_section": [1, 2, 1]}}},
    # All layers default to Mamba; a model without an attention layer cannot run a forward pass.
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # Its indexed-attention layers always build the QSA indexer, whose sizes default to None.
    "qwen4_exp": {
        "text_config": {
            "indexer_n_heads": HEADS,
            "indexer_kv_heads": 1,  # the family requires exactly one indexer key head
            "indexer_head_dim": HEAD_DIM,
            "indexer_budget": 8,
            "indexer_compress_ratio": 4,
        }
    },
    # Its model always builds a sliding-window mask, and the window defaults to None: real checkpoints set it.
    "step3p7": {"text_config": {"sliding_window": 8}},
    # The MoE block is off by default (the dense Gemma 4 checkpoints).
    "gemma4": {"text_config": {"enable_moe_block": True}},
}


# --- discovery ------------------------------------------------------------------------------------


def _models_dir() -> Path:
    return Path(transformers.__file__).parent / "models"


def _seam_dirs() -> list[str]:
    """Module directories whose ``modeling_<dir>.py`` uses the experts seam (source text only)."""
    found = []
    for path in sorted(_models_dir().glob("*/modeling_*.py")):
        if path.name == f"modeling_{path.parent.name}.py" and SEAM in path.read_text(encoding="utf-8"):
            found.append(path.parent.name)
    return found


def _top_model_type(candidates: list[str], directory: str) -> str:
    """The family's own model_type among those of one module: not a sub-config of a sibling."""
    if directory in candidates:
        return directory
    nested: set[str] = set()
    for model_type in candidates:
        cls = configuration_auto.CONFIG_MAPPING[model_type]
        for sub in (getattr(cls, "sub_configs", None) or {}).values():
            nested.add(getattr(sub, "model_type", ""))
    roots = [m for m in candidates if m not in nested] or candidates
    return min(roots, key=lambda m: (len(configuration_auto.CONFIG_MAPPING_NAMES[m]), m))


@cache
def _discover() -> tuple[str, ...]:
    by_dir: dict[str, list[str]] = {}
    for model_type in configuration_auto.CONFIG_MAPPING_NAMES:
        by_dir.setdefault(configuration_auto.model_type_to_module_name(model_type), []).append(model_type)
    return tuple(sorted(_top_model_type(by_dir[d], d) for d in _seam_dirs() if d in by_dir))


def discover_expert_families() -> list[str]:
    """Sorted model_types of every installed family whose modeling file uses ``@use_experts_implementation``."""
    return list(_discover())


# --- tiny configs ---------------------------------------------------------------------------------


def config_class(model_type: str) -> type[PretrainedConfig]:
    """The config class of ``model_type``."""
    return configuration_auto.CONFIG_MAPPING[model_type]


def model_class_name(model_type: str) -> tuple[str, str]:
    """``(model class name, auto class name)``: causal LM (multimodal families: image-text-to-text or
    multimodal LM first), else the base model."""
    causal = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM")
    multimodal = (
        ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
        ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "AutoModelForMultimodalLM"),
    )
    subs = getattr(config_class(model_type), "sub_configs", None) or {}
    order = (*multimodal, causal) if subs else (causal, *multimodal)
    for mapping, auto in (*order, ("MODEL_MAPPING_NAMES", "AutoModel")):
        names = getattr(modeling_auto, mapping, {})
        if model_type in names:
            name = names[model_type]
            return (name[0] if isinstance(name, (list, tuple)) else name), auto
    raise KeyError(f"transformers has no model class for {model_type!r}")


def runnable_model_type(model_type: str) -> str:
    """``model_type``, or, when its model class has no forward of its own (an Omni model that only wraps
    generation around a thinker and a talker), the first sub-model type whose class runs a forward."""

    def runs(mt: str) -> bool:
        try:
            cls = getattr(transformers, model_class_name(mt)[0])
        except (KeyError, AttributeError):
            return False
        return cls.forward is not torch.nn.Module.forward

    if runs(model_type):
        return model_type
    for sub in (getattr(config_class(model_type), "sub_configs", None) or {}).values():
        sub_type = getattr(sub, "model_type", "")
        if sub_type in configuration_auto.CONFIG_MAPPING and runs(sub_type):
            return sub_type
    return model_type


def tiny_config(model_type: str) -> PretrainedConfig:
    """The family's default config shrunk generically (every sub-config too) plus its OVERRIDES; fp32, with
    ``architectures`` naming the class ``build_tiny_model`` builds."""
    cls = config_class(model_type)
    kwargs = merge(shrink_arguments(cls()), OVERRIDES.get(model_type, {}))
    config = cls(**kwargs)
    config.architectures = [model_class_name(model_type)[0]]
    config.dtype = torch.float32
    return config


def build_tiny_model(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A tiny ``model_type`` model (causal LM / conditional generation / base) with seeded weights, fp32, eval."""
    model = instantiate(getattr(transformers, model_class_name(model_type)[0]), tiny_config(model_type), seed)
    randomise(model, seed)
    return model


def save_tiny_checkpoint(model_type: str, path: Path, seed: int = 0) -> Path:
    """Build the tiny ``model_type`` model and ``save_pretrained`` it (safetensors) to ``path``."""
    path = Path(path)
    build_tiny_model(model_type, seed=seed).save_pretrained(path)
    return path
