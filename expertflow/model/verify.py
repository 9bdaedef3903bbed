"""Families verified at load time: ExpertFlow proves, before a family's real weights run, that its offloaded
experts compute what the family's own modules compute.

ExpertFlow swaps only a family's experts module and runs the family's own forward over slot memory. A family
that does something the swap does not know of (an experts subclass that overrides ``forward``, a per-expert
parameter beside the projections, rows per route) would run with silently wrong outputs, and every
transformers release can add one. So the first load of a family builds a tiny, seeded instance of the same
config class (:func:`expertflow.model.tiny.tiny_copy`), saves it with ``save_pretrained``, and compares the
logits of transformers' own model with those of the offloaded one, loaded with room for two layers' experts
so that experts are evicted and read again. A difference above ``TOLERANCE`` of the logit scale refuses the
family with :class:`~expertflow.errors.UnsupportedModelError`, naming the first experts module whose output
differs.

The outcome is cached in ``cache_dir()/families.json``, keyed by the model type, the versions of
transformers, torch and ExpertFlow (a digest of its code), and the tiny config: a second load costs a
dictionary lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig

from expertflow._version import __version__
from expertflow.core import cache_dir
from expertflow.errors import ExpertFlowError, UnsupportedModelError
from expertflow.model.adapters import experts_modules, model_class
from expertflow.model.tiny import randomise, tiny_copy

log = logging.getLogger(__name__)

VERIFIED = "verified"
REFUSED = "refused"
NOT_CHECKED = "not yet checked"
#: Largest accepted difference between the offloaded and the reference logits, as a share of the logit scale.
TOLERANCE = 1e-5
TOKENS = 12
SEED = 0
CACHE_FILE = "families.json"
_CACHE_VERSION = 1

#: Loads a tiny checkpoint offloaded, without the family check, with experts evicted: (folder) -> model.
Loader = Callable[[Path], Any]


@dataclass(frozen=True)
class FamilyCheck:
    """The outcome of one family check."""

    model_type: str
    status: str  # VERIFIED or REFUSED
    reason: str = ""  # why it was refused
    module: str | None = None  # the first experts module whose output differs
    max_difference: float | None = None  # of the logits
    logit_scale: float | None = None
    seconds: float = 0.0  # what the check cost
    versions: str = ""

    @property
    def verified(self) -> bool:
        return self.status == VERIFIED

    def error(self, root: str | None = None) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{self.model_type} is refused: the family check found that ExpertFlow's offloaded experts do not "
            f"compute what the family's own module computes ({self.reason}); the family is not run. Pass "
            "trust_family=True (CLI: --trust-family) only to run it anyway, knowing its outputs may be wrong",
            file=root,
        )

    def describe(self) -> str:
        """What was found, after the status: the versions it holds for, or why the family was refused."""
        if self.verified:
            return f"{self.versions}; max logit difference {self.max_difference:.2e}, checked in {self.seconds:.1f} s"
        return self.reason


@cache
def code_digest() -> str:
    """A digest of ExpertFlow's own code: a check made by other code is made again."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def versions() -> str:
    return f"transformers {transformers.__version__}, torch {torch.__version__}, expertflow {__version__}+{code_digest()}"


def check_key(hf_config: PretrainedConfig) -> str:
    """The cache key of ``hf_config``'s family check: model type, versions, and the tiny config it runs."""
    tiny = json.dumps(tiny_copy(hf_config).to_dict(), sort_keys=True, default=str)
    shape = hashlib.sha256(tiny.encode()).hexdigest()[:16]
    return f"{hf_config.model_type}|{versions()}|{shape}"


def cached_check(hf_config: PretrainedConfig) -> FamilyCheck | None:
    """The cached outcome of ``hf_config``'s family check, or None when it has not run with these versions."""
    return _lookup(check_key(hf_config))


def _lookup(key: str) -> FamilyCheck | None:
    found = _read_cache().get(key)
    return _from_json(found) if found is not None else None


