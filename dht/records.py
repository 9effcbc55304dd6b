"""Identifiers, wire serialization and the record type of the swarmtrain DHT.

Everything a DHT node stores or sends is built from the pieces in this module:

* :class:`DHTID` -- a 160-bit Kademlia identifier. Peers get theirs from their libp2p peer ID
  (:meth:`DHTID.from_peer_id`), keys from their serialized form (:meth:`DHTID.from_key_bytes`).
  Closeness is the XOR metric of Kademlia (Maymounkov & Mazieres, 2002, section 2.1).
* :func:`serialize` / :func:`deserialize` -- msgpack with bounded decoding, the only wire format.
* :class:`Record` -- one stored value: serialized key, optional serialized subkey, serialized value,
  absolute expiration time and an optional owner signature.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import random
import time
from typing import Any, NamedTuple

import msgpack
from libp2p.peer.id import ID

__all__ = [
    "DHTID",
    "DeserializationError",
    "MalformedRecord",
    "Record",
    "SerializationError",
    "ValueWithExpiration",
    "deserialize",
    "get_dht_time",
    "serialize",
]

HASH_BITS = 160
ID_BYTES = HASH_BITS // 8


def get_dht_time() -> float:
    """Current DHT time: seconds since the unix epoch (``time.time()``).

    Record expiration times are absolute values on this clock, so peers need roughly synchronized
    wall clocks (a few seconds of skew is harmless for expirations of minutes).
    """
    return time.time()


class SerializationError(ValueError):
    """An object could not be encoded with msgpack (e.g. it contains a custom class instance)."""


class DeserializationError(ValueError):
    """Bytes are not one valid, complete msgpack object within the decoder's size limits."""


class MalformedRecord(ValueError):
    """A record (from the wire or built locally) has fields of the wrong type or out of range."""


class DHTID(int):
    """A 160-bit Kademlia identifier, usable as a plain ``int``.

    Distance between two ids is their XOR (a metric: d(x, x) = 0, symmetric, triangle inequality),
    see :meth:`xor_distance`. Construct with ``DHTID(some_int)`` (must be in ``[0, 2**160)``) or one of
    the ``from_*`` / :meth:`random` constructors.
    """

    MIN = 0
    MAX = 2**HASH_BITS  # exclusive upper bound

    def __new__(cls, value: int) -> "DHTID":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"DHTID must be built from an int, got {type(value).__name__}")
        if not cls.MIN <= value < cls.MAX:
            raise ValueError(f"DHTID must be in [0, 2**{HASH_BITS}), got {value}")
        return super().__new__(cls, value)

    @classmethod
    def from_peer_id(cls, peer_id: str) -> "DHTID":
        """The node id of a libp2p peer: sha1 over the raw (base58-decoded) peer-id bytes.

        Raises ``ValueError`` if ``peer_id`` is not a base58 string.
        """
        return _peer_node_id(peer_id)

    @classmethod
    def from_key_bytes(cls, key_bytes: bytes) -> "DHTID":
        """The id of a DHT key: sha1 over the key's serialized bytes (see :func:`serialize`)."""
        if not isinstance(key_bytes, (bytes, bytearray, memoryview)):
            raise TypeError(f"key_bytes must be bytes, got {type(key_bytes).__name__}")
        return cls(int.from_bytes(hashlib.sha1(key_bytes).digest(), "big"))

    @classmethod
    def random(cls, lower: int = MIN, upper: int = MAX) -> "DHTID":
        """A uniformly random id in ``[lower, upper)`` (used to refresh a bucket's range)."""
        if not cls.MIN <= lower < upper <= cls.MAX:
            raise ValueError(f"need 0 <= lower < upper <= 2**{HASH_BITS}, got [{lower}, {upper})")
        return cls(random.randrange(lower, upper))

    def to_bytes(self) -> bytes:  # type: ignore[override]
        """The id as 20 big-endian bytes."""
        return int.to_bytes(self, ID_BYTES, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> "DHTID":  # type: ignore[override]
        """Inverse of :meth:`to_bytes`; ``raw`` must be exactly 20 bytes."""
        if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) != ID_BYTES:
            raise ValueError(f"a DHTID is encoded as exactly {ID_BYTES} bytes, got {raw!r:.60}")
        return cls(int.from_bytes(raw, "big"))

    def xor_distance(self, other: int) -> int:
        """Kademlia distance ``self XOR other`` as a plain int (0 iff the ids are equal)."""
        return int(self) ^ int(other)

    def __repr__(self) -> str:
        return f"DHTID({int(self):#042x})"


@functools.lru_cache(maxsize=16384)
def _peer_node_id(peer_id: str) -> DHTID:
    if not isinstance(peer_id, str) or not peer_id:
        raise ValueError(f"peer_id must be a non-empty base58 string, got {peer_id!r:.60}")
    try:
        raw = ID.from_base58(peer_id).to_bytes()
    except Exception as exc:  # base58 raises a bare ValueError with a terse message
        raise ValueError(f"peer_id {peer_id!r:.60} is not valid base58: {exc}") from exc
    return DHTID(int.from_bytes(hashlib.sha1(raw).digest(), "big"))


def serialize(obj: Any) -> bytes:
    """Encode ``obj`` with msgpack (bin type on). Supports None, bool, int, float, str, bytes, list,
    tuple (decoded back as list) and dict. Raises :class:`SerializationError` for anything else."""
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot serialize {type(obj).__name__} with msgpack: {exc}") from exc


def _reject_ext(code: int, data: bytes) -> Any:
    raise DeserializationError(f"msgpack extension type {code} is not allowed")


