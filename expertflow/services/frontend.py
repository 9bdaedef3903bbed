"""The daemon's ZMTP 3 listener: it bounds every incoming message as a whole before buffering it.

libzmq's ``ZMQ_MAXMSGSIZE`` limits each *frame*, and libzmq delivers a multipart message only once its last
frame arrived: a peer that sends frames with the MORE flag and never a last one makes it buffer without end.
So the daemon does not bind its ROUTER socket to tcp/ipc addresses itself. This front end accepts the
connections, speaks ZMTP 3.0/3.1 (greeting, READY, PING/PONG heartbeats) with the NULL mechanism or with
CurveZMQ (:mod:`expertflow.services.curve`), and reads each frame's declared size *before* its body: a message
whose frames add up to more than ``max_message_bytes`` (or that has more than ``max_frames`` frames) closes the
connection at once, having buffered at most the limit. A complete message is handed to the daemon's ROUTER
over ``inproc`` through a DEALER of the connection's own, so the daemon sees one ordinary client per
connection; replies come back the same way and are written one whole message at a time, straight from the
frames libzmq holds (NULL: no copy; CURVE encrypts, which copies, as libzmq does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import threading
from collections import Counter
from dataclasses import dataclass

import zmq
import zmq.asyncio

from expertflow.aio import cancel_and_wait
from expertflow.errors import ConfigError
from expertflow.services.curve import COMMAND as CURVE_COMMAND
from expertflow.services.curve import MESSAGE_OVERHEAD, CurveError, CurveKeys, CurveSession
from expertflow.services.curve import MORE as CURVE_MORE

log = logging.getLogger("expertflow.server.frontend")

_SIGNATURE_START, _SIGNATURE_END = 0xFF, 0x7F
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_MAX_COMMAND_BYTES = 4096  # READY metadata, PING, ERROR: small by definition
_PING_INTERVAL = 2.0
_UNIX_SNDBUF = 4 << 20


class _Refused(Exception):
    """The peer broke the protocol or a limit: the connection is closed (the reason is logged)."""


@dataclass(frozen=True)
class FrontendLimits:
    max_message_bytes: int = 64 * 1024  # all frames of one incoming message together
    max_frames: int = 64
    idle_timeout: float = 10.0  # no byte from the peer for this long (heartbeats included): closed
    send_deadline: float = 10.0  # one reply not written within this long: the peer is not reading, closed
    queued_requests: int = 64  # complete requests of one connection waiting for the daemon


class _TooLarge(Exception):
    """The frame being read would take its message past the size limit."""


def _greeting(mechanism: bytes, *, as_server: bool) -> bytes:
    return (
        bytes([_SIGNATURE_START])
        + bytes(8)
        + bytes([_SIGNATURE_END, 3, 1])
        + mechanism.ljust(20, b"\0")
        + bytes([1 if as_server else 0])
        + bytes(31)
    )


def _command_frame(data: bytes) -> bytes:
    return _frame_header(len(data), command=True) + data


def _command(name: bytes, body: bytes) -> bytes:
    return _command_frame(bytes([len(name)]) + name + body)


def _split_command(data: bytes) -> tuple[bytes, bytes]:
    if not data or 1 + data[0] > len(data):
        raise _Refused("truncated command name")
    return data[1 : 1 + data[0]], data[1 + data[0] :]


def _frame_header(size: int, *, more: bool = False, command: bool = False) -> bytes:
    flags = (_MORE if more else 0) | (_COMMAND if command else 0)
    if size > 255:
        return struct.pack(">BQ", flags | _LONG, size)
    return struct.pack(">BB", flags, size)


def _properties(socket_type: bytes) -> bytes:
    name = b"Socket-Type"
    return bytes([len(name)]) + name + struct.pack(">I", len(socket_type)) + socket_type


def _parse_metadata(data: bytes) -> dict[bytes, bytes]:
    props: dict[bytes, bytes] = {}
    i = 0
    while i < len(data):
        n = data[i]
        name = data[i + 1 : i + 1 + n]
        i += 1 + n
        if i + 4 > len(data):
            raise _Refused("truncated READY metadata")
        (size,) = struct.unpack_from(">I", data, i)
        i += 4
        if i + size > len(data):
            raise _Refused("truncated READY metadata")
        props[name.lower()] = data[i : i + size]
        i += size
    return props


class _Reader:
    """Exact reads from a non-blocking socket, with an idle timeout; never reads past what is asked."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, idle: float) -> None:
        self.loop, self.sock, self.idle = loop, sock, idle

    async def exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                recv = self.loop.sock_recv_into(self.sock, view[got:])
                k = await (recv if self.idle == float("inf") else asyncio.wait_for(recv, self.idle))
            except asyncio.TimeoutError:
                raise _Refused(f"nothing received for {self.idle} s") from None
            if k == 0:
                raise ConnectionResetError("peer closed the connection")
            got += k
        return bytes(buf)


