"""Where every expert's bytes are: ExpertKey -> tensor slices (file, offset, nbytes, dtype, shape).

Nothing here knows about model classes. Which tensors are experts is decided by a *naming*: a function from
a tensor's name to its :class:`ExpertName` (layer, expert or None for fused, role), or None for a non-expert
tensor. The model side derives one from transformers' own modules and conversion mapping
(``expertflow.model.discovery``); without a model, :func:`name_by_pattern` recognises the common convention:

* one tensor per expert: ``...layers.{L}.(mlp|block_sparse_moe).experts.{E}.{name}`` (Mixtral ``w1/w2/w3``,
  Qwen/OLMoE/DeepSeek/Phi-MoE ``{gate,up,down}_proj``);
* fused 3-D tensors holding every expert of a layer: ``...layers.{L}.mlp.experts.{name}`` with the expert
  index as the leading dimension (GPT-OSS ``gate_up_proj``, ``down_proj`` and biases). One expert is then a
  contiguous slice of the fused tensor.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from expertflow.core import DTYPE_SIZES, INDEX_PATTERN, ExpertKey
from expertflow.errors import CheckpointError

__all__ = [
    "DTYPE_SIZES",
    "ExpertKey",
    "ExpertLayout",
    "ExpertName",
    "ExpertSpec",
    "Naming",
    "TensorInfo",
    "TensorKind",
    "TensorSlice",
]


class TensorKind(Enum):
    """What a non-expert tensor is, for reporting and sizing."""

    SHARED_EXPERT = "shared_expert"
    ROUTER = "router"
    DENSE_MLP = "dense_mlp"
    OTHER = "other"


# Canonical order of an expert's tensors inside one buffer: gate, up, down, then biases. With gate and up
# adjacent, a slot holding ``w1`` then ``w3`` is exactly the fused ``gate_up_proj`` row transformers computes on.
_ROLE_RANK: dict[str, int] = {
    # fc1/fc3/fc2 follow the w1/w3/w2 convention (gate, up, down), e.g. dots' vision experts.
    "w1": 0,
    "fc1": 0,
    "gate_proj": 0,
    "gate_up_proj": 0,
    "w3": 1,
    "fc3": 1,
    "up_proj": 1,
    "w2": 2,
    "fc2": 2,
    "down_proj": 2,
    "gate_up_proj_bias": 3,
    "up_proj_bias": 3,
    "down_proj_bias": 4,
}


def role_rank(role: str) -> tuple[int, str]:
    """Sort key that puts an expert's tensors in canonical (gate, up, down, biases, others) order."""
    short = role[: -len(".weight")] if role.endswith(".weight") else role
    return (_ROLE_RANK.get(short, 9), role)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored in a safetensors file. ``offset`` is absolute in the file."""

    name: str
    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorSlice:
    """The bytes of one tensor of one expert on disk.

    ``role`` is the tensor's name inside the expert (``w1.weight``, ``gate_up_proj``...); ``source`` is the
    checkpoint tensor holding it (the fused tensor for fused layouts). ``offset`` is absolute in ``file``.
    """

    role: str
    source: str
    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: its tensor slices in canonical order and their offsets in a packed host buffer."""

    key: ExpertKey
    tensors: tuple[TensorSlice, ...]
    offsets: tuple[int, ...]
    nbytes: int
    checksum: int | None = None

    def views(self) -> Iterator[tuple[TensorSlice, int]]:
        """Each tensor with its byte offset inside the packed buffer."""
        return zip(self.tensors, self.offsets)


def pack_offsets(tensors: Iterable[TensorSlice]) -> tuple[tuple[int, ...], int]:
    """Offsets of tensors laid out back to back, each aligned to its element size; and the total size."""
    offsets = []
    pos = 0
    for t in tensors:
        align = DTYPE_SIZES[t.dtype]
        pos = (pos + align - 1) // align * align
        offsets.append(pos)
        pos += t.nbytes
    return tuple(offsets), pos


def make_spec(key: ExpertKey, tensors: Iterable[TensorSlice], checksum: int | None = None) -> ExpertSpec:
    ordered = tuple(sorted(tensors, key=lambda t: role_rank(t.role)))
    offsets, nbytes = pack_offsets(ordered)
    return ExpertSpec(key=key, tensors=ordered, offsets=offsets, nbytes=nbytes, checksum=checksum)


