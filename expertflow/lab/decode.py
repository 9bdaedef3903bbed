"""``expertflow bench decode``: greedy decode across budgets and policies, against peers, in one run.

Every contender runs in its own subprocess (fresh page cache accounting, honest peak memory), optionally
inside a cgroup-v1 memory limit that also charges the page cache — without it, "disk offload" would be
served from RAM after the first token and the comparison would mean nothing.

Contenders: plain ``transformers`` with the whole model in RAM (the ceiling); ``accelerate`` disk offload of
the experts modules (``device_map`` + ``offload_folder``); ExpertFlow with no cache (load on demand), with
LRU, and with prediction + predictive eviction (the full system).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expertflow.errors import ConfigError
from expertflow.lab.report import BenchResult

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


@dataclass(frozen=True)
class Contender:
    """One configuration to run: a peer or an ExpertFlow setting at a host budget (fraction of expert bytes)."""

    name: str
    kind: str  # transformers | accelerate | expertflow | llama.cpp
    budget: float | str | None = None  # a share of all experts' slots, or "auto" (the default host budget)
    policy: str = "lru"
    predictor: str = "none"
    quantize: str | None = None  # "int4" / "int8": runs on a quantized pack; llama.cpp: "bf16" / "q4_0"

    @property
    def label(self) -> str:
        if self.budget is None:
            return self.name
        return (
            f"{self.name} @{self.budget}"
            if isinstance(self.budget, str)
            else f"{self.name} @{self.budget:.0%}"
        )


#: ExpertFlow settings by name, for ``--contenders``: (eviction policy, predictor).
EXPERTFLOW_SETTINGS = {
    "no-cache": ("none", "none"),
    "lru": ("lru", "none"),
    "predictive": ("predictive", "combined"),
    # What a user gets with no flag (StoreConfig's defaults): LRU eviction with prediction on.
    "default": ("lru", "combined"),
}
PEERS = {
    "transformers": Contender("transformers (RAM)", "transformers"),
    "accelerate": Contender("accelerate disk offload", "accelerate"),
    # With --llama-cpp: its own GGUF conversions, memory-mapped (llama-bench).
    "llama.cpp-bf16": Contender("llama.cpp bf16", "llama.cpp", quantize="bf16"),
    "llama.cpp-q4_0": Contender("llama.cpp Q4_0", "llama.cpp", quantize="q4_0"),
}


def default_contenders(
    budgets: Sequence[float | str],
    names: Sequence[str] = ("transformers", "accelerate", "no-cache", "lru", "predictive"),
) -> list[Contender]:
    """Peers first, then each ExpertFlow setting at each budget (a fraction, or "auto")."""
    unknown = [n for n in names if n not in PEERS and _setting(n) is None]
    if unknown:
        raise ConfigError(
            f"unknown contenders {unknown}; choose from {[*PEERS, *EXPERTFLOW_SETTINGS]}, each ExpertFlow "
            f"setting optionally on quantized experts ({', '.join(f'lru-{q}' for q in QUANTIZED_PACKS)}...)"
        )
    out = [PEERS[n] for n in names if n in PEERS]
    for b in budgets:
        for n in names:
            setting = _setting(n)
            if setting is not None:
                (policy, predictor), quantize = setting
                label = f"expertflow {n.replace('-int', ' int', 1).replace('-int', ' non-experts int')}"
                out.append(Contender(label, "expertflow", b, policy, predictor, quantize))
    return out


#: Quantized packs the decode bench builds for ``<setting>-int4`` / ``-int8`` / ``-int4-int8`` contenders (pack
#: --quantize): (bits, group size) of the experts, and of the non-expert linears (``--non-experts``) or None.
QUANTIZED_PACKS: dict[str, tuple[int, int, tuple[int, int] | None]] = {
    "int4": (4, 128, None),
    "int8": (8, 0, None),
    # Like a llama.cpp Q4_0 file, everything quantized: int4 experts, int8 attention and output head.
    "int4-int8": (4, 128, (8, 0)),
}


def _setting(name: str) -> tuple[tuple[str, str], str | None] | None:
    """``lru`` -> (("lru", "none"), None); ``lru-int4`` -> (("lru", "none"), "int4"); unknown -> None."""
    base, _, quantize = name.partition("-int")
    quantize = f"int{quantize}" if quantize else ""
    if base not in EXPERTFLOW_SETTINGS or (quantize and quantize not in QUANTIZED_PACKS):
        return None
    return EXPERTFLOW_SETTINGS[base], quantize or None


def quantized_pack(
    model_dir: str | Path, quantize: str, workdir: str | Path, log: Callable[[str], None] = print
) -> Path:
    """Build (once) the ``quantize`` pack of ``model_dir`` under ``workdir``; its path."""
    from expertflow.model.quantize_pack import pack_quantized
    from expertflow.quant.scheme import QuantScheme

    bits, group, others = QUANTIZED_PACKS[quantize]
    scheme = QuantScheme(bits, group)
    non_experts = QuantScheme(*others) if others else None
    name = scheme.name + (f"-non-experts-{non_experts.name}" if non_experts else "")
    # Keyed by what it is built from, not by the folder's name: two checkpoints both named "vlm", or one
    # rebuilt in place, never share a pack.
    root = Path(workdir) / f"{Path(model_dir).name}-{name}-{source_digest(model_dir, name)}"
    if not (root / "expertflow-manifest.json").is_file():
        log(f"quantizing {model_dir} to {root} ({name}, once)")
        pack_quantized(model_dir, root, scheme, progress=False, non_experts=non_experts)
    return root


def parse_budgets(text: str) -> list[float | str]:
    """``"auto,0.5,0.25"`` -> ``["auto", 0.5, 0.25]``."""
    out: list[float | str] = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(part if part == "auto" else float(part))
        except ValueError:
            raise ConfigError(f"a budget is a share of all experts' slots or 'auto', got {part!r}") from None
    return out


@dataclass
class WorkerSpec:
    model: str
    contender: dict[str, Any]
    prompt: list[int]
    new_tokens: int
    read_mode: str = "direct"
    offload_dir: str = ""
    host_bytes: int | None = None
    warmup: int = 0  # tokens generated once before the measured run (llama-bench warms up likewise)
    extra: dict[str, Any] = field(default_factory=dict)


# --- the worker (runs in the subprocess) ------------------------------------------------------------------


def _experts_device_map(model: Any) -> dict[str, str]:
    """accelerate device_map: every experts module on "disk", everything else on the CPU."""

    def is_experts(mod: Any) -> bool:
        p = getattr(mod, "gate_up_proj", None)
        return p is not None and getattr(p, "ndim", 0) == 3

    def has_experts(mod: Any) -> bool:
        return any(is_experts(m) for m in mod.modules())

    dm: dict[str, str] = {}

    def assign(prefix: str, mod: Any) -> None:
        if is_experts(mod):
            dm[prefix] = "disk"
        elif not has_experts(mod):
            dm[prefix] = "cpu"
        else:
            for name, child in mod.named_children():
                assign(f"{prefix}.{name}" if prefix else name, child)
            for name, _ in mod.named_parameters(recurse=False):
                dm[f"{prefix}.{name}" if prefix else name] = "cpu"

    assign("", model)
    return dm


def _split(result: Any, decode: dict[str, Any], steps: int) -> dict[str, float]:
    total = 1e3 * result.decode_seconds / steps
    kernels = 1e3 * decode.get("experts_compute_seconds", 0.0) / steps
    stall = 1e3 * decode.get("stall_seconds", 0.0) / steps
    module = 1e3 * decode.get("experts_module_seconds", 0.0) / steps
    return {
        "store_ms_per_token": max(0.0, module - kernels - stall),
        "rest_ms_per_token": max(0.0, total - module),
    }


def run_worker(spec: WorkerSpec) -> dict[str, Any]:
    """Load the contender's model, decode, return the measurements (called inside the subprocess)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from expertflow.model.generate import generate

    torch.set_num_threads(os.cpu_count() or 1)
    c = Contender(**spec.contender)
    t0 = time.perf_counter()
    if c.kind == "transformers":
        model = AutoModelForCausalLM.from_pretrained(spec.model, dtype="auto").eval()
    elif c.kind == "accelerate":
        config = AutoConfig.from_pretrained(spec.model)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        device_map = _experts_device_map(skeleton)
        del skeleton
        model = AutoModelForCausalLM.from_pretrained(
            spec.model, dtype="auto", device_map=device_map, offload_folder=spec.offload_dir
        ).eval()
    else:
        from expertflow.config import StoreConfig
        from expertflow.model.loader import load_model

        model = load_model(
            spec.model,
            config=StoreConfig(
                host_bytes=spec.host_bytes,
                policy=c.policy,  # type: ignore[arg-type]
                predictor=c.predictor,  # type: ignore[arg-type]
                read_mode=spec.read_mode,  # type: ignore[arg-type]
                # The request's own context, as llama-bench sizes its KV cache for n_prompt + n_gen.
                context_tokens=len(spec.prompt) + spec.new_tokens,
            ),
        )
    load_seconds = time.perf_counter() - t0
    if spec.warmup:
        generate(model, spec.prompt, spec.warmup, ignore_eos=True)
    result = generate(model, spec.prompt, spec.new_tokens, ignore_eos=True)  # fixed length, as llama-bench
    steps = max(1, result.new_tokens - 1)
    decode = result.decode_stats or {}
    out = {
        "label": c.label,
        "contender": asdict(c),
        "load_seconds": load_seconds,
        "tokens_per_second": result.tokens_per_second,
        "ms_per_token": 1e3 / result.tokens_per_second if result.tokens_per_second else None,
        "prefill_seconds": result.prefill_seconds,
        "new_tokens": result.new_tokens,
        "tokens": result.tokens,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "stats": result.stats,
        "decode_stats": result.decode_stats,
        "prefill_tokens_per_second": len(spec.prompt) / result.prefill_seconds
        if result.prefill_seconds
        else None,
        "experts_compute_ms_per_token": (
            1e3 * decode.get("experts_compute_seconds", 0.0) / steps if decode else None
        ),
        # A token's time split: experts' kernels, waiting for reads, the store's and experts module's own work
        # (everything else in the offloaded experts modules), and the rest of the model.
        **(_split(result, decode, steps) if decode else {}),
        "prediction": result.prediction,
        "budget_reason": result.budget,
        "host_MiB": model.expert_store.budget.host_bytes / 2**20 if hasattr(model, "expert_store") else None,
        "host_fraction": (
            model.expert_store.budget.host_bytes / model.expert_store.layout.expert_bytes
            if hasattr(model, "expert_store")
            else None
        ),
    }
    close = getattr(model, "close", None)
    if callable(close):
        close()
    return out


