"""The ``expertflow-store serve`` daemon: serves a checkpoint's experts from a RAM cache over ZeroMQ.

One ``zmq.asyncio`` ROUTER socket receives requests from any number of DEALER clients: the ZMTP listener
(:mod:`expertflow.services.frontend`) owns every ``--bind`` address, bounds each incoming message and hands
whole requests to the ROUTER over ``inproc``, one DEALER per connection. The RAM cache is an :class:`~expertflow.pipeline.store.AsyncExpertStore` on the CPU: the
same budgets, policies and NVMe reads as a local store. A ``get`` is served by its own task, which pins
experts as they become resident and sends each one as soon as it is ready, straight out of the cache
buffer (``copy=False``); the pin is dropped only when libzmq has let go of the buffer (a finalizer).

Every request is decoded by :mod:`expertflow.wire.protocol`; anything malformed gets an error reply (or
closes its connection in the listener when over the size limit), never an exception out of the receive loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from expertflow.aio import cancel_and_wait
from expertflow.config import PolicyName, ReadMode, StoreConfig, check_endpoint
from expertflow.core import ExpertKey
from expertflow.errors import CheckpointChangedError, ConfigError, ExpertFlowError
from expertflow.pipeline.store import AsyncExpertStore, ExpertHandle
from expertflow.services.curve import CurveKeys
from expertflow.services.frontend import FrontendLimits, ZmtpFrontend
from expertflow.tiers.base import ExpertSource
from expertflow.tiers.checksum import spec_checksum
from expertflow.tiers.fingerprint import content_fingerprint
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.safetensors_index import open_checkpoint
from expertflow.wire import protocol as P

log = logging.getLogger("expertflow.server")

_VERSION = "1"
try:
    from importlib.metadata import version as _pkg_version

    _VERSION = _pkg_version("expertflow")
except Exception:  # pragma: no cover - running from a source tree without metadata
    pass


@dataclass(frozen=True)
class ServerConfig:
    """What ``expertflow-store serve`` is asked to do."""

    binds: tuple[str, ...] = ("tcp://127.0.0.1:5555",)
    mem_bytes: int | None = None  # RAM cache budget (None: sized from the memory available, like the store)
    policy: PolicyName = "lru"
    read_mode: ReadMode = "mmap"
    preload: bool = False
    curve_secret: str | None = None  # secret certificate file of the server
    allow_keys: str | None = None  # directory of allowed client public certificates
    grace: float = 5.0  # seconds in-flight replies get to finish on shutdown
    fetch_timeout: float = 60.0
    limits: P.Limits = field(default_factory=P.Limits)
    insecure: bool = False  # allow a non-loopback address without CURVE
    # Replies one connection may have waiting in libzmq (it is not reading). Past it the connection is dropped:
    # its requests are ignored for ``drop_seconds``. Error and control replies are at most a header (64 KiB),
    # and expert replies are bounded by the pins a client may hold, so this bounds bytes too.
    max_unsent_replies: int = 256
    drop_seconds: float = 30.0
    # An expert reply libzmq has not sent after this long loses its pin (its client is dropped: it is not
    # reading). Its bytes may then be overwritten under libzmq, which the client's checksum check refuses.
    unsent_deadline: float = 10.0
    # At most this share of the cache may be pinned by replies waiting in libzmq, over all clients; past it
    # the oldest waiting reply is expired as above.
    unsent_share: float = 0.5
    # All frames of one incoming message together, checked before they are buffered (plain endpoints: see
    # services.frontend; libzmq itself bounds only each frame). Requests are one msgpack header.
    max_request_bytes: int = 64 * 1024
    # A plain connection from which nothing (heartbeats included) arrives for this long is closed.
    idle_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.binds:
            raise ConfigError("the server needs at least one --bind address")
        for address in self.binds:
            check_endpoint(address, "--bind")
        exposed = [b for b in self.binds if not _is_local(b)]
        if exposed and not self.curve_secret and not self.insecure:
            raise ConfigError(
                f"{', '.join(exposed)} is reachable from other machines and the traffic would be neither "
                "encrypted nor authenticated: add --curve-secret (and --allow-keys), bind 127.0.0.1 or ipc://, "
                "or pass --insecure on a network you trust"
            )
        if self.allow_keys and not self.curve_secret:
            raise ConfigError("--allow-keys needs --curve-secret (the server's own key pair)")
        if self.grace < 0:
            raise ConfigError("grace must be >= 0")
        if self.max_unsent_replies < 1 or self.drop_seconds < 0:
            raise ConfigError("max_unsent_replies must be >= 1 and drop_seconds >= 0")
        if self.unsent_deadline <= 0 or not 0 < self.unsent_share <= 1:
            raise ConfigError("unsent_deadline must be > 0 and unsent_share in (0, 1]")
        if self.max_request_bytes < 1024 or self.idle_timeout <= 0:
            raise ConfigError("max_request_bytes must be at least 1 KiB and idle_timeout > 0")


def _is_local(address: str) -> bool:
    """Whether a bind address can only be reached from this machine (ipc, inproc, loopback tcp)."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


