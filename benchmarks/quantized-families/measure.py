"""Measure, for every family of the family sweep, how far int4 experts' logits are from their reference.

The reference is the family's transformers model whose experts hold the dequantized values; the difference
is the kernels' own rounding. Run from the repository root:

    .venv/bin/python benchmarks/quantized-families/measure.py

and it writes ``tolerance.json`` / ``tolerance.md`` beside itself (the command included).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from expertflow.config import StoreConfig  # noqa: E402
from expertflow.model.loader import load_model  # noqa: E402
from expertflow.model.quantize import dequantized_state_dict, pack_quantized  # noqa: E402
from expertflow.model.support import UNSUPPORTED  # noqa: E402
from expertflow.quant.scheme import QuantScheme  # noqa: E402
from tests.family_fixtures import (  # noqa: E402
    discover_expert_families,
    model_class_name,
    runnable_model_type,
    save_tiny_checkpoint,
)


def _output(out: object) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state  # type: ignore[attr-defined]


def measure(family: str, work: Path, scheme: QuantScheme) -> dict[str, object]:
    runnable = runnable_model_type(family)
    root = save_tiny_checkpoint(runnable, work / family)
    pack = pack_quantized(root, work / f"{family}-q", scheme, progress=False)
    class_name, _ = model_class_name(runnable)
    reference = getattr(transformers, class_name).from_pretrained(root, dtype=torch.float32).eval()
    reference.load_state_dict(dequantized_state_dict(pack, reference), strict=False)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.manual_seed(0)
        want = _output(reference(input_ids=ids))
        with load_model(pack, config=StoreConfig(predictor="none")) as model:
            torch.manual_seed(0)
            got = _output(model(input_ids=ids))
    scale = max(want.abs().max().item(), 1.0)
    return {
        "family": family,
        "max_abs_diff": (got - want).abs().max().item(),
        "scale": scale,
        "relative": (got - want).abs().max().item() / scale,
    }


def main() -> int:
    scheme = QuantScheme(4, 32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in discover_expert_families():
            if family not in UNSUPPORTED:
                rows.append(measure(family, Path(tmp), scheme))
                print(f"{rows[-1]['family']:28s} {rows[-1]['relative']:.2e}", flush=True)
    out = Path(__file__).resolve().parent
    command = "`.venv/bin/python benchmarks/quantized-families/measure.py`"
    (out / "tolerance.json").write_text(
        json.dumps({"scheme": scheme.name, "command": command, "rows": rows}, indent=1)
    )
    worst = max(r["relative"] for r in rows)
    lines = [
        f"# int4 experts ({scheme.name}) vs transformers with the dequantized experts, fp32, 12 tokens",
        "",
        f"{len(rows)} families; worst relative difference {worst:.2e} (max |logit difference| / max(|logit|, 1)).",
        "",
        "| family | max abs difference | logit scale | relative |",
        "|---|---|---|---|",
        *(
            f"| {r['family']} | {r['max_abs_diff']:.2e} | {r['scale']:.2f} | {r['relative']:.2e} |"
            for r in rows
        ),
        "",
        f"Command: {command}",
        "",
    ]
    (out / "tolerance.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
