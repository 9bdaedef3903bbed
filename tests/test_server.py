"""The expert daemon: real ``expertflow-store serve`` processes (and in-process servers) on loopback.

Every expert a client receives is compared byte for byte with the checkpoint read by the NVMe tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time

import msgpack
import pytest
import zmq
import zmq.asyncio

from expertflow.core import ExpertKey
from expertflow.errors import ConfigError, RemoteError
from expertflow.services.monitoring import prometheus_text
from expertflow.services.server import ExpertServer, ServerConfig
from expertflow.tiers.fingerprint import content_fingerprint
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.nvme import NvmeTier
from expertflow.tiers.safetensors_index import open_checkpoint
from expertflow.wire import payload as pl
from expertflow.wire import protocol as P
from expertflow.wire.client import ExpertClient
from expertflow.wire.keys import keygen
from tests.checkpoints import save_checkpoint
from tests.server_helpers import daemon
from tests.store_helpers import GatedSource

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def reference(mixtral_layout: ExpertLayout) -> dict[ExpertKey, list[bytes]]:
    """Each expert's tensors (canonical order) as the NVMe tier reads them."""
    with NvmeTier(mixtral_layout, "mmap") as nvme:
        out = {}
        for key in sorted(mixtral_layout.experts):
            buf = nvme.read_expert(key)
            out[key] = [bytes(buf[off : off + t.nbytes]) for t, off in mixtral_layout.spec(key).views()]
        return out


def _slot(layout: ExpertLayout) -> int:
    return -(-layout.max_expert_nbytes // 4096) * 4096


def _check(reply: P.Reply, reference: dict[ExpertKey, list[bytes]]) -> ExpertKey:
    assert isinstance(reply, P.ExpertReply), reply
    pl.verify(reply)
    assert [bytes(t.data) for t in reply.tensors] == reference[reply.key]
    return reply.key


async def _get_all(client: ExpertClient, keys, reference) -> list[ExpertKey]:
    return [_check(r, reference) async for r in client.get(keys)]


# --- daemon processes -----------------------------------------------------------------------------------


async def test_daemon_serves_every_expert_byte_exact_over_tcp_and_ipc(
    mixtral_dir, mixtral_layout, reference, tmp_path
) -> None:
    binds = ("tcp://127.0.0.1:*", f"ipc://{tmp_path}/store.sock")
    with daemon(mixtral_dir, binds, "--mem", str(4 * _slot(mixtral_layout))) as proc:
        assert proc.endpoints[0].startswith("tcp://127.0.0.1:") and proc.endpoints[1].startswith("ipc://")
        for address in proc.endpoints:
            async with ExpertClient(address, timeout=10) as client:
                hello = await client.hello()
                assert hello.fingerprint == content_fingerprint(mixtral_layout)
                assert hello.server.experts == len(mixtral_layout.experts)
                assert (
                    sorted(await _get_all(client, mixtral_layout.keys(), reference)) == mixtral_layout.keys()
                )
                # A 4-expert cache served 24 experts: it evicted and read again.
                stats = await client.stat()
                assert stats["cache_capacity_experts"] == 4 and stats["cache_evictions"] > 0
        assert proc.terminate() == 0
    assert "stopped" in proc.log()


async def test_many_concurrent_clients_each_get_correct_experts(
    mixtral_dir, mixtral_layout, reference
) -> None:
    with daemon(mixtral_dir, ("tcp://127.0.0.1:*",), "--mem", str(6 * _slot(mixtral_layout))) as proc:
        rng = random.Random(0)
        orders = [rng.sample(mixtral_layout.keys(), len(mixtral_layout.keys())) for _ in range(12)]
        clients = [ExpertClient(proc.address, timeout=20) for _ in orders]
        try:
            # Each client also pipelines: its keys go out as three requests at once.
            async def run(client: ExpertClient, keys: list[ExpertKey]) -> list[ExpertKey]:
                parts = await asyncio.gather(*(_get_all(client, keys[i::3], reference) for i in range(3)))
                return [k for part in parts for k in part]

            results = await asyncio.gather(*(run(c, o) for c, o in zip(clients, orders)))
            for got in results:
                assert sorted(got) == mixtral_layout.keys()
            stats = await clients[0].stat()
            assert stats["experts_sent"] == len(orders) * len(mixtral_layout.keys())
            assert stats.get("internal_errors", 0) == 0 and stats.get("errors_total", 0) == 0
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))