class _Connection:
    """One peer: the ZMTP session on its socket, relayed through its own DEALER to the daemon's ROUTER.

    With CURVE every frame after the handshake is a ``MESSAGE`` (see :mod:`expertflow.services.curve`); the
    logic above the framing (limits, heartbeats, relaying) is the same for both mechanisms.
    """

    def __init__(self, front: ZmtpFrontend, sock: socket.socket) -> None:
        self.front = front
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.reader = _Reader(self.loop, sock, front.limits.idle_timeout)
        self.curve = CurveSession(front.curve) if front.curve is not None else None
        self.dealer: zmq.asyncio.Socket = front.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        # The daemon's ROUTER decides how many replies may wait for a slow reader (its SNDHWM): take at most
        # one more here, so that limit keeps its meaning.
        self.dealer.setsockopt(zmq.RCVHWM, 1)
        # Requests waiting for the daemon: a few, so that a peer that outpaces it waits in its own TCP buffers.
        self.dealer.setsockopt(zmq.SNDHWM, front.limits.queued_requests)
        self.dealer.connect(front.backend)
        self.write_lock = asyncio.Lock()
        self.pings = True
        self.writing = False  # a reply is being written

    async def run(self) -> None:
        self.front._open.add(self)
        try:
            await self._handshake()
            tasks = [asyncio.create_task(self._requests()), asyncio.create_task(self._replies())]
            if self.pings:
                tasks.append(asyncio.create_task(self._pings()))
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(tasks)
            for t in done:
                t.result()
        except (_Refused, CurveError) as exc:
            self.front.counters["connections_refused"] += 1
            log.warning("closing a connection: %s", exc)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.front._open.discard(self)
            self.dealer.close(linger=0)
            self.sock.close()

    async def _write(self, *parts: bytes | memoryview) -> None:
        async with self.write_lock:
            for part in parts:
                await self.loop.sock_sendall(self.sock, part)

    async def _send(self, bodies: list[bytes | memoryview], *, command: bool = False) -> None:
        """One logical message (or command) as frames. CURVE seals each frame under the write lock: nonces
        must reach the peer in the order they were taken."""
        async with self.write_lock:
            for i, body in enumerate(bodies):
                for part in self._frame_parts(body, more=i + 1 < len(bodies), command=command):
                    await self.loop.sock_sendall(self.sock, part)

    # --- handshake ------------------------------------------------------------------------------------

    async def _handshake(self) -> None:
        mechanism = b"CURVE" if self.curve is not None else b"NULL"
        await self._write(_greeting(mechanism, as_server=self.curve is not None))
        peer = await self.reader.exactly(64)
        if peer[0] != _SIGNATURE_START or peer[9] != _SIGNATURE_END:
            raise _Refused("not a ZMTP peer")
        if peer[10] < 3:
            raise _Refused(f"ZMTP {peer[10]}.x is not supported (3.0 or later)")
        self.pings = peer[11] >= 1 or peer[10] > 3  # heartbeat commands exist from ZMTP 3.1 on
        if not self.pings:  # a ZMTP 3.0 peer cannot be pinged: it may stay quiet as long as it likes
            self.reader.idle = float("inf")
        offered = peer[12:32].rstrip(b"\0")
        if offered != mechanism:
            raise _Refused(f"security mechanism {offered!r} where this endpoint speaks {mechanism!r}")
        metadata = await (self._curve_handshake() if self.curve is not None else self._null_handshake())
        socket_type = _parse_metadata(metadata).get(b"socket-type")
        if socket_type not in (b"DEALER", b"REQ"):
            await self._write(_command(b"ERROR", bytes([19]) + b"Invalid socket type"))
            raise _Refused(f"socket type {socket_type!r} cannot talk to a ROUTER")
        ready = _properties(b"ROUTER")
        if self.curve is not None:
            await self._write(_command_frame(self.curve.ready(ready)))
        else:
            await self._write(_command(b"READY", ready))

    async def _null_handshake(self) -> bytes:
        name, body = await self._read_command()
        if name != b"READY":
            raise _Refused(f"expected READY, got {name!r}")
        return body

    async def _curve_handshake(self) -> bytes:
        assert self.curve is not None
        hello = await self._read_command_frame(_MAX_COMMAND_BYTES)
        await self._write(_command_frame(self.curve.welcome(hello)))
        initiate = await self._read_command_frame(_MAX_COMMAND_BYTES)
        metadata = self.curve.initiate(initiate)
        if not self.front.curve_allows(self.curve.client_key):
            # A 3-digit status in ERROR is what libzmq clients report as an authentication failure.
            await self._write(_command(b"ERROR", bytes([3]) + b"400"))
            self.front.counters["connections_unauthorized"] += 1
            raise _Refused("the client's CURVE key is not in the allow list")
        return metadata

    # --- framing ----------------------------------------------------------------------------------------

    async def _read_frame_header(self) -> tuple[int, int]:
        (flags,) = await self.reader.exactly(1)
        if flags & ~(_MORE | _LONG | _COMMAND):
            raise _Refused(f"reserved frame flags {flags:#x}")
        if flags & _LONG:
            (size,) = struct.unpack(">Q", await self.reader.exactly(8))
        else:
            size = (await self.reader.exactly(1))[0]
        return flags, size

    async def _read_command_frame(self, limit: int) -> bytes:
        flags, size = await self._read_frame_header()
        if not flags & _COMMAND or flags & _MORE:
            raise _Refused("expected a command frame")
        if size > limit or size < 1:
            raise _Refused(f"command of {size} bytes")
        return await self.reader.exactly(size)

    async def _read_command(self) -> tuple[bytes, bytes]:
        return _split_command(await self._read_command_frame(_MAX_COMMAND_BYTES))

    async def _next_frame(self, room: int) -> tuple[int, bytes]:
        """The next logical frame (flags, body), refused unread if its body would exceed ``room`` bytes."""
        flags, size = await self._read_frame_header()
        if self.curve is None:
            if flags & _COMMAND:
                if size > _MAX_COMMAND_BYTES:
                    raise _Refused(f"command of {size} bytes")
            elif size > room:
                raise _TooLarge()
            return flags, await self.reader.exactly(size)
        # CURVE: every frame is a MESSAGE data frame; the real flags are inside the box.
        if flags & (_COMMAND | _MORE):
            raise _Refused("CURVE frames after the handshake must be MESSAGE data frames")
        if size - MESSAGE_OVERHEAD > max(room, _MAX_COMMAND_BYTES):
            raise _TooLarge()
        inner, body = self.curve.open_message(await self.reader.exactly(size))
        flags = (_MORE if inner & CURVE_MORE else 0) | (_COMMAND if inner & CURVE_COMMAND else 0)
        if not flags & _COMMAND and len(body) > room:
            raise _TooLarge()
        return flags, body

    def _frame_parts(
        self, body: bytes | memoryview, *, more: bool = False, command: bool = False
    ) -> list[bytes | memoryview]:
        """What goes on the wire for one logical frame."""
        if self.curve is not None:
            flags = (CURVE_MORE if more else 0) | (CURVE_COMMAND if command else 0)
            return [memoryview(self.curve.seal_frame(flags, body))]
        header = _frame_header(len(body), more=more, command=command)
        if len(body) <= 4096:  # small frames go out with their header in one write
            return [header + bytes(body)]
        return [header, body]

    # --- relaying -------------------------------------------------------------------------------------

    async def _requests(self) -> None:
        """Read whole messages within the limits and pass each to the daemon; answer heartbeats."""
        limits = self.front.limits
        while True:
            frames: list[bytes] = []
            total = 0
            while True:
                try:
                    flags, body = await self._next_frame(limits.max_message_bytes - total)
                except _TooLarge:
                    self.front.counters["messages_refused"] += 1
                    raise _Refused(
                        f"incoming message over {limits.max_message_bytes} bytes (refused before buffering it)"
                    ) from None
                if flags & _COMMAND:
                    if frames:
                        raise _Refused("a command inside a multipart message")
                    await self._on_command(*_split_command(body))
                    continue
                if len(frames) >= limits.max_frames:
                    self.front.counters["messages_refused"] += 1
                    raise _Refused(f"incoming message of more than {limits.max_frames} frames")
                total += len(body)
                frames.append(body)
                if not flags & _MORE:
                    break
            # Waits when the daemon is behind (DEALER high-water mark): this peer is then not read either.
            await self.dealer.send_multipart(frames)

    async def _on_command(self, name: bytes, body: bytes) -> None:
        if name == b"PING":
            if len(body) < 2:
                raise _Refused("malformed PING")
            await self._send([b"\x04PONG" + body[2:18]], command=True)
        elif name == b"ERROR":
            raise _Refused(f"peer error {body[1:]!r}")
        elif name != b"PONG":
            raise _Refused(f"unexpected command {name!r}")

    async def _replies(self) -> None:
        """Write each reply of the daemon as one ZMTP message, straight from libzmq's frames (NULL)."""
        deadline = self.front.limits.send_deadline
        while True:
            frames = await self.dealer.recv_multipart(copy=False)
            self.writing = True
            try:
                await asyncio.wait_for(self._send([f.buffer for f in frames]), deadline)
            except asyncio.TimeoutError:
                raise _Refused(f"a reply not taken within {deadline} s (the peer is not reading)") from None
            finally:
                self.writing = False
            del frames  # libzmq may free the buffers now: the daemon unpins them

    async def _pings(self) -> None:
        """Heartbeats towards the peer: its answers keep the idle timeout from firing on a quiet client."""
        while True:
            await asyncio.sleep(_PING_INTERVAL)
            ttl = min(int(self.front.limits.idle_timeout * 10), 0xFFFF)
            await self._send([b"\x04PING" + struct.pack(">H", ttl)], command=True)


