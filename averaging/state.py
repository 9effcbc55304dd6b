"""State sharing: a newcomer downloads the current averaged state (tensors + metadata) from peers that have it.

The state travels as a blob of :mod:`averaging.state_format` (msgpack header + raw tensor bytes, no
pickle), identified by the SHA-256 of its piece hashes.

Donor side (:class:`StateSharer`), every ``announce_interval`` seconds:

1. call ``get_state()``; if ``metadata["step"]`` changed, serialize a new snapshot and hash it (in a
   worker thread); the previous snapshot stays servable for ``keep_previous`` seconds;
2. announce ``{"step", "nbytes", "sha256", "piece_bytes", "addrs", "state_hash"}`` under DHT key
   ``<prefix>.state``, sub-key = our peer id (owner-signed), expiring after ``announce_ttl``
   (:mod:`averaging.state_offers`: ``sha256`` names the blob, ``state_hash`` the tensors alone);
3. serve ``pieces`` (the piece hashes) and ``read`` (a byte range of a named snapshot) on service
   ``state.<prefix>``; a request naming a snapshot we no longer hold gets a clear error.

Downloader side (:func:`download_state`):

1. read every announcement (and the records under ``confirm_keys``); group donors by offered blob; try
   offers by highest step, then most donors; with ``confirmations=k``, only offers whose ``state_hash`` at
   least ``k`` peers besides their donors claimed for that step;
2. fetch the piece hashes from one donor and check them against the announced sha256;
3. split the blob into ranges; up to ``max_donors`` donors pull ranges from one shared queue in parallel
   (:mod:`averaging.state_transfer`);
4. when every piece is verified, decode the blob (validating the header), refuse NaN/inf, and with
   ``confirmations`` check that the tensors hash to the claimed ``state_hash`` (donors that served another
   state are banned); return it.
"""
from __future__ import annotations

import functools
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import trio

from dht import DHT, get_dht_time
from p2p import P2PError, ServiceLimits
from p2p.framing import MAX_FRAME_BYTES
from p2p.streams import send_bytes

from .bans import BanList
from .checks import all_finite
from .state_format import StateFormatError, check_step, decode_state, encode_state, piece_hashes, state_digest, \
    tensors_digest
from .state_offers import MAX_PIECE_BYTES, MAX_PIECES, MIN_PIECE_BYTES, Offer, confirmations_of, parse_claims, \
    parse_offers, state_key
from .state_transfer import StateDownloadError, StateUnconfirmed, Transfer, fetch_hashes

__all__ = ["StateSharer", "StateDownloadError", "StateUnconfirmed", "StateFormatError", "adownload_state", "download_state",
           "decode_state", "encode_state", "piece_hashes", "state_digest"]

logger = logging.getLogger(__name__)


READ_BYTES = MAX_FRAME_BYTES  # one read request's range (a downloader asks several donors for ranges at once)


# ------------------------------------------------------------------------------------------ donor
@dataclass
class _Snapshot:
    step: int
    blob: bytearray
    hashes: bytes
    sha256: str
    state_hash: str
    retired_at: float | None = None


