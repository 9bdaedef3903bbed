"""Many requests at once: continuous batching with token scheduling.

Requests run through transformers' continuous batching (``init_continuous_batching``): the tokens of every
running request, prompts and decode steps alike, are packed into one sequence with paged attention, so there
is no padding to compute, and a finished request's place is taken by the next waiting one at the next step.
Each MoE layer then sees all of those tokens at once, and its experts are loaded once for all of them.

Which waiting request joins next is the schedule: ``fifo`` keeps the order given; ``experts`` first predicts
each request's experts (every MoE layer's router applied to the prompt's token embeddings, the gate look-ahead
of :mod:`expertflow.model.prefetch`) and orders the queue so that requests whose experts overlap run together
(:func:`expertflow.pipeline.schedule.group_requests`). Scheduling changes order and speed, never text: greedy
outputs are those of each request run alone.

A request may carry an image (MoE vision-language models, :mod:`expertflow.model.vision`). transformers'
continuous batching takes token ids only (no pixels, no 3-D rotary positions), so requests with an image run
one at a time, in the schedule's order, after the batch of text requests; their outputs are likewise those
of the request run alone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertflow.errors import ConfigError, ExpertFlowError
from expertflow.model.generate import check_token_ids, counters_delta, encode_prompt, run_counters
from expertflow.model.prefetch import find_gates
from expertflow.pipeline.schedule import group_requests

SCHEDULES = ("fifo", "experts")


@dataclass(frozen=True)
class Request:
    """One generation request: its prompt tokens and how many tokens to generate."""

    id: str
    input_ids: tuple[int, ...]
    max_new_tokens: int
    image: str | None = None  # an image file, for MoE vision-language models


@dataclass
class BatchResult:
    """Outputs of :func:`generate_many` and what the run cost."""

    outputs: dict[str, list[int]]
    order: list[str]  # the order requests ran in (admitted to the batch; then those with an image)
    seconds: float
    schedule: str
    stats: dict[str, Any] = field(default_factory=dict)  # the store's counters for this run

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.outputs.values())

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def expert_loads_per_token(self) -> float:
        """Experts read (from any source) per generated token, prompts included."""
        loads = sum((self.stats.get("reads") or {}).values())
        return loads / self.new_tokens if self.new_tokens else 0.0

    @property
    def hit_rate(self) -> float:
        return float(self.stats.get("hit_rate", 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "requests": len(self.outputs),
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "expert_loads_per_token": self.expert_loads_per_token,
            "hit_rate": self.hit_rate,
            "order": self.order,
            "outputs": self.outputs,
            "stats": self.stats,
        }

    def summary(self) -> str:
        return (
            f"{len(self.outputs)} requests, {self.new_tokens} tokens in {self.seconds:.2f} s: "
            f"{self.tokens_per_second:.2f} tokens/s, {self.expert_loads_per_token:.2f} expert loads per token, "
            f"hit rate {self.hit_rate:.3f} (schedule {self.schedule})"
            + (
                f"; LOSSY: cache-aware routing replaced {self.stats.get('rerouted', 0)} of {self.stats['routed']} "
                "expert choices"
                if self.stats.get("routed")
                else ""
            )
        )


def jsonl_objects(
    path: str | Path, what: str, fields: Iterable[str]
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(id, "FILE, line N", object) for each non-blank line of a JSONL file of ``what`` objects (requests,
    tasks). A line that is not a JSON object, has fields outside ``fields`` or reuses an id, and a file with no
    lines, are a :class:`ConfigError` naming the line or file. A line without ``id`` is ``what-N``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    allowed = {"id", *fields}
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: a {what} is a JSON object")
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown fields {unknown}")
        oid = str(item.get("id", f"{what}-{number}"))
        if oid in seen:
            raise ConfigError(f"{where}: {what} id {oid!r} is used twice")
        seen.add(oid)
        yield oid, where, item
    if not seen:
        raise ConfigError(f"{path} has no {what}s")


def positive_int(item: dict[str, Any], key: str, default: int, where: str) -> int:
    """``item[key]`` (or ``default``), which must be a positive integer; a :class:`ConfigError` naming ``where``."""
    n = item.get(key, default)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{where}: '{key}' must be a positive integer")
    return n


def read_requests(
    path: str | Path, model_dir: str | Path, *, max_new_tokens: int, byte_tokens: bool = False
) -> list[Request]:
    """Requests from a JSONL file, one object per line: ``prompt`` (text) or ``token_ids`` (a list), and
    optionally ``id``, ``max_new_tokens`` and ``image`` (a file, relative to the requests file's folder).
    Every line is checked before any work, images opened included; an error names the line."""
    requests: list[Request] = []
    images = ImageFields(path, model_dir)
    fields = ("prompt", "token_ids", "max_new_tokens", "image")
    for rid, where, item in jsonl_objects(path, "request", fields):
        prompt, token_ids = item.get("prompt"), item.get("token_ids")
        if (prompt is None) == (token_ids is None):
            raise ConfigError(f"{where}: give exactly one of 'prompt' and 'token_ids'")
        if token_ids is not None and not (
            isinstance(token_ids, list)
            and token_ids
            and all(isinstance(t, int) and t >= 0 for t in token_ids)
        ):
            raise ConfigError(f"{where}: 'token_ids' must be a non-empty list of token ids")
        if prompt is not None and not (isinstance(prompt, str) and prompt):
            raise ConfigError(f"{where}: 'prompt' must be non-empty text")
        n = positive_int(item, "max_new_tokens", max_new_tokens, where)
        ids = (
            list(token_ids) if token_ids is not None else encode_prompt(model_dir, prompt, None, byte_tokens)
        )
        image = images.check(item.get("image"), where, ids)
        requests.append(Request(rid, tuple(ids), n, image))
    return requests


class ImageFields:
    """Checks the ``image`` field of a request or task file's lines against one model: the file (relative to
    the request file's folder) opens, the model takes images, and the family's processor accepts the image
    with the line's prompt; a prompt that holds the image token needs an image. The model's config is read
    and its processor built once per file, not per line."""

    def __init__(self, path: str | Path, model_dir: str | Path) -> None:
        from expertflow.model.vision import image_token_id

        self.path, self.model_dir = Path(path), model_dir
        self.image_token = image_token_id(model_dir)
        self._prompts: Any = None

    def check(self, value: Any, where: str, prompt_ids: Sequence[int]) -> str | None:
        """The line's image file, checked; a :class:`ConfigError` naming ``where`` otherwise."""
        from expertflow.model.vision import ImagePrompts

        if value is None:
            if self.image_token is not None and self.image_token in prompt_ids:
                # Without pixels the model would read the placeholder as an ordinary token: wrong, silently.
                raise ConfigError(
                    f"{where}: the prompt holds the image token ({self.image_token}) but no 'image' is given"
                )
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: 'image' must be a file name")
        image = Path(value)
        if not image.is_absolute():
            image = self.path.parent / image
        if not image.is_file():
            raise ConfigError(f"{where}: image {value!r} does not exist ({image})")
        try:
            if self._prompts is None:  # a text-only model, or a family whose images are not built here
                self._prompts = ImagePrompts(self.model_dir)
            self._prompts.inputs(prompt_ids, image)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return str(image)


def expert_profiles(model: Any, requests: Sequence[Request]) -> list[dict[int, dict[int, float]]]:
    """Each request's predicted experts per MoE layer, weighted by how many of its prompt tokens want them:
    every layer's own pre-router norm and router applied to the prompt's token embeddings."""
    layers = getattr(model, "expert_layers", {})
    gates, _ = find_gates(model, layers)
    embed = model.get_input_embeddings()
    device = model.device  # the embedding may be read from its file (no parameters); its rows land here
    top_k = model.expert_top_k  # validated by load_model
    profiles: list[dict[int, dict[int, float]]] = []
    with torch.no_grad():
        for r in requests:
            x = embed(torch.tensor([list(r.input_ids)], device=device))[0]
            profile: dict[int, dict[int, float]] = {}
            for layer, gate in gates.items():
                ids, counts = torch.unique(gate(x).topk(top_k, dim=-1).indices, return_counts=True)
                profile[layer] = {int(e): float(c) for e, c in zip(ids.tolist(), counts.tolist())}
            profiles.append(profile)
    return profiles


def admission_order(model: Any, requests: Sequence[Request], schedule: str, max_requests: int) -> list[int]:
    """The order requests join the running batch under ``schedule``."""
    if schedule == "fifo":
        return list(range(len(requests)))
    if schedule == "experts":
        batches = group_requests(expert_profiles(model, requests), max_requests)
        return [i for batch in batches for i in batch]
    raise ConfigError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")


def generate_many(
    model: Any,
    requests: Sequence[Request],
    *,
    schedule: str = "fifo",
    max_requests: int = 8,
    max_batch_tokens: int = 256,
    page_size: int = 32,
    timeout: float = 600.0,
) -> BatchResult:
    """Greedy generation for every request, ``max_requests`` at a time with continuous batching.

    Raises :class:`ConfigError` for bad arguments and :class:`ExpertFlowError` when a request fails or no
    result comes within ``timeout`` seconds.
    """
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    if not requests:
        raise ConfigError("no requests to generate")
    if max_requests < 1 or max_batch_tokens < 1:
        raise ConfigError("max_requests and max_batch_tokens must be >= 1")
    if len({r.id for r in requests}) != len(requests):
        raise ConfigError("request ids must be unique")
    for r in requests:  # the batch's worker thread would die on a bad id, with a traceback in its log
        check_token_ids(model, r.input_ids, f"request {r.id!r}")
    order = admission_order(model, requests, schedule, max_requests)
    longest = max(len(r.input_ids) + r.max_new_tokens for r in requests)
    blocks = math.ceil(longest / page_size) * (max_requests + 1)
    config = ContinuousBatchingConfig(
        num_blocks=blocks,
        page_size=page_size,
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_requests,
        use_async_batching=False,  # one forward at a time: the store's pins are per forward
        scheduler_type="fifo",  # our order is the queue's; transformers admits in queue order
    )
    generation = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(r.max_new_tokens for r in requests),
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id or 0,
    )
    # transformers' batching logs every start and stop at INFO; keep its warnings.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    before = run_counters(model)
    outputs: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    text = [requests[i] for i in order if requests[i].image is None]
    if text:
        outputs.update(_continuous(model, text, generation, config, timeout))
    pictured = [requests[i] for i in order if requests[i].image is not None]
    if pictured:
        outputs.update(_one_at_a_time(model, pictured, generation))
    seconds = time.perf_counter() - t0
    stats = counters_delta(run_counters(model), before) if before else {}
    ran = [r.id for r in text] + [r.id for r in pictured]  # image requests run after the batch
    return BatchResult({r.id: outputs[r.id] for r in requests}, ran, seconds, schedule, stats)


