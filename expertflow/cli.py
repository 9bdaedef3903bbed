"""Command lines: ``expertflow`` (inspect, pack, ...) and ``expertflow-store`` (serve, stat, ...).

Argument parsing and printing only; every command calls a library function.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from expertflow.config import POLICIES, PREDICTORS, READ_MODES, StoreConfig, parse_size
from expertflow.errors import ConfigError, ExpertFlowError

Handler = Callable[[argparse.Namespace], int]
#: bench decode's budgets when none are given (fractions of what all experts take)
DEFAULT_BUDGETS = "1.0,0.5,0.25,0.1"
#: cache-aware routing's default margin of router probability
ROUTING_MARGIN = 0.1


def _open_layout(path: str) -> Any:
    from expertflow.model.loader import open_layout

    return open_layout(path)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from expertflow.lab.inspect import describe_checkpoint, format_table

    desc = describe_checkpoint(args.path, read_mode=args.read_mode, check_family=args.check_family)
    print(json.dumps(desc, indent=2) if args.json else format_table(desc))
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    if args.quantize:
        from expertflow.model.quantize_pack import pack_quantized
        from expertflow.quant.scheme import QuantScheme

        bits = 4 if args.quantize == "int4" else 8
        group = args.group_size if args.group_size is not None else (128 if bits == 4 else 0)
        scheme = QuantScheme(bits, group, args.method)
        others = None
        if args.non_experts != "keep":
            # int8 per channel; int4 in groups of 128 (the output head and attention are wide enough).
            others = QuantScheme(8, 0) if args.non_experts == "int8" else QuantScheme(4, 128)
        out = pack_quantized(args.src, args.dst, scheme, progress=not args.no_progress, non_experts=others)
        also = f", {others.name} attention and output head" if others else ""
        print(f"packed {args.src} -> {out} ({scheme.name} experts{also})")
        return 0
    if args.group_size is not None or args.method != "rtn" or args.non_experts != "keep":
        raise ConfigError("--group-size, --method and --non-experts apply to --quantize")
    from expertflow.tiers.pack import pack_checkpoint

    out = pack_checkpoint(args.src, args.dst, progress=not args.no_progress, layout=_open_layout(args.src))
    print(f"packed {args.src} -> {out}")
    return 0


def _cmd_checksums(args: argparse.Namespace) -> int:
    from expertflow.tiers.local_checksums import LocalChecksums, fill

    layout = _open_layout(args.model)
    if layout.packed:
        print(f"{args.model} is a pack: its manifest already records every expert's checksum")
        return 0
    book = LocalChecksums.open(layout)
    try:
        known = len(book)
        added = fill(book)
    finally:
        book.close()
    where = book.path if book.path is not None else "memory only (no writable place)"
    print(f"{added} expert checksums computed, {known} already known; {len(layout.experts)} in {where}")
    return 0


def _budget(text: str | None) -> int | None:
    """A size, or None for "auto" / not given: sized from the memory available (see pipeline.budget)."""
    return None if text is None or text.strip().lower() == "auto" else parse_size(text)


def _store_config(args: argparse.Namespace) -> StoreConfig:
    return StoreConfig(
        device=args.device,
        device_slots=args.device_slots,
        host_bytes=_budget(args.host_mem),
        read_mode=args.read_mode,
        policy=args.policy,
        predictor=args.predictor,
        remote=tuple(args.remote or ()),
        remote_replicas=args.remote_replicas,
        remote_timeout=args.remote_timeout,
        curve_server_key=args.curve_server_key,
        curve_client_secret=args.curve_client_secret,
        routing=args.routing,
        routing_margin=ROUTING_MARGIN if args.routing_margin is None else args.routing_margin,
    )


def _cmd_generate_many(args: argparse.Namespace) -> int:
    from expertflow.model.batch import generate_many, read_requests
    from expertflow.model.generate import text_decoder

    if args.prompt or args.token_ids:
        raise ConfigError("--prompts takes the prompts from its file: leave --prompt / --token-ids out")
    if args.chat or args.stop or _sampling_given(args):
        raise ConfigError(
            "--chat, --stop and sampling options apply to one --prompt, not to --prompts (greedy)"
        )
    requests = read_requests(
        args.prompts, args.path, max_new_tokens=args.max_new_tokens, byte_tokens=args.byte_tokens
    )
    vocab = _vocab_size(args.path)
    for r in requests:
        _check_ids(r.input_ids, vocab, f"{args.prompts}: request {r.id!r}")
    decode = text_decoder(args.path, args.byte_tokens)
    # The batch holds up to --max-batch requests at once: room for the longest of them together.
    lengths = sorted((len(r.input_ids) + r.max_new_tokens for r in requests), reverse=True)
    with _load(args, sum(lengths[: args.max_batch]) or 1) as model:
        result = generate_many(model, requests, schedule=args.schedule, max_requests=args.max_batch)
    if args.json:
        data = result.as_dict()
        if decode is not None:
            data["texts"] = {rid: decode(tokens) for rid, tokens in result.outputs.items()}
        print(json.dumps(data, indent=2, default=str))
        return 0
    for r in requests:
        tokens = result.outputs[r.id]
        text = {"text": decode(tokens)} if decode is not None else {}
        print(json.dumps({"id": r.id, "tokens": tokens, **text}))
    print(result.summary(), file=sys.stderr)
    return 0


def _sampling_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) is not None for k in ("temperature", "top_p", "top_k", "seed"))


def _vocab_size(path: str) -> int | None:
    """The checkpoint's vocabulary size from its config.json (None when it does not say), without loading it."""
    try:
        with open(f"{path}/config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None  # load_model explains what is wrong with the directory
    for where in (config, config.get("text_config") or {}):
        if isinstance(where, dict) and isinstance(where.get("vocab_size"), int):
            return int(where["vocab_size"])
    return None


def _check_ids(ids: Sequence[int], vocab: int | None, where: str) -> None:
    from expertflow.model.generate import check_ids_in_vocabulary

    check_ids_in_vocabulary(ids, vocab, where)


def _check_generation_args(args: argparse.Namespace) -> None:
    """What can be refused before a model loads (loading a large one takes minutes)."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _check_store_args(args)


def _check_store_args(args: argparse.Namespace) -> None:
    from expertflow.devices import check_device

    check_device(args.device)
    if args.routing_margin is not None and args.routing != "cache-aware":
        raise ConfigError("--routing-margin applies to --routing cache-aware")


def _cmd_generate(args: argparse.Namespace) -> int:
    from expertflow.model.decoding import Sampling, StopText, ids_decode
    from expertflow.model.generate import encode_prompt, eos_ids, format_summary, generate, text_decoder

    _check_generation_args(args)
    if args.prompts:
        if args.image:
            raise ConfigError(
                "--prompts takes its images from the file ('image' per line): leave --image out"
            )
        return _cmd_generate_many(args)
    ids = encode_prompt(args.path, args.prompt, args.token_ids, args.byte_tokens, chat=args.chat)
    _check_ids(ids, _vocab_size(args.path), "--token-ids" if args.token_ids else "the prompt")
    decode = text_decoder(args.path, args.byte_tokens)
    if args.stop and decode is None:
        raise ConfigError(
            "--stop needs text: this checkpoint has no tokenizer (use --byte-tokens if byte-level)"
        )
    prompt: list[int] | dict[str, Any] = ids
    if args.image:
        from expertflow.model.vision import ImagePrompts

        prompt = ImagePrompts(args.path).inputs(ids, args.image)  # checked before the model loads
    prompt_tokens = len(ids) if isinstance(prompt, list) else int(prompt["input_ids"].shape[1])
    model = _load(args, prompt_tokens + args.max_new_tokens)
    try:
        sampling = Sampling.from_generation_config(
            model.generation_config,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        eos = () if args.ignore_eos else eos_ids(model) or ()
        shown = StopText(decode or ids_decode, args.stop or (), eos)

        def show(token: int) -> None:
            if not args.json:  # --json: stdout is one JSON document
                print(shown.push(token), end="", flush=True)

        result = generate(
            model,
            prompt,
            args.max_new_tokens,
            on_token=show,
            sampling=sampling,
            stop=args.stop or (),
            decode=decode,
            ignore_eos=args.ignore_eos,
        )
        if args.json:
            print(json.dumps(result.as_dict(), indent=2, default=str))
            return 0
        print(shown.finish())
        print(format_summary(result), file=sys.stderr)
    finally:
        model.close()
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    """An interactive conversation on the terminal: each line you type is a user's turn."""
    from expertflow.model.decoding import Sampling, StopText, tokenizer_decode
    from expertflow.model.generate import chat_ids, eos_ids, generate, load_tokenizer

    _check_generation_args(args)
    tokenizer = load_tokenizer(args.path)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{args.path}'s tokenizer has no chat template: use `expertflow generate --prompt`")
    decode = tokenizer_decode(tokenizer)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    context = args.context or 4096
    model = _load(args, context)
    try:
        sampling = Sampling.from_generation_config(
            model.generation_config,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        eos = eos_ids(model) or ()
        print("type a message, an empty line or Ctrl-D to end", file=sys.stderr)
        while True:
            try:
                line = input("> " if sys.stdin.isatty() else "")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            ids = chat_ids(tokenizer, messages, args.path)
            while len(ids) + args.max_new_tokens > context and len(messages) > 1 + bool(args.system):
                del messages[int(bool(args.system)) : int(bool(args.system)) + 2]  # the oldest exchange goes
                ids = chat_ids(tokenizer, messages, args.path)
            shown = StopText(decode, eos=eos)

            def show(token: int, shown: StopText = shown) -> None:
                print(shown.push(token), end="", flush=True)

            result = generate(
                model, ids, args.max_new_tokens, on_token=show, sampling=sampling, decode=decode
            )
            print(shown.finish())
            messages.append({"role": "assistant", "content": result.text or ""})
    finally:
        model.close()
    return 0


def _cmd_serve_model(args: argparse.Namespace) -> int:
    from expertflow.serving.model_server import ServeOptions, require_serving_extra, serve_model

    require_serving_extra()
    _check_store_args(args)
    if args.max_model_len < 2 or args.max_batch < 1 or args.max_queue < 1:
        raise ConfigError("--max-model-len must be >= 2, --max-batch and --max-queue >= 1")
    options = ServeOptions(
        host=args.host,
        port=args.port,
        name=args.served_model_name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        schedule=args.schedule,
        max_model_len=args.max_model_len,
        byte_tokens=args.byte_tokens,
    )
    if args.plain_transformers:
        from expertflow.serving.model_server import load_plain
        from expertflow.threads import set_threads

        set_threads(args.threads)
        return serve_model(args.path, lambda context: load_plain(args.path), options)
    return serve_model(args.path, lambda context: _load(args, context), options)


def _cmd_trace(args: argparse.Namespace) -> int:
    from expertflow.model.generate import encode_prompt, generate
    from expertflow.model.tracing import RoutingRecorder
    from expertflow.pipeline.traces import save

    _check_generation_args(args)
    out_dir = Path(args.out).resolve().parent
    if not out_dir.is_dir():
        raise ConfigError(f"--out: {out_dir} is not a directory (the trace is written there after the run)")
    ids = encode_prompt(args.path, args.prompt, args.token_ids, args.byte_tokens)
    _check_ids(ids, _vocab_size(args.path), "--token-ids" if args.token_ids else "the prompt")
    with _load(args, len(ids) + args.max_new_tokens) as model:
        recorder = RoutingRecorder(model, meta={"model": str(args.path), "prompt_tokens": len(ids)})
        generate(model, ids, args.max_new_tokens, ignore_eos=True)  # a trace of the length asked for
        trace = recorder.finish()
    save(trace, args.out)
    print(f"{trace.tokens} tokens x {trace.num_layers} MoE layers (top-{trace.top_k}) -> {args.out}")
    return 0


def _add_store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda:0)")
    p.add_argument(
        "--threads",
        default="auto",
        help="torch compute threads, or auto: the physical cores, less those other processes keep busy "
        "(default: auto)",
    )
    p.add_argument("--device-slots", type=int, default=None, help="expert slots on a GPU")
    p.add_argument(
        "--host-mem",
        default=None,
        help="host buffer budget, e.g. 512MiB, or auto (default: what the memory available allows)",
    )
    p.add_argument(
        "--read-mode",
        choices=READ_MODES,
        default="auto",
        help="NVMe reads: mmap, direct (O_DIRECT), or auto: direct when not every expert fits (default)",
    )
    p.add_argument("--policy", choices=POLICIES, default="lru", help="eviction policy")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens (prompt + generated, all requests at once) the auto budget leaves room for: the KV cache "
        "and the prompt's forward pass (default: what this command's requests take)",
    )
    p.add_argument(
        "--routing",
        choices=("exact", "cache-aware"),
        default="exact",
        help="cache-aware (LOSSY): a missing expert is replaced by a resident one within --routing-margin",
    )
    p.add_argument(
        "--routing-margin",
        type=float,
        default=None,
        help=f"router-probability margin of cache-aware routing (default: {ROUTING_MARGIN})",
    )
    p.add_argument(
        "--predictor", choices=PREDICTORS, default="combined", help="expert prediction for prefetch"
    )
    p.add_argument("--remote", action="append", help="expert daemon address (repeatable), tried before NVMe")
    p.add_argument("--remote-replicas", type=int, default=1, help="servers that hold each expert")
    p.add_argument("--remote-timeout", type=float, default=5.0, help="seconds to wait for one remote expert")
    _curve_client_args(p)
    p.add_argument(
        "--trust-family",
        action="store_true",
        help="UNSAFE: run without the family check that proves the offloaded experts exact for this family",
    )


