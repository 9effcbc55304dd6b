"""Experts on other peers as PyTorch modules: ``RemoteExpert`` and the DMoE layer ``RemoteMixtureOfExperts``.

Both are differentiable: the forward pass calls the servers' ``forward`` RPC, and autograd's backward pass
calls their ``backward`` RPC with the gradient of the output, which returns the gradient of the input
(and makes each server take an optimizer step on its expert — experts train where they live).

``RemoteMixtureOfExperts.forward(x [batch, in_features])``, following Learning@home's DMoE layer:

1. the gate scores every grid dimension; beam search (:func:`peer.moe.gating.beam_search_coords`) finds each
   sample's top-``k_best`` alive experts, asking an :class:`~peer.moe.directory.ExpertDirectory` (DHT
   records cached ~1 s) and skipping blacklisted experts;
2. samples are grouped by expert and every chosen expert gets ONE ``forward`` call with its rows, all
   calls in parallel (in the DHT node's trio loop, via ``node.run``: the layer blocks the training thread);
3. an expert that fails (timeout, dead peer, remote error, non-finite or wrongly shaped output) is skipped
   and blacklisted for ``blacklist_seconds``; outputs are mixed with softmax weights renormalised over the
   experts that answered (:func:`peer.moe.gating.combine_expert_outputs`, never NaN);
4. outside autograd (generation, evaluation) the rows that lost an expert are routed once more, to the
   next-best alive experts (the failed ones are blacklisted by then), with a log line;
5. a sample with fewer than ``k_min`` answers raises :class:`NotEnoughExpertsError` (``on_failure="raise"``)
   or gets a zero output and ``False`` in ``layer.mask`` (``on_failure="mask"``);
6. ``layer.aux_loss`` is set to the load-balancing loss, so the layer plugs into
   :class:`peer.training.model.MoETransformer` as its ``make_moe``.

In the backward pass each expert that answered gets one ``backward`` call (skipped when its output
gradient is all zeros); one that fails contributes a zero gradient and is logged — never NaN.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import trio
from torch import nn

from dht import DHT
from p2p import Node, P2PError
from peer.moe.call_stats import ExpertCallStats
from peer.moe.directory import ExpertDirectory
from peer.moe.gating import (GatingFunction, beam_search_coords, combine_expert_outputs, expert_logits,
                         load_balancing_loss, make_uid, routing_counts)
from peer.moe.wire import SERVICE, InvalidTensorMessage, tensor_from_wire, tensor_to_wire

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# an input that always requires grad: the remote experts get their backward call (and train) even when the
# layer's input does not require grad, as the parameters of a local expert would get their gradients
_DUMMY = torch.empty(0, requires_grad=True)


class NotEnoughExpertsError(RuntimeError):
    """Some samples got fewer than ``k_min`` expert answers (the message names the failed experts)."""


class ExpertOutputError(ValueError):
    """An expert answered with a tensor that is not finite or not of the expected shape."""


@dataclass(eq=False)
class _Job:
    """The rows of one batch routed to one expert, and what became of them."""

    uid: str
    rows: torch.Tensor   # [n] sample indices (CPU, long)
    slots: torch.Tensor  # [n] which of the sample's k choices this expert is
    x_wire: list
    peer_id: str | None = None
    output: torch.Tensor | None = None
    grad_wire: list | None = None
    grad_x: torch.Tensor | None = None
    error: str | None = None


async def _call(node: Node, peer_id: str, method: str, args: dict, timeout: float, max_message_bytes: int) -> dict:
    reply = await node.call(peer_id, SERVICE, method, args, timeout=timeout, max_message_bytes=max_message_bytes)
    if not isinstance(reply, dict):
        raise ExpertOutputError(f"{method} reply is not a map")
    return reply


def _decode_checked(reply: dict, name: str, shape: Sequence[int] | None, rows: int) -> torch.Tensor:
    tensor = tensor_from_wire(reply.get(name), name).float()
    if (shape is not None and tuple(tensor.shape) != tuple(shape)) or tensor.dim() < 1 or tensor.shape[0] != rows:
        raise ExpertOutputError(f"{name} has shape {list(tensor.shape)}, expected {list(shape or [rows, '...'])}")
    if not torch.isfinite(tensor).all():
        raise ExpertOutputError(f"{name} contains NaN or Inf")
    return tensor


class _RemoteExpertFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dummy: torch.Tensor, x: torch.Tensor, expert: "RemoteExpert") -> torch.Tensor:
        x_wire = tensor_to_wire(x.detach().float())
        reply = expert.node.run(_call, expert.node, expert.peer_id, "forward", {"uid": expert.uid, "x": x_wire},
                                expert.forward_timeout, expert.max_message_bytes)
        ctx.expert, ctx.x_wire, ctx.x_dtype, ctx.x_rows = expert, x_wire, x.dtype, x.shape[0]
        return _decode_checked(reply, "y", None, x.shape[0]).to(x.device, x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        expert = ctx.expert
        args = {"uid": expert.uid, "x": ctx.x_wire, "grad": tensor_to_wire(grad_y.detach().float())}
        reply = expert.node.run(_call, expert.node, expert.peer_id, "backward", args, expert.backward_timeout,
                                expert.max_message_bytes)
        grad_x = _decode_checked(reply, "grad_x", ctx.x_wire[1], ctx.x_rows).to(grad_y.device, ctx.x_dtype)
        return None, grad_x, None


class RemoteExpert(nn.Module):
    """One expert hosted by peer ``peer_id``, used like a local module: ``y = expert(x)``; ``y.backward()`` works.

    Failures raise (:class:`p2p.RemoteError` for a rejected input, :class:`p2p.P2PTimeout`,
    :class:`p2p.PeerUnreachable`, :class:`ExpertOutputError`). ``addrs`` are the peer's multiaddrs if the
    node does not know them yet. Called from a normal (non-trio) thread; it blocks until the answer.
    """

    def __init__(self, uid: str, peer_id: str, node: Node, *, addrs: Sequence[str] = (),
                 forward_timeout: float = 10.0, backward_timeout: float = 20.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__()
        self.uid, self.peer_id, self.node = uid, peer_id, node
        self.forward_timeout, self.backward_timeout, self.max_message_bytes = \
            forward_timeout, backward_timeout, max_message_bytes
        if addrs:
            node.add_addrs(peer_id, list(addrs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the remote expert on ``x`` ([batch, ...] float); differentiable w.r.t. ``x``."""
        return _RemoteExpertFunction.apply(_DUMMY, x, self)

    def info(self, timeout: float = 5.0) -> dict:
        """The server's description of this expert (input shape, max batch size, update count)."""
        return self.node.call_sync(self.peer_id, SERVICE, "info", {"uid": self.uid}, timeout=timeout)

    def extra_repr(self) -> str:
        return f"uid={self.uid!r}, peer={self.peer_id[-8:]}"


