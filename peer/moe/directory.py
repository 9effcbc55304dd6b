"""Where experts live: how servers declare them in the DHT and how clients find the alive ones.

Layout. A server hosting expert ``"ffn.3.17"`` writes, under each of the keys ``"ffn."`` (the grid's root
prefix), ``"ffn.3."`` (every intermediate prefix) and ``"ffn.3.17"`` (the UID itself), one sub-key: its
own peer ID. Its value is ``{"uids": [the UIDs under that key hosted by this server], "addrs": [its
multiaddrs]}``. Because the sub-key is the writer's peer ID, the DHT only accepts it signed by that peer
(owner signature), so nobody can declare or withdraw experts in another server's name. Each key
therefore holds a dictionary ``{server peer ID: what it hosts under the key}``.

Liveness. Entries expire ``expiration`` seconds after they were written and a server's heartbeat
rewrites them every ``heartbeat`` seconds, so a crashed server vanishes within ``expiration``. A cleanly
stopping server cannot delete (a store expiring in the past is refused), so it writes a *tombstone*:
the same sub-key with ``"uids": []`` and a later expiration, which wins over its live entry on every
node (latest expiration wins) and reads as "hosts nothing". Clients additionally blacklist a server
that fails a call, which covers the window between a crash and the expiry.

Lookups. Any record of a prefix lists every alive UID below it, so :class:`ExpertDirectory` answers
"is anything alive under ``ffn.3.``" from the nearest ancestor key it has fetched within ``ttl``
seconds, and fetches a name's parent key otherwise. Beam search asks about ``"ffn.0." ... "ffn.n."``
first, which fetches the root ``"ffn."`` once; every later question in the next ``ttl`` seconds is
answered from that record, so one DHT lookup per second serves a whole training loop.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import trio

from dht import DHT, Record, get_dht_time, subkey_entries
from peer.moe.gating import parse_uid

logger = logging.getLogger(__name__)


def declared_keys(uid: str) -> list[str]:
    """The DHT keys an expert is declared under, root first: ``"ffn.3.17" -> ["ffn.", "ffn.3.", "ffn.3.17"]``."""
    prefix, coords = parse_uid(uid)
    keys = [prefix + "." + "".join(f"{c}." for c in coords[:depth]) for depth in range(len(coords))]
    return keys + [uid]


def parent_key(name: str) -> str:
    """The key one level up: ``"ffn.3.17" -> "ffn.3."``, ``"ffn.3." -> "ffn."``, ``"ffn." -> "ffn."``."""
    stem = name[:-1] if name.endswith(".") else name
    return stem[: stem.rfind(".") + 1] if "." in stem else name


def ancestors(name: str) -> list[str]:
    """Keys whose record covers ``name``, nearest first: ``"ffn.3.17" -> ["ffn.3.17", "ffn.3.", "ffn."]``."""
    out = [name]
    while parent_key(out[-1]) != out[-1]:
        out.append(parent_key(out[-1]))
    return out


def declaration_records(dht: DHT, uids: Iterable[str], expiration_time: float, *,
                        withdraw: bool = False) -> list[Record]:
    """Signed records declaring ``uids`` as hosted by ``dht``'s peer until ``expiration_time``.

    With ``withdraw=True`` the same keys get tombstones (``"uids": []``): store them with an expiration
    later than the live records' so they replace them.
    """
    by_key: dict[str, list[str]] = {}
    for uid in sorted(set(uids)):
        for key in declared_keys(uid):
            by_key.setdefault(key, []).append(uid)
    addrs = list(dht.node.addrs)
    return [dht.make_record(key, {"uids": [] if withdraw else hosted, "addrs": addrs}, expiration_time,
                            subkey=dht.peer_id)
            for key, hosted in by_key.items()]


#: where each expert host publishes what it served (sub-key: its peer ID, so the record is signed by it):
#: ``{"t", "started", "rows", "uids": {uid: [forward rows, backward rows, requests, failures, mean ms]}}``
LOAD_KEY = "experts.load"


@dataclass(frozen=True)
class ServerEntry:
    """One server's declaration under one key: its peer ID, its addresses and the UIDs it hosts there."""

    peer_id: str
    addrs: tuple[str, ...]
    uids: frozenset[str]
    expiration_time: float


def parse_declarations(value: Any) -> list[ServerEntry]:
    """Server entries of a key's DHT value (``dht.get`` result); malformed or tombstoned entries are skipped."""
    out = []
    for peer_id, payload, expiration_time in subkey_entries(value):
        uids, addrs = payload.get("uids"), payload.get("addrs", [])
        if not (isinstance(uids, list) and uids and all(isinstance(u, str) for u in uids)):
            continue  # a tombstone ([]) or garbage
        if not (isinstance(addrs, list) and all(isinstance(a, str) for a in addrs)):
            addrs = []
        out.append(ServerEntry(peer_id, tuple(addrs), frozenset(uids), expiration_time))
    return out


