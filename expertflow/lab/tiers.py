"""``expertflow bench tiers``: throughput and per-expert latency of each path, beside its raw limit.

Paths and the limit each is compared with (measured in the same run, on the same bytes):

* NVMe ``direct`` (O_DIRECT preads, 1 and N in flight)  vs  ``dd iflag=direct`` with the expert size as block,
  as 1 and N concurrent dd processes
* NVMe ``mmap``, cold page cache, N in flight            vs  N concurrent ``dd iflag=direct``
* NVMe ``mmap``, warm page cache, N in flight            vs  memcpy of the same sizes in N threads
* host -> device slot copy (one at a time)               vs  memcpy of the same sizes in one thread
* remote over ``tcp://127.0.0.1`` and ``ipc://``          vs  raw ZeroMQ PUSH/PULL with the same message size

Each path is compared with a limit at the same parallelism: a path at 4 reads in flight against a
single-stream limit can come out above 1, which says nothing about the path.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertflow.core import BLOCK, ExpertKey, slot_nbytes
from expertflow.lab.report import BenchResult
from expertflow.tiers.device import CopyDeviceTier
from expertflow.tiers.host import HostPool
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.nvme import NvmeTier


@dataclass
class Timing:
    nbytes: int
    seconds: float
    latencies: list[float]

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def drop_page_cache(files: Sequence[str]) -> str:
    """Evict ``files`` from the page cache; returns the method used (said in the report)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "posix_fadvise(DONTNEED) + drop_caches"
    except OSError:
        return "posix_fadvise(DONTNEED)"


