"""Iterative Kademlia lookup (Maymounkov & Mazieres 2002, section 2.3), alpha requests in flight.

1. Seed a shortlist with the k peers nearest to the target from our routing table.
2. Keep up to ``alpha`` find requests in flight to the nearest shortlisted peers not yet asked (a lookup
   that stops at the first value starts with one, see step 4).
3. Merge every peer a reply names into the shortlist; a peer that fails is dropped from it.
4. Stop when the ``count`` (k unless told) nearest shortlisted peers have all answered (or failed) — or,
   for a lookup that only needs *a* value, as soon as a reply carries one. A lookup for fewer than k
   peers that must hear from all of them keeps up to ``max(alpha, count)`` requests in flight. A lookup
   that stops at the first value asks one peer at a time until a reply lacks the value, a request fails
   or one takes longer than rpc_timeout / 10; from then on alpha at a time.

Unlike the paper's strict rounds, a new request starts as soon as any one finishes, so a slow peer
costs one slot, not a round.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import trio

from .protocol import DHTProtocol
from .records import DHTID, Record
from .routing import PeerInfo


@dataclass
class LookupResult:
    """What a lookup found: the nearest peers that answered (nearest first) and the records they hold."""

    nearest: list[PeerInfo]
    records: list[Record] = field(default_factory=list)
    holders: set[str] = field(default_factory=set)
    asked: int = 0


async def lookup(protocol: DHTProtocol, target: DHTID, *, want_values: bool, stop_on_value: bool = False,
                 seeds: list[PeerInfo] | None = None, count: int | None = None) -> LookupResult:
    """Find the ``count`` (default k) peers nearest to ``target`` (and the records they hold for it, if
    ``want_values``). Replies still name up to k peers each; ``count`` only sets when the lookup is done
    (step 4), so a lookup for the few nodes that hold a record costs a few requests, not k."""
    k, alpha = protocol.config.k, protocol.config.alpha
    count = k if count is None else max(1, min(count, k))
    if count < k and not stop_on_value:
        # every one of the `count` nearest must answer before we stop, so ask the few we know at once:
        # same requests, one round instead of several
        alpha = max(alpha, count)
    # A lookup that stops at the first value usually gets it from the first peer it asks (the nearest one
    # we know holds a replica), so it asks one peer at a time until a reply lacks the value, a request
    # fails, or the request is slower than `hedge_after`; then alpha at a time.
    limit = 1 if stop_on_value else alpha
    hedge_after = protocol.config.rpc_timeout / 10
    shortlist: dict[int, PeerInfo] = {p.node_id: p for p in (seeds or protocol.routing.nearest(target, k))}
    asked: set[int] = set()
    answered: dict[int, PeerInfo] = {}
    result = LookupResult(nearest=[])
    done = trio.Event()
    in_flight = 0
    wakeup = trio.Event()

    def next_candidates() -> list[PeerInfo]:
        ranked = sorted(shortlist.values(), key=lambda p: p.node_id ^ target)[:count]
        return [p for p in ranked if p.node_id not in asked]

    async def ask(peer: PeerInfo) -> None:
        nonlocal in_flight, wakeup, limit
        try:
            reply = await protocol.find(peer, [target], want_values)
            if reply is None:
                shortlist.pop(peer.node_id, None)
                limit = alpha
                return
            records, peers = reply[0]
            answered[peer.node_id] = peer
            if records:
                result.records.extend(records)
                result.holders.add(peer.peer_id)
                if stop_on_value:
                    done.set()
            else:
                limit = alpha
            for p in peers:
                if p.node_id != protocol.node_id and p.node_id not in shortlist:
                    shortlist[p.node_id] = p
        finally:
            in_flight -= 1
            wakeup.set()

    async with trio.open_nursery() as nursery:
        while not done.is_set():
            candidates = next_candidates()
            while candidates and in_flight < limit:
                peer = candidates.pop(0)
                asked.add(peer.node_id)
                in_flight += 1
                result.asked += 1
                nursery.start_soon(ask, peer)
            if in_flight == 0:
                break
            wakeup = trio.Event()
            if limit < alpha:
                with trio.move_on_after(hedge_after):
                    await wakeup.wait()
                if not wakeup.is_set():
                    limit = alpha  # the peer we asked is slow: ask others beside it
            else:
                await wakeup.wait()
        nursery.cancel_scope.cancel()
    result.nearest = sorted(answered.values(), key=lambda p: p.node_id ^ target)[:k]
    return result
