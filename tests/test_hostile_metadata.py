"""Hostile metadata in headers, index.json, config.json and manifests: a CheckpointError naming the file,
never a RecursionError, a ValueError, a hang or a silent misread (adversarial audit, issue 12)."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest

from expertflow.cli import main as cli_main
from expertflow.errors import CheckpointError
from expertflow.tiers.safetensors_index import open_checkpoint, read_header

CONFIG = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_hidden_layers": 1}


def _safetensors(path: Path, header_text: str, data: bytes) -> Path:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _model_dir(root: Path, config: dict | str = CONFIG) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return root


def _open_in_time(root: Path, seconds: float = 10.0) -> BaseException | None:
    """open_checkpoint(root) in a thread: what it raised, or a hang reported as a failure."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            open_checkpoint(root)
            box.append(None)
        except BaseException as exc:
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"open_checkpoint({root}) hung"
    return box[0]


def test_deeply_nested_config_is_a_checkpoint_error(tmp_path: Path) -> None:
    root = _model_dir(tmp_path / "m", "[" * 100_000 + "]" * 100_000)
    exc = _open_in_time(root)
    assert isinstance(exc, CheckpointError) and "config.json" in str(exc) and "nested" in str(exc)


def test_an_integer_of_thousands_of_digits_in_a_header_is_a_checkpoint_error(tmp_path: Path) -> None:
    big = "9" * 5000
    path = _safetensors(
        tmp_path / "x.safetensors",
        f'{{"t":{{"dtype":"F32","shape":[{big}],"data_offsets":[0,4]}}}}',
        b"\0" * 4,
    )
    with pytest.raises(CheckpointError, match=r"x\.safetensors"):
        read_header(path)


def test_a_nul_in_a_shard_name_is_a_checkpoint_error(tmp_path: Path) -> None:
    root = _model_dir(tmp_path / "m")
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "x\u0000.safetensors"}})
    )
    exc = _open_in_time(root)
    assert isinstance(exc, CheckpointError) and "index" in str(exc)


def test_a_shard_that_is_a_symlink_loop_is_a_checkpoint_error(tmp_path: Path) -> None:
    root = _model_dir(tmp_path / "m")
    os.symlink("b.safetensors", root / "a.safetensors")
    os.symlink("a.safetensors", root / "b.safetensors")
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"t": "a.safetensors"}}))
    exc = _open_in_time(root)
    assert isinstance(exc, CheckpointError) and "a.safetensors" in str(exc)


def test_a_fifo_named_like_a_checkpoint_is_refused_without_hanging(tmp_path: Path, capsys) -> None:
    root = _model_dir(tmp_path / "m")
    os.mkfifo(root / "model.safetensors")
    exc = _open_in_time(root)
    assert isinstance(exc, CheckpointError) and "not a regular file" in str(exc)
    assert cli_main(["inspect", str(root)]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_an_absurd_dimension_on_an_empty_tensor_is_refused_at_parse_time(tmp_path: Path) -> None:
    header = json.dumps({"t": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}})
    path = _safetensors(tmp_path / "x.safetensors", header, b"")
    with pytest.raises(CheckpointError, match="dimension larger than"):
        read_header(path)


def test_a_duplicate_key_and_a_gap_are_refused_as_safetensors_does(tmp_path: Path) -> None:
    # Two entries named "t": json would keep the second; the first one's bytes become a silent gap.
    text = (
        '{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        '"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    )
    path = _safetensors(tmp_path / "dup.safetensors", text, b"\x01" * 4 + b"\0" * 4)
    with pytest.raises(CheckpointError, match="duplicate key"):
        read_header(path)
    gap = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})
    path = _safetensors(tmp_path / "gap.safetensors", gap, b"\0" * 8)
    with pytest.raises(CheckpointError, match="gap of 4 bytes"):
        read_header(path)
    tail = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    path = _safetensors(tmp_path / "tail.safetensors", tail, b"\0" * 8)
    with pytest.raises(CheckpointError, match="after the last tensor"):
        read_header(path)