# --- checkpoints the decode bench builds -----------------------------------------------------------------

# Mixtral-architecture presets (random weights, built once with transformers' save_pretrained).
DECODE_PRESETS: dict[str, dict[str, Any]] = {
    # For tests: builds in a second.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_local_experts=4, dtype="float32"
    ),
    # make demo / quick runs: 192 MiB of fp32 experts (fp32: exact comparison with transformers is meaningful).
    "small": dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_local_experts=8, dtype="float32"
    ),
    # DESIGN.md's peer baseline shape: 1.4 GB of bf16 experts, meant to run under a memory cgroup.
    "beyond-ram": dict(
        hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_local_experts=8, dtype="bfloat16"
    ),
    # A model nine times a 1 GiB machine: 9.3 GB of bf16, 256 experts of 33 MiB, a 32k vocabulary (a real
    # model's embedding and output head, 131 MB each).
    "scale": dict(
        hidden_size=2048,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_local_experts=32,
        vocab_size=32000,
        num_attention_heads=16,
        num_key_value_heads=4,
        dtype="bfloat16",
    ),
    # Fine-grained, as OLMoE and Qwen3-MoE are: 64 small experts a layer, 8 of them a token, over 16 layers
    # (128 expert calls a token, where the Mixtral shapes make 16). 3.2 GB of bf16 experts; int4 fits in RAM.
    "fine-grained": dict(
        hidden_size=1024,
        intermediate_size=512,
        num_hidden_layers=16,
        num_local_experts=64,
        num_experts_per_tok=8,
        vocab_size=32000,
        num_attention_heads=16,
        num_key_value_heads=4,
        dtype="bfloat16",
    ),
}