def dd_direct(files: Sequence[str], block: int, streams: int = 1) -> Timing | None:
    """``dd iflag=direct`` over every file, as ``streams`` concurrent dd processes each reading its own
    contiguous share (the raw limit for that many reads in flight); None where dd or O_DIRECT is missing."""
    dd = shutil.which("dd")
    if dd is None:
        return None
    bs = max(BLOCK, block // BLOCK * BLOCK)
    total = 0
    seconds = 0.0
    for file in files:
        blocks = -(-os.path.getsize(file) // bs)
        share = -(-blocks // streams)
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [
                    dd,
                    f"if={file}",
                    "of=/dev/null",
                    f"bs={bs}",
                    "iflag=direct",
                    f"skip={i * share}",
                    f"count={share}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(streams)
            if i * share < blocks
        ]
        outputs = [(p.communicate()[1], p.returncode) for p in procs]
        seconds += time.perf_counter() - t0
        for stderr, code in outputs:
            if code != 0:
                return None
            m = re.search(r"^(\d+) bytes", stderr, re.MULTILINE)
            total += int(m.group(1)) if m else 0
    return Timing(total, seconds, [])


def read_experts(tier: NvmeTier, keys: Sequence[ExpertKey], concurrency: int) -> Timing:
    """Read ``keys`` through the NVMe tier with ``concurrency`` reads in flight, into host-pool buffers."""
    slot = slot_nbytes([tier.buffer_nbytes()])  # what HostPool rounds each buffer up to
    pool = HostPool(slot, slot * concurrency)
    latencies: list[float] = []

    async def run() -> int:
        queue: asyncio.Queue[ExpertKey] = asyncio.Queue()
        for k in keys:
            queue.put_nowait(k)
        done = 0

        async def reader(i: int) -> None:
            nonlocal done
            buf = pool.buffer(i)
            while not queue.empty():
                key = queue.get_nowait()
                t0 = time.perf_counter()
                n = await tier.read(key, buf)  # read first: `done += await` would race the other readers
                done += n
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(reader(i) for i in range(concurrency)))
        return done

    try:
        t0 = time.perf_counter()
        nbytes = asyncio.run(run())
        return Timing(nbytes, time.perf_counter() - t0, latencies)
    finally:
        pool.close()


WORKING_SET = 512 << 20  # larger than any CPU cache: copies run at DRAM speed, as the store's do


def memcpy(nbytes: int, count: int, threads: int = 1) -> Timing:
    """Plain tensor copies of ``nbytes`` between preallocated buffers rotating over a DRAM-sized working set,
    ``count`` copies split over ``threads`` threads (the limit for that many copies in flight)."""
    n = max(2, WORKING_SET // threads // nbytes)
    per_thread = max(1, count // threads)
    srcs = [torch.ones(n, nbytes, dtype=torch.uint8) for _ in range(threads)]
    dsts = [
        torch.zeros(n, nbytes, dtype=torch.uint8) for _ in range(threads)
    ]  # first touch outside the timing
    latencies: list[float] = []

    def copy(t: int) -> None:
        src, dst = srcs[t], dsts[t]
        for i in range(per_thread):
            s = time.perf_counter()
            dst[i % n].copy_(src[(i * 7 + 3) % n])  # torch releases the GIL: threads copy in parallel
            latencies.append(time.perf_counter() - s)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy, range(threads)))
    return Timing(nbytes * per_thread * threads, time.perf_counter() - t0, latencies)


def host_to_device(nbytes: int, count: int, device: str = "cpu") -> Timing:
    """Copies from host-pool buffers into device-tier slots (the store's upload path), same working set as memcpy."""
    n = max(2, WORKING_SET // nbytes)
    pool = HostPool(nbytes, nbytes * n + BLOCK * n)
    tier = CopyDeviceTier(device, pool.num_buffers, pool.buffer_nbytes)
    try:
        pool.tensor.fill_(1)
        latencies = []
        m = pool.num_buffers

        async def run() -> None:
            for i in range(count):
                s = time.perf_counter()
                slot = i % m
                await tier.upload(pool, (i * 7 + 3) % m, slot, nbytes)
                tier.wait_ready(slot)
                if tier.device.type == "cuda":
                    torch.cuda.synchronize()
                latencies.append(time.perf_counter() - s)

        t0 = time.perf_counter()
        asyncio.run(run())
        return Timing(nbytes * count, time.perf_counter() - t0, latencies)
    finally:
        tier.close()
        pool.close()


def _row(
    path: str, timing: Timing, limit_name: str, limit: Timing | None, expert_nbytes: int, **extra: Any
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "path": path,
        "expert_MiB": expert_nbytes / 2**20,
        "GB/s": timing.gbps,
        "p50_ms": timing.latency_ms(0.5),
        "p99_ms": timing.latency_ms(0.99),
        "limit": limit_name,
        "limit_GB/s": limit.gbps if limit else None,
        "fraction": timing.gbps / limit.gbps if limit and limit.gbps else None,
    }
    row.update(extra)
    return row


def run_tiers(
    layout: ExpertLayout,
    *,
    max_experts: int | None = None,
    concurrency: int = 4,
    remote: Callable[..., list[dict[str, Any]]] | None = None,
    log: Callable[[str], None] = print,
) -> BenchResult:
    """Measure every path on the experts of ``layout`` (the first ``max_experts`` of them)."""
    run = _TiersRun(layout, layout.keys()[: max_experts or None], concurrency, log)
    run.measure_dd_limits()
    run.measure_direct()
    run.measure_memcpy_limits()
    run.measure_mmap()
    run.measure_host_to_device()
    run.add_limit_rows()
    if remote is not None:
        run.measure_remote(remote)
    return run.finish()


def _dd_name(qd: int) -> str:
    """The name of the dd limit with ``qd`` reads in flight."""
    return "dd iflag=direct" + (f" x{qd}" if qd > 1 else "")


def _mc_name(threads: int) -> str:
    """The name of the memcpy limit with ``threads`` copies in flight."""
    return "memcpy" + (f" x{threads} threads" if threads > 1 else "")


class _TiersRun:
    """One :func:`run_tiers`: the experts it reads, the limits measured once for every path, the result."""

    def __init__(
        self, layout: ExpertLayout, keys: list[ExpertKey], concurrency: int, log: Callable[[str], None]
    ) -> None:
        self.layout = layout
        self.keys = keys
        self.concurrency = concurrency
        self.log = log
        self.expert_nbytes = layout.spec(keys[0]).nbytes
        self.files = sorted({t.file for k in keys for t in layout.spec(k).tensors})
        total = sum(layout.spec(k).nbytes for k in keys)
        self.result = BenchResult("tiers", [])
        self.parallelism = sorted({1, concurrency})
        self.copies = max(4, min(len(keys), 64))
        self.dd: dict[int, Timing | None] = {}
        self.mc: dict[int, Timing] = {}
        self.cache_drop_method = ""
        log(
            f"{len(keys)} experts of {self.expert_nbytes / 2**20:.2f} MiB ({total / 1e9:.2f} GB) "
            f"in {len(self.files)} files"
        )

    def _add(self, path: str, timing: Timing, limit_name: str, limit: Timing | None) -> None:
        """Append the row of ``path`` beside its limit."""
        self.result.rows.append(_row(path, timing, limit_name, limit, self.expert_nbytes))

    def measure_dd_limits(self) -> None:
        """The raw NVMe limit: ``dd iflag=direct`` at each parallelism, from a cold page cache."""
        self.cache_drop_method = drop_page_cache(self.files)
        self.dd = {qd: dd_direct(self.files, self.expert_nbytes, qd) for qd in self.parallelism}
        self.result.notes.append(
            "dd: `dd if=FILE of=/dev/null bs=<expert size> iflag=direct` over the same files (whole files); "
            "for N reads in flight, N dd processes each reading a contiguous share at once"
        )

    def measure_direct(self) -> None:
        """NVMe O_DIRECT reads at each parallelism, each from a cold page cache."""
        with NvmeTier(self.layout, "direct") as tier:
            direct_note = "O_DIRECT" if tier.direct_io else "O_DIRECT refused: buffered reads"
            for qd in self.parallelism:
                drop_page_cache(self.files)
                t = read_experts(tier, self.keys, qd)
                self._add(f"nvme direct qd={qd}", t, _dd_name(qd), self.dd[qd])
                self.log(f"nvme direct qd={qd}: {t.gbps:.2f} GB/s ({direct_note})")

    def measure_memcpy_limits(self) -> None:
        """The raw memory limit: memcpy of expert-sized buffers at each parallelism."""
        self.mc = {n: memcpy(self.expert_nbytes, self.copies * n, n) for n in self.parallelism}

    def measure_mmap(self) -> None:
        """NVMe mmap reads, first from a cold page cache, then again from the warm one."""
        qd = self.concurrency
        with NvmeTier(self.layout, "mmap") as tier:
            drop_page_cache(self.files)
            cold = read_experts(tier, self.keys, qd)
            self._add(f"nvme mmap cold qd={qd}", cold, _dd_name(qd), self.dd[qd])
            warm = read_experts(tier, self.keys, qd)
            self._add(f"nvme mmap warm qd={qd}", warm, _mc_name(qd), self.mc[qd])
            self.log(f"mmap cold {cold.gbps:.2f} GB/s, warm {warm.gbps:.2f} GB/s")
        self.result.notes.append(f"cold page cache: {self.cache_drop_method} before each cold measurement")

    def measure_host_to_device(self) -> None:
        """Host-pool to device-slot copies, on the GPU when there is one."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        h2d = host_to_device(self.expert_nbytes, self.copies, device)
        self._add(f"host -> {device} slot", h2d, "memcpy", self.mc[1])
        if device == "cpu":
            self.result.notes.append(
                "no GPU: host -> device is the CPU slot copy the store would do with a separate tier"
            )

    def add_limit_rows(self) -> None:
        """The limits themselves, as rows of their own."""
        for qd, timing in self.dd.items():
            if timing is not None:
                self._add(f"{_dd_name(qd)} (limit)", timing, "", None)
        for n, timing in self.mc.items():
            self._add(f"{_mc_name(n)} (limit)", timing, "", None)

    def measure_remote(self, remote: Callable[..., list[dict[str, Any]]]) -> None:
        """The remote tier's rows, as ``remote`` measures them."""
        self.result.rows.extend(remote(self.layout, self.keys, concurrency=self.concurrency, log=self.log))
        self.result.notes.append(
            "remote: an `expertflow-store serve` child process with every expert in its RAM cache (warmed by one "
            "untimed pass); limit: raw ZeroMQ PUSH (child process) -> PULL of the same message size and count; "
            "each the fastest of 3 passes"
        )

    def finish(self) -> BenchResult:
        """The result, summarised as each path's fraction of its limit."""
        self.result.summary = {
            r["path"]: round(r["fraction"], 3) for r in self.result.rows if r.get("fraction") is not None
        }
        return self.result


def plot_tiers(result: BenchResult, path: str | Path) -> Path:
    """Bar chart: each path's GB/s beside its limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.get("limit")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["GB/s"] for r in rows], width=0.4, label="ExpertFlow path")
    ax.bar(
        [x + 0.2 for x in xs], [r["limit_GB/s"] or 0 for r in rows], width=0.4, label="raw limit", alpha=0.6
    )
    ax.set_xticks(list(xs), [r["path"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("GB/s")
    ax.set_title("Throughput per tier vs its raw limit (same run)")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_tiers(
    *,
    model: str | None,
    preset: str,
    size_bytes: int,
    workdir: str | Path,
    out_dir: str | Path,
    max_experts: int | None = None,
    concurrency: int = 4,
    remote: bool = True,
    log: Callable[[str], None] = print,
) -> BenchResult:
    """The whole ``expertflow bench tiers`` run: checkpoint (given or built), measurements, JSON/MD/PNG."""
    from expertflow.lab.checkpoints import PRESETS, describe, write_expert_file
    from expertflow.tiers.safetensors_index import open_checkpoint

    if model is None:
        shape = PRESETS[preset]
        root = Path(workdir) / f"bench-{preset}-{size_bytes >> 20}MiB"
        log(f"building {describe(shape)} checkpoint of {size_bytes / 2**30:.2f} GiB in {root} (once)")
        write_expert_file(root, shape, size_bytes, on_shard=lambda i, n: log(f"  shard {i}/{n} written"))
        model = str(root)
    layout = open_checkpoint(model)
    remote_fn = None
    if remote:
        from expertflow.lab.remote import measure_remote

        remote_fn = measure_remote
    result = run_tiers(layout, max_experts=max_experts, concurrency=concurrency, remote=remote_fn, log=log)
    result.notes.append(f"checkpoint: {model} ({layout.model_type}, {len(layout.experts)} experts)")
    result.write(out_dir)
    plot_tiers(result, Path(out_dir) / "tiers.png")
    return result
