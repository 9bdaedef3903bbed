"""Text in, text out: a checkpoint with a real tokenizer streams text, stops at end-of-sequence and at stop
strings, samples reproducibly, applies chat templates; inputs are refused before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from expertflow.cli import main
from expertflow.config import StoreConfig
from expertflow.errors import ConfigError
from expertflow.model.decoding import (
    Sampling,
    StopOnText,
    TextStream,
    byte_decode,
    cut_at_stop,
    tokenizer_decode,
)
from expertflow.model.generate import chat_ids, encode_prompt, generate, load_tokenizer
from expertflow.model.loader import load_model
from tests.checkpoints import save_checkpoint, save_tokenizer


@pytest.fixture(scope="module")
def worded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A tiny Mixtral with a tokenizer whose end-of-sequence id is the 3rd token greedy decoding gives for the
    prompt "w5 w6 w7" (so that a run stops there), and those greedy tokens."""
    root = save_checkpoint("mixtral", tmp_path_factory.mktemp("text") / "mixtral", shard_size=None)
    save_tokenizer(root, 256)
    reference = AutoModelForCausalLM.from_pretrained(root).eval()
    ids = torch.tensor([load_tokenizer(str(root))("w5 w6 w7")["input_ids"]])
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    greedy = out[0, ids.shape[1] :].tolist()
    assert greedy[2] not in greedy[:2] and min(greedy) >= 3, greedy  # the fixture's premise
    GenerationConfig(eos_token_id=greedy[2], bos_token_id=1, pad_token_id=0).save_pretrained(root)
    return root, greedy


def _words(ids: list[int]) -> str:
    return " ".join(f"w{t}" for t in ids)


