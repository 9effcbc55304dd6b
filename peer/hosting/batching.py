"""Batching of concurrent requests to one expert: a queue, a trio task that forms batches, a worker thread.

:class:`ExpertBatcher` serves one :class:`~peer.moe.experts.ExpertBackend` inside a trio loop:

1. ``await batcher.submit("forward", x)`` (or ``"backward", x, grad``) queues a request and waits for its result;
2. :meth:`ExpertBatcher.run` takes the oldest queued forward request (forwards go ahead of backwards, so an
   inference client never waits behind a training backward pass; a backward waiting longer than
   ``MAX_BACKWARD_WAIT_S`` goes first, so training is never starved), then every other queued request of the
   same kind and trailing shapes, waiting at most ``batch_window`` seconds for more, up to ``max_batch_size``
   rows. Others stay queued for the next batch. Requests arriving while a batch computes are therefore
   batched together even with a zero window: generate clients' rows with each other and with trainers';
3. the batch is concatenated and run by the backend in a worker thread (``trio.to_thread``, at most as
   many at once as the shared ``limiter`` allows) so the loop keeps serving, then split back per request;
4. if a batch of several requests fails with a ``ValueError`` (validation, NaN gradients — raised before
   any optimizer step), each request is retried alone so only the bad one fails.

A request whose caller gave up (cancelled while waiting) is skipped when its turn comes.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import trio

from peer.hosting.backend import ExpertBackend

logger = logging.getLogger(__name__)

MAX_BACKWARD_WAIT_S = 1.0  # a backward request queued this long goes ahead of newer forward requests


class BatcherStopped(RuntimeError):
    """The batcher was stopped (its server is shutting down) before the request was answered."""


@dataclass(eq=False)
class _Request:
    kind: str  # "forward" or "backward"
    x: torch.Tensor
    grad: torch.Tensor | None = None
    queued_at: float = field(default_factory=time.monotonic)
    done: trio.Event = field(default_factory=trio.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None
    abandoned: bool = False

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def compatible(self, other: "_Request") -> bool:
        """Same kind and trailing shapes, so the two can be concatenated into one batch."""
        if self.kind != other.kind or self.x.shape[1:] != other.x.shape[1:]:
            return False
        return self.grad is None or other.grad is None or self.grad.shape[1:] == other.grad.shape[1:]

    def finish(self, result: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


class ExpertBatcher:
    """Batch the forward/backward requests of one expert (see the module docstring).

    :param backend: the expert; :param max_batch_size: most rows in one batch.
    :param batch_window: seconds to wait for more requests after the first of a batch (0: none).
    :param limiter: shared by the batchers of one server; bounds the batches computed at once.
    :param stats: a dict whose counters are incremented: ``batches``, ``rows``, ``compute_s`` (wall time from
        queuing a batch for a thread to its result) and ``compute_cpu_s`` (CPU time of the computations).
    """

    def __init__(self, backend: ExpertBackend, max_batch_size: int, batch_window: float,
                 limiter: trio.CapacityLimiter, stats: dict):
        self.backend, self.max_batch_size, self.batch_window = backend, max_batch_size, batch_window
        self.limiter, self.stats = limiter, stats
        self._queues: dict[str, deque[_Request]] = {"forward": deque(), "backward": deque()}
        self._arrived = trio.Event()
        self._waiting: set[_Request] = set()
        self._stopped = False

    async def submit(self, kind: str, x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        """Queue one request and return its result (raises what the backend raised for it)."""
        if self._stopped:
            raise BatcherStopped("the expert server is shutting down")
        if kind not in self._queues:
            raise ValueError(f"unknown request kind {kind!r}")
        request = _Request(kind, x, grad)
        self._waiting.add(request)
        try:
            self._queues[kind].append(request)
            self._arrived.set()
            await request.done.wait()
        finally:
            self._waiting.discard(request)
            request.abandoned = not request.done.is_set()
        if request.error is not None:
            raise request.error
        return request.result

    def stop(self) -> None:
        """Refuse new requests and fail the waiting ones with :class:`BatcherStopped`."""
        self._stopped = True
        for request in list(self._waiting):
            request.finish(error=BatcherStopped("the expert server is shutting down"))

    def _next_queue(self) -> deque[_Request] | None:
        """Forwards first, unless the oldest backward has waited ``MAX_BACKWARD_WAIT_S``; dropped requests skipped."""
        for queue in self._queues.values():
            while queue and (queue[0].abandoned or queue[0].done.is_set()):
                queue.popleft()
        forward, backward = self._queues["forward"], self._queues["backward"]
        if backward and (not forward or time.monotonic() - backward[0].queued_at > MAX_BACKWARD_WAIT_S):
            return backward
        return forward or None

    def _take_compatible(self, queue: deque[_Request], batch: list[_Request], rows: int) -> int:
        """Move the queued requests that fit ``batch`` into it (in order); returns its rows."""
        kept = deque()
        while queue:
            request = queue.popleft()
            if request.abandoned or request.done.is_set():
                continue
            if rows < self.max_batch_size and batch[0].compatible(request) and \
                    rows + request.rows <= self.max_batch_size:
                batch.append(request)
                rows += request.rows
            else:
                kept.append(request)
        queue.extend(kept)
        return rows

    async def run(self) -> None:
        """Form and run batches forever (cancel the task to stop)."""
        while True:
            queue = self._next_queue()
            if queue is None:
                await self._arrived.wait()
                self._arrived = trio.Event()
                continue
            first = queue.popleft()
            batch, rows = [first], first.rows
            rows = self._take_compatible(queue, batch, rows)
            deadline = trio.current_time() + self.batch_window
            while rows < self.max_batch_size and trio.current_time() < deadline:
                with trio.move_on_at(deadline):
                    await self._arrived.wait()
                self._arrived = trio.Event()
                rows = self._take_compatible(queue, batch, rows)
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Request]) -> None:
        self.stats["batches"] += 1
        self.stats["rows"] += sum(r.rows for r in batch)
        started = trio.current_time()
        try:
            results = await trio.to_thread.run_sync(_compute, self.backend, batch, self.stats, limiter=self.limiter)
        except ValueError as e:
            self.stats["compute_s"] += trio.current_time() - started
            if len(batch) == 1:
                batch[0].finish(error=e)
                return
            logger.info("Batch of %d %s requests for %s failed (%s); retrying them one by one", len(batch),
                        batch[0].kind, self.backend.name, e)
            for request in batch:
                await self._run_batch([request])
            return
        except Exception as e:
            self.stats["compute_s"] += trio.current_time() - started
            logger.warning("%s of %s failed: %s: %s", batch[0].kind, self.backend.name, type(e).__name__, e)
            for request in batch:
                request.finish(error=e)
            return
        self.stats["compute_s"] += trio.current_time() - started
        for request, result in zip(batch, results):
            request.finish(result)


def _compute(backend: ExpertBackend, batch: list[_Request], stats: dict) -> list[torch.Tensor]:
    """Worker thread: run one concatenated batch through the backend and split the result per request."""
    started = time.thread_time()
    try:
        x = batch[0].x if len(batch) == 1 else torch.cat([r.x for r in batch])
        if batch[0].kind == "forward":
            out = backend.forward(x)
        else:
            grad = batch[0].grad if len(batch) == 1 else torch.cat([r.grad for r in batch])
            out = backend.backward(x, grad)
        return list(out.split([r.rows for r in batch]))
    finally:
        stats["compute_cpu_s"] = stats.get("compute_cpu_s", 0.0) + time.thread_time() - started
