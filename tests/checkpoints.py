"""Real tiny Hugging Face MoE checkpoints, one per family, for tests.

Each family is a genuine transformers model class with a tiny configuration and seeded random weights,
saved with ``save_pretrained`` — so the files on disk are exactly what transformers writes for a real model
of that family (names, per-expert or fused layout, shards, index). Building and saving all of them takes a
few seconds on a laptop-class CPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

FAMILIES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "phimoe",
    "gpt_oss",
    "qwen3_vl_moe",
)

# Shared by every text tower: small enough to build in milliseconds, big enough that every layer matters.
# Expert intermediate sizes differ from hidden_size (and 2 * I from it too) in every family, so an expert
# tensor read in the wrong orientation has the wrong shape instead of silently passing.
# 128 positions cover the longest prompt + generation used in the tests (12 + 32 tokens) with room to spare.
_TEXT: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}
_DEEPSEEK: dict[str, Any] = {
    # MLA attention derives head_dim from qk_rope_head_dim; an explicit one would override it.
    **{k: v for k, v in _TEXT.items() if k != "head_dim"},
    # Tiny MLA configurations break with grouped KV heads (see DESIGN.md).
    "num_key_value_heads": 4,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,  # layer 0 is a dense MLP: the layout must not take it for experts
    "intermediate_size": 128,
    "moe_intermediate_size": 48,
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "n_group": 4,
    "topk_group": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}


@dataclass(frozen=True)
class FamilySpec:
    """How to build one family: transformers class names and the tiny configuration's arguments."""

    config_class: str
    model_class: str
    auto_class: str
    kwargs: dict[str, Any]
    # For vision-language families: the text tower's config class and arguments, passed as ``text_config``.
    text_kwargs: dict[str, Any] = field(default_factory=dict)
    vision_kwargs: dict[str, Any] = field(default_factory=dict)


