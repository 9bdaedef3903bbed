"""Generation with timing and the store's statistics: what ``expertflow generate`` prints."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertflow.config import format_size
from expertflow.errors import ConfigError
from expertflow.model.decoding import (
    Decode,
    Sampling,
    StopOnText,
    byte_decode,
    cut_at_stop,
    tokenizer_decode,
)
from expertflow.model.locking import model_lock
from expertflow.model.quantized_experts import QUANTIZED_IMPLEMENTATION
from expertflow.model.quantized_linear import QuantizedLinear
from expertflow.quant import native
from expertflow.quant.kernels import NATIVE_MIN_WEIGHTS


@dataclass
class GenerationResult:
    """Tokens and timings of one generation. ``stats`` is the store's counters for this run only;
    ``decode_stats`` the part after the first token (what ``tokens_per_second`` covers: no prefill)."""

    prompt_tokens: int
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    decode_stats: dict[str, Any] = field(default_factory=dict)
    prediction: dict[str, Any] = field(default_factory=dict)
    budget: str = ""  # the host budget and why it is that size
    kernels: str = ""  # which kernels ran the quantized products (quantized models only)
    text: str | None = None  # the tokens as text (None when there was no way to decode them)
    finish_reason: str = "length"  # "stop" (end-of-sequence or a stop string) or "length" (max_new_tokens)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput: tokens after the first, over the time after the first."""
        n = self.new_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "tokens": self.tokens,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
            "stats": self.stats,
            "decode_stats": self.decode_stats,
            "prediction": self.prediction,
            "budget": self.budget,
        }


class _Streamer:
    """transformers streamer protocol: the prompt first, then one tensor per new token."""

    def __init__(
        self, on_token: Callable[[int], None] | None, on_first: Callable[[], None] | None = None
    ) -> None:
        self.on_token = on_token
        self.on_first = on_first
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if len(self.times) == 1 and self.on_first is not None:
            self.on_first()  # prefill is over: decode starts now
        for t in value.reshape(-1).tolist():
            self.tokens.append(int(t))
            if self.on_token is not None:
                self.on_token(int(t))

    def end(self) -> None:
        pass


def quantized_kernels(model: Any) -> str:
    """Which kernels run a model's quantized products (see :mod:`expertflow.quant.native`), or "" when it has
    none."""
    layers = getattr(model, "expert_layers", {}).values()
    quantized = any(m.implementation == QUANTIZED_IMPLEMENTATION for m in layers) or any(
        isinstance(m, QuantizedLinear) for m in model.modules()
    )
    if not quantized:
        return ""
    if native.library() is None:
        return native.status()
    if native.forced():
        return f"{native.status()} for every product they take"
    return (
        f"{native.status()} for products of {NATIVE_MIN_WEIGHTS} weights and more, torch's for smaller ones"
    )


def run_counters(model: Any) -> dict[str, Any]:
    """A model's running counters: its store's (hits, misses, bytes per source, stall, prefetch), the time in
    the experts' kernels and, with cache-aware routing, the expert choices it replaced; {} for a model not
    loaded by :func:`expertflow.load_model`. :func:`counters_delta` gives what a run cost."""
    store = getattr(model, "expert_store", None)
    if store is None:
        return {}
    layers = getattr(model, "expert_layers", {})
    out: dict[str, Any] = store.stats().as_dict()
    # Time in the experts kernels (the rest of a token's time is attention, norms, routing and the store).
    out["experts_compute_seconds"] = sum(m.compute_seconds for m in layers.values())
    # Time in the offloaded experts modules: the kernels, waiting for reads (stall) and the store's own work.
    out["experts_module_seconds"] = sum(m.forward_seconds for m in layers.values())
    routings = [m.routing for m in layers.values() if m.routing is not None]
    if routings:  # cache-aware routing (lossy): how many expert choices it replaced
        out["rerouted"] = sum(r.rerouted for r in routings)
        out["routed"] = sum(r.routed for r in routings)
    return out


