"""Batching of concurrent requests to one expert: a queue, a trio task that forms batches, a worker thread.

:class:`ExpertBatcher` serves one :class:`~peer.moe.experts.ExpertBackend` inside a trio loop:

1. ``await batcher.submit("forward", x)`` (or ``"backward", x, grad``) queues a request and waits for its result;
2. :meth:`ExpertBatcher.run` takes the first queued request, then every other queued request of the same
   kind and trailing shapes, waiting at most ``batch_window`` seconds for more, up to ``max_batch_size``
   rows. A request that does not fit starts the next batch. Requests arriving while a batch computes
   are therefore batched together even with a zero window;
3. the batch is concatenated and run by the backend in a worker thread (``trio.to_thread``, at most as
   many at once as the shared ``limiter`` allows) so the loop keeps serving, then split back per request;
4. if a batch of several requests fails with a ``ValueError`` (validation, NaN gradients — raised before
   any optimizer step), each request is retried alone so only the bad one fails.

A request whose caller gave up (cancelled while waiting) is skipped when its turn comes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import trio

from peer.hosting.backend import ExpertBackend

logger = logging.getLogger(__name__)


class BatcherStopped(RuntimeError):
    """The batcher was stopped (its server is shutting down) before the request was answered."""


@dataclass(eq=False)
class _Request:
    kind: str  # "forward" or "backward"
    x: torch.Tensor
    grad: torch.Tensor | None = None
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
        self._send, self._receive = trio.open_memory_channel(1 << 16)
        self._waiting: set[_Request] = set()
        self._stopped = False

    async def submit(self, kind: str, x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        """Queue one request and return its result (raises what the backend raised for it)."""
        if self._stopped:
            raise BatcherStopped("the expert server is shutting down")
        request = _Request(kind, x, grad)
        self._waiting.add(request)
        try:
            self._send.send_nowait(request)
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

    async def run(self) -> None:
        """Form and run batches forever (cancel the task to stop)."""
        carry: _Request | None = None
        while True:
            first = carry if carry is not None else await self._receive.receive()
            carry = None
            if first.abandoned or first.done.is_set():
                continue
            batch, rows = [first], first.rows
            deadline = trio.current_time() + self.batch_window
            while rows < self.max_batch_size:
                try:
                    request = self._receive.receive_nowait()
                except trio.WouldBlock:
                    request = None
                    with trio.move_on_at(deadline):
                        request = await self._receive.receive()
                    if request is None:
                        break
                if request.abandoned or request.done.is_set():
                    continue
                if not first.compatible(request) or rows + request.rows > self.max_batch_size:
                    carry = request
                    break
                batch.append(request)
                rows += request.rows
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
