"""``expertflow serve-model``: an OpenAI-compatible HTTP API over one :class:`~expertflow.serving.engine.Engine`.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (JSON, or server-sent events with
``"stream": true``), ``/health`` and ``/metrics`` (Prometheus text). Requests are parsed and checked here,
before they queue: malformed JSON, an unknown model, unsupported options and prompts longer than the context
are 400s with OpenAI-style error bodies; a full queue is a 429; a stopped engine a 503. Nothing a client sends
is a 500.

Why not ``transformers serve``: it loads each model from the Hub cache into a process of its own, where the
expert store's budget, remote daemons, CURVE keys and counters would be out of reach of the API process, and
its scheduler knows nothing of experts. The request and response formats here follow OpenAI's API reference.
"""

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from expertflow.errors import ConfigError
from expertflow.model.decoding import Sampling
from expertflow.serving.engine import Completion, Engine, EngineStopped, Event, Overloaded

Encode = Callable[[str], list[int]]
ChatEncode = Callable[[list[dict[str, str]]], list[int]]


class ApiError(Exception):
    """An error reply: HTTP status and OpenAI's error object."""

    def __init__(
        self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def build_app(
    engine: Engine,
    model_name: str,
    encode: Encode,
    chat_encode: ChatEncode | None,
    sampling_defaults: Callable[..., Sampling],
) -> Any:
    """The FastAPI application. ``encode``/``chat_encode`` turn a prompt / chat messages into token ids;
    ``sampling_defaults(temperature=, top_p=, top_k=, seed=)`` applies the checkpoint's generation config."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="ExpertFlow", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug of ours: say so, keep serving
        return JSONResponse(
            {
                "error": {
                    "message": f"internal error: {exc}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
            status_code=500,
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine.metrics()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "expertflow"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _json_body(request)
        _check_model(body, model_name)
        prompt = _prompt_ids(body.get("prompt"), encode)
        completion = _completion(body, prompt, sampling_defaults, default_max=16, engine=engine)
        return await _respond(engine, body, completion, model_name, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _json_body(request)
        _check_model(body, model_name)
        if chat_encode is None:
            raise bad_request("this model's tokenizer has no chat template: use /v1/completions", "messages")
        prompt = chat_encode(_messages(body.get("messages")))
        completion = _completion(body, prompt, sampling_defaults, default_max=None, engine=engine)
        return await _respond(engine, body, completion, model_name, chat=True)

    async def _respond(
        engine: Engine, body: dict[str, Any], completion: Completion, model: str, chat: bool
    ) -> Any:
        try:
            events = await engine.submit(completion)
        except ConfigError as exc:
            raise bad_request(str(exc)) from None
        except Overloaded as exc:
            raise ApiError(429, str(exc), "rate_limit_error", "rate_limit_exceeded") from None
        except EngineStopped as exc:
            raise ApiError(503, str(exc), "server_error", "unavailable") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns():x}"
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
        if body.get("stream"):
            return StreamingResponse(
                _sse(events, rid, model, chat, len(completion.prompt), usage_in_stream),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        text, tokens, finish = [], 0, "length"
        try:
            async for event in events:
                if event.error:
                    raise ApiError(503, event.error, "server_error", "generation_failed")
                text.append(event.text)
                tokens += len(event.tokens)
                finish = event.finish_reason or finish
        finally:
            await events.aclose()
        usage = _usage(len(completion.prompt), tokens)
        if chat:
            message = {"role": "assistant", "content": "".join(text)}
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": "".join(text), "finish_reason": finish, "logprobs": None}
        kind = "chat.completion" if chat else "text_completion"
        return {
            "id": rid,
            "object": kind,
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }

    return app


async def _sse(
    events: AsyncGenerator[Event, None],
    rid: str,
    model: str,
    chat: bool,
    prompt_tokens: int,
    with_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, one with the finish reason, usage if asked, ``[DONE]``."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    tokens = 0

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        data = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat:
            yield chunk(None, None, first=True)
        async for event in events:
            if event.error:
                err = {"error": {"message": event.error, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            tokens += len(event.tokens)
            if event.text or event.finish_reason:
                yield chunk(event.text, event.finish_reason)
        if with_usage:
            data = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": []}
            data["usage"] = _usage(prompt_tokens, tokens)
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a client that went away: its request leaves the batch


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


#: The largest request body read; a longer one is refused (413) before it is buffered whole.
MAX_BODY_BYTES = 4 << 20


async def _json_body(request: Any) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", "invalid_request_error")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", "invalid_request_error")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def _check_model(body: dict[str, Any], name: str) -> None:
    model = body.get("model")
    if model is not None and model != name:
        raise bad_request(
            f"model {model!r} is not served here; this server serves {name!r}", "model", "model_not_found"
        )


def _prompt_ids(prompt: Any, encode: Encode) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        return encode(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return list(prompt)
    raise bad_request(
        "prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt"
    )


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise bad_request(f"messages[{i}]: only text content is supported", "messages")
            content = "".join(parts)  # type: ignore[arg-type]
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def _number(body: dict[str, Any], key: str, kind: type, low: float, high: float) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise bad_request(f"{key} must be a number", key)
    if not low <= value <= high:
        raise bad_request(f"{key} must be in [{low}, {high}], got {value}", key)
    return kind(value)


def _completion(
    body: dict[str, Any],
    prompt: list[int],
    sampling_defaults: Callable[..., Sampling],
    default_max: int | None,
    engine: Engine,
) -> Completion:
    n = body.get("n", 1)
    if n != 1:
        raise bad_request("only n=1 is supported", "n")
    for key in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions"):
        if body.get(key):
            raise bad_request(f"{key} is not supported by this server", key)
    if body.get("best_of") not in (None, 1):
        raise bad_request("only best_of=1 is supported", "best_of")
    limit = engine.max_model_len
    max_tokens = _number(body, "max_tokens", int, 1, limit)
    if max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", int, 1, limit)
    if max_tokens is None:
        max_tokens = default_max if default_max is not None else max(limit - len(prompt), 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a non-empty string or a list of up to 4 of them", "stop")
    try:
        sampling = sampling_defaults(
            temperature=_number(body, "temperature", float, 0.0, 2.0),
            top_p=_number(body, "top_p", float, 0.0, 1.0),
            top_k=_number(body, "top_k", int, 0, 1 << 30),
            seed=_number(body, "seed", int, -(1 << 63), (1 << 63) - 1),
        )
    except ConfigError as exc:
        raise bad_request(str(exc)) from None
    completion = Completion(tuple(prompt), max_tokens, sampling, tuple(stop))
    try:
        engine.check(completion)
    except ConfigError as exc:
        raise bad_request(
            str(exc), code="context_length_exceeded" if "context" in str(exc) else None
        ) from None
    return completion


def prometheus_text(values: dict[str, float]) -> str:
    """``values`` in Prometheus' text format, names prefixed ``expertflow_`` (labels kept)."""
    lines = []
    typed: set[str] = set()
    for key, value in values.items():
        name = key.split("{", 1)[0]
        if name not in typed:
            typed.add(name)
            lines.append(f"# TYPE expertflow_{name} {'counter' if name.endswith('_total') else 'gauge'}")
        lines.append(f"expertflow_{key} {value}")
    return "\n".join(lines) + "\n"
