"""The ExpertFlow pack: an expert-major, 4 KiB-aligned copy of a checkpoint's experts.

A pack directory holds:

* ``experts.bin``: every expert's tensors back to back in canonical order, at exactly the offsets of
  :class:`~expertflow.tiers.layout.ExpertSpec` relative to the expert's first byte, each expert starting on a
  4 KiB boundary. A direct (``O_DIRECT``) read of an expert is then one aligned read with nothing to move.
* ``model.safetensors``: the non-expert weights (embeddings, attention, routers, shared experts...). A pack
  written with a non-expert scheme holds some linears' weights as that scheme's tensors instead
  (``<name>.weight.qweight`` ...; the manifest's ``non_expert_quantization`` lists them with their shapes).
* ``config.json`` and the tokenizer / generation files of the source, copied.
* ``expertflow-manifest.json``: where each expert is, its tensors, and an xxh3-64 checksum of its bytes.

A pack is built in a hidden temporary directory beside the destination, every file is fsynced, the manifest is
written last and the directory is renamed into place: a pack that exists is complete.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm import tqdm

from expertflow.core import BLOCK, DTYPE_SIZES, SAFETENSORS_CODES, ExpertKey, round_up, torch_dtype
from expertflow.errors import CheckpointError, UnsupportedModelError
from expertflow.quant.scheme import QuantScheme, check_tensors, quantize
from expertflow.tiers.checksum import spec_checksum
from expertflow.tiers.layout import (
    ExpertLayout,
    ExpertSpec,
    TensorInfo,
    TensorKind,
    TensorSlice,
    _check_uniform,
    classify_non_expert,
    make_spec,
    pack_offsets,
    role_rank,
)
from expertflow.tiers.local_checksums import FILE_NAME as CHECKSUMS_NAME
from expertflow.tiers.nvme import NvmeTier, buffer_address
from expertflow.tiers.safetensors_index import (
    INDEX_NAME,
    PACK_DATA_NAME,
    PACK_MANIFEST_NAME,
    read_config,
    read_header,
    read_json_file,
)

FORMAT = "expertflow-pack"
FORMAT_VERSION = 2  # 2: expert checksums are seeded by the expert key (core.expert_checksum)
DATA_NAME = PACK_DATA_NAME
NON_EXPERT_NAME = "model.safetensors"
ALIGNMENT = BLOCK
# Weight files of any format are never copied into a pack; everything else at the top level (config,
# tokenizer, generation config, chat template, licence...) travels with it.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


# --- writing ---------------------------------------------------------------------------------------


def pack_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    progress: bool = True,
    layout: ExpertLayout | None = None,
) -> Path:
    """Convert the checkpoint at ``src`` into a pack at ``dst`` (which must not exist, or be empty).

    ``layout`` says which tensors of ``src`` are experts when the caller found them (e.g. from the model);
    by default the model-free naming does.

    Returns the pack's path. Raises :class:`CheckpointError` for a bad source or destination and
    :class:`UnsupportedModelError` when the source has no routed experts.
    """
    from expertflow.tiers.safetensors_index import open_checkpoint

    source = Path(src)
    layout = layout or open_checkpoint(source)
    if not layout.experts:
        raise UnsupportedModelError(
            f"{layout.architecture} has no routed experts: there is nothing to pack", file=str(source)
        )
    return write_pack(layout, source, dst, lambda path: _write_experts(layout, path, progress))


def write_pack(
    layout: ExpertLayout,
    source: Path,
    dst: str | os.PathLike[str],
    write_experts: Callable[[Path], list[dict[str, Any]]],
    *,
    quantization: Mapping[str, Any] | None = None,
    non_experts: NonExpertScheme | None = None,
) -> Path:
    """Build a pack at ``dst`` from ``source``: ``write_experts(path)`` writes ``experts.bin`` and returns its
    manifest entries; the non-expert tensors of ``layout`` and the side files are copied (the weights
    ``non_experts`` names quantized to its scheme). Atomic (see above)."""
    target = Path(dst)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError("pack destination exists and is not an empty directory", file=str(target))
    if target.resolve() == source.resolve():
        raise CheckpointError("pack destination is the source directory", file=str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        entries = write_experts(tmp / DATA_NAME)
        _write_non_experts(layout, tmp / NON_EXPERT_NAME, non_experts)
        _copy_side_files(source, tmp)
        manifest = _manifest(layout, entries, (tmp / DATA_NAME).stat().st_size, quantization)
        if non_experts is not None:
            manifest["non_expert_quantization"] = non_experts.to_json()
        _write_durably(tmp / PACK_MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        if target.exists():
            target.rmdir()  # empty, checked above; rename() cannot replace a directory on every platform
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class ExpertBlockWriter:
    """Appends experts given as tensors to ``experts.bin``: canonical order, 4 KiB-aligned, checksummed."""

    def __init__(self, out: BinaryIO, path: Path) -> None:
        self.out = out
        self.path = str(path)
        self.pos = 0
        self.entries: list[dict[str, Any]] = []

    def add(self, key: ExpertKey, tensors: list[tuple[str, str, Any]]) -> None:
        """``tensors``: (role, source name, contiguous CPU torch tensor) of one expert."""
        slices = [
            TensorSlice(role, src, self.path, 0, t.numel() * t.element_size(), _st_dtype(t), tuple(t.shape))
            for role, src, t in tensors
        ]
        spec = make_spec(key, slices)
        data = {role: t for role, _, t in tensors}
        span = round_up(max(spec.nbytes, 1), ALIGNMENT)
        buf = bytearray(span)
        for t, off in spec.views():
            raw = data[t.role].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            buf[off : off + t.nbytes] = raw
        _write_block(self.out, memoryview(buf))
        self.entries.append(_expert_entry(spec, self.pos, spec_checksum(spec, buf)))
        self.pos += span


def _st_dtype(t: Any) -> str:
    code = SAFETENSORS_CODES.get(t.dtype)
    if code is None:
        raise CheckpointError(f"no safetensors dtype for {t.dtype}")
    return code


def _write_experts(layout: ExpertLayout, path: Path, progress: bool) -> list[dict[str, Any]]:
    """Write every expert to ``path`` at 4 KiB-aligned offsets; the manifest entries of what was written."""
    entries: list[dict[str, Any]] = []
    show = progress and sys.stderr.isatty()
    with (
        NvmeTier(layout, "mmap") as tier,
        open(path, "wb") as out,
        tqdm(
            total=layout.expert_bytes, unit="B", unit_scale=True, desc="packing experts", disable=not show
        ) as bar,
    ):
        # A plain bytearray, not an mmap: if a write fails, the traceback may still hold views of it, and
        # nothing here must then fail to close over the real error. (mmap-mode reads need no alignment.)
        scratch = bytearray(round_up(max(layout.max_expert_nbytes, 1), ALIGNMENT))
        buf = memoryview(scratch)
        base = buffer_address(buf)
        pos = 0
        for key in sorted(layout.experts):
            spec = layout.spec(key)
            span = round_up(spec.nbytes, ALIGNMENT)
            # Padding must be zero in the file: clear what the previous expert left in the scratch buffer.
            ctypes.memset(base, 0, span)
            tier.read_into(key, buf)
            _write_block(out, buf[:span])
            entries.append(_expert_entry(spec, pos, spec_checksum(spec, buf)))
            pos += span
            bar.update(spec.nbytes)
        out.flush()
        os.fsync(out.fileno())
    return entries


#: Written bytes flushed to disk this often: dirty pages of a pack larger than memory must not pile up (a memory
#: cgroup charges them, and cannot reclaim them until they are written).
SYNC_EVERY = 64 << 20


def _write_block(out: BinaryIO, data: memoryview) -> None:
    """One expert's aligned span (tensors and zero padding) appended to ``experts.bin``."""
    before = out.tell()
    out.write(data)
    if before // SYNC_EVERY != out.tell() // SYNC_EVERY:
        out.flush()
        os.fdatasync(out.fileno())