#: Seconds an expert reply may wait in libzmq before it counts as slow, when others need its pin.
UNSENT_SLOW = 1.0


class _ClientGone(Exception):
    """The peer of a reply disconnected: its request is abandoned."""


@dataclass(eq=False)
class _Client:
    """What one client (ROUTER identity) has in flight."""

    gets: int = 0
    # Experts pinned for this client: loading, or sent and not yet let go by libzmq. Capped, so that a client
    # that stops reading its replies cannot pin the whole cache and starve the others.
    held: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Unsent:
    """A reply whose tensor frames libzmq may still be reading from the cache: its expert stays pinned."""

    handle: ExpertHandle
    client: _Client
    frames: int
    identity: bytes = b""
    created: float = 0.0
    timer: asyncio.TimerHandle | None = None


class ExpertServer:
    """A running expert server. Start with ``await ExpertServer.start(...)``; stop with :meth:`aclose`."""

    def __init__(
        self,
        layout: ExpertLayout,
        config: ServerConfig,
        store: AsyncExpertStore,
        fingerprint: str,
    ) -> None:
        self.layout = layout
        self.config = config
        self.store = store
        self.fingerprint = fingerprint
        self.limits = config.limits
        self.endpoints: list[str] = []
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._frontend: ZmtpFrontend | None = None
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: dict[bytes, _Client] = {}
        # Experts one client may hold pinned at once (see _Client.held); gets are served in chunks of this.
        self.client_cap = max(1, store.num_slots // 4)
        # Pins held by replies waiting in libzmq, over all clients (see ServerConfig.unsent_share).
        self.unsent_cap = max(1, int(store.num_slots * config.unsent_share))
        # Replies whose cache buffers libzmq still reads (zero-copy): their experts stay pinned until then.
        self._unsent: set[_Unsent] = set()
        self._loop = asyncio.get_running_loop()
        self._unsent_changed = asyncio.Event()
        #: Set when a checkpoint file changed on disk (why): hello is refused from then on.
        self.changed: str | None = None
        self._dropped: dict[bytes, float] = {}  # identity -> monotonic time until which it is ignored
        self._checksums: dict[ExpertKey, int] = {}
        self._stop = asyncio.Event()
        self._stopping = False
        self._closed = False
        self._started = time.monotonic()
        # Every counter exists from the start (at 0): a scraper sees stable series, not names appearing later.
        self.counters: Counter[str] = Counter(
            {
                name: 0
                for name in (
                    "requests_total",
                    *(f"requests_{op.value}" for op in sorted(P.REQUEST_OPS, key=lambda o: o.value)),
                    "errors_total",
                    *(f"errors_{code.value.lower()}" for code in P.ErrorCode),
                    "experts_sent",
                    "bytes_sent",
                    "clients_gone",
                    "clients_dropped",
                    "requests_ignored",
                    "replies_expired",
                    "internal_errors",
                )
            }
        )
        self._loops: list[asyncio.Task[None]] = []
        self._info = P.ServerInfo(
            version=_VERSION,
            experts=len(layout.experts),
            layers=layout.moe_layers,
            max_keys=self.limits.max_keys,
            max_in_flight=self.limits.max_in_flight,
        )

    # --- lifecycle ----------------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        checkpoint: str | Path | ExpertLayout,
        config: ServerConfig,
        *,
        sources: list[ExpertSource] | None = None,
    ) -> ExpertServer:
        """Open the checkpoint and its cache, bind every address and start serving.

        ``sources`` replace the checkpoint's NVMe tier as the cache's backing store (the cache owns them).
        """
        layout = (
            checkpoint
            if isinstance(checkpoint, ExpertLayout)
            else await asyncio.to_thread(open_checkpoint, checkpoint)
        )
        fingerprint = await asyncio.to_thread(content_fingerprint, layout)
        store_config = StoreConfig(
            device="cpu",
            host_bytes=config.mem_bytes,
            policy=config.policy,
            read_mode=config.read_mode,
            fetch_timeout=config.fetch_timeout,
            prefetch_depth=0,
        )
        store = await AsyncExpertStore.open(layout, store_config, sources=sources, separate_device=False)
        server = cls(layout, config, store, fingerprint)
        try:
            server._bind()
        except BaseException:
            await server.aclose()
            raise
        server._loops = [
            asyncio.create_task(server._receive_loop(), name="expertflow-server-recv"),
        ]
        if config.preload:
            server._preload()
        log.info(
            "serving %d experts (%s) of %s on %s; cache %d experts, budget %s, policy %s",
            len(layout.experts),
            fingerprint,
            layout.root,
            ", ".join(server.endpoints),
            store.num_slots,
            store.budget.describe(),
            config.policy,
        )
        return server

    def _bind(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        self._sock = sock
        sock.setsockopt(zmq.LINGER, int(self.config.grace * 1000))
        # It binds only inproc: size limits, heartbeats and idle timeouts belong to the front end, the one
        # place where bytes from the network are read.
        # Know when a client is gone instead of queueing replies for nobody.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A connection that does not read gets at most this many replies queued; then sends to it fail at once
        # (DONTWAIT + ROUTER_MANDATORY) and it is dropped, instead of queueing without limit.
        sock.setsockopt(zmq.SNDHWM, self.config.max_unsent_replies)
        # The front end speaks ZMTP (NULL or CURVE) on every endpoint and bounds whole messages, then hands
        # them to this ROUTER over inproc: libzmq alone would bound only each frame.
        curve = None
        if self.config.curve_secret:
            curve = CurveKeys(self.config.curve_secret, self.config.allow_keys)
        backend = f"inproc://expertflow-server-{id(self):x}"
        sock.bind(backend)
        self._frontend = ZmtpFrontend(
            self._ctx,
            backend,
            FrontendLimits(
                max_message_bytes=self.config.max_request_bytes,
                idle_timeout=self.config.idle_timeout,
                send_deadline=self.config.unsent_deadline,
                queued_requests=self.limits.max_in_flight,
            ),
            curve,
        )
        for address in self.config.binds:
            self.endpoints.append(self._frontend.bind(address))
        self._frontend.start()

    def _preload(self) -> None:
        # Fill the cache in key order until it is full; prefetches beyond capacity are simply dropped.
        keys = self.layout.keys()[: self.store.num_slots]
        self.store.prefetch(keys)
        log.info("preloading %d experts", len(keys))

    def request_stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler)."""
        self._stop.set()

    async def serve_forever(self) -> None:
        """Serve until :meth:`request_stop` (SIGTERM/SIGINT in the daemon), then shut down gracefully."""
        try:
            await self._stop.wait()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Refuse new work, let in-flight replies finish for up to ``grace`` s, then release everything."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        if self._tasks:
            log.info("shutting down: %d requests in flight", len(self._tasks))
            _, pending = await asyncio.wait(list(self._tasks), timeout=self.config.grace)
            await cancel_and_wait(pending)
        await cancel_and_wait(self._loops)
        if self._frontend is not None:
            await self._frontend.aclose(self.config.grace)
        if self._sock is not None:
            self._sock.close(linger=int(self.config.grace * 1000))
        # term() waits for the linger of unsent replies: off the loop. After it libzmq holds no cache buffer.
        await asyncio.to_thread(self._ctx.term)
        for unsent in list(self._unsent):
            self._settle(unsent)
        await self.store.aclose()
        log.info("stopped")

    # --- receiving ------------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                await self._dispatch(frames)
            except _ClientGone:
                self.counters["clients_gone"] += 1
            except Exception:  # a bug must not take the daemon down; the request is answered or dropped
                self.counters["internal_errors"] += 1
                log.exception("unexpected error while handling a request")

    async def _dispatch(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        self.counters["requests_total"] += 1
        if self._ignored(identity):
            self.counters["requests_ignored"] += 1
            return
        try:
            req = P.decode_request([f.buffer for f in frames[1:]], self.limits)
        except P.MessageError as exc:
            rid = exc.request_id if exc.request_id is not None else P.UNKNOWN_REQUEST_ID
            await self._error(identity, rid, exc.code, str(exc))
            return
        self.counters[f"requests_{req.op.value}"] += 1
        if req.op is P.Op.PING:
            await self._send(identity, P.encode_pong(req.id))
        elif req.op is P.Op.HELLO:
            if self.changed is not None:  # what it announced is no longer what is on disk: no new clients
                await self._error(identity, req.id, P.ErrorCode.CHECKPOINT_CHANGED, self.changed)
                return
            await self._send(
                identity, P.encode_hello_reply(req.id, self.fingerprint, self._info, self.limits)
            )
        elif req.op is P.Op.STAT:
            await self._send(identity, P.encode_stat_reply(req.id, self.stat_counters(), self.limits))
        else:
            self._start_get(identity, req)

    def _start_get(self, identity: bytes, req: P.Request) -> None:
        if self._stopping:
            self._spawn(self._error(identity, req.id, P.ErrorCode.SHUTTING_DOWN, "the server is stopping"))
            return
        client = self._clients.get(identity)
        if client is None:
            client = self._clients[identity] = _Client()
        if client.gets >= self.limits.max_in_flight:
            self._spawn(
                self._error(
                    identity,
                    req.id,
                    P.ErrorCode.BUSY,
                    f"{self.limits.max_in_flight} requests of this client are already in flight",
                )
            )
            return
        client.gets += 1

        def done(_: object) -> None:
            client.gets -= 1
            self._forget_idle(identity, client)

        self._spawn(self._serve_get(identity, req, client)).add_done_callback(done)

    def _forget_idle(self, identity: bytes, client: _Client) -> None:
        if client.gets == 0 and client.held == 0 and self._clients.get(identity) is client:
            del self._clients[identity]

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, _ClientGone):
            self.counters["clients_gone"] += 1
        elif exc is not None:
            self.counters["internal_errors"] += 1
            log.error("request task failed", exc_info=exc)

    # --- serving a get --------------------------------------------------------------------------------

    async def _serve_get(self, identity: bytes, req: P.Request, client: _Client) -> None:
        known: list[ExpertKey] = []
        for key in req.keys:
            if key in self.layout.experts:
                known.append(key)
            else:
                await self._error(identity, req.id, P.ErrorCode.UNKNOWN_EXPERT, "no such expert", key)
        # Bounded chunks: a get never pins more than the client's cap (nor half the cache), so gets of many
        # clients interleave and one client cannot hold everything.
        chunk = max(1, min(self.store.num_slots // 2, self.client_cap))
        for start in range(0, len(known), chunk):
            await self._serve_chunk(identity, req.id, known[start : start + chunk], client)
        await self._send(identity, P.encode_done(req.id))

    async def _serve_chunk(
        self, identity: bytes, rid: int, keys: Sequence[ExpertKey], client: _Client
    ) -> None:
        n = len(keys)
        while client.held and client.held + n > self.client_cap:
            client.changed.clear()
            await client.changed.wait()
        client.held += n
        handed = 0  # experts of this chunk turned into handles; each gives its unit back when released
        sent: set[ExpertKey] = set()
        try:
            # aclosing: if the client is gone, the experts of this chunk still loading are unpinned now.
            async with contextlib.aclosing(self.store.fetch_as_ready(keys)) as waves:
                async for wave in waves:
                    handed += len(wave)
                    for i, handle in enumerate(wave):
                        try:
                            await self._send_expert(identity, rid, handle, client)
                        except BaseException:
                            for rest in wave[i + 1 :]:
                                self._release(rest, client)
                            raise
                        sent.add(handle.key)
        except ExpertFlowError as exc:
            # One expert could not be read: report it, and serve the rest of the chunk one by one.
            log.debug("chunk of request %d: %s; serving its keys one by one", rid, exc)
            for key in keys:
                if key in sent:
                    continue
                try:
                    [handle] = await self.store.fetch([key])
                except CheckpointChangedError as key_exc:
                    if self.changed is None:
                        log.error("%s; not serving its experts, and refusing new clients", key_exc)
                    self.changed = str(key_exc)
                    await self._error(identity, rid, P.ErrorCode.CHECKPOINT_CHANGED, str(key_exc), key)
                    continue
                except ExpertFlowError as key_exc:
                    log.warning("expert %s failed: %s", key, key_exc)
                    await self._error(identity, rid, P.ErrorCode.INTERNAL, f"read failed: {key_exc}", key)
                    continue
                handed += 1
                await self._send_expert(identity, rid, handle, client)
        finally:
            self._unhold(client, n - handed)

    def _unhold(self, client: _Client, count: int) -> None:
        if count:
            client.held -= count
            client.changed.set()

    def _release(self, handle: ExpertHandle, client: _Client) -> None:
        self.store.release([handle])
        self._unhold(client, 1)

    async def _send_expert(self, identity: bytes, rid: int, handle: ExpertHandle, client: _Client) -> None:
        """Send one pinned expert from its cache buffer; the pin is dropped once libzmq is done with it.

        Each tensor frame is a numpy view of the cache buffer (no copy). pyzmq's garbage collector holds that
        view until libzmq has sent or dropped the frame; when the last reference goes, a finalizer hands the
        frame back to the loop. So the release is driven by libzmq itself, with no polling.
        """
        spec = self.layout.spec(handle.key)
        await self._room_for_unsent()
        unsent = _Unsent(handle, client, len(spec.tensors), identity, time.monotonic())
        unsent.timer = self._loop.call_later(self.config.unsent_deadline, self._expire, unsent)
        self._unsent.add(unsent)
        try:
            buffer = self.store.host_buffer(handle)
            checksum = self._checksums.get(handle.key)
            if checksum is None:
                checksum = self._checksums[handle.key] = spec.checksum or spec_checksum(spec, buffer)
            entries = []
            for t, off in spec.views():
                view = np.frombuffer(buffer, dtype=np.uint8, count=t.nbytes, offset=off)
                weakref.finalize(view, self._frame_freed_threadsafe, unsent)
                entries.append((t.role, t.dtype, t.shape, view))
            frames = P.encode_expert_reply(rid, handle.key, entries, checksum, self.limits)
            del entries, view
            await self._send(identity, frames)
        except BaseException:
            self._settle(unsent)  # nothing of it is with libzmq, or libzmq dropped it with its peer
            raise
        self.counters["experts_sent"] += 1
        self.counters["bytes_sent"] += spec.nbytes

    def _frame_freed_threadsafe(self, unsent: _Unsent) -> None:
        """Called when one frame's view dies: on pyzmq's garbage-collector thread or on the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: aclose() settled everything already
            self._loop.call_soon_threadsafe(self._frame_freed, unsent)

    def _frame_freed(self, unsent: _Unsent) -> None:
        unsent.frames -= 1
        if unsent.frames <= 0:
            self._settle(unsent)

    async def _room_for_unsent(self) -> None:
        """Wait until fewer than ``unsent_cap`` replies pin the cache. A reply that has waited in libzmq longer
        than a reader needs (UNSENT_SLOW) while others queue behind it is expired, and its client dropped."""
        while len(self._unsent) >= self.unsent_cap:
            oldest = min(self._unsent, key=lambda u: u.created)
            age = time.monotonic() - oldest.created
            slow = min(UNSENT_SLOW, self.config.unsent_deadline)
            if age >= slow:
                self._expire(oldest)
                continue
            self._unsent_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._unsent_changed.wait(), slow - age)

    def _expire(self, unsent: _Unsent) -> None:
        """A reply waited too long in libzmq (or others need its pin): unpin it and drop its client."""
        if unsent in self._unsent:
            self.counters["replies_expired"] += 1
            self._drop(unsent.identity)
            self._settle(unsent)

    def _settle(self, unsent: _Unsent) -> None:
        """Unpin a reply's expert exactly once, and forget an idle client."""
        if unsent not in self._unsent:
            return
        self._unsent.discard(unsent)
        self._unsent_changed.set()
        if unsent.timer is not None:
            unsent.timer.cancel()
        self._release(unsent.handle, unsent.client)
        self._forget_idle(unsent.identity, unsent.client)

    # --- sending --------------------------------------------------------------------------------------

    async def _send(self, identity: bytes, frames: P.Frames) -> None:
        assert self._sock is not None
        async with self._send_lock:  # one multipart message at a time: frames of two replies never interleave
            try:
                await self._sock.send_multipart([identity, *frames], copy=False, flags=zmq.DONTWAIT)
            except zmq.Again:
                self._drop(identity)
                raise _ClientGone() from None
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    raise _ClientGone() from None
                raise

    def _drop(self, identity: bytes) -> None:
        """A connection with max_unsent_replies waiting is not reading: ignore it for a while."""
        if identity not in self._dropped:
            self.counters["clients_dropped"] += 1
            log.warning(
                "dropping a client that does not read its replies (%d unsent)", self.config.max_unsent_replies
            )
        self._dropped[identity] = time.monotonic() + self.config.drop_seconds

    def _ignored(self, identity: bytes) -> bool:
        until = self._dropped.get(identity)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._dropped[identity]
            return False
        return True

    async def _error(
        self,
        identity: bytes,
        rid: int,
        code: P.ErrorCode,
        message: str,
        key: ExpertKey | None = None,
    ) -> None:
        self.counters["errors_total"] += 1
        self.counters[f"errors_{code.value.lower()}"] += 1
        log.debug("request %d: %s %s", rid, code.value, message)
        with contextlib.suppress(_ClientGone):
            await self._send(identity, P.encode_error(rid, code, message, key, self.limits))

    # --- monitoring -----------------------------------------------------------------------------------

    def stat_counters(self) -> dict[str, int | float]:
        """Counters and gauges for ``stat`` (names are stable: monitoring scrapes them)."""
        s = self.store.stats()
        out: dict[str, int | float] = {name: int(v) for name, v in sorted(self.counters.items())}
        out.update(
            {
                "uptime_seconds": round(time.monotonic() - self._started, 3),
                "experts_total": len(self.layout.experts),
                "cache_capacity_experts": self.store.num_slots,
                "cache_bytes": s.host_bytes,
                "cache_resident_experts": len(self.store.resident()),
                "cache_pinned_experts": len(self.store.pinned()),
                "cache_hits": s.device_hits,
                "cache_misses": s.device_misses,
                "cache_evictions": s.evictions,
                "disk_reads": sum(s.reads.values()),
                "disk_bytes_read": sum(s.bytes_read.values()),
                "read_errors": s.read_errors,
                "gets_in_flight": len(self._tasks),
                "clients_in_flight": sum(1 for c in self._clients.values() if c.gets),
                "clients_known": len(self._clients),
                "replies_unsent": len(self._unsent),
                "limit_max_unsent_replies": self.config.max_unsent_replies,
                "limit_unsent_pins": self.unsent_cap,
                "limit_unsent_deadline_seconds": self.config.unsent_deadline,
                "limit_client_pins": self.client_cap,
                "limit_gets_in_flight_per_client": self.limits.max_in_flight,
                "limit_request_frame_bytes": self.limits.max_header_bytes,
                "limit_request_bytes": self.config.max_request_bytes,
                "limit_idle_seconds": self.config.idle_timeout,
            }
        )
        front = self._frontend.counters if self._frontend is not None else {}
        for name in (
            "connections_total",
            "connections_refused",
            "connections_unauthorized",
            "messages_refused",
        ):
            out[name] = int(front.get(name, 0))
        out["connections_open"] = self._frontend.connections if self._frontend is not None else 0
        return out


async def run_server(checkpoint: str | Path | ExpertLayout, config: ServerConfig) -> None:
    """Run the daemon until SIGTERM or SIGINT, then shut down gracefully."""
    server = await ExpertServer.start(checkpoint, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        for endpoint in server.endpoints:
            # One line per endpoint on stdout: scripts (and the tests) read the bound address from it.
            print(f"listening on {endpoint}", flush=True)
        await server.serve_forever()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
