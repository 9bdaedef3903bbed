"""``pack`` and ``pack --quantize`` read, convert and write one expert (or one chunk of a tensor) at a time:
their memory does not grow with the model, and a checkpoint larger than the memory limit packs (under a real
cgroup-v1 memory limit that charges the page cache, as root)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from expertflow.tiers.fingerprint import content_fingerprint
from expertflow.tiers.safetensors_index import open_checkpoint

pytestmark = pytest.mark.timeout(600)

MiB = 1 << 20
# 16 layers x 8 experts of 6 MiB (bf16, hidden 512, ffn 2048): 768 MiB of experts.
BUILD = r"""
import sys, torch
from transformers import MixtralConfig, MixtralForCausalLM
config = MixtralConfig(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
                       num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                       max_position_embeddings=256)
with torch.device("meta"):
    model = MixtralForCausalLM(config)
model = model.to_empty(device="cpu").to(torch.bfloat16)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g).mul_(0.02))
model.config.dtype = torch.bfloat16
model.save_pretrained(sys.argv[1], max_shard_size="200MB")
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big") / "mixtral"
    subprocess.run([sys.executable, "-c", BUILD, str(root)], check=True, capture_output=True)
    assert open_checkpoint(root).expert_bytes == 768 * MiB
    return root


def _peak_rss(argv: list[str], group: Path | None = None) -> int:
    """Peak RSS in bytes of the CLI run with ``argv`` (in the cgroup ``group`` when given); it must succeed.

    The child's own high-water mark (``VmHWM``), not ``wait4``'s ``ru_maxrss``: Linux carries a forked child's
    RSS before ``exec`` (this test process's, hundreds of MiB late in the suite) into the latter."""

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as hwm:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLI, hwm.name, *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=enter,
        )
        proc.wait()
        err.seek(0)
        assert proc.returncode == 0, err.read().decode()[-2000:]
        return int(hwm.read().split()[0]) * 1024  # kB


_CLI = (
    "import sys\n"
    "from expertflow.cli import main\n"
    "code = main(sys.argv[2:])\n"
    "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]\n"
    "open(sys.argv[1], 'w').write(hwm)\n"
    "sys.exit(code)\n"
)


def test_pack_quantize_memory_does_not_grow_with_the_model(big_checkpoint: Path, tmp_path: Path) -> None:
    """Before, the source's experts were read into a host pool sized to hold them all (768 MiB here)."""
    baseline = _peak_rss(["inspect", str(big_checkpoint)])  # the same libraries and model skeleton
    peak = _peak_rss(
        ["pack", str(big_checkpoint), str(tmp_path / "int4"), "--quantize", "int4", "--no-progress"]
    )
    assert peak < baseline + 160 * MiB, (peak / MiB, baseline / MiB)
    assert len(open_checkpoint(tmp_path / "int4").experts) == 128


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory/cgroup.procs").exists(),
    reason="needs root and the cgroup v1 memory controller",
)
def test_a_checkpoint_larger_than_the_memory_limit_packs_lossless_and_quantized(
    big_checkpoint: Path, tmp_path: Path
) -> None:
    from expertflow.lab.decode import memory_cgroup

    baseline = _peak_rss(["inspect", str(big_checkpoint)])
    limit = baseline + 192 * MiB
    assert limit < open_checkpoint(big_checkpoint).expert_bytes  # the checkpoint does not fit
    with memory_cgroup(limit) as group:
        assert group is not None
        _peak_rss(
            ["pack", str(big_checkpoint), str(tmp_path / "int4"), "--quantize", "int4", "--no-progress"],
            group,
        )
        _peak_rss(["pack", str(big_checkpoint), str(tmp_path / "plain"), "--no-progress"], group)
    plain, int4 = open_checkpoint(tmp_path / "plain"), open_checkpoint(tmp_path / "int4")
    assert plain.expert_bytes == 768 * MiB and len(int4.experts) == 128
    assert content_fingerprint(plain) == content_fingerprint(open_checkpoint(big_checkpoint))
