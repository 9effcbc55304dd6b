"""Who contributed what: a leaderboard from the signed records trainers and expert hosts publish.

Inputs are rows of :func:`peer.swarm_state.training_progress` (each trainer's progress record, with its
averaging ledger, :mod:`peer.training.ledger`) and of :func:`peer.swarm_state.host_loads` (each host's
served rows, :meth:`peer.hosting.server.ExpertServer.load`). Every record is signed by the peer it
describes (its sub-key is that peer's ID), so nobody writes figures in another's name; what follows
checks what a peer says about itself against what others say about it.

Trainers. ``samples`` is the peer's own count of processed samples. ``averaged`` is the weight it
claims to have brought into committed averaging rounds; it is split into claims towards each witness of
those rounds. A claim towards partner ``T`` is *confirmed* up to what ``T``'s own record says it saw from
this peer; a claim above that is a *mismatch* (reported with both figures). A claim towards a partner
that publishes no record (it left) is neither: it stays unconfirmed. So ``confirmed <= averaged``, and
only ``confirmed`` rests on more than the peer's word.

Hosts. ``rows`` is the host's own count of served rows (forward and backward); ``confirmed_rows`` is the
sum of the rows trainers say the host answered them. Clients that publish nothing (``python -m peer
generate``) are served too, so a host's count may exceed the confirmed one without anyone lying.
"""
from __future__ import annotations

from collections.abc import Iterable

#: a claim may exceed what its partner saw by this much (both sides round to 3 decimals) before it is a mismatch
TOLERANCE = 0.01


def _ledger(row: dict) -> dict:
    ledger = row.get("ledger")
    return ledger if isinstance(ledger, dict) else {}


def _figures(table) -> dict[str, float]:
    if not isinstance(table, dict):
        return {}
    return {p: float(v) for p, v in table.items() if isinstance(p, str) and isinstance(v, (int, float))
            and not isinstance(v, bool) and v >= 0}


def leaderboard(progress: Iterable[dict], loads: Iterable[dict] = ()) -> dict:
    """``{"trainers": [...], "hosts": [...], "mismatches": [...]}``, each list best first.

    A trainer row: ``{"peer_id", "samples", "averaged", "confirmed", "rounds", "mismatches"}``; a host row:
    ``{"peer_id", "rows", "confirmed_rows"}``; a mismatch: ``{"peer_id", "partner", "claimed", "seen"}``.
    """
    progress = [row for row in progress if isinstance(row.get("peer_id"), str)]
    claims = {row["peer_id"]: _figures(_ledger(row).get("claims")) for row in progress}
    seen = {row["peer_id"]: _figures(_ledger(row).get("seen")) for row in progress}
    trainers, mismatches = [], []
    for row in progress:
        me = row["peer_id"]
        confirmed, mine = 0.0, []
        for partner, claimed in sorted(claims[me].items()):
            if partner not in seen:
                continue  # the partner publishes nothing (it left): unconfirmed, not a lie
            observed = seen[partner].get(me, 0.0)
            confirmed += min(claimed, observed)
            if claimed > observed + TOLERANCE:
                mine.append({"peer_id": me, "partner": partner, "claimed": claimed, "seen": observed})
        mismatches += mine
        averaged = _ledger(row).get("averaged")
        trainers.append({"peer_id": me, "samples": int(row.get("samples") or 0),
                         "averaged": float(averaged) if isinstance(averaged, (int, float)) else 0.0,
                         "confirmed": round(confirmed, 3), "rounds": int(_ledger(row).get("rounds") or 0),
                         "mismatches": len(mine)})
    answered: dict[str, int] = {}
    for row in progress:
        for host, rows in _figures(row.get("hosts")).items():
            answered[host] = answered.get(host, 0) + int(rows)
    hosts = [{"peer_id": load["peer_id"], "rows": int(load.get("rows") or 0),
              "confirmed_rows": answered.get(load["peer_id"], 0)} for load in loads]
    return {"trainers": sorted(trainers, key=lambda r: (-r["confirmed"], -r["samples"], r["peer_id"])),
            "hosts": sorted(hosts, key=lambda r: (-r["confirmed_rows"], -r["rows"], r["peer_id"])),
            "mismatches": mismatches}


__all__ = ["TOLERANCE", "leaderboard"]
