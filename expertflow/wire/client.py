"""Async client of one expert server: a DEALER socket with pipelined, individually timed requests.

Requests are numbered; one receiver task routes each reply to the queue of its request, so any number of
requests can be in flight on one connection. A socket monitor turns a lost connection or a refused CURVE
key into an immediate ``RemoteError`` for every waiting request, instead of a wait for the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from expertflow.core import ExpertKey
from expertflow.errors import ProtocolError, RemoteError
from expertflow.wire import payload as pl
from expertflow.wire import protocol as P
from expertflow.wire.keys import client_curve_options

log = logging.getLogger(__name__)

_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_QUEUE_CLOSED = object()


class ExpertClient:
    """A connection to one ``expertflow-store serve`` daemon. Create and use it on one event loop.

    ``timeout`` bounds the wait for each reply (for a get: for each next expert). Errors are ``RemoteError``
    with ``code`` one of the protocol's error codes or ``TIMEOUT``, ``DISCONNECTED``, ``UNAUTHORIZED``,
    ``BAD_REPLY``, ``CLOSED``.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 5.0,
        curve_server_key: str | None = None,
        curve_client_secret: str | None = None,
        limits: P.Limits = P.DEFAULT_LIMITS,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.limits = limits
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[Any]] = {}
        self._closed = False
        self.connected = False
        self.lost = False  # was connected, and the connection dropped; cleared on reconnect
        self.handshakes = 0  # connections made so far (a change means the server came back)
        self._disconnect_pending = (
            False  # a disconnect was seen; pending requests fail once replies are drained
        )
        self.unauthorized = False
        self._refused = asyncio.Event()
        self.stale_replies = 0
        options = client_curve_options(curve_server_key, curve_client_secret)
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Keep the pipe across a disconnect (IMMEDIATE=0): with IMMEDIATE=1 libzmq drops replies that
        # arrived just before the server closed (a graceful shutdown) but were not read yet. The price: a
        # request sent while disconnected waits in the pipe and is answered late; its reply is then stale
        # and dropped by id.
        sock.setsockopt(zmq.IMMEDIATE, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        # No frame a server sends is larger than a header or the largest tensor it may send: libzmq drops a
        # peer that announces more before buffering a byte of it, so a rogue server cannot balloon our memory.
        sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_header_bytes, limits.max_frame_bytes))
        for option, value in options.items():
            sock.setsockopt(option, value)
        self._monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            sock.disable_monitor()
            self._monitor.close(linger=0)
            sock.close(linger=0)
            raise RemoteError(f"cannot connect: {exc}", code="BAD_ADDRESS", address=address) from None
        self._sock = sock
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name=f"expertflow-client-recv {address}"),
            asyncio.create_task(self._monitor_loop(), name=f"expertflow-client-monitor {address}"),
        ]

    # --- requests -------------------------------------------------------------------------------------

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        t0 = time.perf_counter()
        reply = await self._single(P.encode_ping)
        self._expect(reply, P.PongReply)
        return time.perf_counter() - t0

    async def hello(self) -> P.HelloReply:
        """The server's checkpoint fingerprint and limits."""
        reply = await self._single(P.encode_hello)
        return self._expect(reply, P.HelloReply)

    async def stat(self) -> dict[str, int | float]:
        """The server's counters."""
        reply = await self._single(P.encode_stat)
        return dict(self._expect(reply, P.StatReply).counters)

    async def get(self, keys: Iterable[ExpertKey]) -> AsyncGenerator[P.ExpertReply | P.ErrorReply, None]:
        """Each requested expert (or its per-key error) as it arrives, until the server's ``done``.

        An expert reply's tensors alias the received frames; checksums are not verified here
        (:func:`payload.verify`). A request-level error reply is raised as ``RemoteError``.
        """
        rid, queue = await self._send(lambda i: P.encode_get(i, list(keys), self.limits))
        try:
            while True:
                reply = await self._next(queue, rid)
                if isinstance(reply, P.DoneReply):
                    return
                if isinstance(reply, P.ErrorReply) and reply.key is None:
                    raise reply.to_exception(self.address)
                if not isinstance(reply, (P.ExpertReply, P.ErrorReply)):
                    raise self._bad_reply(f"unexpected {reply.op.value} reply to a get")
                yield reply
        finally:
            self._pending.pop(rid, None)

    async def get_one(self, key: ExpertKey) -> P.ExpertReply:
        """One expert, checksum verified; any error is raised."""
        expert: P.ExpertReply | None = None
        # aclosing: a cancelled read (a dropped prefetch) forgets its request now, not at garbage collection.
        async with contextlib.aclosing(self.get([key])) as replies:
            async for reply in replies:
                if isinstance(reply, P.ErrorReply):
                    raise reply.to_exception(self.address)
                if reply.key != key or expert is not None:
                    raise self._bad_reply(f"asked for {key}, got {reply.key}")
                expert = reply
        if expert is None:
            raise self._bad_reply(f"the server finished without sending {key}")
        pl.verify(expert)
        return expert

    # --- plumbing -------------------------------------------------------------------------------------

    async def _single(self, encode: Any) -> P.Reply:
        rid, queue = await self._send(encode)
        try:
            return await self._next(queue, rid)
        finally:
            self._pending.pop(rid, None)

    async def _send(self, encode: Any) -> tuple[int, asyncio.Queue[Any]]:
        if self._closed:
            raise RemoteError("client is closed", code="CLOSED", address=self.address)
        if self.unauthorized:
            raise RemoteError("the server refused our CURVE key", code="UNAUTHORIZED", address=self.address)
        if self.lost:
            # Until libzmq reconnects, a request would only wait in the pipe for the timeout.
            raise RemoteError("connection lost", code="DISCONNECTED", address=self.address)
        rid = next(self._ids)
        frames = encode(rid)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pending[rid] = queue
        send = asyncio.ensure_future(self._sock.send_multipart(frames, copy=False))
        refused = asyncio.ensure_future(self._refused.wait())
        try:
            # A send waits only at the high-water mark: give up at the timeout, or at once if refused.
            await asyncio.wait({send, refused}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
            if not send.done():
                send.cancel()
                self._pending.pop(rid, None)
        if send.cancelled():
            if self.unauthorized:
                raise RemoteError(
                    "the server refused our CURVE key", code="UNAUTHORIZED", address=self.address
                )
            raise RemoteError(
                f"not connected: request not sent within {self.timeout} s",
                code="TIMEOUT",
                address=self.address,
            )
        try:
            send.result()
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return rid, queue

    async def _next(self, queue: asyncio.Queue[Any], rid: int) -> P.Reply:
        try:
            item = await asyncio.wait_for(queue.get(), self.timeout)
        except asyncio.TimeoutError:
            raise RemoteError(
                f"no reply to request {rid} within {self.timeout} s", code="TIMEOUT", address=self.address
            ) from None
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def _expect(self, reply: P.Reply, kind: type[Any]) -> Any:
        if isinstance(reply, P.ErrorReply):
            raise reply.to_exception(self.address)
        if not isinstance(reply, kind):
            raise self._bad_reply(f"expected {kind.__name__}, got a {reply.op.value} reply")
        return reply

    @property
    def requests_in_flight(self) -> int:
        """Requests sent and not yet finished, failed or abandoned."""
        return len(self._pending)

    def _bad_reply(self, message: str) -> RemoteError:
        return RemoteError(message, code="BAD_REPLY", address=self.address)

    def _fail_pending(self, exc: RemoteError) -> None:
        for queue in self._pending.values():
            queue.put_nowait(exc)

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            self._deliver(frames)
            if self._disconnect_pending:
                self._fail_if_drained()

    def _deliver(self, frames: list[zmq.Frame]) -> None:
        try:
            reply = P.decode_reply([f.buffer for f in frames], self.limits)
        except ProtocolError as exc:
            rid = getattr(exc, "request_id", None)
            log.warning("malformed reply from %s: %s", self.address, exc)
            if rid is not None and rid in self._pending:
                self._pending[rid].put_nowait(self._bad_reply(str(exc)))
            return
        queue = self._pending.get(reply.id)
        if queue is None:
            self.stale_replies += 1  # the reply of a request that timed out or was abandoned
            return
        queue.put_nowait(reply)

    def _fail_if_drained(self) -> None:
        """After a disconnect, fail what is still pending once every reply that did arrive was delivered."""
        if int(self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            return  # the receive loop takes those first, then calls again
        self._disconnect_pending = False
        self._fail_pending(RemoteError("connection lost", code="DISCONNECTED", address=self.address))

    async def _monitor_loop(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self.lost = False
                self.handshakes += 1
            elif kind == zmq.EVENT_DISCONNECTED:
                if self.connected:
                    log.warning("lost connection to %s", self.address)
                self.lost = self.connected
                self.connected = False
                # Replies that arrived before the disconnect may still wait on the data socket (the monitor is
                # another socket, with no ordering between the two): the receive loop delivers them first.
                self._disconnect_pending = True
                self._fail_if_drained()
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.unauthorized = True
                self._refused.set()
                log.error("%s refused our CURVE key", self.address)
                self._fail_pending(
                    RemoteError("the server refused our CURVE key", code="UNAUTHORIZED", address=self.address)
                )
            else:
                log.warning("handshake with %s failed (%s)", self.address, event.get("value"))

    async def aclose(self) -> None:
        """Fail waiting requests, stop the tasks and close the socket."""
        self.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_pending(RemoteError("client closed", code="CLOSED", address=self.address))
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    async def __aenter__(self) -> ExpertClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
