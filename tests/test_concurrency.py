"""One loaded model, many threads: calls queue on the model instead of interleaving on the store's state."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from expertflow.config import StoreConfig
from expertflow.errors import ExpertReadError
from expertflow.model.generate import generate
from expertflow.model.loader import load_model, plan_model
from tests.checkpoints import save_checkpoint

PROMPTS = [(1, 2, 3, 4), (200, 17, 9), (33, 34, 35, 36, 37), (120, 121)]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint("mixtral", tmp_path_factory.mktemp("concurrency") / "mixtral", shard_size=None)


def _few_slots(root: Path, **options) -> StoreConfig:
    """Room for two layers' top-2 experts of the fixture's 24: reads and evictions on every token."""
    return StoreConfig(host_bytes=4 * plan_model(root).slot_nbytes, **options)


def _hf_generate(model, prompt: tuple[int, ...], n: int = 6) -> list[int]:
    out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def _in_threads(fn, prompts) -> tuple[dict[int, list[int]], list[BaseException]]:
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = fn(prompts[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a generation hung"
    return results, errors


def test_generate_from_four_threads_gives_each_thread_its_alone_tokens_fifty_times(mixtral: Path) -> None:
    """The issue's reproducer: ``model.generate`` from four threads on one model whose budget (4 of its 24
    experts) forces reads and evictions on every token. Without the model's lock this failed with
    ``pop from empty list`` or mismatched batch sizes, and sometimes left the store broken for later calls."""
    with load_model(mixtral, config=_few_slots(mixtral, predictor="combined")) as model:
        alone = {i: _hf_generate(model, p) for i, p in enumerate(PROMPTS)}
        for run in range(50):
            results, errors = _in_threads(lambda p: _hf_generate(model, p), PROMPTS)
            assert not errors, f"run {run}: {errors[0]!r}"
            assert results == alone, f"run {run}"
        # ...and a single-threaded call after all that still works
        assert _hf_generate(model, PROMPTS[0]) == alone[0]
        assert model.expert_stats().evictions > 0


def test_expertflow_generate_from_threads_queues_whole_generations(mixtral: Path) -> None:
    with load_model(mixtral, config=_few_slots(mixtral)) as model:
        alone = {i: generate(model, p, 5, ignore_eos=True).tokens for i, p in enumerate(PROMPTS)}
        results, errors = _in_threads(lambda p: generate(model, p, 5, ignore_eos=True).tokens, PROMPTS)
        assert not errors and results == alone


def test_a_failed_generation_leaves_the_model_working_for_the_next_caller(
    mixtral: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read error in the middle of a generation (the store's third fetch fails) releases the lock and the
    pins: the next call, from another thread, gets the tokens it gets on a fresh model."""
    with load_model(mixtral, config=_few_slots(mixtral)) as model:
        expected = _hf_generate(model, PROMPTS[1])
        store = model.expert_store
        real = store.fetch_as_ready
        calls = {"n": 0}

        def failing(keys):
            calls["n"] += 1
            if calls["n"] == 3:  # the third layer of the first call
                raise ExpertReadError("injected read failure")
            return real(keys)

        monkeypatch.setattr(store, "fetch_as_ready", failing)
        with pytest.raises(ExpertReadError, match="injected"):
            _hf_generate(model, PROMPTS[0])
        results, errors = _in_threads(lambda p: _hf_generate(model, p), [PROMPTS[1]])
        assert not errors and results[0] == expected
