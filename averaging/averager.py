"""``Averager``: keep a list of tensors in sync with other peers, no coordinator, survives peers dying.

Example (every trainer runs the same)::

    avg = Averager(model.dense_parameters(), dht, prefix="mymodel", config=AveragerConfig(target_group_size=4))
    result = avg.step(weight=batch_size)      # averages in place; result.ok tells whether it did
    print(result.group_size, result.duration)

A step: matchmaking through the DHT (:mod:`averaging.matchmaking`), then a butterfly all-reduce with
repair (:mod:`averaging.allreduce`). Either every element of every tensor is replaced by the group's
weighted mean — bit-identical on every member that finishes — or the step reports failure and the
tensors are unchanged. Nothing waits without a deadline.
"""
from __future__ import annotations

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
from .bandwidth import UploadEstimate
from .bans import BanList
from .checks import all_finite, max_abs
from .compression import choose_compression, default_chunk_elems
from .config import AveragerConfig
from .feedback import ErrorFeedback, RoundFeedback
from .group import Member, RoundConfig
from .masked_round import SecureRound
from .matchmaking import Deadlines, Matchmaker, MatchmakingFailed, group_key as matchmaking_key
from .partition import FlatBuffer
from .secure import RoundKeys, SecureAggregationError

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
    #: the members whose contributions the mean holds (every part the same ones); empty if not ok. It may be
    #: fewer than ``group_size``: a member whose slice reached some owner too late is left out of every part
    #: (it still receives the mean of the others). See :mod:`averaging.membership`.
    contributors: list[str] = field(default_factory=list)
    #: the weight each contributor declared, as the part we own received it (ours included; empty if we own no
    #: part), and the contributors that own parts (``witnesses``: each of them saw every contributor's weight).
    #: Filled when our own part settled its membership, even if the round then failed: what a trainer
    #: records of its partners' contributions (see :mod:`peer.training.ledger`).
    observed_weights: dict[str, float] = field(default_factory=dict)
    witnesses: list[str] = field(default_factory=list)
    #: seconds from the step's start to each phase's end: "group", "sent", "reduced", "gathered", "repaired"
    timeline: dict[str, float] = field(default_factory=dict)


def round_config(config: AveragerConfig, numel: int, service: str) -> RoundConfig:
    """How every round of an averager of ``numel`` elements with ``config`` moves data (see RoundConfig).

    The per-chunk deadline, unless given, is 20 times a chunk's transfer at the declared (or nominal)
    bandwidth, and at least 2 s."""
    bandwidth = float(config.bandwidth or NOMINAL_BANDWIDTH) * 1e6   # bytes/s
    compression = choose_compression(numel, config.compression, min_numel_to_compress=4096)
    chunk_elems = default_chunk_elems(compression, config.chunk_bytes)
    chunk_s = compression.bytes_for(chunk_elems) / bandwidth
    return RoundConfig(
        service=service, compression=compression, chunk_elems=chunk_elems,
        chunk_timeout=config.chunk_timeout or max(2.0, 20 * chunk_s),
        max_frame=max(config.chunk_bytes * 2, compression.bytes_for(chunk_elems) + 4096),
        window_bytes=config.window_bytes, pacing=PACING_SHARE * bandwidth if config.bandwidth is not None else None,
        clip_tau=config.clip_tau, max_abs_value=config.max_abs_value)


def step_timeout(config: AveragerConfig, rounds: RoundConfig, numel: int, deadlines: Deadlines) -> float:
    """A step's deadline when none is given: matchmaking (gathering, then a follower's join call), the data
    both ways at our bandwidth, then the slowest sender's start, settling the membership (a silent owner's
    answer), and a repair (a status call and a fetch)."""
    bandwidth = float(config.bandwidth or NOMINAL_BANDWIDTH) * 1e6
    matchmaking = config.matchmaking_time + deadlines.join_call_timeout
    transfer = 2 * rounds.compression.bytes_for(numel) / bandwidth
    return (matchmaking + transfer + rounds.start_timeout + rounds.chunk_timeout + rounds.status_timeout
            + rounds.chunk_timeout)


