"""Invariants of the tiered store (DESIGN.md): budgets, single flight, pins, priorities, errors, shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import threading

import pytest
import torch

from expertflow.config import StoreConfig
from expertflow.core import ExpertKey
from expertflow.errors import BudgetError, ConfigError, ExpertReadError, StoreClosedError
from expertflow.pipeline.store import AsyncExpertStore
from expertflow.pipeline.sync import ExpertStore
from expertflow.tiers.nvme import NvmeTier
from expertflow.tiers.safetensors_index import open_checkpoint
from tests.store_helpers import GatedSource, reference_tensors, write_moe_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory):
    root = write_moe_checkpoint(tmp_path_factory.mktemp("store") / "moe")
    return root, open_checkpoint(root), reference_tensors(root)


def budget_for(layout, n: int, mode: str = "mmap") -> int:
    """Host bytes that hold exactly ``n`` expert buffers."""
    nv = NvmeTier(layout, mode)
    try:
        per = -(-nv.buffer_nbytes() // 4096) * 4096
    finally:
        nv.close()
    return per * n


async def open_store(layout, slots: int, *, gated=False, fail=(), mode="mmap", separate=False, **cfg):
    source = GatedSource(NvmeTier(layout, mode), gated=gated, fail=fail)
    cfg.setdefault("fetch_timeout", 5.0)
    config = StoreConfig(host_bytes=budget_for(layout, slots, mode), read_mode=mode, **cfg)
    store = await AsyncExpertStore.open(layout, config, sources=[source], separate_device=separate)
    return store, source  # the store owns the source and closes it


def assert_expert_equals(store, handle, reference) -> None:
    layer, expert = handle.key.layer, handle.key.expert
    for role in ("w1.weight", "w2.weight", "w3.weight"):
        name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{role}"
        assert torch.equal(store.tensor(handle.key, handle.slot, role), reference[name]), (handle.key, role)


@pytest.mark.parametrize("mode", ["mmap", "direct"])
@pytest.mark.parametrize("separate", [False, True], ids=["shared-slots", "copy-slots"])
async def test_fetched_experts_hold_the_checkpoint_weights(ckpt, mode, separate):
    _, layout, ref = ckpt
    store, _ = await open_store(layout, 4, mode=mode, separate=separate)
    try:
        for layer in range(3):
            keys = [ExpertKey(layer, e) for e in (1, 5, 2)]
            handles = await store.fetch(keys)
            assert [h.key for h in handles] == keys
            for h in handles:
                assert_expert_equals(store, h, ref)
            store.release(handles)
        assert store.stats().device_misses == 9
    finally:
        await store.aclose()


async def test_stacked_view_matches_each_slot(ckpt):
    _, layout, ref = ckpt
    store, _ = await open_store(layout, 3)
    try:
        handles = await store.fetch([ExpertKey(0, 3), ExpertKey(0, 6)])
        gate_up = store.stacked(0, ("w1.weight", "w3.weight"))
        down = store.stacked(0, "w2.weight")
        assert gate_up.shape == (store.num_slots, 96, 32) and down.shape == (store.num_slots, 32, 48)
        for h in handles:
            prefix = f"model.layers.0.block_sparse_moe.experts.{h.key.expert}"
            expected = torch.cat([ref[f"{prefix}.w1.weight"], ref[f"{prefix}.w3.weight"]])
            assert torch.equal(gate_up[h.slot], expected)
            assert torch.equal(down[h.slot], ref[f"{prefix}.w2.weight"])
    finally:
        await store.aclose()


async def test_concurrent_fetches_of_one_key_share_a_single_read(ckpt):
    _, layout, _ = ckpt
    store, source = await open_store(layout, 4, gated=True)
    try:
        key = ExpertKey(1, 4)
        tasks = [asyncio.create_task(store.fetch([key])) for _ in range(6)]
        assert await asyncio.wait_for(source.started.get(), 5) == key
        await asyncio.sleep(0.01)
        source.open_all()
        results = await asyncio.gather(*tasks)
        assert source.reads == {key: 1}
        assert len({h[0].slot for h in results}) == 1
        for h in results:
            store.release(h)
    finally:
        await store.aclose()


async def test_budget_and_pins_hold_under_seeded_random_load(ckpt):
    """Many concurrent fetches, prefetches and cancels: never more residents than slots, pinned bytes intact."""
    _, layout, ref = ckpt
    slots = 5
    store, _ = await open_store(layout, slots, max_concurrent_reads=3)
    rng = random.Random(7)
    all_keys = layout.keys()
    violations: list[str] = []

    async def client(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(25):
            keys = r.sample(all_keys, r.randint(1, 2))
            handles = await store.fetch(keys)
            await asyncio.sleep(r.random() * 0.002)
            # Pinned experts must still hold their own bytes after other clients churned the cache.
            for h in handles:
                try:
                    assert_expert_equals(store, h, ref)
                except AssertionError as exc:
                    violations.append(str(exc))
            store.release(handles)
            if r.random() < 0.5:
                store.prefetch(r.sample(all_keys, 3), priority=r.random())
            if r.random() < 0.1:
                store.cancel_prefetches()

    async def watchdog(done: asyncio.Event) -> None:
        while not done.is_set():
            resident = len(store.resident())
            held = store.num_slots - store.free_slots
            if resident > slots or held > slots:
                violations.append(f"{resident} resident, {held} slots held > {slots}")
            await asyncio.sleep(0)

    try:
        done = asyncio.Event()
        dog = asyncio.create_task(watchdog(done))
        await asyncio.gather(*(client(rng.randrange(1 << 30)) for _ in range(2)))
        done.set()
        await dog
        assert violations == []
        assert store.stats().host_bytes <= budget_for(layout, slots)
        assert store.pinned() == []
        stats = store.stats()
        assert stats.evictions > 0 and stats.device_misses > slots
    finally:
        await store.aclose()


async def test_pinned_expert_is_never_evicted(ckpt):
    _, layout, ref = ckpt
    store, _ = await open_store(layout, 3)
    try:
        held = await store.fetch([ExpertKey(0, 0)])
        for e in range(1, 8):  # more experts than slots pass through the two free slots
            h = await store.fetch([ExpertKey(1, e)])
            store.release(h)
        assert ExpertKey(0, 0) in store.resident()
        assert_expert_equals(store, held[0], ref)
        store.release(held)
    finally:
        await store.aclose()


async def test_demand_fetch_overtakes_queued_prefetches(ckpt):
    _, layout, _ = ckpt
    store, source = await open_store(layout, 6, gated=True, max_concurrent_reads=1)
    try:
        store.prefetch([ExpertKey(2, e) for e in range(4)], priority=1.0)
        first = await asyncio.wait_for(source.started.get(), 5)  # the single loader is busy with one prefetch
        demand = asyncio.create_task(store.fetch([ExpertKey(0, 7)]))
        await asyncio.sleep(0.01)
        source.open_all()
        handles = await demand
        await asyncio.sleep(0.05)
        assert source.log[0] == first
        assert source.log[1] == ExpertKey(0, 7)  # ahead of the three prefetches still queued
        store.release(handles)
    finally:
        await store.aclose()


async def test_nearer_prefetches_are_loaded_first(ckpt):
    _, layout, _ = ckpt
    store, source = await open_store(layout, 6, gated=True, max_concurrent_reads=1)
    try:
        store.prefetch([ExpertKey(0, 0)], priority=0.0)
        await asyncio.wait_for(source.started.get(), 5)
        store.prefetch([ExpertKey(2, 1)], priority=0.2)
        store.prefetch([ExpertKey(1, 1)], priority=0.9)
        source.open_all()
        for _ in range(2):
            await asyncio.wait_for(source.started.get(), 5)
        assert source.log[1:] == [ExpertKey(1, 1), ExpertKey(2, 1)]
    finally:
        await store.aclose()


async def test_cancelled_prefetches_return_their_buffers(ckpt):
    _, layout, _ = ckpt
    store, source = await open_store(layout, 4, gated=True, max_concurrent_reads=2)
    try:
        store.prefetch([ExpertKey(1, e) for e in range(4)])
        await asyncio.wait_for(source.started.get(), 5)
        await asyncio.wait_for(source.started.get(), 5)  # two loading, two queued
        assert store.free_slots == 2
        assert store.outstanding_prefetches() == [ExpertKey(1, e) for e in range(4)]
        cancelled = store.cancel_prefetches()
        assert cancelled == 4
        source.open_all()
        for _ in range(100):
            if store.free_slots == 4:
                break
            await asyncio.sleep(0.01)
        assert store.free_slots == 4 and store.resident() == []
        assert store.outstanding_prefetches() == []
        assert store.stats().prefetch_cancelled == 4
        # The store keeps working after cancellations.
        handles = await store.fetch([ExpertKey(1, 0)])
        store.release(handles)
    finally:
        await store.aclose()


async def test_prefetched_expert_counts_as_used_when_demanded(ckpt):
    _, layout, _ = ckpt
    store, _ = await open_store(layout, 4)
    try:
        store.prefetch([ExpertKey(2, 2), ExpertKey(2, 3)], priority=1.0)
        for _ in range(100):
            if len(store.resident()) == 2:
                break
            await asyncio.sleep(0.01)
        handles = await store.fetch([ExpertKey(2, 2)])
        stats = store.stats()
        assert stats.device_hits == 1 and stats.prefetch_issued == 2 and stats.prefetch_used == 1
        store.release(handles)
    finally:
        await store.aclose()


async def test_read_error_reaches_only_the_callers_of_that_key(ckpt):
    _, layout, ref = ckpt
    bad = ExpertKey(0, 5)
    store, source = await open_store(layout, 4, fail=[bad])
    try:
        results = await asyncio.gather(
            store.fetch([bad]),
            store.fetch([bad]),
            store.fetch([ExpertKey(0, 1)]),
            return_exceptions=True,
        )
        assert isinstance(results[0], ExpertReadError) and isinstance(results[1], ExpertReadError)
        assert source.reads[bad] == 1  # both callers joined the one failed read
        assert_expert_equals(store, results[2][0], ref)
        store.release(results[2])
        # The failed load gave its slot back: every slot is free or holds a resident expert.
        assert store.free_slots + len(store.resident()) == store.num_slots
        source.fail.clear()
        handles = await store.fetch([bad])  # retried, not cached as failed
        assert_expert_equals(store, handles[0], ref)
        store.release(handles)
    finally:
        await store.aclose()


async def test_all_slots_pinned_gives_budget_error_not_overflow(ckpt):
    _, layout, _ = ckpt
    store, _ = await open_store(layout, 2, fetch_timeout=0.3)
    try:
        held = await store.fetch([ExpertKey(0, 0), ExpertKey(0, 1)])
        with pytest.raises(BudgetError, match="pinned"):
            await store.fetch([ExpertKey(0, 2)])
        with pytest.raises(BudgetError, match="slots"):
            await store.fetch([ExpertKey(1, e) for e in range(3)])
        store.release(held)
        handles = await store.fetch([ExpertKey(0, 2)])
        store.release(handles)
    finally:
        await store.aclose()


async def test_fetch_as_ready_yields_resident_experts_first(ckpt):
    _, layout, ref = ckpt
    store, source = await open_store(layout, 4, gated=True)
    try:
        source.open_all()
        warm = await store.fetch([ExpertKey(1, 6)])
        store.release(warm)
        source.gated = True
        waves = []
        gen = store.fetch_as_ready([ExpertKey(1, 0), ExpertKey(1, 6), ExpertKey(1, 7)])
        first = await gen.__anext__()
        waves.append([h.key for h in first])
        assert waves[0] == [ExpertKey(1, 6)]  # computed while the other two are still being read
        store.release(first)
        source.open_all()
        async for wave in gen:
            for h in wave:
                assert_expert_equals(store, h, ref)
            waves.append([h.key for h in wave])
            store.release(wave)
        assert sorted(k for w in waves[1:] for k in w) == [ExpertKey(1, 0), ExpertKey(1, 7)]
    finally:
        await store.aclose()


async def test_fetch_as_ready_serves_more_keys_than_slots_when_waves_are_released(ckpt):
    _, layout, ref = ckpt
    store, _ = await open_store(layout, 2)
    try:
        seen = []
        async for wave in store.fetch_as_ready([ExpertKey(2, e) for e in range(6)]):
            for h in wave:
                assert_expert_equals(store, h, ref)
                seen.append(h.key.expert)
            store.release(wave)
        assert sorted(seen) == list(range(6))
    finally:
        await store.aclose()


async def test_next_layer_loads_while_current_layer_computes(ckpt):
    """Overlap: reads for layer l+1 start while layer l's experts are pinned by compute."""
    _, layout, _ = ckpt
    store, source = await open_store(layout, 6, gated=True)
    try:
        source.open_all()
        current = await store.fetch([ExpertKey(0, 1), ExpertKey(0, 2)])
        source.gated = True
        store.prefetch([ExpertKey(1, 3), ExpertKey(1, 4)], priority=1.0)
        started = {await asyncio.wait_for(source.started.get(), 5) for _ in range(4)} - {
            ExpertKey(0, 1),
            ExpertKey(0, 2),
        }
        assert started == {ExpertKey(1, 3), ExpertKey(1, 4)}
        assert set(store.pinned()) >= {ExpertKey(0, 1), ExpertKey(0, 2)}  # layer 0 still in use meanwhile
        source.open_all()
        store.release(current)
        nxt = await store.fetch([ExpertKey(1, 3), ExpertKey(1, 4)])
        assert store.stats().prefetch_used == 2
        store.release(nxt)
    finally:
        await store.aclose()


