"""Real ``expertflow-store serve`` daemons in child processes, for tests on loopback tcp and ipc."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT = 60.0


class DaemonProcess:
    """One daemon: started with ``serve``; ``endpoints`` are the addresses it printed once bound."""

    def __init__(self, checkpoint: Path, binds: Sequence[str], extra: Sequence[str] = ()) -> None:
        argv = [sys.executable, "-m", "expertflow.services", "serve", str(checkpoint)]
        for bind in binds:
            argv += ["--bind", bind]
        argv += list(extra)
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr,), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.endpoints: list[str] = []
        while len(self.endpoints) < len(binds):
            try:
                line = self._lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                self.kill()
                raise RuntimeError(f"daemon did not start in {START_TIMEOUT} s: {self.log()}") from None
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            if line.startswith("listening on "):
                self.endpoints.append(line.split(" ", 2)[2].strip())

    @staticmethod
    def _pump(stream: object, lines: queue.Queue[str | None]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)
        lines.put(None)

    def _collect(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.stderr.append(line)

    @property
    def address(self) -> str:
        return self.endpoints[0]

    def log(self) -> str:
        return "".join(self.stderr[-50:])

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the daemon's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@contextmanager
def daemon(
    checkpoint: Path, binds: Sequence[str] = ("tcp://127.0.0.1:*",), *extra: str
) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(checkpoint, binds, extra)
    try:
        yield proc
    finally:
        proc.kill()