class Averager:
    """Averages ``tensors`` in place with groups of peers found under ``prefix`` in the DHT.

    :param tensors: floating-point tensors (CPU or CUDA) to keep in sync; shapes and dtypes must match
        the other peers' (checked in matchmaking before any data moves).
    :param dht: a running :class:`dht.DHT`; the averager serves its RPCs on the DHT's node.
    :param prefix: name of what is averaged (e.g. the model name); peers with the same prefix average.
    :param config: how groups form and rounds run (:class:`~averaging.config.AveragerConfig`: group size,
        compression, declared bandwidth, deadlines, robust aggregation, error feedback, bans).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], dht: DHT, prefix: str, config: AveragerConfig | None = None):
        if "/" in prefix or not prefix:
            raise ValueError(f"prefix must be non-empty and contain no '/': {prefix!r}")
        self.config = c = config or AveragerConfig()
        self.feedback = ErrorFeedback() if c.error_feedback else None
        self.bans = BanList(c.ban_seconds)
        self.dht, self.node, self.prefix = dht, dht.node, prefix
        self.peer_id, self.client_mode = dht.peer_id, dht.client_mode
        self.bandwidth = float(c.bandwidth or NOMINAL_BANDWIDTH) * 1e6   # bytes/s
        self.upload = UploadEstimate()   # measured from our rounds; announced when none was declared
        self.buffer = FlatBuffer(tensors)
        self.results = [torch.empty_like(self.buffer.buffer), torch.empty_like(self.buffer.buffer)]
        self.round_config = round_config(c, self.buffer.numel, f"averager.{prefix}")
        signature = (self.buffer.signature(), "secure aggregation") if c.secure_aggregation else self.buffer.signature()
        self.tasks = self.node.task_group(f"averager {prefix}")   # forgetting finished rounds, tombstones
        self.matchmaker = Matchmaker(dht, self.tasks, self.round_config.service, prefix,
                                     Member(self.peer_id, self.bandwidth, self.client_mode), repr(signature),
                                     self.bans, target_group_size=c.target_group_size,
                                     min_group_size=c.min_group_size, matchmaking_time=c.matchmaking_time)
        self.rounds: dict[str, AllReduceRound] = {}
        self._registered: dict[str, trio.Event] = {}
        self._step_lock = trio.Lock()
        self.steps = 0
        if not self.client_mode:
            self.node.serve(self.round_config.service, {"join": self._rpc_join, "part": self._rpc_part,
                                                        "status": self._rpc_status, "fetch": self._rpc_fetch,
                                                        "included": self._rpc_included},
                            limits=ServiceLimits(max_message_bytes=self.round_config.max_frame,
                                                 max_concurrent_per_peer=16, handler_timeout=3600.0,
                                                 read_timeout=self.round_config.chunk_timeout))

    @property
    def compression(self):
        """How this averager's rounds encode what they send (:mod:`averaging.compression`)."""
        return self.round_config.compression

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
            bound = self.round_config.max_abs_value  # a secure round clips to it instead (masked_round)
            if bound is not None and not self.config.secure_aggregation and max_abs(local) > bound:
                raise ValueError(f"our own tensors have values beyond +-{bound:g} (max_abs_value); "
                                 f"the group would ban us")
            budget = timeout or self._default_timeout()
            result = StepResult(ok=False)
            round_ = None
            with trio.move_on_after(budget) as scope:
                key = group_key or matchmaking_key(self.prefix)
                keys = RoundKeys(key.encode(), self.peer_id, self.node.key_pair.private_key.sign) \
                    if self.config.secure_aggregation else None
                offer = {"pk": keys.public_key, "ksig": keys.signature, "w": float(weight)} if keys else None
                try:
                    round_id, members = await self.matchmaker.form_group(key, group_size, offer)
                    secure = SecureRound(keys, self.matchmaker.offers, round_id, self.peer_id,
                                         self.config.max_abs_value) if keys else None
                except (MatchmakingFailed, SecureAggregationError) as e:
                    result.reason = f"matchmaking failed: {e}"
                    return self._finish(result, started)
                group_formed = trio.current_time()
                result.matchmaking_s = group_formed - started
                round_ = AllReduceRound(self.node, self.round_config, round_id, members, self.peer_id, float(weight),
                                        local, self.result, self.bans, RoundFeedback(self.feedback, self.compression),
                                        secure)
                self.rounds[round_id] = round_
                self._registered.setdefault(round_id, trio.Event()).set()
                result.ok = await round_.run()
            if round_ is not None:
                result.allreduce_s = trio.current_time() - group_formed
                result.group_size, result.peers = len(round_.members), list(round_.peer_ids)
                result.bytes_sent, result.bytes_received = round_.stats.bytes_sent, round_.stats.bytes_received
                result.excluded, result.repaired_parts = sorted(round_.stats.excluded), round_.stats.repaired_parts
                result.observed_weights, result.witnesses = dict(round_.stats.observed_weights), round_.witnesses
                result.timeline = {"group": group_formed - started,
                                   **{k: t - started for k, t in round_.stats.timeline.items()}}
                if result.ok:
                    result.contributors = list(round_.contributors)
                self._measure_upload(result)
                self.tasks.spawn(self._forget_round, round_.round_id)
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
            if result.ok:
                round_.feedback.adopt()
            return self._finish(result, started)

    def _measure_upload(self, result: StepResult) -> None:
        """Feed the round's send phase to :attr:`upload`; without a declared bandwidth, announce the estimate
        from the next round on (:mod:`averaging.bandwidth`)."""
        if "sent" not in result.timeline:
            return
        self.upload.add(result.bytes_sent, result.timeline["sent"] - result.timeline["group"])
        measured = self.upload.bytes_per_s
        if self.config.bandwidth is None and measured is not None:
            self.bandwidth = measured
            self.matchmaker.me = Member(self.peer_id, measured, self.client_mode)

    def _default_timeout(self) -> float:
        return step_timeout(self.config, self.round_config, self.buffer.numel, self.matchmaker.deadlines)

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
        return self.round_config.linger

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
        self.tasks.close()

    # ------------------------------------------------------------------ RPC handlers
    async def _round(self, args: Any) -> AllReduceRound:
        if not isinstance(args, dict) or not isinstance(args.get("round"), str):
            raise ValueError("request must name a round")
        event = self._registered.setdefault(args["round"], trio.Event())
        with trio.move_on_after(self.round_config.chunk_timeout):
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
        with trio.move_on_after(self.round_config.start_timeout):
            await round_.phase1_done.wait()
        return round_.status()

    async def _rpc_included(self, ctx: CallContext, args: Any) -> list[str]:
        round_ = await self._round(args)
        if ctx.peer_id not in round_.peer_ids:
            raise ValueError("not a member of this round")
        return await round_.serve_included()

    async def _rpc_fetch(self, ctx: CallContext, args: Any) -> str:
        round_ = await self._round(args)
        if ctx.peer_id not in round_.peer_ids or not isinstance(args.get("part"), int):
            raise ValueError("not a member of this round, or no part named")
        await round_.serve_fetch(ctx.stream, args["part"])
        return "ok"