SPECS: dict[str, FamilySpec] = {
    "mixtral": FamilySpec(
        "MixtralConfig",
        "MixtralForCausalLM",
        "AutoModelForCausalLM",
        {**_TEXT, "num_hidden_layers": 3, "intermediate_size": 96, "num_local_experts": 8},
    ),
    "qwen2_moe": FamilySpec(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        "AutoModelForCausalLM",
        {
            **_TEXT,
            "num_hidden_layers": 3,
            "intermediate_size": 128,
            "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 96,
            "num_experts": 8,
            "norm_topk_prob": False,
        },
    ),
    "qwen3_moe": FamilySpec(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        "AutoModelForCausalLM",
        {
            **_TEXT,
            "num_hidden_layers": 3,
            "intermediate_size": 128,
            "moe_intermediate_size": 80,
            "num_experts": 8,
            "norm_topk_prob": True,
        },
    ),
    "olmoe": FamilySpec(
        "OlmoeConfig",
        "OlmoeForCausalLM",
        "AutoModelForCausalLM",
        # OLMoE's default eos id (50279) lies outside this vocabulary.
        {
            **_TEXT,
            "num_hidden_layers": 2,
            "intermediate_size": 72,
            "num_experts": 6,
            "pad_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "deepseek_v2": FamilySpec(
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        "AutoModelForCausalLM",
        {**_DEEPSEEK, "topk_method": "group_limited_greedy", "routed_scaling_factor": 1.0},
    ),
    "deepseek_v3": FamilySpec(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        "AutoModelForCausalLM",
        {**_DEEPSEEK, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True},
    ),
    "phimoe": FamilySpec(
        "PhimoeConfig",
        "PhimoeForCausalLM",
        "AutoModelForCausalLM",
        {**_TEXT, "num_hidden_layers": 2, "intermediate_size": 80, "num_local_experts": 4},
    ),
    "gpt_oss": FamilySpec(
        "GptOssConfig",
        "GptOssForCausalLM",
        "AutoModelForCausalLM",
        {
            **_TEXT,
            "num_hidden_layers": 2,
            "intermediate_size": 48,
            "num_local_experts": 4,
            # Shorter than a test generation, so sliding and full attention layers really differ.
            "sliding_window": 16,
            # GPT-OSS's YaRN, scaled down consistently: 4 x 32 = max_position_embeddings.
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "qwen3_vl_moe": FamilySpec(
        "Qwen3VLMoeConfig",
        "Qwen3VLMoeForConditionalGeneration",
        "AutoModelForImageTextToText",
        {},
        text_kwargs={
            **_TEXT,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "moe_intermediate_size": 40,
            "num_experts": 6,
            # Interleaved M-RoPE sections must add up to head_dim / 2.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        },
        vision_kwargs={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 4,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
    ),
}


@dataclass(frozen=True)
class DiskNames:
    """Tensor names as ``save_pretrained`` writes them, as regular expressions over the full name.

    ``experts`` has groups ``layer``, ``role`` and, unless ``fused``, ``expert``. ``roles`` lists the expert
    roles in canonical order: per-expert layouts (gate, up, down); fused layouts the stacked tensors, expert
    index first, in the order of the in-memory parameters.
    """

    experts: str
    roles: tuple[str, ...]
    routers: str
    shared: str | None
    dense_mlp: str | None
    fused: bool


_L = r"model\.layers\.(?P<layer>\d+)\."
_PER_EXPERT = _L + r"mlp\.experts\.(?P<expert>\d+)\.(?P<role>(?:gate|up|down)_proj\.weight)"
_GUD = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
_DENSE = _L + r"mlp\.(?P<role>(?:gate|up|down)_proj\.weight)"

# Observed on disk with transformers 5.23 (checked by tests/test_checkpoints.py on every run). Shapes, with
# E experts, H hidden, I expert intermediate size:
# - per-expert layouts: gate [I, H], up [I, H], down [H, I]; in memory they become the fused parameters
#   ``experts.gate_up_proj[e] = cat(gate, up)`` [E, 2I, H] and ``experts.down_proj[e] = down`` [E, H, I].
# - gpt_oss: stored exactly as in memory, transposed and interleaved: gate_up_proj [E, H, 2I] with gate in
#   the even and up in the odd columns, gate_up_proj_bias [E, 2I], down_proj [E, I, H], down_proj_bias [E, H].
# - qwen3_vl_moe: stored as in memory: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj
#   [E, H, I]. Released Hub checkpoints of this family hold the transposes ([E, H, 2I], [E, I, H]); the
#   loader transposes them when the shape differs from the parameter's, and save_pretrained does not.
ON_DISK_EXPERT_NAMES: dict[str, DiskNames] = {
    "mixtral": DiskNames(
        experts=_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<role>w[123]\.weight)",
        roles=("w1.weight", "w3.weight", "w2.weight"),
        routers=_L + r"block_sparse_moe\.gate\.weight",
        shared=None,
        dense_mlp=None,
        fused=False,
    ),
    "phimoe": DiskNames(
        experts=_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<role>w[123]\.weight)",
        roles=("w1.weight", "w3.weight", "w2.weight"),
        routers=_L + r"block_sparse_moe\.gate\.weight",
        shared=None,
        dense_mlp=None,
        fused=False,
    ),
    "qwen2_moe": DiskNames(
        experts=_PER_EXPERT,
        roles=_GUD,
        routers=_L + r"mlp\.(?:gate|shared_expert_gate)\.weight",
        shared=_L + r"mlp\.shared_expert\.(?P<role>(?:gate|up|down)_proj\.weight)",
        dense_mlp=None,
        fused=False,
    ),
    "qwen3_moe": DiskNames(
        experts=_PER_EXPERT,
        roles=_GUD,
        routers=_L + r"mlp\.gate\.weight",
        shared=None,
        dense_mlp=None,
        fused=False,
    ),
    "olmoe": DiskNames(
        experts=_PER_EXPERT,
        roles=_GUD,
        routers=_L + r"mlp\.gate\.weight",
        shared=None,
        dense_mlp=None,
        fused=False,
    ),
    "deepseek_v2": DiskNames(
        experts=_PER_EXPERT,
        roles=_GUD,
        routers=_L + r"mlp\.gate\.weight",
        shared=_L + r"mlp\.shared_experts\.(?P<role>(?:gate|up|down)_proj\.weight)",
        dense_mlp=_DENSE,
        fused=False,
    ),
    "deepseek_v3": DiskNames(
        experts=_PER_EXPERT,
        roles=_GUD,
        routers=_L + r"mlp\.gate\.(?:weight|e_score_correction_bias)",
        shared=_L + r"mlp\.shared_experts\.(?P<role>(?:gate|up|down)_proj\.weight)",
        dense_mlp=_DENSE,
        fused=False,
    ),
    "gpt_oss": DiskNames(
        # Fused: one tensor per role holds every expert of the layer, expert index first.
        experts=_L + r"mlp\.experts\.(?P<role>gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias)",
        roles=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        routers=_L + r"mlp\.router\.(?:weight|bias)",
        shared=None,
        dense_mlp=None,
        fused=True,
    ),
    "qwen3_vl_moe": DiskNames(
        experts=r"model\.language_model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<role>gate_up_proj|down_proj)",
        roles=("gate_up_proj", "down_proj"),
        routers=r"model\.language_model\.layers\.(?P<layer>\d+)\.mlp\.gate\.weight",
        shared=None,
        dense_mlp=None,
        fused=True,
    ),
}


class FamilyUnavailable(RuntimeError):
    """The installed transformers does not provide this family; ``str(exc)`` says what is missing."""


def _cls(name: str, family: str) -> Callable[..., Any]:
    obj = getattr(transformers, name, None)
    if obj is None:
        raise FamilyUnavailable(
            f"{family}: transformers {transformers.__version__} has no {name}; upgrade transformers to test it"
        )
    return obj


def _spec(family: str) -> FamilySpec:
    if family not in SPECS:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return SPECS[family]


def family_config(family: str) -> transformers.PretrainedConfig:
    """The tiny configuration of ``family`` (raises FamilyUnavailable if transformers lacks it)."""
    spec = _spec(family)
    config_cls = _cls(spec.config_class, family)
    if spec.text_kwargs or spec.vision_kwargs:
        config = config_cls(
            text_config=dict(spec.text_kwargs), vision_config=dict(spec.vision_kwargs), **spec.kwargs
        )
    else:
        config = config_cls(**spec.kwargs)
    config.architectures = [spec.model_class]
    config.dtype = torch.float32
    return config


def auto_class(family: str) -> Any:
    """The transformers Auto class that loads this family's checkpoint."""
    return _cls(_spec(family).auto_class, family)


def _fan_in(shape: torch.Size) -> int:
    # Linear [out, in] and stacked experts [E, out, in]: the last dim; convolutions [out, in, *kernel]: the rest.
    return shape[-1] if len(shape) <= 3 else math.prod(shape[1:])


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every saved floating tensor with seeded values that make each part of the model matter.

    transformers initialises norms to one and biases to zero (GPT-OSS expert biases, DeepSeek-V3's score
    correction), so a loader that dropped them would go unnoticed, and its std-0.02 matrices make expert
    outputs a small correction to the residual stream. Here matrices get unit-variance-preserving scales so
    experts and routing matter as much as in a trained model; norm weights stay near one, biases small.
    """
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        tensors: list[tuple[str, torch.Tensor]] = [
            *module.named_parameters(recurse=False),
            *(
                (n, b)
                for n, b in module.named_buffers(recurse=False)
                if n not in module._non_persistent_buffers_set
            ),
        ]
        for name, t in tensors:
            if not t.is_floating_point() or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())  # tied weights are drawn once
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if isinstance(module, torch.nn.Embedding):
                # Unit-scale token embeddings keep tokens distinct in the residual stream, so routing in
                # later layers still depends on the token rather than on what attention mixed in.
                value = noise
            elif t.ndim >= 2:
                value = noise / math.sqrt(_fan_in(t.shape))
            elif is_norm and name == "weight":
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            t.copy_(value.to(t.dtype))


def instantiate(
    model_cls: type[transformers.PreTrainedModel], config: transformers.PretrainedConfig, seed: int
) -> transformers.PreTrainedModel:
    """``model_cls(config)`` constructed under ``seed``: fp32, CPU, eval mode, the caller's RNG state untouched."""
    # Construction draws from the global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype=torch.float32).eval()


def build_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny ``family`` model with seeded random weights: fp32, CPU, eval mode. Same seed, same weights."""
    model = instantiate(_cls(_spec(family).model_class, family), family_config(family), seed)
    _randomise(model, seed)
    return model


def save_checkpoint(family: str, path: Path, *, shard_size: str | None = "200KB", seed: int = 0) -> Path:
    """Build ``family`` and save it to ``path`` (config.json + safetensors).

    ``shard_size`` splits the weights into shards with a ``model.safetensors.index.json``; ``None`` writes a
    single ``model.safetensors`` and no index.
    """
    path = Path(path)
    model = build_model(family, seed=seed)
    # 100 GB is "never shard" for these sizes: transformers then writes one file without an index.
    model.save_pretrained(path, max_shard_size=shard_size or "100GB")
    return path


def _is_sparse_qwen_layer(text: Any, layer: int) -> bool:
    step = int(getattr(text, "decoder_sparse_step", 1) or 1)
    return layer not in (text.mlp_only_layers or []) and text.num_experts > 0 and (layer + 1) % step == 0


def expected_expert_counts(family: str) -> dict[int, int]:
    """MoE layer index -> number of routed experts, derived from the family's config rules."""
    text = family_config(family).get_text_config()
    layers = range(text.num_hidden_layers)
    if family in ("mixtral", "phimoe", "gpt_oss"):
        return {i: text.num_local_experts for i in layers}
    if family == "olmoe":
        return {i: text.num_experts for i in layers}
    if family in ("deepseek_v2", "deepseek_v3"):
        return {i: text.n_routed_experts for i in layers if i >= text.first_k_dense_replace}
    if family in ("qwen2_moe", "qwen3_moe", "qwen3_vl_moe"):
        return {i: text.num_experts for i in layers if _is_sparse_qwen_layer(text, i)}
    raise KeyError(f"unknown family {family!r}")


def classify_disk_name(family: str, name: str) -> tuple[str, re.Match[str] | None]:
    """Which part of the model an on-disk tensor name belongs to, per ``ON_DISK_EXPERT_NAMES``.

    Returns ``(kind, match)`` with kind one of ``experts``, ``shared``, ``router``, ``dense_mlp``, ``other``.
    """
    names = ON_DISK_EXPERT_NAMES[family]
    for kind, pattern in (
        ("experts", names.experts),
        ("shared", names.shared),
        ("router", names.routers),
        ("dense_mlp", names.dense_mlp),
    ):
        if pattern is not None and (m := re.fullmatch(pattern, name)):
            return kind, m
    return "other", None


def save_dense_checkpoint(path: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """A real dense (non-MoE) Llama checkpoint: what ExpertFlow must refuse, or report as having no experts."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = transformers.AutoConfig.for_model(
            "llama",
            vocab_size=32,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<s> w{{ 10 if m['role'] == 'user' else 11 }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w11{% endif %}"
)


def save_tokenizer(root: Path, vocab: int) -> None:
    """A word-level tokenizer written by transformers beside a checkpoint: ``w3``..``w{vocab-1}``, ``<s>`` 1,
    ``</s>`` 2, and a chat template (user turns start ``w10``, the assistant's ``w11``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(root)
