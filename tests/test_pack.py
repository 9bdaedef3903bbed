"""The pack format: an expert-major, 4 KiB-aligned, checksummed copy that reads back the source's bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from safetensors import safe_open

from expertflow.cli import main as cli_main
from expertflow.core import BLOCK, ExpertKey
from expertflow.errors import CheckpointError, ChecksumError, UnsupportedModelError
from expertflow.tiers import pack as pack_module
from expertflow.tiers.nvme import NvmeTier, plan_direct
from expertflow.tiers.pack import DATA_NAME, NON_EXPERT_NAME, load_packed_layout, pack_checkpoint
from expertflow.tiers.safetensors_index import PACK_MANIFEST_NAME, open_checkpoint
from tests.checkpoints import FAMILIES, save_dense_checkpoint
from tests.store_helpers import aligned

MODES = ("mmap", "direct")
REPO = Path(__file__).resolve().parents[1]


class Packs:
    """Each family packed once per module, on first use."""

    def __init__(self, checkpoints: Any, base: Path) -> None:
        self.checkpoints = checkpoints
        self.base = base
        self._done: dict[str, Path] = {}

    def get(self, family: str) -> Path:
        if family not in self._done:
            self._done[family] = pack_checkpoint(
                self.checkpoints.get(family), self.base / family, progress=False
            )
        return self._done[family]


@pytest.fixture(scope="module")
def packs(checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Packs:
    return Packs(checkpoints, tmp_path_factory.mktemp("packs"))


def expert_tensors(tier: NvmeTier, key: ExpertKey, buf: memoryview) -> list[bytes]:
    tier.read_into(key, buf)
    return [bytes(buf[off : off + t.nbytes]) for t, off in tier.layout.spec(key).views()]


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def copy_pack(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- round trip --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_pack_reads_back_every_expert_of_the_source(
    checkpoints: Any, packs: Packs, family: str, mode: str
) -> None:
    source = open_checkpoint(checkpoints.get(family))
    packed = open_checkpoint(packs.get(family))
    assert packed.packed and not source.packed
    assert packed.fingerprint() == source.fingerprint()
    assert packed.experts_per_layer() == source.experts_per_layer()
    assert (packed.model_type, packed.architecture) == (source.model_type, source.architecture)
    with (
        NvmeTier(source, mode) as a,  # type: ignore[arg-type]
        NvmeTier(packed, mode) as b,  # type: ignore[arg-type]
        aligned(a.buffer_nbytes()) as buf_a,
        aligned(b.buffer_nbytes()) as buf_b,
    ):
        for key in sorted(source.experts):
            src_spec, pack_spec = source.spec(key), packed.spec(key)
            assert pack_spec.checksum is not None
            assert pack_spec.offsets == src_spec.offsets and pack_spec.nbytes == src_spec.nbytes
            assert [(t.role, t.source, t.dtype, t.shape) for t in pack_spec.tensors] == [
                (t.role, t.source, t.dtype, t.shape) for t in src_spec.tensors
            ]
            assert expert_tensors(b, key, buf_b) == expert_tensors(a, key, buf_a)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_expert_is_one_aligned_read_with_nothing_to_move(packs: Packs, family: str) -> None:
    layout = open_checkpoint(packs.get(family))
    size = os.path.getsize(Path(packs.get(family)) / DATA_NAME)
    assert size % BLOCK == 0
    with NvmeTier(layout, "direct") as tier:
        for key, spec in layout.experts.items():
            plan = plan_direct(spec)
            assert len(plan.runs) == 1 and not plan.needs_move
            run = plan.runs[0]
            assert run.file_offset % BLOCK == 0 and run.buf_offset == 0
            assert run.file_offset + run.length <= size
            assert tier.buffer_nbytes(key) == -(-spec.nbytes // BLOCK) * BLOCK


def test_manifest_records_offsets_and_checksums_of_the_bytes_on_disk(packs: Packs) -> None:
    root = packs.get("gpt_oss")
    manifest = json.loads((root / PACK_MANIFEST_NAME).read_text())
    data = (root / DATA_NAME).read_bytes()
    assert manifest["format"] == "expertflow-pack" and manifest["version"] == 2
    assert manifest["data_nbytes"] == len(data)
    end = 0
    for entry in sorted(manifest["experts"], key=lambda e: e["offset"]):
        assert entry["offset"] % BLOCK == 0 and entry["offset"] >= end
        layer, expert = entry["layer"], entry["expert"]
        h = xxhash.xxh3_64(seed=(layer << 32) | expert)  # bound to the key
        for t in entry["tensors"]:
            start = entry["offset"] + t["offset"]
            h.update(data[start : start + t["nbytes"]])
        assert f"{h.intdigest():016x}" == entry["checksum"]
        end = entry["offset"] + entry["nbytes"]
    assert manifest["fingerprint"] == open_checkpoint(root).fingerprint()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "qwen3_vl_moe"])
def test_non_expert_weights_of_a_pack_load_like_the_source(
    checkpoints: Any, packs: Packs, family: str
) -> None:
    source = open_checkpoint(checkpoints.get(family))
    packed = open_checkpoint(packs.get(family))
    assert {(t.name, k) for t, k in packed.non_expert} == {(t.name, k) for t, k in source.non_expert}
    src_info = {t.name: t for t, _ in source.non_expert}
    with ExitStack() as stack:
        handles: dict[str, Any] = {}

        def load(file: str, name: str) -> torch.Tensor:
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt"))
            return handles[file].get_tensor(name)

        for info, _ in packed.non_expert:
            assert Path(info.file).name == NON_EXPERT_NAME
            ref = src_info[info.name]
            assert (info.dtype, info.shape, info.nbytes) == (ref.dtype, ref.shape, ref.nbytes)
            assert tensor_bytes(load(info.file, info.name)) == tensor_bytes(load(ref.file, ref.name))


def test_pack_copies_config_and_side_files_but_no_source_weights(checkpoints: Any, packs: Packs) -> None:
    src = checkpoints.get("mixtral")
    root = packs.get("mixtral")
    assert (root / "config.json").read_bytes() == (src / "config.json").read_bytes()
    for f in src.iterdir():
        if f.suffix == ".json" and "index" not in f.name:
            assert (root / f.name).read_bytes() == f.read_bytes(), f.name
    names = sorted(p.name for p in root.iterdir())
    assert not [n for n in names if n.endswith(".safetensors") and n != NON_EXPERT_NAME]
    assert "model.safetensors.index.json" not in names
    assert not [n for n in names if n.startswith(".")], "no temporary files are left behind"


def test_packing_a_pack_reproduces_it(packs: Packs, tmp_path: Path) -> None:
    first = packs.get("olmoe")
    again = pack_checkpoint(first, tmp_path / "again", progress=False)
    assert (again / DATA_NAME).read_bytes() == (first / DATA_NAME).read_bytes()
    a = json.loads((first / PACK_MANIFEST_NAME).read_text())
    b = json.loads((again / PACK_MANIFEST_NAME).read_text())
    assert a["experts"] == b["experts"] and a["fingerprint"] == b["fingerprint"]


def _write_raw(path: Path, tensors: list[tuple[str, str, list[int], bytes]]) -> None:
    header: dict[str, object] = {}
    pos = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(d for *_, d in tensors))


@pytest.mark.parametrize("mode", MODES)
def test_expert_with_padding_between_tensors_is_still_one_read_and_verifies(
    tmp_path: Path, mode: str
) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = [("model.embed_tokens.weight", "F32", [4], tensor_bytes(torch.randn(4, generator=g)))]
    for e in range(3):
        for role, t in (
            ("w1.weight", torch.randn(3, generator=g).to(torch.bfloat16)),  # 6 bytes, then 2 bytes of padding
            ("w3.weight", torch.randn(5, generator=g)),
            ("w2.weight", torch.randn(1, generator=g).to(torch.bfloat16)),
        ):
            dtype = "BF16" if t.dtype == torch.bfloat16 else "F32"
            tensors.append(
                (f"model.layers.0.block_sparse_moe.experts.{e}.{role}", dtype, list(t.shape), tensor_bytes(t))
            )
    src = tmp_path / "src"
    src.mkdir()
    _write_raw(src / "model.safetensors", tensors)
    (src / "config.json").write_text(
        json.dumps({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]})
    )
    packed = open_checkpoint(pack_checkpoint(src, tmp_path / "pack", progress=False))
    source = open_checkpoint(src)
    spec = packed.spec(ExpertKey(0, 1))
    assert spec.offsets == (0, 8, 28)
    plan = plan_direct(spec)
    assert len(plan.runs) == 1 and not plan.needs_move
    # Junk in the padding of a reused buffer must not fail the checksum.
    with (
        NvmeTier(source, mode) as a,  # type: ignore[arg-type]
        NvmeTier(packed, mode) as b,  # type: ignore[arg-type]
        aligned(a.buffer_nbytes(), 0xEE) as buf_a,
        aligned(b.buffer_nbytes(), 0xEE) as buf_b,
    ):
        for key in sorted(source.experts):
            assert expert_tensors(b, key, buf_b) == expert_tensors(a, key, buf_a)


# --- corruption --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_flipped_byte_in_experts_bin_is_a_checksum_error(packs: Packs, tmp_path: Path, mode: str) -> None:
    root = copy_pack(packs.get("qwen3_moe"), tmp_path / "p")
    layout = open_checkpoint(root)
    victim = layout.keys()[5]
    t = layout.spec(victim).tensors[1]
    with open(root / DATA_NAME, "rb+") as f:
        f.seek(t.offset + t.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    layout = open_checkpoint(root)  # the file is still well-formed: only reading finds out
    with NvmeTier(layout, mode) as tier, aligned(tier.buffer_nbytes()) as buf:  # type: ignore[arg-type]
        tier.read_into(layout.keys()[0], buf)
        with pytest.raises(ChecksumError, match=str(victim)) as info:
            tier.read_into(victim, buf)
        assert info.value.file is not None and info.value.file.endswith(DATA_NAME)
    with NvmeTier(layout, mode, verify_checksums=False) as tier:  # type: ignore[arg-type]
        assert len(tier.read_expert(victim)) == layout.spec(victim).nbytes


@pytest.mark.parametrize("mode", MODES)
def test_two_manifest_entries_swapped_are_a_checksum_error(packs: Packs, tmp_path: Path, mode: str) -> None:
    """Swapping two experts' offsets and checksums keeps every entry self-consistent; only a checksum bound to
    its key sees that the bytes belong to another expert."""
    root = copy_pack(packs.get("mixtral"), tmp_path / "p")
    manifest_path = root / PACK_MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    a, b = manifest["experts"][1], manifest["experts"][2]
    assert (a["layer"], a["nbytes"]) == (b["layer"], b["nbytes"])
    for field in ("offset", "checksum"):
        a[field], b[field] = b[field], a[field]
    manifest_path.write_text(json.dumps(manifest))
    layout = open_checkpoint(root)
    with NvmeTier(layout, mode) as tier, aligned(tier.buffer_nbytes()) as buf:  # type: ignore[arg-type]
        for entry in (a, b):
            key = ExpertKey(entry["layer"], entry["expert"])
            with pytest.raises(ChecksumError, match=str(key)):
                tier.read_into(key, buf)
        untouched = manifest["experts"][0]
        tier.read_into(ExpertKey(untouched["layer"], untouched["expert"]), buf)


def test_truncated_experts_bin_is_rejected_on_open(packs: Packs, tmp_path: Path) -> None:
    root = copy_pack(packs.get("mixtral"), tmp_path / "p")
    data = root / DATA_NAME
    with open(data, "rb+") as f:
        f.truncate(data.stat().st_size - BLOCK)
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(root)
    assert info.value.file == str(data.resolve())


def test_missing_experts_bin_is_rejected(packs: Packs, tmp_path: Path) -> None:
    root = copy_pack(packs.get("mixtral"), tmp_path / "p")
    (root / DATA_NAME).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(root)


Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    """An edit of the manifest at a dotted path (``experts.3.tensors.0.dtype``)."""

    def edit(m: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = m
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _duplicate_expert(m: dict[str, Any]) -> None:
    m["experts"].append(dict(m["experts"][0]))


def _overlap(m: dict[str, Any]) -> None:
    m["experts"][1]["offset"] = m["experts"][0]["offset"]
    m["experts"][1]["layer"], m["experts"][1]["expert"] = 99, 0


def _swap_tensor_order(m: dict[str, Any]) -> None:
    t = m["experts"][0]["tensors"]
    t[0], t[1] = t[1], t[0]


def _drop_expert(m: dict[str, Any]) -> None:
    del m["experts"][1]


TAMPER: dict[str, tuple[Edit, str]] = {
    "version": (_set("version", 1), "version 1 is not supported"),
    "format": (_set("format", "zip"), "not an ExpertFlow pack"),
    "alignment": (_set("alignment", 512), "alignment"),
    "fingerprint": (_set("fingerprint", "0" * 32), "fingerprint"),
    "data-nbytes": (_set("data_nbytes", 12), "truncated or replaced"),
    "data-file-escapes": (_set("data_file", "../experts.bin"), "not a plain file name"),
    "experts-not-list": (_set("experts", {}), "not a list"),
    "misaligned": (_set("experts.1.offset", 4100), "not 4096-byte aligned"),
    "past-end": (_set("experts.1.offset", 1 << 40), "run past the end"),
    "negative": (_set("experts.1.offset", -4096), "non-negative integer"),
    "bool-as-int": (_set("experts.1.layer", True), "non-negative integer"),
    "overlap": (_overlap, "overlap"),
    "duplicate": (_duplicate_expert, "listed twice"),
    "dropped-expert": (_drop_expert, "missing experts"),
    "unknown-dtype": (_set("experts.0.tensors.0.dtype", "F7"), "unknown dtype"),
    "shape-vs-nbytes": (_set("experts.0.tensors.0.shape", [1, 2]), "disagree with shape"),
    "tensor-past-expert": (_set("experts.0.tensors.2.offset", 1 << 30), "past the expert"),
    "expert-nbytes": (_set("experts.0.nbytes", 8), "past the expert"),
    "tensor-order": (_swap_tensor_order, "canonical order"),
    "tensor-offset": (_set("experts.0.tensors.1.offset", 2), "not the canonical layout"),
    "shape-edit": (_set("experts.0.tensors.0.shape", "16x24"), "shape"),
    "checksum-not-hex": (_set("experts.0.checksum", "xyz"), "16 hex digits"),
    "entry-not-object": (_set("experts.0", [1, 2]), "not an object"),
    "no-tensors": (_set("experts.0.tensors", []), "non-empty list"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_manifest_is_a_checkpoint_error_naming_it(packs: Packs, tmp_path: Path, case: str) -> None:
    root = copy_pack(packs.get("mixtral"), tmp_path / "p")
    path = root / PACK_MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit, message = TAMPER[case]
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message) as info:
        load_packed_layout(root)
    assert info.value.file is not None
    assert info.value.file.endswith((PACK_MANIFEST_NAME, DATA_NAME))


@pytest.mark.parametrize("content", ["", "{", "[]", "\xff"])
def test_unreadable_manifest_is_a_checkpoint_error(packs: Packs, tmp_path: Path, content: str) -> None:
    root = copy_pack(packs.get("mixtral"), tmp_path / "p")
    (root / PACK_MANIFEST_NAME).write_text(content, encoding="latin-1")
    with pytest.raises(CheckpointError, match="manifest") as info:
        open_checkpoint(root)
    assert info.value.file == str((root / PACK_MANIFEST_NAME).resolve())


def test_pack_without_config_is_rejected(packs: Packs, tmp_path: Path) -> None:
    root = copy_pack(packs.get("mixtral"), tmp_path / "p")
    (root / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        open_checkpoint(root)


# --- crash safety and misuse -------------------------------------------------------------------------


def test_interrupted_pack_leaves_nothing_that_looks_like_a_pack(
    checkpoints: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    real = pack_module._write_block

    def failing(out: Any, data: memoryview) -> None:
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(len(data))
        real(out, data)

    monkeypatch.setattr(pack_module, "_write_block", failing)
    dst = tmp_path / "out" / "pack"
    with pytest.raises(OSError, match="No space left"):
        pack_checkpoint(checkpoints.get("mixtral"), dst, progress=False)
    assert len(written) == 3
    assert not dst.exists()
    assert list((tmp_path / "out").iterdir()) == [], "the temporary directory is removed"
    with pytest.raises(CheckpointError):
        open_checkpoint(dst)


def test_pack_killed_mid_write_never_has_a_manifest(checkpoints: Any, tmp_path: Path) -> None:
    """A real crash (SIGKILL, no cleanup): only a hidden partial directory without a manifest remains."""
    dst = tmp_path / "pack"
    script = textwrap.dedent(
        f"""
        import os, signal
        from expertflow.tiers import pack
        real = pack._write_block
        count = [0]
        def dying(out, data):
            real(out, data)
            count[0] += 1
            if count[0] == 4:
                out.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        pack._write_block = dying
        pack.pack_checkpoint({str(checkpoints.get("mixtral"))!r}, {str(dst)!r}, progress=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not dst.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".pack.partial-")]
    assert len(partial) == 1
    assert (partial[0] / DATA_NAME).stat().st_size > 0
    assert not (partial[0] / PACK_MANIFEST_NAME).exists()
    with pytest.raises(CheckpointError):
        open_checkpoint(dst)


