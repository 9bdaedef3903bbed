"""``expertflow eval ppl``: what quantizing (or any change to) the experts costs in accuracy, measured.

Perplexity of a model on a text, teacher-forced over consecutive windows; against a reference model on the same
windows also the mean KL divergence from the reference's next-token distribution and how often both put the
same token first. Token ids come from the checkpoint's tokenizer, or are the text's bytes for a byte-level model
(vocabulary of 256, no tokenizer), as for the trained model in ``shared/models``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from expertflow.errors import ConfigError


@dataclass
class EvalResult:
    """Perplexity (and agreement with a reference) of one model on one text."""

    model: str
    tokens: int
    nll: float  # mean negative log-likelihood per predicted token, nats
    reference: str | None = None
    kl: float | None = None  # mean KL(reference || model) per predicted token, nats
    top1_agreement: float | None = None
    reference_nll: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out["perplexity"] = self.perplexity
        if self.reference_nll is not None:
            out["reference_perplexity"] = math.exp(self.reference_nll)
        return {**out, **self.extra}


def token_ids(model_dir: str | Path, text: str) -> list[int]:
    """The text as token ids: the checkpoint's tokenizer, else bytes for a byte-level vocabulary."""
    root = Path(model_dir)
    if any(
        (root / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        from expertflow.model.generate import load_tokenizer

        return list(load_tokenizer(str(root))(text)["input_ids"])
    from transformers import AutoConfig

    vocab = getattr(
        AutoConfig.from_pretrained(root, local_files_only=True).get_text_config(), "vocab_size", 0
    )
    if vocab < 256:
        raise ConfigError(
            f"{root} has no tokenizer and a vocabulary of {vocab}: cannot feed it text as bytes"
        )
    return list(text.encode("utf-8"))


def _windows(ids: Sequence[int], length: int, limit: int | None) -> list[torch.Tensor]:
    usable = len(ids) if limit is None else min(len(ids), limit)
    return [
        torch.tensor([ids[i : i + length]])
        for i in range(0, usable - 1, length)
        if len(ids[i : i + length]) > 1
    ]


def _logits(model: Any, window: torch.Tensor, incremental: bool = False) -> torch.Tensor:
    """Next-token logits at every position of ``window`` but the last: in one forward, or (``incremental``) one
    token at a time with the KV cache, as decoding sees them (what per-step expert caching acts on)."""
    with torch.no_grad():
        if not incremental:
            return model(input_ids=window).logits[0, :-1].float()
        past = None
        steps = []
        for t in range(window.shape[1] - 1):
            out = model(input_ids=window[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[0, -1].float())
        return torch.stack(steps)


def evaluate(
    model: Any,
    ids: Sequence[int],
    *,
    name: str,
    reference: Any | None = None,
    reference_name: str | None = None,
    window: int = 256,
    max_tokens: int | None = None,
    incremental: bool = False,
) -> EvalResult:
    """Teacher-forced perplexity of ``model`` over ``ids`` in windows of ``window`` tokens (and, with a
    ``reference`` model, mean KL from it and top-1 agreement with it, on the same windows)."""
    windows = _windows(ids, window, max_tokens)
    if not windows:
        raise ConfigError("the text is too short to evaluate: it needs at least two tokens")
    nll = kl = ref_nll = 0.0
    agree = count = 0
    t0 = time.perf_counter()
    for w in windows:
        targets = w[0, 1:]
        logp = F.log_softmax(_logits(model, w, incremental), dim=-1)
        nll += float(F.nll_loss(logp, targets, reduction="sum"))
        count += targets.numel()
        if reference is not None:
            ref_logp = F.log_softmax(_logits(reference, w, incremental), dim=-1)
            ref_nll += float(F.nll_loss(ref_logp, targets, reduction="sum"))
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    result = EvalResult(name, count, nll / count, seconds=time.perf_counter() - t0)
    store = getattr(model, "expert_store", None)
    if store is not None:
        result.extra["hit_rate"] = store.stats().hit_rate
    routings = [m.routing for m in getattr(model, "expert_layers", {}).values() if m.routing is not None]
    if routings:
        result.extra["rerouted_share"] = sum(r.rerouted for r in routings) / max(
            1, sum(r.routed for r in routings)
        )
    if reference is not None:
        result.reference = reference_name
        result.kl = kl / count
        result.top1_agreement = agree / count
        result.reference_nll = ref_nll / count
    return result


def check_model_dir(path: str | Path) -> None:
    """Refuse what is not a local model directory before any work: nothing is downloaded from a hub, so
    ``org/name`` is a path like any other."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(
            f"{path} is not a model directory (models are local directories; nothing is downloaded)"
        )
    if not (root / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json: not a Hugging Face model directory or ExpertFlow pack")


def load_for_eval(
    path: str | Path, host_bytes: int | None = None, routing_margin: float | None = None
) -> Any:
    """A model to evaluate: ExpertFlow's loader for a pack (quantized or not) or a checkpoint; with
    ``routing_margin``, cache-aware routing (lossy) at that margin."""
    from expertflow.config import StoreConfig
    from expertflow.model.loader import load_model

    routing: dict[str, Any] = {}
    if routing_margin is not None:
        routing = {"routing": "cache-aware", "routing_margin": routing_margin}
    return load_model(path, config=StoreConfig(host_bytes=host_bytes, predictor="none", **routing))


def load_reference(path: str | Path) -> Any:
    """The plain transformers model of a Hugging Face checkpoint (a pack is loaded by ExpertFlow: lossless)."""
    import transformers

    from expertflow.tiers.safetensors_index import PACK_MANIFEST_NAME

    root = Path(path)
    if (root / PACK_MANIFEST_NAME).is_file():
        return load_for_eval(root)
    config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    cls = next(
        (getattr(transformers, a) for a in config.architectures or [] if hasattr(transformers, a)),
        transformers.AutoModelForCausalLM,
    )
    return cls.from_pretrained(root, local_files_only=True).eval()


def format_results(results: Sequence[EvalResult]) -> str:
    rows = [
        "| model | tokens | perplexity | nats/token | KL vs reference | top-1 agreement | hit rate | rerouted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        kl = f"{r.kl:.4f}" if r.kl is not None else ""
        agree = f"{r.top1_agreement:.3f}" if r.top1_agreement is not None else ""
        hit = f"{r.extra['hit_rate']:.3f}" if "hit_rate" in r.extra else ""
        rerouted = f"{r.extra['rerouted_share']:.3f}" if "rerouted_share" in r.extra else ""
        rows.append(
            f"| {r.model} | {r.tokens} | {r.perplexity:.3f} | {r.nll:.4f} | {kl} | {agree} | {hit} | {rerouted} |"
        )
    return "\n".join(rows)


def read_texts(paths: Sequence[str | Path]) -> str:
    """The evaluation text: files as given, directories as their ``.py`` / ``.txt`` / ``.md`` files in sorted
    order."""
    parts: list[str] = []
    for name in paths:
        path = Path(name)
        files = (
            sorted(f for f in path.rglob("*") if f.suffix in (".py", ".txt", ".md") and f.is_file())
            if path.is_dir()
            else [path]
        )
        for f in files:
            try:
                parts.append(f.read_text(encoding="utf-8", errors="replace"))
            except OSError as exc:
                raise ConfigError(f"cannot read {f}: {exc.strerror}") from exc
    if not parts:
        raise ConfigError(f"no text found in {', '.join(map(str, paths))}")
    return "\n".join(parts)


def evaluate_models(
    models: Sequence[str],
    texts: Sequence[str],
    *,
    reference: str | None = None,
    host_bytes: int | None = None,
    routing_margin: float | None = None,
    window: int = 256,
    max_tokens: int | None = None,
    incremental: bool = False,
) -> list[EvalResult]:
    """``eval ppl``: each model's perplexity on the text of ``texts`` (tokenized once, by the first model; every
    other model must tokenize it alike), and its KL / top-1 agreement against ``reference`` when given."""
    for path in [*models, *([reference] if reference else [])]:
        check_model_dir(path)
    text = read_texts(texts)
    ids = token_ids(models[0], text)
    ref = load_reference(reference) if reference else None
    results = []
    try:
        for path in models:
            head = token_ids(path, text[:4096])
            if head != ids[: len(head)]:
                raise ConfigError(f"{path} tokenizes the text differently from {models[0]}")
            model = load_for_eval(path, host_bytes, routing_margin)
            try:
                results.append(
                    evaluate(
                        model,
                        ids,
                        name=path,
                        reference=ref,
                        reference_name=reference,
                        window=window,
                        max_tokens=max_tokens,
                        incremental=incremental,
                    )
                )
            finally:
                model.close()
    finally:
        close = getattr(ref, "close", None)
        if callable(close):
            close()
    return results


def write_results(out: str | Path, command: str, texts: Sequence[str], results: Sequence[EvalResult]) -> None:
    """``accuracy.json`` and ``accuracy.md`` under ``out``, with the command that made them."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "text": list(texts), "results": [r.as_dict() for r in results]}
    (folder / "accuracy.json").write_text(json.dumps(payload, indent=1))
    (folder / "accuracy.md").write_text(f"# accuracy\n\n{format_results(results)}\n\nCommand: `{command}`\n")
