"""A checkpoint changed under a running store or daemon: reads become typed errors, no process dies."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from expertflow.services.client import ExpertClient
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
    from expertflow.core import ExpertKey
    from expertflow.errors import RemoteError

    try:
        await client.get_one(ExpertKey(*key))
        return "ok"
    except RemoteError as exc:
        return exc.code or "error"


def test_a_daemon_whose_checkpoint_is_truncated_keeps_serving_what_it_can(tmp_path: Path) -> None:
    root = write_moe_checkpoint(tmp_path / "moe")
    with daemon(root, ("tcp://127.0.0.1:*",), "--read-mode", "mmap", "--mem", "8MiB") as proc:

        async def scenario() -> list[str]:
            async with ExpertClient(proc.address, timeout=10) as client:
                before = await _get(client, (0, 0))
                path = root / "model.safetensors"
                os.truncate(path, os.path.getsize(path) // 2)
                after_cold = await _get(client, (2, 7))
                after_warm = await _get(client, (0, 0))
                return [before, after_cold, after_warm]

        results = asyncio.run(scenario())
        assert proc.proc.poll() is None, "the daemon died"
    assert results == ["ok", "INTERNAL", "ok"]
    shutil.rmtree(root)
