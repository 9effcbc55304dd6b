"""The options of a :class:`~p2p.node.Node`, in one dataclass the CLI maps its network flags onto."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .relay import RelayLimits

DEFAULT_HOST_MADDRS = ("/ip4/127.0.0.1/tcp/0",)


@dataclass(frozen=True)
class NodeConfig:
    """Who a peer is on the network, where it listens, and whom it talks to.

    :param swarm: swarm name; part of every protocol id so swarms cannot call each other.
    :param host_maddrs: multiaddrs to listen on, e.g. ``/ip4/0.0.0.0/tcp/31337``. Port 0 picks a free one.
    :param announce_maddrs: addresses to tell others instead of the listen addresses (NAT, docker).
    :param identity_path: file holding the ed25519 key; created on first run, so the peer ID persists.
    :param client_mode: listen on nothing; the node can only call out (for peers behind NAT).
    :param psk: pre-shared key of a private swarm (libp2p pnet), 64 hex characters (32 bytes): every
        connection is encrypted with it before the handshake, so peers without it cannot connect at all.
    :param allowed_peers: peer IDs allowed to talk to us (None: everyone). Streams from other peers are
        reset before any handler runs (so they can call no RPC: no DHT store, no averaging, no expert),
        and we open no stream to them. Our own ID is always allowed.
    :param max_streams_per_peer: inbound streams one peer may hold open at once, over all services; more
        are reset before any handler runs (calls reuse pooled streams, so honest peers use a handful).
    :param bulk_port: TCP port of the bulk data plane (:mod:`p2p.bulk`: big payloads beside libp2p, ~10x
        less CPU per byte), on the listen addresses' IPs; 0 picks a free port, None turns it off. Behind a
        NAT, fix it and forward it too (without it, peers fall back to slower libp2p streams).
    :param relay_service: once this peer finds it is publicly reachable, relay for peers behind NATs
        (:mod:`p2p.relay`, within ``relay_limits``). Off: it relays nothing.
    :param relay_limits: what a relaying peer gives others (:class:`~p2p.relay.RelayLimits`).
    """

    swarm: str = "default"
    host_maddrs: Sequence[str] = DEFAULT_HOST_MADDRS
    announce_maddrs: Sequence[str] = ()
    identity_path: str | None = None
    client_mode: bool = False
    psk: str | None = None
    allowed_peers: Sequence[str] | None = None
    max_streams_per_peer: int = 128
    bulk_port: int | None = 0
    relay_service: bool = True
    relay_limits: RelayLimits = RelayLimits()

    def __post_init__(self) -> None:
        if not self.swarm or "/" in self.swarm:
            raise ValueError(f"swarm name must be non-empty and contain no '/': {self.swarm!r}")
        if self.psk is not None:
            psk = self.psk.strip().lower()
            if len(psk) != 64 or any(c not in "0123456789abcdef" for c in psk):
                raise ValueError("the swarm key (psk) must be 64 hex characters (32 random bytes)")
            object.__setattr__(self, "psk", psk)
        for name in ("host_maddrs", "announce_maddrs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.allowed_peers is not None:
            object.__setattr__(self, "allowed_peers", tuple(self.allowed_peers))
        if self.max_streams_per_peer < 1:
            raise ValueError("max_streams_per_peer must be >= 1")
