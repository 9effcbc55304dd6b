"""Crawling: list every reachable DHT peer by walking routing tables breadth-first from our own."""
from __future__ import annotations

import trio

from .protocol import PROTOCOL_VERSION, DHTProtocol, parse_peer
from .routing import PeerInfo


async def crawl_peers(protocol: DHTProtocol, max_peers: int = 1000, timeout: float = 10.0) -> list[dict]:
    """Ask each discovered peer for its routing table until no new peer appears, ``max_peers`` are found
    or ``timeout`` passes. Returns ``{"peer_id", "addrs", "version"}`` for every peer that answered."""
    found: dict[str, dict] = {}
    if not protocol.client_mode:
        found[protocol.node.peer_id] = {"peer_id": protocol.node.peer_id, "addrs": protocol.node.addrs,
                                        "version": PROTOCOL_VERSION}
    seen: set[str] = set(found)
    frontier: list[PeerInfo] = protocol.routing.all_peers()
    with trio.move_on_after(timeout):
        while frontier and len(found) < max_peers:
            batch, frontier = frontier[:16], frontier[16:]
            new: list[PeerInfo] = []

            async def visit(peer: PeerInfo) -> None:
                reply = await protocol.peers(peer)
                if reply is None:
                    return
                found[peer.peer_id] = {"peer_id": peer.peer_id, "addrs": list(peer.addrs),
                                       "version": str(reply.get("v", "?"))}
                for item in reply.get("peers", [])[:1000] if isinstance(reply.get("peers"), list) else []:
                    p = parse_peer(item)
                    if p is not None and p.peer_id not in seen:
                        seen.add(p.peer_id)
                        new.append(p)

            for p in batch:
                seen.add(p.peer_id)
            async with trio.open_nursery() as nursery:
                for peer in batch:
                    nursery.start_soon(visit, peer)
            frontier.extend(new)
    return sorted(found.values(), key=lambda d: d["peer_id"])[:max_peers]
