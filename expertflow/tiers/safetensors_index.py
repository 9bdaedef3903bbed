"""Parse and validate safetensors headers (single file or sharded index) without loading a tensor.

Trusts nothing: every length, offset, dtype and shape is checked against the file before any byte of
tensor data is read, and every failure is a :class:`CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from expertflow.core import DTYPE_SIZES
from expertflow.errors import CheckpointError
from expertflow.tiers.layout import ExpertLayout, TensorInfo, build_layout

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PACK_MANIFEST_NAME = "expertflow-manifest.json"
# The reference implementation refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100_000_000


def read_header(path: str | os.PathLike[str]) -> list[TensorInfo]:
    """Tensors of one safetensors file, with absolute byte offsets, fully validated."""
    file = os.fspath(path)
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"file is {size} bytes, too short to hold a safetensors header (truncated?)", file=file
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"header length {header_len} exceeds the 100 MB limit", file=file)
            if 8 + header_len > size:
                raise CheckpointError(
                    f"header length {header_len} runs past the end of the {size}-byte file (truncated?)",
                    file=file,
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read safetensors file: {exc.strerror or exc}", file=file) from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"header is not valid UTF-8 JSON: {exc}", file=file) from exc
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object", file=file)

    data_start = 8 + header_len
    data_size = size - data_start
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not isinstance(entry, dict):
                raise CheckpointError("__metadata__ is not an object", file=file)
            continue
        tensors.append(_parse_entry(file, name, entry, data_start, data_size))

    tensors.sort(key=lambda t: t.offset)
    end = data_start
    prev: TensorInfo | None = None
    for t in tensors:
        if t.offset < end and t.nbytes > 0:
            raise CheckpointError(
                f"tensor overlaps {prev.name if prev else 'the header'} "
                f"(starts at data offset {t.offset - data_start}, previous ends at {end - data_start})",
                file=file,
                tensor=t.name,
            )
        end = max(end, t.offset + t.nbytes)
        prev = t
    return tensors


def _parse_entry(file: str, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError("header entry is not an object", file=file, tensor=name)
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"unknown dtype {dtype!r}", file=file, tensor=name)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise CheckpointError(f"shape {shape!r} is not a list of integers", file=file, tensor=name)
    if any(d < 0 for d in shape):
        raise CheckpointError(f"shape {shape} has a negative dimension", file=file, tensor=name)
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"data_offsets {offsets!r} is not a pair of integers", file=file, tensor=name)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(
            f"data_offsets {offsets} are not ordered and non-negative", file=file, tensor=name
        )
    if end > data_size:
        raise CheckpointError(
            f"data_offsets end {end} beyond the {data_size}-byte data area (truncated file?)",
            file=file,
            tensor=name,
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"shape {shape} of {dtype} needs {expected} bytes but data_offsets span {end - begin}",
            file=file,
            tensor=name,
        )
    return TensorInfo(name, file, data_start + begin, end - begin, dtype, tuple(shape))


def read_config(root: Path) -> dict[str, object]:
    path = root / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            "not a Hugging Face model directory: config.json is missing "
            "(pass the folder that save_pretrained wrote)",
            file=str(path),
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"config.json is unreadable: {exc}", file=str(path)) from exc
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object", file=str(path))
    return config


def checkpoint_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a model directory and, when sharded, the index's tensor -> file map."""
    index = root / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"index is unreadable: {exc}", file=str(index)) from exc
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("index has no weight_map object", file=str(index))
        files: dict[str, Path] = {}
        for tensor, fname in weight_map.items():
            if not isinstance(fname, str) or not isinstance(tensor, str):
                raise CheckpointError(
                    f"weight_map entry {tensor!r}: {fname!r} is not a file name", file=str(index)
                )
            # Judge the name, not where it resolves to: in the Hugging Face cache every shard is a symlink
            # into ../../blobs, which is fine; a name with a directory part ("../x", "/abs") is not.
            if Path(fname).name != fname or fname in ("", ".", ".."):
                raise CheckpointError(
                    f"shard {fname!r} is outside the model directory", file=str(index), tensor=tensor
                )
            shard = (root / fname).resolve()
            if fname not in files:
                if not shard.is_file():
                    raise CheckpointError(
                        f"shard {fname!r} named in the index is missing", file=str(index), tensor=tensor
                    )
                files[fname] = shard
        return sorted(files.values()), {k: str((root / v).resolve()) for k, v in weight_map.items()}
    single = root / SINGLE_NAME
    if single.is_file():
        return [single], None
    others = sorted(root.glob("*.safetensors"))
    if len(others) == 1:
        return others, None
    raise CheckpointError(
        f"no {SINGLE_NAME} or {INDEX_NAME} found"
        + (f" (and {len(others)} loose .safetensors files without an index)" if others else ""),
        file=str(root),
    )


def scan_checkpoint(path: str | os.PathLike[str]) -> tuple[list[TensorInfo], dict[str, object], list[Path]]:
    """Every tensor of a Hugging Face safetensors checkpoint, validated, with its config and files."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError("model path is not a directory", file=str(root))
    config = read_config(root)
    files, weight_map = checkpoint_files(root)
    tensors: list[TensorInfo] = []
    seen: dict[str, str] = {}
    for shard in files:
        for t in read_header(shard):
            if t.name in seen:
                raise CheckpointError(f"tensor also stored in {seen[t.name]}", file=t.file, tensor=t.name)
            seen[t.name] = t.file
            tensors.append(
                TensorInfo(t.name, str(Path(t.file).resolve()), t.offset, t.nbytes, t.dtype, t.shape)
            )
    if weight_map is not None:
        for name, fname in weight_map.items():
            where = seen.get(name)
            if where is None or str(Path(where).resolve()) != fname:
                raise CheckpointError(
                    "tensor named in the index is not in its shard", file=fname, tensor=name
                )
        extra = sorted(set(seen) - set(weight_map))
        if extra:
            raise CheckpointError(
                f"{len(extra)} tensors are in shards but not in the index",
                file=seen[extra[0]],
                tensor=extra[0],
            )
    return tensors, config, files


def open_checkpoint(path: str | os.PathLike[str]) -> ExpertLayout:
    """Map every expert of a model directory (HF safetensors or an ExpertFlow pack) to its bytes on disk."""
    root = Path(path)
    if (root / PACK_MANIFEST_NAME).is_file():
        from expertflow.tiers.pack import load_packed_layout

        return load_packed_layout(root)
    tensors, config, files = scan_checkpoint(root)
    return build_layout(tensors, root=str(root.resolve()), config=config, files=[str(f) for f in files])
