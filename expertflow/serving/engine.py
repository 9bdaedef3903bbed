"""The serving engine: requests from any number of clients share one loaded model.

Greedy requests join one continuous batch (``transformers``' continuous batching: paged KV cache, requests
entering and leaving between steps), so a step's experts are read once for every request that routes to them.
Which waiting request enters a freed place is the admission schedule: ``fifo``, or ``experts`` — the one whose
prompt's predicted experts overlap most with the running requests' (each layer's router applied to the
prompt's embeddings), with the oldest request taken once it has been passed over ``max_batch`` times, so none
starves. Sampled requests run one at a time with their own seed (the shared batch samples all of its requests
with one random stream, which would make a seed mean nothing); while one runs, the batch waits.

Everything here runs on one asyncio event loop except the model's forward passes (the batch's worker thread,
or a thread for a sampled request). Bounded: at most ``max_queue`` requests wait; more are refused
(:class:`Overloaded`), never buffered without limit. A cancelled request (a client that went away) leaves the
batch at its next step and its place goes to the next waiting request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from expertflow.errors import ConfigError, ExpertFlowError
from expertflow.model.decoding import Decode, Sampling, StopText
from expertflow.model.generate import check_token_ids, eos_ids, generate, pad_id, run_counters
from expertflow.model.locking import model_lock

log = logging.getLogger(__name__)

SCHEDULES = ("experts", "fifo")


class Overloaded(ExpertFlowError):
    """The queue of waiting requests is full: try again later (HTTP 429)."""


class EngineStopped(ExpertFlowError):
    """The engine is closed or its batch worker died (HTTP 503)."""


@dataclass(frozen=True)
class Completion:
    """One request: prompt token ids, at most ``max_tokens`` new ones, how to choose them and when to stop."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What a request's stream yields: new text (and its tokens), then one last event with ``finish_reason``."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" on the last event
    error: str | None = None


@dataclass
class _Pending:
    id: str
    request: Completion
    events: asyncio.Queue[Event]
    profile: dict[int, dict[int, float]] = field(default_factory=dict)
    passed_over: int = 0
    sent: list[int] = field(default_factory=list)  # tokens already turned into events
    text: StopText | None = None  # the request's text as it may be sent
    done: bool = False


@dataclass
class EngineStats:
    """Counters for ``/metrics``."""

    requests_total: int = 0
    requests_rejected: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    started: float = field(default_factory=time.monotonic)


