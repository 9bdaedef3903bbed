"""An asyncio event loop in a background thread, owned by one object: the sync <-> async bridge."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from expertflow.aio import cancel_and_wait
from expertflow.errors import StoreClosedError

T = TypeVar("T")


class LoopThread:
    """Runs an event loop in a daemon thread until :meth:`close`.

    ``close`` cancels every task still on the loop, waits for them, shuts down the loop's default executor
    and joins the thread, so nothing outlives the owner.
    """

    def __init__(self, name: str = "expertflow-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        if self._closed:
            coro.close()
            raise StoreClosedError("the store's event loop is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("sync store API called from the store's own event loop; use the async API")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result; on timeout the coroutine is cancelled."""
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def _drain() -> None:
            await cancel_and_wait(t for t in asyncio.all_tasks() if t is not asyncio.current_task())
            await self.loop.shutdown_default_executor()

        asyncio.run_coroutine_threadsafe(_drain(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