def verify_family(hf_config: PretrainedConfig, load: Loader, *, refresh: bool = False) -> FamilyCheck:
    """The family check of ``hf_config``: cached, else run now and cached. Does not raise for a refusal.

    Raises :class:`UnsupportedModelError` only when no tiny instance of the family can be built or run by
    transformers itself (then nothing is proved either way, and nothing is cached).
    """
    key = check_key(hf_config)
    found = None if refresh else _lookup(key)
    if found is not None:
        return found
    result = run_check(hf_config, load)
    _write_cache(key, result)
    log.info("family check of %s: %s (%.1f s)", hf_config.model_type, result.status, result.seconds)
    return result


def run_check(hf_config: PretrainedConfig, load: Loader) -> FamilyCheck:
    """Build the tiny instance of ``hf_config``'s family, and compare the offloaded model with transformers'.

    The caller's random state is left as it was.
    """
    start = time.perf_counter()
    model_type = hf_config.model_type
    with (
        torch.random.fork_rng(devices=[]),
        _no_progress_bars(),
        tempfile.TemporaryDirectory(prefix="expertflow-check-") as tmp,
    ):
        root = Path(tmp)
        try:
            tiny = tiny_copy(hf_config)
            ids = _input_ids(tiny)
            reference = _reference(tiny, root)
            want, want_calls = _forward(reference, ids, _reference_modules(reference))
            del reference
        except Exception as exc:  # transformers itself cannot build or run the tiny instance
            raise UnsupportedModelError(
                f"{model_type}: the family check could not build a tiny instance of this family to prove "
                f"ExpertFlow exact on it ({type(exc).__name__}: {exc}); pass trust_family=True (CLI: "
                "--trust-family) to run it unverified",
            ) from exc
        done = _finisher(model_type, start)
        try:
            with load(root) as model:
                got, got_calls = _forward(model, ids, _offloaded_modules(model))
        except ExpertFlowError as exc:
            return done(REFUSED, f"the tiny instance cannot be offloaded: {exc}")
        except Exception as exc:  # the family's forward fails on offloaded experts
            return done(REFUSED, f"the offloaded tiny instance fails: {type(exc).__name__}: {exc}")
    scale = max(want.abs().max().item(), 1.0)
    if got.shape != want.shape:
        return done(REFUSED, f"outputs of shape {list(got.shape)} instead of {list(want.shape)}")
    diff = (got - want).abs().max().item()
    if diff <= TOLERANCE * scale:  # also false for NaN
        return done(VERIFIED, "", diff=diff, scale=scale)
    module = _first_difference(want_calls, got_calls)
    where = (
        f"{module[0]} differs first (max difference {module[1]:.3g})"
        if module
        else "no experts module differs"
    )
    return done(
        REFUSED,
        f"logits differ by {diff:.3g} on a logit scale of {scale:.3g} (allowed {TOLERANCE:g} of it); {where}",
        diff=diff,
        scale=scale,
        module=module[0] if module else None,
    )


def _finisher(model_type: str, start: float) -> Callable[..., FamilyCheck]:
    def done(
        status: str,
        reason: str,
        *,
        diff: float | None = None,
        scale: float | None = None,
        module: str | None = None,
    ) -> FamilyCheck:
        return FamilyCheck(
            model_type,
            status,
            reason,
            module,
            diff,
            scale,
            round(time.perf_counter() - start, 3),
            versions(),
        )

    return done


def _input_ids(tiny: PretrainedConfig) -> torch.Tensor:
    vocab = getattr(tiny.get_text_config(), "vocab_size", None) or 256
    return torch.randint(0, min(int(vocab), 256), (1, TOKENS), generator=torch.Generator().manual_seed(SEED))


