"""Many requests at once: continuous batching with token scheduling, outputs identical to running alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expertflow.cli import main
from expertflow.config import StoreConfig
from expertflow.errors import ConfigError
from expertflow.model.batch import Request, admission_order, generate_many, read_requests
from expertflow.model.loader import load_model
from tests.checkpoints import save_checkpoint


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint("mixtral", tmp_path_factory.mktemp("batch") / "mixtral", shard_size=None)


def _requests(n: int) -> list[Request]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = int(torch.randint(2, 14, (1,), generator=g))
        ids = torch.randint(0, 256, (length,), generator=g).tolist()
        out.append(Request(f"r{i}", tuple(ids), 3 + (i * 5) % 9))
    return out


def _alone(model, r: Request) -> list[int]:
    out = model.generate(
        torch.tensor([list(r.input_ids)]), max_new_tokens=r.max_new_tokens, do_sample=False, pad_token_id=0
    )
    return out[0, len(r.input_ids) :].tolist()


@pytest.mark.parametrize("schedule", ["fifo", "experts"])
def test_batched_greedy_outputs_equal_each_request_run_alone(mixtral: Path, schedule: str) -> None:
    """Twelve requests of different lengths and budgets, three at a time (finished ones are replaced), experts
    evicted and read again mid-batch, prediction on: every output is the one the request gets alone."""
    requests = _requests(12)
    config = StoreConfig(host_bytes=300 << 10, predictor="combined")
    with load_model(mixtral, config=config) as model:
        alone = {r.id: _alone(model, r) for r in requests}
        result = generate_many(model, requests, schedule=schedule, max_requests=3)
    assert result.outputs == alone
    # Each stops at its own budget (or at end-of-sequence, as it does alone).
    assert all(len(result.outputs[r.id]) <= r.max_new_tokens for r in requests)
    assert len({len(t) for t in result.outputs.values()}) > 3
    assert sorted(result.order) == sorted(r.id for r in requests)
    assert result.stats["evictions"] > 0 and result.expert_loads_per_token > 0
    assert 0 <= result.hit_rate <= 1 and result.tokens_per_second > 0


def test_the_experts_schedule_runs_requests_with_the_same_experts_together(mixtral: Path) -> None:
    a, b = (1, 2, 3, 4, 5, 6), (200, 201, 202, 203, 204, 205)
    requests = [Request(f"{name}{i}", ids, 2) for i in range(3) for name, ids in (("a", a), ("b", b))]
    with load_model(mixtral, config=StoreConfig(predictor="none")) as model:
        assert admission_order(model, requests, "fifo", 3) == [0, 1, 2, 3, 4, 5]  # a, b, a, b, a, b
        order = [requests[i].id[0] for i in admission_order(model, requests, "experts", 3)]
    assert order == ["a", "a", "a", "b", "b", "b"]


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not JSON"),
        ('{"prompt": "x", "token_ids": [1]}', "line 2: give exactly one of"),
        ('{"token_ids": []}', "line 2: 'token_ids' must be"),
        ('{"token_ids": [1], "max_new_tokens": 0}', "line 2: 'max_new_tokens' must be"),
        ('{"id": "a", "token_ids": [1]}', "line 2: request id 'a' is used twice"),
        ('{"token_ids": [1], "images": "x.png"}', r"line 2: unknown fields \['images'\]"),
        ('{"token_ids": [1], "image": "x.png"}', r"line 2: image 'x.png' does not exist"),
        (
            '{"token_ids": [1], "image": "requests.jsonl"}',
            "line 2: .* is a text-only model: it takes no image",
        ),
    ],
)
def test_a_bad_request_line_is_named_before_any_work(
    mixtral: Path, tmp_path: Path, line: str, message: str
) -> None:
    path = _write(tmp_path, '{"id": "a", "token_ids": [1, 2]}', line)
    with pytest.raises(ConfigError, match=message):
        read_requests(path, mixtral, max_new_tokens=4)


def test_the_cli_runs_a_requests_file(
    mixtral: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        '{"id": "x", "token_ids": [5, 6, 7], "max_new_tokens": 3}',
        '{"token_ids": [9, 8], "max_new_tokens": 5}',
    )
    args = ["generate", str(mixtral), "--prompts", str(path), "--schedule", "experts", "--max-batch", "1"]
    assert main([*args, "--host-mem", "300KiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schedule"] == "experts" and out["requests"] == 2
    assert [len(out["outputs"][k]) for k in ("x", "request-2")] == [3, 5]
    with load_model(mixtral, config=StoreConfig(predictor="none")) as model:
        assert out["outputs"]["x"] == _alone(model, Request("x", (5, 6, 7), 3))
    assert main([*args, "--prompt", "hello"]) == 2  # --prompts and --prompt together: refused


def test_prompts_are_encoded_by_the_checkpoints_tokenizer_loaded_once(mixtral: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from expertflow.model.generate import load_tokenizer

    root = tmp_path / "with-tokenizer"
    root.mkdir()
    for f in mixtral.iterdir():
        (root / f.name).symlink_to(f)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 7, "main": 9}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(root)
    path = _write(tmp_path, *(json.dumps({"prompt": p}) for p in ("def main", "main main def", "x")))
    before = load_tokenizer.cache_info().misses
    requests = read_requests(path, root, max_new_tokens=2)
    assert [r.input_ids for r in requests] == [(7, 9), (9, 9, 7), (0,)]
    assert load_tokenizer.cache_info().misses == before + 1


def test_a_requests_file_without_requests_is_refused(mixtral: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, "", "   ")
    with pytest.raises(ConfigError, match="has no requests"):
        read_requests(path, mixtral, max_new_tokens=4)


def test_a_requests_expert_profile_fires_none_of_the_models_hooks(mixtral: Path) -> None:
    """The server profiles a waiting request between two forward passes of the running batch: the look-ahead
    norms must not run through their modules' hooks, or the predictor's captured residual stream (a pre-hook
    on those norms) would be that prompt's embeddings instead of the batch's hidden states."""
    from expertflow.model.batch import expert_profiles
    from expertflow.model.prefetch import find_gates

    with load_model(mixtral, config=StoreConfig(host_bytes=300 << 10)) as model:
        _, norms = find_gates(model, model.expert_layers)
        fired: list[int] = []
        for layer, norm in norms.items():
            norm.register_forward_pre_hook(lambda *_, layer=layer: fired.append(layer))
        profile = expert_profiles(model, [Request("a", (1, 2, 3), 1)])[0]
        assert fired == [] and set(profile) == set(norms)
        model(torch.tensor([[1, 2, 3]]))
        assert sorted(set(fired)) == sorted(norms)  # the model's own forward does fire them
