"""The safetensors index trusts nothing: every malformed file or directory is a CheckpointError naming it.

Bad files are crafted byte by byte (struct + json) or made by corrupting copies of real checkpoints written by
``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from expertflow.errors import CheckpointError
from expertflow.tiers.safetensors_index import (
    INDEX_NAME,
    MAX_HEADER_BYTES,
    open_checkpoint,
    read_header,
    scan_checkpoint,
)


def write_raw(path: Path, header: object, data: bytes = b"", *, header_len: int | None = None) -> Path:
    """A safetensors file from parts: ``header_len`` overrides the length prefix to lie about the header."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = struct.pack("<Q", len(raw) if header_len is None else header_len)
    path.write_bytes(prefix + raw + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def expect_error(path: Path, *, tensor: str | None = None, match: str | None = None) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as info:
        read_header(path)
    err = info.value
    assert err.file == str(path)
    assert str(path) in str(err)
    if tensor is not None:
        assert err.tensor == tensor
        assert tensor in str(err)
    return err


# --- well-formed files -------------------------------------------------------------------------------


def test_valid_handcrafted_file_gives_absolute_offsets(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "b": entry("F32", [2], 8, 16),
        "a": entry("BF16", [2, 2], 0, 8),
        "empty": entry("F16", [0, 4], 16, 16),
    }
    path = write_raw(tmp_path / "ok.safetensors", header, bytes(range(16)))
    tensors = {t.name: t for t in read_header(path)}
    start = 8 + len(json.dumps(header).encode())
    assert tensors["a"].offset == start and tensors["a"].nbytes == 8 and tensors["a"].shape == (2, 2)
    assert tensors["b"].offset == start + 8 and tensors["b"].dtype == "F32"
    assert tensors["empty"].nbytes == 0
    assert [t.name for t in read_header(path)] == ["a", "b", "empty"]  # sorted by offset


def test_offsets_match_what_safetensors_itself_writes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"x": torch.randn(3, 5, generator=g), "y": torch.randn(7, generator=g).to(torch.bfloat16)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    raw = path.read_bytes()
    for info in read_header(path):
        expected = tensors[info.name].contiguous().view(torch.uint8).numpy().tobytes()
        assert raw[info.offset : info.offset + info.nbytes] == expected


# --- malformed files ---------------------------------------------------------------------------------


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    expect_error(path, match="too short")


def test_file_shorter_than_length_prefix_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    expect_error(path, match="too short")


def test_header_length_beyond_the_file_is_rejected_before_reading_it(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "h.safetensors", {"a": entry("F32", [1], 0, 4)}, bytes(4), header_len=10_000)
    expect_error(path, match="runs past the end")


def test_absurd_header_length_is_refused_without_allocating(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "h.safetensors", {}, b"", header_len=(1 << 63) + 5)
    expect_error(path, match="exceeds")
    path = write_raw(tmp_path / "h2.safetensors", {}, b"", header_len=MAX_HEADER_BYTES + 1)
    expect_error(path, match="exceeds")


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"\xff\xfe{}", b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'],
    ids=["garbage", "not-utf8", "unterminated"],
)
def test_non_json_header_is_rejected(tmp_path: Path, raw: bytes) -> None:
    path = write_raw(tmp_path / "j.safetensors", raw, bytes(4))
    expect_error(path, match="not valid UTF-8 JSON")


def test_header_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    expect_error(write_raw(tmp_path / "l.safetensors", [1, 2]), match="not a JSON object")


def test_metadata_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    expect_error(write_raw(tmp_path / "m.safetensors", {"__metadata__": [1]}), match="__metadata__")


def test_offsets_outside_the_data_area_are_rejected(tmp_path: Path) -> None:
    header = {"ok": entry("F32", [2], 0, 8), "far": entry("F32", [4], 8, 24)}
    path = write_raw(tmp_path / "o.safetensors", header, bytes(16))
    expect_error(path, tensor="far", match="beyond the 16-byte data area")


def test_offsets_reversed_or_negative_are_rejected(tmp_path: Path) -> None:
    expect_error(
        write_raw(tmp_path / "r.safetensors", {"t": entry("F32", [1], 8, 4)}, bytes(8)),
        tensor="t",
        match="not ordered",
    )
    expect_error(
        write_raw(tmp_path / "n.safetensors", {"t": entry("F32", [1], -4, 0)}, bytes(8)),
        tensor="t",
        match="not ordered",
    )


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], ["0", "4"], [0.0, 4.0], [False, True], None], ids=str)
def test_malformed_data_offsets_are_rejected(tmp_path: Path, offsets: object) -> None:
    header = {"t": {"dtype": "U8", "shape": [4], "data_offsets": offsets}}
    expect_error(write_raw(tmp_path / "d.safetensors", header, bytes(8)), tensor="t", match="data_offsets")


