"""Seeded chaos: two expert daemons behind one client, killed and restarted at random tokens, one of them
restarted on a checkpoint replaced under it. Greedy output must equal plain transformers token for token,
nothing but the processes we kill may die, no cache may outgrow its budget, and the counters must explain
every read that did not come from a daemon."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from expertflow.config import StoreConfig
from expertflow.core import round_up
from expertflow.model.generate import generate
from expertflow.model.loader import load_model
from expertflow.services.process import DaemonProcess
from expertflow.tiers.remote import RemoteTier
from expertflow.tiers.safetensors_index import open_checkpoint
from expertflow.wire.client import ExpertClient
from tests.checkpoints import build_model
from tests.server_helpers import daemon

pytestmark = pytest.mark.timeout(300)

SEED = 20261201
NEW_TOKENS = 240
PROMPT = 8


def _save(path: Path, seed: int) -> Path:
    """The tiny Mixtral of ``tests.checkpoints`` with room for a long generation, in one safetensors file."""
    model = build_model("mixtral", seed=seed)
    model.config.max_position_embeddings = 512
    model.save_pretrained(path, max_shard_size="100GB")
    return path


def _reference(path: Path, prompt: list[int]) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        # As expertflow's generate(ignore_eos=True): exactly NEW_TOKENS (the end-of-sequence token does not stop it).
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, max_new_tokens=NEW_TOKENS, eos_token_id=None, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _stat(address: str) -> dict[str, object]:
    async def ask() -> dict[str, object]:
        async with ExpertClient(address, timeout=10) as client:
            return dict(await client.stat())

    return asyncio.run(ask())


class _Daemons:
    """Daemon ``A`` (tcp, fixed port) and ``B`` (ipc): started, SIGKILLed, restarted on the same address."""

    def __init__(self, tmp: Path, served: dict[str, Path], mem: int) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.binds = {"A": f"tcp://127.0.0.1:{port}", "B": f"ipc://{tmp}/b.sock"}
        self.served, self.mem = served, mem
        self.current = {name: self._start(name) for name in self.binds}
        self.killed: list[DaemonProcess] = []
        self.stats: list[tuple[str, dict[str, object]]] = []

    def _start(self, name: str) -> DaemonProcess:
        return daemon(self.served[name], (self.binds[name],), "--mem", str(self.mem), "--read-mode", "mmap")

    def kill(self, name: str) -> None:
        proc = self.current.pop(name)
        self.check_budget(name, proc)
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(30)
        self.killed.append(proc)

    def restart(self, name: str) -> None:
        self.current[name] = self._start(name)

    def check_budget(self, name: str, proc: DaemonProcess) -> None:
        s = _stat(proc.address)
        self.stats.append((name, s))
        assert s["cache_bytes"] <= self.mem and s["cache_resident_experts"] <= s["cache_capacity_experts"]

    def close(self) -> None:
        for proc in self.current.values():
            proc.kill()


def test_two_daemons_killed_restarted_and_replaced_never_change_a_token(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    local = _save(tmp_path / "local", seed=0)  # the GPU node's copy
    served = {name: shutil.copytree(local, tmp_path / name) for name in ("A", "B")}
    other = _save(tmp_path / "finetuned", seed=1)  # same structure, other weights
    layout = open_checkpoint(local)
    slot = round_up(layout.max_expert_nbytes, 4096)
    prompt = [rng.randrange(256) for _ in range(PROMPT)]
    want = _reference(local, prompt)

    # One event at a random token of each eighth of the run, so that every phase lasts a few tokens.
    span = NEW_TOKENS // 8
    points = [i * span + rng.randrange(4, span - 4) for i in range(8)]

    def replace_b() -> None:
        # The deploy pattern: a new file renamed over the old one while the daemon runs. The running daemon
        # keeps the inode it announced; once restarted it serves the new weights, which no client accepts.
        os.replace(other / "model.safetensors", served["B"] / "model.safetensors")

    daemons = _Daemons(tmp_path, served, mem=8 * slot)
    schedule: dict[int, list[Callable[[], None]]] = {}
    for point, action in zip(
        points,
        [
            lambda: daemons.kill("A"),
            lambda: daemons.kill("B"),  # both down: the local disk serves
            lambda: daemons.restart("A"),
            lambda: daemons.restart("B"),
            replace_b,
            lambda: (daemons.kill("B"), daemons.restart("B")),  # back, on the replaced file
            lambda: daemons.kill("A"),
            lambda: daemons.restart("A"),
        ],
        strict=True,
    ):
        schedule.setdefault(point, []).append(action)

    seen: list[int] = []
    host_bytes: list[int] = []
    budget = 4 * slot

    config = StoreConfig(
        host_bytes=budget,
        predictor="none",
        remote=tuple(daemons.binds.values()),
        remote_replicas=2,
        remote_timeout=2.0,
    )
    try:
        with load_model(local, config=config) as model:

            def on_token(token: int) -> None:
                seen.append(token)
                host_bytes.append(model.expert_stats().host_bytes)
                for action in schedule.get(len(seen), []):
                    action()

            tokens = generate(model, prompt, NEW_TOKENS, on_token=on_token, ignore_eos=True).tokens
            stats = model.expert_stats()
            tier = next(
                s for s in model.expert_store.async_store.sources.sources if isinstance(s, RemoteTier)
            )
            by_server = dict(tier.reads_by_server)
            counters = dict(tier.counters)
        for name, proc in daemons.current.items():
            daemons.check_budget(name, proc)
            assert proc.proc.poll() is None, f"daemon {name} died: {proc.log()}"
    finally:
        daemons.close()

    assert tokens == want
    # Only the processes the test killed died, and they died of the SIGKILL, not before it.
    assert [p.proc.returncode for p in daemons.killed] == [-signal.SIGKILL] * 4
    assert not any("Traceback" in line for p in daemons.killed for line in p.stderr)
    assert max(host_bytes) <= budget
    # Every read that did not come from a daemon is a counted fallback: a daemon failed (down, refused) or
    # was not asked (no local checksum for that expert yet).
    fallbacks = stats.source_errors.get("remote", 0) + stats.source_skips.get("remote", 0)
    assert stats.reads["nvme"] == fallbacks > 0
    assert stats.source_errors["remote"] == counters["errors"]  # each failure is one the tier saw and counted
    assert stats.reads["remote"] == counters["reads"] == sum(by_server.values())
    assert all(n > 0 for n in by_server.values())
    assert counters["marked_down"] >= 3 and counters["unverifiable"] == stats.source_skips["remote"]
    assert "serves checkpoint" in str(tier.disabled_servers())  # restarted on the replaced file: refused