class ExpertDirectory:
    """Client-side view of which experts are alive, from the DHT, cached for ``ttl`` seconds per key.

    :param dht: the DHT to read (its node is also where the lookups run).
    :param ttl: how long a fetched key is trusted; also the longest a newly declared or withdrawn
        expert stays unnoticed (besides the DHT's own propagation).
    :param lookup_timeout: deadline of one refresh; on timeout the names are reported dead this time.

    Thread-safety: the synchronous methods may be called from one training thread while the node's loop
    refreshes the cache (entries are replaced whole, never mutated).
    """

    def __init__(self, dht: DHT, ttl: float = 1.0, lookup_timeout: float = 5.0):
        self.dht, self.ttl, self.lookup_timeout = dht, ttl, lookup_timeout
        self._cache: dict[str, tuple[float, list[ServerEntry]]] = {}
        self.lookups = 0  # DHT keys fetched so far (for tests and benchmarks)

    # ---------------------------------------------------------------- trio API
    async def afetch(self, names: Sequence[str]) -> dict[str, list[ServerEntry]]:
        """Fetch the parent key of every name not covered by a fresh cached ancestor; returns what was fetched."""
        wanted = sorted({parent_key(n) for n in names if self._covering(n) is None})
        if not wanted:
            return {}
        self.lookups += len(wanted)
        found: dict[str, Any] = {}
        with trio.move_on_after(self.lookup_timeout) as scope:
            found = await self.dht.aget_many(wanted, latest=True)
        if scope.cancelled_caught:
            logger.warning("Expert lookup of %s timed out after %.1fs", ", ".join(wanted), self.lookup_timeout)
        now = time.monotonic()
        fetched = {key: parse_declarations(found.get(key)) for key in wanted}
        for key, entries in fetched.items():
            self._cache[key] = (now, entries)
        return fetched

    def _covering(self, name: str, fetched: dict[str, list[ServerEntry]] | None = None) -> list[ServerEntry] | None:
        """Entries of the nearest ancestor of ``name`` that was just fetched or is cached and fresh."""
        now = time.monotonic()
        for key in ancestors(name):
            if fetched and key in fetched:
                return fetched[key]
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                return hit[1]
        return None

    async def aservers(self, names: Sequence[str]) -> dict[str, list[ServerEntry]]:
        """For each prefix or UID: the unexpired server entries hosting something under it."""
        fetched = await self.afetch(names)
        return self._select({name: self._covering(name, fetched) for name in names})

    @staticmethod
    def _select(covering: dict[str, list[ServerEntry] | None]) -> dict[str, list[ServerEntry]]:
        now = get_dht_time()
        return {name: [e for e in entries or () if e.expiration_time > now and _hosts_under(e, name)]
                for name, entries in covering.items()}

    # ---------------------------------------------------------------- blocking API (training thread)
    def servers(self, names: Sequence[str]) -> dict[str, list[ServerEntry]]:
        """Blocking :meth:`aservers`; answered without entering the node's loop when the cache covers ``names``."""
        covering = {name: self._covering(name) for name in names}
        if any(entries is None for entries in covering.values()):
            return self.dht.node.run(self.aservers, list(names))
        return self._select(covering)

    def is_alive(self, names: Sequence[str], exclude: Callable[[str, str], bool] | None = None) -> list[str]:
        """The names (prefixes like ``"ffn.3."`` or UIDs) with at least one alive expert below them.

        ``exclude(uid, peer_id)`` drops individual (expert, server) pairs, e.g. blacklisted ones.
        Matches the ``is_alive`` callback of :func:`peer.moe.gating.beam_search`.
        """
        names = list(names)
        entries = self.servers(names)
        alive = []
        for name in names:
            if any(not exclude or any(not exclude(uid, e.peer_id) for uid in e.uids if _under(uid, name))
                   for e in entries[name]):
                alive.append(name)
        return alive

    def invalidate(self) -> None:
        """Forget every cached record (the next question fetches again)."""
        self._cache.clear()


def _under(uid: str, name: str) -> bool:
    return uid.startswith(name) if name.endswith(".") else uid == name


def _hosts_under(entry: ServerEntry, name: str) -> bool:
    return any(_under(uid, name) for uid in entry.uids)


__all__ = ["ExpertDirectory", "ServerEntry", "declaration_records", "declared_keys", "parse_declarations",
           "ancestors", "parent_key"]