def _continuous(
    model: Any, requests: Sequence[Request], generation: Any, config: Any, timeout: float
) -> dict[str, list[int]]:
    """Text requests through transformers' continuous batching, admitted in the order given."""
    outputs: dict[str, list[int]] = {}
    manager = model.init_continuous_batching(generation, config)
    manager.start()
    try:
        for r in requests:
            manager.add_request(list(r.input_ids), request_id=r.id, max_new_tokens=r.max_new_tokens)
        deadline = time.monotonic() + timeout
        while len(outputs) < len(requests):
            result = manager.get_result(timeout=max(0.1, deadline - time.monotonic()))
            if result is None:
                fatal = getattr(getattr(manager, "background_thread_status", None), "fatal_error", None)
                if fatal is not None or time.monotonic() > deadline or not manager.is_running():
                    missing = sorted({r.id for r in requests} - set(outputs))
                    why = f": {fatal}" if fatal is not None else f" within {timeout} s"
                    raise ExpertFlowError(f"no result for requests {missing[:4]}{why}")
                continue
            if getattr(result, "error", None):
                raise ExpertFlowError(f"request {result.request_id} failed: {result.error}")
            outputs[result.request_id] = list(result.generated_tokens)
    finally:
        manager.stop(block=True)
    return outputs


def _one_at_a_time(model: Any, requests: Sequence[Request], generation: Any) -> dict[str, list[int]]:
    """Requests with an image, each alone: greedy, stopping at the end-of-sequence token as the batch does."""
    from expertflow.model.vision import ImagePrompts

    images = ImagePrompts(getattr(model, "expert_model_dir", None) or model.name_or_path)
    outputs: dict[str, list[int]] = {}
    with torch.inference_mode():
        for r in requests:
            assert r.image is not None
            inputs = {k: v.to(model.device) for k, v in images.inputs(r.input_ids, r.image).items()}
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=r.max_new_tokens,
                eos_token_id=model.generation_config.eos_token_id,
                pad_token_id=generation.pad_token_id,
            )
            outputs[r.id] = out[0, inputs["input_ids"].shape[1] :].tolist()
    return outputs
