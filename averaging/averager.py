"""``Averager``: keep a list of tensors in sync with other peers, no coordinator, survives peers dying.

Example (every trainer runs the same)::

    avg = Averager(model.dense_parameters(), dht, prefix="mymodel", target_group_size=4)
    result = avg.step(weight=batch_size)      # averages in place; result.ok tells whether it did
    print(result.group_size, result.duration)

A step: matchmaking through the DHT (:mod:`averaging.matchmaking`), then a butterfly all-reduce with
repair (:mod:`averaging.allreduce`). Either every element of every tensor is replaced by the group's
weighted mean — bit-identical on every member that finishes — or the step reports failure and the
tensors are unchanged. Nothing waits without a deadline.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from dht import DHT
from p2p import ServiceLimits
from p2p.rpc import CallContext

from .allreduce import AllReduceRound
from .bans import BanList
from .compression import choose_compression, default_chunk_elems
from . import matchmaking
from .matchmaking import Matchmaker, MatchmakingFailed
from .partition import FlatBuffer
from .reduce import all_finite, max_abs

logger = logging.getLogger(__name__)

NOMINAL_BANDWIDTH = 100.0   # MB/s assumed for part sizes and deadlines when a peer declares none
PACING_SHARE = 0.97         # of the declared bandwidth: headers take ~4% of a full-sized frame


@dataclass
class StepResult:
    """What one :meth:`Averager.step` did."""

    ok: bool
    group_size: int = 0
    peers: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    duration: float = 0.0
    excluded: list[str] = field(default_factory=list)
    repaired_parts: list[int] = field(default_factory=list)
    reason: str = ""
    #: seconds spent finding the group, and in the all-reduce proper (data transfer, reduce, repair)
    matchmaking_s: float = 0.0
    allreduce_s: float = 0.0


class Averager:
    """Averages ``tensors`` in place with groups of peers found under ``prefix`` in the DHT.

    :param tensors: floating-point tensors (CPU or CUDA) to keep in sync; shapes and dtypes must match
        the other peers' (checked in matchmaking before any data moves).
    :param dht: a running :class:`dht.DHT`; the averager serves its RPCs on the DHT's node.
    :param prefix: name of what is averaged (e.g. the model name); peers with the same prefix average.
    :param target_group_size: peers per all-reduce group; ``min_group_size``: fewest worth a round.
    :param compression: "none", "fp16", "int8" or "int4" (8- or 4-bit blockwise); a buffer under 4096 elements in all
        (16 KB) stays exact, where compressing saves nothing that matters.
    :param bandwidth: this peer's upload bandwidth in MB/s, if you know it. Parts are sized by it, and the
        round's bulk transfers are paced to it (Linux kernel pacing, at :data:`PACING_SHARE` of it): the
        flows to the other members split it in proportion to what each carries, so they finish together
        instead of fighting over the uplink's queue (``bench/allreduce.py --netns --bandwidth-mbit 100``, 4 peers:
        all-reduce in 1.07x the bound, against 1.29x unpaced). Declare no more than the link has: pacing
        never sends faster.
        None (default): parts are sized as if every member had :data:`NOMINAL_BANDWIDTH`, and nothing is
        paced. Client-mode peers (behind NAT) contribute but own no part.
    :param matchmaking_time: how long to wait for peers to show up before averaging with those present.
    :param chunk_timeout: deadline for each chunk/keepalive exchange; None derives it from the chunk size
        and bandwidth. A member silent for that long is dropped from the round.
    :param clip_tau: Byzantine-robust rounds: each part we own is aggregated with CenteredClip of radius
        ``clip_tau`` (:func:`averaging.robust.centered_clip`) instead of the weighted mean, so one peer moves
        a part by at most ``clip_tau * its weight / the honest weight`` (L2) however wrong its values are.
        Pick it above the honest spread of a part (honest contributions within ``clip_tau`` of each other
        average exactly). None (default): the exact weighted mean.
    :param max_abs_value: if set, a contribution with any element beyond +-max_abs_value is out of range:
        excluded from the round and its sender banned, like NaN (pick it well above honest values).
    :param error_feedback: with a lossy ``compression``, remember what each chunk of our contributions and
        of the parts we reduce lost to compression, and add it to the same chunk next round (EF-SGD), so
        quantization errors cancel over rounds instead of accumulating. Meant for averaging updates (DiLoCo
        pseudo-gradients, gradients), not parameters. Kept only across successful rounds.
    :param ban_seconds: how long a peer that sent NaN/inf, out-of-range or undecodable data is refused
        (:mod:`averaging.bans`); 0 disables banning (such data is still excluded from the round).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], dht: DHT, prefix: str, *, target_group_size: int = 4,
                 min_group_size: int = 2, compression: str = "none", bandwidth: float | None = None,
                 matchmaking_time: float = 3.0, chunk_timeout: float | None = None,
                 round_timeout: float | None = None, chunk_bytes: int = 1 << 20, window_bytes: int = 8 << 20,
                 clip_tau: float | None = None, max_abs_value: float | None = None, ban_seconds: float = 600.0,
                 error_feedback: bool = False):
        if "/" in prefix or not prefix:
            raise ValueError(f"prefix must be non-empty and contain no '/': {prefix!r}")
        if not 2 <= min_group_size <= target_group_size:
            raise ValueError("need 2 <= min_group_size <= target_group_size")
        if bandwidth is not None and not (bandwidth > 0 and math.isfinite(bandwidth)):
            raise ValueError("bandwidth must be a positive number of MB/s (or None: not declared)")
        if clip_tau is not None and not (math.isfinite(clip_tau) and clip_tau > 0):
            raise ValueError(f"clip_tau must be a positive finite number, got {clip_tau!r}")
        if max_abs_value is not None and not max_abs_value > 0:
            raise ValueError(f"max_abs_value must be > 0, got {max_abs_value!r}")
        self.clip_tau, self.max_abs_value = clip_tau, max_abs_value
        self.feedback: dict[tuple, torch.Tensor] | None = {} if error_feedback else None
        self.bans = BanList(ban_seconds)
        self.dht, self.node, self.prefix = dht, dht.node, prefix
        self.peer_id, self.client_mode = dht.peer_id, dht.client_mode
        self.target_group_size, self.min_group_size = target_group_size, min_group_size
        self.bandwidth = float(bandwidth or NOMINAL_BANDWIDTH) * 1e6   # bytes/s
        self.pacing = PACING_SHARE * self.bandwidth if bandwidth is not None else None
        self.matchmaking_time = matchmaking_time
        self.buffer = FlatBuffer(tensors)
        self.results = [torch.empty_like(self.buffer.buffer), torch.empty_like(self.buffer.buffer)]
        self.compression = choose_compression(self.buffer.numel, compression, min_numel_to_compress=4096)
        self.chunk_elems = default_chunk_elems(self.compression, chunk_bytes)
        self.window_bytes = window_bytes
        self.max_frame = max(chunk_bytes * 2, self.compression.bytes_for(self.chunk_elems) + 4096)
        chunk_s = self.compression.bytes_for(self.chunk_elems) / self.bandwidth
        self.chunk_timeout = chunk_timeout or max(2.0, 20 * chunk_s)
        self.round_timeout = round_timeout
        self.signature_text = repr(self.buffer.signature())
        self.signature_hash = hashlib.sha256(self.signature_text.encode()).hexdigest()[:16]
        self.service = f"averager.{prefix}"
        self.matchmaker = Matchmaker(self)
        self.rounds: dict[str, AllReduceRound] = {}
        self._registered: dict[str, trio.Event] = {}
        self._step_lock = trio.Lock()
        self.steps = 0
        if not self.client_mode:
            self.node.serve(self.service, {"join": self._rpc_join, "part": self._rpc_part,
                                           "status": self._rpc_status, "fetch": self._rpc_fetch},
                            limits=ServiceLimits(max_message_bytes=self.max_frame, max_concurrent_per_peer=16,
                                                 handler_timeout=3600.0, read_timeout=self.chunk_timeout))

    @property
    def result(self) -> torch.Tensor:
        """The result buffer of the current round (two alternate, so a finished round can still serve)."""
        return self.results[self.steps % 2]

    # ------------------------------------------------------------------ public API
    def step(self, weight: float = 1.0, timeout: float | None = None) -> StepResult:
        """Average the tensors with a group (blocking). See :meth:`astep`."""
        return self.node.run(self.astep, weight, timeout)

    async def astep(self, weight: float = 1.0, timeout: float | None = None, *, group_key: str | None = None,
                    group_size: int | None = None, as_delta: bool = False) -> StepResult:
        """One round: find a group, all-reduce, write the weighted mean into the tensors.

        :param weight: this peer's weight in the mean (e.g. its number of samples since the last step).
        :param timeout: overall deadline; None means matchmaking time plus the data transfer at the
            declared bandwidth plus a few chunk deadlines.
        :param group_key, group_size: meet under another DHT key / in groups of another size (gossip).
        :param as_delta: add ``mean - snapshot`` to the tensors instead of overwriting them, so updates
            made to the tensors while the round ran (a training thread) are kept.
        """
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        async with self._step_lock:
            started = trio.current_time()
            self.steps += 1
            local = self.buffer.load_from_tensors()
            if not all_finite(local):
                raise ValueError("our own tensors contain NaN/Inf; refusing to average them into the group")
            if self.max_abs_value is not None and max_abs(local) > self.max_abs_value:
                raise ValueError(f"our own tensors have values beyond +-{self.max_abs_value:g} (max_abs_value); "
                                 f"the group would ban us")
            budget = timeout or self._default_timeout()
            result = StepResult(ok=False)
            round_ = None
            with trio.move_on_after(budget) as scope:
                try:
                    round_id, members = await self.matchmaker.form_group(group_key or matchmaking.group_key(self.prefix), group_size)
                except MatchmakingFailed as e:
                    result.reason = f"matchmaking failed: {e}"
                    return self._finish(result, started)
                group_formed = trio.current_time()
                result.matchmaking_s = group_formed - started
                round_ = AllReduceRound(self, round_id, members, float(weight), self.compression, self.chunk_elems,
                                        self.chunk_timeout)
                self.rounds[round_id] = round_
                self._registered.setdefault(round_id, trio.Event()).set()
                result.ok = await round_.run()
            if round_ is not None:
                result.allreduce_s = trio.current_time() - group_formed
                result.group_size, result.peers = len(round_.members), list(round_.peer_ids)
                result.bytes_sent, result.bytes_received = round_.stats.bytes_sent, round_.stats.bytes_received
                result.excluded, result.repaired_parts = sorted(round_.stats.excluded), round_.stats.repaired_parts
                self.node.spawn(self._forget_round, round_.round_id)
            if scope.cancelled_caught:
                result.ok, result.reason = False, f"round did not finish within {budget:.1f}s"
            elif not result.ok:
                result.reason = "some parts could not be averaged or repaired"
            if result.ok and as_delta:
                delta = self.result - self.buffer.buffer
                for i, tensor in enumerate(self.buffer.tensors):
                    a, b = self.buffer.offsets[i], self.buffer.offsets[i + 1]
                    with torch.no_grad():
                        tensor.add_(delta[a:b].view(tensor.shape).to(tensor.device, tensor.dtype))
            elif result.ok:
                self.buffer.buffer.copy_(self.result)
                self.buffer.store_to_tensors()
            if result.ok and self.feedback is not None:
                self._keep_feedback(round_.residuals)
            return self._finish(result, started)

    def _keep_feedback(self, staged: dict[tuple, torch.Tensor | None]) -> None:
        """Adopt a successful round's error-feedback residuals, keyed ``(kind, first, end)`` by element range.

        A slot the round did not touch keeps its residual (next round we may send that range again);
        one it used up (None) is dropped, and so is any old slot that overlaps a new one without being
        the same range (the group, hence the part layout, changed): at most one residual per element."""
        for key, residual in staged.items():
            kind, a, b = key
            for old in [k for k in self.feedback if k[0] == kind and k != key and k[1] < b and a < k[2]]:
                del self.feedback[old]
            if residual is None:
                self.feedback.pop(key, None)
            else:
                self.feedback[key] = residual

    def _default_timeout(self) -> float:
        transfer = 2 * self.compression.bytes_for(self.buffer.numel) / self.bandwidth
        return self.matchmaking_time * 3 + transfer + 6 * self.chunk_timeout + 5.0

    def _finish(self, result: StepResult, started: float) -> StepResult:
        result.duration = trio.current_time() - started
        routine = result.ok or result.reason.startswith("matchmaking failed")  # nobody around: not alarming
        log = logger.info if routine else logger.warning
        log("Averaging step %d: %s with %d peers in %.2fs%s", self.steps, "ok" if result.ok else "FAILED",
            result.group_size, result.duration, f" ({result.reason})" if result.reason else "")
        return result

    @property
    def linger(self) -> float:
        """How long a finished round stays available to members that still repair from it."""
        return 4 * self.chunk_timeout

    async def _forget_round(self, round_id: str) -> None:
        await trio.sleep(self.linger)
        self.rounds.pop(round_id, None)
        self._registered.pop(round_id, None)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stay reachable until recent rounds can no longer be repaired from us (at most ``linger`` s)."""
        async def drain() -> None:
            with trio.move_on_after(self.linger if timeout is None else timeout):
                while self.rounds:
                    await trio.sleep(0.1)
        if self.node.is_running:
            self.node.run(drain)

    # ------------------------------------------------------------------ RPC handlers
    async def _round(self, args: Any) -> AllReduceRound:
        if not isinstance(args, dict) or not isinstance(args.get("round"), str):
            raise ValueError("request must name a round")
        event = self._registered.setdefault(args["round"], trio.Event())
        with trio.move_on_after(self.chunk_timeout):
            await event.wait()
        round_ = self.rounds.get(args["round"])
        if round_ is None:
            self._registered.pop(args["round"], None)
            raise ValueError("unknown round (we are not a member, or it is over)")
        return round_

    async def _rpc_join(self, ctx: CallContext, args: Any) -> dict:
        return await self.matchmaker.rpc_join(ctx.peer_id, args)

    async def _rpc_part(self, ctx: CallContext, args: Any) -> str:
        round_ = await self._round(args)
        part, weight = args.get("part"), args.get("weight")
        if not isinstance(part, int) or not isinstance(weight, (int, float)):
            raise ValueError("part request needs an int 'part' and a number 'weight'")
        await round_.serve_part(ctx.stream, ctx.peer_id, part, float(weight), bool(args.get("repair")))
        return "ok"

    async def _rpc_status(self, ctx: CallContext, args: Any) -> list[int]:
        round_ = await self._round(args)
        if ctx.peer_id not in round_.peer_ids:
            raise ValueError("not a member of this round")
        with trio.move_on_after(round_.chunk_timeout * 2):
            await round_.phase1_done.wait()
        return round_.status()

    async def _rpc_fetch(self, ctx: CallContext, args: Any) -> str:
        round_ = await self._round(args)
        if ctx.peer_id not in round_.peer_ids or not isinstance(args.get("part"), int):
            raise ValueError("not a member of this round, or no part named")
        await round_.serve_fetch(ctx.stream, args["part"])
        return "ok"