def counters_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` for two :func:`run_counters` readings, with the hit rate of the difference."""
    out: dict[str, Any] = {}
    for k, v in after.items():
        b = before.get(k)
        if isinstance(v, bool) or b is None:
            out[k] = v
        elif isinstance(v, (int, float)) and isinstance(b, (int, float)):
            out[k] = v - b
        elif isinstance(v, dict) and isinstance(b, dict):
            out[k] = {kk: vv - b.get(kk, 0) for kk, vv in v.items()}
        else:
            out[k] = v
    hits, misses = out.get("device_hits", 0), out.get("device_misses", 0)
    out["hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
    return out


def generate(
    model: Any,
    input_ids: Sequence[int] | Mapping[str, torch.Tensor],
    max_new_tokens: int,
    *,
    on_token: Callable[[int], None] | None = None,
    sampling: Sampling | None = None,
    stop: Sequence[str] = (),
    decode: Decode | None = None,
    ignore_eos: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``input_ids`` with ``model.generate`` (any HF causal LM).

    ``input_ids`` is a prompt's token ids, or a processor's inputs for one prompt (``input_ids`` with a
    batch of one, plus e.g. ``pixel_values``; see :class:`expertflow.model.vision.ImagePrompts`).

    Tokens are chosen by ``sampling`` (default: the checkpoint's generation config, greedy unless it says
    otherwise). Generation ends at an end-of-sequence id of the generation config (unless ``ignore_eos``: a
    benchmark's fixed length), when the text contains a string of ``stop`` (needs ``decode``; the result's
    ``text`` ends before it), or after ``max_new_tokens``. ``decode`` turns tokens into the result's ``text``.

    When the model was loaded by :func:`expertflow.load_model`, the result carries the store's counters
    for this call (hits, misses, bytes per source, stall, prefetch) and the predictor's precision/recall.
    """
    if isinstance(input_ids, Mapping):
        inputs = {k: v.to(model.device) for k, v in input_ids.items()}
        given = inputs.get("input_ids")
        if given is None or given.ndim != 2 or given.shape[0] != 1 or given.shape[1] == 0:
            raise ConfigError("generate takes the inputs of one non-empty prompt (input_ids of shape [1, n])")
    else:
        if not input_ids:
            raise ConfigError("the prompt is empty: give --prompt text or --token-ids")
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model.device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    prompt_tokens = int(inputs["input_ids"].shape[1])
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens must be >= 1")
    if stop and decode is None:
        raise ConfigError("stop strings need a way to decode tokens to text (a tokenizer or byte tokens)")
    check_token_ids(model, inputs["input_ids"])
    if sampling is None:
        sampling = Sampling.from_generation_config(model.generation_config)
    eos = None if ignore_eos else eos_ids(model)
    criteria: list[Any] = []
    if stop:
        assert decode is not None
        criteria.append(StopOnText(decode, stop, prompt_tokens))
    if should_stop is not None:
        criteria.append(lambda input_ids, scores, **kw: torch.full((input_ids.shape[0],), should_stop()))
    extra: dict[str, Any] = {}
    if criteria:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(criteria)
    store = getattr(model, "expert_store", None)
    with model_lock(model):
        before = run_counters(model)
        at_first: dict[str, Any] = {}

        def snapshot() -> None:
            at_first.update(run_counters(model))

        streamer = _Streamer(on_token, snapshot)
        t0 = time.perf_counter()
        with torch.inference_mode(), _seeded(sampling.seed):
            model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                streamer=streamer,
                pad_token_id=pad_id(model, eos),
                **sampling.generate_kwargs(),
                **extra,
            )
        t_end = time.perf_counter()
        first = streamer.times[0] if streamer.times else t_end
        result = GenerationResult(
            prompt_tokens=prompt_tokens,
            tokens=streamer.tokens,
            prefill_seconds=first - t0,
            decode_seconds=t_end - first,
        )
        if store is not None:
            end = run_counters(model)
            result.stats = counters_delta(end, before)
            result.decode_stats = counters_delta(end, at_first or end)
            result.budget = store.budget.describe()
    result.kernels = quantized_kernels(model)
    result.finish_reason = "length"
    if eos and result.tokens and result.tokens[-1] in eos:
        result.finish_reason = "stop"
    if decode is not None:
        text = decode(result.tokens[:-1] if result.finish_reason == "stop" else result.tokens)
        text, hit = cut_at_stop(text, stop)
        result.text = text
        if hit is not None:
            result.finish_reason = "stop"
    predictor = getattr(model, "expert_predictor", None)
    if predictor is not None:
        result.prediction = predictor.stats()
    return result


def eos_ids(model: Any) -> list[int] | None:
    """The end-of-sequence ids generation stops at: the generation config's, else the model config's."""
    for source in (model.generation_config, model.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return None


def pad_id(model: Any, eos: list[int] | None) -> int:
    """A pad id for ``generate`` (a single prompt never pads, but transformers wants one)."""
    pad = getattr(model.generation_config, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    return eos[0] if eos else 0


def check_token_ids(model: Any, input_ids: torch.Tensor | Sequence[int], where: str = "") -> None:
    """Refuse ids outside the model's vocabulary before they reach the embedding (an IndexError deep inside,
    or a dead batch worker)."""
    ids = input_ids.reshape(-1).tolist() if isinstance(input_ids, torch.Tensor) else input_ids
    check_ids_in_vocabulary(ids, model.get_input_embeddings().num_embeddings, where)


def check_ids_in_vocabulary(ids: Sequence[int], vocab: int | None, where: str = "") -> None:
    """A :class:`ConfigError` naming the first id outside ``0..vocab-1`` (only negative ones when ``vocab`` is
    not known), prefixed with ``where``."""
    bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        known = f" (0..{vocab - 1})" if vocab is not None else ""
        raise ConfigError(
            f"{where + ': ' if where else ''}token id {bad[0]} is outside the model's vocabulary{known}"
        )


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """torch's random state seeded for one run and restored after it (sampling draws from it)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def encode_prompt(
    model_dir: str | Path,
    prompt: str | None,
    token_ids: str | None,
    byte_tokens: bool,
    *,
    chat: bool = False,
) -> list[int]:
    """Token ids from ``--token-ids 1,2,3``, from UTF-8 bytes, or from the checkpoint's tokenizer (``chat``: the
    prompt as a user's message in the tokenizer's chat template, ready for the assistant's answer)."""
    if token_ids:
        if chat:
            raise ConfigError("--chat takes --prompt text, not --token-ids")
        try:
            return [int(t) for t in token_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise ConfigError(f"--token-ids must be comma-separated integers, got {token_ids!r}") from None
    if prompt is None:
        raise ConfigError("give --prompt or --token-ids")
    if byte_tokens:
        if chat:
            raise ConfigError("--chat needs a tokenizer with a chat template; byte-level models have none")
        return list(prompt.encode("utf-8"))
    tokenizer = load_tokenizer(str(model_dir))
    if chat:
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}], str(model_dir))
    return list(tokenizer(prompt)["input_ids"])


def chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], where: str = "the model") -> list[int]:
    """``messages`` in the tokenizer's chat template, ending with the assistant's turn to answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}'s tokenizer has no chat template: use a plain prompt")
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def text_decoder(model_dir: str | Path, byte_tokens: bool) -> Decode | None:
    """How this checkpoint's tokens become text: bytes for byte-level models, else its tokenizer; None when it
    has no tokenizer (tokens can then only be shown as ids)."""
    if byte_tokens:
        return byte_decode
    try:
        return tokenizer_decode(load_tokenizer(str(model_dir)))
    except ConfigError:
        return None


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_dir: str) -> Any:
    """The checkpoint's own tokenizer, loaded once per process (request and task files encode every line, and
    the grid decodes every answer); a :class:`ConfigError` when it has none."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{model_dir} has no tokenizer ({exc.__class__.__name__}); pass --token-ids 1,2,3 "
            "or --byte-tokens for byte-level models"
        ) from None


def format_summary(result: GenerationResult) -> str:
    """The summary block ``expertflow generate`` prints after the tokens."""
    s = result.stats
    lines = [
        f"tokens: {result.prompt_tokens} prompt + {result.new_tokens} generated",
        f"prefill {result.prefill_seconds:.3f} s, decode {result.tokens_per_second:.2f} tokens/s "
        f"({torch.get_num_threads()} compute threads)",
    ]
    if result.budget:
        lines.append(f"host budget: {result.budget}")
    if result.kernels:
        lines.append(f"quantized products: {result.kernels}")
    if s:
        lines.append(
            f"device tier: hit rate {s.get('hit_rate', 0.0):.1%} "
            f"({s.get('device_hits', 0)} hits, {s.get('device_misses', 0)} misses)"
        )
        if s.get("host_hits", 0) or s.get("host_misses", 0):
            total = s["host_hits"] + s["host_misses"]
            lines.append(f"host tier: hit rate {s['host_hits'] / total:.1%} ({s['host_hits']} hits)")
        for name, nbytes in sorted((s.get("bytes_read") or {}).items()):
            lines.append(f"read from {name}: {format_size(nbytes)} in {s['reads'].get(name, 0)} reads")
        for name, count in sorted((s.get("source_errors") or {}).items()):
            lines.append(f"{name} failed {count} reads (read from the next source)")
        for name, count in sorted((s.get("source_skips") or {}).items()):
            lines.append(
                f"{name} skipped {count} reads (local checksum not known yet: read locally, recorded)"
            )
        if s.get("fill_transforms"):
            lines.append(
                f"expert conversions at fill (not views of the stored bytes): {s['fill_transforms']} in "
                f"{s.get('fill_transform_seconds', 0.0):.3f} s"
            )
        lines.append(f"stall (compute waiting for experts): {s.get('stall_seconds', 0.0):.3f} s")
        lines.append(f"experts kernels: {s.get('experts_compute_seconds', 0.0):.3f} s")
        if s.get("routed"):
            lines.append(
                f"LOSSY: cache-aware routing replaced {s.get('rerouted', 0)} of {s['routed']} expert choices with "
                "resident experts; outputs differ from the model's"
            )
        lines.append(
            f"prefetch: {s.get('prefetch_issued', 0)} issued, {s.get('prefetch_used', 0)} used, "
            f"{s.get('prefetch_wasted', 0)} wasted, {s.get('prefetch_cancelled', 0)} cancelled, "
            f"{s.get('prefetch_refused', 0)} refused by admission"
        )
    pred = result.prediction.get("by_distance") if result.prediction else None
    if pred:
        parts = [
            f"d={d}: P {v.get('precision', 0):.2f} R {v.get('recall', 0):.2f}"
            for d, v in sorted(pred.items())
        ]
        lines.append("prediction: " + ", ".join(parts))
    return "\n".join(lines)