def _fuzz_messages(rng: random.Random, count: int) -> list[list[bytes]]:
    """Malformed requests of every kind a broken or hostile client could send (each fits the header limit)."""
    valid_get = msgpack.packb({"v": P.PROTOCOL_VERSION, "op": "get", "id": 7, "keys": [[0, 1], [1, 2]]})
    junk_values = [None, True, -1, -(2**40), 1.5, "x", b"\x00", [], {}, [[0, 0]], {"a": 1}, [0, 0, 0]]
    out: list[list[bytes]] = []
    for i in range(count):
        kind = i % 10
        if kind == 0:
            frames = [rng.randbytes(rng.randint(0, 200))]
        elif kind == 1:
            frames = [valid_get[: rng.randint(0, len(valid_get) - 1)]]
        elif kind == 2:
            head = {"v": P.PROTOCOL_VERSION, "op": "get", "id": rng.randint(1, 99), "keys": [[0, 1]]}
            head[rng.choice(["v", "op", "id", "keys"])] = rng.choice(junk_values)
            frames = [msgpack.packb(head)]
        elif kind == 3:
            frames = [
                msgpack.packb(
                    {"v": P.PROTOCOL_VERSION, "op": rng.choice(["put", "GET", "", "expert", "done"]), "id": 3}
                )
            ]
        elif kind == 4:
            frames = [
                msgpack.packb(
                    {
                        "v": P.PROTOCOL_VERSION,
                        "op": "get",
                        "id": 4,
                        "keys": [[0, 0]] * rng.randint(1025, 3000),
                    }
                )
            ]
        elif kind == 5:
            frames = [
                msgpack.packb(
                    {"v": P.PROTOCOL_VERSION, "op": "get", "id": 5, "keys": [[rng.randint(50, 10**6), 0]]}
                )
            ]
        elif kind == 6:
            frames = [valid_get, rng.randbytes(rng.randint(0, 100))]
        elif kind == 7:
            frames = [b"\x91" * rng.randint(100, 5000)]  # deeply nested arrays
        elif kind == 8:
            frames = [msgpack.packb([1, "get", 3]), b""]
        else:
            blob = bytearray(valid_get)
            for _ in range(rng.randint(1, 4)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            frames = [bytes(blob)]
        out.append(frames)
    return out


async def test_fuzzed_messages_get_error_replies_and_the_daemon_keeps_serving(
    mixtral_dir, mixtral_layout, reference
) -> None:
    with daemon(mixtral_dir, ("tcp://127.0.0.1:*",), "--mem", str(4 * _slot(mixtral_layout))) as proc:
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(proc.address)
        messages = _fuzz_messages(random.Random(1234), 3000)
        errors: dict[str, int] = {}
        replies = 0

        async def drain() -> None:
            nonlocal replies
            while True:
                frames = await sock.recv_multipart()
                reply = P.decode_reply(frames)  # every reply the daemon sends is itself well formed
                # A request is answered when its last reply comes: a get's done, or one error for the request.
                if not isinstance(reply, (P.ExpertReply, P.ErrorReply)) or (
                    isinstance(reply, P.ErrorReply) and reply.key is None
                ):
                    replies += 1
                if isinstance(reply, P.ErrorReply):
                    errors[reply.code.value] = errors.get(reply.code.value, 0) + 1

        reader = asyncio.create_task(drain())
        deadline = time.monotonic() + 90
        try:
            for sent, frames in enumerate(messages):
                await sock.send_multipart(frames)
                # A client that reads as it sends: at most 64 requests ahead of their answers. One that does not read is dropped past max_unsent_replies, by design (its own test);
                # under load these 3000 messages did that when sent without waiting.
                while sent - replies >= 64 and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
            # Wait while replies keep coming (a loaded machine answers slowly), at most 60 s in all.
            seen, idle = -1, 0
            for _ in range(1200):
                count = sum(errors.values())
                if count >= 2700 or idle >= 100:
                    break
                seen, idle = count, (idle + 1 if count == seen else 0)
                await asyncio.sleep(0.05)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            sock.close(linger=0)
        assert proc.proc.poll() is None, proc.log()
        assert sum(errors.values()) >= 2700, (errors, proc.log()[-3000:])
        for code in ("BAD_MESSAGE", "UNKNOWN_OP", "TOO_MANY_KEYS", "UNKNOWN_EXPERT"):
            assert errors.get(code, 0) > 0, errors
        async with ExpertClient(proc.address, timeout=10) as client:
            assert sorted(await _get_all(client, mixtral_layout.keys(), reference)) == mixtral_layout.keys()
            stats = await client.stat()
        assert stats["errors_total"] >= 2700 and stats.get("internal_errors", 0) == 0


async def test_an_oversized_request_is_dropped_and_others_are_still_served(
    mixtral_dir, mixtral_layout, reference
) -> None:
    with daemon(mixtral_dir, ("tcp://127.0.0.1:*",)) as proc:
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(proc.address)
        huge = msgpack.packb(
            {"v": P.PROTOCOL_VERSION, "op": "get", "id": 1, "keys": [[i % 3, 0] for i in range(100_000)]}
        )
        assert len(huge) > P.DEFAULT_LIMITS.max_header_bytes
        await sock.send_multipart([huge])
        await sock.send_multipart([b"x" * (10 * 2**20)])
        await asyncio.sleep(0.3)
        sock.close(linger=0)
        async with ExpertClient(proc.address, timeout=10) as client:
            assert (
                sorted(await _get_all(client, mixtral_layout.keys()[:5], reference))
                == mixtral_layout.keys()[:5]
            )
        assert proc.proc.poll() is None


def test_stat_cli_prints_json_and_prometheus_counters(mixtral_dir) -> None:
    with daemon(mixtral_dir, ("tcp://127.0.0.1:*",)) as proc:
        cli = [sys.executable, "-m", "expertflow.services"]
        out = subprocess.run(
            [*cli, "stat", proc.address, "--json"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        counters = json.loads(out.stdout)
        assert counters["experts_total"] == 24 and counters["requests_stat"] == 1
        prom = subprocess.run(
            [*cli, "stat", proc.address, "--prometheus"], capture_output=True, text=True, timeout=60
        )
        assert f'expertflow_store_requests_total{{server="{proc.address}"}} 2' in prom.stdout
        assert "# TYPE expertflow_store_cache_resident_experts gauge" in prom.stdout
        ping = subprocess.run([*cli, "ping", proc.address], capture_output=True, text=True, timeout=60)
        assert ping.returncode == 0 and "alive" in ping.stdout
    dead = subprocess.run(
        [*cli, "ping", "tcp://127.0.0.1:1", "--timeout", "0.3"], capture_output=True, text=True, timeout=60
    )
    assert dead.returncode == 2 and "TIMEOUT" in dead.stderr


def test_serve_refuses_a_wrong_model_directory_with_a_clear_error(tmp_path) -> None:
    cli = [sys.executable, "-m", "expertflow.services", "serve", str(tmp_path), "--bind", "tcp://127.0.0.1:*"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error:") and "Traceback" not in out.stderr


# --- CURVE ---------------------------------------------------------------------------------------------


async def test_curve_serves_allowed_keys_and_gives_unknown_keys_nothing(
    mixtral_dir, mixtral_layout, reference, tmp_path
) -> None:
    keygen(tmp_path / "server", "server")
    keygen(tmp_path / "allowed", "alice")
    keygen(tmp_path / "other", "mallory")
    extra = (
        "--curve-secret",
        str(tmp_path / "server/server.key_secret"),
        "--allow-keys",
        str(tmp_path / "allowed"),
    )
    with daemon(mixtral_dir, ("tcp://127.0.0.1:*",), *extra) as proc:
        server_key = str(tmp_path / "server/server.key")
        async with ExpertClient(
            proc.address,
            timeout=10,
            curve_server_key=server_key,
            curve_client_secret=str(tmp_path / "allowed/alice.key_secret"),
        ) as alice:
            assert (
                sorted(await _get_all(alice, mixtral_layout.keys()[:4], reference))
                == mixtral_layout.keys()[:4]
            )
        async with ExpertClient(
            proc.address,
            timeout=5,
            curve_server_key=server_key,
            curve_client_secret=str(tmp_path / "other/mallory.key_secret"),
        ) as mallory:
            with pytest.raises(RemoteError) as info:
                await mallory.hello()
            assert info.value.code == "UNAUTHORIZED"
        async with ExpertClient(proc.address, timeout=0.5) as plain:
            with pytest.raises(RemoteError) as info:
                await plain.ping()
            assert info.value.code in {"TIMEOUT", "DISCONNECTED"}
        assert proc.proc.poll() is None


def test_keygen_writes_a_key_pair_and_never_overwrites(tmp_path) -> None:
    cli = [sys.executable, "-m", "expertflow.services", "keygen", str(tmp_path), "--name", "node1"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "node1.key").read_text().count("public-key") == 1
    assert "secret-key" in (tmp_path / "node1.key_secret").read_text()
    assert (tmp_path / "node1.key_secret").stat().st_mode & 0o077 == 0
    again = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


# --- in-process servers: states a test must hold still ----------------------------------------------------


async def _gated_server(layout: ExpertLayout, **kw) -> tuple[ExpertServer, GatedSource]:
    source = GatedSource(NvmeTier(layout, "mmap"), gated=True)
    config = ServerConfig(binds=("tcp://127.0.0.1:*",), mem_bytes=4 * _slot(layout), **kw)
    return await ExpertServer.start(layout, config, sources=[source]), source


async def test_a_client_gone_mid_reply_leaves_nothing_pinned_and_others_are_served(
    mixtral_layout, reference
) -> None:
    server, source = await _gated_server(mixtral_layout)
    try:
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(server.endpoints[0])
        await sock.send_multipart(P.encode_get(1, mixtral_layout.keys()))
        first = await asyncio.wait_for(source.started.get(), 10)
        source.gate(first).set()
        await sock.recv_multipart()  # the first expert arrives; then the client vanishes
        sock.close(linger=0)
        await asyncio.sleep(0.2)
        source.open_all()
        for _ in range(200):
            if not server.stat_counters()["gets_in_flight"]:
                break
            await asyncio.sleep(0.05)
        stat = server.stat_counters()
        assert stat["gets_in_flight"] == 0 and stat["replies_unsent"] == 0
        assert server.store.pinned() == []
        assert server.counters["clients_gone"] == 1
        async with ExpertClient(server.endpoints[0], timeout=10) as client:
            assert sorted(await _get_all(client, mixtral_layout.keys(), reference)) == mixtral_layout.keys()
    finally:
        await server.aclose()


async def test_a_client_over_its_in_flight_limit_gets_busy(mixtral_layout, reference) -> None:
    server, source = await _gated_server(mixtral_layout, limits=P.Limits(max_in_flight=2))
    try:
        async with ExpertClient(server.endpoints[0], timeout=10) as client:
            gets = [asyncio.create_task(_get_all(client, [k], reference)) for k in mixtral_layout.keys()[:3]]
            done, _ = await asyncio.wait(gets, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            [busy] = done
            with pytest.raises(RemoteError) as info:
                busy.result()
            assert info.value.code == "BUSY"
            source.open_all()
            rest = await asyncio.gather(*[g for g in gets if g is not busy])
            assert sorted(k for r in rest for k in r) == mixtral_layout.keys()[:2]
    finally:
        await server.aclose()


async def test_shutdown_lets_in_flight_replies_finish_and_refuses_new_gets(mixtral_layout, reference) -> None:
    server, source = await _gated_server(mixtral_layout, grace=10)
    async with ExpertClient(server.endpoints[0], timeout=10) as client:
        get = asyncio.create_task(_get_all(client, mixtral_layout.keys()[:3], reference))
        await asyncio.wait_for(source.started.get(), 10)
        closing = asyncio.create_task(server.aclose())
        await asyncio.sleep(0.1)
        assert not closing.done()  # waiting for the in-flight get
        source.open_all()
        assert sorted(await get) == mixtral_layout.keys()[:3]
        await closing


def test_server_config_rejects_allow_list_without_a_server_key() -> None:
    with pytest.raises(ConfigError, match="--curve-secret"):
        ServerConfig(allow_keys="/tmp")


def test_content_fingerprint_changes_with_weights_not_with_packing(
    tmp_path, mixtral_dir, mixtral_layout
) -> None:
    from expertflow.tiers.pack import pack_checkpoint

    other = open_checkpoint(save_checkpoint("mixtral", tmp_path / "other", seed=1))
    assert other.fingerprint() == mixtral_layout.fingerprint()  # same structure...
    assert content_fingerprint(other) != content_fingerprint(mixtral_layout)  # ...other weights
    packed = open_checkpoint(pack_checkpoint(mixtral_dir, tmp_path / "packed", progress=False))
    assert content_fingerprint(packed) == content_fingerprint(mixtral_layout)


def test_prometheus_text_labels_each_counter_with_its_type() -> None:
    text = prometheus_text({"requests_total": 3, "cache_bytes": 10, "uptime_seconds": 1.5}, 'tcp://h:1"')
    assert 'expertflow_store_requests_total{server="tcp://h:1\\""} 3' in text
    assert "# TYPE expertflow_store_requests_total counter" in text
    assert "# TYPE expertflow_store_cache_bytes gauge" in text


async def test_preload_fills_the_cache_before_any_request(mixtral_dir, mixtral_layout) -> None:
    with daemon(
        mixtral_dir, ("tcp://127.0.0.1:*",), "--mem", str(5 * _slot(mixtral_layout)), "--preload"
    ) as proc:
        async with ExpertClient(proc.address, timeout=10) as client:
            for _ in range(200):
                stats = await client.stat()
                if stats["cache_resident_experts"] == 5:
                    break
                await asyncio.sleep(0.05)
            assert stats["cache_resident_experts"] == 5 and stats["disk_reads"] == 5
            assert stats["requests_get"] == 0


async def test_a_cancelled_read_forgets_its_request_and_ignores_the_late_reply(
    mixtral_layout, reference
) -> None:
    server, source = await _gated_server(mixtral_layout)
    try:
        async with ExpertClient(server.endpoints[0], timeout=10) as client:
            key = mixtral_layout.keys()[0]
            read = asyncio.create_task(client.get_one(key))
            await asyncio.wait_for(source.started.get(), 10)
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
            assert client.requests_in_flight == 0
            source.open_all()
            reply = await client.get_one(mixtral_layout.keys()[1])  # the connection still works...
            assert _check(reply, reference) == mixtral_layout.keys()[1]
            for _ in range(100):  # ...and the abandoned request's reply is dropped as stale
                if client.stale_replies:
                    break
                await asyncio.sleep(0.02)
            assert client.stale_replies >= 1
    finally:
        await server.aclose()


async def test_one_client_cannot_pin_more_than_its_share_of_the_cache(mixtral_layout, reference) -> None:
    source = GatedSource(NvmeTier(mixtral_layout, "mmap"), gated=True)
    config = ServerConfig(binds=("tcp://127.0.0.1:*",), mem_bytes=8 * _slot(mixtral_layout))
    server = await ExpertServer.start(mixtral_layout, config, sources=[source])
    try:
        assert server.client_cap == 2
        keys = mixtral_layout.keys()
        async with (
            ExpertClient(server.endpoints[0], timeout=20) as greedy,
            ExpertClient(server.endpoints[0], timeout=20) as other,
        ):
            stuck = [asyncio.create_task(_get_all(greedy, [k], reference)) for k in keys[:10]]
            for _ in range(2):
                await asyncio.wait_for(source.started.get(), 10)
            await asyncio.sleep(0.2)
            assert len(server.store.pinned()) == 2  # ten gets in flight, two experts held
            source.gate(keys[20]).set()
            assert await _get_all(other, [keys[20]], reference) == [keys[20]]  # the other client is served
            source.open_all()
            served = await asyncio.gather(*stuck)
            assert sorted(k for got in served for k in got) == keys[:10]
        for _ in range(100):
            if not server.stat_counters()["clients_known"]:
                break
            await asyncio.sleep(0.02)
        assert server.stat_counters()["clients_known"] == 0 and server.store.pinned() == []
    finally:
        await server.aclose()


@pytest.mark.parametrize(
    "bind, ok",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True),
        ("ipc:///tmp/x.sock", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://10.1.2.3:5555", False),
    ],
)
def test_a_reachable_address_needs_curve_or_an_explicit_insecure(bind: str, ok: bool) -> None:
    if ok:
        ServerConfig(binds=(bind,))
    else:
        with pytest.raises(ConfigError, match="--insecure"):
            ServerConfig(binds=(bind,))
        ServerConfig(binds=(bind,), insecure=True)
        ServerConfig(binds=(bind,), curve_secret="server.key_secret")


def test_serve_refuses_an_open_bind_before_loading_anything(tmp_path, capsys) -> None:
    from expertflow.cli import store_main

    assert store_main(["serve", str(tmp_path / "nothing-here"), "--bind", "tcp://0.0.0.0:0"]) == 2
    assert "--insecure" in capsys.readouterr().err


_ROGUE_CLIENT = """
import asyncio, dataclasses, json, resource, sys
from expertflow.core import ExpertKey
from expertflow.errors import RemoteError
from expertflow.wire import protocol as P
from expertflow.wire.client import ExpertClient

async def main():
    limits = dataclasses.replace(P.DEFAULT_LIMITS, max_frame_bytes=1 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with ExpertClient(sys.argv[1], timeout=5, limits=limits) as client:
        try:
            await client.get_one(ExpertKey(0, 0))
            outcome = "accepted"
        except RemoteError as exc:
            outcome = exc.code
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"outcome": outcome, "grew": grew}))

asyncio.run(main())
"""


async def test_a_rogue_server_cannot_make_the_client_buffer_a_huge_frame() -> None:
    import json
    import sys

    ctx = zmq.asyncio.Context.instance()
    rogue = ctx.socket(zmq.ROUTER)
    rogue.linger = 0
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    huge = bytes(256 << 20)

    async def answer_everything_with_a_huge_frame() -> None:
        while True:
            identity, head, *_ = await rogue.recv_multipart()
            rid = P.decode_request([head], P.DEFAULT_LIMITS).id
            with contextlib.suppress(zmq.ZMQError):
                await rogue.send_multipart([identity, P.encode_pong(rid)[0], huge], copy=False)

    task = asyncio.create_task(answer_everything_with_a_huge_frame())
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _ROGUE_CLIENT, f"tcp://127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        rogue.close(linger=0)
    result = json.loads(out)
    assert result["outcome"] in ("DISCONNECTED", "TIMEOUT")
    assert result["grew"] < 64 << 20  # the 256 MiB frame was never buffered


async def test_a_connection_that_never_reads_is_dropped_and_its_queue_stays_bounded(
    mixtral_layout, reference
) -> None:
    config = ServerConfig(binds=("tcp://127.0.0.1:*",), max_unsent_replies=16, drop_seconds=60)
    server = await ExpertServer.start(mixtral_layout, config)
    ctx = zmq.asyncio.Context.instance()
    silent = ctx.socket(zmq.DEALER)
    silent.linger = 0
    silent.rcvhwm = 1  # it reads nothing: its replies pile up in socket buffers, then on the server's side
    silent.rcvbuf = 4096
    silent.connect(server.endpoints[0])
    unknown = [[99, e] for e in range(1024)]
    try:
        rid = 0
        while not server.stat_counters()["clients_dropped"] and rid < 100_000:
            for _ in range(200):
                rid += 1
                await silent.send_multipart(P.encode_get(rid, unknown) if rid % 2 else P.encode_ping(rid))
            await asyncio.sleep(0.01)
        assert server.stat_counters()["clients_dropped"] == 1, f"not dropped after {rid} requests"
        for _ in range(50):  # from now on its requests are ignored, not answered into a growing queue
            rid += 1
            await silent.send_multipart(P.encode_ping(rid))
        for _ in range(200):
            if server.stat_counters()["requests_ignored"] >= 50:
                break
            await asyncio.sleep(0.02)
        assert server.stat_counters()["requests_ignored"] >= 50
        async with ExpertClient(server.endpoints[0], timeout=10) as client:  # others are served
            key = mixtral_layout.keys()[3]
            assert await _get_all(client, [key], reference) == [key]
    finally:
        silent.close(linger=0)
        await server.aclose()


async def test_readers_that_never_read_cannot_pin_the_cache(tmp_path) -> None:
    """Four connections ask for experts and read nothing; their pins expire and a normal client is served."""
    from tests.store_helpers import write_moe_checkpoint

    root = write_moe_checkpoint(
        tmp_path / "big", layers=2, experts=8, hidden=512, inter=1024
    )  # 6 MiB experts
    layout = open_checkpoint(root)
    config = ServerConfig(
        binds=("tcp://127.0.0.1:*",), mem_bytes=8 * _slot(layout), unsent_deadline=0.5, unsent_share=0.5
    )
    server = await ExpertServer.start(layout, config)
    ctx = zmq.asyncio.Context.instance()
    silent = []
    try:
        keys = layout.keys()
        for i in range(4):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.rcvhwm = 1
            sock.rcvbuf = 4096
            sock.connect(server.endpoints[0])
            await sock.send_multipart(P.encode_get(1, [[k.layer, k.expert] for k in keys[i * 4 : i * 4 + 4]]))
            silent.append(sock)
        for _ in range(100):
            await asyncio.sleep(0.02)
            assert len(server.store.pinned()) <= server.unsent_cap + 4  # at most one loading per client
        async with ExpertClient(server.endpoints[0], timeout=10) as client:
            got = [r.key async for r in client.get(keys[:8]) if isinstance(r, P.ExpertReply)]
        assert sorted(got) == keys[:8]
        stat = server.stat_counters()
        assert stat["replies_expired"] >= 1 and stat["clients_dropped"] >= 1
        assert stat["limit_unsent_pins"] == 4
    finally:
        for sock in silent:
            sock.close(linger=0)
        await server.aclose()
