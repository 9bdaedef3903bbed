"""The daemon's ZMTP front end: whole incoming messages are bounded before they are buffered, and a peer
that breaks ZMTP is closed, while ordinary clients (real libzmq DEALERs) are served as before. Raw peers here
speak ZMTP 3.1 over a plain socket, as an attacker would."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import msgpack
import pytest

from expertflow.core import ExpertKey
from expertflow.services.server import ExpertServer, ServerConfig
from expertflow.wire import protocol as P
from expertflow.wire.client import ExpertClient
from tests.server_helpers import daemon

pytestmark = pytest.mark.timeout(120)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _frame(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    flags = (0x01 if more else 0) | (0x04 if command else 0)
    if len(body) > 255:
        return struct.pack(">BQ", flags | 0x02, len(body)) + body
    return struct.pack(">BB", flags, len(body)) + body


def _ready(socket_type: bytes = b"DEALER") -> bytes:
    prop = bytes([11]) + b"Socket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return _frame(bytes([5]) + b"READY" + prop, command=True)


def _greeting(major: int = 3, minor: int = 1, mechanism: bytes = b"NULL") -> bytes:
    return b"\xff" + bytes(8) + b"\x7f" + bytes([major, minor]) + mechanism.ljust(20, b"\0") + bytes(32)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionResetError("closed")
        out += chunk
    return out


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    flags = _recv_exactly(sock, 1)[0]
    size = struct.unpack(">Q", _recv_exactly(sock, 8))[0] if flags & 0x02 else _recv_exactly(sock, 1)[0]
    return flags, _recv_exactly(sock, size)


def _raw_peer(
    address: str, *, greeting: bytes | None = None, socket_type: bytes = b"DEALER"
) -> socket.socket:
    """A plain socket that has done the ZMTP 3.1 NULL handshake with ``address`` (tcp://host:port)."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(greeting or _greeting())
    assert _recv_exactly(sock, 64)[:1] == b"\xff"
    sock.sendall(_ready(socket_type))
    flags, body = _read_frame(sock)
    assert flags & 0x04 and body[1:6] == b"READY"
    return sock


def _closed_by_peer(sock: socket.socket, within: float = 5.0) -> bool:
    """Whether the daemon closes ``sock`` within ``within`` s in all (whatever it sends meanwhile): well inside
    its 10 s idle timeout, so that a close is the defence under test and not the peer's silence."""
    import time

    deadline = time.monotonic() + within
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


@pytest.mark.parametrize("frame_bytes", [60_000, 1 << 20])
def test_an_unending_multipart_request_is_cut_off_before_the_daemon_buffers_it(
    mixtral_dir, frame_bytes
) -> None:
    """The audit's attack: 60 KB frames, each with MORE, never a last one. Each frame is under the per-frame
    limit; together they are over the whole-message limit after two, and the daemon closes the connection
    having buffered at most that. Its memory does not grow, and other clients are served throughout. With
    1 MiB frames the frame-count limit (64) alone would let 64 MiB in: only the byte limit stops it."""
    with daemon(mixtral_dir, ("tcp://127.0.0.1:*",), "--mem", "8MiB") as proc:
        before = _rss_bytes(proc.proc.pid)
        sock = _raw_peer(proc.address)
        frame = _frame(bytes(frame_bytes), more=True)
        sent = 0
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range((120 << 20) // frame_bytes):  # 120 MiB if nobody stops it
                sock.sendall(frame)
                sent += len(frame)
        sock.close()
        assert sent < 32 << 20  # cut off once the socket buffers between us filled, not after 120 MB
        grown = _rss_bytes(proc.proc.pid) - before
        assert grown < 16 << 20, f"the daemon grew by {grown >> 20} MiB"

        import asyncio

        async def served() -> dict[str, int | float]:
            async with ExpertClient(proc.address, timeout=10) as client:
                await client.hello()
                assert (await client.get_one(ExpertKey(0, 0))).key == ExpertKey(0, 0)
                return await client.stat()

        stat = asyncio.run(served())
        assert stat["messages_refused"] == 1 and stat["connections_refused"] == 1
        assert stat["limit_request_bytes"] == 64 * 1024
        assert proc.proc.poll() is None


async def test_a_message_of_too_many_frames_closes_the_connection(mixtral_layout) -> None:
    server = await ExpertServer.start(mixtral_layout, ServerConfig(binds=("tcp://127.0.0.1:*",)))
    try:
        import asyncio

        def attack() -> bool:
            sock = _raw_peer(server.endpoints[0])
            try:
                sock.sendall(b"".join(_frame(b"x", more=True) for _ in range(100)) + _frame(b"x"))
            except (BrokenPipeError, ConnectionResetError):
                return True
            return _closed_by_peer(sock)

        assert await asyncio.to_thread(attack)
        assert server.stat_counters()["messages_refused"] == 1
    finally:
        await server.aclose()


@pytest.mark.parametrize(
    "case",
    ["not-zmtp", "zmtp-2", "curve-asked", "pub-socket", "reserved-flags", "huge-command", "unknown-command"],
)
async def test_a_peer_that_breaks_zmtp_is_closed_and_others_are_served(case, mixtral_layout) -> None:
    import asyncio

    server = await ExpertServer.start(mixtral_layout, ServerConfig(binds=("tcp://127.0.0.1:*",)))
    address = server.endpoints[0]

    def misbehave() -> bool:
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        if case in ("not-zmtp", "zmtp-2", "curve-asked"):
            sock = socket.create_connection((host, int(port)), timeout=10)
            greeting = {
                "not-zmtp": b"GET / HTTP/1.1\r\n".ljust(64, b" "),
                "zmtp-2": _greeting(major=2, minor=0),
                "curve-asked": _greeting(mechanism=b"CURVE"),
            }[case]
            sock.sendall(greeting)
        elif case == "pub-socket":
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(_greeting())
            _recv_exactly(sock, 64)
            sock.sendall(_ready(b"PUB"))
        else:
            sock = _raw_peer(address)
            sock.sendall(
                {
                    "reserved-flags": b"\x80\x01x",
                    "huge-command": struct.pack(">BQ", 0x06, 1 << 40),
                    "unknown-command": _frame(bytes([4]) + b"EVIL", command=True),
                }[case]
            )
        return _closed_by_peer(sock)

    try:
        assert await asyncio.to_thread(misbehave)
        assert server.stat_counters()["connections_refused"] == 1
        async with ExpertClient(address, timeout=10) as client:
            await client.hello()
    finally:
        await server.aclose()


async def test_heartbeats_are_answered_and_a_silent_peer_is_closed(mixtral_layout) -> None:
    import asyncio

    config = ServerConfig(binds=("tcp://127.0.0.1:*",), idle_timeout=1.0)
    server = await ExpertServer.start(mixtral_layout, config)

    def talk() -> tuple[bytes, bool]:
        sock = _raw_peer(server.endpoints[0])
        sock.sendall(_frame(bytes([4]) + b"PING" + b"\x00\x0a" + b"ctx", command=True))
        while True:
            flags, body = _read_frame(sock)
            if body[1:5] == b"PONG":
                break
        ping = msgpack.packb({"v": P.PROTOCOL_VERSION, "op": "ping", "id": 5})
        sock.sendall(_frame(ping))
        while True:
            flags, reply = _read_frame(sock)
            if not flags & 0x04:
                break
        closed = _closed_by_peer(sock, within=10.0)  # it never answers the daemon's PINGs
        return body[5:], msgpack.unpackb(reply)["op"] == "pong" and closed

    try:
        context, ok = await asyncio.to_thread(talk)
        assert context == b"ctx" and ok
        assert server.stat_counters()["connections_refused"] == 1
    finally:
        await server.aclose()


# --- CURVE -------------------------------------------------------------------------------------------------


class _RawCurvePeer:
    """The client side of CurveZMQ over a plain socket, as an attacker holding an allowed key would run it."""

    def __init__(
        self, address: str, server_public: bytes, client_public: bytes, client_secret: bytes
    ) -> None:
        import nacl.bindings as nb

        self.nb = nb
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(_greeting(mechanism=b"CURVE"))
        assert _recv_exactly(self.sock, 64)[12:17] == b"CURVE"
        short_public, short_secret = nb.crypto_box_keypair()
        self.nonce = 1
        hello_box = nb.crypto_box(bytes(64), b"CurveZMQHELLO---" + self._next(), server_public, short_secret)
        hello = (
            b"\x05HELLO\x01\x00" + bytes(72) + short_public + struct.pack(">Q", self.nonce - 1) + hello_box
        )
        self.sock.sendall(_frame(hello, command=True))
        _, welcome = _read_frame(self.sock)
        plain = nb.crypto_box_open(welcome[24:], b"WELCOME-" + welcome[8:24], server_public, short_secret)
        server_short, cookie = plain[:32], plain[32:]
        vouch_nonce = bytes(range(16))
        vouch = nb.crypto_box(
            short_public + server_public, b"VOUCH---" + vouch_nonce, server_short, client_secret
        )
        metadata = bytes([11]) + b"Socket-Type" + struct.pack(">I", 6) + b"DEALER"
        box = nb.crypto_box(
            client_public + vouch_nonce + vouch + metadata, b"CurveZMQINITIATE" + self._next(), server_short,
            short_secret,
        )  # fmt: skip
        self.sock.sendall(
            _frame(b"\x08INITIATE" + cookie + struct.pack(">Q", self.nonce - 1) + box, command=True)
        )
        _, ready = _read_frame(self.sock)
        assert ready.startswith(b"\x05READY"), ready[:8]
        self.key = nb.crypto_box_beforenm(server_short, short_secret)

    def _next(self) -> bytes:
        value = struct.pack(">Q", self.nonce)
        self.nonce += 1
        return value

    def message(self, payload: bytes, *, more: bool = False, nonce: bytes | None = None) -> bytes:
        n = nonce or self._next()
        box = self.nb.crypto_box_afternm(
            bytes([1 if more else 0]) + payload, b"CurveZMQMESSAGEC" + n, self.key
        )
        return _frame(b"\x07MESSAGE" + n + box)


@pytest.fixture
def curve_keys(tmp_path: Path) -> dict[str, Path]:
    from expertflow.wire.keys import keygen

    keygen(tmp_path / "server", "server")
    keygen(tmp_path / "allowed", "alice")
    return {"server": tmp_path / "server", "allowed": tmp_path / "allowed"}


def _raw_keys(path: Path) -> tuple[bytes, bytes]:
    import zmq.auth
    from zmq.utils import z85

    public, secret = zmq.auth.load_certificate(str(path))
    return z85.decode(public), z85.decode(secret) if secret else b""


@pytest.mark.parametrize("attack", ["unending", "tampered", "replayed"])
async def test_an_allowed_curve_key_cannot_send_an_unending_or_forged_message(
    attack, curve_keys, mixtral_layout
) -> None:
    """CURVE endpoints are served by the same front end: a peer with an allowed key is bounded per message
    like any other, and a MESSAGE that does not open or reuses a nonce closes its connection."""
    import asyncio

    config = ServerConfig(
        binds=("tcp://127.0.0.1:*",),
        curve_secret=str(curve_keys["server"] / "server.key_secret"),
        allow_keys=str(curve_keys["allowed"]),
    )
    server = await ExpertServer.start(mixtral_layout, config)
    server_public, _ = _raw_keys(curve_keys["server"] / "server.key")
    alice_public, alice_secret = _raw_keys(curve_keys["allowed"] / "alice.key_secret")

    def run() -> tuple[bool, int]:
        peer = _RawCurvePeer(server.endpoints[0], server_public, alice_public, alice_secret)
        sent = 0
        try:
            if attack == "unending":
                for _ in range(120):  # 120 MiB if nobody stops it; 64 frames would be 64 MiB
                    chunk = peer.message(bytes(1 << 20), more=True)
                    peer.sock.sendall(chunk)
                    sent += len(chunk)
            elif attack == "tampered":
                frame = bytearray(
                    peer.message(msgpack.packb({"v": P.PROTOCOL_VERSION, "op": "ping", "id": 1}))
                )
                frame[-1] ^= 0x01
                peer.sock.sendall(bytes(frame))
            else:
                nonce = peer._next()
                ping = msgpack.packb({"v": P.PROTOCOL_VERSION, "op": "ping", "id": 1})
                peer.sock.sendall(peer.message(ping, nonce=nonce) + peer.message(ping, nonce=nonce))
        except (BrokenPipeError, ConnectionResetError):
            return True, sent
        return _closed_by_peer(peer.sock), sent

    try:
        closed, sent = await asyncio.to_thread(run)
        counters = server.stat_counters()
        diagnosis = (closed, sent, {k: v for k, v in counters.items() if k.startswith(("conn", "mess"))})
        assert closed and sent < 32 << 20, diagnosis
        assert counters["connections_refused"] == 1, diagnosis
        assert counters["messages_refused"] == (1 if attack == "unending" else 0), diagnosis
    finally:
        await server.aclose()


async def test_curve_heartbeats_interleaved_with_a_stream_of_replies_keep_nonces_in_order(
    curve_keys, mixtral_layout
) -> None:
    """The listener's PINGs (every 2 s) go out between replies; each frame is sealed in wire order, or the
    client would see a nonce go backwards, drop the connection and lose its requests."""
    import time

    config = ServerConfig(
        binds=("tcp://127.0.0.1:*",),
        curve_secret=str(curve_keys["server"] / "server.key_secret"),
        allow_keys=str(curve_keys["allowed"]),
    )
    server = await ExpertServer.start(mixtral_layout, config)
    try:
        async with ExpertClient(
            server.endpoints[0],
            timeout=10,
            curve_server_key=str(curve_keys["server"] / "server.key"),
            curve_client_secret=str(curve_keys["allowed"] / "alice.key_secret"),
        ) as client:
            keys = mixtral_layout.keys()
            until = time.monotonic() + 5.0  # two and a half heartbeat intervals of back-to-back replies
            rounds = 0
            while time.monotonic() < until:
                got = [r.key async for r in client.get(keys)]
                assert sorted(got) == keys
                rounds += 1
        counters = server.stat_counters()
        assert counters["connections_total"] == 1 and counters["connections_refused"] == 0, counters
        assert rounds > 1
    finally:
        await server.aclose()