def build_preset(name: str, workdir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Build (once) a random-weight Mixtral checkpoint of preset ``name`` under ``workdir``."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    params = dict(DECODE_PRESETS[name])
    dtype = getattr(torch, params.pop("dtype"))
    root = Path(workdir) / f"mixtral-{name}"
    if _built(root):
        return root
    log(f"building the {name} checkpoint in {root} (once)")
    params.setdefault("vocab_size", 256)
    params.setdefault("num_attention_heads", 8 if params["hidden_size"] >= 256 else 4)
    params.setdefault("num_key_value_heads", 2)
    params.setdefault("num_experts_per_tok", 2)
    config = MixtralConfig(max_position_embeddings=1024, **params)
    torch.manual_seed(0)
    # Built in its own dtype: a float32 copy of the scale preset would need 19 GB.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cpu"):
            model = MixtralForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = dtype
    with torch.no_grad():
        for p in model.parameters():  # random, non-degenerate routing and experts
            if p.ndim >= 2:
                p.normal_(0.0, 0.05)
    return _save_checkpoint(model, root)


def source_digest(model_dir: str | Path, settings: str) -> str:
    """12 hex digits naming a build from ``model_dir`` with ``settings``: the checkpoint's config.json, and each
    weight file's name, size, modification time and first and last 4 KiB. A different checkpoint, or the same
    folder rewritten, gives another digest."""
    root = Path(model_dir)
    h = hashlib.sha256(settings.encode())
    h.update((root / "config.json").read_bytes())
    for file in sorted(root.glob("*.safetensors")):
        st = file.stat()
        h.update(f"{file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(file, "rb") as f:
            h.update(f.read(4096))
            f.seek(max(0, st.st_size - 4096))
            h.update(f.read(4096))
    return h.hexdigest()[:12]


def _built(root: Path) -> bool:
    """Whether a bench checkpoint was already built at ``root`` (it is moved there only once complete)."""
    return (root / "config.json").is_file() and any(root.glob("*.safetensors"))


def _save_checkpoint(model: Any, root: Path) -> Path:
    """``save_pretrained`` into a side folder moved to ``root`` once complete; nothing partial is left."""
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted build
    try:
        model.save_pretrained(tmp, max_shard_size="400MB")
        shutil.rmtree(root, ignore_errors=True)  # an incomplete earlier build
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


#: Presets widened from a trained Mixtral (``--learned-from``): its learned routing, experts as large as a big
#: model's. 57,344 hidden units per expert: 42 MiB of bf16 per expert, 1.3 GiB for a 4-layer, 8-expert model.
LEARNED_PRESETS: dict[str, dict[str, Any]] = {
    "beyond-ram-learned": dict(intermediate_size=57344, dtype="bfloat16"),
}


def widen_experts(
    source: str | Path, dest: str | Path, intermediate_size: int, dtype: str = "bfloat16", seed: int = 0
) -> Path:
    """Save a copy of the Mixtral checkpoint ``source`` whose experts have ``intermediate_size`` hidden units.

    The added units have random input weights and zero output weights, so they add exact zeros: the copy
    computes what the source computes (in the same dtype) and routes as it learned to, while every expert
    read moves as many bytes as a big model's. Routing beyond RAM can then be real, not random.
    """
    import torch
    from transformers import MixtralForCausalLM

    try:
        model_type = json.loads((Path(source) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{source} is not a checkpoint directory with a config.json ({exc})") from None
    if model_type != "mixtral":
        raise ConfigError(f"{source}: widening is built for Mixtral checkpoints, not {model_type!r}")
    model = MixtralForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    config = model.config
    narrow = config.intermediate_size
    if intermediate_size < narrow:
        raise ConfigError(
            f"{source}: experts have {narrow} hidden units; cannot widen them to {intermediate_size}"
        )
    state = model.state_dict()
    del model
    g = torch.Generator().manual_seed(seed)
    extra = intermediate_size - narrow
    widened = 0
    for name, t in state.items():
        if name.endswith("experts.gate_up_proj"):  # [experts, 2 * units, hidden]: gate rows, then up rows
            gate, up = t.chunk(2, dim=1)
            pad = [torch.randn(t.shape[0], extra, t.shape[2], generator=g) * 0.05 for _ in range(2)]
            state[name] = torch.cat([gate, pad[0], up, pad[1]], dim=1)
            widened += 1
        elif name.endswith(
            "experts.down_proj"
        ):  # [experts, hidden, units]: the added units' outputs are zero
            state[name] = torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], extra)], dim=2)
    if not widened:
        raise ConfigError(f"{source}: no fused experts (experts.gate_up_proj) found to widen")
    config.intermediate_size = intermediate_size
    with torch.device("meta"):
        wide = MixtralForCausalLM(config)
    wide.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in state.items()}, assign=True)
    wide.config.dtype = dtype
    return _save_checkpoint(wide, Path(dest))


