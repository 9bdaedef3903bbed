"""What every benchmark writes: a Markdown table, JSON with the machine and the exact command, PNG plots."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """A description of this machine and the software versions that matter to the numbers."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    for mod in ("torch", "transformers", "safetensors", "zmq", "accelerate", "numpy"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", getattr(m, "zmq_version", lambda: "?")())
        except Exception:  # an optional peer that is not installed is simply not reported
            continue
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, timeout=5
        ).stdout.strip()
    return info


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a GitHub Markdown table; floats with 3 significant digits."""
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


@dataclass
class BenchResult:
    """One benchmark run: its rows, notes on method, and where it was written."""

    name: str
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def write(self, out_dir: str | Path, columns: Sequence[str] | None = None) -> Path:
        """Write ``NAME.json`` and ``NAME.md`` into ``out_dir``; returns the JSON path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "bench": self.name,
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(time.time() - self.started, 3),
            "machine": machine(),
            "notes": self.notes,
            "summary": self.summary,
            "rows": self.rows,
        }
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(payload, indent=2, default=str))
        md = [f"# {self.name}", "", markdown_table(self.rows, columns)]
        if self.summary:
            md += ["", "Summary:", ""] + [f"- {k}: {v}" for k, v in self.summary.items()]
        if self.notes:
            md += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        md += ["", f"Command: `{payload['command']}`", ""]
        (out / f"{self.name}.md").write_text("\n".join(md))
        return path


def progress(iterable: Any, desc: str, total: int | None = None, enabled: bool = True) -> Any:
    """tqdm on a terminal, plain iteration otherwise."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)
