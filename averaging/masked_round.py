"""Secure aggregation inside an all-reduce round: part owners sum masked slices and learn only the sum.

The arithmetic is :mod:`averaging.secure`'s; this module runs it in the phases of :mod:`averaging.allreduce`:

1. **Keys** (matchmaking). Every member offers a fresh X25519 key signed by its identity, and its weight; the
   leader relays all offers with the member list, and each member verifies every one (:class:`SecureRound`), so
   a leader cannot slip in a key of its own. Each pair of members derives one seed for the round.
2. **Scatter.** Member ``i`` sends owner ``j`` its slice of part ``j`` as the fixed point of
   ``clip(x_i, +-bound) * w_i / W`` (``W``: the group's declared weights) plus its pairwise masks, 4 bytes an
   element (no compression). The owner keeps the masked slices (float64 holds them exactly).
3. **Settle** the membership ``M`` as in a plain round. If ``M`` is the whole group the masks cancel in the sum.
   Otherwise the owner asks every member of ``M``, on the stream it sent its slice on, for its correction (minus
   its masks with the members outside ``M``, :func:`~averaging.secure.dropout_correction`), and adds its own.
4. **Unmask.** The sum modulo ``2**32`` decodes to ``sum_{i in M} w_i x_i / W``; divided by
   ``sum_{i in M} w_i / W`` it is the weighted mean over ``M``, sent back in float32 as in a plain round.

**A member that dies** before the membership settles is left out of it: its contribution is in no part of the
round (the settle rule drops it everywhere) and the survivors' corrections remove its masks, so the survivors
hold their own mean. A member of ``M`` that dies before answering leaves its owner's part unmasked by nobody:
that part is not reduced and the round fails (no member's tensors change); the next round forms without it.

**What an owner learns:** the sum over ``M`` of its part. Caveat of this simple protocol (Bonawitz et al.'s
second, self mask is not implemented): a member that was alive but excluded from ``M`` after its slice reached
an owner (another owner timed it out) has that slice's masks revealed to that owner by the corrections, so the
owner is trusted to drop a slice it was asked to drop.

**Given up** against a plain round: the per-member checks of an owner (NaN and range bans, CenteredClip), error
feedback and compression. **Kept:** each member checks its own contribution before masking it (finite, within
the bound), an owner refuses to send a mean beyond the bound (a member sent garbage: the part is not reduced),
and members refuse and ban an owner whose result is beyond it.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import trio

from p2p.streams import PayloadSender, receive_payload

from .checks import max_abs
from .group import KEEPALIVE, keep_alive_until
from .reduce import BadContribution, IncompleteReduction, PartReducer, ReduceError
from .secure import MODULUS_BITS, FixedPoint, RoundKeys, SecureAggregationError, dropout_correction, mask, \
    verify_public_key

logger = logging.getLogger(__name__)

MODULUS = 1 << MODULUS_BITS


def to_wire(values: torch.Tensor) -> bytes:
    """Integers in ``[0, 2**32)`` as 4 bytes each (little-endian unsigned)."""
    return values.numpy().astype("<u4").tobytes()


def from_wire(blob, numel: int) -> torch.Tensor:
    """:func:`to_wire` back, as float64 (exact for integers below 2**53)."""
    if len(blob) != 4 * numel:
        raise ValueError(f"a masked chunk of {numel} elements has {4 * numel} bytes, not {len(blob)}")
    return torch.from_numpy(np.frombuffer(blob, dtype="<u4").astype(np.float64))


class SecureRound:
    """One member's secrets and codec for one secure round (steps 1, 2 and 4 of the module docstring).

    :param keys: our key pair, whose public half we offered in matchmaking.
    :param offers: every member's offer as matchmaking relayed it, ours included: ``{peer: {"pk", "ksig", "w"}}``.
    :param round_id, me: the round and our peer ID; ``bound``: contributions are clipped to +-bound.
    Raises :class:`~averaging.secure.SecureAggregationError` for an offer that does not verify.
    """

    def __init__(self, keys: RoundKeys, offers: dict, round_id: str, me: str, bound: float):
        self.me, self.bound = me, bound
        self.seeds: dict[str, bytes] = {}
        self.weights: dict[str, float] = {}
        for peer, offer in offers.items():
            w = offer.get("w") if isinstance(offer, dict) else None
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
                raise SecureAggregationError(f"the secure aggregation offer of {peer[-8:]} has no valid weight")
            self.weights[peer] = float(w)
            if peer != me:
                verify_public_key(keys.context, peer, offer.get("pk"), offer.get("ksig"))
                self.seeds[peer] = keys.pair_seed(peer, offer["pk"], round_id.encode())
        if me not in self.weights:
            raise SecureAggregationError("our own offer is missing from the group's")
        self.total_weight = math.fsum(self.weights.values())
        self.fixed = FixedPoint(bound=bound, members=1)   # the weighted terms sum to within +-bound
        self.clipped = 0

    def masked(self, part: int, offset: int, values: torch.Tensor) -> torch.Tensor:
        """Our values for ``part[offset:...]``: clipped, weighted by ``w / W``, in fixed point, masked."""
        self.clipped += int((values.abs() > self.bound).sum())
        share = self.weights[self.me] / self.total_weight
        encoded, _ = self.fixed.encode(values.to(torch.float64).clamp(-self.bound, self.bound) * share)
        return mask(encoded, self.me, self.seeds, part, offset)

    def correction(self, part: int, offset: int, numel: int, outside: list[str]) -> torch.Tensor:
        """What removes our masks with the members ``outside`` the membership from ``part[offset:offset+numel]``."""
        total = torch.zeros(numel, dtype=torch.int64)
        for dead in outside:
            if dead in self.seeds:
                total += dropout_correction(self.me, dead, self.seeds[dead], torch.Size([numel]), part, offset)
        return total % MODULUS

    def share_of(self, members) -> float:
        """``sum_{i in members} w_i / W``: what the unmasked sum over ``members`` is divided by."""
        return math.fsum(self.weights[m] for m in members) / self.total_weight


class MaskedReducer(PartReducer):
    """A part's masked slices (and corrections) summed modulo ``2**32`` and decoded to the weighted mean over the
    senders left (step 4). Slices arrive as float64 integers (:func:`from_wire`); the sum is exact."""

    def __init__(self, part_numel: int, expected_senders, secure: SecureRound):
        super().__init__(part_numel, expected_senders, dtype=torch.float64)
        self.secure = secure
        self.corrections: dict[str, torch.Tensor] = {}

    def add_correction(self, sender: str, offset: int, values: torch.Tensor) -> None:
        if offset < 0 or offset + values.numel() > self.part_numel:
            raise BadContribution(sender, f"correction range at {offset} is outside the part")
        self.corrections.setdefault(sender, torch.zeros(self.part_numel, dtype=torch.float64))[
            offset:offset + values.numel()] = values

    def result(self, out: torch.Tensor | None = None) -> torch.Tensor:
        active = self.active_senders
        if not active or any(self.missing_ranges(s) for s in active):
            raise IncompleteReduction("a masked part needs every remaining sender's whole slice", {})
        total = torch.zeros(self.part_numel, dtype=torch.float64)
        for s in active:
            total += self._buffers[s]
        for c in self.corrections.values():
            total += c
        mean = self.secure.fixed.decode(total.to(torch.int64)) / self.secure.share_of(active)
        return mean.to(torch.float32) if out is None else out.copy_(mean)


class MaskedParts:
    """The hooks :class:`~averaging.allreduce.AllReduceRound` calls where a secure round differs from a plain one
    (``self.secure`` is the round's :class:`SecureRound`, or None for a plain round)."""

    secure: SecureRound | None

    def _new_reducer(self, part: int, senders: list[str]) -> PartReducer:
        start, end = self.parts[part]
        if self.secure is None:
            return PartReducer(end - start, senders, clip_tau=self.config.clip_tau)
        return MaskedReducer(end - start, senders, self.secure)

    def _own_slice(self, part: int, own: torch.Tensor) -> torch.Tensor:
        """Our slice of our own part as it goes into the reducer (masked chunk by chunk, like a sender's)."""
        if self.secure is None:
            return own
        start, _ = self.parts[part]
        return torch.cat([self.secure.masked(part, a - start, self.local[a:b]).to(torch.float64)
                          for a, b in self._chunks(part)])

    def _contribution(self, part: int, a: int, b: int) -> bytes:
        """What we send the owner of ``part`` for ``local[a:b]``."""
        if self.secure is None:
            return self.feedback.compress(("sent", a, b), self.local[a:b])
        return to_wire(self.secure.masked(part, a - self.parts[part][0], self.local[a:b]))

    def _decode_contribution(self, sender: str, blob, numel: int) -> torch.Tensor:
        try:
            return from_wire(blob, numel) if self.secure else self.compression.decompress(blob, numel)
        except ValueError as e:
            raise BadContribution(sender, f"undecodable chunk: {e}") from None

    def _part_done(self, part: int) -> None:
        """The owner's part is reduced, or will not be: wake its senders (a secure round's, from the corrections)."""
        self._event(self.result_ready, part).set()
        self._event(self.asked, part).set()

    async def _unmask(self, part: int, reducer: PartReducer, members) -> bool:
        """Step 3 on the owner: corrections for the members outside ``members`` (asked on the senders' streams),
        then a check of the mean's range. False if the part cannot be reduced."""
        if self.secure is None:
            return True
        outside = sorted(set(self.peer_ids) - set(members))
        if not outside:   # the whole group: the masks cancel
            self._event(self.asked, part).set()
            return True
        self.correction_asks[part] = outside
        start, _ = self.parts[part]
        reducer.add_correction(self.me, 0, torch.cat([self.secure.correction(part, a - start, b - a, outside)
                                                      for a, b in self._chunks(part)]).to(torch.float64))
        self._event(self.asked, part).set()
        awaited = set(members) - {self.me}
        with trio.move_on_after(self._transfer_budget()):
            while awaited - set(reducer.corrections):
                await self._wait_progress(part)
        if awaited - set(reducer.corrections):
            logger.info("Round %s: part %d cannot be unmasked: no correction from %s", self.round_id[-8:], part,
                        [p[-8:] for p in awaited - set(reducer.corrections)])
            return False
        return True

    def _in_range(self, mean: torch.Tensor) -> bool:
        """A secure owner's check of its unmasked mean: beyond the bound, some member sent garbage (which one is
        hidden by the masks), and the part is not reduced rather than sent and refused."""
        if max_abs(mean) <= self.secure.bound:
            return True
        logger.warning("Round %s: the unmasked mean of our part is beyond +-%g: a member sent garbage; part not "
                       "reduced", self.round_id[-8:], self.secure.bound)
        return False

    async def _serve_correction(self, stream, sender_id: str, part: int) -> None:
        """The owner's side of step 3 for one sender: keepalives until the membership settled, then its correction
        if one is needed from it."""
        await keep_alive_until(stream, self._event(self.asked, part), self.config.keepalive_interval)
        outside = self.correction_asks.get(part)
        if not outside or part not in self.reducers or sender_id not in self.reducers[part].active_senders:
            return
        await stream.send_msg({"correct": outside})
        start, _ = self.parts[part]
        chunks = list(self._chunks(part))
        async with receive_payload(stream, window_bytes=self.config.window_bytes,
                                   timeout=self.chunk_timeout) as incoming:
            blobs = [blob async for blob in incoming]
        if len(blobs) != len(chunks):
            raise ReduceError(f"{sender_id[-8:]} sent {len(blobs)} correction chunks for {len(chunks)}")
        correction = torch.cat([from_wire(blob, b - a) for blob, (a, b) in zip(blobs, chunks)])
        self.reducers[part].add_correction(sender_id, 0, correction)
        self._poke(part)

    async def _result_header(self, stream, part: int):
        """The sender's side: skip keepalives, answer a correction request, return the owner's result header."""
        while True:
            msg = await stream.recv_msg()
            if msg == KEEPALIVE:
                continue
            if not (isinstance(msg, dict) and "correct" in msg):
                return msg
            outside = msg["correct"]
            if self.secure is None or not isinstance(outside, list) or not set(outside) <= set(self.peer_ids):
                raise ReduceError("owner asked for a correction we cannot give")
            start, _ = self.parts[part]
            sender = PayloadSender(stream, window_bytes=self.config.window_bytes, timeout=self.chunk_timeout)
            for a, b in self._chunks(part):
                await sender.send(to_wire(self.secure.correction(part, a - start, b - a, outside)))
            await sender.finish()
