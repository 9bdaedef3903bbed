"""``expertflow bench serve``: many concurrent clients against ``serve-model``, as an application would load it.

Each contender is a real server process on loopback: ExpertFlow beyond RAM (a host budget below the experts'
bytes) with the ``fifo`` and the ``experts`` admission schedule, and plain transformers with the whole model
in RAM behind the same HTTP server (``serve-model --plain-transformers``). For every number of concurrent
clients, the same requests (greedy, streamed) are sent by that many client threads, each starting its next
request when the previous one ends. Measured per run: output tokens/s over the run's wall time, time to the
first token (TTFT) and between tokens (ITL) at p50 and p99, and expert loads per output token from the
server's ``/metrics`` (experts read into the store, on demand or by prefetch, over tokens generated).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertflow.errors import ConfigError
from expertflow.lab.report import BenchResult

COLUMNS = [
    "contender",
    "clients",
    "requests",
    "output_tok_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "expert_loads_per_token",
    "hit_rate",
]


@dataclass(frozen=True)
class ServeContender:
    label: str
    args: tuple[str, ...]  # serve-model arguments after the model directory


def default_contenders(host_mem: str) -> list[ServeContender]:
    return [
        ServeContender("transformers (all in RAM)", ("--plain-transformers",)),
        ServeContender("expertflow fifo", ("--host-mem", host_mem, "--schedule", "fifo")),
        ServeContender("expertflow experts", ("--host-mem", host_mem, "--schedule", "experts")),
    ]


@contextmanager
def running_server(model: str, args: Sequence[str], log: Callable[[str], None]) -> Iterator[str]:
    """``expertflow serve-model`` in a subprocess on a free loopback port; yields its base URL. SIGTERM stops it
    after; a server that does not then exit cleanly (status 0 within 30 s) is an error."""
    cmd = [sys.executable, "-m", "expertflow.cli", "serve-model", model, "--port", "0", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"at (http://\S+)/v1", line)
        if match is None:
            raise ConfigError(f"serve-model did not start: {line.strip()} {_stderr_tail(proc)}")
        log(f"  server: {' '.join(args)} at {match.group(1)}")
        yield match.group(1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise ConfigError("serve-model did not stop within 30 s of SIGTERM") from None
    if proc.returncode != 0:
        raise ConfigError(f"serve-model exited with status {proc.returncode}: {_stderr_tail(proc)}")


def _stderr_tail(proc: subprocess.Popen[str]) -> str:
    return (proc.stderr.read() if proc.stderr else "").strip()[-500:]


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return {k: float(v) for k, v in re.findall(r"^expertflow_(\S+) (\S+)$", text, re.M)}


@dataclass
class _Timing:
    start: float
    first: float | None = None
    chunks: list[float] | None = None
    tokens: int = 0


def stream_completion(url: str, prompt: Sequence[int], max_tokens: int) -> _Timing:
    """One streamed, greedy completion of ``prompt`` (token ids); the arrival time of each chunk."""
    body = json.dumps(
        {
            "prompt": list(prompt),
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    request = urllib.request.Request(
        f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    timing = _Timing(time.perf_counter(), chunks=[])
    assert timing.chunks is not None
    with urllib.request.urlopen(request, timeout=600) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise ConfigError(f"the server failed a request: {data['error']['message']}")
            if data.get("usage"):
                timing.tokens = int(data["usage"]["completion_tokens"])
            elif data["choices"] and data["choices"][0]["text"]:
                now = time.perf_counter()
                timing.first = timing.first or now
                timing.chunks.append(now)
    return timing


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_load(url: str, prompts: Sequence[Sequence[int]], clients: int, max_tokens: int) -> dict[str, Any]:
    """All ``prompts`` sent by ``clients`` threads (each takes the next prompt when its request ends)."""
    before = metrics(url)
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    timings: list[_Timing] = []
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                if not todo or errors:
                    return
                _, prompt = todo.pop(0)
            try:
                t = stream_completion(url, prompt, max_tokens)
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                timings.append(t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise ConfigError(f"a request failed: {errors[0]}")
    after = metrics(url)
    tokens = sum(t.tokens for t in timings)
    ttft = [1e3 * (t.first - t.start) for t in timings if t.first is not None]
    itl = [1e3 * (b - a) for t in timings if t.chunks for a, b in zip(t.chunks, t.chunks[1:])]
    misses = after.get("expert_misses_total", 0) - before.get("expert_misses_total", 0)
    hits = after.get("expert_hits_total", 0) - before.get("expert_hits_total", 0)
    reads = after.get("expert_reads_total", 0) - before.get("expert_reads_total", 0)
    has_store = "expert_misses_total" in after
    return {
        "clients": clients,
        "requests": len(timings),
        "output_tokens": tokens,
        "seconds": wall,
        "output_tok_s": tokens / wall if wall else None,
        "ttft_p50_ms": _percentile(ttft, 0.5),
        "ttft_p99_ms": _percentile(ttft, 0.99),
        "itl_p50_ms": _percentile(itl, 0.5),
        "itl_p99_ms": _percentile(itl, 0.99),
        "expert_loads_per_token": reads / tokens if has_store and tokens else None,
        "hit_rate": hits / (hits + misses) if has_store and hits + misses else None,
    }


def bench_serve(
    model: str,
    prompts: Sequence[Sequence[int]],
    *,
    contenders: Sequence[ServeContender],
    clients: Sequence[int] = (1, 4, 16),
    max_tokens: int = 32,
    common_args: Sequence[str] = (),
    repeats: int = 1,
    log: Callable[[str], None] = print,
) -> BenchResult:
    """Every contender's server under every number of concurrent clients, the same prompts each time.

    With ``repeats`` > 1 the contenders run that many rounds, in the given order and reversed alternately (a
    fresh server each round); a row is the round with the most output tokens/s (this machine's noise only
    slows a run down), with every round's figure beside it."""
    if not prompts:
        raise ConfigError("no prompts to send")
    result = BenchResult("serve", [])
    load = os.getloadavg()
    result.notes.append(
        f"{len(prompts)} greedy streamed requests of {max_tokens} tokens at most per run; prompts of "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens; load average before {load[0]:.2f}"
    )
    result.notes.append(
        "output tok/s: completion tokens of all requests over the run's wall time; TTFT: request sent to first "
        "text chunk; ITL: between consecutive text chunks; expert loads per token: experts the server read into "
        "its store (on demand or by prefetch) over the tokens it generated in the run; hit rate: the share of "
        "expert uses found resident"
    )
    for c in contenders:
        log(f"{c.label} ...")
        with running_server(model, [*common_args, *c.args], log) as url:
            run_load(
                url, prompts[: max(clients)], max(clients), max_tokens
            )  # warm-up: caches, kernels, threads
            for n in clients:
                row = {"contender": c.label, **run_load(url, prompts, n, max_tokens)}
                log(f"  {n} clients: {row['output_tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms")
                result.rows.append(row)
    return result


def plot_serve(result: BenchResult, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["contender"] for r in result.rows):
        rows = [r for r in result.rows if r["contender"] == label]
        xs = [r["clients"] for r in rows]
        axes[0].plot(xs, [r["output_tok_s"] for r in rows], marker="o", label=label)
        axes[1].plot(xs, [r["ttft_p50_ms"] for r in rows], marker="o", label=label)
    axes[0].set(xlabel="concurrent clients", ylabel="output tokens/s", xscale="log", title="throughput")
    axes[1].set(
        xlabel="concurrent clients", ylabel="TTFT p50 (ms)", xscale="log", title="time to first token"
    )
    for ax in axes:
        ax.set_xticks(sorted({r["clients"] for r in result.rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_prompts(path: str | Path, byte_tokens: bool, model: str) -> list[list[int]]:
    """Prompts of a requests file (``generate --prompts`` format) as token ids."""
    from expertflow.model.batch import read_requests

    return [
        list(r.input_ids) for r in read_requests(Path(path), model, max_new_tokens=1, byte_tokens=byte_tokens)
    ]
