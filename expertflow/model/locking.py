"""One model, many callers: a loaded model's forward passes and generations run one at a time.

A model loaded by :func:`expertflow.load_model` shares mutable state between calls: the store's pins and
slots, the experts modules' slot bindings, the predictor's view of the current token. Two threads in two
forward passes would interleave on it. So the model's ``forward`` and ``generate`` hold one re-entrant lock
per model: concurrent callers queue (``generate`` as a whole, so a generation's tokens are not interleaved
with another's), and a call that fails releases it like one that succeeds, leaving the next caller a working
model. Callers that want their requests to share forward passes use a continuous batch
(:func:`expertflow.model.batch.generate_many`), whose one worker thread makes the forward calls.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

_ATTR = "_expertflow_lock"


def install_lock(model: Any) -> threading.RLock:
    """Wrap ``model.forward`` and ``model.generate`` (on the instance, signatures kept: transformers inspects
    ``forward``'s parameters) so each call holds the model's lock. Idempotent."""
    existing: threading.RLock | None = model.__dict__.get(_ATTR)
    if existing is not None:
        return existing
    lock = threading.RLock()
    model.__dict__[_ATTR] = lock
    for name in ("forward", "generate"):
        method = getattr(model, name, None)
        if method is not None:
            model.__dict__[name] = _locked(method, lock)
    return lock


def model_lock(model: Any) -> contextlib.AbstractContextManager[Any]:
    """The model's lock as a context manager (a no-op for a model without one: plain transformers)."""
    lock = getattr(model, "__dict__", {}).get(_ATTR)
    return lock if lock is not None else contextlib.nullcontext()


def _locked(method: Callable[..., Any], lock: threading.RLock) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return method(*args, **kwargs)

    return call
