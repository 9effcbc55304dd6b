"""The background tasks of one component (a DHT, an averager, a state sharer...), in a nursery of its own.

A :class:`TaskGroup` lives inside its node's nursery (:meth:`p2p.node.Node.task_group`): stopping the node
stops it, and :meth:`TaskGroup.close` cancels the component's tasks, and only those, at once. Components stop
by closing their group, never by setting a flag their loops poll.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .errors import P2PError

logger = logging.getLogger(__name__)


class TaskGroup:
    """A nursery for one component's tasks, started in the node's nursery the first time a task is spawned.

    :param run_sync_soon: schedules a plain function in the node's loop (from any thread).
    :param start_soon: starts a task in the node's nursery (called in the loop).
    :param name: the component, for logs.
    """

    def __init__(self, run_sync_soon: Callable[..., None], start_soon: Callable[..., None], name: str):
        self._run_sync_soon, self._start_soon, self.name = run_sync_soon, start_soon, name
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self._pending: list[tuple[Callable[..., Awaitable[Any]], tuple]] = []
        self._started = False
        self.closed = False

    def spawn(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``async_fn(*args)`` in this group (safe from any thread). A task that raises is logged and ends
        alone; after :meth:`close` nothing more starts."""
        self._run_sync_soon(self._spawn_in_loop, async_fn, args)

    def close(self) -> None:
        """Cancel every task of this group (safe from any thread, idempotent; a stopped node has none left)."""
        self.closed = True
        try:
            self._run_sync_soon(self._scope.cancel)
        except P2PError:  # the node has stopped: its nursery, this group's with it, is gone already
            logger.debug("Task group %s closed after its node stopped", self.name)

    def _spawn_in_loop(self, async_fn: Callable[..., Awaitable[Any]], args: tuple) -> None:
        if self.closed:
            return
        if self._nursery is not None:
            self._nursery.start_soon(self._guarded, async_fn, args)
            return
        self._pending.append((async_fn, args))
        if not self._started:
            self._started = True
            self._start_soon(self._run)

    async def _run(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for async_fn, args in self._pending:
                    nursery.start_soon(self._guarded, async_fn, args)
                self._pending.clear()
                await trio.sleep_forever()

    async def _guarded(self, async_fn: Callable[..., Awaitable[Any]], args: tuple) -> None:
        try:
            await async_fn(*args)
        except Exception:
            logger.exception("Background task %s of %s failed", getattr(async_fn, "__qualname__", async_fn), self.name)
