"""The local record store of one DHT node.

A key holds either a *plain value* (one :class:`~dht.records.Record` with ``subkey is None``) or a
*dictionary* (subkey -> Record), never both. Conflicts are resolved by expiration time alone, so every
node that sees the same set of writes ends up with the same contents, whatever the arrival order:

1. Plain key: the record with the latest expiration wins; an older-or-equal one is refused.
2. Dictionary key: per subkey the latest expiration wins; different subkeys (from different writers)
   merge. The dictionary's expiration is the max over its live subkeys.
3. A plain value replaces a dictionary only if it expires strictly later than the dictionary; a subkey
   replaces a plain value only if it expires strictly later than that value.
4. Expired records (``expiration_time <= now``) are never returned and never accepted.
5. Memory is bounded: beyond ``max_records`` records or ``max_bytes`` bytes, the records that expire
   soonest are evicted first (they are the least valuable to keep).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from typing import Callable, Iterator

from dht.records import DHTID, Record, get_dht_time

logger = logging.getLogger(__name__)

__all__ = ["RecordStore", "record_size"]

#: Approximate per-record bookkeeping cost in bytes, added to the payload sizes by :func:`record_size`.
RECORD_OVERHEAD_BYTES = 128


def record_size(record: Record) -> int:
    """Approximate memory a stored record costs: its byte fields plus a fixed overhead."""
    return (
        len(record.key) + len(record.subkey or b"") + len(record.value)
        + len(record.signature or b"") + RECORD_OVERHEAD_BYTES
    )


class RecordStore:
    """Records kept by one DHT node, with hivemind-style merge rules (see the module docstring).

    Args:
        max_records: the most records (a dictionary counts one per subkey) kept at once.
        max_bytes: the most bytes (as measured by :func:`record_size`) kept at once.
        clock: returns the current DHT time; every method also takes an explicit ``now`` that overrides it
            (tests pass ``now`` instead of sleeping).
    """

    def __init__(
        self,
        max_records: int = 100_000,
        max_bytes: int = 256 * 2**20,
        *,
        clock: Callable[[], float] = get_dht_time,
    ) -> None:
        if max_records < 1 or max_bytes < 1:
            raise ValueError(f"max_records and max_bytes must be >= 1, got {max_records}, {max_bytes}")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._clock = clock
        self._plain: dict[DHTID, Record] = {}
        self._dicts: dict[DHTID, dict[bytes, Record]] = {}
        self._num_records = 0
        self._num_bytes = 0
        # Min-heap of (expiration_time, tie-breaker, key_id, subkey, record) over every record ever
        # stored; entries whose record was since replaced or removed are skipped lazily.
        self._heap: list[tuple[float, int, DHTID, bytes | None, Record]] = []
        self._counter = itertools.count()

    # ------------------------------------------------------------------ queries

    def get(self, key_id: DHTID, now: float | None = None) -> None | Record | dict[bytes, Record]:
        """The live content of ``key_id``: None, a plain :class:`Record`, or a fresh dict
        ``{serialized subkey: Record}`` of the live subkeys (None if none is live)."""
        now = self._now(now)
        plain = self._plain.get(key_id)
        if plain is not None:
            return plain if plain.expiration_time > now else None
        subkeys = self._dicts.get(key_id)
        if subkeys is None:
            return None
        live = {subkey: rec for subkey, rec in subkeys.items() if rec.expiration_time > now}
        return live or None

    def get_expiration(self, key_id: DHTID, now: float | None = None) -> float | None:
        """Expiration of the live content of ``key_id`` (for a dictionary: max over live subkeys)."""
        content = self.get(key_id, now)
        if content is None:
            return None
        if isinstance(content, Record):
            return content.expiration_time
        return max(rec.expiration_time for rec in content.values())

    def items(self, now: float | None = None) -> Iterator[tuple[DHTID, Record]]:
        """Every live record as ``(key_id, record)``; a dictionary yields one pair per subkey.

        Iterates over a snapshot, so storing while iterating is safe.
        """
        now = self._now(now)
        snapshot = [(key_id, rec) for key_id, rec in self._plain.items()]
        for key_id, subkeys in self._dicts.items():
            snapshot.extend((key_id, rec) for rec in subkeys.values())
        for key_id, rec in snapshot:
            if rec.expiration_time > now:
                yield key_id, rec

    def __len__(self) -> int:
        """Number of records held, counting each subkey; expired ones count until purged (any
        :meth:`store` or :meth:`purge_expired` call purges)."""
        return self._num_records

    def __contains__(self, key_id: object) -> bool:
        """True iff ``key_id`` has live content right now."""
        return self.get(key_id) is not None  # type: ignore[arg-type]

    @property
    def num_bytes(self) -> int:
        """Bytes currently held, as measured by :func:`record_size`."""
        return self._num_bytes

    # ------------------------------------------------------------------ updates

    def store(self, record: Record, now: float | None = None) -> bool:
        """Store ``record`` if the merge rules accept it; True iff it is stored afterwards.

        Returns False when the record is expired, loses to what is stored (older or equal expiration),
        or is immediately evicted because it expires sooner than everything else in a full store.
        """
        if not isinstance(record, Record):
            raise TypeError(f"RecordStore.store expects a Record, got {type(record).__name__}")
        now = self._now(now)
        self.purge_expired(now)
        if record.expiration_time <= now:
            return False
        key_id = record.key_id
        exp = record.expiration_time
        plain = self._plain.get(key_id)
        subkeys = self._dicts.get(key_id)

        if record.subkey is None:
            if plain is not None and exp <= plain.expiration_time:
                return False
            if subkeys is not None:
                if exp <= max(rec.expiration_time for rec in subkeys.values()):
                    return False
                self._drop_key(key_id)
            elif plain is not None:
                self._forget(plain)
            self._plain[key_id] = record
        else:
            if plain is not None:
                if exp <= plain.expiration_time:
                    return False
                self._drop_key(key_id)
                subkeys = None
            if subkeys is None:
                subkeys = self._dicts.setdefault(key_id, {})
            previous = subkeys.get(record.subkey)
            if previous is not None:
                if exp <= previous.expiration_time:
                    return False
                self._forget(previous)
            subkeys[record.subkey] = record

        self._remember(key_id, record)
        self._evict_to_fit()
        return self._holds(key_id, record)

    def purge_expired(self, now: float | None = None) -> int:
        """Drop every record with ``expiration_time <= now``; returns how many were dropped."""
        now = self._now(now)
        dropped = 0
        while self._heap and self._heap[0][0] <= now:
            _, _, key_id, subkey, rec = heapq.heappop(self._heap)
            if self._holds(key_id, rec):
                self._remove_one(key_id, subkey)
                dropped += 1
        if dropped:
            logger.debug("purged %d expired records, %d left", dropped, self._num_records)
        return dropped

    # ------------------------------------------------------------------ internals

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _holds(self, key_id: DHTID, record: Record) -> bool:
        if record.subkey is None:
            return self._plain.get(key_id) is record
        subkeys = self._dicts.get(key_id)
        return subkeys is not None and subkeys.get(record.subkey) is record

    def _remember(self, key_id: DHTID, record: Record) -> None:
        """Account for a record that was just placed into ``_plain`` / ``_dicts``."""
        self._num_records += 1
        self._num_bytes += record_size(record)
        heapq.heappush(self._heap, (record.expiration_time, next(self._counter), key_id, record.subkey, record))
        if len(self._heap) > 2 * self._num_records + 1024:
            self._compact_heap()

    def _forget(self, record: Record) -> None:
        """Undo the accounting of a record that is being removed (its heap entry goes stale)."""
        self._num_records -= 1
        self._num_bytes -= record_size(record)

    def _drop_key(self, key_id: DHTID) -> None:
        plain = self._plain.pop(key_id, None)
        if plain is not None:
            self._forget(plain)
        for rec in self._dicts.pop(key_id, {}).values():
            self._forget(rec)

    def _remove_one(self, key_id: DHTID, subkey: bytes | None) -> None:
        if subkey is None:
            self._forget(self._plain.pop(key_id))
            return
        subkeys = self._dicts[key_id]
        self._forget(subkeys.pop(subkey))
        if not subkeys:
            del self._dicts[key_id]

    def _evict_to_fit(self) -> None:
        """Rule 5: evict the soonest-expiring records until both limits hold."""
        evicted = 0
        while self._heap and (self._num_records > self.max_records or self._num_bytes > self.max_bytes):
            _, _, key_id, subkey, rec = heapq.heappop(self._heap)
            if self._holds(key_id, rec):
                self._remove_one(key_id, subkey)
                evicted += 1
        if evicted:
            logger.debug("evicted %d soonest-expiring records to stay within limits", evicted)

    def _compact_heap(self) -> None:
        entries = [(rec.expiration_time, next(self._counter), key_id, None, rec) for key_id, rec in self._plain.items()]
        for key_id, subkeys in self._dicts.items():
            entries.extend(
                (rec.expiration_time, next(self._counter), key_id, subkey, rec) for subkey, rec in subkeys.items()
            )
        heapq.heapify(entries)
        self._heap = entries
