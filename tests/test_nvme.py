"""The NVMe tier reads exactly the bytes safetensors loads, in both modes, synchronously and asynchronously."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from expertflow.core import BLOCK, ExpertKey
from expertflow.errors import CheckpointError, ConfigError, ExpertReadError, StoreClosedError
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.nvme import NvmeTier, buffer_address, plan_direct
from expertflow.tiers.safetensors_index import open_checkpoint
from tests.checkpoints import FAMILIES
from tests.store_helpers import aligned

MODES = ("mmap", "direct")


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def reference_experts(layout: ExpertLayout) -> dict[ExpertKey, list[bytes]]:
    """Each expert's tensors as ``safetensors.safe_open(...).get_tensor`` loads them (a row of a fused one)."""
    loaded: dict[str, torch.Tensor] = {}
    out: dict[ExpertKey, list[bytes]] = {}
    with ExitStack() as stack:
        handles = {}
        for key, spec in layout.experts.items():
            parts = []
            for t in spec.tensors:
                if t.source not in loaded:
                    if t.file not in handles:
                        handles[t.file] = stack.enter_context(safe_open(t.file, framework="pt"))
                    loaded[t.source] = handles[t.file].get_tensor(t.source)
                full = loaded[t.source]
                fused = t.source.rsplit(".", 1)[-1] == t.role
                parts.append(tensor_bytes(full[key.expert] if fused else full))
            out[key] = parts
    return out


def assert_expert(layout: ExpertLayout, key: ExpertKey, buf: memoryview, expected: list[bytes]) -> None:
    spec = layout.spec(key)
    got = [bytes(buf[off : off + t.nbytes]) for t, off in spec.views()]
    for t, g, e in zip(spec.tensors, got, expected):
        assert g == e, f"{key} {t.role} differs"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_reads_back_exactly_what_safetensors_loads(checkpoints, family: str, mode: str) -> None:
    layout = open_checkpoint(checkpoints.get(family))
    expected = reference_experts(layout)
    with NvmeTier(layout, mode) as tier, aligned(tier.buffer_nbytes()) as buf:  # type: ignore[arg-type]
        assert buffer_address(buf) % BLOCK == 0
        for key in sorted(layout.experts):
            n = tier.read_into(key, buf)
            assert n == layout.spec(key).nbytes
            assert_expert(layout, key, buf, expected[key])
        assert tier.reads == len(layout.experts)
        assert tier.bytes_read == layout.expert_bytes


@pytest.mark.parametrize("mode", MODES)
def test_single_file_checkpoint_reads_back_exactly(checkpoints, mode: str) -> None:
    layout = open_checkpoint(checkpoints.mixtral_single_file)
    expected = reference_experts(layout)
    with NvmeTier(layout, mode) as tier:  # type: ignore[arg-type]
        for key in sorted(layout.experts):
            data = tier.read_expert(key)
            assert len(data) == layout.spec(key).nbytes
            assert_expert(layout, key, memoryview(data), expected[key])


def test_direct_mode_bypasses_the_page_cache_exactly_when_the_filesystem_allows(checkpoints) -> None:
    layout = open_checkpoint(checkpoints.mixtral_single_file)
    try:
        os.close(os.open(layout.files[0], os.O_RDONLY | os.O_DIRECT))
        supported = True
    except OSError:
        supported = False
    with NvmeTier(layout, "direct") as tier:
        assert tier.direct_io is supported
    with NvmeTier(layout, "mmap") as tier:
        assert not tier.direct_io


# --- hand-crafted layouts that exercise both compaction paths of direct reads ------------------------


def _write_raw(path: Path, tensors: list[tuple[str, str, list[int], bytes]]) -> None:
    """A safetensors file with tensors in exactly the given order and no alignment between them."""
    header: dict[str, object] = {}
    pos = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
    raw = json.dumps(header).encode()
    # Pad the header with spaces (as safetensors does) so that the data starts on a block boundary.
    raw += b" " * (-(8 + len(raw)) % BLOCK)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(d for *_, d in tensors))


