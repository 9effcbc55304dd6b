"""Whose contributions a round's mean holds: one membership per round, settled once, the same in every part.

Every owner reduces its part from the contributions that reached it; a member that dies, freezes or is cut
off halfway through the transfer reaches some owners and not others. Left alone, the parts would then average
different members (the mean *with* the dead member in some parts and *without* it in others). So:

1. **Included.** When its part's senders have all finished or been excluded, an owner fixes its *included*
   set: the senders whose whole slice arrived (it never changes afterwards).
2. **Settle.** It asks every other owner for its included set (:func:`settle`). The round's membership is
   the intersection of all of them; an owner that does not answer by the settle deadline is left out of it
   (its own slice of its own part is lost with it). The owner then excludes everybody else from its reducer
   (exactly: the reducer keeps one buffer per sender) and publishes the mean with the membership in its
   result header (:func:`result_header`).
3. **Agree.** A member commits only if every part it holds carries the same membership (:func:`agreed`),
   of at least two members: owners that saw different answers (one died while answering) make the round
   fail on the members that hold their parts, never a mixed result. Parts re-reduced in a repair are reduced
   from exactly that membership, and parts fetched from another member come with the membership they hold.

A member left out of the membership (its slice reached some owners too late) still receives and commits
the mean of the others: it averaged, its contribution was just not counted.
"""
from __future__ import annotations

import logging
from typing import Any

import trio

from p2p import Node, P2PError

from .reduce import ReduceError

logger = logging.getLogger(__name__)

RESULT = "result"


def result_header(members: tuple[str, ...]) -> list:
    """What an owner sends before a part's reduced values: ``["result", [member, ...]]``."""
    return [RESULT, list(members)]


def parse_result_header(msg: Any, peer_ids: list[str]) -> tuple[str, ...]:
    """The membership a result header names; :class:`ReduceError` if it is malformed or names non-members."""
    if not (isinstance(msg, list) and len(msg) == 2 and msg[0] == RESULT and isinstance(msg[1], list)):
        raise ReduceError(f"expected a result header, got {str(msg)[:80]!r}")
    members = tuple(sorted(set(msg[1])))
    if not members or not set(members) <= set(peer_ids):
        raise ReduceError("result header names peers that are not members of the round")
    return members


async def settle(node: Node, service: str, round_id: str, included: frozenset[str], owners: list[str],
                 deadline: float) -> frozenset[str]:
    """Step 2: the intersection of our ``included`` set with every other owner's (asked by the ``included``
    RPC); an owner that has not answered by ``deadline`` (trio time) is left out."""
    answers: dict[str, frozenset[str]] = {}

    async def ask(owner: str) -> None:
        try:
            reply = await node.call(owner, service, "included", {"round": round_id},
                                    timeout=max(deadline - trio.current_time(), 0.01))
        except P2PError as e:
            logger.info("Round %s: owner %s did not say whom it included: %s", round_id[-8:], owner[-8:], e)
            return
        if isinstance(reply, list) and all(isinstance(p, str) for p in reply):
            answers[owner] = frozenset(reply)

    async with trio.open_nursery() as nursery:
        for owner in owners:
            nursery.start_soon(ask, owner)
    members = included.intersection(*answers.values())
    silent = set(owners) - set(answers)
    if silent or members != included:
        logger.info("Round %s: membership settled on %d peers (%d owners silent, %d senders not everywhere)",
                    round_id[-8:], len(members - silent), len(silent), len(included - members))
    return frozenset(members - silent)


def agreed(memberships: dict[int, tuple[str, ...]], parts: list[int]) -> tuple[str, ...] | None:
    """Step 3: the one membership every one of ``parts`` holds, if they all hold the same one of two or more."""
    seen = {memberships.get(j) for j in parts}
    if len(seen) != 1 or None in seen:
        return None
    (members,) = seen
    return members if len(members) >= 2 else None