class Engine:
    """Serves completions from ``model`` (loaded by :func:`expertflow.load_model`, or plain transformers).

    Create and use it on one event loop: ``await engine.start()``, ``engine.submit(...)`` (an async iterator of
    :class:`Event`), ``await engine.close()``.
    """

    def __init__(
        self,
        model: Any,
        decode: Decode,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        schedule: str = "experts",
        max_model_len: int = 2048,
        page_size: int = 32,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
        if max_batch < 1 or max_queue < 1 or max_model_len < 2:
            raise ConfigError("max_batch and max_queue must be >= 1, max_model_len >= 2")
        self.model = model
        self.decode = decode
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.schedule = schedule
        self.max_model_len = max_model_len
        self.page_size = page_size
        self.eos = eos_ids(model) or []
        self.stats = EngineStats()
        self._waiting: deque[_Pending] = deque()
        self._running: dict[str, _Pending] = {}
        self._solo: _Pending | None = None  # the sampled request running now
        self._ids = itertools.count(1)
        self._manager: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._solo_task: asyncio.Task[None] | None = None
        self._cancel_solo = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batch worker (``transformers``' continuous batching manager)."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self._loop = asyncio.get_running_loop()
        generation = GenerationConfig(
            do_sample=False,
            max_new_tokens=self.max_model_len,
            eos_token_id=self.eos or None,
            pad_token_id=pad_id(self.model, self.eos or None),
        )
        blocks = math.ceil(self.max_model_len / self.page_size) * (self.max_batch + 1)
        config = ContinuousBatchingConfig(
            num_blocks=blocks,
            page_size=self.page_size,
            max_batch_tokens=max(256, self.page_size),
            max_requests_per_batch=self.max_batch,
            use_async_batching=False,  # one forward at a time: the store's pins are per forward
            scheduler_type="fifo",  # admission is ours (see _admit); transformers takes requests in that order
        )
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
        self._manager = self.model.init_continuous_batching(generation, config)
        self._manager.start()

    async def close(self) -> None:
        """Finish every request with an error event, stop the batch worker. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for p in [*self._waiting, *self._running.values(), *([self._solo] if self._solo else [])]:
            self._finish(p, Event(finish_reason="error", error="the server is shutting down"))
        self._waiting.clear()
        self._cancel_solo.set()
        if self._solo_task is not None:
            with contextlib.suppress(BaseException):
                await self._solo_task
        if self._manager is not None:
            manager, self._manager = self._manager, None
            await asyncio.to_thread(manager.stop, True)

    @property
    def alive(self) -> bool:
        if self._closed or self._manager is None:
            return False
        status = getattr(self._manager, "background_thread_status", None)
        return getattr(status, "fatal_error", None) is None and self._manager.is_running()

    # -- requests --------------------------------------------------------------------------------------------

    def check(self, request: Completion) -> None:
        """Refuse what the model cannot take (:class:`ConfigError`, HTTP 400) before it waits anywhere."""
        if not request.prompt:
            raise ConfigError("the prompt is empty")
        check_token_ids(self.model, request.prompt)
        if request.max_tokens < 1:
            raise ConfigError("max_tokens must be >= 1")
        if len(request.prompt) + request.max_tokens > self.max_model_len:
            raise ConfigError(
                f"the prompt ({len(request.prompt)} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
                f"server's context of {self.max_model_len} tokens"
            )

    async def submit(self, request: Completion) -> AsyncGenerator[Event, None]:
        """Queue ``request`` and yield its events as they come. Leaving the iteration early (``aclose``, a
        cancelled task: a client that went away) cancels the request and frees its place.

        Raises :class:`ConfigError` (bad request), :class:`Overloaded` (queue full), :class:`EngineStopped`.
        """
        self.check(request)
        if not self.alive:
            raise EngineStopped("the engine is not running")
        if len(self._waiting) >= self.max_queue:
            self.stats.requests_rejected += 1
            raise Overloaded(
                f"{len(self._waiting)} requests are waiting already (--max-queue {self.max_queue})"
            )
        pending = _Pending(f"cmpl-{next(self._ids)}", request, asyncio.Queue())
        pending.text = StopText(self.decode, request.stop, self.eos)
        if self.schedule == "experts" and request.sampling.greedy:
            pending.profile = await self._profile(request.prompt)
            if len(self._waiting) >= self.max_queue:  # others came in while the profile was computed
                self.stats.requests_rejected += 1
                raise Overloaded(
                    f"{len(self._waiting)} requests are waiting already (--max-queue {self.max_queue})"
                )
        self.stats.requests_total += 1
        self._waiting.append(pending)
        self._admit()
        return self._events(pending)

    async def _events(self, pending: _Pending) -> AsyncGenerator[Event, None]:
        try:
            while True:
                try:
                    event = await asyncio.wait_for(pending.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if not self.alive and not pending.done:  # the batch worker died: no event will come
                        self._finish(pending, Event(finish_reason="error", error="the batch worker stopped"))
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not pending.done:
                self.stats.requests_cancelled += 1
                self._cancel(pending)

    async def _profile(self, prompt: Sequence[int]) -> dict[int, dict[int, float]]:
        """The prompt's predicted experts per layer (``experts`` schedule); {} for a model without a store."""
        if not getattr(self.model, "expert_layers", None):
            return {}
        from expertflow.model.batch import Request, expert_profiles

        def run() -> dict[int, dict[int, float]]:
            with model_lock(self.model):  # the embedding and routers, between two forward passes
                return expert_profiles(self.model, [Request("p", tuple(prompt), 1)])[0]

        return await asyncio.to_thread(run)

    # -- admission -------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Fill free places from the waiting queue (on the event loop)."""
        while self._waiting and not self._closed:
            head = self._waiting[0]
            if not head.request.sampling.greedy:
                if self._solo is not None or self._running:
                    return  # a sampled request runs alone, once the batch has drained
                self._waiting.popleft()
                self._start_solo(head)
                continue
            if self._solo is not None or len(self._running) >= self.max_batch:
                return
            chosen = self._pick()
            self._waiting.remove(chosen)
            self._start_batched(chosen)

    def _pick(self) -> _Pending:
        head = self._waiting[0]
        if self.schedule == "fifo" or not self._running or head.passed_over >= self.max_batch:
            return head
        from expertflow.pipeline.schedule import profile_similarity

        running = [p.profile for p in self._running.values()]
        candidates = [p for p in self._waiting if p.request.sampling.greedy]
        best = max(
            candidates, key=lambda p: (profile_similarity(running, p.profile), -self._waiting.index(p))
        )
        if best is not head:
            head.passed_over += 1
        return best

    def _start_batched(self, pending: _Pending) -> None:
        manager = self._manager
        self._running[pending.id] = pending

        def deliver(output: Any) -> None:
            self._on_output(pending, output)

        manager.register_result_handler(pending.id, deliver)
        manager.add_request(
            list(pending.request.prompt),
            request_id=pending.id,
            max_new_tokens=pending.request.max_tokens,
            streaming=True,
            eos_token_id=self.eos or None,
        )

    def _on_output(self, pending: _Pending, output: Any) -> None:
        if pending.done:
            return
        if getattr(output, "error", None):
            self.stats.requests_failed += 1
            self._finish(pending, Event(finish_reason="error", error=str(output.error)))
            return
        tokens = list(output.generated_tokens)
        self._tokens(pending, tokens[len(pending.sent) :])
        if not pending.done and output.is_finished():
            last = pending.sent[-1] if pending.sent else None
            self._finish(pending, Event(finish_reason="stop" if last in self.eos else "length"))

    def _tokens(self, pending: _Pending, new: list[int]) -> None:
        """New tokens of a request: text events, and the end at a stop string."""
        assert pending.text is not None
        for token in new:
            pending.sent.append(token)
            self.stats.tokens_generated += 1
            # An event per token, text or not: usage counts every generated token (held-back text included).
            pending.events.put_nowait(Event(text=pending.text.push(token), tokens=[token]))
            if pending.text.stopped:
                self._finish(pending, Event(finish_reason="stop"))
                self._stop_generation(pending)
                return

    def _finish(self, pending: _Pending, last: Event) -> None:
        if pending.done:
            return
        if last.finish_reason in ("stop", "length") and pending.text is not None:
            last.text = pending.text.finish()  # what was held back, up to a stop string
        pending.done = True
        pending.events.put_nowait(last)
        self._release(pending)

    def _release(self, pending: _Pending) -> None:
        self._running.pop(pending.id, None)
        if self._solo is pending:
            self._solo = None
        with contextlib.suppress(ValueError):
            self._waiting.remove(pending)
        self._admit()

    def _cancel(self, pending: _Pending) -> None:
        """The client went away: leave the batch at its next step."""
        pending.done = True
        self._stop_generation(pending)
        self._release(pending)

    def _stop_generation(self, pending: _Pending) -> None:
        if self._solo is pending:
            self._cancel_solo.set()
        elif pending.id in self._running and self._manager is not None:
            self._manager.cancel_request(pending.id)
            router = getattr(self._manager, "output_router", None)
            if router is not None:  # a cancelled request gets no last output to clean its handler up
                with router._lock:
                    router.result_handlers.pop(pending.id, None)

    # -- sampled requests ------------------------------------------------------------------------------------

    def _start_solo(self, pending: _Pending) -> None:
        self._solo = pending
        self._cancel_solo.clear()
        loop = self._loop
        assert loop is not None

        def on_token(token: int) -> None:
            loop.call_soon_threadsafe(self._tokens_if_live, pending, [token])

        def run() -> Any:
            return generate(
                self.model,
                list(pending.request.prompt),
                pending.request.max_tokens,
                on_token=on_token,
                sampling=pending.request.sampling,
                should_stop=self._cancel_solo.is_set,
            )

        async def drive() -> None:
            try:
                result = await asyncio.to_thread(run)
            except Exception as exc:
                self.stats.requests_failed += 1
                self._finish(pending, Event(finish_reason="error", error=str(exc)))
                return
            await asyncio.sleep(0)  # the tokens' callbacks scheduled before this point run first
            self._finish(pending, Event(finish_reason=result.finish_reason))

        self._solo_task = loop.create_task(drive())

    def _tokens_if_live(self, pending: _Pending, tokens: list[int]) -> None:
        if not pending.done:
            self._tokens(pending, tokens)

    # -- metrics ---------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for ``/metrics``: requests, tokens, queue, and the store's hits, reads and stall."""
        s = self.stats
        uptime = max(time.monotonic() - s.started, 1e-9)
        out: dict[str, float] = {
            "requests_total": s.requests_total,
            "requests_rejected_total": s.requests_rejected,
            "requests_cancelled_total": s.requests_cancelled,
            "requests_failed_total": s.requests_failed,
            "generated_tokens_total": s.tokens_generated,
            "generated_tokens_per_second": s.tokens_generated / uptime,
            "queue_depth": len(self._waiting),
            "running_requests": len(self._running) + (1 if self._solo is not None else 0),
        }
        counters = run_counters(self.model)
        if counters:
            hits, misses = counters.get("device_hits", 0), counters.get("device_misses", 0)
            out["expert_hits_total"] = hits
            out["expert_misses_total"] = misses
            out["expert_hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
            out["stall_seconds_total"] = counters.get("stall_seconds", 0.0)
            out["expert_reads_total"] = sum((counters.get("reads") or {}).values())
            for source, nbytes in (counters.get("bytes_read") or {}).items():
                out[f'expert_bytes_read_total{{source="{source}"}}'] = nbytes
        return out