async def test_separate_device_tier_keeps_host_copies_inclusive(ckpt):
    _, layout, ref = ckpt
    source = GatedSource(NvmeTier(layout))
    config = StoreConfig(host_bytes=budget_for(layout, 6), device_slots=2, fetch_timeout=5.0)
    store = await AsyncExpertStore.open(layout, config, sources=[source], separate_device=True)
    try:
        for e in (0, 1, 2, 0, 1, 2):
            h = await store.fetch([ExpertKey(0, e)])
            assert_expert_equals(store, h[0], ref)
            store.release(h)
        stats = store.stats()
        assert sum(source.reads.values()) == 3  # device misses on the second pass are host hits
        assert stats.host_hits == 3 and stats.host_misses == 3
        assert stats.bytes_uploaded == 6 * layout.spec(ExpertKey(0, 0)).nbytes
    finally:
        await store.aclose()


async def test_closed_store_fails_waiters_and_refuses_new_work(ckpt):
    _, layout, _ = ckpt
    store, source = await open_store(layout, 2, gated=True)
    waiter = asyncio.create_task(store.fetch([ExpertKey(0, 0)]))
    await asyncio.wait_for(source.started.get(), 5)
    await store.aclose()
    with pytest.raises(StoreClosedError):
        await waiter
    with pytest.raises(StoreClosedError):
        await store.fetch([ExpertKey(0, 1)])