def deserialize(raw: bytes) -> Any:
    """Decode exactly one msgpack object from ``raw``.

    Lengths of strings, binaries, arrays and maps are bounded by ``len(raw)``, so a few bytes can never
    claim a huge allocation; nesting depth is bounded by msgpack's internal stack. Extension types are
    refused. Any problem (truncated, trailing bytes, invalid utf-8, unhashable map key, ...) raises
    :class:`DeserializationError`.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise DeserializationError(f"expected bytes to deserialize, got {type(raw).__name__}")
    size = len(raw)
    try:
        return msgpack.unpackb(
            raw,
            use_list=True,
            raw=False,
            strict_map_key=False,
            ext_hook=_reject_ext,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,
            max_map_len=size // 2,
            max_ext_len=size,
        )
    except DeserializationError:
        raise
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise DeserializationError(f"invalid msgpack data ({size} bytes): {exc or type(exc).__name__}") from exc


class ValueWithExpiration(NamedTuple):
    """What the user-facing DHT API returns: a deserialized value and its absolute expiration time."""

    value: Any
    expiration_time: float


class SubkeyEntry(NamedTuple):
    """One entry of a sub-keyed DHT value: who wrote it (its sub-key, a peer ID), what, and until when."""

    subkey: str
    value: Any
    expiration_time: float


def subkey_entries(found: ValueWithExpiration | None, kind: type | tuple[type, ...] = dict) -> list[SubkeyEntry]:
    """The entries of a value stored with sub-keys (what ``DHT.get(key, latest=True)`` returns for it), sorted
    by sub-key. Only string sub-keys whose value is a ``kind`` are kept: a peer's malformed entry is skipped,
    never an error of the reader."""
    if found is None or not isinstance(found.value, dict):
        return []
    out = [SubkeyEntry(subkey, item.value, float(item.expiration_time)) for subkey, item in found.value.items()
           if isinstance(subkey, str) and isinstance(item, ValueWithExpiration) and isinstance(item.value, kind)]
    return sorted(out, key=lambda e: e.subkey)


def _check_bytes(name: str, value: Any, optional: bool) -> bytes | None:
    if value is None and optional:
        return None
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, bytes):
        expected = "bytes or None" if optional else "bytes"
        raise MalformedRecord(f"record field {name!r} must be {expected}, got {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True)
class Record:
    """One entry of the DHT, exactly as it is stored and sent.

    Attributes:
        key: the serialized (:func:`serialize`) user key; its sha1 is :attr:`key_id`.
        subkey: the serialized subkey for dictionary-valued keys, or None for a plain value.
        value: the serialized value.
        expiration_time: absolute expiration on the :func:`get_dht_time` clock (finite float).
        signature: the owner's signature for owner-protected keys (see ``dht.validation``), else None.

    Construction checks the field types and raises :class:`MalformedRecord` on bad input.
    """

    key: bytes
    subkey: bytes | None
    value: bytes
    expiration_time: float
    signature: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", _check_bytes("key", self.key, optional=False))
        object.__setattr__(self, "subkey", _check_bytes("subkey", self.subkey, optional=True))
        object.__setattr__(self, "value", _check_bytes("value", self.value, optional=False))
        object.__setattr__(self, "signature", _check_bytes("signature", self.signature, optional=True))
        exp = self.expiration_time
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise MalformedRecord(f"record expiration_time must be a number, got {type(exp).__name__}")
        try:
            exp = float(exp)
        except OverflowError as exc:  # an int too large for a float
            raise MalformedRecord(f"record expiration_time {exp} is out of range") from exc
        if not math.isfinite(exp):
            raise MalformedRecord(f"record expiration_time must be finite, got {exp}")
        object.__setattr__(self, "expiration_time", exp)

    @classmethod
    def create(cls, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> "Record":
        """Build an unsigned record from Python objects, serializing key, value and subkey.

        ``subkey=None`` means a plain (non-dictionary) value, so None itself cannot be a subkey.
        """
        return cls(
            key=serialize(key),
            subkey=None if subkey is None else serialize(subkey),
            value=serialize(value),
            expiration_time=expiration_time,
        )

    @functools.cached_property
    def key_id(self) -> DHTID:
        """The DHT id of this record's key (sha1 of the serialized key)."""
        return DHTID.from_key_bytes(self.key)

    def to_wire(self) -> list:
        """The record as ``[key, subkey, value, expiration_time, signature]`` ready for msgpack."""
        return [self.key, self.subkey, self.value, self.expiration_time, self.signature]

    @classmethod
    def from_wire(cls, obj: Any) -> "Record":
        """Inverse of :meth:`to_wire` for untrusted input; raises :class:`MalformedRecord` if ``obj`` is
        not a 5-element list/tuple with correctly typed fields."""
        if not isinstance(obj, (list, tuple)) or len(obj) != 5:
            raise MalformedRecord(
                f"a wire record is a list [key, subkey, value, expiration_time, signature], got {obj!r:.80}"
            )
        key, subkey, value, expiration_time, signature = obj
        # Refuse bytearray/memoryview from the wire too: msgpack only produces bytes.
        for name, field, optional in (("key", key, False), ("subkey", subkey, True),
                                      ("value", value, False), ("signature", signature, True)):
            if not (isinstance(field, bytes) or (optional and field is None)):
                expected = "bytes or None" if optional else "bytes"
                raise MalformedRecord(f"wire record field {name!r} must be {expected}, got {type(field).__name__}")
        return cls(key, subkey, value, expiration_time, signature)
