"""Remote-tier rows of ``expertflow bench tiers``: a real daemon on loopback vs raw ZeroMQ PUSH/PULL.

For each transport (``tcp://127.0.0.1`` and ``ipc://``) the same run measures

* the remote tier: an ``expertflow-store serve`` child process holding the experts in its RAM cache (filled
  before timing), read through :class:`~expertflow.tiers.remote.RemoteTier` into host buffers with N reads in
  flight (checksum verified and copied to canonical offsets, as the store does);
* the limit: a child process pushing messages of the expert's size (one frame per tensor, as a reply has)
  over a PUSH socket to a PULL socket here, zero-copy on both sides, with nothing done to the bytes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from expertflow.config import StoreConfig
from expertflow.core import BLOCK, ExpertKey, round_up
from expertflow.lab.tiers import Timing, _row
from expertflow.services.process import DaemonProcess
from expertflow.tiers.host import HostPool
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.local_checksums import fill
from expertflow.tiers.remote import RemoteTier

START_TIMEOUT = 120.0


def _push_main(address: str, frame_sizes: list[int], count: int) -> None:
    """Child process of the raw limit: connect, then send one warm-up and ``count`` multipart messages whose
    frames have ``frame_sizes`` (an expert reply's tensor frames)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, -1)
    sock.connect(address)
    block = os.urandom(1 << 16)
    frames = [memoryview(bytearray(block * (n // len(block) + 1))[:n]) for n in frame_sizes]
    sock.send(b"warm-up")
    for _ in range(count):
        sock.send_multipart(frames, copy=False)
    sock.close()
    ctx.term()


def raw_push_pull(bind: str, frame_sizes: Sequence[int], count: int) -> Timing:
    """Raw ZeroMQ throughput of ``count`` messages (frames of ``frame_sizes``) from another process."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(bind)
        address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        code = (
            "from expertflow.lab.remote import _push_main; "
            f"_push_main({address!r}, {list(frame_sizes)!r}, {count})"
        )
        child = subprocess.Popen([sys.executable, "-c", code])
        try:
            if not sock.poll(int(START_TIMEOUT * 1000)):
                raise RuntimeError("the PUSH process sent nothing")
            sock.recv()  # warm-up: the connection is up and the child is sending
            latencies = []
            total = 0
            t0 = last = time.perf_counter()
            for _ in range(count):
                frames = sock.recv_multipart(copy=False)
                total += sum(len(f.buffer) for f in frames)
                now = time.perf_counter()
                latencies.append(now - last)
                last = now
            return Timing(total, time.perf_counter() - t0, latencies)
        finally:
            child.wait(60)
    finally:
        sock.close()
        ctx.term()


def read_remote(
    layout: ExpertLayout, address: str, keys: Sequence[ExpertKey], concurrency: int, repeats: int = 3
) -> Timing:
    """Read ``keys`` through a RemoteTier with ``concurrency`` reads in flight: the fastest of ``repeats``
    timed passes, after one untimed pass."""
    slot = round_up(layout.max_expert_nbytes, BLOCK)
    pool = HostPool(slot, slot * concurrency + BLOCK)

    async def run() -> Timing:
        tier = await RemoteTier.connect(layout, StoreConfig(remote=(address,), remote_timeout=60.0))
        try:
            if tier.checksums is not None:  # an unpacked checkpoint: record the local checksums, untimed
                await asyncio.to_thread(fill, tier.checksums)

            async def one_pass(latencies: list[float]) -> int:
                queue = list(reversed(keys))
                done = 0

                async def reader(i: int) -> None:
                    nonlocal done
                    buf = pool.buffer(i)
                    while queue:
                        key = queue.pop()
                        t0 = time.perf_counter()
                        n = await tier.read(key, buf)
                        done += n
                        latencies.append(time.perf_counter() - t0)

                await asyncio.gather(*(reader(i) for i in range(concurrency)))
                return done

            await one_pass([])  # the daemon's cache is warm after this (and so are both processes)
            timings = []
            for _ in range(repeats):
                latencies: list[float] = []
                t0 = time.perf_counter()
                nbytes = await one_pass(latencies)
                timings.append(Timing(nbytes, time.perf_counter() - t0, latencies))
            return max(timings, key=lambda t: t.gbps)
        finally:
            await tier.aclose()

    try:
        return asyncio.run(run())
    finally:
        pool.close()


def measure_remote(
    layout: ExpertLayout,
    keys: Sequence[ExpertKey],
    *,
    concurrency: int = 4,
    repeats: int = 3,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Rows for the remote tier over tcp and ipc, each beside raw PUSH/PULL of the same message size.

    Both sides are the fastest of ``repeats`` passes over ``keys``: one pass is well under a second here, and
    the other tenants of a small machine make single passes vary by tens of percent.
    """
    expert_nbytes = layout.spec(keys[0]).nbytes
    frame_sizes = [t.nbytes for t in layout.spec(keys[0]).tensors]
    mem = round_up(layout.max_expert_nbytes, BLOCK) * (len(keys) + 1)
    rows: list[dict[str, Any]] = []
    limits: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="expertflow-bench-") as tmp:
        for transport, bind in (("tcp", "tcp://127.0.0.1:*"), ("ipc", f"ipc://{Path(tmp) / 'experts.sock'}")):
            raw_bind = bind if transport == "tcp" else f"ipc://{Path(tmp) / 'raw.sock'}"
            raw = max(
                (raw_push_pull(raw_bind, frame_sizes, len(keys)) for _ in range(repeats)),
                key=lambda t: t.gbps,
            )
            with DaemonProcess(
                layout.root, (bind,), ("--mem", str(mem), "--preload", "--log-level", "WARNING")
            ) as d:
                timing = read_remote(layout, d.address, keys, concurrency, repeats)
                d.terminate()
            limit_name = f"zmq PUSH/PULL {transport}"
            rows.append(_row(f"remote {transport} qd={concurrency}", timing, limit_name, raw, expert_nbytes))
            limits.append(_row(f"{limit_name} (limit)", raw, "", None, expert_nbytes))
            log(f"remote {transport}: {timing.gbps:.2f} GB/s vs raw ZeroMQ {raw.gbps:.2f} GB/s")
    return rows + limits
