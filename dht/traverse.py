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
costs one slot, not a round. A request in flight longer than :data:`SLOW_FACTOR` times the slowest answer
this lookup has had (and at least ``rpc_timeout / 10``) makes its peer *slow*: step 4 no longer waits for
it (the next-nearest peer takes its place among the ``count`` nearest and is asked). When the lookup ends,
its requests to slow peers are cancelled and each slow peer is pinged in the DHT's background tasks: one
that misses that deadline too is forgotten as usual. A frozen or cut-off peer among a key's replicas thus
costs a lookup a fraction of ``rpc_timeout``, not all of it (matchmaking gathers for less than one
``rpc_timeout``). Slowness is relative, so on a machine where every answer is slow nobody is routed around.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import trio

from .protocol import DHTProtocol
from .records import DHTID, Record
from .routing import PeerInfo

SLOW_FACTOR = 4.0   # a request this many times slower than the lookup's slowest answer is a slow peer's


@dataclass
class LookupResult:
    """What a lookup found: the nearest peers that answered (nearest first) and the records they hold."""

    nearest: list[PeerInfo]
    records: list[Record] = field(default_factory=list)
    holders: set[str] = field(default_factory=set)
    asked: int = 0
    slow: list[PeerInfo] = field(default_factory=list)   # asked, not waited for (see the module docstring)


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
    in_flight: dict[int, float] = {}   # node id -> when we asked it
    wakeup = trio.Event()

    slowest_answer: float | None = None   # seconds; None until a peer has answered

    def slow_after() -> float:
        return float("inf") if slowest_answer is None else max(hedge_after, SLOW_FACTOR * slowest_answer)

    def slow(now: float) -> set[int]:
        return {node_id for node_id, asked_at in in_flight.items() if now - asked_at >= slow_after()}

    def next_candidates(now: float) -> list[PeerInfo]:
        lagging = slow(now)
        ranked = sorted((p for p in shortlist.values() if p.node_id not in lagging),
                        key=lambda p: p.node_id ^ target)[:count]
        return [p for p in ranked if p.node_id not in asked]

    async def ask(peer: PeerInfo) -> None:
        nonlocal wakeup, limit, slowest_answer
        try:
            asked_at = trio.current_time()
            reply = await protocol.find(peer, [target], want_values)
            if reply is None:
                shortlist.pop(peer.node_id, None)
                limit = alpha
                return
            slowest_answer = max(slowest_answer or 0.0, trio.current_time() - asked_at)
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
            in_flight.pop(peer.node_id, None)
            wakeup.set()

    async with trio.open_nursery() as nursery:
        while not done.is_set():
            now = trio.current_time()
            candidates = next_candidates(now)
            lagging = slow(now)
            while candidates and len(in_flight) - len(lagging) < limit:
                peer = candidates.pop(0)
                asked.add(peer.node_id)
                in_flight[peer.node_id] = now
                result.asked += 1
                nursery.start_soon(ask, peer)
            if len(in_flight) == len(lagging):
                break   # nothing left to ask but slow peers: done without them
            wakeup = trio.Event()
            # wake at the next answer, when the oldest request still deemed fast becomes slow, or (a lookup that
            # asks one peer at a time) when that request is slower than hedge_after
            oldest = min(t for node_id, t in in_flight.items() if node_id not in lagging)
            wait = min(slow_after(), hedge_after if limit < alpha else float("inf"))
            with trio.move_on_after(max(oldest + wait - trio.current_time(), 0.0)):
                await wakeup.wait()
            if not wakeup.is_set() and limit < alpha:
                limit = alpha  # the peer we asked is slow: ask others beside it
        for node_id in slow(trio.current_time()):
            result.slow.append(shortlist[node_id])
            protocol.tasks.spawn(protocol.ping, shortlist[node_id])
        nursery.cancel_scope.cancel()
    result.nearest = sorted(answered.values(), key=lambda p: p.node_id ^ target)[:k]
    return result
