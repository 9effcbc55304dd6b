"""What peers say about the shared state: offers to serve it, and claims of which state each step holds.

A donor announces under ``<prefix>.state`` (sub-key: its peer ID, so only it can write it)::

    {"step": int, "nbytes": int, "sha256": blob digest, "piece_bytes": int, "addrs": [...],
     "state_hash": tensors digest}

``sha256`` names the bytes it serves (metadata included, which differs between donors: each writes its own
sample count), ``state_hash`` the tensors alone (:func:`~averaging.state_format.tensors_digest`), which every
member of one averaging round holds bit for bit. A *claim* is one peer saying "the state of step N has
hash H": every offer is one, and so is every entry ``{"state_hashes": {"N": H, ...}}`` of the records under
the extra keys a caller names (trainers put them in their progress records, client-mode ones included).

Verifying a download (:func:`~averaging.state.adownload_state` with ``confirmations=k``) means: the tensors
received hash to a state_hash that at least ``k`` peers besides the donor claimed for that step. A peer can claim only under
its own sub-key, so a liar needs ``k`` more identities that all lie alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dht import subkey_entries

from .state_format import MIN_BLOB_BYTES

logger = logging.getLogger(__name__)

MAX_PIECES = 1 << 17  # piece hash list of at most 4 MiB
MIN_PIECE_BYTES, MAX_PIECE_BYTES = 4096, 64 << 20   # hashing granularity a donor may choose
MAX_CLAIMS_PER_PEER = 16   # steps one peer's record may claim (a trainer keeps its last 8)


def state_key(prefix: str) -> str:
    """The DHT key under which peers of ``prefix`` offer their shared state (sub-key: peer ID)."""
    return f"{prefix}.state"


@dataclass(frozen=True)
class Offer:
    """One blob that one or more donors serve."""

    step: int
    sha256: str
    nbytes: int
    piece_bytes: int
    state_hash: str | None = None


def _is_hash(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def parse_offers(entry: Any, exclude: str, max_nbytes: int) -> dict[Offer, list[tuple[str, list[str]]]]:
    """Valid announcements grouped by offered blob: ``{offer: [(peer_id, addrs), ...]}``; malformed ones (and
    ``exclude``'s, our own) are skipped."""
    offers: dict[Offer, list[tuple[str, list[str]]]] = {}
    for peer_id, v, _ in subkey_entries(entry):
        try:
            state_hash = v.get("state_hash")
            offer = Offer(v["step"], v["sha256"], v["nbytes"], v["piece_bytes"],
                          state_hash if _is_hash(state_hash) else None)
            ok = (type(offer.step) is int and offer.step >= 0 and type(offer.nbytes) is int
                  and MIN_BLOB_BYTES <= offer.nbytes <= max_nbytes and type(offer.piece_bytes) is int
                  and MIN_PIECE_BYTES <= offer.piece_bytes <= MAX_PIECE_BYTES
                  and -(-offer.nbytes // offer.piece_bytes) <= MAX_PIECES
                  and isinstance(offer.sha256, str) and len(offer.sha256) == 64 and isinstance(v["addrs"], list))
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            logger.debug("Ignoring a malformed state announcement from %r", peer_id)
        elif peer_id != exclude:
            offers.setdefault(offer, []).append((peer_id, [a for a in v["addrs"][:8] if isinstance(a, str)]))
    return offers


def parse_claims(offers: dict[Offer, list[tuple[str, list[str]]]], records: list[Any]) -> dict[tuple[int, str], set[str]]:
    """Who claims which state: ``{(step, state_hash): {peer_id, ...}}`` from the offers and from the
    ``state_hashes`` of sub-keyed ``records`` (DHT values of the extra keys); malformed entries are skipped."""
    claims: dict[tuple[int, str], set[str]] = {}
    for offer, donors in offers.items():
        if offer.state_hash is not None:
            claims.setdefault((offer.step, offer.state_hash), set()).update(p for p, _ in donors)
    for entry in records:
        for peer_id, v, _ in subkey_entries(entry):
            hashes = v.get("state_hashes") if isinstance(v, dict) else None
            if not isinstance(hashes, dict):
                continue
            for step, state_hash in list(hashes.items())[:MAX_CLAIMS_PER_PEER]:
                if isinstance(step, str) and step.isdigit() and _is_hash(state_hash):
                    claims.setdefault((int(step), state_hash), set()).add(peer_id)
    return claims


def confirmations_of(claims: dict[tuple[int, str], set[str]], offer: Offer, donors: set[str]) -> int:
    """How many peers besides one donor vouch for ``offer``'s state: the distinct peers that claimed its
    ``state_hash`` for its step, its donors included (each announced this very blob, and every byte is checked
    against it), less one. 0 for an offer without a ``state_hash``."""
    if offer.state_hash is None:
        return 0
    return len(claims.get((offer.step, offer.state_hash), set()) | donors) - 1
