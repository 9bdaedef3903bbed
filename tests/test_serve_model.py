"""``expertflow serve-model``: a real server process on loopback, driven by the official ``openai`` client.

The checkpoint has a real tokenizer and chat template and a budget below its experts, so every request reads
experts while others run. Greedy answers are compared with what :func:`expertflow.model.generate.generate`
gives the same prompt alone, in this process.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from expertflow.config import StoreConfig
from expertflow.model.decoding import Sampling
from expertflow.model.generate import chat_ids, generate, load_tokenizer
from expertflow.model.loader import load_model
from tests.checkpoints import save_checkpoint, save_tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

BUDGET = "300KiB"


@pytest.fixture(scope="module")
def worded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = save_checkpoint("mixtral", tmp_path_factory.mktemp("serve") / "mixtral", shard_size=None)
    save_tokenizer(root, 256)
    return root


def server(root: Path, *extra: str) -> AbstractContextManager[str]:
    """``serve-model`` in a subprocess on a free loopback port (the bench's runner: it also checks that the
    server exits with status 0 on SIGTERM); yields its base URL."""
    from expertflow.lab.serve import running_server

    return running_server(str(root), ["--host-mem", BUDGET, "--max-model-len", "512", *extra], lambda _: None)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _alone(root: Path, prompt: list[int], n: int, sampling: Sampling | None = None) -> tuple[str, str]:
    """(text, finish_reason) of ``prompt`` generated alone by the library."""
    tokenizer = load_tokenizer(str(root))
    with load_model(root, config=StoreConfig(host_bytes=300 << 10)) as model:
        r = generate(
            model,
            prompt,
            n,
            sampling=sampling or Sampling(),
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        )
    assert r.text is not None
    return r.text, r.finish_reason


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {k: float(v) for k, v in re.findall(r"^expertflow_(\S+) (\S+)$", text, re.M)}


def _post(url: str, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_completions_and_chat_streamed_and_not_give_the_tokens_of_a_lone_generation(worded: Path) -> None:
    tokenizer = load_tokenizer(str(worded))
    prompt = tokenizer("w5 w6 w7")["input_ids"]
    want, _ = _alone(worded, prompt, 6)
    chat_prompt = chat_ids(tokenizer, [{"role": "user", "content": "w40 w41"}])
    want_chat, _ = _alone(worded, chat_prompt, 5)
    with server(worded) as url:
        client = _client(url)
        assert [m.id for m in client.models.list()] == ["mixtral"]
        done = client.completions.create(model="mixtral", prompt="w5 w6 w7", max_tokens=6, temperature=0)
        assert done.choices[0].text == want and done.choices[0].finish_reason == "length"
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 6)
        stream = client.completions.create(
            model="mixtral",
            prompt="w5 w6 w7",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == 6
        chat = client.chat.completions.create(
            model="mixtral", messages=[{"role": "user", "content": "w40 w41"}], max_tokens=5
        )
        assert chat.choices[0].message.content == want_chat and chat.choices[0].message.role == "assistant"
        assert chat.usage.prompt_tokens == len(chat_prompt)
        pieces = client.chat.completions.create(
            model="mixtral", messages=[{"role": "user", "content": "w40 w41"}], max_tokens=5, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in pieces) == want_chat
        # A stop string ends the answer and is left out of it.
        stop = want.split(" ")[2]
        cut = client.completions.create(model="mixtral", prompt="w5 w6 w7", max_tokens=6, stop=[stop])
        assert cut.choices[0].text == want[: want.index(stop)] and cut.choices[0].finish_reason == "stop"
        assert cut.usage.completion_tokens == 3  # every generated token counts, held-back text or not
        health = urllib.request.urlopen(f"{url}/health", timeout=10)
        assert health.status == 200
        metrics = _metrics(url)
        assert metrics["requests_total"] == 5 and metrics["generated_tokens_total"] >= 6 * 2 + 5 * 2
        assert metrics['expert_bytes_read_total{source="nvme"}'] > 0 and 0 <= metrics["expert_hit_rate"] <= 1
        assert "stall_seconds_total" in metrics and metrics["queue_depth"] == 0


def test_eight_concurrent_clients_each_get_what_they_get_alone(worded: Path) -> None:
    prompts = [f"w{5 + i} w{50 + 3 * i} w{100 + i}" for i in range(8)]
    lengths = [3 + (i * 5) % 9 for i in range(8)]
    tokenizer = load_tokenizer(str(worded))
    want = [_alone(worded, tokenizer(p)["input_ids"], n)[0] for p, n in zip(prompts, lengths)]
    got: dict[int, str] = {}
    errors: list[BaseException] = []
    with server(worded, "--max-batch", "4") as url:
        client = _client(url)
        start = threading.Barrier(8)

        def ask(i: int) -> None:
            try:
                start.wait()
                if i % 2:
                    got[i] = (
                        client.completions.create(model="mixtral", prompt=prompts[i], max_tokens=lengths[i])
                        .choices[0]
                        .text
                    )
                else:
                    s = client.completions.create(
                        model="mixtral", prompt=prompts[i], max_tokens=lengths[i], stream=True
                    )
                    got[i] = "".join(c.choices[0].text for c in s)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[0]
        assert [got[i] for i in range(8)] == want
        assert _metrics(url)["requests_total"] == 8


def test_a_client_that_disconnects_mid_stream_frees_its_place(worded: Path) -> None:
    with server(worded, "--max-batch", "1") as url:
        client = _client(url)
        stream = client.completions.create(model="mixtral", prompt="w5 w6", max_tokens=400, stream=True)
        next(iter(stream))
        stream.close()  # the client goes away after its first piece of text
        # The only place in the batch is free again: the next request completes, long before 400 tokens.
        done = client.completions.create(model="mixtral", prompt="w9", max_tokens=3)
        assert done.choices[0].finish_reason == "length"
        deadline = time.monotonic() + 10
        while _metrics(url)["requests_cancelled_total"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = _metrics(url)
        assert metrics["requests_cancelled_total"] == 1 and metrics["running_requests"] == 0
        assert metrics["generated_tokens_total"] < 100


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": "other", "prompt": "w5"}', "is not served here"),
        (b'{"prompt": "w5", "n": 2}', "only n=1"),
        (b'{"prompt": "w5", "max_tokens": 10000}', "max_tokens must be in"),
        (
            b'{"prompt": "' + b"w5 " * 600 + b'", "max_tokens": 4}',
            "exceeds the server's context of 512 tokens",
        ),
        (b'{"prompt": "w5", "temperature": "hot"}', "temperature must be a number"),
        (b'{"prompt": "w5", "stop": ["a", "b", "c", "d", "e"]}', "stop must be"),
        (b'{"prompt": [1, 99999]}', "outside the model's vocabulary"),
        (b'{"prompt": {"x": 1}}', "prompt must be"),
        (b'{"prompt": "w5", "logprobs": 3}', "logprobs is not supported"),
    ],
)
def test_malformed_requests_get_400_with_an_openai_error(
    worded_server: str, body: bytes, message: str
) -> None:
    status, reply = _post(worded_server, "/v1/completions", body)
    assert status == 400 and message in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"
    # ...and the server keeps serving
    assert _post(worded_server, "/v1/completions", b'{"prompt": "w5", "max_tokens": 2}')[0] == 200


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_buffered(worded_server: str) -> None:
    import socket
    from urllib.parse import urlparse

    from expertflow.serving.openai_api import MAX_BODY_BYTES

    url = urlparse(worded_server)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode() + b'{"prompt": "w')
        reply = ""  # answered before the body is sent, let alone buffered
        while "exceeds" not in reply and (data := sock.recv(65536)):
            reply += data.decode()
    assert reply.startswith("HTTP/1.1 413") and "exceeds" in reply
    assert _post(worded_server, "/v1/completions", b'{"prompt": "w5", "max_tokens": 2}')[0] == 200


def test_bad_chat_requests_get_400(worded_server: str) -> None:
    for body in (
        b'{"messages": []}',
        b'{"messages": [{"content": "x"}]}',
        b'{"messages": [{"role": "user"}]}',
    ):
        status, reply = _post(worded_server, "/v1/chat/completions", body)
        assert status == 400, reply
    client = _client(worded_server)
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="w5", max_tokens=2)


@pytest.fixture(scope="module")
def worded_server(worded: Path) -> Iterator[str]:
    with server(worded) as url:
        yield url


def test_a_full_queue_answers_429_and_the_queued_requests_still_finish(worded: Path) -> None:
    with server(worded, "--max-batch", "1", "--max-queue", "1") as url:
        client = _client(url)
        running = client.completions.create(model="mixtral", prompt="w5", max_tokens=300, stream=True)
        next(iter(running))  # in the batch's only place
        queued: dict[str, str] = {}
        waiter = threading.Thread(
            target=lambda: queued.update(
                text=client.completions.create(model="mixtral", prompt="w7", max_tokens=2).choices[0].text
            )
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while _metrics(url)["queue_depth"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model="mixtral", prompt="w8", max_tokens=2)
        assert refused.value.status_code == 429
        assert refused.value.body["type"] == "rate_limit_error"
        running.close()
        waiter.join(timeout=60)
        assert queued.get("text")
        assert _metrics(url)["requests_rejected_total"] == 1


def test_a_seeded_sampled_request_repeats_and_matches_the_library(worded: Path) -> None:
    tokenizer = load_tokenizer(str(worded))
    want, _ = _alone(worded, tokenizer("w5 w6")["input_ids"], 8, Sampling(temperature=1.0, seed=11))
    with server(worded) as url:
        client = _client(url)
        texts = [
            client.completions.create(model="mixtral", prompt="w5 w6", max_tokens=8, temperature=1.0, seed=11)
            .choices[0]
            .text
            for _ in range(2)
        ]
    assert texts == [want, want]


def test_bench_serve_measures_every_contender_under_each_load(worded: Path, tmp_path: Path) -> None:
    from expertflow.lab.serve import COLUMNS, ServeContender, bench_serve, plot_serve

    prompts = [[5, 6, 7], [40, 41], [100, 7, 9, 12], [8]]
    contenders = [
        ServeContender("transformers (all in RAM)", ("--plain-transformers",)),
        ServeContender("expertflow experts", ("--host-mem", BUDGET, "--schedule", "experts")),
    ]
    result = bench_serve(
        str(worded), prompts, contenders=contenders, clients=(1, 2), max_tokens=4, log=lambda _: None
    )
    assert [(r["contender"], r["clients"]) for r in result.rows] == [
        ("transformers (all in RAM)", 1),
        ("transformers (all in RAM)", 2),
        ("expertflow experts", 1),
        ("expertflow experts", 2),
    ]
    for row in result.rows:
        assert row["requests"] == 4 and 0 < row["output_tokens"] <= 16 and row["output_tok_s"] > 0
        assert row["ttft_p50_ms"] > 0 and row["ttft_p99_ms"] >= row["ttft_p50_ms"]
    plain, offloaded = result.rows[0], result.rows[2]
    assert plain["expert_loads_per_token"] is None  # no store behind plain transformers
    assert offloaded["expert_loads_per_token"] > 0 and 0 <= offloaded["hit_rate"] < 1
    result.write(tmp_path, COLUMNS)
    plot_serve(result, tmp_path / "serve.png")
    assert (tmp_path / "serve.md").read_text().count("expertflow experts") == 2
