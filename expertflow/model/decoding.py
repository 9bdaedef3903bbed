"""How a generation chooses and ends: sampling settings, stop strings, and incremental text.

Kept apart from the model so the CLI, the library and the server share one definition: a request's sampling
(greedy unless the checkpoint's generation config or the caller asks otherwise), when it stops (end-of-sequence
ids, stop strings, the token limit), and how its tokens become text while they stream (a token may end in the
middle of a UTF-8 character; such text is held back until the character is whole).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertflow.errors import ConfigError

Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature == 0`` is greedy (the others are then ignored).

    ``top_k == 0`` and ``top_p == 1`` switch those filters off. ``seed`` makes a sampled run repeat: the same
    seed, prompt and model give the same tokens.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(
        cls,
        config: Any,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> Sampling:
        """The checkpoint's defaults (``generation_config.json``: greedy unless it sets ``do_sample``), with the
        caller's values where given."""
        sampled = bool(getattr(config, "do_sample", False))
        default_t = float(getattr(config, "temperature", None) or 1.0) if sampled else 0.0
        default_p = float(getattr(config, "top_p", None) or 1.0) if sampled else 1.0
        default_k = int(getattr(config, "top_k", None) or 0) if sampled else 0
        return cls(
            temperature=default_t if temperature is None else temperature,
            top_p=default_p if top_p is None else top_p,
            top_k=default_k if top_k is None else top_k,
            seed=seed,
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """The arguments of ``transformers``' ``generate`` that choose tokens this way."""
        if self.greedy:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,
        }


def byte_decode(ids: Sequence[int]) -> str:
    """Text of a byte-level model's tokens (token id = UTF-8 byte; other ids shown as ``[id]``)."""
    out = bytearray()
    for t in ids:
        if 0 <= t < 256:
            out.append(t)
        else:
            out.extend(f"[{t}]".encode())
    return out.decode("utf-8", errors="replace")


def tokenizer_decode(tokenizer: Any) -> Decode:
    """Text of a tokenizer's tokens, special tokens left out (as chat clients show them)."""

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))

    return decode


def ids_decode(ids: Sequence[int]) -> str:
    """For a checkpoint with no tokenizer: the ids themselves, ``[10][32]``."""
    return "".join(f"[{t}]" for t in ids)


class TextStream:
    """Turns tokens into text as they come: :meth:`push` returns the text a token completes.

    Text is decoded from the tokens since the last line break, so that tokenizers that render a token
    differently at the start of a text (leading spaces) are decoded in context, and cost stays bounded per
    line. A decoded tail ending in U+FFFD (a UTF-8 character cut between tokens) is held back.
    """

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self._ids: list[int] = []
        self._shown = 0  # characters of decode(self._ids) already returned
        self.text = ""

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[self._shown :]
        self.text += new
        if text.endswith("\n"):
            self._ids, self._shown = [], 0
        else:
            self._shown = len(text)
        return new

    def flush(self) -> str:
        """Whatever was held back (a cut character at the very end shows as U+FFFD)."""
        text = self.decode(self._ids) if self._ids else ""
        new = text[self._shown :]
        self.text += new
        self._ids, self._shown = [], 0
        return new


class StopText:
    """The text of a stream of tokens as it may be shown while stop strings are watched: end-of-sequence ids
    are not text, a tail that could be the start of a stop string is held back, and nothing from a stop string
    on is ever shown. :meth:`push` returns the new text a token makes safe, :meth:`finish` the rest."""

    def __init__(self, decode: Decode, stop: Sequence[str] = (), eos: Sequence[int] = ()) -> None:
        self.stream = TextStream(decode)
        self.stop = tuple(stop)
        self.eos = frozenset(eos)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.shown = 0  # characters returned so far
        self.stopped = False  # a stop string has appeared: nothing more is text

    def push(self, token: int) -> str:
        if self.stopped or token in self.eos:
            return ""
        self.stream.push(token)
        text, hit = cut_at_stop(self.stream.text, self.stop)
        self.stopped = hit is not None
        safe = text if self.stopped else text[: max(len(text) - self.hold, self.shown)]
        return self._advance(safe)

    def finish(self) -> str:
        """What was held back (a cut character, a tail that did not become a stop string)."""
        self.stream.flush()
        return self._advance(cut_at_stop(self.stream.text, self.stop)[0])

    def _advance(self, safe: str) -> str:
        new = safe[self.shown :]
        self.shown = max(self.shown, len(safe))
        return new


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """``text`` up to the first stop string it contains, and that string (None when none occurs)."""
    first: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (first is None or i < first[0]):
            first = (i, s)
    return (text, None) if first is None else (text[: first[0]], first[1])


class StopOnText:
    """A ``transformers`` stopping criterion: true once the generated text contains one of ``stop``.

    Only the tail that could hold a new match is decoded at each step (the longest stop string plus a
    margin of tokens), so the cost per token does not grow with the output.
    """

    def __init__(self, decode: Decode, stop: Sequence[str], prompt_tokens: int) -> None:
        if any(not s for s in stop):
            raise ConfigError("stop strings must not be empty")
        self.decode = decode
        self.stop = tuple(stop)
        self.prompt_tokens = prompt_tokens
        self.window = max(len(s) for s in self.stop) + 8 if self.stop else 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop:
            return done
        for row in range(input_ids.shape[0]):
            tail = input_ids[row, self.prompt_tokens :][-self.window :].tolist()
            text = self.decode(tail)
            done[row] = any(s in text for s in self.stop)
        return done
