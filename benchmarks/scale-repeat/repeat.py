"""Greedy tokens of `expertflow generate` over N runs, each a fresh process in a fresh 1 GiB memory cgroup (page
cache charged, and dropped before each run): do they repeat exactly? Needs root (cgroup v1).

    python benchmarks/scale-repeat/repeat.py MODEL_DIR 10 > benchmarks/scale-repeat/NAME.log
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from expertflow.lab.decode import run_limited  # noqa: E402


def main(model: str, runs: int) -> bool:
    prompt = ",".join(str(i) for i in range(1, 17))
    cmd = ["expertflow", "generate", model, "--token-ids", prompt, "--max-new-tokens", "16", "--json"]
    seen = []
    for i in range(runs):
        proc, _peak = run_limited(cmd, limit_bytes=1 << 30, timeout=900)
        out = json.loads(proc.stdout[proc.stdout.index("{") :])
        seen.append(out["tokens"])
        print(i, out["tokens"][-16:], round(out.get("tokens_per_second", 0), 2), flush=True)
    same = all(s == seen[0] for s in seen)
    print("command:", " ".join(cmd), "in a 1 GiB cgroup")
    print("identical over", runs, "runs:", same)
    return same


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1], int(sys.argv[2])) else 1)
