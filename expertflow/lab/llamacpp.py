"""llama.cpp as a decode-bench contender, run from a build the user points at (``--llama-cpp ROOT``).

The checkpoint is converted with llama.cpp's own ``convert_hf_to_gguf.py`` (bf16), quantized with its
``llama-quantize`` (Q4_0), and measured with its ``llama-bench`` inside the same memory cgroup as every other
contender. How to build llama.cpp on these machines: ``benchmarks/README.md``. Nothing of llama.cpp is shipped
or imported here; it is a separate program, run as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertflow.errors import ConfigError

#: llama.cpp formats the bench runs: contender suffix -> (llama-quantize type, or None for the converter's bf16).
GGUF_TYPES: dict[str, str | None] = {"bf16": None, "q4_0": "Q4_0"}

_TOKENIZER_SCRIPT = """
import sys, sentencepiece as spm
text, prefix, vocab, fallback = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
spm.SentencePieceTrainer.train(
    input=text, model_prefix=prefix, vocab_size=vocab, model_type="bpe", byte_fallback=fallback,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, hard_vocab_limit=False,
    minloglevel=2,
)
"""


@dataclass(frozen=True)
class LlamaCpp:
    """Where a llama.cpp build keeps what the bench runs."""

    root: Path
    bench: Path
    quantize: Path
    convert: Path
    python: str  # runs convert_hf_to_gguf.py (needs torch, transformers, sentencepiece, gguf)

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> LlamaCpp:
        """The build under ``root`` (``build/bin`` and ``llama.cpp/`` as benchmarks/README.md lays them out, or
        a llama.cpp source tree with its ``build/``). Raises :class:`ConfigError` naming what is missing."""
        base = Path(root).expanduser().resolve()

        def first(*candidates: Path) -> Path | None:
            return next((c for c in candidates if c.is_file()), None)

        bench = first(base / "build/bin/llama-bench", base / "bin/llama-bench")
        quantize = first(base / "build/bin/llama-quantize", base / "bin/llama-quantize")
        convert = first(base / "llama.cpp/convert_hf_to_gguf.py", base / "convert_hf_to_gguf.py")
        missing = [
            name
            for name, found in (
                ("build/bin/llama-bench", bench),
                ("build/bin/llama-quantize", quantize),
                ("llama.cpp/convert_hf_to_gguf.py", convert),
            )
            if found is None
        ]
        if missing or bench is None or quantize is None or convert is None:
            raise ConfigError(
                f"--llama-cpp {root}: no {', '.join(missing)} there; build llama.cpp as benchmarks/README.md "
                "says (targets llama-bench and llama-quantize) and point at that folder"
            )
        venv = base / "venv/bin/python"
        return cls(base, bench, quantize, convert, str(venv) if venv.is_file() else sys.executable)

    def gguf(
        self,
        model_dir: str | os.PathLike[str],
        kind: str,
        workdir: str | os.PathLike[str],
        log: Callable[[str], None] = print,
    ) -> Path:
        """The ``kind`` (:data:`GGUF_TYPES`) GGUF of ``model_dir``, converted (and quantized) once under
        ``workdir``, keyed by what it is built from."""
        from expertflow.lab.decode import source_digest

        if kind not in GGUF_TYPES:
            raise ConfigError(f"llama.cpp formats the bench runs: {sorted(GGUF_TYPES)}, not {kind!r}")
        folder = Path(workdir) / f"gguf-{Path(model_dir).name}-{source_digest(Path(model_dir), 'gguf')}"
        folder.mkdir(parents=True, exist_ok=True)
        bf16 = folder / "model-bf16.gguf"
        if not bf16.is_file():
            source = self._source_folder(model_dir, folder / "source", log)
            log(f"converting {model_dir} to {bf16} with llama.cpp (once)")
            _run(
                [
                    self.python,
                    str(self.convert),
                    str(source),
                    "--outtype",
                    "bf16",
                    "--outfile",
                    f"{bf16}.partial",
                ]
            )
            os.replace(f"{bf16}.partial", bf16)
        qtype = GGUF_TYPES[kind]
        if qtype is None:
            return bf16
        out = folder / f"model-{kind}.gguf"
        if not out.is_file():
            log(f"quantizing {bf16} to {qtype} with llama-quantize (once)")
            _run([str(self.quantize), str(bf16), f"{out}.partial", qtype, str(os.cpu_count() or 1)])
            os.replace(f"{out}.partial", out)
        return out

    def _source_folder(
        self, model_dir: str | os.PathLike[str], folder: Path, log: Callable[[str], None]
    ) -> Path:
        """The checkpoint as the converter wants it: its files (linked, not copied) and a ``tokenizer.model``.

        Random bench checkpoints have no tokenizer; the converter needs one it can read, and pads its vocabulary
        to the config's. A small SentencePiece BPE trained on this package's own source serves; token ids, not
        text, are what the bench feeds."""
        src = Path(model_dir).resolve()
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for item in src.iterdir():
            if item.suffix in (".json", ".safetensors") or item.name == "tokenizer.model":
                (folder / item.name).symlink_to(item)
        config = json.loads((src / "config.json").read_text())
        if not config.get("architectures"):
            raise ConfigError(f"{src}/config.json names no architectures; llama.cpp's converter needs them")
        if not (folder / "tokenizer.model").exists():
            vocab = int(config.get("vocab_size") or 4000)
            text = folder.parent / "tokenizer-text.txt"
            package = Path(__file__).resolve().parents[1]
            text.write_text("\n".join(p.read_text() for p in sorted(package.rglob("*.py"))))
            log(f"training a {min(vocab, 4000)}-token SentencePiece tokenizer for llama.cpp's converter")
            _run(
                [
                    self.python,
                    "-c",
                    _TOKENIZER_SCRIPT,
                    str(text),
                    str(folder / "tokenizer"),
                    str(min(vocab, 4000)),
                    "1" if vocab >= 4000 else "0",
                ]
            )
            (folder / "tokenizer.vocab").unlink(missing_ok=True)
        return folder

    def bench_command(self, gguf: Path, prompt_tokens: int, new_tokens: int, *, repack: bool) -> list[str]:
        """``llama-bench`` for one decode row: ``new_tokens`` generated, ``prompt_tokens`` of prefill, on every
        core, memory-mapped, with or without Q4_0's repacked copy in anonymous memory."""
        return [
            str(self.bench),
            "-m",
            str(gguf),
            "-p",
            str(prompt_tokens),
            "-n",
            str(new_tokens),
            "-t",
            str(os.cpu_count() or 1),
            "-r",
            "1",
            "--repack",
            "1" if repack else "0",
            "-o",
            "json",
        ]


def parse_bench(stdout: str) -> dict[str, Any]:
    """Decode (``tg``) and prefill (``pp``) tokens/s from ``llama-bench -o json``."""
    try:
        start = stdout.index("[")
        runs = json.loads(stdout[start:])
    except ValueError as exc:
        raise ValueError(f"llama-bench printed no JSON results: {stdout[-300:]!r}") from exc
    out: dict[str, Any] = {}
    for run in runs:
        if run.get("n_gen"):
            out["tokens_per_second"] = float(run["avg_ts"])
            out["new_tokens"] = int(run["n_gen"])
        elif run.get("n_prompt"):
            out["prefill_tokens_per_second"] = float(run["avg_ts"])
    if "tokens_per_second" not in out:
        raise ValueError("llama-bench printed no decode (n_gen) result")
    return out


def _run(cmd: Sequence[str]) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}): {tail}")