class StateSharer:
    """Serves this peer's state to newcomers and announces it on the DHT (see the module docstring).

    :param dht: a running DHT; the state is served on its node.
    :param prefix: names the state (DHT key ``<prefix>.state``, service ``state.<prefix>``); no '/'.
    :param get_state: returns ``(metadata, tensors)``; ``metadata["step"]`` is an int. Called from a worker
        thread every ``announce_interval``; a new snapshot is taken only when the step changed (or on
        :meth:`refresh` with ``force=True``), so return tensors that are consistent at that moment.
    :param announce_interval: seconds between announcements; ``announce_ttl`` (default twice that, at least
        10 s) is how long one stays valid.
    :param piece_bytes: hashing granularity; a downloader's ranges are multiples of it.
    :param keep_previous: seconds a replaced snapshot stays servable, so in-flight downloads can finish.
    """

    def __init__(self, dht: DHT, prefix: str, get_state: Callable[[], tuple[dict, list[torch.Tensor]]], *,
                 announce_interval: float = 30.0, announce_ttl: float | None = None, piece_bytes: int = 1 << 20,
                 keep_previous: float = 60.0, stall_timeout: float = 10.0):
        if not prefix or "/" in prefix:
            raise ValueError(f"state prefix must be non-empty and contain no '/': {prefix!r}")
        if dht.client_mode:
            raise ValueError("a client-mode peer accepts no streams, so it cannot share state")
        if announce_interval <= 0 or not MIN_PIECE_BYTES <= piece_bytes <= MAX_PIECE_BYTES:
            raise ValueError("announce_interval must be > 0 and piece_bytes within 4 KiB..64 MiB")
        self.dht, self.prefix, self.get_state = dht, prefix, get_state
        self.announce_interval, self.piece_bytes, self.keep_previous = announce_interval, piece_bytes, keep_previous
        self.announce_ttl = announce_ttl or max(2 * announce_interval, 10.0)
        self.stall_timeout = stall_timeout
        self._snapshots: dict[str, _Snapshot] = {}
        self._current: _Snapshot | None = None
        self._lock = trio.Lock()
        self.tasks = dht.node.task_group(f"state sharer {prefix}")
        self.closed = False
        dht.node.serve(f"state.{prefix}", {"pieces": self._serve_pieces, "read": self._serve_read},
                       limits=ServiceLimits(max_message_bytes=MAX_PIECES * 32 + 4096, handler_timeout=120.0))
        self.tasks.spawn(self._announce_loop)

    def announce_soon(self) -> None:
        """Announce the current state now, in the background (not up to ``announce_interval`` later)."""
        self.tasks.spawn(self._announce_once)

    async def _announce_once(self) -> None:
        try:
            await self.arefresh()
        except Exception as e:  # e.g. shutting down; the announce loop tries again within announce_interval
            logger.debug("State %s: announcement failed: %s: %s", self.prefix, type(e).__name__, e)

    def refresh(self, force: bool = False) -> dict:
        """Blocking :meth:`arefresh`."""
        return self.dht.node.run(functools.partial(self.arefresh, force))

    async def arefresh(self, force: bool = False) -> dict:
        """Take a snapshot if the step changed (or ``force``), announce it now and return the announced value."""
        async with self._lock:
            current = None if force else self._current
            fresh = await trio.to_thread.run_sync(self._take_snapshot, current)
            if self.closed:
                raise P2PError("state sharer is shut down")
            if fresh is not current:
                if self._current is not None:
                    self._current.retired_at = time.monotonic()
                self._current, self._snapshots[fresh.sha256] = fresh, fresh
                logger.info("State %s: snapshot of step %d, %.1f MB, sha256 %s", self.prefix, fresh.step,
                            len(fresh.blob) / 1e6, fresh.sha256[:12])
            self._drop_old()
            value = {"step": fresh.step, "nbytes": len(fresh.blob), "sha256": fresh.sha256,
                     "piece_bytes": self.piece_bytes, "addrs": self.dht.node.addrs[:8], "state_hash": fresh.state_hash}
            record = self.dht.make_record(state_key(self.prefix), value, get_dht_time() + self.announce_ttl,
                                          subkey=self.dht.peer_id)
            if not (await self.dht.astore_many([record]))[0]:
                logger.warning("State %s: no DHT node accepted our announcement", self.prefix)
            return value

    def _take_snapshot(self, current: _Snapshot | None) -> _Snapshot:
        metadata, tensors = self.get_state()
        step = check_step(metadata)
        if current is not None and current.step == step:
            return current
        blob = encode_state(metadata, tensors)
        hashes = piece_hashes(blob, self.piece_bytes)
        return _Snapshot(step, blob, hashes, state_digest(hashes), tensors_digest(tensors))

    def _drop_old(self) -> None:
        now = time.monotonic()
        for sha, snap in list(self._snapshots.items()):
            if snap.retired_at is not None and now - snap.retired_at > self.keep_previous:
                del self._snapshots[sha]

    async def _announce_loop(self) -> None:
        """Announce every ``announce_interval`` until :meth:`shutdown` cancels our tasks."""
        while True:
            try:
                await self.arefresh()
            except Exception as e:  # a failing get_state or DHT must not end sharing; retry next period
                logger.warning("State %s: announcement failed: %s: %s", self.prefix, type(e).__name__, e)
            await trio.sleep(self.announce_interval)

    def _snapshot(self, args: Any) -> _Snapshot:
        sha = args.get("sha256") if isinstance(args, dict) else None
        self._drop_old()
        snap = self._snapshots.get(sha) if isinstance(sha, str) else None
        if snap is None:
            step = self._current.step if self._current else None
            raise ValueError(f"no snapshot {str(sha)[:12]} here (our state is at step {step})")
        return snap

    async def _serve_pieces(self, ctx, args: Any) -> dict:
        snap = self._snapshot(args)
        return {"piece_bytes": self.piece_bytes, "nbytes": len(snap.blob), "hashes": snap.hashes}

    async def _serve_read(self, ctx, args: Any) -> None:
        snap = self._snapshot(args)
        start, end = args.get("start"), args.get("end")
        if not (type(start) is int and type(end) is int and 0 <= start < end <= len(snap.blob)):
            raise ValueError(f"bad range {start!r}..{end!r} of a {len(snap.blob)}-byte state")
        await send_bytes(ctx.stream, await self._read_range(snap, start, end), timeout=self.stall_timeout)
        logger.debug("State %s: served bytes %d..%d of %s to %s", self.prefix, start, end, snap.sha256[:12],
                     ctx.peer_id[-8:])

    async def _read_range(self, snap: "_Snapshot", start: int, end: int) -> memoryview | bytes:
        """The bytes a ``read`` of ``start..end`` serves (fault-injection tests override this)."""
        return memoryview(snap.blob)[start:end]

    def shutdown(self) -> None:
        """Stop announcing and serving (the last announcement expires within ``announce_ttl``)."""
        self.closed = True      # serves nothing from now on (reads in flight fail on a missing snapshot)
        self.tasks.close()
        if self.dht.node.is_running:
            self.dht.node.run_sync_soon(self._forget_snapshots)
        else:
            self._forget_snapshots()

    def _forget_snapshots(self) -> None:
        self._snapshots.clear()
        self._current = None