def _load(args: argparse.Namespace, context: int) -> Any:
    """``load_model`` with the command line's store options, its auto budget leaving room for ``context`` tokens
    (what the requests take) unless ``--context`` says otherwise."""
    from expertflow.model.loader import load_model

    _check_store_args(args)
    if args.trust_family:
        print(
            "WARNING: --trust-family: this family's offloaded experts are not proved exact; outputs may be wrong",
            file=sys.stderr,
        )
    from expertflow.threads import set_threads

    set_threads(args.threads)
    if args.context is not None and args.context < 1:
        raise ConfigError(f"--context must be >= 1, got {args.context}")
    config = _store_config(args).with_(context_tokens=args.context or context)
    return load_model(args.path, device=args.device, config=config, trust_family=args.trust_family)


def _add_prompt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help="prompt text (uses the checkpoint's tokenizer, or --byte-tokens)")
    p.add_argument(
        "--token-ids", help="prompt as comma-separated token ids, for checkpoints without a tokenizer"
    )
    p.add_argument("--byte-tokens", action="store_true", help="byte-level model: token id = UTF-8 byte")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature; 0 is greedy (default: the checkpoint's generation config, greedy if unset)",
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this probability mass")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling: same seed, same tokens")


def _require_bench_extra(*modules: str) -> None:
    """Check, before any work, that the optional packages a bench needs are installed."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"this benchmark needs {', '.join(missing)}: install the bench extra, pip install 'expertflow[bench]'"
        )


def _cmd_bench_tiers(args: argparse.Namespace) -> int:
    _require_bench_extra("matplotlib")
    from expertflow.lab.report import markdown_table
    from expertflow.lab.tiers import bench_tiers

    result = bench_tiers(
        model=args.model,
        preset=args.preset,
        size_bytes=parse_size(args.size),
        workdir=args.workdir,
        out_dir=args.out,
        max_experts=args.max_experts,
        concurrency=args.concurrency,
        remote=not args.no_remote,
    )
    print(markdown_table(result.rows))
    print(f"written to {args.out}/tiers.json, tiers.md, tiers.png")
    return 0


def _cmd_bench_decode(args: argparse.Namespace) -> int:
    _require_bench_extra("matplotlib", *(["accelerate"] if "accelerate" in args.contenders else []))
    from expertflow.lab.decode import (
        COLUMNS,
        bench_decode,
        default_contenders,
        parse_budgets,
        plot_decode,
        resolve_model,
    )
    from expertflow.lab.report import markdown_table

    budgets = parse_budgets(args.budgets or DEFAULT_BUDGETS)
    contenders = default_contenders(budgets, [c.strip() for c in args.contenders.split(",")])
    model = resolve_model(args.model, args.preset, args.learned_from, args.workdir)
    prompt = tuple(args.prompt.encode("utf-8")) if args.prompt else tuple(range(1, 17))
    result = bench_decode(
        model,
        budgets=budgets,
        contenders=contenders,
        prompt=prompt,
        new_tokens=args.new_tokens,
        read_mode=args.read_mode,
        memory_limit=parse_size(args.memory_limit) if args.memory_limit else None,
        repeats=args.repeats,
        workdir=args.workdir,
        llama_cpp=args.llama_cpp,
        warmup=args.warmup,
        budgets_given=args.budgets is not None,
        command="expertflow " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None,
    )
    result.write(args.out, COLUMNS)
    plot_decode(result, f"{args.out}/decode.png")
    print(markdown_table(result.rows, COLUMNS))
    print(f"written to {args.out}/decode.json, decode.md, decode.png")
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    _require_bench_extra("matplotlib", "fastapi", "uvicorn")
    from expertflow.lab.report import markdown_table
    from expertflow.lab.serve import COLUMNS, bench_serve, default_contenders, plot_serve, read_prompts

    clients = [int(c) for c in args.clients.split(",")]
    if not clients or min(clients) < 1:
        raise ConfigError("--clients takes counts >= 1, e.g. 1,4,16")
    prompts = read_prompts(args.prompts, args.byte_tokens, args.model)[: args.requests]
    common = ["--max-batch", str(args.max_batch), "--max-queue", str(max(64, args.requests))]
    common += ["--max-model-len", str(args.max_model_len)] + (["--byte-tokens"] if args.byte_tokens else [])
    result = bench_serve(
        args.model,
        prompts,
        contenders=default_contenders(args.host_mem),
        clients=clients,
        max_tokens=args.max_tokens,
        common_args=common,
        repeats=args.repeats,
    )
    result.write(args.out, COLUMNS)
    plot_serve(result, f"{args.out}/serve.png")
    print(markdown_table(result.rows, COLUMNS))
    print(f"written to {args.out}/serve.json, serve.md, serve.png")
    return 0


def _cmd_bench_policies(args: argparse.Namespace) -> int:
    _require_bench_extra("matplotlib")
    from expertflow.lab.policies import bench_policies, plot_policies
    from expertflow.lab.report import markdown_table

    result = bench_policies(
        args.trace, capacities=[int(c) for c in args.capacities.split(",")], partitioned=args.per_layer_cache
    )
    result.write(args.out)
    plot_policies(result, f"{args.out}/policies.png")
    print(markdown_table(result.rows))
    print(f"written to {args.out}/policies.json, policies.md, policies.png")
    return 0


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    from expertflow.lab.accuracy import evaluate_models, format_results, write_results

    results = evaluate_models(
        args.models,
        args.text,
        reference=args.reference,
        host_bytes=_budget(args.host_mem),
        routing_margin=args.routing_margin,
        window=args.window,
        max_tokens=args.max_tokens,
        incremental=args.incremental,
    )
    if args.out:
        command = (
            "expertflow " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "expertflow eval ppl"
        )
        write_results(args.out, command, args.text, results)
    print(json.dumps([r.as_dict() for r in results], indent=2) if args.json else format_results(results))
    return 0


def _cmd_eval_grid(args: argparse.Namespace) -> int:
    from expertflow.lab.grid import bench_grid, parse_grid, write_report
    from expertflow.lab.report import markdown_table

    grid = parse_grid(args.grid or [])  # unknown axes and values are refused before any work
    rows = bench_grid(
        args.model,
        args.tasks,
        grid,
        args.out,
        byte_tokens=args.byte_tokens,
        resume=args.resume,
        workdir=args.workdir,
        progress=sys.stderr.isatty(),
    )
    command = "expertflow " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "expertflow eval grid"
    write_report(rows, args.out, command)
    from expertflow.lab.grid import COLUMNS

    print(markdown_table(rows, COLUMNS))
    print(f"written to {args.out}/grid.jsonl, grid.md, grid.json, grid.png")
    errors = [r for r in rows if r.get("error")]
    for r in errors:
        print(f"ERROR {r['config']}: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default appended where its text does not give one already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        silent = (None, False, argparse.SUPPRESS)
        if not action.option_strings or "default" in text or action.default in silent:
            return text
        return f"{text} (default: %(default)s)"


def _finish_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--version`` on the top parser; defaults shown in the help of it and of every sub-command."""
    from expertflow._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    todo = [parser]
    while todo:
        p = todo.pop()
        p.formatter_class = _HelpFormatter
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertflow", description="Run MoE models whose experts live on disk."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="experts, sizes and files of a checkpoint: size your budgets")
    p.add_argument("path", help="Hugging Face model directory (or an ExpertFlow pack)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--read-mode", choices=READ_MODES, default="auto", help="read mode the default budget is sized for"
    )
    p.add_argument(
        "--check-family",
        action="store_true",
        help="run the family check now (proves the offloaded experts exact on a tiny instance of the family)",
    )
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("pack", help="convert to the expert-major, 4 KiB-aligned pack format")
    p.add_argument("src", help="Hugging Face model directory")
    p.add_argument("dst", help="output directory (must not exist)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--quantize",
        choices=("int4", "int8"),
        help="store the experts quantized (weight-only; non-expert weights unchanged unless --non-experts): "
        "lossy, opt-in",
    )
    p.add_argument(
        "--group-size", type=int, help="int4 group size: 32, 64, 128 (default) or 256; int8 is per channel"
    )
    p.add_argument(
        "--method",
        choices=("rtn", "hqq"),
        default="rtn",
        help="rtn: round to nearest; hqq: int4 zero points refined to minimise the weight error",
    )
    p.add_argument(
        "--non-experts",
        choices=("keep", "int8", "int4"),
        default="keep",
        help="with --quantize: also quantize the non-expert linears (attention, output head; never routers or "
        "embeddings) to leave more memory for experts: lossy, measure it with `eval ppl` (default: keep)",
    )
    p.set_defaults(func=_cmd_pack)

    p = sub.add_parser(
        "checksums",
        help="record the local copy's expert checksums, against which daemons' replies are checked",
    )
    p.add_argument("model", help="checkpoint directory")
    p.set_defaults(func=_cmd_checksums)

    p = sub.add_parser(
        "generate",
        help="generate text with experts offloaded: streams the text to stdout, a summary to stderr",
    )
    p.add_argument("path", help="Hugging Face model directory")
    _add_prompt_options(p)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="at most this many new tokens (with --prompts: for lines that give none) (default: 32)",
    )
    p.add_argument("--chat", action="store_true", help="put --prompt in the tokenizer's chat template")
    p.add_argument(
        "--stop", action="append", help="stop when the text contains this string (repeatable; not printed)"
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="do not stop at end-of-sequence (fixed-length runs)"
    )
    _add_sampling_options(p)
    p.add_argument("--json", action="store_true", help="print only the result, as one JSON document")
    p.add_argument(
        "--image",
        help="an image for the prompt (MoE vision-language models: Qwen3-VL-MoE, GLM-4.5V-MoE, "
        "ERNIE-4.5-VL-MoE); its tokens go before the prompt's text, or in place of the prompt's image token "
        "when it has one",
    )
    p.add_argument(
        "--prompts",
        help="a JSONL file of requests ({'prompt' or 'token_ids', 'id', 'max_new_tokens', 'image'} per line), "
        "run with continuous batching",
    )
    p.add_argument(
        "--schedule",
        choices=("fifo", "experts"),
        default="fifo",
        help="with --prompts: admission order; experts groups requests whose predicted experts overlap",
    )
    p.add_argument("--max-batch", type=int, default=8, help="with --prompts: requests running at once")
    _add_store_options(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "chat", help="an interactive conversation on the terminal (the tokenizer's chat template)"
    )
    p.add_argument("path", help="Hugging Face model directory with a chat template")
    p.add_argument("--system", help="a system message to start the conversation")
    p.add_argument("--max-new-tokens", type=int, default=512, help="at most this many tokens per answer")
    _add_sampling_options(p)
    _add_store_options(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser(
        "serve-model",
        help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions) with continuous batching",
    )
    p.add_argument("path", help="Hugging Face model directory (or an ExpertFlow pack)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: 8000)")
    p.add_argument("--served-model-name", help="the model id clients use (default: the directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests in the running batch (default: 8)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting; more are answered 429 (default: 64)"
    )
    p.add_argument(
        "--schedule",
        choices=("experts", "fifo"),
        default="experts",
        help="which waiting request takes a free place: the one whose predicted experts overlap the batch's "
        "most, or the oldest (default: experts)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=2048,
        help="prompt + completion tokens per request (default: 2048)",
    )
    p.add_argument("--byte-tokens", action="store_true", help="byte-level model: token id = UTF-8 byte")
    p.add_argument(
        "--plain-transformers",
        action="store_true",
        help="serve the checkpoint with plain transformers, whole model in RAM (a baseline; no store)",
    )
    _add_store_options(p)
    p.set_defaults(func=_cmd_serve_model)

    p = sub.add_parser("trace", help="record the routing of a run, for `expertflow bench policies --trace`")
    p.add_argument("path", help="Hugging Face model directory")
    _add_prompt_options(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    _add_store_options(p)
    p.set_defaults(func=_cmd_trace)

    ev = sub.add_parser("eval", help="accuracy: perplexity, and KL / top-1 agreement against a reference")
    evsub = ev.add_subparsers(dest="eval", required=True)
    p = evsub.add_parser("ppl", help="teacher-forced perplexity of a model (e.g. a quantized pack) on a text")
    p.add_argument("models", nargs="+", help="checkpoints or packs to evaluate (same tokenizer)")
    p.add_argument(
        "--text", nargs="+", required=True, help="text files, or directories of .py/.txt/.md files"
    )
    p.add_argument(
        "--reference", help="reference checkpoint (plain transformers): adds mean KL and top-1 agreement"
    )
    p.add_argument("--window", type=int, default=256, help="tokens per teacher-forced window")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="evaluate at most this many tokens of the text"
    )
    p.add_argument("--host-mem", default=None, help="host budget of the evaluated model (default: auto)")
    p.add_argument(
        "--incremental",
        action="store_true",
        help="feed each window one token at a time with the KV cache, as decoding does",
    )
    p.add_argument(
        "--routing-margin",
        type=float,
        default=None,
        help="evaluate with cache-aware routing (LOSSY) at this router-probability margin",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--out", help="directory for accuracy.json / accuracy.md (with the command)")
    p.set_defaults(func=_cmd_eval_ppl)

    p = evsub.add_parser(
        "grid", help="a task file run for every configuration of a grid: accuracy beside speed"
    )
    p.add_argument("model", help="checkpoint to evaluate (quantized variants are built from it)")
    p.add_argument(
        "--tasks", required=True, help="JSONL: {'kind': yesno|exact|ppl, 'prompt'|'text', 'answer'}"
    )
    p.add_argument(
        "--grid",
        nargs="*",
        help="axes as AXIS=V1,V2: budget (shares or auto), policy, predictor, schedule (fifo, experts), "
        "routing (exact, cache-aware:MARGIN), quantize (none, int4, int8)",
    )
    p.add_argument("--byte-tokens", action="store_true", help="byte-level model: token id = UTF-8 byte")
    p.add_argument("--out", default="benchmarks/grid", help="directory for grid.jsonl / .md / .json / .png")
    p.add_argument("--resume", action="store_true", help="keep the rows of grid.jsonl, run only the others")
    p.add_argument("--workdir", default=".bench", help="where quantized packs are built")
    p.set_defaults(func=_cmd_eval_grid)

    bench = sub.add_parser("bench", help="benchmarks: tiers, decode, policies").add_subparsers(
        dest="bench", required=True
    )
    p = bench.add_parser("tiers", help="GB/s and latency per tier vs its raw limit")
    p.add_argument("--model", help="checkpoint to read (default: build one of --preset's expert shape)")
    p.add_argument("--preset", default="olmoe-1b-7b", help="expert shape of a real model family")
    p.add_argument("--size", default="2GiB", help="bytes of experts in the built checkpoint")
    p.add_argument("--max-experts", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=4, help="reads in flight for the concurrent rows")
    p.add_argument("--no-remote", action="store_true", help="skip the remote-tier rows")
    p.add_argument("--workdir", default=".bench", help="where built checkpoints are kept")
    p.add_argument("--out", default="benchmarks", help="where JSON, Markdown and PNG go")
    p.set_defaults(func=_cmd_bench_tiers)

    p = bench.add_parser("decode", help="tokens/s across budgets and policies vs transformers and accelerate")
    p.add_argument("--model", help="checkpoint (default: build --preset)")
    p.add_argument(
        "--preset",
        default="small",
        choices=["tiny", "small", "beyond-ram", "scale", "fine-grained", "beyond-ram-learned"],
        help="random-weight Mixtrals, or beyond-ram-learned: the trained Mixtral of --learned-from with each "
        "expert widened to 42 MiB by units that add zeros (same outputs, learned routing)",
    )
    p.add_argument("--learned-from", help="a trained Mixtral checkpoint, for --preset beyond-ram-learned")
    p.add_argument(
        "--prompt", help="prompt text, as UTF-8 bytes (the presets are byte-level); default: token ids 1..16"
    )
    p.add_argument(
        "--budgets",
        default=None,
        help="host budgets as fractions of what all experts take (one slot each), or auto (the default budget) "
        f"(default: {DEFAULT_BUDGETS}, those below one token's experts left out)",
    )
    p.add_argument(
        "--contenders",
        default="transformers,accelerate,no-cache,lru,predictive",
        help="which to run, comma-separated: transformers, accelerate, llama.cpp-bf16, llama.cpp-q4_0 (with "
        "--llama-cpp), no-cache, lru, predictive; an ExpertFlow setting with -int4 / -int8 runs on a quantized pack",
    )
    p.add_argument(
        "--llama-cpp",
        metavar="DIR",
        help="a llama.cpp build (build/bin/llama-bench, llama-quantize, llama.cpp/convert_hf_to_gguf.py) for the "
        "llama.cpp contenders; see benchmarks/README.md",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of all contenders (order alternating); rows give each one's best and median run, "
        "the summary each policy over LRU at its budget, round by round",
    )
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="tokens each contender generates once before its measured run (llama-bench warms up likewise); "
        "with a budget that holds every expert, the measured run is then all resident",
    )
    p.add_argument(
        "--read-mode", choices=READ_MODES, default="auto", help="NVMe reads (default: as load_model)"
    )
    p.add_argument("--memory-limit", default=None, help="cgroup memory limit for every contender, e.g. 1GiB")
    p.add_argument("--workdir", default=".bench")
    p.add_argument("--out", default="benchmarks")
    p.set_defaults(func=_cmd_bench_decode)

    p = bench.add_parser(
        "serve",
        help="concurrent clients against serve-model: fifo vs experts beyond RAM, beside transformers",
    )
    p.add_argument("--model", required=True, help="checkpoint to serve")
    p.add_argument("--prompts", required=True, help="a requests file (JSONL, as generate --prompts takes)")
    p.add_argument("--byte-tokens", action="store_true", help="byte-level model: token id = UTF-8 byte")
    p.add_argument("--requests", type=int, default=32, help="requests per run (the file's first N)")
    p.add_argument("--clients", default="1,4,16", help="numbers of concurrent clients, one run each")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--max-batch", type=int, default=8, help="the servers' --max-batch")
    p.add_argument("--max-model-len", type=int, default=512, help="the servers' --max-model-len")
    p.add_argument("--host-mem", required=True, help="ExpertFlow's host budget: below the experts' bytes")
    p.add_argument("--repeats", type=int, default=1, help="rounds of every contender; rows keep the best")
    p.add_argument("--out", default="bench-serve", help="output directory")
    p.set_defaults(func=_cmd_bench_serve)

    p = bench.add_parser("policies", help="replay routing traces through every policy, beside Belady")
    p.add_argument("--trace", action="append", required=True, help="trace file (.npz; repeatable)")
    p.add_argument("--capacities", default="2,3,4,6", help="experts cached per layer")
    p.add_argument(
        "--per-layer-cache",
        action="store_true",
        help="one cache per layer instead of the runtime's one cache for all layers (prefetching then has no slot"
        " it may take once a layer's cache is full)",
    )
    p.add_argument("--out", default="benchmarks")
    p.set_defaults(func=_cmd_bench_policies)
    return _finish_parser(parser)


