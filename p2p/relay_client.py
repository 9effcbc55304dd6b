"""Keeps a private peer reachable: slots on two or more relays, renewed, and moved when a relay dies.

:class:`RelayClient` runs in the node's nursery while the peer is private. Every :data:`CHECK_S` seconds:

1. forget relays whose connection dropped (the relay process died, its link went down) and those whose
   renewal failed;
2. renew slots past half their time to expiry (a relay that refuses is forgotten);
3. while fewer than ``want`` relays hold a slot, try candidates — public peers we know, from the initial
   peers and then the DHT's routing table (``candidates()``) — that have not failed us in the last
   :data:`RETRY_S` seconds: connect, reserve (:func:`p2p.relay.reserve`).

Our circuit addresses (:attr:`RelayClient.addrs`) are those of the relays holding a slot; ``on_change`` is
called when they change, so that whoever announces our addresses (expert declarations, peer records) can
announce the new ones at once.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from .relay import circuit_addr, is_circuit, open_connections, reserve

logger = logging.getLogger(__name__)

CHECK_S = 2.0     # how often relay connections are looked at: a dead relay is replaced within a few of these
RETRY_S = 30.0    # a candidate that failed us is not asked again for this long


class RelayClient:
    """Slots on ``want`` relays for a private peer (see the module docstring).

    :param libp2p_host: the peer's py-libp2p host.
    :param candidates: returns ``[(peer_id, [full multiaddr, ...]), ...]`` of public peers to try.
    :param want: how many relays to hold slots on.
    :param timeout: seconds one connect + reservation may take.
    :param on_change: called (in the loop) with the new circuit addresses when they change.
    """

    def __init__(self, libp2p_host, candidates: Callable[[], Sequence[tuple[str, Sequence[str]]]], *,
                 want: int = 2, timeout: float = 10.0, on_change: Callable[[list[str]], None] | None = None):
        self.libp2p, self.candidates, self.want, self.timeout = libp2p_host, candidates, want, timeout
        self.on_change = on_change
        self.me = libp2p_host.get_id().to_base58()
        self.slots: dict[str, tuple[str, float, float]] = {}   # relay -> (its address, expiry, renew at)
        self._failed: dict[str, float] = {}
        self.moves = 0                                          # relays replaced after they dropped
        self.has_slot = trio.Event()

    @property
    def addrs(self) -> list[str]:
        return [circuit_addr(addr, relay, self.me) for relay, (addr, _, _) in self.slots.items()]

    @property
    def relays(self) -> list[str]:
        return list(self.slots)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            before = self.addrs
            await self.tend()
            if self.addrs != before and self.on_change is not None:
                logger.info("Reachable through %d relays: %s", len(self.slots),
                            ", ".join(r[-8:] for r in self.slots) or "none")
                try:
                    self.on_change(self.addrs)
                except Exception:
                    logger.exception("relay address listener failed")
            await trio.sleep(CHECK_S)

    async def tend(self) -> None:
        """One pass of steps 1-3 of the module docstring."""
        for relay in list(self.slots):
            if not open_connections(self.libp2p, ID.from_base58(relay)):
                logger.info("Lost relay %s; reserving elsewhere", relay[-8:])
                del self.slots[relay]
                self._failed[relay] = time.monotonic()
                self.moves += 1
        now = time.time()
        for relay, (addr, expiry, renew_at) in list(self.slots.items()):
            if now >= renew_at:
                await self._reserve(relay, addr)
        if len(self.slots) >= self.want:
            return
        for peer_id, addrs in list(self.candidates()):
            if len(self.slots) >= self.want:
                break
            if peer_id in self.slots or peer_id == self.me or \
                    time.monotonic() - self._failed.get(peer_id, -RETRY_S) < RETRY_S:
                continue
            direct = [a for a in addrs if not is_circuit(a)]
            if direct:
                await self._reserve(peer_id, direct[0], connect=direct)

    async def _reserve(self, relay: str, addr: str, connect: Sequence[str] = ()) -> bool:
        try:
            with trio.fail_after(self.timeout):
                if connect and not open_connections(self.libp2p, ID.from_base58(relay)):
                    full = connect[0] if "/p2p/" in connect[0] else f"{connect[0]}/p2p/{relay}"
                    await self.libp2p.connect(info_from_p2p_addr(multiaddr.Multiaddr(full)))
                expiry = await reserve(self.libp2p, relay, self.timeout)
        except Exception as e:
            logger.debug("No slot on relay %s: %s: %s", relay[-8:], type(e).__name__, e)
            self.slots.pop(relay, None)
            self._failed[relay] = time.monotonic()
            return False
        now = time.time()
        self.slots[relay] = (addr if "/p2p/" in addr else f"{addr}/p2p/{relay}", expiry,
                             now + max(expiry - now, 2 * CHECK_S) / 2)
        self.has_slot.set()
        return True