def _reference(tiny: PretrainedConfig, root: Path) -> nn.Module:
    """The tiny instance with seeded weights, saved to ``root`` and read back by transformers."""
    cls: Any = model_class(tiny) or transformers.AutoModelForCausalLM  # the class load_model builds
    torch.manual_seed(SEED)  # construction draws from the global generator (forked by the caller)
    model = cls.from_config(tiny) if cls is transformers.AutoModelForCausalLM else cls._from_config(tiny)
    model = model.to(torch.float32)
    randomise(model, SEED)
    model.save_pretrained(root)
    del model
    return cls.from_pretrained(root, dtype=torch.float32).eval()


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' loading bar is noise in a check the user did not ask for."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


Calls = list[tuple[str, torch.Tensor]]


def _reference_modules(model: nn.Module) -> dict[str, nn.Module]:
    return experts_modules(model)


def _offloaded_modules(model: Any) -> dict[str, nn.Module]:
    return {m.module_path: m for m in model.expert_layers.values()}


def _forward(model: Any, ids: torch.Tensor, modules: dict[str, nn.Module]) -> tuple[torch.Tensor, Calls]:
    """The model's output on ``ids`` (logits, or the last hidden state of a headless model) and each experts
    module's output in call order. A family whose forward samples sees the same draws every time."""
    calls: Calls = []
    with _recording(modules, calls), torch.no_grad():
        torch.manual_seed(SEED)
        out = model(input_ids=ids)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).float(), calls


@contextlib.contextmanager
def _recording(modules: dict[str, nn.Module], calls: Calls) -> Iterator[None]:
    def hook(path: str) -> Callable[..., None]:
        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                calls.append((path, output.detach().float().clone()))

        return record

    handles = [m.register_forward_hook(hook(path)) for path, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _first_difference(want: Calls, got: Calls) -> tuple[str, float] | None:
    """The first experts module (in call order) whose offloaded output differs from the reference's."""
    for (path, a), (_, b) in zip(want, got):
        if a.shape != b.shape:
            return path, float("inf")
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        if not diff <= TOLERANCE * max(a.abs().max().item() if a.numel() else 0.0, 1e-3):
            return path, diff
    return None


def cached_status(hf_config: PretrainedConfig) -> dict[str, Any]:
    """What is known of ``hf_config``'s family check with the installed versions, for ``inspect``."""
    try:
        found = cached_check(hf_config)
    except Exception as exc:  # a config the tiny shrink cannot handle: the check would say so at load
        return {"status": NOT_CHECKED, "detail": f"no tiny instance: {type(exc).__name__}: {exc}"}
    if found is None:
        return {"status": NOT_CHECKED, "detail": f"checked at the first load ({versions()})"}
    return {"status": found.status, "detail": found.describe(), **asdict(found)}


# --- the cache ----------------------------------------------------------------------------------------

_memory: dict[str, dict[str, Any]] = {}  # this process's checks, also when the cache folder is not writable


def _read_cache() -> dict[str, dict[str, Any]]:
    path = cache_dir() / CACHE_FILE
    checks: dict[str, dict[str, Any]] = {}
    try:
        data = json.loads(path.read_text())
        if (
            isinstance(data, dict)
            and data.get("version") == _CACHE_VERSION
            and isinstance(data.get("checks"), dict)
        ):
            checks = {k: v for k, v in data["checks"].items() if isinstance(v, dict)}
        else:
            log.warning("ignoring %s: not a family-check cache of version %d", path, _CACHE_VERSION)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable family-check cache %s: %s", path, exc)
    return {**checks, **_memory}


def _write_cache(key: str, result: FamilyCheck) -> None:
    _memory[key] = asdict(result)
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        checks = {**_read_cache(), key: asdict(result)}
        fd, tmp = tempfile.mkstemp(prefix=".families-", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _CACHE_VERSION, "checks": checks}, f, indent=1, sort_keys=True)
            os.replace(tmp, folder / CACHE_FILE)  # readers see the old file or the new one, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning(
            "family check of %s not cached (%s): it runs again in the next process", result.model_type, exc
        )


def _from_json(data: dict[str, Any]) -> FamilyCheck:
    fields = FamilyCheck.__dataclass_fields__
    return FamilyCheck(**{k: v for k, v in data.items() if k in fields})
