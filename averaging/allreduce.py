"""Butterfly all-reduce of one group, with repair so that a dying member never leaves elements un-averaged.

The flat buffer is split into one contiguous part per member, sized by bandwidth (client-mode
members own nothing). Then, on every member at once:

1. **Scatter-reduce.** For every other owner ``j`` open one stream and send our slice of part ``j``
   (compressed, in chunks). Owner ``j`` adds each chunk to a :class:`PartReducer` as it arrives, so
   network and reduction overlap. A sender that stalls (no chunk for ``chunk_timeout``), sends NaN/Inf,
   or never shows up is excluded from that part; one that sent NaN/Inf or garbage is also banned
   (:mod:`averaging.bans`). With a declared bandwidth each flow is paced at its share of it
   (:func:`~averaging.partition.pacing_rates`), so all end together and a capped uplink stays busy.
2. **Settle the membership** (:mod:`averaging.membership`): when its part's senders are done, the owner
   asks the other owners whom they included; the round's mean holds exactly the members included by
   every owner that answered, in every part.
3. **All-gather.** The owner compresses its part's mean over that membership once and sends the same
   bytes, headed by the membership, back on every stream; everybody (the owner included) keeps
   ``decompress(bytes)``, so all members hold bit-identical values for the part. While waiting the owner
   sends keepalives, so a dead or frozen owner is detected within ``chunk_timeout``. A result with NaN/Inf
   is refused (and its owner banned): that part is then missing, and repaired without it.
4. **Repair** (only when some part is missing). Ask every other member which parts it holds. A part
   some member holds is fetched from it (raw float32, exact, checked finite, with its membership). A part
   nobody holds (its owner died before sending it to anyone) is reduced again, from the contributions of
   exactly the round's membership, by its first responsive non-client member.

With secure aggregation (:mod:`averaging.masked_round`) phase 1 carries masked fixed-point slices and the owner
asks the settled members for corrections before it unmasks the sum; the other phases are the same.

A member commits (writes results into its tensors) only if it holds every part and every part holds the
same membership of two or more; otherwise the round fails explicitly and its tensors stay unchanged.
Members keep a finished round around for ``linger`` seconds so that others can still fetch parts from them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import trio

from p2p import Node, P2PError, open_call, read_reply
from p2p.streams import PayloadSender, receive_payload

from .bans import BanList
from .checks import all_finite, max_abs
from .feedback import RoundFeedback
from .group import Member, RoundConfig, keep_alive_until
from .masked_round import MaskedParts, SecureRound
from .membership import agreed, parse_result_header, result_header, settle
from .repair import RepairPhase
from .partition import iter_chunks, pacing_rates, split_by_bandwidth
from .reduce import BadContribution, PartReducer, ReduceError

logger = logging.getLogger(__name__)


@dataclass
class RoundStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    excluded: set[str] = field(default_factory=set)
    repaired_parts: list[int] = field(default_factory=list)
    #: the weights our own part received from each member of its settled membership (ours included)
    observed_weights: dict[str, float] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)   # phase -> trio time it ended

    def mark(self, phase: str) -> None:
        self.timeline[phase] = trio.current_time()


class AllReduceRound(RepairPhase, MaskedParts):
    """One member's state for one all-reduce round; created by :class:`~averaging.averager.Averager`.

    :param node: our p2p node; ``config``: the averager's :class:`~averaging.group.RoundConfig`.
    :param round_id, members: as matchmaking agreed them; ``me``: our peer ID among them.
    :param weight: our contribution's weight; ``local``: our contribution (flat, not changed by the round).
    :param result: where reduced parts land (same size as ``local``).
    :param bans: peers caught sending garbage (banned here, consulted in repair).
    :param feedback: compresses what we send, with error feedback if the averager keeps it.
    :param secure: the round's secure aggregation (:mod:`averaging.masked_round`), or None for a plain round.
    """

    def __init__(self, node: Node, config: RoundConfig, round_id: str, members: list[Member], me: str,
                 weight: float, local: torch.Tensor, result: torch.Tensor, bans: BanList, feedback: RoundFeedback,
                 secure: SecureRound | None = None):
        self.node, self.config, self.round_id, self.members, self.weight = node, config, round_id, members, weight
        self.compression, self.chunk_elems, self.chunk_timeout = config.compression, config.chunk_elems, \
            config.chunk_timeout
        self.me, self.bans, self.feedback, self.secure = me, bans, feedback, secure
        self.asked: dict[int, trio.Event] = {}                # secure: the owner knows whose corrections it needs
        self.correction_asks: dict[int, list[str]] = {}       # secure: part -> the members outside its membership
        self.peer_ids = [m.peer_id for m in members]
        self.index = self.peer_ids.index(me)
        self.parts = split_by_bandwidth(local.numel(), [0.0 if m.client else m.bandwidth for m in members])
        self.upload_pace, self.result_pace = pacing_rates(self.parts, self.index, config.pacing)  # bytes/s
        self.local, self.result = local, result
        self.have: set[int] = {j for j, (a, b) in enumerate(self.parts) if a == b}
        self.reducers: dict[int, PartReducer] = {}
        self.reducer_ready: dict[int, trio.Event] = {}
        self.result_bytes: dict[int, list[bytes]] = {}
        self.result_ready: dict[int, trio.Event] = {}
        self.phase1_done = trio.Event()
        self.included = trio.Event()                          # our own part's included set is fixed
        self.own_included: frozenset[str] = frozenset()
        self.memberships: dict[int, tuple[str, ...]] = {}     # part -> whose contributions its mean holds
        self.started_at = trio.current_time()
        self.started: dict[int, set[str]] = {}
        self.progress: dict[int, trio.Event] = {}
        self.stats = RoundStats()

    # ------------------------------------------------------------------ helpers
    def _event(self, table: dict[int, trio.Event], part: int) -> trio.Event:
        return table.setdefault(part, trio.Event())

    def _chunks(self, part: int):
        return iter_chunks(*self.parts[part], self.chunk_elems)

    def open_part(self, part: int, senders: list[str]) -> PartReducer:
        """Start reducing ``part`` from ``senders`` (we must be one of them); our own slice goes in now."""
        start, end = self.parts[part]
        reducer = self._new_reducer(part, senders)
        own = self.local[start:end]
        # our slice goes in exactly: what earlier rounds lost of it goes in with it, once
        lost = [(a, b, r) for a, b in self._chunks(part) if (r := self.feedback.take(("sent", a, b))) is not None]
        if lost:
            own = own.clone()
            for a, b, residual in lost:
                own[a - start:b - start] += residual
        reducer.add(self.me, 0, self._own_slice(part, own), self.weight, copy=False)  # the round's snapshot
        reducer.sender_finished(self.me)
        self.reducers[part] = reducer
        self._event(self.reducer_ready, part).set()
        return reducer

    def _poke(self, part: int) -> None:
        self._event(self.progress, part).set()

    async def _wait_progress(self, part: int) -> None:
        await self._event(self.progress, part).wait()
        self.progress[part] = trio.Event()

    async def finish_part(self, part: int, deadline_senders: float, repair: bool = False) -> None:
        """Wait until every sender finished or was excluded, settle the membership, then publish the mean.

        A sender that has not started within ``start_timeout`` (dialing a new peer and its handshake
        may take a while on a busy machine) is excluded; one that started is bounded by the per-chunk
        deadline of its own stream, and everything by ``deadline_senders``.
        """
        reducer = self.reducers[part]
        started = self.started.setdefault(part, {self.me})
        with trio.move_on_after(self.config.start_timeout):
            while not reducer.is_complete() and len(started) < len(reducer.expected_senders):
                await self._wait_progress(part)
        for sender in reducer.active_senders:
            if sender not in started:
                logger.info("Round %s: excluding %s from part %d (it never started sending)", self.round_id[-8:],
                            sender[-8:], part)
                reducer.exclude(sender)
                self.stats.excluded.add(sender)
        # wait for every sender's end mark, not just for its data: a sender whose chunks are all in but
        # whose END frame is still in flight has not finished, and must not be excluded for it
        with trio.move_on_after(deadline_senders):
            while not (reducer.active_senders and reducer.finished_senders >= set(reducer.active_senders)):
                await self._wait_progress(part)
        for sender in reducer.active_senders:
            if sender not in reducer.finished_senders:
                logger.info("Round %s: excluding %s from part %d (no complete contribution in time)",
                            self.round_id[-8:], sender[-8:], part)
                reducer.exclude(sender)
                self.stats.excluded.add(sender)
        included = frozenset(reducer.active_senders)
        if repair:  # reduced from the membership the round settled on: it holds that, or the round fails
            members = included
        else:
            self.own_included = included
            self.included.set()
            owners = [m.peer_id for j, m in enumerate(self.members) if j != part and self._nonempty(j)]
            members = await settle(self.node, self.config.service, self.round_id, included, owners,
                                   self.settle_deadline())
        for sender in reducer.active_senders:
            if sender not in members:
                reducer.exclude(sender)
        mean = reducer.result() if reducer.active_senders and await self._unmask(part, reducer, members) else None
        if mean is None or self.secure and not self._in_range(mean):
            logger.info("Round %s: part %d has no contribution left to average", self.round_id[-8:], part)
            del self.reducers[part]
            self._part_done(part)
            return
        self.memberships[part] = tuple(sorted(members))
        if part == self.index and not repair:
            self.stats.observed_weights = reducer.weights()
        start, _ = self.parts[part]
        self.result_bytes[part] = [self.feedback.compress(("result", a, b), mean[a - start:b - start].contiguous(),
                                                          out=self.result[a:b]) for a, b in self._chunks(part)]
        self.have.add(part)
        self.stats.mark("reduced")
        del self.reducers[part]  # free the per-sender buffers now
        self._part_done(part)

    def _nonempty(self, part: int) -> bool:
        return self.parts[part][0] < self.parts[part][1]

    def settle_deadline(self) -> float:
        """When a live owner has fixed its included set at the latest (its senders' start and transfer
        deadlines from the round's start, see :meth:`finish_part`), plus a chunk deadline for its answer."""
        return self.started_at + self.config.start_timeout + self._transfer_budget() + self.chunk_timeout

    async def serve_included(self) -> list[str]:
        """Whom our part included (step 2 of :mod:`averaging.membership`), once it is fixed."""
        if not self._nonempty(self.index):
            raise ValueError(f"we own no part of round {self.round_id[-8:]}")
        with trio.move_on_after(max(self.settle_deadline() - trio.current_time(), 0.0)):
            await self.included.wait()
        if not self.included.is_set():
            raise ValueError(f"our part of round {self.round_id[-8:]} is not reduced yet")
        return sorted(self.own_included)

    @property
    def witnesses(self) -> list[str]:
        """Contributors that own a part (each saw every contributor's weight): from the round's membership,
        or our own part's when the parts disagree."""
        members = self.contributors or self.memberships.get(self.index, ())
        return [p for j, p in enumerate(self.peer_ids) if p in members and self._nonempty(j)]

    @property
    def contributors(self) -> tuple[str, ...] | None:
        """The membership every part holds, if they all hold the same one (else the round cannot commit)."""
        return agreed(self.memberships, [j for j in range(len(self.parts)) if self._nonempty(j)])

    # ------------------------------------------------------------------ sender side
    async def exchange_part(self, part: int, repair: bool = False) -> bool:
        """Send our slice of ``part`` to its owner and receive the reduced part back."""
        owner = self.members[part].peer_id if not repair else self.repair_owner[part]
        header = {"round": self.round_id, "part": part, "weight": self.weight, "repair": repair}
        try:
            async with open_call(self.node, owner, self.config.service, "part", header,
                                 timeout=self.config.start_timeout, max_message_bytes=self.config.max_frame,
                                 bulk=True) as stream:
                stream.timeout = self.chunk_timeout
                if self.upload_pace and not repair:
                    stream.pace(self.upload_pace[part])
                sender = PayloadSender(stream, window_bytes=self.config.window_bytes, timeout=self.chunk_timeout)
                for a, b in self._chunks(part):
                    await sender.send(self._contribution(part, a, b))
                await sender.finish()
                self.stats.mark("sent")  # the last part's send to end sets it
                members = parse_result_header(await self._result_header(stream, part), self.peer_ids)
                chunks = list(self._chunks(part))
                async with receive_payload(stream, window_bytes=self.config.window_bytes,
                                           timeout=self.chunk_timeout) as incoming:
                    i = 0
                    async for blob in incoming:
                        if i >= len(chunks):
                            raise ReduceError("owner sent more chunks than the part has")
                        a, b = chunks[i]
                        self._accept_result(owner, blob, a, b)
                        i += 1
                if i != len(chunks):
                    raise ReduceError(f"owner sent {i} of {len(chunks)} chunks")
                await read_reply(stream, "part")
                self.stats.bytes_sent += stream.bytes_sent
                self.stats.bytes_received += stream.bytes_received
            self.memberships[part] = members
            self.have.add(part)
            return True
        except (P2PError, ReduceError, ValueError) as e:
            logger.info("Round %s: part %d with owner %s failed: %s", self.round_id[-8:], part, owner[-8:], e)
            return False

    def _accept_result(self, owner: str, blob, a: int, b: int) -> None:
        """Decode an owner's reduced chunk into ``result[a:b]``; an owner that sends garbage is banned."""
        try:
            self.compression.decompress(blob, b - a, out=self.result[a:b])
        except ValueError as e:
            self._ban(owner, f"sent an undecodable result chunk: {e}")
            raise ReduceError(f"owner {owner[-8:]} sent an undecodable result chunk") from None
        if not all_finite(self.result[a:b]):
            self._ban(owner, "sent a result with NaN/inf")
            raise ReduceError(f"owner {owner[-8:]} sent a result with NaN/inf")
        bound = self.config.max_abs_value  # a mean of in-range values is in range
        if bound is not None and max_abs(self.result[a:b]) > bound:
            self._ban(owner, f"sent a result beyond +-{bound:g}")
            raise ReduceError(f"owner {owner[-8:]} sent a result beyond +-{bound:g}")

    def _ban(self, peer_id: str, reason: str) -> None:
        self.bans.ban(peer_id, f"round {self.round_id[-8:]}: {reason}")

    # ------------------------------------------------------------------ owner side (called by the RPC handler)
    async def serve_part(self, stream, sender_id: str, part: int, weight: float, repair: bool) -> None:
        """Receive ``sender_id``'s slice of ``part``, then send back the reduced part."""
        if sender_id not in self.peer_ids or not 0 <= part < len(self.parts):
            raise ValueError(f"{sender_id[-8:]} is not a member of round {self.round_id[-8:]} or part is invalid")
        with trio.move_on_after(self.config.start_timeout):
            await self._event(self.reducer_ready, part).wait()
        reducer = self.reducers.get(part)
        if reducer is None:
            raise ValueError(f"we do not reduce part {part} in round {self.round_id[-8:]}")
        if sender_id not in reducer.expected_senders:
            raise ValueError(f"{sender_id[-8:]} is not in the membership part {part} is reduced from")
        if self.bans.is_banned(sender_id):  # e.g. banned this round for the NaN result of its own part
            if sender_id in reducer.expected_senders:  # excluded now, rather than awaited until the deadline
                reducer.exclude(sender_id)
                self.stats.excluded.add(sender_id)
                self._poke(part)
            raise ValueError(f"we do not average with you: {self.bans.why(sender_id)}")
        start, _ = self.parts[part]
        self.started.setdefault(part, {self.me}).add(sender_id)
        self._poke(part)
        try:
            async with receive_payload(stream, window_bytes=self.config.window_bytes,
                                       timeout=self.chunk_timeout) as incoming:
                for a, b in self._chunks(part):
                    values = self._decode_contribution(sender_id, await incoming.__anext__(), b - a)
                    bound = None if self.secure else self.config.max_abs_value  # masked: uniform noise
                    if bound is not None and max_abs(values) > bound:
                        raise BadContribution(sender_id, f"chunk at {a - start} has values beyond +-{bound:g}")
                    reducer.add(sender_id, a - start, values, weight)
                async for _ in incoming:
                    raise ReduceError("sender sent more chunks than the part has")
            reducer.sender_finished(sender_id)
            self._poke(part)
        except BaseException as e:
            if part in self.reducers:
                reducer.exclude(sender_id)
                self.stats.excluded.add(sender_id)
                self._poke(part)
            if isinstance(e, BadContribution):
                self.bans.ban(sender_id, f"round {self.round_id[-8:]} part {part}: {e.reason}")
            if isinstance(e, (ReduceError, P2PError, ValueError, StopAsyncIteration)):
                logger.info("Round %s: excluded %s from part %d: %s", self.round_id[-8:], sender_id[-8:], part,
                            e or type(e).__name__)
            raise
        if self.secure:
            await self._serve_correction(stream, sender_id, part)
        await keep_alive_until(stream, self._event(self.result_ready, part), self.config.keepalive_interval)
        if part not in self.memberships:
            raise ValueError(f"part {part} of round {self.round_id[-8:]} has no contribution left to average")
        await stream.send_msg(result_header(self.memberships[part]))
        if self.result_pace and not repair:
            stream.pace(self.result_pace)
        sender = PayloadSender(stream, window_bytes=self.config.window_bytes, timeout=self.chunk_timeout)
        for blob in self.result_bytes[part]:
            await sender.send(blob)
        await sender.finish()

    # ------------------------------------------------------------------ the round
    async def run(self) -> bool:
        """Phases 1–3 of the module docstring; True if we hold every part afterwards."""
        async with trio.open_nursery() as nursery:
            if self._nonempty(self.index):
                self.open_part(self.index, self.peer_ids)
                # each sender gets chunk_timeout per frame; allow the whole part to arrive at the
                # slowest declared bandwidth, plus that timeout for stragglers
                nursery.start_soon(self.finish_part, self.index, self._transfer_budget())
            for j in range(len(self.parts)):
                if j != self.index and self._nonempty(j):
                    nursery.start_soon(self.exchange_part, j)
        self.phase1_done.set()
        self.stats.mark("gathered")
        missing = [j for j in range(len(self.parts)) if j not in self.have]
        if missing:
            await self.repair(missing)
            self.stats.mark("repaired")
        if len(self.have) < len(self.parts):
            return False
        if self.contributors is None:
            logger.info("Round %s: parts hold different memberships (%s): not committed", self.round_id[-8:],
                        sorted({len(m) for m in self.memberships.values()}))
            return False
        return True

    def _transfer_budget(self) -> float:
        nbytes = self.compression.bytes_for(self.local.numel())
        slowest = min((m.bandwidth for m in self.members if m.bandwidth > 0), default=1.0)
        return nbytes / slowest + self.config.start_timeout