def _curve_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-server-key", help="the server's public key file (CurveZMQ)")
    p.add_argument("--curve-client-secret", help="this client's secret key file (CurveZMQ)")


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from expertflow.services.server import ServerConfig, run_server

    config = ServerConfig(
        binds=tuple(args.bind or ("tcp://127.0.0.1:5555",)),
        mem_bytes=_budget(args.mem),
        policy=args.policy,
        read_mode=args.read_mode,
        preload=args.preload,
        curve_secret=args.curve_secret,
        allow_keys=args.allow_keys,
        grace=args.grace,
        insecure=args.insecure,
        max_unsent_replies=args.max_unsent_replies,
        unsent_deadline=args.unsent_deadline,
        unsent_share=args.unsent_share,
        drop_seconds=args.drop_seconds,
        max_request_bytes=parse_size(args.max_request_bytes),
        idle_timeout=args.idle_timeout,
    )
    asyncio.run(run_server(_open_layout(args.path), config))
    return 0


def _query(args: argparse.Namespace, what: str) -> object:
    import asyncio

    from expertflow.wire.client import ExpertClient

    async def ask() -> object:
        async with ExpertClient(
            args.address,
            timeout=args.timeout,
            curve_server_key=args.curve_server_key,
            curve_client_secret=args.curve_client_secret,
        ) as client:
            return await (client.stat() if what == "stat" else client.ping())

    return asyncio.run(ask())