# ------------------------------------------------------------------------------------------ downloader
async def adownload_state(dht: DHT, prefix: str, *, timeout: float = 300.0, max_donors: int = 3,
                          chunk_bytes: int = READ_BYTES, stall_timeout: float = 10.0,
                          max_nbytes: int = 16 << 30, newer_than: int = -1, confirmations: int = 0,
                          confirm_keys: Sequence[str] = (), bans: BanList | None = None
                          ) -> tuple[dict, list[torch.Tensor]] | None:
    """Download the newest announced state of ``prefix``: ``(metadata, tensors)``, or None if none is announced
    (or none with a step above ``newer_than``: a peer that holds step N passes N and downloads nothing older).

    Picks the highest step, then the offer most donors announce (falling back to the next offers if all
    its donors fail), fetches ranges of about ``chunk_bytes`` from up to ``max_donors`` donors in parallel,
    verifies every piece and decodes the result. Raises :class:`StateDownloadError` if state was announced
    but no verified copy arrived within ``timeout`` seconds.

    :param confirmations: accept a state only when at least this many peers besides its donors claimed its
        tensors' hash for its step (:mod:`averaging.state_offers`: in their offers, or in the ``state_hashes``
        of their records under ``confirm_keys``); offers with fewer are not downloaded. Donors that serve
        tensors other than the state they announced (a state nobody else claimed) are put in ``bans`` and
        skipped while banned. 0 (default): trust any donor whose bytes match its own announcement.
    :param stall_timeout: a donor that sends nothing for this long is dropped and its range re-assigned.
    :param max_nbytes: offers of bigger states are ignored (the whole state is held in memory).
    """
    if max_donors < 1 or chunk_bytes < 1 or confirmations < 0:
        raise ValueError("max_donors and chunk_bytes must be >= 1, confirmations >= 0")
    service, started = f"state.{prefix}", time.monotonic()
    errors: list[str] = []
    with trio.move_on_after(timeout):
        found = await dht.aget_many([state_key(prefix), *confirm_keys], latest=True)
        offers = parse_offers(found.get(state_key(prefix)), dht.peer_id, max_nbytes)
        claims = parse_claims(offers, [found.get(k) for k in confirm_keys])
        offers = {offer: [(p, a) for p, a in donors if bans is None or not bans.is_banned(p)]
                  for offer, donors in offers.items() if offer.step > newer_than}
        offers = {offer: donors for offer, donors in offers.items() if donors}
        if not offers:
            return None
        unconfirmed = 0
        for offer, announced in sorted(offers.items(), key=lambda kv: (kv[0].step, len(kv[1])), reverse=True):
            donor_ids = {p for p, _ in announced}
            if confirmations and confirmations_of(claims, offer, donor_ids) < confirmations:
                unconfirmed += 1
                continue
            for peer_id, addrs in announced:
                dht.node.add_addrs(peer_id, addrs)
            donors = random.sample(sorted(donor_ids), len(donor_ids))
            try:
                hashes = await fetch_hashes(dht.node, service, offer, donors, stall_timeout)
                range_bytes = max(1, chunk_bytes // offer.piece_bytes) * offer.piece_bytes
                transfer = Transfer(dht.node, service, offer, hashes, donors, max_donors, range_bytes, stall_timeout)
                blob = await transfer.run()
                metadata, tensors = await trio.to_thread.run_sync(decode_state, blob)
                broken = [i for i, t in enumerate(tensors) if t.is_floating_point() and not all_finite(t)]
                if broken:  # a donor's hashes only prove it sent what it announced, not that it is sane
                    raise StateFormatError(f"tensors {broken[:5]} contain NaN/inf")
                if confirmations:
                    _check_claimed(offer, metadata, await trio.to_thread.run_sync(tensors_digest, tensors),
                                   transfer.served, bans)
            except (StateDownloadError, StateFormatError) as e:
                logger.warning("State %s: step %d from %d donors failed: %s", prefix, offer.step, len(announced), e)
                errors.append(str(e))
                continue
            elapsed = time.monotonic() - started
            logger.info("State %s: downloaded step %d (%.1f MB) in %.2fs (%.1f MB/s); MB per donor %s; dropped %s%s",
                        prefix, offer.step, offer.nbytes / 1e6, elapsed, offer.nbytes / 1e6 / max(elapsed, 1e-9),
                        {d[-8:]: round(n / 1e6, 1) for d, n in transfer.served.items()},
                        {d[-8:]: why for d, why in transfer.failures.items()},
                        f"; confirmed by {confirmations_of(claims, offer, donor_ids)} other peers" if confirmations else "")
            return metadata, tensors
        if not errors:
            raise StateUnconfirmed(f"no state of {prefix!r} is confirmed: {unconfirmed} offers, none whose hash "
                                     f"{confirmations} peers besides its donor claimed for its step")
        raise StateDownloadError(f"state {prefix!r} was announced but every offer failed: {errors}")
    raise StateDownloadError(f"no verified state {prefix!r} within {timeout}s (errors so far: {errors})")


def _check_claimed(offer: Offer, metadata: dict, got: str, served: Counter, bans: BanList | None) -> None:
    """The tensors (hash ``got``) must be the state the offer claimed, at its step; else its donors lied (banned)."""
    if got != offer.state_hash or metadata.get("step") != offer.step:
        reason = (f"served a state of step {metadata.get('step')!r} with hash {got[:12]}, not the step {offer.step} "
                  f"state {str(offer.state_hash)[:12]} it announced and others confirmed")
        for donor in served if bans is not None else ():
            bans.ban(donor, reason)
        raise StateFormatError(f"donors {[d[-8:] for d in served]} {reason}")


def download_state(dht: DHT, prefix: str, *, timeout: float = 300.0, max_donors: int = 3,
                   chunk_bytes: int = READ_BYTES, stall_timeout: float = 10.0,
                   max_nbytes: int = 16 << 30, newer_than: int = -1, confirmations: int = 0,
                   confirm_keys: Sequence[str] = (), bans: BanList | None = None
                   ) -> tuple[dict, list[torch.Tensor]] | None:
    """Blocking :func:`adownload_state`, for training code outside the trio loop."""
    return dht.node.run(functools.partial(adownload_state, dht, prefix, timeout=timeout, max_donors=max_donors,
                                          chunk_bytes=chunk_bytes, stall_timeout=stall_timeout, max_nbytes=max_nbytes,
                                          newer_than=newer_than, confirmations=confirmations,
                                          confirm_keys=confirm_keys, bans=bans))