def test_sync_store_shuts_down_without_leaking_threads_or_files(ckpt):
    root, _, ref = ckpt
    gc.collect()
    threads_before = set(threading.enumerate())
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        with ExpertStore(root, StoreConfig(host_bytes=4 << 20, read_mode="direct")) as store:
            handles = store.fetch([ExpertKey(0, 1), ExpertKey(2, 7)])
            assert_expert_equals(store, handles[0], ref)
            store.prefetch([ExpertKey(1, 1)])
            waves = list(store.fetch_as_ready([ExpertKey(1, 2), ExpertKey(1, 3)]))
            assert sum(len(w) for w in waves) == 2
            store.release(handles)
            for w in waves:
                store.release(w)
            assert store.stats().device_misses >= 4
            del handles, waves
    gc.collect()
    assert set(threading.enumerate()) - threads_before == set()
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_failed_wave_unpins_every_key_exactly_once(ckpt):
    _, layout, _ = ckpt
    bad = ExpertKey(2, 3)

    class FailOne(NvmeTier):
        async def read(self, key, buf):
            if key == bad:
                raise ExpertReadError("injected", key=key)
            return await super().read(key, buf)

    source = FailOne(layout)
    with ExpertStore(layout, StoreConfig(host_bytes=budget_for(layout, 4)), sources=[source]) as store:
        with pytest.raises(ExpertReadError):
            for wave in store.fetch_as_ready([ExpertKey(2, 1), bad, ExpertKey(2, 5)]):
                store.release(wave)
        assert store.pinned() == []  # an extra unpin would have raised inside the store


