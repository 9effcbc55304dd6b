"""Peers we refuse to average with for a while, because they sent us data no honest peer sends.

An honest peer never sends NaN/inf (it checks its own tensors before a round), never a chunk outside its
part, never a chunk it cannot decode: such data is a bug or an attack, so the averager *bans* the peer that
sent it. For ``ban_seconds`` a banned peer

* is not counted as a candidate in matchmaking (we neither lead it nor follow it),
* is refused when it asks to join a group we lead, and when it sends us a part,
* is skipped as a donor or re-reduction owner when a round repairs parts.

A round already under way just excludes it (see :mod:`averaging.allreduce`). Peers that merely time out
or disconnect are *not* banned: on the internet that is not misbehaviour.
"""
from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

MAX_BANNED = 10_000  # a flood of fresh identities cannot grow the table without bound


class BanList:
    """Peer ID -> (unban time, reason); entries expire after ``ban_seconds``."""

    def __init__(self, ban_seconds: float = 600.0):
        if not ban_seconds >= 0:
            raise ValueError(f"ban_seconds must be >= 0, got {ban_seconds!r}")
        self.ban_seconds = float(ban_seconds)
        self._until: dict[str, tuple[float, str]] = {}

    def ban(self, peer_id: str, reason: str) -> None:
        """Ban ``peer_id`` for ``ban_seconds`` from now (extends an earlier ban); logs one WARNING per ban."""
        if self.ban_seconds <= 0:
            return
        now = time.monotonic()
        if len(self._until) >= MAX_BANNED:
            self._expire(now)
            if len(self._until) >= MAX_BANNED:
                self._until.pop(min(self._until, key=lambda p: self._until[p][0]))
        fresh = not self.is_banned(peer_id)
        self._until[peer_id] = (now + self.ban_seconds, reason)
        if fresh:
            logger.warning("Banned peer %s from averaging for %.0fs: %s", peer_id[-8:], self.ban_seconds, reason)

    def is_banned(self, peer_id: str) -> bool:
        entry = self._until.get(peer_id)
        if entry is None:
            return False
        if time.monotonic() >= entry[0]:
            del self._until[peer_id]
            return False
        return True

    def why(self, peer_id: str) -> str:
        """Why ``peer_id`` is banned and for how much longer ("" if it is not)."""
        if not self.is_banned(peer_id):
            return ""
        until, reason = self._until[peer_id]
        return f"banned for another {until - time.monotonic():.0f}s: {reason}"

    def banned(self) -> list[str]:
        """Peers banned right now."""
        self._expire(time.monotonic())
        return sorted(self._until)

    def _expire(self, now: float) -> None:
        for peer_id in [p for p, (until, _) in self._until.items() if now >= until]:
            del self._until[peer_id]