def resolve_model(model: str | None, preset: str, learned_from: str | None, workdir: str | Path) -> str:
    """The checkpoint a decode bench runs: ``model`` as given, else the preset, built once under ``workdir``
    (a learned preset widens the trained Mixtral at ``learned_from``)."""
    if learned_from and (model or preset not in LEARNED_PRESETS):
        raise ConfigError(
            f"--learned-from applies to --preset {', '.join(LEARNED_PRESETS)} (without --model)"
        )
    if model:
        return model
    if preset in LEARNED_PRESETS:
        if not learned_from:
            raise ConfigError(f"--preset {preset} widens a trained Mixtral: give it with --learned-from DIR")
        return str(build_learned_preset(preset, learned_from, workdir))
    return str(build_preset(preset, workdir))


def build_learned_preset(
    name: str, source: str | Path, workdir: str | Path, log: Callable[[str], None] = print
) -> Path:
    """Build (once) preset ``name`` of :data:`LEARNED_PRESETS` from the trained Mixtral at ``source``."""
    params = LEARNED_PRESETS[name]
    root = Path(workdir) / f"mixtral-{name}-{source_digest(source, json.dumps(params, sort_keys=True))}"
    if _built(root):
        return root
    log(f"building the {name} checkpoint in {root} from {source} (once)")
    return widen_experts(source, root, params["intermediate_size"], params["dtype"])