@dataclass(frozen=True)
class ExpertLayout:
    """Every expert of a checkpoint and every non-expert tensor, without any tensor loaded."""

    root: str
    architecture: str
    model_type: str
    experts: Mapping[ExpertKey, ExpertSpec]
    non_expert: tuple[tuple[TensorInfo, TensorKind], ...]
    files: tuple[str, ...]
    packed: bool = False
    config: Mapping[str, object] = field(default_factory=dict, compare=False)
    #: A quantized pack's scheme (``QuantScheme.to_json``); None when experts are stored as the model holds them.
    quantization: Mapping[str, object] | None = None
    #: A pack's quantized non-expert linears: the scheme (``QuantScheme.to_json``) and ``weights``, ``{tensor name:
    #: [out, in]}`` (each stored as ``<name>.<suffix>`` tensors). None when every non-expert weight is as the model
    #: holds it.
    non_expert_quantization: Mapping[str, object] | None = field(default=None, compare=False)
    #: Bytes a slot must hold at least, beyond the largest stored expert: a conversion at fill (pre-quantized
    #: experts into a kernel's layout) may write a larger form than the stored one. Not part of the structure.
    slot_floor: int = field(default=0, compare=False)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(sorted({k.layer for k in self.experts}))

    def experts_per_layer(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for k in self.experts:
            counts[k.layer] = counts.get(k.layer, 0) + 1
        return dict(sorted(counts.items()))

    def keys(self, layer: int | None = None) -> list[ExpertKey]:
        keys = sorted(self.experts)
        return keys if layer is None else [k for k in keys if k.layer == layer]

    def spec(self, key: ExpertKey) -> ExpertSpec:
        try:
            return self.experts[key]
        except KeyError:
            raise CheckpointError(f"no expert {key} in this checkpoint", file=self.root) from None

    @property
    def expert_bytes(self) -> int:
        return sum(s.nbytes for s in self.experts.values())

    @property
    def non_expert_bytes(self) -> int:
        return sum(t.nbytes for t, _ in self.non_expert)

    @property
    def max_expert_nbytes(self) -> int:
        return max((s.nbytes for s in self.experts.values()), default=0)

    def fingerprint(self) -> str:
        """Hash of the expert layout (model type, roles, dtypes, shapes, sizes): equal iff the structure is.

        File names and offsets are left out so that a packed copy of a checkpoint has the fingerprint of its
        source. Checksums and weights are left out too (a pack has checksums, its source has none): two
        checkpoints with the same expert shapes but other weights share a fingerprint.
        """
        h = hashlib.sha256()
        h.update(self.model_type.encode())
        if self.quantization is not None:
            h.update(json.dumps(dict(self.quantization), sort_keys=True).encode())
        for key in sorted(self.experts):
            spec = self.experts[key]
            entry = [
                key.layer,
                key.expert,
                [[t.role, t.dtype, list(t.shape), t.nbytes] for t in spec.tensors],
            ]
            h.update(json.dumps(entry, separators=(",", ":")).encode())
        return h.hexdigest()[:32]


# --- recognising expert tensors by name ------------------------------------------------------------

# Indices are INDEX_PATTERN (bounded ASCII digits): a name with anything else there is not an expert's.
_PER_EXPERT = re.compile(
    rf"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>{INDEX_PATTERN})\.(?:mlp|block_sparse_moe|feed_forward)\.experts)"
    rf"\.(?P<expert>{INDEX_PATTERN})\.(?P<role>.+)$"
)
_FUSED = re.compile(
    rf"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>{INDEX_PATTERN})\.(?:mlp|block_sparse_moe|feed_forward)\.experts)"
    r"\.(?P<role>[A-Za-z_][A-Za-z0-9_]*)$"
)
_SHARED = re.compile(r"\.(shared_expert|shared_experts|shared_mlp)(\.|$)")
_ROUTER = re.compile(r"\.(gate|router|shared_expert_gate)\.(weight|bias|e_score_correction_bias)$")
_DENSE_MLP = re.compile(rf"layers\.{INDEX_PATTERN}\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


class ExpertName(NamedTuple):
    """What a naming says of an expert tensor: its MoE layer, its expert (None: a fused tensor whose leading
    dimension is the expert) and its role inside one expert (``w1.weight``, ``gate_up_proj``...)."""

    layer: int
    expert: int | None
    role: str


#: Tensor name -> its :class:`ExpertName`, or None for a tensor that is not an expert's.
Naming = Callable[[str], ExpertName | None]


def name_by_pattern(name: str) -> ExpertName | None:
    """The model-free naming: ``...layers.{L}.(mlp|block_sparse_moe|feed_forward).experts.[{E}.]{role}``."""
    m = _PER_EXPERT.match(name)
    if m:
        return ExpertName(int(m["layer"]), int(m["expert"]), m["role"])
    m = _FUSED.match(name)
    if m:
        return ExpertName(int(m["layer"]), None, m["role"])
    return None


def classify_non_expert(name: str) -> TensorKind:
    if _SHARED.search(name):
        return TensorKind.SHARED_EXPERT
    if _ROUTER.search(name):
        return TensorKind.ROUTER
    if _DENSE_MLP.search(name):
        return TensorKind.DENSE_MLP
    return TensorKind.OTHER


def build_layout(
    tensors: Iterable[TensorInfo],
    *,
    root: str,
    config: Mapping[str, object],
    files: Iterable[str],
    naming: Naming = name_by_pattern,
) -> ExpertLayout:
    """Split a checkpoint's tensors into experts and non-expert weights (by ``naming``), checking consistency.

    Raises :class:`CheckpointError` when experts of one layer disagree in shape or dtype, a fused tensor's
    leading dimension is not the layer's expert count, or an expert has a hole in its tensor set.
    """
    per_key: dict[ExpertKey, list[TensorSlice]] = {}
    non_expert: list[tuple[TensorInfo, TensorKind]] = []
    fused_by_layer: dict[int, list[tuple[str, TensorInfo]]] = {}
    for t in tensors:
        named = naming(t.name)
        if named is not None and named.expert is not None:
            key = ExpertKey(named.layer, named.expert)
            per_key.setdefault(key, []).append(
                TensorSlice(named.role, t.name, t.file, t.offset, t.nbytes, t.dtype, t.shape)
            )
            continue
        if named is not None and len(t.shape) >= 2:
            fused_by_layer.setdefault(named.layer, []).append((named.role, t))
            continue
        non_expert.append((t, classify_non_expert(t.name)))

    for layer, named_fused in fused_by_layer.items():
        fused = [t for _, t in named_fused]
        counts = {t.shape[0] for t in fused}
        if len(counts) != 1:
            raise CheckpointError(
                f"fused expert tensors of layer {layer} disagree on the expert count: "
                + ", ".join(f"{t.name}{list(t.shape)}" for t in fused),
                file=fused[0].file,
            )
        n = counts.pop()
        if n == 0:
            raise CheckpointError(
                "fused expert tensor holds no experts (leading dimension 0)",
                file=fused[0].file,
                tensor=fused[0].name,
            )
        for role, t in named_fused:
            if t.nbytes % n:
                raise CheckpointError(
                    f"fused tensor of {t.nbytes} bytes does not split into {n} experts",
                    file=t.file,
                    tensor=t.name,
                )
            step = t.nbytes // n
            for e in range(n):
                per_key.setdefault(ExpertKey(layer, e), []).append(
                    TensorSlice(role, t.name, t.file, t.offset + e * step, step, t.dtype, tuple(t.shape[1:]))
                )

    specs = {key: make_spec(key, slices) for key, slices in per_key.items()}
    _check_uniform(specs, root)
    model_type = str(config.get("model_type", "unknown"))
    archs = config.get("architectures") or [model_type]
    architecture = str(archs[0]) if isinstance(archs, list) and archs else model_type
    return ExpertLayout(
        root=root,
        architecture=architecture,
        model_type=model_type,
        experts=dict(sorted(specs.items())),
        non_expert=tuple(sorted(non_expert, key=lambda p: p[0].name)),
        files=tuple(files),
        config=dict(config),
    )


def _check_uniform(specs: Mapping[ExpertKey, ExpertSpec], root: str) -> None:
    """Every expert of a layer must have the same tensors (roles, dtypes, shapes), and ids must be 0..n-1."""
    by_layer: dict[int, list[ExpertSpec]] = {}
    for spec in specs.values():
        by_layer.setdefault(spec.key.layer, []).append(spec)
    for layer, layer_specs in by_layer.items():
        layer_specs.sort(key=lambda s: s.key)
        ids = [s.key.expert for s in layer_specs]
        if ids != list(range(len(ids))):
            present = set(ids)
            # The first few gaps, without materialising range(max(ids)): a crafted id can be huge.
            missing = [i for i in range(min(max(ids) + 1, len(ids) + 8)) if i not in present]
            raise CheckpointError(f"layer {layer} is missing experts {missing[:8]}", file=root)
        ref = layer_specs[0]
        ref_sig = [(t.role, t.dtype, t.shape) for t in ref.tensors]
        for spec in layer_specs[1:]:
            sig = [(t.role, t.dtype, t.shape) for t in spec.tensors]
            if sig != ref_sig:
                raise CheckpointError(
                    f"expert {spec.key} has tensors {sig}, but expert {ref.key} has {ref_sig}",
                    file=spec.tensors[0].file if spec.tensors else root,
                )