def _expert_entry(spec: ExpertSpec, offset: int, checksum: int) -> dict[str, Any]:
    return {
        "layer": spec.key.layer,
        "expert": spec.key.expert,
        "offset": offset,
        "nbytes": spec.nbytes,
        "checksum": f"{checksum:016x}",
        "tensors": [
            {
                "role": t.role,
                "source": t.source,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "offset": off,
                "nbytes": t.nbytes,
            }
            for t, off in spec.views()
        ],
    }


#: Bytes copied at a time: a pack is written with a fixed amount of memory, whatever the model's size.
COPY_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class NonExpertScheme:
    """Which non-expert weights a pack stores quantized: ``{tensor name: (out, in)}``, all with ``scheme``."""

    scheme: QuantScheme
    weights: Mapping[str, tuple[int, int]]

    def to_json(self) -> dict[str, Any]:
        return {**self.scheme.to_json(), "weights": {k: list(v) for k, v in sorted(self.weights.items())}}


def _write_non_experts(layout: ExpertLayout, path: Path, non_experts: NonExpertScheme | None = None) -> None:
    """The non-expert tensors as one safetensors file, streamed: the header first, then each tensor's bytes
    copied from its source file in chunks (never a whole tensor in memory), except the weights ``non_experts``
    quantizes, which are read one at a time, quantized, and written as the scheme's tensors."""
    infos = sorted((info for info, _kind in layout.non_expert), key=lambda i: i.name)
    quantized = dict(non_experts.weights) if non_experts is not None else {}
    missing = sorted(set(quantized) - {i.name for i in infos})
    if missing:
        raise CheckpointError(f"no non-expert tensor {missing[0]} to quantize", file=layout.root)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in infos:
        if info.name in quantized:
            assert non_experts is not None
            for suffix, dtype, shape in non_experts.scheme.parts(*quantized[info.name], info.dtype):
                nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
                header[f"{info.name}.{suffix}"] = {
                    "dtype": dtype,
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            continue
        header[info.name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the data 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        files: dict[str, BinaryIO] = {}
        try:
            for info in infos:
                src = files.get(info.file)
                if src is None:
                    src = files[info.file] = open(info.file, "rb")  # noqa: SIM115 - closed below
                if info.name in quantized:
                    assert non_experts is not None
                    _write_quantized(out, src, info, non_experts.scheme, header)
                    continue
                src.seek(info.offset)
                left = info.nbytes
                while left:
                    chunk = src.read(min(left, COPY_CHUNK))
                    if not chunk:
                        raise CheckpointError("file ended inside a tensor", file=info.file, tensor=info.name)
                    _write_block(out, memoryview(chunk))
                    left -= len(chunk)
        finally:
            for f in files.values():
                f.close()
        out.flush()
        os.fsync(out.fileno())


def _write_quantized(
    out: BinaryIO, src: BinaryIO, info: TensorInfo, scheme: QuantScheme, header: Mapping[str, Any]
) -> None:
    """One weight quantized and written as the tensors the header announced for it, a block of rows at a time:
    both schemes quantize rows independently (int4's layout in blocks of 64 rows), so memory stays bounded by
    the block, not by the weight (an output head can be a GB). ``qweight`` streams out; the small scale tensors
    are gathered and written after it, in the header's order."""
    rows, cols = (int(n) for n in info.shape)
    dtype = torch_dtype(info.dtype)
    row_bytes = cols * dtype.itemsize
    block = max(64, COPY_CHUNK // row_bytes // 64 * 64)
    gathered: dict[str, list[torch.Tensor]] = {}
    for r0 in range(0, rows, block):
        n = min(block, rows - r0)
        src.seek(info.offset + r0 * row_bytes)
        raw = bytearray(src.read(n * row_bytes))
        if len(raw) != n * row_bytes:
            raise CheckpointError("file ended inside a tensor", file=info.file, tensor=info.name)
        parts = quantize(torch.frombuffer(raw, dtype=dtype).view(n, cols), scheme, dtype)
        _write_block(out, memoryview(parts.pop("qweight").contiguous().view(torch.uint8).numpy().tobytes()))
        for suffix, tensor in parts.items():
            gathered.setdefault(suffix, []).append(tensor)
    for suffix, pieces in gathered.items():
        # int4 (scale, zero) are [in / group, out, 2]: blocks of rows join along the output dimension.
        tensor = torch.cat(pieces, dim=1 if suffix == "qparams" else 0).contiguous()
        entry = header[f"{info.name}.{suffix}"]
        # The header was written from the scheme's declared shapes; a disagreement would corrupt the file.
        if list(tensor.shape) != entry["shape"] or SAFETENSORS_CODES[tensor.dtype] != entry["dtype"]:
            raise AssertionError(
                f"{info.name}.{suffix}: quantized to {tensor.dtype} {list(tensor.shape)}, "
                f"declared {entry['dtype']} {entry['shape']}"
            )
        _write_block(out, memoryview(tensor.view(torch.uint8).reshape(-1).numpy().tobytes()))


def _copy_side_files(source: Path, dst: Path) -> None:
    """config.json, tokenizer and generation files: every top-level non-weight file of the source."""
    for f in sorted(source.iterdir()):
        skip = (INDEX_NAME, PACK_MANIFEST_NAME, CHECKSUMS_NAME)  # a pack has its own, key-bound checksums
        if not f.is_file() or f.name in skip or f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(f, dst / f.name)
        with open(dst / f.name, "rb+") as g:
            os.fsync(g.fileno())


def _manifest(
    layout: ExpertLayout,
    entries: list[dict[str, Any]],
    data_nbytes: int,
    quantization: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    fingerprint = layout.fingerprint()
    if quantization is not None:
        # The quantized experts are not the source's: the fingerprint is of what the pack holds (its scheme as
        # the reader normalises it; the manifest also describes the layout, for people).
        written = {
            spec.key: spec
            for spec in (_parse_expert(e, i, "", sys.maxsize, "") for i, e in enumerate(entries))
        }
        scheme = QuantScheme.from_json(quantization, "").to_json()
        fingerprint = dataclasses.replace(layout, experts=written, quantization=scheme).fingerprint()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "alignment": ALIGNMENT,
        "fingerprint": fingerprint,
        "model_type": layout.model_type,
        "architecture": layout.architecture,
        "source": {"root": layout.root, "files": [os.path.basename(f) for f in layout.files]},
        "data_file": DATA_NAME,
        "data_nbytes": data_nbytes,
        "non_expert_file": NON_EXPERT_NAME,
        "checksum": "xxh3-64 seeded by (layer << 32 | expert), of the expert's tensor bytes in order, padding excluded",
        "experts": entries,
    }
    if quantization is not None:
        manifest["quantization"] = dict(quantization)
    return manifest


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading ---------------------------------------------------------------------------------------


def load_packed_layout(root: str | os.PathLike[str]) -> ExpertLayout:
    """The layout of a pack directory, with every manifest field checked against ``experts.bin``.

    Raises :class:`CheckpointError` naming the manifest (and the expert or tensor) for anything inconsistent:
    wrong types, an unknown format version, offsets outside ``experts.bin`` or not aligned, overlapping
    experts, byte counts that disagree with dtype and shape, or a fingerprint that does not match the entries.
    """
    root_path = Path(root).resolve()
    manifest_path = root_path / PACK_MANIFEST_NAME
    where = str(manifest_path)
    manifest = _read_manifest(manifest_path, where)
    model_type = _get(manifest, "model_type", str, where)
    architecture = _get(manifest, "architecture", str, where)
    fingerprint = _get(manifest, "fingerprint", str, where)
    data_name = _get(manifest, "data_file", str, where)
    non_expert_name = _get(manifest, "non_expert_file", str, where)
    data_file = _inside(root_path, data_name, where)
    non_expert_file = _inside(root_path, non_expert_name, where)
    size = _data_file_size(data_file, _get(manifest, "data_nbytes", int, where))
    specs = _parse_experts(manifest, str(data_file), size, where)
    config = read_config(root_path)
    quantization = _parse_quantization(manifest, specs, where)
    non_expert = _non_expert_tensors(non_expert_file)
    layout = ExpertLayout(
        root=str(root_path),
        architecture=architecture,
        model_type=model_type,
        experts=dict(sorted(specs.items())),
        non_expert=non_expert,
        files=(str(data_file), str(non_expert_file)),
        packed=True,
        config=config,
        quantization=quantization,
        non_expert_quantization=_parse_non_expert_quantization(manifest, non_expert, where),
    )
    if layout.fingerprint() != fingerprint:
        raise CheckpointError(
            f"manifest fingerprint {fingerprint} does not match its expert entries ({layout.fingerprint()}): "
            "the manifest was edited",
            file=where,
        )
    return layout


def _parse_quantization(
    manifest: Mapping[str, Any], specs: Mapping[ExpertKey, ExpertSpec], where: str
) -> dict[str, Any] | None:
    """A quantized pack's scheme, checked against the tensors of each layer's experts (uniform per layer)."""
    raw = manifest.get("quantization")
    if raw is None:
        return None
    scheme = QuantScheme.from_json(raw, where)
    seen: set[int] = set()
    for key, spec in sorted(specs.items()):
        if key.layer in seen:
            continue
        seen.add(key.layer)
        check_tensors(scheme, {t.role: (t.dtype, t.shape, t.source) for t in spec.tensors}, file=where)
    return scheme.to_json()


def _parse_non_expert_quantization(
    manifest: Mapping[str, Any], tensors: tuple[tuple[TensorInfo, TensorKind], ...], where: str
) -> dict[str, Any] | None:
    """The quantized non-expert linears of a pack, each checked against the tensors its scheme makes."""
    raw = manifest.get("non_expert_quantization")
    if raw is None:
        return None
    scheme = QuantScheme.from_json(raw, where)
    weights = raw.get("weights") if isinstance(raw, Mapping) else None
    if not isinstance(weights, Mapping) or not weights:
        raise CheckpointError("manifest 'non_expert_quantization' lists no weights", file=where)
    by_name = {t.name: t for t, _ in tensors}
    checked: dict[str, list[int]] = {}
    for name, shape in weights.items():
        if not (
            isinstance(name, str)
            and isinstance(shape, list)
            and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        ):
            raise CheckpointError(
                f"manifest 'non_expert_quantization': bad entry {name!r}: {shape!r}", file=where
            )
        scale_part = "qparams" if scheme.bits == 4 else "scales"
        scale = by_name.get(f"{name}.{scale_part}")
        if scale is None:
            raise CheckpointError(f"the non-expert file has no {name}.{scale_part}", file=where, tensor=name)
        for suffix, dtype, expected in scheme.parts(shape[0], shape[1], scale.dtype):
            info = by_name.get(f"{name}.{suffix}")
            if info is None or info.dtype != dtype or tuple(info.shape) != tuple(expected):
                found = "missing" if info is None else f"{info.dtype} {list(info.shape)}"
                raise CheckpointError(
                    f"quantized {name}.{suffix} is {found}, but {scheme.name} of a {shape} weight makes it "
                    f"{dtype} {list(expected)}",
                    file=where,
                    tensor=f"{name}.{suffix}",
                )
        checked[name] = list(shape)
    return {**scheme.to_json(), "weights": checked}


def _read_manifest(manifest_path: Path, where: str) -> dict[str, Any]:
    """The manifest as a JSON object, once its format, version and alignment are ones this code reads."""
    manifest = read_json_file(manifest_path, "pack manifest")
    if not isinstance(manifest, dict):
        raise CheckpointError("pack manifest is not a JSON object", file=where)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"not an ExpertFlow pack manifest (format {manifest.get('format')!r})", file=where
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"pack format version {manifest.get('version')!r} is not supported (this ExpertFlow reads "
            f"version {FORMAT_VERSION}); re-run `expertflow pack` on the original checkpoint",
            file=where,
        )
    if manifest.get("alignment") != ALIGNMENT:
        raise CheckpointError(f"pack alignment {manifest.get('alignment')!r} is not {ALIGNMENT}", file=where)
    return manifest


def _data_file_size(data_file: Path, declared: int) -> int:
    """The size of ``experts.bin``, which must be the one the manifest declares."""
    try:
        size = data_file.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"pack data file is missing: {exc.strerror}", file=str(data_file)) from exc
    if size != declared:
        raise CheckpointError(
            f"pack data file has {size} bytes, the manifest records {declared} (truncated or replaced?)",
            file=str(data_file),
        )
    return size


def _parse_experts(
    manifest: Mapping[str, Any], data_file: str, size: int, where: str
) -> dict[ExpertKey, ExpertSpec]:
    """Every expert entry of the manifest, each listed once, none overlapping, all of one shape."""
    raw_experts = manifest.get("experts")
    if not isinstance(raw_experts, list):
        raise CheckpointError("manifest 'experts' is not a list", file=where)
    specs: dict[ExpertKey, ExpertSpec] = {}
    for i, entry in enumerate(raw_experts):
        spec = _parse_expert(entry, i, data_file, size, where)
        if spec.key in specs:
            raise CheckpointError(f"expert {spec.key} is listed twice", file=where)
        specs[spec.key] = spec
    _check_no_overlap(specs, where)
    _check_uniform(specs, where)
    return specs


def _non_expert_tensors(non_expert_file: Path) -> tuple[tuple[TensorInfo, TensorKind], ...]:
    """The tensors of ``model.safetensors`` with their kind, by name."""
    return tuple(
        sorted(
            ((t, classify_non_expert(t.name)) for t in read_header(non_expert_file)), key=lambda p: p[0].name
        )
    )


def _get(obj: Mapping[str, Any], name: str, kind: type, where: str, context: str = "") -> Any:
    value: Any = obj.get(name)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok or (kind is int and value < 0):
        expected = "a non-negative integer" if kind is int else f"a {kind.__name__}"
        raise CheckpointError(
            f"{context}manifest field {name!r} is {value!r}, expected {expected}", file=where
        )
    return value


def _inside(root: Path, name: str, where: str) -> Path:
    if Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"pack file name {name!r} is not a plain file name in the pack", file=where)
    return root / name