async def test_prefetch_admission_never_evicts_protected_or_likelier_experts(ckpt):
    _, layout, _ = ckpt
    store, _ = await open_store(layout, 4)
    scores: dict[ExpertKey, float] = {}
    store.set_scorer(lambda key: scores.get(key, 0.0))
    K = ExpertKey

    async def settle(key: ExpertKey) -> None:
        """Until the prefetch of ``key`` has landed or been dropped."""
        dropped = store.stats().prefetch_dropped
        for _ in range(500):
            await asyncio.sleep(0.002)
            if key in store.resident() or store.stats().prefetch_dropped > dropped:
                return

    try:
        for e in range(4):  # one by one: experts loaded together have no defined LRU order among them
            store.release(await store.fetch([K(2, e)]))
        # Full, and every resident expert belongs to the layer just computed: a prefetch may not evict them.
        store.prefetch([K(0, 0)], priority=1.0)
        await settle(K(0, 0))
        assert K(0, 0) not in store.resident() and store.stats().prefetch_refused == 1

        store.release(await store.fetch([K(0, 4)]))  # demand evicts by policy (LRU: L2.E0)
        assert sorted(store.resident()) == [K(0, 4), K(2, 1), K(2, 2), K(2, 3)]
        scores.update({K(2, 1): 0.9, K(2, 2): 0.9, K(2, 3): 0.2})
        store.prefetch([K(1, 5)], priority=0.5)  # may evict only L2.E3: scored below it, outside layers 0-1
        await settle(K(1, 5))
        assert sorted(store.resident()) == [K(0, 4), K(1, 5), K(2, 1), K(2, 2)]

        store.prefetch([K(1, 6)], priority=0.5)  # the rest is likelier (0.9) or protected: refused
        await settle(K(1, 6))
        assert K(1, 6) not in store.resident()
        stats = store.stats()
        assert stats.prefetch_refused == 2 and stats.prefetch_dropped == 2
        assert sorted(store.resident()) == [K(0, 4), K(1, 5), K(2, 1), K(2, 2)]
    finally:
        await store.aclose()


