"""Matchmaking through the DHT: peers that want to average form groups with no coordinator.

1. **Announce.** Each peer writes ``{bandwidth, client, signature, t}`` under the group key with its
   own peer ID as sub-key (owner-signed, so nobody can announce for someone else), expiring shortly.
2. **Gather candidates.** Poll the key (latest values) until ``target_group_size`` peers are there or
   ``matchmaking_time`` has passed: first after a few lookup latencies, then backing off to
   :data:`MAX_POLL_S`, so peers that arrive together meet at once and a long wait costs few lookups.
3. **Split deterministically.** Shuffle the candidates by a hash of their peer ID seeded with the
   earliest announce time among them, and cut them into groups of at most ``target_group_size``;
   every peer computes the same split from the same view, and partners change from round to round
   (which is what makes repeated small-group rounds mix the whole swarm). A group's *leader* is its
   first non-client member.
4. **Join.** The leader accepts joins for its group; followers call ``join`` on their leader, which
   answers once the group is complete or the join window closes, with the final member list — the
   leader's list is the single source of truth, so differing DHT views cannot split a group. A peer
   asked to lead while it follows someone else redirects the caller there (at most a few hops).
   With secure aggregation every member's join also carries its signed round key and weight (its *offer*);
   the leader answers with all the members' offers (:mod:`averaging.masked_round` verifies them).
5. **Withdraw.** Members overwrite their announcement with a "done" tombstone so the next round
   does not pick them up twice.

Every wait is bounded by ``matchmaking_time`` plus a margin derived from measured round trips; a
round that cannot form a group of at least ``min_group_size`` fails with :class:`MatchmakingFailed`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import trio

from dht import DHT, get_dht_time, subkey_entries
from p2p import P2PError, RemoteError
from p2p.tasks import TaskGroup

from .bans import BanList
from .group import Member

logger = logging.getLogger(__name__)


def group_key(prefix: str) -> str:
    """The DHT key under which averagers of ``prefix`` meet (sub-key: peer ID)."""
    return f"{prefix}.averaging"


MAX_REDIRECTS = 3
MAX_POLL_S = 0.5        # longest pause between two lookups of the group key while gathering
INITIAL_RTT = 0.05      # seconds; a join round trip before any was measured


@dataclass(frozen=True)
class Deadlines:
    """Every wait of matchmaking, derived from ``matchmaking_time`` and the measured join round trip ``rtt``."""

    matchmaking_time: float
    rtt: float = INITIAL_RTT

    @property
    def join_margin(self) -> float:
        """Round trips allowed for followers whose gathering ended just after the leader's (their join calls)."""
        return 10 * self.rtt

    @property
    def join_window(self) -> float:
        """How long a leader accepts joins: the gathering time, plus :attr:`join_margin`."""
        return self.matchmaking_time + self.join_margin

    @property
    def join_call_timeout(self) -> float:
        """A follower's join call: the leader may still be gathering, then holds its window open; 1 s for the call."""
        return 2 * self.join_window + 1.0

    @property
    def announcement_ttl(self) -> float:
        """How long an announcement lives: through our gathering and a leader's join window."""
        return 2 * self.matchmaking_time + 5 * self.rtt

    @property
    def stale_after(self) -> float:
        """Announcements older than this before ours are from an earlier round (1 s for clock skew)."""
        return 2 * self.matchmaking_time + 1.0


class MatchmakingFailed(RuntimeError):
    """No group of at least ``min_group_size`` peers could be formed in time."""


@dataclass
class Gathering:
    """A leader's group under construction."""

    round_id: str
    expected: set[str]
    members: list[Member]
    capacity: int
    deadline: float
    done: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)
    failed: str | None = None
    offers: dict[str, Any] = field(default_factory=dict)   # secure aggregation: each member's signed key, weight