def test_generate_streams_text_and_stops_at_end_of_sequence(worded, capsys) -> None:
    root, greedy = worded
    assert main(["generate", str(root), "--prompt", "w5 w6 w7", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out == _words(greedy[:2]) + "\n"  # the text, not ids; the end-of-sequence token is not text
    assert "tokens: 3 prompt + 3 generated" in out.err  # the summary is on stderr


def test_generate_json_is_one_document_with_text_and_finish_reason(worded, capsys) -> None:
    root, greedy = worded
    assert main(["generate", str(root), "--prompt", "w5 w6 w7", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)  # `| jq .` works: nothing else on stdout
    assert payload["tokens"] == greedy[:3] and payload["text"] == _words(greedy[:2])
    assert payload["finish_reason"] == "stop"
    argv = ["generate", str(root), "--prompt", "w5 w6 w7", "--json", "--ignore-eos", "--max-new-tokens", "8"]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["tokens"] == greedy and payload["finish_reason"] == "length"


def test_a_stop_string_ends_generation_and_is_not_printed(worded, capsys) -> None:
    root, greedy = worded
    stop = f"w{greedy[1]}"
    argv = [
        "generate",
        str(root),
        "--prompt",
        "w5 w6 w7",
        "--ignore-eos",
        "--stop",
        stop,
        "--max-new-tokens",
        "8",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed == _words(greedy[:1]) + " \n"  # up to the stop string, which is left out
    assert main([*argv, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["tokens"] == greedy[:2] and payload["finish_reason"] == "stop"


def test_seeded_sampling_repeats_and_draws_what_transformers_draws(worded) -> None:
    root, _ = worded
    prompt = load_tokenizer(str(root))("w5 w6 w7")["input_ids"]
    sampling = Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    with load_model(root, config=StoreConfig(host_bytes=300 << 10)) as model:
        first = generate(model, prompt, 10, sampling=sampling, ignore_eos=True).tokens
        again = generate(model, prompt, 10, sampling=sampling, ignore_eos=True).tokens
        other = generate(model, prompt, 10, sampling=Sampling(1.5, 0.95, 50, seed=8), ignore_eos=True).tokens
    assert first == again and first != other
    reference = AutoModelForCausalLM.from_pretrained(root).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=10,
            do_sample=True,
            temperature=1.5,
            top_k=50,
            top_p=0.95,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert out[0, len(prompt) :].tolist() == first


def test_greedy_is_the_default_unless_the_generation_config_samples() -> None:
    assert Sampling.from_generation_config(GenerationConfig()).greedy
    sampled = Sampling.from_generation_config(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9))
    assert (sampled.temperature, sampled.top_p, sampled.greedy) == (0.7, 0.9, False)
    assert Sampling.from_generation_config(GenerationConfig(do_sample=True), temperature=0).greedy
    with pytest.raises(ConfigError, match="top_p"):
        Sampling(temperature=1.0, top_p=0)


def test_chat_puts_the_prompt_in_the_tokenizers_template(worded, capsys) -> None:
    root, _ = worded
    ids = encode_prompt(root, "w5 w6", None, False, chat=True)
    assert ids == [1, 10, 5, 6, 11]
    assert (
        main(["generate", str(root), "--prompt", "w5 w6", "--chat", "--json", "--max-new-tokens", "3"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == 5
    with pytest.raises(ConfigError, match="byte-level"):
        encode_prompt(root, "x", None, True, chat=True)


def test_text_streams_hold_back_a_character_cut_between_tokens() -> None:
    stream = TextStream(byte_decode)
    snake = "é€".encode()  # two and three bytes
    pieces = [stream.push(b) for b in b"a" + snake + b"\nb"]
    assert pieces == ["a", "", "é", "", "", "€", "\n", "b"]
    assert stream.text == "aé€\nb"
    assert byte_decode([104, 300]) == "h[300]"


def test_stop_strings_are_found_in_the_generated_tail_only() -> None:
    stop = StopOnText(byte_decode, ["END"], prompt_tokens=3)
    ids = torch.tensor([list(b"ENDabc"), list(b"xyENDx"), list(b"xyzEND")])
    assert stop(ids, None).tolist() == [False, False, True]  # text that starts in the prompt does not count
    assert cut_at_stop("abcdEND", ["END", "cd"]) == ("ab", "cd")  # the earliest, whatever the order
    assert cut_at_stop("abc", ["x"]) == ("abc", None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--token-ids", "1,2,999999"], "token id 999999 is outside the model's vocabulary (0..255)"),
        (["--token-ids", "1", "--device", "cuda:0"], "cannot use cuda:0"),
        (["--token-ids", "1", "--device", "tpu"], "'tpu' is not a device name"),
        (["--token-ids", "1", "--device", "xpu"], "ExpertFlow computes on cpu or cuda, not 'xpu'"),
        (["--token-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (
            ["--token-ids", "1", "--routing-margin", "0.2"],
            "--routing-margin applies to --routing cache-aware",
        ),
        (["--token-ids", "1", "--stop", "x"], "--stop needs text"),
    ],
)
def test_bad_generate_arguments_are_refused_before_the_model_loads(
    checkpoints, capsys, monkeypatch, extra: list[str], message: str
) -> None:
    import expertflow.model.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = checkpoints.get("mixtral")
    assert main(["generate", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_requests_file_with_an_out_of_range_token_is_refused_before_loading(
    checkpoints, tmp_path, capsys, monkeypatch
) -> None:
    import expertflow.model.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"id": "a", "token_ids": [1, 2]}\n{"id": "b", "token_ids": [3, 256]}\n')
    assert main(["generate", str(checkpoints.get("mixtral")), "--prompts", str(requests)]) == 2
    assert "request 'b': token id 256 is outside" in capsys.readouterr().err


def test_trace_into_a_missing_directory_is_refused_before_the_run(
    checkpoints, tmp_path, capsys, monkeypatch
) -> None:
    import expertflow.model.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "missing" / "x.npz"
    argv = ["trace", str(checkpoints.get("mixtral")), "--token-ids", "1,2", "--out", str(out)]
    assert main(argv) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_the_library_refuses_out_of_vocabulary_ids_and_unusable_devices(checkpoints) -> None:
    path = checkpoints.get("mixtral")
    with pytest.raises(ConfigError, match="cannot use cuda"):
        load_model(path, device="cuda:0")
    with load_model(path) as model:
        with pytest.raises(ConfigError, match="outside the model's vocabulary"):
            generate(model, [1, 256], 2)
        assert len(generate(model, [1, 2], 2, ignore_eos=True).tokens) == 2  # and the model still works


def test_chat_session_answers_each_line_with_the_whole_conversation(worded, monkeypatch, capsys) -> None:
    import io
    import sys

    root, _ = worded
    tokenizer = load_tokenizer(str(root))
    monkeypatch.setattr(sys, "stdin", io.StringIO("w5 w6\nw7\n\n"))
    assert main(["chat", str(root), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    replies = capsys.readouterr().out.splitlines()
    messages = [{"role": "user", "content": "w5 w6"}]
    decode = tokenizer_decode(tokenizer)
    with load_model(root) as model:
        first = generate(model, chat_ids(tokenizer, messages), 3, decode=decode).text
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "w7"}]
        second = generate(model, chat_ids(tokenizer, messages), 3, decode=decode).text
    assert replies == [first, second]


def test_generate_many_refuses_out_of_vocabulary_ids_before_the_batch_starts(checkpoints) -> None:
    from expertflow.model.batch import Request, generate_many

    with load_model(checkpoints.get("mixtral")) as model:
        with pytest.raises(ConfigError, match="request 'b': token id 256 is outside"):
            generate_many(model, [Request("a", (1, 2), 2), Request("b", (3, 256), 2)])
        assert generate_many(model, [Request("a", (1, 2), 2)]).outputs["a"]  # still works


def test_stop_text_holds_back_a_possible_stop_string_and_never_shows_it() -> None:
    from expertflow.model.decoding import StopText

    shown = StopText(byte_decode, ["END", "##"], eos=[0])
    pieces = [shown.push(t) for t in b"abE#cEN"] + [shown.push(0)]
    assert "".join(pieces) == "abE#c" and not shown.stopped  # "EN" could still become a stop string
    assert shown.push(ord("D")) == "" and shown.stopped  # ...and did: the text ends before it
    assert shown.push(ord("z")) == "" and shown.finish() == ""
    tail = StopText(byte_decode, ["END"])
    assert [tail.push(t) for t in b"xEN"] == ["", "", "x"] and tail.finish() == "EN"  # never became one