def _cmd_stat(args: argparse.Namespace) -> int:
    from expertflow.services.monitoring import prometheus_text

    counters = _query(args, "stat")
    assert isinstance(counters, dict)
    if args.json:
        print(json.dumps(counters, indent=2, sort_keys=True))
    elif args.prometheus:
        print(prometheus_text(counters, args.address), end="")
    else:
        width = max(map(len, counters), default=0)
        for name in sorted(counters):
            print(f"{name:<{width}}  {counters[name]}")
    return 0


def _cmd_ping(args: argparse.Namespace) -> int:
    rtt = _query(args, "ping")
    assert isinstance(rtt, float)
    print(f"{args.address}: alive, {rtt * 1e3:.2f} ms")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from expertflow.wire.keys import keygen

    public, secret = keygen(args.dir, args.name)
    print(f"public key {public} (give to the other side)\nsecret key {secret} (keep private)")
    return 0


def build_store_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertflow-store", description="Serve experts over the network.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve a checkpoint's experts from a RAM cache over ZeroMQ")
    p.add_argument("path", help="Hugging Face model directory (or an ExpertFlow pack)")
    p.add_argument(
        "--bind",
        action="append",
        help="address to listen on (repeatable), e.g. tcp://0.0.0.0:5555, ipc:///run/x",
    )
    p.add_argument(
        "--mem",
        default=None,
        help="RAM cache budget, e.g. 64GiB, or auto (default: what the memory available allows)",
    )
    p.add_argument("--preload", action="store_true", help="fill the cache at start-up")
    p.add_argument("--policy", choices=POLICIES, default="lru", help="cache eviction policy")
    p.add_argument("--read-mode", choices=READ_MODES, default="mmap", help="how the cache reads from disk")
    p.add_argument("--curve-secret", help="the server's secret key file: require CurveZMQ")
    p.add_argument("--allow-keys", help="directory of client public keys allowed in (needs --curve-secret)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight replies get on shutdown")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --bind without CURVE (only on a network you trust)",
    )
    p.add_argument(
        "--max-unsent-replies",
        type=int,
        default=256,
        help="replies one connection may leave unread before it is dropped",
    )
    p.add_argument(
        "--unsent-deadline",
        type=float,
        default=10.0,
        help="seconds an unread expert reply keeps its cache pin before its client is dropped",
    )
    p.add_argument(
        "--unsent-share",
        type=float,
        default=0.5,
        help="share of the cache that unread replies of all clients may pin together",
    )
    p.add_argument(
        "--drop-seconds", type=float, default=30.0, help="how long a dropped client's requests are ignored"
    )
    p.add_argument(
        "--max-request-bytes",
        default="64KiB",
        help="all frames of one incoming message together; a connection sending more is closed",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        help="seconds without a byte (heartbeats included) after which a connection is closed",
    )
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    p.set_defaults(func=_cmd_serve)

    for name, func, text in (
        ("stat", _cmd_stat, "print a server's counters"),
        ("ping", _cmd_ping, "check that a server answers"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("address", help="server address, e.g. tcp://memhost:5555")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
        _curve_client_args(p)
        if name == "stat":
            fmt = p.add_mutually_exclusive_group()
            fmt.add_argument("--json", action="store_true", help="JSON output")
            fmt.add_argument("--prometheus", action="store_true", help="Prometheus text exposition format")
        p.set_defaults(func=func)

    p = sub.add_parser("keygen", help="create a CurveZMQ key pair")
    p.add_argument("dir", help="directory for NAME.key and NAME.key_secret")
    p.add_argument("--name", default="server", help="file name stem (default: server)")
    p.set_defaults(func=_cmd_keygen)
    return _finish_parser(parser)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", None) or ("DEBUG" if args.verbose else "INFO")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Handler = args.func
    try:
        return func(args)
    except ExpertFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser(), argv)


def store_main(argv: Sequence[str] | None = None) -> int:
    return _run(build_store_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