def test_overlapping_tensors_are_rejected(tmp_path: Path) -> None:
    header = {"first": entry("F32", [2], 0, 8), "second": entry("F32", [2], 4, 12)}
    err = expect_error(write_raw(tmp_path / "ov.safetensors", header, bytes(12)), tensor="second")
    assert "overlaps first" in str(err)


def test_unknown_dtype_is_rejected(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "u.safetensors", {"t": entry("F7", [1], 0, 1)}, bytes(1))
    expect_error(path, tensor="t", match="unknown dtype 'F7'")


def test_shape_disagreeing_with_byte_count_is_rejected(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "s.safetensors", {"t": entry("F32", [3, 3], 0, 32)}, bytes(32))
    expect_error(path, tensor="t", match=r"needs 36 bytes but data_offsets span 32")


@pytest.mark.parametrize("shape", [[-1, 4], [2.0], "4", [True], None], ids=str)
def test_malformed_shapes_are_rejected(tmp_path: Path, shape: object) -> None:
    header = {"t": {"dtype": "U8", "shape": shape, "data_offsets": [0, 4]}}
    expect_error(write_raw(tmp_path / "sh.safetensors", header, bytes(4)), tensor="t", match="shape")


def test_entry_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    expect_error(write_raw(tmp_path / "e.safetensors", {"t": [0, 4]}, bytes(4)), tensor="t")


def test_a_directory_named_like_a_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "dir.safetensors"
    path.mkdir()
    expect_error(path, match="cannot read")


# --- real checkpoints --------------------------------------------------------------------------------


def test_sharded_checkpoint_lists_every_tensor_of_every_shard(checkpoints) -> None:
    root = checkpoints.get("mixtral", sharded=True)
    index = json.loads((root / INDEX_NAME).read_text())["weight_map"]
    tensors, config, files = scan_checkpoint(root)
    assert len({Path(f).name for f in files}) > 1, "the fixture should really be sharded"
    assert {t.name for t in tensors} == set(index)
    for t in tensors:
        assert Path(t.file).name == index[t.name]
    assert config["model_type"] == "mixtral"


def test_truncated_shard_names_the_file_and_a_tensor_past_the_end(checkpoints, tmp_path: Path) -> None:
    root = copy_model(checkpoints.get("mixtral", sharded=True), tmp_path / "m")
    shard = sorted(root.glob("*.safetensors"))[0]
    size = shard.stat().st_size
    with open(shard, "rb+") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(root)
    assert info.value.file == str(shard.resolve())
    assert info.value.tensor is not None


def test_shard_cut_inside_its_header_is_rejected(checkpoints, tmp_path: Path) -> None:
    root = copy_model(checkpoints.mixtral_single_file, tmp_path / "m")
    path = root / "model.safetensors"
    with open(path, "rb+") as f:
        f.truncate(40)
    with pytest.raises(CheckpointError, match="runs past the end") as info:
        open_checkpoint(root)
    assert info.value.file is not None and Path(info.value.file).name == "model.safetensors"