def _crafted(tmp_path: Path, order: str) -> tuple[ExpertLayout, dict[ExpertKey, list[bytes]]]:
    """Two experts whose tensors are odd-sized and mixed-dtype, so canonical offsets need padding."""
    g = torch.Generator().manual_seed(7)
    tensors = []
    for e in range(2):
        w1 = torch.randn(3, generator=g).to(
            torch.bfloat16
        )  # 6 bytes: the next F32 tensor needs 2 bytes of padding
        w3 = torch.randn(5, generator=g)  # F32
        w2 = torch.randn(7, generator=g).to(torch.bfloat16)
        parts = {"w1.weight": ("BF16", w1), "w3.weight": ("F32", w3), "w2.weight": ("BF16", w2)}
        for role in order.split(","):
            dtype, t = parts[role]
            tensors.append(
                (f"model.layers.0.block_sparse_moe.experts.{e}.{role}", dtype, list(t.shape), tensor_bytes(t))
            )
    root = tmp_path / order.replace(",", "_")
    root.mkdir()
    _write_raw(root / "model.safetensors", tensors)
    (root / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    layout = open_checkpoint(root)
    return layout, reference_experts(layout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["w1.weight,w3.weight,w2.weight", "w2.weight,w3.weight,w1.weight"])
def test_odd_sized_mixed_dtype_tensors_land_at_their_canonical_offsets(
    tmp_path: Path, mode: str, order: str
) -> None:
    layout, expected = _crafted(tmp_path, order)
    spec = layout.spec(ExpertKey(0, 0))
    assert spec.offsets == (0, 8, 28)  # w1 (6 B) + 2 B padding, w3 (20 B), w2
    plan = plan_direct(spec)
    assert plan.needs_move
    if order.startswith("w1"):
        # Data starts on a block: one run, w1 already in place, w3 2 bytes early -> moved *up* (staged copy).
        assert len(plan.runs) == 1 and not plan.in_place
    else:
        # Reversed on disk: every tensor is its own run, each moved *down* (in place).
        assert len(plan.runs) == 3 and plan.in_place
    with NvmeTier(layout, mode) as tier, aligned(tier.buffer_nbytes()) as buf:  # type: ignore[arg-type]
        for key in sorted(layout.experts):
            tier.read_into(key, buf)
            assert_expert(layout, key, buf, expected[key])


# --- async API ---------------------------------------------------------------------------------------


async def test_async_read_and_read_many_fill_every_buffer(checkpoints) -> None:
    layout = open_checkpoint(checkpoints.get("qwen3_moe"))
    expected = reference_experts(layout)
    keys = layout.keys()
    with NvmeTier(layout, "direct", max_concurrent_reads=2) as tier:
        n = tier.buffer_nbytes()
        with aligned(n * len(keys)) as arena:
            bufs = [arena[i * n : (i + 1) * n] for i in range(len(keys))]
            assert await tier.read(keys[0], bufs[0]) == layout.spec(keys[0]).nbytes
            sizes = await tier.read_many(list(zip(keys, bufs)))
            assert sizes == [layout.spec(k).nbytes for k in keys]
            for k, b in zip(keys, bufs):
                assert_expert(layout, k, b, expected[k])
            assert await tier.read_many([]) == []
            for b in bufs:
                b.release()


class GatedTier(NvmeTier):
    """The real tier, but each blocking read waits for ``gate`` first; ``finished`` counts completed reads."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.ungated: set[ExpertKey] = set()
        self.started = threading.Semaphore(0)
        self.finished = 0
        self._count_lock = threading.Lock()

    def read_into(self, key: ExpertKey, buf: memoryview) -> int:
        self.started.release()
        if key not in self.ungated and not self.gate.wait(timeout=30):
            raise TimeoutError("test gate never opened")
        n = super().read_into(key, buf)
        with self._count_lock:
            self.finished += 1
        return n


async def _wait_started(tier: GatedTier, count: int = 1) -> None:
    for _ in range(count):
        while not tier.started.acquire(blocking=False):
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("cancellations", [1, 3])
async def test_cancelled_read_returns_only_after_the_buffer_is_written(
    checkpoints, cancellations: int
) -> None:
    layout = open_checkpoint(checkpoints.mixtral_single_file)
    key = layout.keys()[0]
    expected = reference_experts(layout)[key]
    with GatedTier(layout, "mmap") as tier, aligned(tier.buffer_nbytes()) as buf:
        task = asyncio.create_task(tier.read(key, buf))
        await _wait_started(tier)
        for _ in range(cancellations):
            task.cancel()
            await asyncio.sleep(0.01)
        # The read is still blocked in its thread: the caller must not have its buffer back yet.
        assert not task.done()
        assert tier.finished == 0
        tier.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The write happened before cancellation reached the caller, and nothing writes afterwards.
        assert tier.finished == 1
        assert_expert(layout, key, buf, expected)


async def test_read_many_failure_waits_for_the_other_reads_before_raising(checkpoints) -> None:
    layout = open_checkpoint(checkpoints.mixtral_single_file)
    keys = layout.keys()[:3]
    with GatedTier(layout, "mmap", max_concurrent_reads=4) as tier:
        n = tier.buffer_nbytes()
        with aligned(n * 3) as arena:
            bufs = [arena[:n], arena[n : 2 * n], arena[2 * n : 2 * n + 8]]  # the last is too small
            tier.ungated.add(keys[2])  # fails at once, while the other two are still reading
            task = asyncio.create_task(tier.read_many(list(zip(keys, bufs))))
            await _wait_started(tier, 3)
            await asyncio.sleep(0.01)
            assert not task.done(), "read_many returned while reads were still writing into buffers"
            tier.gate.set()
            with pytest.raises(ExpertReadError, match="smaller than"):
                await task
            assert tier.finished == 2
            for b in bufs:
                b.release()


async def test_cancelled_read_many_waits_for_every_read(checkpoints) -> None:
    layout = open_checkpoint(checkpoints.mixtral_single_file)
    keys = layout.keys()[:2]
    with GatedTier(layout, "mmap", max_concurrent_reads=2) as tier:
        n = tier.buffer_nbytes()
        with aligned(2 * n) as arena:
            bufs = [arena[:n], arena[n:]]
            task = asyncio.create_task(tier.read_many(list(zip(keys, bufs))))
            await _wait_started(tier, 2)
            task.cancel()
            await asyncio.sleep(0.01)
            assert not task.done()
            tier.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert tier.finished == 2
            for b in bufs:
                b.release()


async def test_concurrent_reads_are_bounded(checkpoints) -> None:
    layout = open_checkpoint(checkpoints.mixtral_single_file)
    keys = layout.keys()[:4]
    with GatedTier(layout, "mmap", max_concurrent_reads=2) as tier:
        n = tier.buffer_nbytes()
        with aligned(4 * n) as arena:
            bufs = [arena[i * n : (i + 1) * n] for i in range(4)]
            task = asyncio.create_task(tier.read_many(list(zip(keys, bufs))))
            await _wait_started(tier, 2)
            await asyncio.sleep(0.02)
            assert not tier.started.acquire(blocking=False), "a third read started past the bound of 2"
            tier.gate.set()
            await task
            assert tier.finished == 4
            for b in bufs:
                b.release()


# --- misuse and bad files ----------------------------------------------------------------------------


def test_bad_arguments_are_typed_errors(checkpoints) -> None:
    layout = open_checkpoint(checkpoints.mixtral_single_file)
    key = layout.keys()[0]
    with pytest.raises(ConfigError):
        NvmeTier(layout, "fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        NvmeTier(layout, "mmap", max_concurrent_reads=0)
    with NvmeTier(layout, "direct") as tier, aligned(tier.buffer_nbytes() + BLOCK) as buf:
        with pytest.raises(ExpertReadError, match="aligned"):
            tier.read_into(key, buf[1 : 1 + tier.buffer_nbytes()])
        with pytest.raises(ExpertReadError, match="smaller than"):
            tier.read_into(key, buf[:16])
        with pytest.raises(ExpertReadError, match="read-only"):
            tier.read_into(key, memoryview(bytes(tier.buffer_nbytes())))
        with pytest.raises(CheckpointError, match="no expert"):
            tier.read_into(ExpertKey(999, 0), buf)


async def test_reads_after_close_raise_store_closed(checkpoints) -> None:
    layout = open_checkpoint(checkpoints.mixtral_single_file)
    tier = NvmeTier(layout, "mmap")
    tier.close()
    tier.close()  # idempotent
    with aligned(tier.buffer_nbytes()) as buf:
        with pytest.raises(StoreClosedError):
            tier.read_into(layout.keys()[0], buf)
        with pytest.raises(StoreClosedError):
            await tier.read(layout.keys()[0], buf)


@pytest.mark.parametrize("mode", MODES)
def test_file_truncated_after_indexing_is_refused_when_opening_the_tier(
    checkpoints, tmp_path: Path, mode: str
) -> None:
    root = tmp_path / "m"
    shutil.copytree(checkpoints.mixtral_single_file, root)
    layout = open_checkpoint(root)
    path = root / "model.safetensors"
    last = max((t for s in layout.experts.values() for t in s.tensors), key=lambda t: t.offset + t.nbytes)
    with open(path, "rb+") as f:
        f.truncate(last.offset + last.nbytes - 1)
    with pytest.raises(CheckpointError, match="needs bytes up to") as info:
        NvmeTier(layout, mode)  # type: ignore[arg-type]
    assert info.value.file == last.file and info.value.tensor == last.source


def _read_truncated(checkpoints, tmp_path: Path, mode: str, *, race: bool) -> str:
    """Open a copy of a checkpoint, cut its file short under the open tier, read the last expert: the
    ExpertReadError's message. ``race``: the file shrinks between the tier's identity check and its read."""
    root = tmp_path / "m"
    shutil.copytree(checkpoints.mixtral_single_file, root)
    layout = open_checkpoint(root)
    spec = max(layout.experts.values(), key=lambda s: max(t.offset for t in s.tensors))
    with NvmeTier(layout, mode) as tier, aligned(tier.buffer_nbytes()) as buf:  # type: ignore[arg-type]
        if race:
            tier._check_unchanged = lambda file, key: None  # type: ignore[method-assign]
        with open(root / "model.safetensors", "rb+") as f:
            f.truncate(min(t.offset for t in spec.tensors) // BLOCK * BLOCK)
        with pytest.raises(ExpertReadError) as info:
            tier.read_into(spec.key, buf)
        message = str(info.value)
        del info  # its traceback holds views of the buffer, which must go before the buffer is unmapped
    return message


@pytest.mark.parametrize("mode", MODES)
def test_file_truncated_while_open_is_refused_before_any_read(checkpoints, tmp_path: Path, mode: str) -> None:
    assert "changed since it was opened" in _read_truncated(checkpoints, tmp_path, mode, race=False)


@pytest.mark.parametrize("mode", MODES)
def test_a_read_that_comes_back_short_is_an_expert_read_error(checkpoints, tmp_path: Path, mode: str) -> None:
    """The size check passed, then the file shrank: the short read itself is caught, no SIGBUS."""
    assert "short read" in _read_truncated(checkpoints, tmp_path, mode, race=True)