class _MoEFunction(torch.autograd.Function):
    """Forward: one call per expert job; backward: one backward call per job that answered."""

    @staticmethod
    def forward(ctx, dummy: torch.Tensor, x: torch.Tensor, layer: "RemoteMixtureOfExperts", jobs: list[_Job],
                k: int):
        layer._run_jobs(jobs, "forward", x.shape[1:])
        outputs = x.new_zeros(x.shape[0], k, *x.shape[1:])
        answered = torch.zeros(x.shape[0], k, dtype=torch.bool, device=x.device)
        done = [job for job in jobs if job.output is not None]
        for job in done:
            rows, slots = job.rows.to(x.device), job.slots.to(x.device)
            outputs[rows, slots] = job.output.to(x.device, x.dtype)
            answered[rows, slots] = True
        ctx.layer, ctx.jobs, ctx.x_dtype = layer, done, x.dtype
        ctx.mark_non_differentiable(answered)
        return outputs, answered

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor, _grad_answered: Any):
        grad_x = grad_outputs.new_zeros(grad_outputs.shape[0], *grad_outputs.shape[2:])
        jobs = []
        for job in ctx.jobs:
            grad = grad_outputs[job.rows.to(grad_outputs.device), job.slots.to(grad_outputs.device)]
            if bool(grad.any()):
                job.grad_wire, job.grad_x, job.error = tensor_to_wire(grad.float()), None, None
                jobs.append(job)
        ctx.layer._run_jobs(jobs, "backward", grad_outputs.shape[2:])
        for job in jobs:
            if job.grad_x is not None:
                grad_x.index_add_(0, job.rows.to(grad_x.device), job.grad_x.to(grad_x.device, grad_x.dtype))
        return None, grad_x.to(ctx.x_dtype), None, None, None


