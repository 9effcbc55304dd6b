"""Step 4 of a round (:mod:`averaging.allreduce`): repair the parts a member is missing after the all-gather.

1. Ask every other member which parts it holds (its ``status``, once its own all-gather is over).
2. A part some member holds is fetched from it: raw float32 (exact), checked finite, with the membership
   its mean holds (:mod:`averaging.membership`).
3. A part nobody holds (its owner died before sending it to anyone) is reduced again by its first
   responsive non-client member of the round's membership, from exactly that membership's slices: a member
   outside it, or one that holds parts that already disagree, has nothing to repair towards and stops.

:class:`RepairPhase` is the part of :class:`~averaging.allreduce.AllReduceRound` that does this (and serves
what others fetch); it uses the round's parts, results and streams.
"""
from __future__ import annotations

import logging

import torch
import trio

from p2p import P2PError, open_call, read_reply
from p2p.streams import PayloadSender, receive_payload

from .checks import all_finite
from .membership import agreed, parse_result_header, result_header

logger = logging.getLogger(__name__)


class RepairPhase:
    """Step 4 for an :class:`~averaging.allreduce.AllReduceRound` (which provides the attributes used here)."""

    def status(self) -> list[int]:
        return sorted(self.have)

    def part_values(self, part: int) -> torch.Tensor:
        start, end = self.parts[part]
        return self.result[start:end]

    async def repair(self, missing: list[int]) -> None:
        """Steps 1-3 of the module docstring for the parts in ``missing``."""
        logger.info("Round %s: repairing parts %s", self.round_id[-8:], missing)
        settled = agreed(self.memberships, sorted(self.memberships))
        if settled is None:  # the parts we hold already disagree, or we hold none: nothing to repair towards
            return
        holders: dict[str, list[int]] = {self.me: self.status()}

        async def ask(peer_id: str) -> None:
            try:
                reply = await self.node.call(peer_id, self.config.service, "status", {"round": self.round_id},
                                             timeout=self.config.status_timeout)
                if isinstance(reply, list):
                    holders[peer_id] = [int(p) for p in reply if isinstance(p, int)]
            except P2PError as e:
                logger.info("Round %s: %s did not answer status: %s", self.round_id[-8:], peer_id[-8:], e)

        async with trio.open_nursery() as nursery:
            for m in self.members:
                if m.peer_id != self.me and not m.client:
                    nursery.start_soon(ask, m.peer_id)
        responsive = [p for p in self.peer_ids if p in holders and not self.bans.is_banned(p)]
        self.repair_owner: dict[int, str] = {}
        to_fetch, to_reduce = {}, []
        for j in missing:
            donors = [p for p in responsive if j in holders[p] and p != self.me]
            if donors:
                to_fetch[j] = donors
            else:
                owners = [p for p in responsive if p in settled and not self.members[self.peer_ids.index(p)].client]
                if not owners or self.me not in settled:  # a repair reduces exactly the membership's slices
                    return
                self.repair_owner[j] = owners[0]
                to_reduce.append(j)
        async with trio.open_nursery() as nursery:
            for j, donors in to_fetch.items():
                nursery.start_soon(self._fetch_any, j, donors)
            for j in to_reduce:
                self.stats.repaired_parts.append(j)
                if self.repair_owner[j] == self.me:
                    self.open_part(j, sorted(settled))
                    nursery.start_soon(self.finish_part, j, self._transfer_budget(), True)
                else:
                    nursery.start_soon(self.exchange_part, j, True)

    async def _fetch_any(self, part: int, donors: list[str]) -> None:
        for donor in donors:
            if await self._fetch(part, donor):
                return

    async def _fetch(self, part: int, donor: str) -> bool:
        start, end = self.parts[part]
        try:
            async with open_call(self.node, donor, self.config.service, "fetch",
                                 {"round": self.round_id, "part": part}, timeout=self.chunk_timeout,
                                 max_message_bytes=self.config.max_frame, bulk=True) as stream:
                stream.timeout = self.chunk_timeout
                members = parse_result_header(await stream.recv_msg(), self.peer_ids)
                view = memoryview(self.result[start:end].numpy()).cast("B")
                offset = 0
                async with receive_payload(stream, window_bytes=self.config.window_bytes,
                                           timeout=self.chunk_timeout, max_bytes=len(view)) as incoming:
                    async for blob in incoming:
                        view[offset:offset + len(blob)] = blob
                        offset += len(blob)
                await read_reply(stream, "fetch")
            if offset == len(view):
                if not all_finite(self.result[start:end]):
                    self._ban(donor, f"served part {part} with NaN/inf")
                    return False
                self.memberships[part] = members
                self.have.add(part)
                return True
        except (P2PError, ValueError) as e:  # ReduceError is a ValueError
            logger.info("Round %s: fetching part %d from %s failed: %s", self.round_id[-8:], part, donor[-8:], e)
        return False

    async def serve_fetch(self, stream, part: int) -> None:
        if part not in self.have:
            raise ValueError(f"we do not hold part {part} of round {self.round_id[-8:]}")
        values = self.part_values(part)
        await stream.send_msg(result_header(self.memberships[part]))
        sender = PayloadSender(stream, window_bytes=self.config.window_bytes, timeout=self.chunk_timeout)
        await sender.send_buffer(memoryview(values.numpy()).cast("B"))
        await sender.finish()
