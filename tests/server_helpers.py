"""Real ``expertflow-store serve`` daemons in child processes, for tests on loopback tcp and ipc."""

from __future__ import annotations

from pathlib import Path

from expertflow.services.process import DaemonProcess


def daemon(checkpoint: Path, binds: tuple[str, ...] = ("tcp://127.0.0.1:*",), *extra: str) -> DaemonProcess:
    """A started daemon; use it as a context manager (it is killed on exit)."""
    return DaemonProcess(checkpoint, binds, extra, start_timeout=60.0)