class RemoteMixtureOfExperts(nn.Module):
    """A DMoE layer whose experts (UIDs ``f"{uid_prefix}.i.j..."``) live on other peers; see the module docstring.

    :param in_features: width of the input rows (and of the experts' outputs).
    :param grid_size: the expert grid, e.g. ``(4, 4)``; :param uid_prefix: ``"ffn"`` (or ``"ffn."``).
    :param dht: a running DHT; its node makes the calls.
    :param k_best: experts per sample; :param k_min: fewest answers a sample may get.
    :param forward_timeout, backward_timeout: deadline of each call, in seconds.
    :param blacklist_seconds: how long an (expert, server) pair that failed is not chosen again.
    :param on_failure: ``"raise"`` or ``"mask"`` when a sample gets fewer than ``k_min`` answers.
    :param beam_size: beam search width (None = ``k_best``); :param lookup_ttl: DHT cache lifetime.

    After each forward: ``aux_loss`` (load-balancing loss), ``mask`` (bool [batch], False where a sample got
    fewer than ``k_min`` answers), ``last_failures`` (``"uid@peer: reason"`` strings).
    """

    def __init__(self, in_features: int, grid_size: Sequence[int], dht: DHT, uid_prefix: str, k_best: int,
                 k_min: int = 1, *, forward_timeout: float = 10.0, backward_timeout: float = 20.0,
                 blacklist_seconds: float = 5.0, on_failure: str = "raise", beam_size: int | None = None,
                 lookup_ttl: float = 1.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__()
        if on_failure not in ("raise", "mask"):
            raise ValueError(f"on_failure must be 'raise' or 'mask', got {on_failure!r}")
        if not 0 <= k_min <= k_best:
            raise ValueError(f"need 0 <= k_min <= k_best, got k_min={k_min}, k_best={k_best}")
        self.in_features, self.grid_size = in_features, tuple(grid_size)
        self.prefix = uid_prefix[:-1] if uid_prefix.endswith(".") else uid_prefix
        make_uid(self.prefix, [0] * len(self.grid_size))  # validates the prefix
        self.k_best, self.k_min, self.beam_size, self.on_failure = k_best, k_min, beam_size, on_failure
        self.forward_timeout, self.backward_timeout = forward_timeout, backward_timeout
        self.blacklist_seconds, self.max_message_bytes = blacklist_seconds, max_message_bytes
        self.dht, self.node = dht, dht.node
        self.directory = ExpertDirectory(dht, ttl=lookup_ttl)
        self.gate = GatingFunction(in_features, self.grid_size)
        self._blacklist: dict[tuple[str, str], float] = {}
        self.aux_loss: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.last_failures: list[str] = []
        self.last_used_uids: list[str] = []  # experts called by the last forward pass (for status lines)
        self.call_stats = ExpertCallStats()  # rows, latency and failures of every call, per expert and host

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route each row of ``x`` to its top-k alive remote experts and return their weighted combination."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects [batch, {self.in_features}], got {list(x.shape)}")
        retry = not torch.is_grad_enabled()  # outside autograd: a second pass needs no backward of its own
        out, lost = self._forward_once(x, check=not retry)
        if retry and bool(lost.any()):
            failures, mask, aux_loss = self.last_failures, self.mask, self.aux_loss
            rows = torch.nonzero(lost, as_tuple=True)[0]
            logger.info("Re-routing %d of %d rows around failed experts (%s)", len(rows), len(x),
                        "; ".join(failures[:3]))
            retried, _ = self._forward_once(x[rows], check=False)
            out, mask = out.clone(), mask.clone()
            out[rows], mask[rows] = retried, self.mask
            self.last_failures, self.mask, self.aux_loss = failures + self.last_failures, mask, aux_loss
        if retry and self.on_failure == "raise" and not bool(self.mask.all()):
            raise NotEnoughExpertsError(self._shortfall_message(~self.mask, None))
        return out

    def _forward_once(self, x: torch.Tensor, check: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output, and which rows lost a chosen expert (it failed) [batch] bool; with ``check``,
        rows with fewer than ``k_min`` answers raise (``on_failure="raise"``), else they get ``mask`` False."""
        scores = self.gate(x)
        coords, found = beam_search_coords(scores, self.k_best, self._is_alive, self.prefix, self.beam_size)
        jobs = self._make_jobs(x, coords, found)
        self.last_used_uids = [job.uid for job in jobs]
        self.last_failures = []
        outputs, answered = _MoEFunction.apply(_DUMMY, x, self, jobs, self.k_best)
        found = found.to(x.device)
        mask = found & answered
        short = mask.sum(dim=1) < self.k_min
        if bool(short.any()):
            if check and self.on_failure == "raise":
                raise NotEnoughExpertsError(self._shortfall_message(short, found))
            mask = mask & ~short[:, None]
        self.mask = ~short
        self.aux_loss = load_balancing_loss(scores, routing_counts(coords.to(x.device), found, self.grid_size))
        lost = (found & ~answered).any(dim=1)
        return combine_expert_outputs(outputs, expert_logits(scores, coords.to(x.device), found), mask), lost

    def _shortfall_message(self, short: torch.Tensor, found: torch.Tensor | None) -> str:
        failed = "; ".join(self.last_failures[:8]) or "none"
        unfound = "" if found is None else (
            f" ({int((short & (found.sum(dim=1) < self.k_min)).sum())} of them because beam search found fewer than "
            f"k_min alive experts)")
        return (f"{int(short.sum())} of {short.numel()} samples got fewer than k_min={self.k_min} expert "
                f"answers under {self.prefix!r}{unfound}; failed experts: {failed}")

    def _make_jobs(self, x: torch.Tensor, coords: torch.Tensor, found: torch.Tensor) -> list[_Job]:
        """Group the (sample, slot) pairs by expert: one job (one RPC) per chosen expert."""
        strides = torch.tensor([math.prod(self.grid_size[d + 1:]) for d in range(len(self.grid_size))])
        flat = (coords.cpu() * strides).sum(dim=2)
        found = found.cpu()
        x_cpu = x.detach().float().cpu()
        jobs = []
        for index in torch.unique(flat[found]).tolist():
            rows, slots = torch.nonzero(found & (flat == index), as_tuple=True)
            uid = make_uid(self.prefix, [(index // int(s)) % g for s, g in zip(strides, self.grid_size)])
            jobs.append(_Job(uid, rows, slots, tensor_to_wire(x_cpu[rows])))
        return jobs

    # ---------------------------------------------------------------- network
    def _is_alive(self, names: list[str]) -> list[str]:
        return self.directory.is_alive(names, exclude=self._is_blacklisted)

    def _is_blacklisted(self, uid: str, peer_id: str) -> bool:
        until = self._blacklist.get((uid, peer_id))
        return until is not None and until > time.monotonic()

    def _run_jobs(self, jobs: list[_Job], method: str, out_shape: Sequence[int]) -> None:
        if jobs:
            self.node.run(self._arun_jobs, jobs, method, tuple(out_shape))

    async def _arun_jobs(self, jobs: list[_Job], method: str, out_shape: tuple[int, ...]) -> None:
        if method == "forward":
            servers = await self.directory.aservers([job.uid for job in jobs])
            for job in jobs:
                choices = [e for e in servers[job.uid] if not self._is_blacklisted(job.uid, e.peer_id)]
                if choices:
                    entry = random.choice(choices)
                    job.peer_id = entry.peer_id
                    self.node.add_addrs(entry.peer_id, list(entry.addrs))
                else:
                    job.error = "no alive server hosts it"
        async with trio.open_nursery() as nursery:
            for job in jobs:
                if job.peer_id is not None:
                    nursery.start_soon(self._call_one, job, method, out_shape)
        for job in jobs:
            if job.error is not None:
                self.last_failures.append(f"{job.uid}@{(job.peer_id or '?')[-8:]}: {job.error}")

    async def _call_one(self, job: _Job, method: str, out_shape: tuple[int, ...]) -> None:
        forward = method == "forward"
        args = {"uid": job.uid, "x": job.x_wire} if forward else {"uid": job.uid, "x": job.x_wire,
                                                                    "grad": job.grad_wire}
        rows, started = len(job.rows), time.monotonic()
        try:
            reply = await _call(self.node, job.peer_id, method, args,
                                self.forward_timeout if forward else self.backward_timeout, self.max_message_bytes)
            if forward:
                job.output = _decode_checked(reply, "y", (rows, *out_shape), rows)
            else:
                job.grad_x = _decode_checked(reply, "grad_x", job.x_wire[1], rows)
            self.call_stats.record(job.uid, job.peer_id, rows, time.monotonic() - started, ok=True)
        except (P2PError, InvalidTensorMessage, ExpertOutputError, ValueError) as e:
            job.error = f"{type(e).__name__}: {e}"
            now = time.monotonic()
            self.call_stats.record(job.uid, job.peer_id, rows, now - started, ok=False)
            for key in [key for key, until in self._blacklist.items() if until <= now]:
                del self._blacklist[key]
            self._blacklist[(job.uid, job.peer_id)] = now + self.blacklist_seconds
            if forward:
                logger.warning("Expert %s on %s failed in forward, skipping it for %.0fs: %s", job.uid,
                               job.peer_id[-8:], self.blacklist_seconds, job.error)
            else:
                logger.warning("Expert %s on %s failed in backward; its gradient contribution is zero: %s",
                               job.uid, job.peer_id[-8:], job.error)

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """Remote experts have no local parameters (the gate's are dense parameters)."""
        return iter(())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, grid_size={self.grid_size}, prefix={self.prefix!r}, "
                f"k_best={self.k_best}, k_min={self.k_min}, on_failure={self.on_failure!r}")