# --- the driver --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int | None) -> Iterator[Path | None]:
    """A fresh cgroup-v1 memory group limited to ``limit_bytes`` (page cache included), removed afterwards."""
    if limit_bytes is None:
        yield None
        return
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        raise RuntimeError("a memory limit needs the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    group = CGROUP_ROOT / f"expertflow-bench-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        yield group
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_contender(spec: WorkerSpec, *, limit_bytes: int | None, timeout: float) -> dict[str, Any]:
    """Run one ExpertFlow or transformers/accelerate contender in a subprocess (inside the memory cgroup when
    limited); returns its JSON."""
    cmd = [sys.executable, "-m", "expertflow.lab.decode", "--worker", json.dumps(asdict(spec))]
    proc, peak_group = run_limited(cmd, limit_bytes=limit_bytes, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {
            "label": Contender(**spec.contender).label,
            "contender": spec.contender,
            "error": _failure(proc),
        }
    out = json.loads(lines[-1])
    out["peak_cgroup_bytes"] = peak_group
    return out


def run_limited(
    cmd: Sequence[str], *, limit_bytes: int | None, timeout: float
) -> tuple[subprocess.CompletedProcess[str], int | None]:
    """Run ``cmd`` after dropping the page cache, inside a fresh memory cgroup of ``limit_bytes`` (page cache
    charged) when given; the finished process and the group's peak usage."""
    drop_caches()
    with memory_cgroup(limit_bytes) as group:

        def enter_group() -> None:
            if group is not None:
                (group / "cgroup.procs").write_text(str(os.getpid()))

        proc = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=enter_group,
            check=False,
        )
        peak_group = None
        if group is not None:
            with contextlib.suppress(OSError):
                peak_group = int((group / "memory.max_usage_in_bytes").read_text())
    return proc, peak_group


def _failure(proc: subprocess.CompletedProcess[str]) -> str:
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
    return f"exit {proc.returncode}{killed}: {' | '.join(tail)}"


def run_llama_cpp(
    cpp: Any,
    gguf: Path,
    c: Contender,
    *,
    prompt_tokens: int,
    new_tokens: int,
    limit_bytes: int | None,
    timeout: float,
) -> dict[str, Any]:
    """One llama.cpp row: ``llama-bench`` on ``gguf`` inside the same memory limit as the other contenders.

    Q4_0 is repacked into anonymous memory at load unless told not to; under a limit that cannot hold that copy
    beside the file's pages it would be killed, so there it runs file-backed (``--repack 0``) and the row says so.
    """
    from expertflow.lab.llamacpp import parse_bench

    repack = c.quantize != "bf16" and (limit_bytes is None or 2 * gguf.stat().st_size < limit_bytes)
    cmd = cpp.bench_command(gguf, prompt_tokens, new_tokens, repack=repack)
    proc, peak_group = run_limited(cmd, limit_bytes=limit_bytes, timeout=timeout)
    row: dict[str, Any] = {"label": c.label, "contender": asdict(c), "command": " ".join(cmd)}
    if proc.returncode != 0:
        return {**row, "error": _failure(proc)}
    try:
        row.update(parse_bench(proc.stdout))
    except ValueError as exc:
        return {**row, "error": str(exc)}
    row["ms_per_token"] = 1e3 / row["tokens_per_second"]
    row["repack"] = repack
    row["gguf_bytes"] = gguf.stat().st_size
    row["peak_cgroup_bytes"] = peak_group
    return row


def _check_budgets(
    contenders: Sequence[Contender],
    models: dict[str | None, tuple[str, int]],
    read_mode: str,
    given: bool,
    result: BenchResult,
    log: Callable[[str], None],
) -> list[Contender]:
    """The contenders whose budget holds one token's experts. A budget below that (every row of it would be
    an error) is refused before any contender runs when the caller gave it, and left out, saying so, when it
    is one of the default budgets."""
    from expertflow.pipeline.planner import budget_sizes
    from expertflow.tiers.safetensors_index import open_checkpoint

    kept = []
    for c in contenders:
        if c.kind == "expertflow" and isinstance(c.budget, float):
            path, all_slots = models[c.quantize]
            minimum = budget_sizes(open_checkpoint(path), read_mode)["minimum"]
            if minimum is not None and int(all_slots * c.budget) < minimum:
                why = f"one token's experts take {minimum / all_slots:.3f} of all experts"
                if given:
                    raise ConfigError(
                        f"budget {c.budget:g} of {c.label} is below this model's minimum: {why}; give --budgets "
                        "at or above it"
                    )
                note = f"{c.label}: left out, the default budget {c.budget:g} is below this model's minimum ({why})"
                result.notes.append(note)
                log(note)
                continue
        kept.append(c)
    return kept


def bench_decode(
    model_dir: str,
    *,
    budgets: Sequence[float | str] = (1.0, 0.5, 0.25, 0.1),
    contenders: Sequence[Contender] | None = None,
    prompt: Sequence[int] = tuple(range(1, 17)),
    new_tokens: int = 32,
    read_mode: str = "direct",
    memory_limit: int | None = None,
    repeats: int = 1,
    workdir: str | Path = ".bench",
    timeout: float = 1800.0,
    llama_cpp: str | Path | None = None,
    command: str | None = None,
    warmup: int = 0,
    budgets_given: bool = True,
    log: Callable[[str], None] = print,
) -> BenchResult:
    """Every contender on the same checkpoint and prompt; rows with tokens/s, stall, bytes, bound, efficiency.

    A budget below one token's experts is refused when ``budgets_given``, else left out with a note.

    With ``repeats`` > 1 the contenders run that many rounds (order alternating, see :func:`round_order`); each
    row is a contender's fastest run (this machine's noise only ever slows a run down) with the median of its
    runs, and the summary compares each policy with LRU at its budget round by round (:func:`paired_ratios`).
    """
    from expertflow.tiers.safetensors_index import open_checkpoint

    layout = open_checkpoint(model_dir)
    contenders = list(contenders or default_contenders(budgets))
    offload = Path(workdir) / "accelerate-offload"
    offload.mkdir(parents=True, exist_ok=True)
    files = sorted({t.file for s in layout.experts.values() for t in s.tensors})
    drop_caches()
    rate_before = _dd_rate(layout, files)
    result = BenchResult("decode", [])
    if command:
        result.notes.append(f"command: `{command}`")
    load_before = os.getloadavg()
    result.notes.append(
        f"checkpoint {model_dir}: {layout.model_type}, {len(layout.experts)} experts, "
        f"{layout.expert_bytes / 2**20:.1f} MiB of experts, {layout.non_expert_bytes / 2**20:.1f} MiB non-expert"
    )
    if memory_limit:
        result.notes.append(
            f"every contender but the RAM ceiling ran in a memory cgroup of {memory_limit / 2**20:.0f} MiB (page cache included)"
        )
    if warmup:
        result.notes.append(
            f"each ExpertFlow and transformers contender generated {warmup} tokens once before its measured run, "
            "in the same process (llama-bench runs its own warmup)"
        )
    if repeats > 1:
        result.notes.append(
            f"contenders ran round-robin {repeats} times, in the given order and reversed alternately; each row "
            "is its fastest run, with the median of its runs beside it; the summary gives each policy's tok/s "
            "over LRU's at the same budget, round by round"
        )
    # A budget is a share of what holding every expert takes (one slot each), so 100% means "all fit".
    from expertflow.pipeline.planner import all_experts_bytes

    models: dict[str | None, tuple[str, int]] = {None: (model_dir, all_experts_bytes(layout, read_mode))}
    ggufs: dict[str, Path] = {}
    cpp = None
    if any(c.kind == "llama.cpp" for c in contenders):
        from expertflow.lab.llamacpp import LlamaCpp

        if llama_cpp is None:
            raise ConfigError("llama.cpp contenders need a llama.cpp build: give it with --llama-cpp DIR")
        cpp = LlamaCpp.at(llama_cpp)
        for c in contenders:
            if c.kind == "llama.cpp" and c.quantize not in ggufs:
                gguf = ggufs[str(c.quantize)] = cpp.gguf(model_dir, str(c.quantize), workdir, log)
                result.notes.append(
                    f"llama.cpp {c.quantize} GGUF {gguf}: {gguf.stat().st_size / 2**20:.1f} MiB, converted with "
                    f"{cpp.convert.name}{'' if c.quantize == 'bf16' else ' and ' + cpp.quantize.name}"
                )
    for c in contenders:
        if c.kind == "expertflow" and c.quantize is not None and c.quantize not in models:
            pack = quantized_pack(model_dir, c.quantize, workdir, log)
            q = open_checkpoint(pack)
            models[c.quantize] = (str(pack), all_experts_bytes(q, read_mode))
            result.notes.append(
                f"{c.quantize} pack {pack}: {q.expert_bytes / 2**20:.1f} MiB of experts "
                f"({q.expert_bytes / layout.expert_bytes:.2f}x), built by `expertflow pack --quantize`"
            )
    contenders = _check_budgets(contenders, models, read_mode, budgets_given, result, log)
    best: dict[str, dict[str, Any]] = {}
    rounds: list[dict[str, float]] = []  # per round, each contender's tok/s (for medians and paired ratios)
    for i in range(max(1, repeats)):
        rounds.append({})
        for c in round_order(contenders, i):
            if c.kind == "llama.cpp":
                log(f"running {c.label} ...")
                row = run_llama_cpp(
                    cpp,
                    ggufs[str(c.quantize)],
                    c,
                    prompt_tokens=len(prompt),
                    new_tokens=new_tokens,
                    limit_bytes=memory_limit,
                    timeout=timeout,
                )
                log(f"  {row['tokens_per_second']:.2f} tok/s" if "error" not in row else f"  {row['error']}")
                _keep(best, rounds[-1], row)
                continue
            path, all_slots = models[c.quantize]
            host = None if not isinstance(c.budget, float) else int(all_slots * c.budget)
            spec = WorkerSpec(
                path, asdict(c), list(prompt), new_tokens, read_mode, str(offload), host, warmup
            )
            log(f"running {c.label} ...")
            # The RAM ceiling is the compute time the bound uses; it is run without the memory limit.
            row = run_contender(
                spec, limit_bytes=None if c.kind == "transformers" else memory_limit, timeout=timeout
            )
            log(f"  {row['tokens_per_second']:.2f} tok/s" if "error" not in row else f"  {row['error']}")
            _keep(best, rounds[-1], row)
    result.rows = [best[c.label] for c in contenders]
    for row in result.rows:
        runs = [r[row["label"]] for r in rounds if row["label"] in r]
        row["tokens_per_second_runs"] = runs
        row["median_tokens_per_second"] = statistics.median(runs) if runs else None
    bandwidth = _device_rate(layout, files, rate_before, result)
    ceiling = next(
        (r for r in result.rows if r["contender"]["kind"] == "transformers" and "error" not in r), None
    )
    compute_s = 1 / ceiling["tokens_per_second"] if ceiling and ceiling["tokens_per_second"] else None
    for row in result.rows:
        # The ceiling's compute time is that of the model's own dtype: no bound for quantized experts.
        quantized = (row.get("contender") or {}).get("quantize") is not None
        _add_bound(row, None if quantized else compute_s, bandwidth)
        if ceiling is not None and "tokens" in row:
            row["same_tokens_as_transformers"] = row["tokens"] == ceiling["tokens"]
    result.summary = _summary(result.rows)
    result.summary.update(paired_ratios(contenders, rounds))
    result.notes.append(
        "load average (1, 5, 15 min) before the run "
        f"{', '.join(f'{x:.2f}' for x in load_before)}; after {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    return result


def _keep(best: dict[str, dict[str, Any]], this_round: dict[str, float], row: dict[str, Any]) -> None:
    """Record a run: its tok/s in this round, and the row if it is the contender's fastest so far.

    Prefill (one prompt's forward, a fraction of a second) is kept as the best over the runs too, on its own:
    the run with the fastest decode may have had its prompt slowed by a hiccup of the machine."""
    label = row["label"]
    if "error" not in row:
        this_round[label] = row["tokens_per_second"]
    kept = best.get(label)
    prefills = [
        r["prefill_tokens_per_second"]
        for r in (kept, row)
        if r is not None and "error" not in r and r.get("prefill_tokens_per_second")
    ]
    if kept is None or "error" in kept or row.get("tokens_per_second", 0) > kept.get("tokens_per_second", 0):
        best[label] = row
    if prefills:
        best[label]["prefill_tokens_per_second"] = max(prefills)


def round_order(contenders: Sequence[Contender], i: int) -> list[Contender]:
    """The order of round ``i``: as given, then reversed, alternately, so no contender always runs first.

    A round's runs follow each other within seconds, and this machine's disk and CPU drift over a minute; with
    one fixed order, a drift (or what one run leaves behind) would favour the same contender every round."""
    return list(contenders) if i % 2 == 0 else list(reversed(contenders))


def paired_ratios(contenders: Sequence[Contender], rounds: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Each ExpertFlow contender against LRU at the same budget, round by round: the median ratio and its range.

    Contenders of one round run back to back, so a ratio within a round cancels the slow drift of this
    machine's speed (runs of one configuration spread by 20-40 %), which comparing best or median runs does not.
    """

    def is_lru(c: Contender) -> bool:
        return c.kind == "expertflow" and (c.policy, c.predictor) == EXPERTFLOW_SETTINGS["lru"]

    out: dict[str, Any] = {}
    for c in contenders:
        if c.kind != "expertflow" or is_lru(c):
            continue
        ref = next(
            (r for r in contenders if is_lru(r) and (r.budget, r.quantize) == (c.budget, c.quantize)), None
        )
        if ref is None:
            continue
        ratios = sorted(r[c.label] / r[ref.label] for r in rounds if c.label in r and r.get(ref.label))
        if ratios:
            out[f"{c.label} / {ref.label} (paired)"] = {
                "median": round(statistics.median(ratios), 3),
                "min": round(ratios[0], 3),
                "max": round(ratios[-1], 3),
                "rounds": len(ratios),
                "rounds_at_or_above": sum(x >= 1 for x in ratios),
            }
    return out


def _dd_rate(layout: Any, files: list[str]) -> Any:
    """The disk's best rate with large direct reads: one stream and as many as the store keeps in flight."""
    from expertflow.config import StoreConfig
    from expertflow.lab.tiers import dd_direct

    block = max(4 << 20, layout.max_expert_nbytes)
    streams = StoreConfig().max_concurrent_reads
    return _best(dd_direct(files, block), dd_direct(files, block, streams))


def _device_rate(layout: Any, files: list[str], before: Any, result: BenchResult) -> float | None:
    """The fastest read rate the device showed in this run (bytes/s), recorded in the notes."""
    import random

    from expertflow.config import StoreConfig
    from expertflow.lab.tiers import read_experts
    from expertflow.tiers.nvme import NvmeTier

    # Disk speed varies between runs here (0.55-2 GB/s): measure again and keep the best rate, so the
    # bound stays a lower bound.
    drop_caches()
    after = _dd_rate(layout, files)
    streams = StoreConfig().max_concurrent_reads
    # The store's own pattern: experts in random order, re-read, aligned reads in flight. The virtual disks
    # of small cloud machines are bursty (1.2-3.2 GB/s from one pass to the next), so the bound uses the best
    # of several passes: the rate the device demonstrably delivers.
    drop_caches()
    with NvmeTier(layout, "direct") as tier:
        sample = layout.keys()[: max(1, (1 << 30) // max(1, layout.max_expert_nbytes))]
        passes = []
        for seed in range(3):
            order = list(sample)
            random.Random(seed).shuffle(order)
            passes.append(read_experts(tier, order, streams))
        qd = max(passes, key=lambda t: t.gbps)
    rates = [t.gbps for t in (before, after, qd) if t is not None]
    bandwidth = max(rates) * 1e9 if rates else None
    result.notes.append(
        f"device read rate: dd (best of 1 and {streams} streams) before/after the run "
        f"{before.gbps if before else float('nan'):.2f} / {after.gbps if after else float('nan'):.2f} GB/s, "
        f"{streams} aligned O_DIRECT reads in flight (best of 3 shuffled passes) {qd.gbps:.2f} GB/s; "
        f"the bound uses the fastest ({(bandwidth or 0) / 1e9:.2f} GB/s)"
    )
    return bandwidth


def _best(*timings: Any) -> Any:
    """The fastest of some ``Timing`` measurements (None where one could not be taken)."""
    found = [t for t in timings if t is not None]
    return max(found, key=lambda t: t.gbps) if found else None


def _add_bound(row: dict[str, Any], compute_s: float | None, bandwidth: float | None) -> None:
    # Per-token figures cover decode only (after the first token), as tokens/s does: the prefill reads
    # every expert once, and counting it per decoded token would inflate bytes and the bound.
    stats = row.get("decode_stats") or {}
    tokens = max(1, row.get("new_tokens", 1) - 1)
    bytes_read = sum((stats.get("bytes_read") or {}).values())
    row["MiB_read_per_token"] = bytes_read / tokens / 2**20 if stats else None
    row["stall_ms_per_token"] = 1e3 * stats.get("stall_seconds", 0.0) / tokens if stats else None
    row["hit_rate"] = stats.get("hit_rate") if stats else None
    if compute_s is None or not row.get("tokens_per_second"):
        return
    io_s = bytes_read / tokens / bandwidth if bandwidth and stats else 0.0
    bound = max(compute_s, io_s)
    row["bound_ms_per_token"] = 1e3 * bound
    row["overlap_efficiency"] = bound * row["tokens_per_second"]


#: Which llama.cpp format an ExpertFlow contender is compared with: equal bits per weight, near enough.
_EQUAL_BITS = {None: "bf16", "int4": "q4_0", "int4-int8": "q4_0", "int8": None}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each ExpertFlow row over accelerate, and over llama.cpp at equal bits (bf16 with bf16, int4 with Q4_0)."""
    by = {r["label"]: r for r in rows if "error" not in r}
    acc = next((r for r in by.values() if r["contender"]["kind"] == "accelerate"), None)
    cpp = {r["contender"]["quantize"]: r for r in by.values() if r["contender"]["kind"] == "llama.cpp"}
    out: dict[str, Any] = {}
    for label, r in by.items():
        if r["contender"]["kind"] != "expertflow":
            continue
        if acc and acc["tokens_per_second"]:
            out[f"{label} / accelerate"] = round(r["tokens_per_second"] / acc["tokens_per_second"], 2)
        peer = cpp.get(_EQUAL_BITS.get(r["contender"].get("quantize")))
        if peer and peer["tokens_per_second"]:
            out[f"{label} / {peer['label']}"] = round(r["tokens_per_second"] / peer["tokens_per_second"], 2)
    return out


COLUMNS = [
    "label",
    "tokens_per_second",
    "median_tokens_per_second",
    "ms_per_token",
    "stall_ms_per_token",
    "experts_compute_ms_per_token",
    "store_ms_per_token",
    "rest_ms_per_token",
    "prefill_tokens_per_second",
    "MiB_read_per_token",
    "hit_rate",
    "bound_ms_per_token",
    "overlap_efficiency",
    "peak_rss_bytes",
    "peak_cgroup_bytes",
    "same_tokens_as_transformers",
    "host_MiB",
]


def plot_decode(result: BenchResult, path: str | Path) -> Path:
    """tokens/s vs host budget per policy, with the peers as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in result.rows:
        if "error" in r:
            continue
        c = r["contender"]
        if c["kind"] == "expertflow":
            # An "auto" budget is plotted at the budget it chose.
            share = c["budget"] if isinstance(c["budget"], float) else r.get("host_fraction", 0.0)
            series.setdefault(c["name"], []).append((100 * share, r["tokens_per_second"]))
        else:
            ax.axhline(
                r["tokens_per_second"],
                linestyle="--",
                linewidth=1,
                label=c["name"],
                color="gray" if c["kind"] == "transformers" else "red",
            )
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("host budget (% of expert bytes)")
    ax.set_ylabel("tokens/s")
    ax.set_title("Greedy decode throughput vs memory budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    args = parser.parse_args(argv)
    spec = WorkerSpec(**json.loads(args.worker))
    print(json.dumps(run_worker(spec), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
