"""Remote tier: experts from one or more ``expertflow-store serve`` daemons, with fail-over.

Experts are assigned to servers by rendezvous (highest-random-weight) hashing, so adding or losing a server
moves only its share of experts; with ``replicas`` > 1 each expert has that many servers in preference order.
A server that times out or disconnects is skipped and retried later with exponential back-off (and a new
``hello``, in case it came back serving another checkpoint). A read that no server can answer raises
``RemoteError``: the store then reads the expert from the next source (the local NVMe tier), so no request is
lost. Every expert is checked against the local layout (names, dtypes, shapes, sizes) and its checksum before
one byte of it is used: the checksum the local copy gives, from a pack's manifest or, for an unpacked
checkpoint, from :class:`~expertflow.tiers.local_checksums.LocalChecksums`; an expert whose local checksum is
not known yet is not asked for (``UnverifiableExpertError``), and a server whose bytes differ from the local
copy's is not used again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from expertflow.config import StoreConfig
from expertflow.core import ExpertKey
from expertflow.errors import ChecksumError, FingerprintMismatchError, RemoteError, UnverifiableExpertError
from expertflow.tiers.fingerprint import content_fingerprint
from expertflow.tiers.layout import ExpertLayout, ExpertSpec
from expertflow.tiers.local_checksums import LocalChecksums
from expertflow.wire import protocol as P
from expertflow.wire.client import ExpertClient

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
# Errors after which a server is taken out of rotation (a retry on the same server would only wait again).
#: Consecutive BUSY answers after which a server counts as down (it is alive but cannot serve us).
BUSY_LIMIT = 3
#: Stale replies (answers to requests nobody waits for) between two reads that mark a server as flooding.
STALE_LIMIT = 64
_SERVER_DOWN = frozenset({"TIMEOUT", "DISCONNECTED", "UNAUTHORIZED", "CLOSED", "SHUTTING_DOWN", "BAD_REPLY"})


def rendezvous_order(addresses: Sequence[str], key: ExpertKey) -> list[str]:
    """Servers in preference order for ``key``: the same on every client, stable when servers come and go."""
    return sorted(
        addresses,
        key=lambda a: xxhash.xxh64_intdigest(f"{a}|{key.layer}|{key.expert}".encode()),
        reverse=True,
    )


@dataclass
class _Server:
    address: str
    client: ExpertClient
    down_until: float = 0.0
    backoff: float = BACKOFF_START
    needs_hello: bool = True
    disabled: str | None = None  # a permanent reason (wrong checkpoint)
    busy: int = 0  # consecutive BUSY answers
    stale_seen: int = 0  # the client's stale-reply count at the last check
    handshakes_seen: int = 0  # the client's handshake count when it was marked down

    def available(self, now: float) -> bool:
        """Not disabled, and its back-off is over or it connected anew since it was marked down (a daemon
        that restarts is used again as soon as it answers, after a new ``hello``)."""
        if self.disabled is not None:
            return False
        return now >= self.down_until or self.client.handshakes > self.handshakes_seen

    def mark_down(self, reason: str) -> None:
        if self.down_until <= time.monotonic():
            log.warning(
                "expert server %s unavailable (%s); retrying in %.1f s", self.address, reason, self.backoff
            )
        self.down_until = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.needs_hello = True
        self.handshakes_seen = self.client.handshakes

    def mark_up(self) -> None:
        self.down_until = 0.0
        self.backoff = BACKOFF_START
        self.busy = 0

    def flooding(self) -> bool:
        """Whether it sent many replies nobody asked for since the last check (a broken or hostile server)."""
        new = self.client.stale_replies - self.stale_seen
        self.stale_seen = self.client.stale_replies
        return new > STALE_LIMIT


class RemoteTier:
    """An :class:`~expertflow.tiers.base.ExpertSource` over expert servers. Create with :meth:`connect`."""

    name = "remote"

    def __init__(
        self,
        layout: ExpertLayout,
        fingerprint: str,
        servers: list[_Server],
        *,
        replicas: int = 1,
        retries: int = 2,
        deadline: float = 5.0,
        checksums: LocalChecksums | None = None,
    ) -> None:
        self.layout = layout
        # The local copy's checksums of an unpacked checkpoint; owned (closed with the tier).
        self.checksums = checksums
        self.fingerprint = fingerprint
        self._servers = {s.address: s for s in servers}
        self.replicas = max(1, min(replicas, len(servers)))
        self.retries = retries
        self.deadline = deadline  # for one expert, over every server and retry; then the next source
        self.counters: dict[str, int] = {
            "reads": 0,
            "failovers": 0,
            "checksum_errors": 0,
            "wrong_bytes": 0,
            "unverifiable": 0,
            "errors": 0,
            "marked_down": 0,
        }
        self.reads_by_server: dict[str, int] = {s.address: 0 for s in servers}

    @classmethod
    async def connect(
        cls, layout: ExpertLayout, config: StoreConfig, *, checksums: LocalChecksums | None = None
    ) -> RemoteTier:
        """Connect to ``config.remote`` and check each server's checkpoint fingerprint.

        An unpacked checkpoint's replies are checked against ``checksums`` (opened beside the checkpoint when
        not given); the tier owns it either way.

        A server serving another checkpoint is refused (``FingerprintMismatchError``); one that does not
        answer is only logged: it is retried while reading, and reads fall through to NVMe meanwhile.
        """
        fingerprint = await asyncio.to_thread(content_fingerprint, layout)
        if checksums is None and not layout.packed:
            checksums = await asyncio.to_thread(LocalChecksums.open, layout)
        # Replies carry one tensor per frame: nothing larger than this checkpoint's largest tensor is expected.
        largest = max(t.nbytes for spec in layout.experts.values() for t in spec.tensors)
        limits = dataclasses.replace(P.DEFAULT_LIMITS, max_frame_bytes=max(1, largest))
        servers = []
        for address in dict.fromkeys(config.remote):
            client = ExpertClient(
                address,
                timeout=config.remote_timeout,
                curve_server_key=config.curve_server_key,
                curve_client_secret=config.curve_client_secret,
                limits=limits,
            )
            servers.append(_Server(address, client))
        tier = cls(
            layout,
            fingerprint,
            servers,
            replicas=config.remote_replicas,
            retries=config.remote_retries,
            deadline=config.remote_timeout,
            checksums=checksums,
        )
        try:
            await asyncio.gather(*(tier._hello(s, strict=True) for s in servers))
        except BaseException:
            await tier.aclose()
            raise
        return tier

    async def _hello(self, server: _Server, *, strict: bool = False) -> bool:
        """Check the server's fingerprint; True when it may be used."""
        try:
            reply = await server.client.hello()
        except RemoteError as exc:
            if exc.code == "CHECKPOINT_CHANGED":
                self._disable(server, str(exc))
            else:
                server.mark_down(f"hello failed: {exc}")
            return False
        if reply.fingerprint != self.fingerprint:
            message = (
                f"expert server {server.address} serves checkpoint {reply.fingerprint}, "
                f"this model is {self.fingerprint}"
            )
            if strict:
                raise FingerprintMismatchError(message)
            log.error("%s; not using it", message)
            server.disabled = message
            return False
        server.needs_hello = False
        server.mark_up()
        return True

    # --- ExpertSource ---------------------------------------------------------------------------------

    def buffer_nbytes(self, key: ExpertKey | None = None) -> int:
        return self.layout.max_expert_nbytes if key is None else self.layout.spec(key).nbytes

    async def read(self, key: ExpertKey, buf: memoryview) -> int:
        """Fill ``buf`` with ``key`` in canonical layout from the first server that can provide it."""
        spec = self.layout.spec(key)
        expected = self._expected_checksum(spec)
        now = time.monotonic()
        order = rendezvous_order([s.address for s in self._servers.values() if s.disabled is None], key)
        candidates = [self._servers[a] for a in order[: self.replicas]]
        last: Exception | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline
        for rank, server in enumerate(candidates):
            if not server.available(now):
                continue
            if server.flooding():
                self._down(server, "a flood of replies nobody asked for")
                continue
            if server.needs_hello and not await self._hello(server):
                continue
            for attempt in range(self.retries + 1):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    last = RemoteError(f"{key}: no expert within {self.deadline} s", code="TIMEOUT")
                    self._down(server, "too slow")
                    break
                try:
                    reply = await asyncio.wait_for(server.client.get_one(key), remaining)
                    nbytes = self._place(spec, reply, buf, expected)
                except asyncio.TimeoutError:
                    last = RemoteError(f"{key}: no expert within {self.deadline} s", code="TIMEOUT")
                    self._down(server, "too slow")
                    break
                except ChecksumError as exc:
                    self.counters["checksum_errors"] += 1
                    last = exc
                    continue
                except FingerprintMismatchError as exc:
                    self.counters["wrong_bytes"] += 1
                    self._disable(server, str(exc))
                    last = exc
                    break
                except RemoteError as exc:
                    last = exc
                    if exc.code == "CHECKPOINT_CHANGED":
                        self._disable(server, str(exc))
                        break
                    if exc.code in _SERVER_DOWN:
                        self._down(server, str(exc))
                        break
                    if exc.code == "BUSY":
                        server.busy += 1
                        if server.busy >= BUSY_LIMIT:
                            self._down(server, f"BUSY {server.busy} times in a row")
                            break
                    await asyncio.sleep(0.01 * (attempt + 1))  # BUSY and read errors: the server is alive
                    continue
                server.mark_up()
                self.counters["reads"] += 1
                self.reads_by_server[server.address] += 1
                if rank:
                    self.counters["failovers"] += 1
                return nbytes
        self.counters["errors"] += 1
        if last is None:
            raise RemoteError(f"no expert server available for {key}", code="UNAVAILABLE")
        if isinstance(last, RemoteError):
            raise last
        raise RemoteError(f"{key}: {last}", code="CHECKSUM")

    def disabled_servers(self) -> dict[str, str]:
        """Servers not used any more (other weights, a changed checkpoint, wrong bytes), with the reason."""
        return {s.address: s.disabled for s in self._servers.values() if s.disabled is not None}

    def backoff(self) -> dict[str, tuple[float, float]]:
        """Per server: (seconds left of its back-off, its next back-off); (0, start) for one in use."""
        now = time.monotonic()
        return {s.address: (max(0.0, s.down_until - now), s.backoff) for s in self._servers.values()}

    def _disable(self, server: _Server, reason: str) -> None:
        """Never use this server again: it serves other bytes than it announced."""
        log.error("expert server %s is not used any more: %s", server.address, reason)
        server.disabled = reason
        self.counters["marked_down"] += 1

    def _down(self, server: _Server, reason: str) -> None:
        self.counters["marked_down"] += 1
        server.mark_down(reason)

    def _expected_checksum(self, spec: ExpertSpec) -> int:
        """The local copy's checksum of ``spec``; ``UnverifiableExpertError`` while it is not known."""
        if spec.checksum is not None:
            return spec.checksum
        value = self.checksums.get(spec.key) if self.checksums is not None else None
        if value is None:
            self.counters["unverifiable"] += 1
            raise UnverifiableExpertError(
                f"{spec.key}: its local checksum is not known yet", code="UNVERIFIED"
            )
        return value

    def _place(self, spec: ExpertSpec, reply: P.ExpertReply, buf: memoryview, expected: int) -> int:
        """Copy a verified reply into ``buf`` at canonical offsets, after checking it is this expert."""
        if len(reply.tensors) != len(spec.tensors):
            raise RemoteError(
                f"{spec.key}: server sent {len(reply.tensors)} tensors, the local layout has {len(spec.tensors)}",
                code="BAD_REPLY",
            )
        for wire, (t, _) in zip(reply.tensors, spec.views()):
            if (wire.name, wire.dtype, wire.shape, wire.nbytes) != (t.role, t.dtype, t.shape, t.nbytes):
                raise RemoteError(
                    f"{spec.key}: server sent {wire.name} {wire.dtype}{list(wire.shape)}, expected "
                    f"{t.role} {t.dtype}{list(t.shape)}",
                    code="BAD_REPLY",
                )
        if reply.checksum != expected:
            # The reply is self-consistent (the client verified it), so these are other bytes than ours.
            raise FingerprintMismatchError(
                f"{spec.key}: the server's bytes are not the local copy's (checksum {reply.checksum:016x}, "
                f"local {expected:016x})",
                code="WRONG_BYTES",
            )
        for wire, (t, off) in zip(reply.tensors, spec.views()):
            buf[off : off + t.nbytes] = wire.data
        return spec.nbytes

    async def aclose(self) -> None:
        await asyncio.gather(*(s.client.aclose() for s in self._servers.values()))
        if self.checksums is not None:
            self.checksums.close()

    def close(self) -> None:
        for s in self._servers.values():
            s.client.close()
        if self.checksums is not None:
            self.checksums.close()
