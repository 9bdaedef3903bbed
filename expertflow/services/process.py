"""An ``expertflow-store serve`` daemon in a child process: for benchmarks, tests and scripts.

The child is started with the running interpreter (``python -m expertflow.services serve ...``); the
constructor returns once it has printed ``listening on ADDRESS`` for every ``--bind``, so ``endpoints`` are
real bound addresses (ports chosen by the OS with ``tcp://127.0.0.1:*``).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from expertflow.errors import ExpertFlowError

START_TIMEOUT = 120.0


class DaemonProcess:
    """One daemon child process serving ``checkpoint`` on ``binds`` (extra ``serve`` options in ``extra``)."""

    def __init__(
        self,
        checkpoint: str | Path,
        binds: Sequence[str] = ("tcp://127.0.0.1:*",),
        extra: Sequence[str] = (),
        *,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        argv = [sys.executable, "-m", "expertflow.services", "serve", str(checkpoint)]
        for bind in binds:
            argv += ["--bind", bind]
        self.argv = [*argv, *extra]
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        # Both pipes are drained all the time, so a chatty daemon never blocks on a full pipe.
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr,), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.endpoints: list[str] = []
        while len(self.endpoints) < len(binds):
            try:
                line = self._lines.get(timeout=start_timeout)
            except queue.Empty:
                self.kill()
                raise ExpertFlowError(
                    f"the expert daemon did not start in {start_timeout} s: {self.log()}"
                ) from None
            if line is None:
                self.proc.wait()
                raise ExpertFlowError(f"the expert daemon exited with {self.proc.returncode}: {self.log()}")
            if line.startswith("listening on "):
                self.endpoints.append(line.split(" ", 2)[2].strip())

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _collect(self, stream: IO[str]) -> None:
        for line in stream:
            self.stderr.append(line)

    @property
    def address(self) -> str:
        """The first bound endpoint."""
        return self.endpoints[0]

    def log(self, lines: int = 50) -> str:
        """The daemon's last log lines (stderr)."""
        return "".join(self.stderr[-lines:])

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown) and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        for t in self._readers:
            t.join(5)
        return code

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
