"""A tiny, seeded instance of any Mixture-of-Experts family, shrunk from its own config.

Used by the load-time family check (:mod:`expertflow.model.verify`): before a family's real weights run,
ExpertFlow proves on a tiny instance of the same config class that its offloaded experts compute what the
family's own module computes. :func:`shrink_arguments` shrinks a config generically (every nested sub-config
too): widths, depth, heads, experts and vocabulary become small, per-layer lists keep one of each kind of
layer, and structural choices (which layers are MoE, shared experts, grouped routing, rope sections) survive.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any, TypeGuard

import torch
from transformers import PretrainedConfig

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
    "expert_ffn_hidden_size": EXPERT_INTERMEDIATE,
    "shared_expert_intermediate_size": EXPERT_INTERMEDIATE,
    "shared_intermediate_size": EXPERT_INTERMEDIATE,
    "shared_experts_intermediate_size": EXPERT_INTERMEDIATE,
    "moe_shared_expert_intermediate_size": EXPERT_INTERMEDIATE,
    # depth
    "num_hidden_layers": LAYERS,
    "depth": LAYERS,
    "n_layers": LAYERS,
    "num_layers": LAYERS,
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
        # A family that routes each token to one expert keeps doing so (some configs accept nothing else).
        if isinstance(value, list):
            return [min(v, TOP_K) if _is_int(v) and v > 0 else v for v in value]
        return TOP_K if value is None else min(value, TOP_K) if _is_int(value) and value > 0 else value
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
    # Indexer heads read the query heads of one key head (Kolibri): at most that many.
    n_heads, n_kv = out.get("num_attention_heads"), out.get("num_key_value_heads")
    if _is_int(attrs.get("index_num_heads")) and _is_int(n_heads) and _is_int(n_kv) and n_kv > 0:
        out["index_num_heads"] = max(1, min(attrs["index_num_heads"], n_heads // n_kv))
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
        out["rope_parameters"] = rope_out = _shrink_rope(attrs["rope_parameters"], out)
        # YaRN's context extension keeps its ratio (transformers warns when the two disagree).
        original, positions = (
            rope_out.get("original_max_position_embeddings"),
            attrs.get("max_position_embeddings"),
        )
        if (
            _is_int(original)
            and _is_int(positions)
            and positions > 0
            and out.get("max_position_embeddings") != positions
        ):
            rope_out["original_max_position_embeddings"] = max(
                1, original * out["max_position_embeddings"] // positions
            )
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


def shrink_arguments(config: PretrainedConfig) -> dict[str, Any]:
    """What changes to make ``config`` tiny: its changed attributes, and every sub-config in full."""
    return _shrink(config, full=False)


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, nested mappings merged key by key (neither is modified)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# Settings of a real checkpoint that a tiny, unquantized, freshly saved copy must not carry.
_DROPPED = ("quantization_config", "transformers_version", "_name_or_path", "auto_map")


def tiny_copy(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` shrunk, of the same class and with the same structural choices (which layers are MoE,
    shared experts, grouped routing, the expert kernel); fp32, not quantized."""
    data = {k: v for k, v in config.to_dict().items() if k not in _DROPPED}
    tiny = type(config).from_dict(merge(data, shrink_arguments(config)))
    tiny.dtype = torch.float32
    return tiny


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
