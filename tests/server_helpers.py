"""Real ``expertflow-store serve`` daemons in child processes, for tests on loopback tcp and ipc."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from expertflow.services.process import DaemonProcess


def daemon(checkpoint: Path, binds: tuple[str, ...] = ("tcp://127.0.0.1:*",), *extra: str) -> DaemonProcess:
    """A started daemon; use it as a context manager (it is killed on exit)."""
    return DaemonProcess(checkpoint, binds, extra, start_timeout=60.0)


def logits_through_daemon(
    checkpoint: Path, input_ids: Any, *, daemon_bytes: int, host_bytes: int, passes: int = 1
) -> tuple[Any, Any]:
    """``load_model(checkpoint)`` with a real loopback daemon (``--mem daemon_bytes``) serving its experts:
    the logits of the last of ``passes`` forwards of ``input_ids``, and the store's statistics. Earlier passes
    let the local reads record the checksums that daemon replies are checked against, where the checkpoint
    has none of its own."""
    import torch

    from expertflow.config import StoreConfig
    from expertflow.model.loader import load_model

    with daemon(checkpoint, ("tcp://127.0.0.1:*",), "--mem", str(daemon_bytes)) as proc:
        config = StoreConfig(
            host_bytes=host_bytes, predictor="none", remote=(proc.address,), remote_timeout=5.0
        )
        with load_model(checkpoint, config=config) as model, torch.no_grad():
            for _ in range(passes):
                logits = model(input_ids=input_ids).logits
            return logits, model.expert_stats()


class CorruptingProxy:
    """A real ZeroMQ hop between clients and a daemon that damages every expert reply in one way.

    Clients connect to :attr:`address` (a ROUTER); each client gets its own DEALER to the daemon, so the
    daemon sees ordinary clients. Modes: ``flip`` changes one payload bit and keeps the checksum of the good
    bytes (transit corruption); ``swap`` sends the first two tensors in the other order (each with its own
    name), with a checksum that matches the reordered bytes (a lying server). Two more lies need a daemon
    serving the wrong bytes: ``claim`` rewrites the fingerprint in ``hello`` replies to ``fingerprint`` (a
    daemon on other weights that says it serves ours); ``relabel`` asks the daemon for the next expert of the
    same layer (of ``experts_per_layer``) and relabels its reply as the one asked for, with a checksum seeded
    by the asked key. Requests and every other reply pass through unchanged.
    """

    def __init__(
        self, upstream: str, mode: str, *, fingerprint: str | None = None, experts_per_layer: int = 0
    ) -> None:
        import zmq
        import zmq.asyncio

        self.upstream = upstream
        self.mode = mode
        self.fingerprint = fingerprint
        self.experts_per_layer = experts_per_layer
        self.damaged = 0
        self._ctx = zmq.asyncio.Context()
        self._front = self._ctx.socket(zmq.ROUTER)
        self._front.linger = 0
        port = self._front.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._backs: dict[bytes, object] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> CorruptingProxy:
        self._tasks.append(asyncio.create_task(self._forward_requests()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._ctx.destroy(linger=0)

    async def _forward_requests(self) -> None:
        import zmq

        while True:
            identity, *frames = await self._front.recv_multipart()
            back = self._backs.get(identity)
            if back is None:
                back = self._backs[identity] = self._ctx.socket(zmq.DEALER)
                back.linger = 0  # type: ignore[attr-defined]
                back.connect(self.upstream)  # type: ignore[attr-defined]
                self._tasks.append(asyncio.create_task(self._forward_replies(identity, back)))
            await back.send_multipart(self._relabel_request(frames))  # type: ignore[attr-defined]

    async def _forward_replies(self, identity: bytes, back: object) -> None:
        while True:
            frames = await back.recv_multipart()  # type: ignore[attr-defined]
            await self._front.send_multipart([identity, *self._damage(frames)])

    def _relabel_request(self, frames: list[bytes]) -> list[bytes]:
        import msgpack

        if self.mode != "relabel":
            return frames
        head = msgpack.unpackb(frames[0])
        if head.get("op") != "get":
            return frames
        head["keys"] = [[layer, (expert + 1) % self.experts_per_layer] for layer, expert in head["keys"]]
        return [msgpack.packb(head), *frames[1:]]

    def _damage(self, frames: list[bytes]) -> list[bytes]:
        import msgpack

        from expertflow.core import ExpertKey, expert_checksum

        head = msgpack.unpackb(frames[0])
        if self.mode == "claim" and head.get("op") == "hello_reply":
            head["fingerprint"] = self.fingerprint
            self.damaged += 1
            return [msgpack.packb(head), *frames[1:]]
        if head.get("op") != "expert" or len(frames) < 3:
            return frames
        if self.mode == "claim":
            return frames
        if self.mode == "relabel":
            layer, expert = head["key"]
            head["key"] = [layer, (expert - 1) % self.experts_per_layer]
            head["checksum"] = expert_checksum(ExpertKey(*head["key"]), (bytes(f) for f in frames[1:]))
            self.damaged += 1
            return [msgpack.packb(head), *frames[1:]]
        payload = [bytearray(f) for f in frames[1:]]
        if self.mode == "flip":
            payload[0][len(payload[0]) // 2] ^= 0x01
        else:
            t = head["tensors"]
            t[0], t[1] = t[1], t[0]
            payload[0], payload[1] = payload[1], payload[0]
            head["checksum"] = expert_checksum(ExpertKey(*head["key"]), (bytes(p) for p in payload))
        self.damaged += 1
        return [msgpack.packb(head), *(bytes(p) for p in payload)]