def _parse_expert(entry: object, index: int, data_file: str, size: int, where: str) -> ExpertSpec:
    """One expert entry of the manifest, checked against the ``size`` bytes of ``data_file``."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"expert entry #{index} is not an object", file=where)
    ctx = f"expert entry #{index}: "
    key = ExpertKey(_get(entry, "layer", int, where, ctx), _get(entry, "expert", int, where, ctx))
    ctx = f"expert {key}: "
    offset = _get(entry, "offset", int, where, ctx)
    nbytes = _get(entry, "nbytes", int, where, ctx)
    checksum = _parse_checksum(_get(entry, "checksum", str, where, ctx), ctx, where)
    if offset % ALIGNMENT:
        raise CheckpointError(f"{ctx}offset {offset} is not {ALIGNMENT}-byte aligned", file=where)
    if offset + nbytes > size:
        raise CheckpointError(
            f"{ctx}bytes {offset}..{offset + nbytes} run past the end of the {size}-byte data file",
            file=where,
        )
    raw_tensors = entry.get("tensors")
    if not isinstance(raw_tensors, list) or not raw_tensors:
        raise CheckpointError(f"{ctx}'tensors' is not a non-empty list", file=where)
    parsed = [_parse_tensor(t, data_file, offset, nbytes, ctx, where) for t in raw_tensors]
    slices = [s for s, _ in parsed]
    canonical = _check_canonical(slices, [rel for _, rel in parsed], nbytes, ctx, where)
    return ExpertSpec(key=key, tensors=tuple(slices), offsets=canonical, nbytes=nbytes, checksum=checksum)


def _parse_checksum(checksum_hex: str, ctx: str, where: str) -> int:
    """The value of a checksum written as exactly 16 hex digits."""
    try:
        checksum = int(checksum_hex, 16)
    except ValueError:
        checksum = -1
    if len(checksum_hex) != 16 or checksum < 0:
        raise CheckpointError(f"{ctx}checksum {checksum_hex!r} is not 16 hex digits", file=where)
    return checksum


def _parse_tensor(
    t: object, data_file: str, offset: int, nbytes: int, ctx: str, where: str
) -> tuple[TensorSlice, int]:
    """One tensor of the expert at ``offset`` (``nbytes`` long): its slice and its offset in the expert."""
    if not isinstance(t, dict):
        raise CheckpointError(f"{ctx}a tensor entry is not an object", file=where)
    role = _get(t, "role", str, where, ctx)
    tctx = f"{ctx}tensor {role!r}: "
    source = _get(t, "source", str, where, tctx)
    dtype = _get(t, "dtype", str, where, tctx)
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{tctx}unknown dtype {dtype!r}", file=where, tensor=source)
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{tctx}shape {shape!r} is not a list of sizes", file=where, tensor=source)
    rel = _get(t, "offset", int, where, tctx)
    tbytes = _get(t, "nbytes", int, where, tctx)
    if tbytes != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise CheckpointError(
            f"{tctx}{tbytes} bytes disagree with shape {shape} of {dtype}", file=where, tensor=source
        )
    if rel + tbytes > nbytes:
        raise CheckpointError(
            f"{tctx}bytes {rel}..{rel + tbytes} run past the expert's {nbytes} bytes",
            file=where,
            tensor=source,
        )
    return TensorSlice(role, source, data_file, offset + rel, tbytes, dtype, tuple(shape)), rel


def _check_canonical(
    slices: list[TensorSlice], rel_offsets: list[int], nbytes: int, ctx: str, where: str
) -> tuple[int, ...]:
    """The canonical tensor offsets of an expert, which the manifest's roles and offsets must follow."""
    roles = [s.role for s in slices]
    if len(set(roles)) != len(roles):
        raise CheckpointError(f"{ctx}tensor roles repeat: {roles}", file=where)
    if roles != sorted(roles, key=role_rank):
        raise CheckpointError(f"{ctx}tensors are not in canonical order: {roles}", file=where)
    canonical, total = pack_offsets(slices)
    if tuple(rel_offsets) != canonical or total != nbytes:
        raise CheckpointError(
            f"{ctx}tensor offsets {rel_offsets} / size {nbytes} are not the canonical layout "
            f"{list(canonical)} / {total}",
            file=where,
        )
    return canonical


def _check_no_overlap(specs: Mapping[ExpertKey, ExpertSpec], where: str) -> None:
    ordered = sorted(specs.values(), key=lambda s: s.tensors[0].offset)
    for prev, spec in itertools.pairwise(ordered):
        prev_end = prev.tensors[0].offset + prev.nbytes
        if spec.tensors[0].offset < prev_end:
            raise CheckpointError(f"experts {prev.key} and {spec.key} overlap in the data file", file=where)
