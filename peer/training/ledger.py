"""A trainer's record of averaging: what it contributed, what it saw its partners contribute, recent rounds.

Why. Any incentive for volunteers needs a count of who contributed what that a peer cannot inflate on its
own. A trainer's processed samples are only its word; the samples it brought into averaging rounds are
seen by its partners: every part owner receives each contributor's weight (its samples since its last
round) in the header of that contributor's slice (:mod:`averaging.allreduce`), and
:class:`~averaging.averager.StepResult` reports them as ``observed_weights``, with the ``witnesses``
(the contributors that own parts, so saw every weight).

The pairwise ledger. For a round with witnesses ``W`` in which contributor ``P`` declared weight ``w``:

1. ``P``, if its round committed, *claims* ``w / |W - {P}|`` towards each witness ``T`` in ``W - {P}``
   (the weight is split, so the claims over all partners add up to ``w``);
2. each witness ``T`` in ``W - {P}`` records that it *saw* ``w / |W - {P}|`` from ``P`` (it does this once
   its own part settled, even when its round then failed, so its figure is never below ``P``'s claim).

Both sides compute the same share from facts the round agreed on. Each trainer publishes its totals in its
signed progress record (:meth:`ContributionLedger.record`); :func:`peer.contributions.leaderboard` confirms
``P``'s claim towards ``T`` up to what ``T`` says it saw, and reports every claim above that as a mismatch.
A peer can thus not claim more than its partners observed; it can still inflate the weight it declares
in a round (its partners then see, and average with, that weight), which is out of this record's reach.
"""
from __future__ import annotations

from collections import deque

from averaging.averager import StepResult
from dht import get_dht_time

RECENT_ROUNDS = 8  # rounds kept in the published record (a dashboard reading every few seconds sees them all)


def _share(witnesses: list[str], contributor: str) -> tuple[list[str], int]:
    others = [w for w in witnesses if w != contributor]
    return others, len(others)


class ContributionLedger:
    """Totals of one trainer's averaging rounds (see the module docstring for the rule)."""

    def __init__(self, me: str):
        self.me = me
        self.averaged = 0.0                 # our weight (samples) in rounds that committed
        self.rounds = 0                     # rounds that committed with at least one other contributor
        self.claims: dict[str, float] = {}  # partner -> our weight claimed towards it
        self.seen: dict[str, float] = {}    # partner -> its weight we saw
        self.recent: deque[dict] = deque(maxlen=RECENT_ROUNDS)

    def add_round(self, result: StepResult, weight: float) -> None:
        """Fold one :meth:`~averaging.averager.Averager.step` result (our ``weight`` in it) into the totals."""
        self.recent.append({"t": round(get_dht_time(), 3), "ok": bool(result.ok), "group": result.group_size,
                            "contributors": len(result.contributors), "s": round(result.duration, 3),
                            "sent": result.bytes_sent, "reason": result.reason[:120]})
        if result.ok and self.me in result.contributors:
            self.averaged += weight
            self.rounds += 1
            others, n = _share(result.witnesses, self.me)
            for partner in others:
                self.claims[partner] = self.claims.get(partner, 0.0) + weight / n
        for partner, w in result.observed_weights.items():
            others, n = _share(result.witnesses, partner)
            if partner != self.me and self.me in others:
                self.seen[partner] = self.seen.get(partner, 0.0) + w / n

    def record(self) -> dict:
        """The published form: ``{"averaged", "rounds", "claims": {peer: samples}, "seen": {peer: samples}}``."""
        return {"averaged": round(self.averaged, 3), "rounds": self.rounds,
                "claims": {p: round(w, 3) for p, w in sorted(self.claims.items())},
                "seen": {p: round(w, 3) for p, w in sorted(self.seen.items())}}