def test_a_resident_layer_is_served_without_the_store_loop(ckpt):
    """All experts resident: fetch_as_ready pins them on the calling thread, even with the loop stuck."""
    _, layout, ref = ckpt
    keys = [ExpertKey(1, 2), ExpertKey(1, 5)]
    with ExpertStore(layout, StoreConfig(host_bytes=budget_for(layout, 4))) as store:
        store.release(store.fetch(keys))
        stuck, unstick = threading.Event(), threading.Event()
        store.runtime.loop.call_soon_threadsafe(lambda: (stuck.set(), unstick.wait(30)))
        assert stuck.wait(5)
        got: list = []
        worker = threading.Thread(target=lambda: got.extend(store.fetch_as_ready(keys)), daemon=True)
        worker.start()
        worker.join(5)
        unstick.set()
        assert not worker.is_alive(), "a resident layer waited for the store's event loop"
        assert [sorted(h.key for h in wave) for wave in got] == [keys]
        assert_expert_equals(store, got[0][0], ref)
        store.release(got[0])
        assert store.pinned() == [] and not store.last_fetch_waited
        assert store.stats().device_hits == 2


def test_a_store_holding_every_expert_gives_fixed_slots_of_resident_experts_only(ckpt):
    """Every expert has a slot: a resident expert's slot is handed out without a pin, and never changes."""
    _, layout, ref = ckpt
    keys = [ExpertKey(1, 2), ExpertKey(1, 5)]
    with ExpertStore(layout, StoreConfig(host_bytes=budget_for(layout, len(layout.experts)))) as store:
        assert store.holds_every_expert
        assert store.fixed_slots(keys) is None  # not resident yet
        handles = store.fetch(keys)
        slots = [h.slot for h in handles]
        store.release(handles)
        assert store.fixed_slots(keys) == slots
        assert store.fixed_slots([*keys, ExpertKey(0, 0)]) is None  # one of them not resident
        assert store.pinned() == []
        hits = store.stats().device_hits
        store.count_hits(2)
        assert store.stats().device_hits == hits + 2
        for layer in range(3):  # load all the others: nothing moves
            store.release(store.fetch([ExpertKey(layer, e) for e in range(8)]))
        assert store.fixed_slots(keys) == slots
        for handle in store.fetch(keys):
            assert_expert_equals(store, handle, ref)
    assert store.fixed_slots(keys) is None  # closed


