"""The remote tier: a model whose experts come from real daemons computes what transformers computes,
survives a daemon killed mid-generation, and never uses bytes that are not the checkpoint's."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig

from expertflow.assemble import open_async_store
from expertflow.config import StoreConfig
from expertflow.core import ExpertKey
from expertflow.errors import FingerprintMismatchError
from expertflow.model.generate import generate
from expertflow.model.loader import load_model
from expertflow.services.server import ExpertServer, ServerConfig
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.nvme import NvmeTier
from expertflow.tiers.remote import RemoteTier, rendezvous_order
from expertflow.tiers.safetensors_index import open_checkpoint
from expertflow.wire import protocol as P
from tests.checkpoints import save_checkpoint
from tests.server_helpers import CorruptingProxy, daemon

pytestmark = pytest.mark.timeout(180)

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def mixtral_dir(checkpoints, tmp_path_factory) -> Path:
    """A copy of the tiny Mixtral whose experts' local checksums are recorded (``expertflow checksums``), so
    that daemons serve every expert from the first read; ``test_local_checksums`` covers the first reads."""
    from expertflow.cli import main

    path = shutil.copytree(checkpoints.get("mixtral"), tmp_path_factory.mktemp("remote") / "mixtral")
    assert main(["checksums", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def mixtral_layout(mixtral_dir: Path) -> ExpertLayout:
    return open_checkpoint(mixtral_dir)


@pytest.fixture(scope="module")
def expected(mixtral_dir: Path) -> tuple[list[int], list[int]]:
    """A prompt and the unmodified transformers model's greedy continuation of it."""
    config = AutoConfig.from_pretrained(mixtral_dir)
    model = (
        getattr(transformers, config.architectures[0])
        .from_pretrained(mixtral_dir, dtype=torch.float32)
        .eval()
    )
    prompt = torch.randint(0, config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    return prompt[0].tolist(), out[0, prompt.shape[1] :].tolist()


def _slot(layout: ExpertLayout) -> int:
    return -(-layout.max_expert_nbytes // 4096) * 4096


def _config(layout: ExpertLayout, remote: list[str], **kw) -> StoreConfig:
    # A budget of four experts: every MoE layer evicts, so experts are fetched again and again.
    kw.setdefault("remote_timeout", 5.0)
    return StoreConfig(host_bytes=4 * _slot(layout), predictor="none", remote=tuple(remote), **kw)


def test_rendezvous_order_is_stable_and_spreads_experts() -> None:
    servers = [f"tcp://10.0.0.{i}:5555" for i in range(4)]
    keys = [ExpertKey(layer, e) for layer in range(32) for e in range(8)]
    first = Counter(rendezvous_order(servers, k)[0] for k in keys)
    assert set(first) == set(servers) and min(first.values()) > len(keys) / 4 * 0.6
    # Losing a server moves only the experts it held.
    survivors = servers[:3]
    for k in keys:
        full = rendezvous_order(servers, k)
        if full[0] != servers[3]:
            assert rendezvous_order(survivors, k)[0] == full[0]
    assert rendezvous_order(list(reversed(servers)), keys[5]) == rendezvous_order(servers, keys[5])


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_generation_through_a_daemon_matches_transformers(
    transport, mixtral_dir, mixtral_layout, expected, tmp_path
) -> None:
    prompt, want = expected
    bind = "tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{tmp_path}/experts.sock"
    with (
        daemon(mixtral_dir, (bind,), "--mem", str(8 * _slot(mixtral_layout))) as proc,
        load_model(mixtral_dir, config=_config(mixtral_layout, [proc.address])) as model,
    ):
        result = generate(model, prompt, NEW_TOKENS, ignore_eos=True)
        stats = model.expert_stats()
    assert result.tokens == want
    assert stats.reads.get("remote", 0) > len(
        mixtral_layout.experts
    )  # evicted and fetched again, all remotely
    assert stats.reads.get("nvme", 0) == 0 and not stats.source_errors


@pytest.mark.parametrize("fallback", ["replica", "nvme"])
def test_a_daemon_killed_mid_generation_is_survived_with_identical_output(
    fallback, mixtral_dir, mixtral_layout, expected
) -> None:
    prompt, want = expected
    with daemon(mixtral_dir) as a, daemon(mixtral_dir) as b:
        servers = [a, b] if fallback == "replica" else [a]
        config = _config(
            mixtral_layout, [s.address for s in servers], remote_replicas=len(servers), remote_timeout=2.0
        )
        seen: list[int] = []

        def kill_after_third(token: int) -> None:
            seen.append(token)
            if len(seen) == 3:
                a.kill()

        with load_model(mixtral_dir, config=config) as model:
            result = generate(model, prompt, NEW_TOKENS, on_token=kill_after_third, ignore_eos=True)
            stats = model.expert_stats()
            tier = next(
                s for s in model.expert_store.async_store.sources.sources if isinstance(s, RemoteTier)
            )
            by_server = dict(tier.reads_by_server)
        assert a.proc.returncode is not None  # it really died mid-generation
    assert result.tokens == want
    assert by_server[a.address] > 0
    if fallback == "replica":
        assert by_server[b.address] > 0 and stats.reads.get("nvme", 0) == 0
    else:
        assert stats.reads.get("nvme", 0) > 0


def test_a_daemon_serving_other_weights_is_refused(mixtral_dir, mixtral_layout, tmp_path) -> None:
    other = save_checkpoint("mixtral", tmp_path / "other", seed=7)
    with daemon(other) as proc, pytest.raises(FingerprintMismatchError, match="serves checkpoint"):
        load_model(mixtral_dir, config=_config(mixtral_layout, [proc.address]))


@pytest.mark.parametrize("mode", ["flip", "swap"])
async def test_wrong_bytes_from_a_server_are_never_used(mode, mixtral_dir, mixtral_layout) -> None:
    """Replies damaged on the wire (a real ZeroMQ hop) are refused, counted, and read from NVMe instead."""
    with daemon(mixtral_dir) as proc:
        async with CorruptingProxy(proc.address, mode) as proxy:
            config = StoreConfig(remote=(proxy.address,), remote_retries=1, remote_timeout=5.0)
            store = await open_async_store(mixtral_layout, config)
            try:
                keys = mixtral_layout.keys()[:4]
                handles = await store.fetch(keys)
                with NvmeTier(mixtral_layout, "mmap") as nvme:
                    for h in handles:
                        spec = mixtral_layout.spec(h.key)
                        got = bytes(store.host_buffer(h))
                        assert got == bytes(nvme.read_expert(h.key)[: spec.nbytes]), h.key
                store.release(handles)
                stats = store.stats()
                tier = next(s for s in store.sources.sources if isinstance(s, RemoteTier))
            finally:
                await store.aclose()
    assert proxy.damaged >= 4  # damaged replies did reach the client
    assert stats.reads == {"nvme": 4} and stats.source_errors == {"remote": 4}
    if mode == "flip":
        assert tier.counters["checksum_errors"] == 8  # each of 4 experts: the try and the retry
    else:
        assert tier.counters["checksum_errors"] == 0 and tier.counters["errors"] == 4


@pytest.mark.parametrize("lie", ["claim", "relabel"])
async def test_a_lying_daemon_never_changes_a_token(
    lie, mixtral_dir, mixtral_layout, expected, tmp_path
) -> None:
    """``claim``: a daemon on other weights of the same structure says it serves ours (passes ``hello``).
    ``relabel``: a daemon sends another expert's bytes under the key asked for, with a checksum made for that
    key. Both replies verify on their own; only the local copy's checksum tells them apart."""
    from expertflow.tiers.fingerprint import content_fingerprint

    prompt, want = expected
    served = save_checkpoint("mixtral", tmp_path / "other", seed=7) if lie == "claim" else mixtral_dir
    per_layer = sum(1 for k in mixtral_layout.experts if k.layer == mixtral_layout.keys()[0].layer)
    honest = content_fingerprint(mixtral_layout)

    with daemon(served) as proc:
        async with CorruptingProxy(
            proc.address, lie, fingerprint=honest, experts_per_layer=per_layer
        ) as proxy:

            def run() -> tuple[list[int], object, dict[str, int]]:
                with load_model(mixtral_dir, config=_config(mixtral_layout, [proxy.address])) as model:
                    tokens = generate(model, prompt, NEW_TOKENS, ignore_eos=True).tokens
                    tier = next(
                        s for s in model.expert_store.async_store.sources.sources if isinstance(s, RemoteTier)
                    )
                    return tokens, model.expert_stats(), dict(tier.counters)

            tokens, stats, counters = await asyncio.to_thread(run)
    assert proxy.damaged >= 1  # the lie did reach the client
    assert tokens == want
    # The first lie ends the server's use; only the reads already in flight saw a lie too.
    assert 1 <= counters["wrong_bytes"] <= 4 and counters["reads"] == 0
    assert stats.reads.get("remote", 0) == 0
    assert stats.reads["nvme"] == stats.source_errors["remote"]  # every local read is a counted fallback


async def test_a_server_down_at_start_is_used_once_it_comes_up(mixtral_dir, mixtral_layout, tmp_path) -> None:
    address = f"ipc://{tmp_path}/late.sock"
    config = StoreConfig(remote=(address,), remote_timeout=0.3, host_bytes=4 * _slot(mixtral_layout))
    store = await open_async_store(mixtral_layout, config)
    keys = mixtral_layout.keys()

    async def touch(key: ExpertKey) -> None:
        store.release(await store.fetch([key]))

    try:
        for key in keys[:4]:
            await touch(key)
        assert store.stats().reads == {"nvme": 4}  # nobody listening: straight to NVMe
        with daemon(mixtral_dir, (address,)):
            # A four-expert cache cycling through 24 experts reads every time; the tier tries the server
            # again after its back-off, and then serves from it.
            for i in range(4, 400):
                await touch(keys[i % len(keys)])
                if store.stats().reads.get("remote"):
                    break
                await asyncio.sleep(0.05)
            assert store.stats().reads.get("remote", 0) >= 1
    finally:
        await store.aclose()


async def test_a_restarted_daemon_is_used_again_as_soon_as_it_reconnects(
    mixtral_dir, mixtral_layout, tmp_path
) -> None:
    """A long outage grows the back-off to seconds; a daemon that comes back is used again once the
    connection is re-established (and a new ``hello`` passes), not when the back-off ends."""
    address = f"ipc://{tmp_path}/restart.sock"
    config = StoreConfig(remote=(address,), remote_timeout=2.0, host_bytes=4 * _slot(mixtral_layout))
    keys = mixtral_layout.keys()
    first = daemon(mixtral_dir, (address,))
    store = await open_async_store(mixtral_layout, config)
    i = 0

    async def read_one() -> str:
        nonlocal i
        before = store.stats().reads
        store.release(await store.fetch([keys[i % len(keys)]]))
        i += 1
        return next(src for src, n in store.stats().reads.items() if n > before.get(src, 0))

    try:
        tier = next(s for s in store.sources.sources if isinstance(s, RemoteTier))
        assert await read_one() == "remote"
        first.kill()
        for _ in range(200):  # each retry after a back-off fails: it grows 0.5, 1, 2, 4, 8 s (~4 s here)
            if tier.backoff()[address][1] >= 8.0:
                break
            assert await read_one() == "nvme"
            await asyncio.sleep(0.05)
        assert tier.backoff()[address][1] >= 8.0
        with daemon(mixtral_dir, (address,)):
            for _ in range(400):
                left = tier.backoff()[address][0]
                if await read_one() == "remote":
                    break
                await asyncio.sleep(0.02)
            assert left > 0  # used again while its back-off still had time to run
    finally:
        await store.aclose()
        first.kill()


def test_generate_cli_takes_experts_from_a_daemon(mixtral_dir, mixtral_layout, expected, capsys) -> None:
    import json

    from expertflow.cli import main

    prompt, want = expected
    with daemon(mixtral_dir) as proc:
        argv = ["generate", str(mixtral_dir), "--token-ids", ",".join(map(str, prompt))]
        argv += ["--max-new-tokens", str(NEW_TOKENS), "--host-mem", str(4 * _slot(mixtral_layout)), "--json"]
        argv += ["--ignore-eos"]
        assert main([*argv, "--remote", proc.address, "--remote-timeout", "10"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["tokens"] == want
    assert payload["stats"]["reads"].get("remote", 0) > 0 and "nvme" not in payload["stats"]["reads"]


async def test_a_packed_checkpoint_is_served_with_its_manifest_checksums(mixtral_dir, tmp_path) -> None:
    from expertflow.tiers.pack import pack_checkpoint
    from expertflow.wire.client import ExpertClient

    packed = open_checkpoint(pack_checkpoint(mixtral_dir, tmp_path / "packed", progress=False))
    server = await ExpertServer.start(packed, ServerConfig(binds=("tcp://127.0.0.1:*",), preload=True))
    try:
        async with ExpertClient(server.endpoints[0], timeout=10) as client:
            for key in packed.keys()[:6]:
                reply = await client.get_one(key)
                assert reply.checksum == packed.spec(key).checksum
        # The source checkpoint's remote tier accepts the pack's daemon: same experts, same fingerprint.
        store = await open_async_store(mixtral_dir, StoreConfig(remote=(server.endpoints[0],)))
        try:
            store.release(await store.fetch(packed.keys()[:3]))
            assert store.stats().reads == {"remote": 3}
        finally:
            await store.aclose()
    finally:
        await server.aclose()


class _ScriptedServer:
    """A real ZeroMQ ROUTER that passes ``hello`` for ``layout`` and then misbehaves on every ``get``:
    ``busy`` answers BUSY just before the client's deadline; ``flood`` also sends hundreds of replies to
    requests nobody made."""

    def __init__(self, layout: ExpertLayout, mode: str, delay: float) -> None:
        import zmq
        import zmq.asyncio

        from expertflow.tiers.fingerprint import content_fingerprint

        self.layout, self.mode, self.delay = layout, mode, delay
        self.fingerprint = content_fingerprint(layout)
        self.gets = 0
        self._sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self._sock.linger = 0
        self.address = f"tcp://127.0.0.1:{self._sock.bind_to_random_port('tcp://127.0.0.1')}"
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _ScriptedServer:
        self._task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close(linger=0)

    async def _serve(self) -> None:
        info = P.ServerInfo(
            version="scripted", experts=len(self.layout.experts), layers=self.layout.moe_layers,
            max_keys=1024, max_in_flight=64,
        )  # fmt: skip
        while True:
            identity, head, *_ = await self._sock.recv_multipart()
            req = P.decode_request([head], P.DEFAULT_LIMITS)
            if req.op is P.Op.HELLO:
                await self._sock.send_multipart(
                    [identity, *P.encode_hello_reply(req.id, self.fingerprint, info)]
                )
                continue
            self.gets += 1
            if self.mode == "flood":
                for junk in range(1_000_000, 1_000_300):
                    await self._sock.send_multipart([identity, *P.encode_pong(junk)])
            await asyncio.sleep(self.delay)
            await self._sock.send_multipart([identity, *P.encode_error(req.id, P.ErrorCode.BUSY, "busy")])


@pytest.mark.parametrize("mode", ["busy", "flood"])
async def test_a_server_that_stalls_or_floods_is_marked_down_and_nvme_takes_over(
    mode, mixtral_layout
) -> None:
    import time

    timeout = 1.0
    async with _ScriptedServer(mixtral_layout, mode, delay=0.8 * timeout) as rogue:
        config = StoreConfig(
            remote=(rogue.address,), remote_timeout=timeout, remote_retries=5, predictor="none"
        )
        store = await open_async_store(mixtral_layout, config)
        try:
            keys = mixtral_layout.keys()[:12]
            t0 = time.monotonic()
            for key in keys:
                store.release(await store.fetch([key]))
            elapsed = time.monotonic() - t0
            stats = store.stats()
            tier = next(s for s in store.sources.sources if isinstance(s, RemoteTier))
        finally:
            await store.aclose()
    assert stats.reads == {"nvme": 12}
    assert tier.counters["marked_down"] >= 1
    # Each expert waits at most one deadline, and a server marked down is skipped during its back-off:
    # far below 12 experts x 6 tries x 0.8 s.
    assert elapsed < 6 * timeout, elapsed
    assert rogue.gets < 12
