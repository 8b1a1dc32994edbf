"""Cancellation around redis-py calls on Python 3.11, for the rate limiter and the cache."""

from __future__ import annotations

import asyncio

__all__ = ["cancel_requests", "honour_lost_cancel"]


def cancel_requests() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def honour_lost_cancel(before: int) -> None:
    """Raise the ``CancelledError`` that a Redis call swallowed, if it did.

    On Python 3.11 redis-py's socket write goes through ``asyncio.wait_for``, which returns
    normally when the caller is cancelled in the very tick its write completes (CPython
    gh-86296, fixed by 3.12's rewrite): the cancellation is lost and the step carries on as
    if never cancelled (one that acquires in a loop never ends). The task still counts the
    request (``Task.cancelling``), so it is honoured here. For the rate limiter, a grant the
    script took just then is dropped: the key sends one request fewer, never more; for the
    answer cache, a step cancelled while it read or wrote stops instead of going on.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
