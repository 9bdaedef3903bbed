"""Run ``expertflow serve-model``: load a checkpoint, start the engine, serve the OpenAI-compatible API.

The socket is bound before the model loads (a port in use is refused at once, not after minutes of loading);
uvicorn serves on it. SIGINT/SIGTERM stop the server: requests still running get an error event, the batch
worker stops, the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertflow.errors import ConfigError


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    name: str | None = None  # the model id clients send; default: the directory's name
    max_batch: int = 8
    max_queue: int = 64
    schedule: str = "experts"
    max_model_len: int = 2048
    byte_tokens: bool = False


def require_serving_extra() -> None:
    missing = []
    for module in ("fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(
            f"serve-model needs {', '.join(missing)}: install the serve extra, pip install 'expertflow[serve]'"
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port), or a :class:`ConfigError`."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _uvicorn_server() -> type:
    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc]
        """uvicorn's server, stopped by our signal handlers: a stop ends in a clean exit (status 0, store
        closed), where uvicorn's own handlers re-raise the signal after shutting down."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def stop(self, signum: int, frame: Any) -> None:
            self.should_exit = True

    return Server


def load_plain(model_dir: str | Path) -> Any:
    """The checkpoint as plain transformers loads it, whole model in RAM: the baseline ``bench serve`` runs
    behind the same server. Guarded by the same per-model lock as an ExpertFlow model."""
    from transformers import AutoModelForCausalLM

    from expertflow.model.locking import install_lock

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", local_files_only=True).eval()
    install_lock(model)
    return model


def serve_model(model_dir: str | Path, load: Callable[[int], Any], options: ServeOptions) -> int:
    """Serve the checkpoint at ``model_dir``; ``load(context_tokens)`` loads it with the caller's store options.
    Returns when the server is stopped."""
    require_serving_extra()
    import uvicorn

    from expertflow.model.decoding import Decode, Sampling, byte_decode, tokenizer_decode
    from expertflow.model.generate import chat_ids, load_tokenizer
    from expertflow.serving.engine import Engine
    from expertflow.serving.openai_api import build_app

    name = options.name or Path(model_dir).resolve().name
    decode: Decode
    if options.byte_tokens:
        decode = byte_decode

        def encode(text: str) -> list[int]:
            return list(text.encode("utf-8"))

        chat_encode = None
    else:
        tokenizer = load_tokenizer(str(model_dir))  # ConfigError without one: --byte-tokens for byte models
        decode = tokenizer_decode(tokenizer)

        def encode(text: str) -> list[int]:
            return list(tokenizer(text)["input_ids"])

        def chat(messages: list[dict[str, str]]) -> list[int]:
            return chat_ids(tokenizer, messages, name)

        chat_encode = chat if getattr(tokenizer, "chat_template", None) else None
    sock = bind(options.host, options.port)
    try:
        # The auto budget leaves room for the batch's KV cache: every running request at full context.
        model = load(options.max_batch * options.max_model_len)
    except BaseException:
        sock.close()
        raise
    engine = Engine(
        model,
        decode,
        max_batch=options.max_batch,
        max_queue=options.max_queue,
        schedule=options.schedule,
        max_model_len=options.max_model_len,
    )

    def sampling(**given: Any) -> Sampling:
        return Sampling.from_generation_config(model.generation_config, **given)

    app = build_app(engine, name, encode, chat_encode, sampling)
    host, port = sock.getsockname()[:2]

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        await engine.start()
        print(f"serving {name} at http://{host}:{port}/v1 ({options.schedule} schedule)", flush=True)
        try:
            yield
        finally:
            await engine.close()

    app.router.lifespan_context = lifespan
    server = _uvicorn_server()(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    )
    previous = {sig: signal.signal(sig, server.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        close = getattr(model, "close", None)
        if callable(close):
            close()
    print("server stopped", file=sys.stderr)
    return 0
