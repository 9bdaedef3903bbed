"""Parse and validate safetensors headers (single file or sharded index) without loading a tensor.

Trusts nothing: every length, offset, dtype and shape is checked against the file before any byte of
tensor data is read, and every failure is a :class:`CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Any

from expertflow.core import DTYPE_SIZES
from expertflow.errors import CheckpointError
from expertflow.tiers.layout import ExpertLayout, Naming, TensorInfo, build_layout, name_by_pattern

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PACK_MANIFEST_NAME = "expertflow-manifest.json"
PACK_DATA_NAME = "experts.bin"  # a pack's experts (tiers.pack)
# The reference implementation refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100_000_000


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (never blocks on a FIFO or device).

    Symlinks are followed (the Hugging Face cache is made of them); a loop, a NUL in the name or anything that
    is not a regular file is a :class:`CheckpointError` naming the path.
    """
    file = os.fspath(path)
    if "\0" in file:
        raise CheckpointError("file name contains a NUL byte", file=repr(file))
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"cannot open file: {exc.strerror or exc}", file=file) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError("cannot read: not a regular file (a directory, FIFO or device)", file=file)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_json(data: bytes | str, *, file: str, what: str) -> Any:
    """Strict JSON: duplicate keys, absurd nesting or numbers, and bad UTF-8 are a :class:`CheckpointError`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        kind = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{what} is unreadable: not valid UTF-8 JSON ({kind})", file=file) from None


def read_json_file(path: str | os.PathLike[str], what: str) -> Any:
    """Read and parse a small JSON file (config, index, manifest) through :func:`open_regular`."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"cannot read {what}: {exc.strerror or exc}", file=os.fspath(path)) from exc
    finally:
        os.close(fd)
    if len(raw) > MAX_HEADER_BYTES:
        raise CheckpointError(f"{what} is larger than 100 MB", file=os.fspath(path))
    return load_json(raw, file=os.fspath(path), what=what)


def read_header(path: str | os.PathLike[str]) -> list[TensorInfo]:
    """Tensors of one safetensors file, with absolute byte offsets, fully validated."""
    file = os.fspath(path)
    fd = open_regular(file)
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb", closefd=False) as f:
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
    finally:
        os.close(fd)
    header = load_json(raw, file=file, what="header")
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

    _check_coverage(file, tensors, data_start, data_size)
    return tensors


def _check_coverage(file: str, tensors: list[TensorInfo], data_start: int, data_size: int) -> None:
    """As safetensors requires: tensors sit back to back and fill the data area, with no overlap and no gap."""
    tensors.sort(key=lambda t: (t.offset, t.nbytes))
    end = data_start
    prev: TensorInfo | None = None
    for t in tensors:
        if t.offset < end:
            raise CheckpointError(
                f"tensor overlaps {prev.name if prev else 'the header'} "
                f"(starts at data offset {t.offset - data_start}, previous ends at {end - data_start})",
                file=file,
                tensor=t.name,
            )
        if t.offset > end:
            raise CheckpointError(
                f"gap of {t.offset - end} bytes in the data area before this tensor "
                f"(data offset {end - data_start}); safetensors files have none",
                file=file,
                tensor=t.name,
            )
        end = t.offset + t.nbytes
        prev = t
    if end != data_start + data_size:
        raise CheckpointError(
            f"{data_start + data_size - end} bytes after the last tensor are not part of any tensor",
            file=file,
        )


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
    if any(d > max(data_size, 1) for d in shape):  # even an empty tensor cannot claim such a dimension
        raise CheckpointError(
            f"shape {shape} has a dimension larger than the {data_size}-byte data area",
            file=file,
            tensor=name,
        )
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
    if not path.exists():
        raise CheckpointError(
            "not a Hugging Face model directory: config.json is missing "
            "(pass the folder that save_pretrained wrote)",
            file=str(path),
        )
    config = read_json_file(path, "config.json")
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object", file=str(path))
    return config


def checkpoint_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a model directory and, when sharded, the index's tensor -> file map."""
    index = root / INDEX_NAME
    if index.exists():
        data = read_json_file(index, "index")
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
            if "\0" in fname or Path(fname).name != fname or fname in ("", ".", ".."):
                raise CheckpointError(
                    f"shard {fname!r} is outside the model directory", file=str(index), tensor=tensor
                )
            if fname not in files:
                try:
                    shard = (root / fname).resolve(strict=True)
                except FileNotFoundError:
                    raise CheckpointError(
                        f"shard {fname!r} named in the index is missing", file=str(index), tensor=tensor
                    ) from None
                except (OSError, RuntimeError) as exc:  # a symlink loop
                    raise CheckpointError(
                        f"shard {fname!r} cannot be resolved: {exc}", file=str(index)
                    ) from None
                files[fname] = shard
        return sorted(files.values()), {k: str(files[v]) for k, v in weight_map.items()}
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


def open_checkpoint(path: str | os.PathLike[str], *, naming: Naming | None = None) -> ExpertLayout:
    """Map every expert of a model directory (HF safetensors or an ExpertFlow pack) to its bytes on disk.

    ``naming`` says which tensors are experts (default: :func:`~expertflow.tiers.layout.name_by_pattern`); a pack
    records its experts in its manifest and needs none.
    """
    root = Path(path)
    if (root / PACK_MANIFEST_NAME).is_file():
        from expertflow.tiers.pack import load_packed_layout

        return load_packed_layout(root)
    if (root / PACK_DATA_NAME).is_file():
        raise CheckpointError(
            f"{root} holds an ExpertFlow pack's {PACK_DATA_NAME} but not its {PACK_MANIFEST_NAME}: the manifest "
            "says where each expert is; pack the checkpoint again",
            file=str(root / PACK_MANIFEST_NAME),
        )
    tensors, config, files = scan_checkpoint(root)
    return build_layout(
        tensors,
        root=str(root.resolve()),
        config=config,
        files=[str(f) for f in files],
        naming=naming or name_by_pattern,
    )
