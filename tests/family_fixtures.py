"""Tiny seeded checkpoints for every Mixture-of-Experts family the installed transformers ships.

``discover_expert_families`` finds the families whose modeling file uses the experts seam
(``@use_experts_implementation``) by reading source text; ``tiny_config`` shrinks a family's default config
generically (every nested sub-config too), with a few per-family ``OVERRIDES``; ``build_tiny_model`` and
``save_tiny_checkpoint`` give a real transformers model of that family with seeded random weights.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeGuard

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto import configuration_auto, modeling_auto

from tests.checkpoints import instantiate

SEAM = "@use_experts_implementation"

HIDDEN = 64
INTERMEDIATE = 96
EXPERT_INTERMEDIATE = 48
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
VOCAB = 256
POSITIONS = 128
EXPERTS = 8
TOP_K = 2

# Attribute name -> tiny value, applied wherever the attribute exists (in the config or any sub-config).
_FIXED: dict[str, int] = {
    # widths
    "hidden_size": HIDDEN,
    "d_model": HIDDEN,
    "text_hidden_size": HIDDEN,
    "out_hidden_size": HIDDEN,
    "output_dim": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "dense_intermediate_size": INTERMEDIATE,
    "prefix_dense_intermediate_size": INTERMEDIATE,
    "encoder_ffn_dim": INTERMEDIATE,
    "projector_hidden_size": HIDDEN,
    "adapter_in_dim": HIDDEN,
    "adapter_out_dim": HIDDEN,
    "decoder_dim": HIDDEN,
    # expert widths
    "moe_intermediate_size": EXPERT_INTERMEDIATE,
    "expert_intermediate_size": EXPERT_INTERMEDIATE,
    "moe_hidden_size": EXPERT_INTERMEDIATE,
    "shared_expert_intermediate_size": EXPERT_INTERMEDIATE,
    "shared_intermediate_size": EXPERT_INTERMEDIATE,
    "shared_experts_intermediate_size": EXPERT_INTERMEDIATE,
    "moe_shared_expert_intermediate_size": EXPERT_INTERMEDIATE,
    # depth
    "num_hidden_layers": LAYERS,
    "depth": LAYERS,
    "n_layers": LAYERS,
    "encoder_layers": LAYERS,
    # attention
    "num_attention_heads": HEADS,
    "num_heads": HEADS,
    "encoder_attention_heads": HEADS,
    "swa_num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "swa_num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "swa_head_dim": HEAD_DIM,
    "index_n_heads": HEADS,
    "indexer_n_heads": HEADS,
    "index_head_dim": HEAD_DIM,
    "indexer_head_dim": HEAD_DIM,
    # multi-head latent attention (DeepSeek-style)
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    # linear attention / state-space mixers
    "linear_num_key_heads": KV_HEADS,
    "linear_num_value_heads": HEADS,
    "linear_num_heads": HEADS,
    "linear_key_head_dim": HEAD_DIM,
    "linear_value_head_dim": HEAD_DIM,
    "linear_head_dim": HEAD_DIM,
    "mamba_num_heads": 8,
    "mamba_head_dim": HEAD_DIM,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "mamba_dt_rank": 8,
    # vocabulary and positions
    "vocab_size": VOCAB,
    "unpadded_vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "max_position_embeddings": POSITIONS,
}
# Keys set even when the default is None: some families read an unset head_dim as None, and families whose
# MoE block is optional (Gemma 4) leave the expert width unset.
_FILL_NONE = {"head_dim", "moe_intermediate_size"}
EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_NAMES = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k", "num_experts_per_token", "top_k_experts")
SHARED_NAMES = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
# Counts of leading dense layers: at most one, so a 2-layer model still has a MoE layer.
_DENSE_PREFIX = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")
# Lists of layer indices: kept only where they index one of the remaining layers.
_INDEX_LIST = re.compile(r".*(_layers|_indexes|_indices|_layer_ids)$")
_TOKEN_ID = re.compile(r".*(token_id|token_index)$")

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
    # The family routes each token to exactly one expert (its config rejects any other value).
    "zaya": {"num_experts_per_tok": 1},
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


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _choose_layers(per_layer: list[list[Any]], old: int, n: int) -> list[int]:
    """``n`` original layer indices, 0 first, each next one adding the most unseen per-layer kinds."""
    chosen = [0]
    seen = {(i, lst[0]) for i, lst in enumerate(per_layer)}
    while len(chosen) < min(n, old):
        gains = {
            j: sum((i, lst[j]) not in seen for i, lst in enumerate(per_layer))
            for j in range(old)
            if j not in chosen
        }
        best = max(gains, key=lambda j: (gains[j], -j))
        chosen.append(best)
        seen |= {(i, lst[best]) for i, lst in enumerate(per_layer)}
    return sorted(chosen)


def _shrink_value(name: str, value: Any) -> Any:
    """The tiny value of one layer-independent attribute, or ``value`` itself when no rule applies."""
    if name in _FIXED:
        # 0 and None usually mean "off" (no RoPE part, no indexer); only an unset head_dim is filled in.
        if (_is_int(value) and value > 0) or (value is None and name in _FILL_NONE):
            return _FIXED[name]
        if isinstance(value, list) and value and all(_is_int(v) and v > 0 for v in value):
            return [_FIXED[name]] * len(value)  # e.g. one expert width per modality
        return value
    if name in EXPERT_COUNT_NAMES:
        if isinstance(value, list):
            return [EXPERTS if _is_int(v) and v > 0 else v for v in value]
        return EXPERTS if value is None or (_is_int(value) and value > 0) else value
    if name in TOP_K_NAMES:
        if isinstance(value, list):
            return [TOP_K if _is_int(v) else v for v in value]
        return TOP_K if value is None or (_is_int(value) and value > 0) else value
    if name in SHARED_NAMES:
        if isinstance(value, list):
            return [min(v, 1) if _is_int(v) else v for v in value]
        return min(value, 1) if _is_int(value) else value
    if name in _DENSE_PREFIX and _is_int(value):
        return min(value, 1)
    if name in ("decoder_sparse_step", "moe_layer_interval", "moe_layer_freq") and _is_int(value):
        return 1
    if name == "moe_layer_end_index" and _is_int(value):
        return LAYERS - 1
    if name == "tie_word_embeddings":
        return False
    return value


def _token_ids(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Special token ids outside the tiny vocabulary moved to distinct ids at its top."""
    free = iter(range(VOCAB - 1, VOCAB // 2, -1))
    taken: dict[int, int] = {}

    def remap(v: Any) -> Any:
        if not _is_int(v) or v < VOCAB:
            return v
        if v not in taken:
            taken[v] = next(free)
        return taken[v]

    out: dict[str, Any] = {}
    for name in attrs:
        if not (_TOKEN_ID.match(name) or name in ("bos_token_id", "eos_token_id", "pad_token_id")):
            continue
        value = attrs[name]
        new = [remap(v) for v in value] if isinstance(value, list) else remap(value)
        if new != value:
            out[name] = new
    return out


def _split(total: int, parts: list[int]) -> list[int]:
    """``parts`` rescaled to integers summing to ``total`` (largest remainders first)."""
    exact = [p * total / sum(parts) for p in parts]
    out = [int(x) for x in exact]
    for i in sorted(range(len(parts)), key=lambda i: out[i] - exact[i])[: total - sum(out)]:
        out[i] += 1
    return out


def _shrink_rope(rope: Mapping[str, Any], attrs: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE parameters whose multimodal sections (``mrope_section``) fit the tiny rotary dims."""
    out = dict(rope)
    sections = out.get("mrope_section")
    if isinstance(sections, list) and sections and all(_is_int(v) for v in sections):
        rotary = attrs.get("qk_rope_head_dim") or attrs.get("head_dim") or HIDDEN // HEADS
        factor = float(out.get("partial_rotary_factor", 1.0) or 1.0)
        out["mrope_section"] = _split(int(rotary * factor) // 2, sections)
    for key, value in rope.items():
        if isinstance(value, Mapping):
            out[key] = _shrink_rope(value, attrs)
    return out


def _shrink_flat(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Layer-independent rules over one flat mapping of attributes (a config, or one layer's overrides)."""
    out = {name: _shrink_value(name, value) for name, value in attrs.items()}
    # Multi-head (not grouped) attention stays multi-head: some families require it.
    for kv, heads in (
        ("num_key_value_heads", "num_attention_heads"),
        ("swa_num_key_value_heads", "swa_num_attention_heads"),
        ("linear_num_key_heads", "linear_num_value_heads"),
    ):
        if kv in attrs and heads in attrs and attrs[kv] == attrs[heads] and attrs[kv] is not None:
            out[kv] = out[heads]
    # Latent attention: rope / nope / value head dims keep their proportions (rope partial factors).
    rope, nope = attrs.get("qk_rope_head_dim"), attrs.get("qk_nope_head_dim")
    if _is_int(rope) and _is_int(nope):
        scale = _FIXED["qk_rope_head_dim"] / rope if rope > 0 else _FIXED["qk_nope_head_dim"] / max(nope, 1)
        for name in ("qk_nope_head_dim", "v_head_dim"):
            if _is_int(attrs.get(name)) and attrs[name] > 0:
                out[name] = max(1, round(attrs[name] * scale))
        # Head dims defined as one of the latent-attention dims stay equal to it.
        for name in ("head_dim", "swa_head_dim", "qk_head_dim"):
            value = attrs.get(name)
            if not _is_int(value) or value == 0:
                continue
            for source in (
                (nope + rope, out["qk_nope_head_dim"] + out["qk_rope_head_dim"]),
                (rope, out["qk_rope_head_dim"]),
                (attrs.get("v_head_dim"), out.get("v_head_dim")),
            ):
                if value == source[0]:
                    out[name] = source[1]
                    break
    if isinstance(attrs.get("rope_parameters"), Mapping):
        out["rope_parameters"] = _shrink_rope(attrs["rope_parameters"], out)
    for name in ("n_group", "num_expert_group"):
        if _is_int(attrs.get(name)) and attrs[name] > 1:
            out[name] = 4  # 4 groups of 2 experts, 2 of them chosen: 4 candidates for the top 2
            if "topk_group" in attrs:
                out["topk_group"] = 2
    # Periodic layer patterns (a layer is of a kind when index % period == offset) fit in the tiny depth.
    for name, value in attrs.items():
        if name.endswith("_layer_period") and _is_int(value) and value > 0:
            out[name] = min(value, LAYERS)
            offset = name.replace("_period", "_offset")
            if _is_int(attrs.get(offset)):
                out[offset] = min(attrs[offset], out[name] - 1)
    # Vision towers: a 4 x 4 patch grid.
    patch = attrs.get("patch_size")
    if _is_int(attrs.get("image_size")) and _is_int(patch) and patch > 0:
        out["image_size"] = min(attrs["image_size"], 4 * patch)
    if _is_int(attrs.get("num_position_embeddings")) and attrs["num_position_embeddings"] > 16:
        out["num_position_embeddings"] = 16
    # Widths defined as the hidden size (adapters, projector inputs) stay equal to it.
    hidden = attrs.get("hidden_size")
    for name, value in attrs.items():
        if (
            _is_int(hidden)
            and value == hidden
            and out[name] is value
            and name != "hidden_size"
            and re.search(r"(_dim|_size)$", name)
        ):
            out[name] = HIDDEN
    out.update(_token_ids(attrs))
    return out


def _shrink_layer(
    flat: Mapping[str, Any], shrunk: Mapping[str, Any], layer: Mapping[str, Any]
) -> dict[str, Any]:
    """One layer's overrides, shrunk in the context of the global attributes they override."""
    merged = _shrink_flat({**flat, **layer})
    return {
        k: v
        for k, v in merged.items()
        if k in layer or (not isinstance(v, (list, tuple, Mapping)) and v != shrunk.get(k))
    }


def _shrink(config: PretrainedConfig, full: bool) -> dict[str, Any]:
    """Arguments that rebuild ``config`` tiny: only the changes (``full=False``) or every attribute."""
    attrs = config.to_dict()
    attrs.pop("transformers_version", None)
    subs = {k: v for k, v in config.__dict__.items() if isinstance(v, PretrainedConfig)}
    flat = {k: v for k, v in attrs.items() if k not in subs and k != "per_layer_config"}
    new = _shrink_flat(flat)
    old = attrs.get("num_hidden_layers")
    if _is_int(old) and old > LAYERS:
        per_layer = [k for k, v in flat.items() if isinstance(v, (list, tuple)) and len(v) == old]
        # Per-layer lists of layer indices (e.g. which earlier layer's KV cache a layer reuses).
        refs = [k for k in per_layer if _INDEX_LIST.match(k) and all(_is_int(v) for v in flat[k])]
        kinds = [list(new[k]) for k in per_layer if k not in refs]
        chosen = _choose_layers(kinds, old, LAYERS) if kinds else list(range(LAYERS))
        renumber = {o: i for i, o in enumerate(chosen)}
        for k in per_layer:
            if k in refs:
                new[k] = type(flat[k])(renumber.get(flat[k][o], i) for i, o in enumerate(chosen))
            else:
                new[k] = type(flat[k])(new[k][o] for o in chosen)
        for k, v in flat.items():
            is_index_list = isinstance(v, (list, tuple)) and all(_is_int(i) for i in v)
            if k not in per_layer and _INDEX_LIST.match(k) and is_index_list:
                new[k] = type(v)(renumber[i] for i in v if i in renumber)
    else:
        renumber = {i: i for i in range(old)} if _is_int(old) else {}
    overrides = attrs.get("per_layer_config")
    if isinstance(overrides, Mapping):
        new["per_layer_config"] = {
            renumber[int(i)]: _shrink_layer(flat, new, o) for i, o in overrides.items() if int(i) in renumber
        }
    out = {k: v for k, v in new.items() if full or k not in flat or v != flat[k]}
    for name, sub in subs.items():
        out[name] = _shrink(sub, full=True)
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


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
    kwargs = _merge(_shrink(cls(), full=False), OVERRIDES.get(model_type, {}))
    config = cls(**kwargs)
    config.architectures = [model_class_name(model_type)[0]]
    config.dtype = torch.float32
    return config


# --- models and checkpoints ------------------------------------------------------------------------


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Fill every floating parameter with seeded ``randn * 0.02``; parameters initialised to ones (norm
    weights, scales) become ``1 + randn * 0.02``. Tied parameters are drawn once."""
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=True):
        if not param.is_floating_point() or param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        noise = torch.randn(param.shape, generator=g, dtype=torch.float32) * 0.02
        ones = param.numel() > 0 and bool((param == 1).all())
        param.copy_((1.0 + noise if ones else noise).to(param.dtype))


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