class Matchmaker:
    """Forms groups for one averager; also serves its ``join`` RPC (the averager routes it here).

    :param dht: the running DHT to announce in and read from; ``tasks``: the averager's background tasks.
    :param service: the averager's RPC service.
    :param prefix: names the rounds this matchmaker's groups run.
    :param me: this peer as it announces itself (its bandwidth, whether it is in client mode).
    :param signature: text describing our tensors' shapes and dtypes; peers announcing another are refused.
    :param bans: peers we neither lead nor follow.
    """

    def __init__(self, dht: DHT, tasks: TaskGroup, service: str, prefix: str, me: Member, signature: str,
                 bans: BanList, *, target_group_size: int, min_group_size: int, matchmaking_time: float):
        self.dht, self.tasks, self.service, self.prefix, self.me, self.bans = dht, tasks, service, prefix, me, bans
        self.signature_text, self.signature_hash = signature, hashlib.sha256(signature.encode()).hexdigest()[:16]
        self.target_group_size, self.min_group_size = target_group_size, min_group_size
        self.matchmaking_time = matchmaking_time
        self.gathering: Gathering | None = None
        self.following: str | None = None
        self.decided = trio.Event()
        self.rtt = INITIAL_RTT  # refined from measured join round trips
        self.group_size = target_group_size
        self.mismatched: set[str] = set()  # peers seen in the last gathering whose tensors differ from ours
        self.offer: dict | None = None     # our secure aggregation offer in the current attempt (None: plain)
        self.offers: dict[str, Any] = {}   # every member's, once the group formed

    @property
    def deadlines(self) -> "Deadlines":
        """Every wait of matchmaking, from ``matchmaking_time`` and the round trips measured so far."""
        return Deadlines(self.matchmaking_time, self.rtt)

    # ------------------------------------------------------------------ one matchmaking attempt
    async def form_group(self, group_key: str, group_size: int | None = None, offer: dict | None = None
                         ) -> tuple[str, list[Member]]:
        """Run steps 1-5 of the module docstring under ``group_key``; returns (round id, members).

        ``offer``: our secure aggregation offer (``{"pk", "ksig", "w"}``); then ``self.offers`` holds every
        member's afterwards, and a leader refuses joins without one."""
        me = self.me
        self.group_size = group_size or self.target_group_size
        self.gathering, self.following, self.decided = None, None, trio.Event()
        self.offer, self.offers = offer, {}
        announced_at = get_dht_time()
        expiration = announced_at + self.deadlines.announcement_ttl
        entry = {"bw": me.bandwidth, "client": me.client, "sig": self.signature_hash, "t": announced_at}
        await self.dht.astore_many([self.dht.make_record(group_key, entry, expiration, subkey=me.peer_id)],
                                   republish=False)
        try:
            candidates = await self._gather(group_key, announced_at)
            if len(candidates) < self.min_group_size and self.mismatched:
                # nobody to average with but peers whose tensors differ: say so now, before any data moves
                raise SignatureMismatch(f"tensors differ: {len(self.mismatched)} peer(s) under {group_key!r} "
                                        f"(e.g. {next(iter(self.mismatched))[-8:]}) average other shapes/dtypes; "
                                        f"ours are {self.signature_text}")
            group = self._my_group(candidates)
            leader = next((m for m in group if not m.client), None)
            if leader is None:
                raise MatchmakingFailed("no peer in our group accepts connections (all are in client mode)")
            if leader.peer_id == me.peer_id:
                return await self._lead(group, announced_at)
            self.following = leader.peer_id
            self.decided.set()
            return await self._join(leader.peer_id, me)
        finally:
            self.decided.set()
            tombstone = self.dht.make_record(group_key, {"done": True, "sig": self.signature_hash, "t": announced_at},
                                             expiration + 1e-3, subkey=me.peer_id)
            self.tasks.spawn(lambda: self.dht.astore_many([tombstone], republish=False))

    async def _gather(self, group_key: str, announced_at: float) -> list[tuple[float, str, Member]]:
        deadline = trio.current_time() + self.matchmaking_time
        candidates: list[tuple[float, str, Member]] = []
        pause = 0.0
        while True:
            asked = trio.current_time()
            found = await self.dht.aget(group_key, latest=True)
            candidates = self._parse(found, announced_at)
            if len(candidates) >= self.group_size or trio.current_time() >= deadline:
                return candidates
            # peers that come together find each other within a few lookups; a long wait backs off
            pause = min(max(1.5 * pause, 4 * (trio.current_time() - asked), 0.02), MAX_POLL_S)
            await trio.sleep(min(pause, max(deadline - trio.current_time(), 0)))

    def _parse(self, found: Any, announced_at: float) -> list[tuple[float, str, Member]]:
        """Fresh announcements of peers with our tensor signature (others are noted in ``self.mismatched``)."""
        out = []
        self.mismatched = set()
        for peer_id, value, _ in subkey_entries(found):
            t, bw = value.get("t"), value.get("bw")
            if not isinstance(t, (int, float)) or t < announced_at - self.deadlines.stale_after:
                continue  # malformed, or a stale announcement from an earlier round
            if self.bans.is_banned(peer_id):
                continue  # it sent us garbage recently: we neither lead nor follow it
            if value.get("sig") != self.signature_hash:
                self.mismatched.add(peer_id)  # also from a tombstone: that peer was here just now
                continue
            if value.get("done") or not isinstance(bw, (int, float)) or bw < 0:
                continue
            out.append((float(t), peer_id, Member(peer_id, float(bw), bool(value.get("client", False)))))
        if self.me.peer_id not in {p for _, p, _ in out}:
            out.append((announced_at, self.me.peer_id, self.me))
        return sorted(out)

    def _my_group(self, candidates: list[tuple[float, str, Member]]) -> list[Member]:
        n, size = len(candidates), self.group_size
        n_groups = max(1, -(-n // size))
        bounds = [round(i * n / n_groups) for i in range(n_groups + 1)]
        seed = repr(min(t for t, _, _ in candidates)).encode()
        ranked = sorted(candidates, key=lambda c: hashlib.sha256(seed + c[1].encode()).digest())
        members = [m for _, _, m in ranked]
        for a, b in zip(bounds, bounds[1:]):
            if any(m.peer_id == self.me.peer_id for m in members[a:b]):
                return members[a:b]
        raise AssertionError("we are always among our own candidates")

    async def _lead(self, group: list[Member], announced_at: float) -> tuple[str, list[Member]]:
        me = next(m for m in group if m.peer_id == self.me.peer_id)
        window = self.deadlines.join_window
        g = Gathering(round_id=f"{self.prefix}|{me.peer_id[-12:]}|{os.urandom(6).hex()}",
                      expected={m.peer_id for m in group}, members=[me], capacity=self.group_size,
                      deadline=trio.current_time() + window)
        if self.offer is not None:
            g.offers[me.peer_id] = self.offer
        self.gathering = g
        self.decided.set()
        with trio.move_on_after(window):
            while not g.expected <= {m.peer_id for m in g.members} and len(g.members) < g.capacity:
                await g.changed.wait()
                g.changed = trio.Event()
        if len(g.members) < self.min_group_size:
            g.failed = f"only {len(g.members)} of the required {self.min_group_size} peers joined"
        g.done.set()
        if g.failed:
            raise MatchmakingFailed(g.failed)
        self.offers = {m.peer_id: g.offers.get(m.peer_id) for m in g.members}
        return g.round_id, self._ordered(g.members)

    @staticmethod
    def _ordered(members: list[Member]) -> list[Member]:
        return [members[0]] + sorted(members[1:], key=lambda m: m.peer_id)

    async def _join(self, leader: str, me: Member) -> tuple[str, list[Member]]:
        args = {"sig": self.signature_hash, "bw": me.bandwidth, "client": me.client,
                **({"secure": self.offer} if self.offer is not None else {})}
        for _ in range(MAX_REDIRECTS):
            started = trio.current_time()
            try:
                reply = await self.dht.node.call(leader, self.service, "join", args,
                                                 timeout=self.deadlines.join_call_timeout)
            except RemoteError as e:
                if e.remote_type == "SignatureMismatch":
                    raise ValueError(f"cannot average with group of {leader[-8:]}: {e.remote_message}") from None
                raise MatchmakingFailed(f"leader {leader[-8:]} refused us: {e.remote_message}") from None
            except P2PError as e:
                raise MatchmakingFailed(f"leader {leader[-8:]} unreachable: {e}") from None
            if isinstance(reply, dict) and isinstance(reply.get("redirect"), str):
                leader = reply["redirect"]
                if leader == me.peer_id:  # the peer we follow follows us: a stale choice on one side
                    raise MatchmakingFailed("redirected to ourselves: leaders disagree, retrying next round")
                continue
            try:
                members = [Member(str(p), float(bw), bool(c)) for p, bw, c in reply["members"]]
                round_id = str(reply["round"])
            except (KeyError, TypeError, ValueError):
                raise MatchmakingFailed(f"malformed join reply from {leader[-8:]}") from None
            if me.peer_id not in [m.peer_id for m in members]:
                raise MatchmakingFailed("the leader's group does not include us")
            offers = reply.get("secure")
            self.offers = {m.peer_id: offers.get(m.peer_id) for m in members} if isinstance(offers, dict) else {}
            self.rtt = 0.8 * self.rtt + 0.2 * min(trio.current_time() - started, 1.0) / 10
            return round_id, members
        raise MatchmakingFailed("too many redirects while looking for a leader")

    # ------------------------------------------------------------------ leader side RPC
    async def rpc_join(self, peer_id: str, args: Any) -> dict:
        if not isinstance(args, dict) or not isinstance(args.get("bw"), (int, float)):
            raise ValueError("join needs {'sig', 'bw', 'client'}")
        if self.bans.is_banned(peer_id):
            raise MatchmakingFailed(f"we do not average with you: {self.bans.why(peer_id)}")
        if args.get("sig") != self.signature_hash:
            raise SignatureMismatch(f"tensors differ: ours are {self.signature_text}")
        with trio.move_on_after(self.deadlines.join_window):
            await self.decided.wait()
        g = self.gathering
        if g is None:
            if self.following:
                return {"redirect": self.following}
            raise MatchmakingFailed("not looking for a group right now")
        if g.done.is_set() or len(g.members) >= g.capacity:
            raise MatchmakingFailed("group already formed")
        if (self.offer is not None) != isinstance(args.get("secure"), dict):
            raise SignatureMismatch("one of us runs secure aggregation and the other does not")
        if self.offer is not None:
            g.offers[peer_id] = args["secure"]
        if peer_id not in {m.peer_id for m in g.members}:
            g.members.append(Member(peer_id, float(args["bw"]), bool(args.get("client", False))))
            g.changed.set()
        with trio.move_on_after(max(g.deadline - trio.current_time(), 0) + self.deadlines.join_margin):
            await g.done.wait()
        if g.failed or not g.done.is_set():
            raise MatchmakingFailed(g.failed or "group did not form in time")
        return {"round": g.round_id, "members": [[m.peer_id, m.bandwidth, m.client] for m in self._ordered(g.members)],
                **({"secure": g.offers} if self.offer is not None else {})}


class SignatureMismatch(ValueError):
    """A peer wants to average tensors of other shapes/dtypes than ours."""