def test_pack_refuses_a_non_empty_destination_and_accepts_an_empty_one(
    checkpoints: Any, tmp_path: Path
) -> None:
    src = checkpoints.get("olmoe")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        pack_checkpoint(src, full, progress=False)
    assert (full / "keep.txt").read_text() == "precious"
    with pytest.raises(CheckpointError, match="not an empty directory"):
        pack_checkpoint(src, src, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert open_checkpoint(pack_checkpoint(src, empty, progress=False)).packed


def test_pack_refuses_a_dense_model(tmp_path: Path) -> None:
    save_dense_checkpoint(tmp_path / "llama", layers=1)
    with pytest.raises(UnsupportedModelError, match="nothing to pack"):
        pack_checkpoint(tmp_path / "llama", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_pack_reports_success_and_typed_errors(
    checkpoints: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = checkpoints.get("phimoe")
    assert cli_main(["pack", str(src), str(tmp_path / "p"), "--no-progress"]) == 0
    assert "packed" in capsys.readouterr().out
    assert open_checkpoint(tmp_path / "p").packed
    assert cli_main(["pack", str(src), str(tmp_path / "p"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(tmp_path / "p") in err


def test_model_loads_from_a_pack_and_computes_like_the_source(checkpoints: Any, packs: Packs) -> None:
    from expertflow.model.loader import load_model

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = []
    for root in (checkpoints.get("mixtral"), packs.get("mixtral")):
        model = load_model(root)
        try:
            with torch.inference_mode():
                model(input_ids=ids)  # every expert resident: one wave per layer, no timing in the result
                logits.append(model(input_ids=ids).logits)
        finally:
            model.close()
    assert torch.equal(logits[0], logits[1])
