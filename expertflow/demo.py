"""``make demo``: build a tiny MoE checkpoint, run offloaded generation under a budget smaller than its experts.

Prints the streamed tokens, tokens/s, per-tier hit rates, and whether the tokens equal plain transformers'.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expertflow.demo")
    parser.add_argument("--workdir", default=".demo")
    parser.add_argument("--preset", default="small")
    parser.add_argument(
        "--budget", type=float, default=0.25, help="host budget as a fraction of expert bytes"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from expertflow.config import StoreConfig, format_size
    from expertflow.lab.decode import build_preset
    from expertflow.lab.inspect import describe, format_table
    from expertflow.model.generate import format_summary, generate
    from expertflow.model.loader import load_model
    from expertflow.tiers.safetensors_index import open_checkpoint

    root = build_preset(args.preset, args.workdir)
    layout = open_checkpoint(root)
    print(format_table(describe(layout)))
    budget = int(layout.expert_bytes * args.budget)
    print(
        f"\nhost budget: {format_size(budget)} = {args.budget:.0%} of {format_size(layout.expert_bytes)} of experts"
        " (experts are evicted and re-read while generating)\n"
    )
    prompt = list(range(10, 26))
    config = StoreConfig(host_bytes=budget, policy="predictive", predictor="combined", read_mode="mmap")
    model = load_model(root, config=config)
    try:
        print("generated ids:", end=" ", flush=True)
        result = generate(
            model, prompt, args.new_tokens, on_token=lambda t: print(t, end=" ", flush=True), ignore_eos=True
        )
        print("\n")
        print(format_summary(result))
    finally:
        model.close()

    reference = AutoModelForCausalLM.from_pretrained(str(root), dtype="auto").eval()
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = reference.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.new_tokens,
            eos_token_id=None,  # as generate(ignore_eos=True): a fixed length, end-of-sequence included
            do_sample=False,
            pad_token_id=0,
        )
    same = out[0, len(prompt) :].tolist() == result.tokens
    print(f"\nsame tokens as plain transformers with the whole model in RAM: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
