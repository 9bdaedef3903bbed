"""A checkpoint changed under a running store or daemon: reads become typed errors, no process dies."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from expertflow.cli import main as cli_main
from expertflow.core import ExpertKey
from expertflow.errors import RemoteError
from expertflow.wire.client import ExpertClient
from tests.server_helpers import daemon
from tests.store_helpers import write_moe_checkpoint

_LOCAL = """
import os, sys
from expertflow import ExpertKey, ExpertReadError, StoreConfig, open_store
root, mode = sys.argv[1], sys.argv[2]
with open_store(root, StoreConfig(read_mode=mode, host_bytes=8 << 20)) as store:
    store.release(store.fetch([ExpertKey(0, 0)]))
    path = os.path.join(root, "model.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)
    try:
        store.fetch([ExpertKey(2, 7)])
    except ExpertReadError as exc:
        print("refused:", exc)
    store.release(store.fetch([ExpertKey(0, 0)]))  # still resident: still served
    print("alive")
"""


@pytest.mark.parametrize("mode", ["mmap", "direct"])
def test_a_checkpoint_truncated_under_a_local_store_is_a_typed_error_not_a_crash(
    tmp_path: Path, mode: str
) -> None:
    root = write_moe_checkpoint(tmp_path / "moe")
    run = subprocess.run(
        [sys.executable, "-c", _LOCAL, str(root), mode], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, f"rc={run.returncode} (-7 is SIGBUS)\n{run.stderr[-2000:]}"
    assert "refused:" in run.stdout and "changed since it was opened" in run.stdout
    assert run.stdout.strip().endswith("alive")


async def _get(client: ExpertClient, key: tuple[int, int]) -> str:
    try:
        await client.get_one(ExpertKey(*key))
        return "ok"
    except RemoteError as exc:
        return exc.code or "error"


def test_a_daemon_whose_checkpoint_changed_serves_only_what_it_announced(tmp_path: Path) -> None:
    """Truncated under it: the daemon does not die, never reads the changed file again, still serves the
    experts it cached (the bytes its fingerprint describes), and refuses new clients at hello."""
    root = write_moe_checkpoint(tmp_path / "moe")
    with daemon(root, ("tcp://127.0.0.1:*",), "--read-mode", "mmap", "--mem", "8MiB") as proc:

        async def scenario() -> list[str]:
            async with ExpertClient(proc.address, timeout=10) as client:
                before = await _get(client, (0, 0))
                path = root / "model.safetensors"
                os.truncate(path, os.path.getsize(path) // 2)
                after_cold = await _get(client, (2, 7))
                after_warm = await _get(client, (0, 0))
            async with ExpertClient(proc.address, timeout=10) as newcomer:
                try:
                    await newcomer.hello()
                    hello = "ok"
                except RemoteError as exc:
                    hello = exc.code or "error"
            return [before, after_cold, after_warm, hello]

        results = asyncio.run(scenario())
        assert proc.proc.poll() is None, "the daemon died"
    assert results == ["ok", "CHECKPOINT_CHANGED", "ok", "CHECKPOINT_CHANGED"]
    shutil.rmtree(root)


async def test_a_store_stops_using_a_daemon_whose_checkpoint_changed(tmp_path: Path) -> None:
    from expertflow import StoreConfig, open_async_store
    from expertflow.tiers.nvme import NvmeTier
    from expertflow.tiers.remote import RemoteTier

    served = write_moe_checkpoint(tmp_path / "served")  # the daemon's copy
    local = write_moe_checkpoint(tmp_path / "local")  # the GPU node's own copy: the same weights
    assert cli_main(["checksums", str(local)]) == 0  # so that the daemon serves from the first read
    with daemon(served, ("tcp://127.0.0.1:*",), "--read-mode", "mmap", "--mem", "8MiB") as proc:
        config = StoreConfig(remote=(proc.address,), remote_timeout=10, host_bytes=8 << 20, predictor="none")
        store = await open_async_store(local, config)
        try:
            keys = store.layout.keys()
            store.release(await store.fetch(keys[:2]))
            path = served / "model.safetensors"
            os.truncate(path, os.path.getsize(path) // 2)
            handles = await store.fetch(keys[-2:])  # not in the daemon's cache: it refuses, NVMe serves
            with NvmeTier(store.layout, "mmap") as nvme:
                for h in handles:
                    n = store.layout.spec(h.key).nbytes
                    assert bytes(store.host_buffer(h)) == bytes(nvme.read_expert(h.key)[:n])
            store.release(handles)
            stats = store.stats()
            tier = next(s for s in store.sources.sources if isinstance(s, RemoteTier))
        finally:
            await store.aclose()
        assert proc.proc.poll() is None
    assert stats.reads == {"remote": 2, "nvme": 2}
    assert tier.counters["marked_down"] >= 1  # the daemon is disabled for good