class ZmtpFrontend:
    """Listens on plain tcp/ipc endpoints and relays bounded messages to ``backend`` (an inproc ROUTER).

    It runs on an event loop of its own, in its own thread (:meth:`start`): writing replies into sockets is
    the bulk of the daemon's byte traffic, and those system calls release the GIL, so they overlap with the
    daemon's loop as libzmq's I/O thread did. :meth:`bind` before :meth:`start`; :meth:`aclose` from the
    daemon's loop.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        backend: str,
        limits: FrontendLimits,
        curve: CurveKeys | None = None,
    ) -> None:
        self.ctx = ctx
        self.backend = backend
        self.limits = limits
        self.curve = curve  # every endpoint speaks CURVE with these keys; None: NULL (plain)
        self.counters: Counter[str] = Counter(
            {
                "connections_total": 0,
                "connections_refused": 0,
                "connections_unauthorized": 0,
                "messages_refused": 0,
            }
        )
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._open: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def curve_allows(self, client_key: bytes) -> bool:
        return self.curve is not None and self.curve.allows(client_key)

    @property
    def connections(self) -> int:
        return len(self._connections)

    def bind(self, address: str) -> str:
        """Listen on ``tcp://host:port`` (port ``*`` for any) or ``ipc://path``; returns the bound endpoint."""
        scheme, _, rest = address.partition("://")
        if scheme == "tcp":
            host, sep, port = rest.rpartition(":")
            if not sep:
                raise ConfigError(f"cannot bind {address}: expected tcp://host:port")
            host = host.strip("[]")
            host = "0.0.0.0" if host == "*" else host
            try:
                infos = socket.getaddrinfo(host, 0 if port == "*" else int(port), type=socket.SOCK_STREAM)
                family, _, _, _, addr = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(addr)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot bind {address}: {exc}") from None
            bound_host, bound_port = sock.getsockname()[:2]
            endpoint = f"tcp://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
        elif scheme == "ipc":
            path = rest
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    if _unix_socket_answers(path):  # libzmq would take it over silently
                        raise ConfigError(f"cannot bind {address}: another process is serving it")
                    os.unlink(path)  # a stale socket of an earlier run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                raise ConfigError(f"cannot bind {address}: {exc}") from None
            self._unix_paths.append(path)
            endpoint = f"ipc://{path}"
        else:
            raise ConfigError(f"cannot bind {address}: only tcp:// and ipc:// are served")
        sock.listen(128)
        sock.setblocking(False)
        self._listeners.append(sock)
        return endpoint

    def start(self) -> None:
        """Start accepting on every bound endpoint, on the front end's own thread and loop."""
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._accepting = [loop.create_task(self._accept(s)) for s in self._listeners]
            loop.call_soon(started.set)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="expertflow-zmtp", daemon=True)
        self._thread.start()
        started.wait()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of fds and the like: wait, do not spin
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            if sock.family == socket.AF_UNIX:
                # The default (wmem_default, ~208 KiB) makes a multi-MiB reply dozens of loop wake-ups; the
                # kernel caps this at net.core.wmem_max. TCP is left to its own buffer autotuning.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UNIX_SNDBUF)
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.counters["connections_total"] += 1
            task = loop.create_task(_Connection(self, sock).run())
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def aclose(self, grace: float = 0.0) -> None:
        """Stop listening; give replies already handed over up to ``grace`` s to go out; close everything."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            for sock in self._listeners:
                sock.close()
            return
        self._loop = None
        done = asyncio.run_coroutine_threadsafe(self._shutdown(grace), loop)
        await asyncio.wrap_future(done)
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)

    async def _shutdown(self, grace: float) -> None:
        await cancel_and_wait(self._accepting)
        for sock in self._listeners:
            sock.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        while self._pending_replies() and loop.time() < until:
            await asyncio.sleep(0.01)
        await cancel_and_wait(self._connections)  # read once, before any of them ends

    def _pending_replies(self) -> bool:
        return any(c.writing or int(c.dealer.getsockopt(zmq.EVENTS)) & zmq.POLLIN for c in self._open)


def _unix_socket_answers(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path`` (a stale one refuses them)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
