"""The shared vocabulary every part of ExpertFlow speaks: expert keys, dtypes, checksums, alignment, slot size.

This module is the bottom of the dependency graph: it imports nothing of ExpertFlow but its error types, and
``tiers``, ``pipeline``, ``services`` and ``model`` all import it. Anything two of them must agree on bit for
bit (what a key is, how a dtype code maps to torch, what a checksum covers, how big a slot is) lives here
exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from expertflow.errors import CheckpointError

#: Alignment of every expert buffer and slot: what O_DIRECT needs, and a page.
BLOCK = 4096


@dataclass(frozen=True, order=True)
class ExpertKey:
    """One routed expert: its model layer index and its expert index within that layer."""

    layer: int
    expert: int

    def __str__(self) -> str:
        return f"L{self.layer}.E{self.expert}"


# safetensors dtype code -> element size in bytes.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# safetensors dtype code <-> torch dtype.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code; :class:`CheckpointError` for one torch lacks."""
    try:
        return TORCH_DTYPES[code]
    except KeyError:
        raise CheckpointError(f"dtype {code!r} has no torch equivalent") from None


Buffer = bytes | bytearray | memoryview


def checksum_seed(key: ExpertKey) -> int:
    """The xxh3 seed that binds an expert's checksum to its key: ``layer`` in the high 32 bits, ``expert`` low."""
    return ((key.layer & 0xFFFFFFFF) << 32) | (key.expert & 0xFFFFFFFF)


def expert_checksum(key: ExpertKey, data: Buffer | Iterable[Buffer]) -> int:
    """xxh3-64, seeded by ``key``, of one buffer or of several buffers taken in order as one byte string.

    The seed binds the value to the expert: another expert's bytes, or its recorded checksum moved to this key
    (a swapped manifest entry, a relabelled reply), never verify. Hashing runs at ~10+ GB/s.
    """
    h = xxhash.xxh3_64(seed=checksum_seed(key))
    if isinstance(data, (bytes, bytearray, memoryview)):
        h.update(data)
    else:
        for part in data:
            h.update(part)
    return h.intdigest()


#: A layer or expert index in a tensor name: ASCII digits, at most 9 of them. A crafted name with a huge number
#: must not become a huge int (or a ValueError from Python's int-string limit), and ``str.isdigit`` also
#: accepts characters ``int`` refuses (``"²"``): such a component is simply not an index.
INDEX_PATTERN = r"[0-9]{1,9}"


def name_index(component: str) -> int | None:
    """The index one dotted-name component holds (``"12"`` -> 12), or None when it holds none."""
    if 0 < len(component) <= 9 and component.isascii() and component.isdigit():
        return int(component)
    return None


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def slot_nbytes(needs: Iterable[int]) -> int:
    """Size of one expert slot (host buffer or device slot): the largest need, rounded up to :data:`BLOCK`.

    ``needs`` are the bytes each party needs to hold any one expert: the expert's own size, and what each
    source needs to receive one (a direct read's aligned extent can be larger than the expert). This is the
    one place slot size is decided; budgets, the store, ``inspect`` and the benchmarks all go through it.
    """
    largest = max(needs, default=0)
    if largest <= 0:
        raise ValueError("an expert slot must hold at least one byte")
    return round_up(largest, BLOCK)


#: Names model configs use for "experts per token", in order of preference.
TOP_K_NAMES = ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k", "top_k_experts")


def routed_top_k(config: Mapping[str, Any] | Any) -> int | None:
    """Experts each token routes to, from a ``config.json`` mapping or a transformers config object.

    A vision-language model's ``text_config`` is looked at first. Returns the raw value (which may be invalid,
    e.g. 0 or negative: callers validate it) or None when the config names none.
    """

    def get(scope: Any, name: str) -> Any:
        return scope.get(name) if isinstance(scope, Mapping) else getattr(scope, name, None)

    text = get(config, "text_config")
    for scope in (text, config) if text is not None else (config,):
        for name in TOP_K_NAMES:
            value = get(scope, name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def cache_dir() -> Path:
    """Where ExpertFlow keeps what it can rebuild (family checks, checksums of local experts, compiled kernels):
    ``$EXPERTFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/expertflow``, else ``~/.cache/expertflow``."""
    explicit = os.environ.get("EXPERTFLOW_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "expertflow"
