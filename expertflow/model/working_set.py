"""What running the model allocates besides its weights, sized from the model's shape: the auto budget leaves
it room instead of a fixed reserve.

Two parts: the KV cache of ``context`` tokens (it stays for the whole request), and the short-lived tensors
of one forward pass over a prompt of that many tokens (only one decoder layer's are alive at once, beside the
residual stream). Both are upper estimates from ``config.json``: every attention layer caching full keys and
values, one layer's activations at the widest point of the MoE block (each token's rows repeated ``top_k``
times, the expert's gate and up projections, the shared or dense MLP) and twice that for the allocator, which
keeps freed blocks for reuse rather than returning them at once. ``tests/test_working_set.py`` measures the
peak a real model reaches (the kernel's high-water mark) against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from expertflow.core import routed_top_k

#: The context the default budget plans the KV cache and a prompt's forward for (``StoreConfig.context_tokens``).
DEFAULT_CONTEXT = 4096


def _attr(scope: Mapping[str, Any] | Any, name: str) -> Any:
    if isinstance(scope, Mapping):
        return scope.get(name)
    try:
        return getattr(scope, name, None)
    except Exception:  # e.g. a per-layer attribute a config refuses to give globally: estimate without it
        return None


def _get(config: Mapping[str, Any] | Any, *names: str) -> Any:
    """The first of ``names`` that ``config`` (or its ``text_config``) gives as a positive int; else None."""
    scopes = [config]
    text = _attr(config, "text_config")
    if text is not None:
        scopes.insert(0, text)
    for scope in scopes:
        for name in names:
            value = _attr(scope, name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _shape(config: Mapping[str, Any] | Any) -> dict[str, int]:
    hidden = _get(config, "hidden_size", "d_model", "n_embd") or 0
    heads = _get(config, "num_attention_heads", "n_head") or 1
    kv_heads = _get(config, "num_key_value_heads") or heads
    head_dim = _get(config, "head_dim") or (hidden // heads if heads else 0)
    # Multi-head latent attention (DeepSeek) caches keys of nope + rope width and values of v_head_dim.
    k_dim = (_get(config, "qk_nope_head_dim") or 0) + (_get(config, "qk_rope_head_dim") or 0) or head_dim
    v_dim = _get(config, "v_head_dim") or head_dim
    return {
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "k_dim": k_dim,
        "v_dim": v_dim,
        "layers": _get(config, "num_hidden_layers", "n_layer", "num_layers") or 1,
        "expert_ffn": _get(config, "moe_intermediate_size", "expert_ffn_size", "intermediate_size") or hidden,
        "dense_ffn": _get(config, "intermediate_size", "ffn_hidden_size") or 0,
        "shared": _get(config, "n_shared_experts", "num_shared_experts") or 0,
        "top_k": max(1, routed_top_k(config) or 1),
        "experts": _get(config, "num_local_experts", "n_routed_experts", "num_experts") or 1,
        "vocab": _get(config, "vocab_size") or 0,
    }


def config_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The compute dtype ``config.json`` names (``dtype``, formerly ``torch_dtype``); float32 when it names none,
    as transformers does."""
    for scope in (config.get("text_config") or {}, config):
        name = scope.get("dtype") or scope.get("torch_dtype")
        value = getattr(torch, name, None) if isinstance(name, str) else None
        if isinstance(value, torch.dtype):
            return value
    return torch.float32


def kv_cache_bytes(config: Mapping[str, Any] | Any, dtype: torch.dtype, tokens: int) -> int:
    """Keys and values of ``tokens`` positions in every layer, in ``dtype``."""
    s = _shape(config)
    size = torch.empty((), dtype=dtype).element_size()
    return s["layers"] * s["kv_heads"] * (s["k_dim"] + s["v_dim"]) * tokens * size


def forward_bytes(config: Mapping[str, Any] | Any, dtype: torch.dtype, tokens: int) -> int:
    """Peak short-lived memory of one forward over ``tokens`` new positions (twice one layer's activations)."""
    s = _shape(config)
    size = torch.empty((), dtype=dtype).element_size()
    hidden, k = s["hidden"], s["top_k"]
    # Residual stream, its norm, the attention's input and output, queries and keys/values (grouped heads
    # repeated to the query heads), all in the compute dtype.
    attention = 4 * hidden + s["heads"] * (2 * s["k_dim"] + s["v_dim"])
    # The MoE block: each token's rows repeated top_k times, their outputs and weighted outputs; an expert's
    # gate, up and activation for each of them; router logits in float32; a shared or dense MLP beside it.
    moe = (
        3 * k * hidden
        + 3 * k * s["expert_ffn"]
        + 2 * s["experts"]
        + 3 * max(s["shared"] * s["expert_ffn"], 0)
    )
    dense = 3 * s["dense_ffn"]
    per_token = (attention + max(moe, dense)) * size
    # Logits of the last position in float32, and their softmax/argmax copy.
    logits = 2 * s["vocab"] * 4
    return 2 * (tokens * per_token + logits)


def activation_bytes(
    config: Mapping[str, Any] | Any, dtype: torch.dtype, context: int = DEFAULT_CONTEXT
) -> int:
    """What the auto budget reserves for running the model: the KV cache of ``context`` tokens and the forward
    of a prompt that long."""
    return kv_cache_bytes(config, dtype, context) + forward_bytes(config, dtype, context)