def test_shard_named_in_the_index_but_missing_is_rejected(checkpoints, tmp_path: Path) -> None:
    root = copy_model(checkpoints.get("mixtral", sharded=True), tmp_path / "m")
    victim = sorted(root.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        open_checkpoint(root)
    assert victim.name in str(info.value)
    assert info.value.file == str(root / INDEX_NAME)
    assert info.value.tensor is not None


def test_tensor_in_the_index_but_missing_from_its_shard_is_rejected(checkpoints, tmp_path: Path) -> None:
    root = copy_model(checkpoints.get("mixtral", sharded=True), tmp_path / "m")
    index = json.loads((root / INDEX_NAME).read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.block_sparse_moe.experts.99.w1.weight"] = shard
    (root / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not in its shard") as info:
        open_checkpoint(root)
    assert info.value.tensor == "model.layers.0.block_sparse_moe.experts.99.w1.weight"
    assert info.value.file is not None and Path(info.value.file).name == shard


def test_tensor_in_a_shard_but_not_in_the_index_is_rejected(checkpoints, tmp_path: Path) -> None:
    root = copy_model(checkpoints.get("mixtral", sharded=True), tmp_path / "m")
    index = json.loads((root / INDEX_NAME).read_text())
    dropped = sorted(index["weight_map"])[0]
    del index["weight_map"][dropped]
    (root / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not in the index") as info:
        open_checkpoint(root)
    assert info.value.tensor == dropped


def test_tensor_stored_in_two_shards_is_rejected(checkpoints, tmp_path: Path) -> None:
    root = copy_model(checkpoints.get("mixtral", sharded=True), tmp_path / "m")
    index = json.loads((root / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    extra = root / "extra.safetensors"
    save_file({name: torch.zeros(2)}, str(extra))
    index["weight_map"]["__dummy__"] = "extra.safetensors"
    (root / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="also stored in") as info:
        open_checkpoint(root)
    assert info.value.tensor == name


@pytest.mark.parametrize(
    "bad_name", ["../x.safetensors", "sub/../../x.safetensors", "/tmp/x.safetensors", ""]
)
def test_index_naming_a_file_outside_the_directory_is_rejected(
    checkpoints, tmp_path: Path, bad_name: str
) -> None:
    root = copy_model(checkpoints.get("mixtral", sharded=True), tmp_path / "m")
    # The escaping file really exists and is a valid shard: the name alone must be refused.
    shutil.copy(sorted(root.glob("*.safetensors"))[0], tmp_path / "x.safetensors")
    index = json.loads((root / INDEX_NAME).read_text())
    tensor = sorted(index["weight_map"])[0]
    index["weight_map"][tensor] = bad_name
    (root / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model directory") as info:
        open_checkpoint(root)
    assert info.value.tensor == tensor
    assert info.value.file == str(root / INDEX_NAME)


def test_symlinked_shards_like_the_hugging_face_cache_are_accepted(checkpoints, tmp_path: Path) -> None:
    """In ``~/.cache/huggingface`` every file of a snapshot is a symlink into ``../../blobs``."""
    src = checkpoints.get("mixtral", sharded=True)
    blobs = tmp_path / "blobs"
    snapshot = tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        os.symlink(os.path.relpath(blobs / f"blob{i}", snapshot), snapshot / f.name)
    layout = open_checkpoint(snapshot)
    assert layout.fingerprint() == open_checkpoint(src).fingerprint()


@pytest.mark.parametrize(
    "content", ["{not json", json.dumps({"metadata": {}}), json.dumps({"weight_map": {}}), "[]"]
)
def test_unusable_index_is_rejected(checkpoints, tmp_path: Path, content: str) -> None:
    root = copy_model(checkpoints.get("mixtral", sharded=True), tmp_path / "m")
    (root / INDEX_NAME).write_text(content)
    with pytest.raises(CheckpointError, match="index") as info:
        open_checkpoint(root)
    assert info.value.file == str(root / INDEX_NAME)


def test_missing_config_is_rejected(checkpoints, tmp_path: Path) -> None:
    root = copy_model(checkpoints.mixtral_single_file, tmp_path / "m")
    (root / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing") as info:
        open_checkpoint(root)
    assert info.value.file == str(root / "config.json")


def test_unreadable_config_is_rejected(checkpoints, tmp_path: Path) -> None:
    root = copy_model(checkpoints.mixtral_single_file, tmp_path / "m")
    (root / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json is unreadable"):
        open_checkpoint(root)
    (root / "config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        open_checkpoint(root)


def test_directory_that_is_not_a_model_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a Hugging Face model directory") as info:
        open_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_path_that_is_not_a_directory_is_rejected(tmp_path: Path) -> None:
    for path in (tmp_path / "nope", tmp_path / "file.txt"):
        if path.name == "file.txt":
            path.write_text("x")
        with pytest.raises(CheckpointError, match="not a directory") as info:
            open_checkpoint(path)
        assert info.value.file == str(path)


def test_model_directory_without_safetensors_is_rejected(checkpoints, tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    shutil.copy(checkpoints.mixtral_single_file / "config.json", root / "config.json")
    (root / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors") as info:
        open_checkpoint(root)
    assert info.value.file == str(root)


def test_loose_safetensors_files_without_an_index_are_rejected(checkpoints, tmp_path: Path) -> None:
    root = copy_model(checkpoints.get("mixtral", sharded=True), tmp_path / "m")
    (root / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"loose \.safetensors files without an index"):
        open_checkpoint(root)


def test_single_file_under_another_name_is_accepted(checkpoints, tmp_path: Path) -> None:
    root = copy_model(checkpoints.mixtral_single_file, tmp_path / "m")
    (root / "model.safetensors").rename(root / "consolidated.safetensors")
    layout = open_checkpoint(root)
    assert (
        layout.experts
        and layout.fingerprint() == open_checkpoint(checkpoints.mixtral_single_file).fingerprint()
    )