def test_a_store_smaller_than_the_model_gives_no_fixed_slots(ckpt):
    """Slots are reused when not every expert fits (or when nothing is kept): a slot is only good while pinned."""
    _, layout, _ = ckpt
    keys = [ExpertKey(1, 2)]
    room = budget_for(layout, len(layout.experts))
    for config in (
        StoreConfig(host_bytes=budget_for(layout, len(layout.experts) - 1)),
        StoreConfig(host_bytes=room, policy="none"),
    ):
        with ExpertStore(layout, config) as store:
            assert not store.holds_every_expert
            handles = store.fetch(keys)
            assert store.fixed_slots(keys) is None
            store.release(handles)
            if config.policy != "none":
                assert store.resident() == keys
            assert store.fixed_slots(keys) is None


async def test_prefetch_must_be_likelier_the_busier_the_reads_are(ckpt):
    _, layout, _ = ckpt
    store, source = await open_store(layout, 6, gated=True, max_concurrent_reads=2)
    K = ExpertKey
    try:
        store.prefetch([K(1, 0)], priority=0.3)  # idle read path: a fair chance of use is enough
        assert await asyncio.wait_for(source.started.get(), 5) == K(1, 0)
        source.gate(K(1, 0)).set()
        demand = asyncio.create_task(store.fetch([K(0, 1)]))  # held at its gate: the read path is busy
        assert await asyncio.wait_for(source.started.get(), 5) == K(0, 1)
        await asyncio.sleep(0.15)
        refused = store.stats().prefetch_refused
        store.prefetch([K(2, 2)], priority=0.3)  # unlikely: would cost the demand read more than it saves
        await asyncio.sleep(0.06)
        store.prefetch([K(2, 3)], priority=1.0)  # certain: always worth reading
        assert await asyncio.wait_for(source.started.get(), 5) == K(2, 3)
        assert store.stats().prefetch_refused == refused + 1
        assert K(2, 2) not in source.log
        source.open_all()
        store.release(await demand)
    finally:
        await store.aclose()


async def test_a_budget_without_headroom_admits_only_certain_prefetches(ckpt):
    _, layout, _ = ckpt
    # The process "needs" a terabyte besides the pool: the explicit budget cannot fit, and the store says so.
    store, _ = await open_store(layout, 6, host_reserve_bytes=1 << 40)
    try:
        assert "only" in store.budget.reason and "available" in store.budget.reason
        store.prefetch([ExpertKey(1, 0)], priority=0.9)  # likely, but not certain: refused
        store.prefetch([ExpertKey(1, 1)], priority=1.0)  # certain: read
        for _ in range(200):
            if ExpertKey(1, 1) in store.resident():
                break
            await asyncio.sleep(0.005)
        assert store.resident() == [ExpertKey(1, 1)]
        assert store.stats().prefetch_refused == 1
    finally:
        await store.aclose()


async def test_a_demand_that_found_every_slot_loading_takes_one_when_a_prefetch_lands(ckpt):
    """Both slots are filling with prefetches when a fetch comes: once they land, unpinned, one is evicted for
    the fetch at once (it used to wait for an unpin that the blocked caller could never give: a deadlock
    until the fetch timeout, seen under continuous batching)."""
    _, layout, _ = ckpt
    store, source = await open_store(layout, 2, gated=True, max_concurrent_reads=3, fetch_timeout=3.0)
    K = ExpertKey
    try:
        store.prefetch([K(1, 0), K(1, 1)], priority=1.0)
        for _ in range(2):
            await asyncio.wait_for(source.started.get(), 5)
        fetch = asyncio.create_task(store.fetch([K(2, 2)]))
        await asyncio.sleep(0.05)  # the fetch's load finds both slots loading and waits
        source.gate(K(1, 0)).set()
        source.gate(K(1, 1)).set()
        source.gate(K(2, 2)).set()
        handles = await asyncio.wait_for(fetch, 2.0)  # well before the fetch timeout
        assert [h.key for h in handles] == [K(2, 2)]
        store.release(handles)
    finally:
        source.open_all()
        await store.aclose()


