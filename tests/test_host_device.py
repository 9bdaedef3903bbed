"""Host pool and device tiers: fixed budgets, alignment, no second copy on CPU, copies into separate slots."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import torch

from expertflow.errors import BudgetError, StoreClosedError
from expertflow.pipeline.runtime import LoopThread
from expertflow.tiers.device import CopyDeviceTier, SharedDeviceTier
from expertflow.tiers.host import HostPool
from expertflow.tiers.nvme import buffer_address


def test_pool_never_exceeds_its_budget_and_buffers_are_page_aligned():
    pool = HostPool(10_000, budget_bytes=100_000)
    try:
        assert pool.buffer_nbytes == 12_288  # rounded up to 4 KiB for O_DIRECT
        assert pool.num_buffers == 8 and pool.nbytes == 8 * 12_288 <= 100_000
        for i in range(pool.num_buffers):
            assert buffer_address(pool.buffer(i)) % 4096 == 0
            assert len(pool.buffer(i)) == pool.buffer_nbytes
        with pytest.raises(IndexError):
            pool.buffer(8)
    finally:
        pool.close()


def test_pool_smaller_than_one_buffer_is_a_budget_error():
    with pytest.raises(BudgetError, match="cannot hold one expert buffer"):
        HostPool(1 << 20, budget_bytes=(1 << 20) - 1)


def test_pinning_without_cuda_falls_back_to_ordinary_memory(caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinning really happens")
    with caplog.at_level(logging.WARNING):
        pool = HostPool(4096, budget_bytes=4 * 4096, pin=True)
    try:
        assert not pool.pinned
        assert "pinned host memory needs CUDA" in caplog.text
    finally:
        pool.close()


def test_pool_buffers_and_tensor_rows_are_the_same_memory():
    pool = HostPool(4096, budget_bytes=3 * 4096)
    try:
        pool.buffer(1)[:4] = b"\x01\x02\x03\x04"
        assert pool.tensor[1, :4].tolist() == [1, 2, 3, 4]
        assert pool.tensor[0, :4].tolist() == [0, 0, 0, 0]
    finally:
        pool.close()


def test_shared_device_tier_is_the_host_pool_without_a_second_copy():
    pool = HostPool(4096, budget_bytes=4 * 4096)
    try:
        tier = SharedDeviceTier(pool)
        assert tier.num_slots == pool.num_buffers
        assert tier.arena.data_ptr() == pool.tensor.data_ptr()
        asyncio.run(tier.upload(pool, 2, 2, 4096))
        with pytest.raises(ValueError):
            asyncio.run(tier.upload(pool, 1, 2, 4096))
    finally:
        pool.close()


def test_copy_device_tier_copies_a_host_buffer_into_its_own_slot():
    pool = HostPool(4096, budget_bytes=2 * 4096)
    try:
        tier = CopyDeviceTier("cpu", num_slots=3, slot_nbytes=pool.buffer_nbytes)
        pool.buffer(1)[:8] = bytes(range(8))
        asyncio.run(tier.upload(pool, 1, 2, 8))
        tier.wait_ready(2)
        assert tier.arena[2, :8].tolist() == list(range(8))
        assert tier.arena.data_ptr() != pool.tensor.data_ptr()
        tier.close()
    finally:
        pool.close()


@pytest.mark.cuda
def test_cuda_device_tier_copies_on_its_own_stream():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pool = HostPool(4096, budget_bytes=2 * 4096)
    try:
        assert pool.pinned
        tier = CopyDeviceTier("cuda", num_slots=2, slot_nbytes=pool.buffer_nbytes)
        pool.buffer(0)[:4] = b"\x05\x06\x07\x08"
        asyncio.run(tier.upload(pool, 0, 1, 4))
        tier.wait_ready(1)
        assert tier.arena[1, :4].cpu().tolist() == [5, 6, 7, 8]
        tier.close()
    finally:
        pool.close()


def test_loop_thread_runs_coroutines_and_joins_on_close():
    rt = LoopThread()
    try:

        async def add(a: int, b: int) -> int:
            await asyncio.sleep(0)
            return a + b

        assert rt.run(add(2, 3)) == 5

        async def forever() -> None:
            await asyncio.Event().wait()

        pending = rt.submit(forever())
    finally:
        rt.close()
    assert pending.cancelled()
    assert not rt.thread.is_alive()
    assert rt.thread not in threading.enumerate()
    with pytest.raises(StoreClosedError):
        rt.submit(add(1, 1))


def test_loop_thread_refuses_sync_calls_from_its_own_loop():
    rt = LoopThread()
    try:

        async def reenter() -> None:
            async def inner() -> None:
                return None

            rt.submit(inner())

        with pytest.raises(RuntimeError, match="own event loop"):
            rt.run(reenter())
    finally:
        rt.close()
