"""Ending asyncio tasks for certain.

Before Python 3.12, ``asyncio.wait_for`` returns its inner result when a cancellation arrives in the same
loop iteration as that result, and the cancellation is lost: a task cancelled once may run on, and a plain
``cancel(); await gather(...)`` then waits forever (seen in the daemon: a connection refused for a replayed
CURVE nonce while its reply writer was finishing a write stayed open). :func:`cancel_and_wait` cancels again
until every task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

#: Seconds between repeated cancellations of a task that is still running.
RECANCEL_INTERVAL = 0.05


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and return once all have ended, cancelling again any that swallowed a cancellation.

    Their results and exceptions are left on the tasks (retrieved, so none is logged as never retrieved).
    """
    every = list(tasks)
    pending = {t for t in every if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_INTERVAL)
    for task in every:
        if not task.cancelled():
            task.exception()