async def test_a_prefetch_admission_would_refuse_is_refused_before_it_reaches_the_loop(ckpt):
    _, layout, _ = ckpt
    store, source = await open_store(layout, 6, host_reserve_bytes=1 << 40)  # no headroom: floor 1.0
    K = ExpertKey
    try:
        store.release(await store.fetch([K(0, 0)]))
        assert store.prefetch_floor() == 1.0
        reads = len(source.log)
        # Screened on the caller's thread: resident keys and keys below the floor are left out, counted.
        kept = await asyncio.to_thread(store.screen_prefetch, [K(0, 0), K(1, 1), K(9, 9)], 0.9)
        assert kept == []
        stats = store.stats()
        assert stats.prefetch_refused == 1 and stats.prefetch_dropped == 1 and stats.prefetch_issued == 0
        assert await asyncio.to_thread(store.screen_prefetch, [K(1, 1), K(1, 2)], 1.0) == [K(1, 1), K(1, 2)]
        assert len(source.log) == reads and store.resident() == [K(0, 0)]
    finally:
        await store.aclose()


@pytest.mark.parametrize("slots", [2, 5])
async def test_predictive_policy_learns_from_each_layer_visit_and_beats_lru_in_a_layer_loop(ckpt, slots):
    """Decode visits layers in a loop, so LRU evicts exactly the layer needed soonest (zero hits once the
    cache is smaller than a pass). The predictive policy, fed each visit by the store, keeps the experts
    whose expected next use is nearest. No predictor is attached: the policy's own statistics do it."""
    _, layout, _ = ckpt
    rng = random.Random(7)
    weights = [8, 4, 2, 1, 1, 1, 1, 1]  # a skewed router, as trained ones are
    passes = [[rng.choices(range(8), weights)[0] for _layer in range(3)] for _token in range(60)]
    hits = {}
    for policy in ("lru", "predictive"):
        store, _ = await open_store(layout, slots, policy=policy)
        try:
            for routing in passes:
                for layer, expert in enumerate(routing):
                    store.release(await store.fetch([ExpertKey(layer, expert)]))
            hits[policy] = store.stats().device_hits
        finally:
            await store.aclose()
    assert hits["predictive"] > max(1.2 * hits["lru"], 10), hits


@pytest.mark.parametrize("separate", [False, True], ids=["shared-slots", "copy-slots"])
async def test_a_fill_transform_runs_once_per_fill_before_anyone_sees_the_slot(ckpt, separate):
    """A conversion that is not a view (a de-interleave) runs on each filled slot exactly once: a re-read
    expert is converted again from its stored bytes, never twice; it is counted; it cannot be set late."""
    _, layout, ref = ckpt
    store, _ = await open_store(layout, 2, separate=separate)
    try:

        def negate(key: ExpertKey, slot: int) -> None:
            store.tensor(key, slot, "w1.weight").neg_()

        store.set_fill_transform(negate)
        name = "model.layers.{}.block_sparse_moe.experts.{}.w1.weight"
        for _ in range(2):  # two passes over four experts with two slots: each is evicted and read again
            for e in range(4):
                (h,) = await store.fetch([ExpertKey(0, e)])
                assert torch.equal(store.tensor(h.key, h.slot, "w1.weight"), -ref[name.format(0, e)])
                down = ref[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"]
                assert torch.equal(store.tensor(h.key, h.slot, "w2.weight"), down)  # other tensors untouched
                store.release([h])
        stats = store.stats()
        assert stats.fill_transforms == stats.device_misses == 8
        assert stats.fill_transform_seconds > 0
        with pytest.raises(ConfigError, match="fresh store"):
            store.set_fill_transform(negate)
    finally:
        await store.aclose()


def test_ranked_prefetches_from_model_code_load_the_likeliest_first(ckpt):
    """The synchronous face takes a layer's predictions at their own priorities in one call: resident keys
    are left out, and the reads start likeliest first."""
    _, layout, _ = ckpt
    source = GatedSource(NvmeTier(layout, "mmap"))
    config = StoreConfig(host_bytes=budget_for(layout, 6), max_concurrent_reads=1, fetch_timeout=5.0)
    K = ExpertKey
    with ExpertStore(layout, config, sources=[source]) as store:
        store.release(store.fetch([K(0, 0)]))
        store.prefetch_ranked([(K(2, 1), 0.5), (K(0, 0), 1.0), (K(1, 1), 0.9), (K(0, 2), 0.2)])
        wanted = [K(1, 1), K(2, 1), K(0, 2)]
        store.release(store.fetch(wanted))  # waits for the prefetches, which are already loading
        assert source.log == [K(0, 0), *wanted]
        stats = store.stats()
        assert stats.prefetch_issued == 3 and stats.prefetch_used == 3
