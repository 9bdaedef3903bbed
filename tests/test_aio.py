"""Tasks end for certain when cancelled, even one that lost a cancellation (asyncio.wait_for before 3.12)."""

from __future__ import annotations

import asyncio

from expertflow.aio import cancel_and_wait


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again_until_it_ends() -> None:
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # What wait_for does when its inner result is ready in the cancelling iteration: it returns it.
            swallowed.set()
        await asyncio.Event().wait()  # and the task runs on, towards a wait nothing will end

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task]), 5)
    assert swallowed.is_set() and task.cancelled()


async def test_finished_and_failed_tasks_are_waited_for_without_raising() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    async def forever() -> None:
        await asyncio.Event().wait()

    failed, done, running = (asyncio.create_task(c) for c in (fails(), asyncio.sleep(0), forever()))
    await asyncio.sleep(0.01)
    await cancel_and_wait(t for t in (failed, done, running))  # any iterable, read once
    assert isinstance(failed.exception(), ValueError) and done.done() and running.cancelled()
