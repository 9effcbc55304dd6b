"""Record validators: which records a DHT node accepts, and how a writer signs the ones it owns.

Every node runs the same validator on every record it is asked to store and on every record it
receives in a lookup, so a record a validator rejects never spreads.

* :class:`OwnerSignatureValidator` -- owner-protected keys: only one peer may write them.
* :class:`SchemaValidator` -- per key-prefix value types and sizes, plus a global value-size limit.
* :class:`CompositeValidator` -- runs several validators as one.

Owner protection. A record is protected when, after deserializing,

1. its key or its subkey is a ``str`` containing the marker ``[owner:<peer-id>]``, or
2. its subkey is a ``str`` that is itself an ed25519 libp2p peer ID ("12D3KooW...", whose identity
   multihash embeds the public key) -- so "one subkey per peer" dictionaries are unforgeable.

A protected record must carry an ed25519 signature by that peer over :func:`record_signing_payload`.
A record naming two different owners, or an owner that is not an ed25519 peer ID, can never be signed
and is always rejected.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any, Iterable, Mapping

from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from dht.records import DeserializationError, Record, deserialize, serialize

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "CompositeValidator",
    "OwnerSignatureValidator",
    "RecordValidator",
    "SchemaValidator",
    "ValidationError",
    "ValueSchema",
    "record_signing_payload",
]

SIGNATURE_DOMAIN = b"swarmtrain-dht-record\x00"
DEFAULT_MAX_VALUE_BYTES = 64 * 1024
OWNER_MARKER = re.compile(r"\[owner:([^\[\]]*)\]")
_MAX_PEER_ID_CHARS = 128  # ed25519 peer IDs are 52 characters; longer strings are never parsed


class ValidationError(ValueError):
    """A record breaks a validation rule; the message says which rule and how to comply."""


def record_signing_payload(record: Record) -> bytes:
    """The bytes an owner signs: ``SIGNATURE_DOMAIN + msgpack([key, subkey, value, expiration_time])``.

    Covers every field except the signature, so changing key, subkey, value or expiration breaks it.
    """
    return SIGNATURE_DOMAIN + serialize([record.key, record.subkey, record.value, record.expiration_time])


def _decode_field(record: Record, name: str) -> Any:
    try:
        return deserialize(getattr(record, name))
    except DeserializationError as exc:
        raise ValidationError(f"record {name} is not valid msgpack ({exc}); build records with Record.create") from exc


def _describe_key(record: Record) -> str:
    try:
        key = deserialize(record.key)
    except DeserializationError:
        return repr(record.key[:40])
    return repr(key)[:80]


class RecordValidator:
    """Base class of record validators. The base accepts every record and never signs.

    Subclasses override :meth:`validate` (raise :class:`ValidationError` to reject) and, if they need
    to add something before a record is sent, :meth:`sign`.
    """

    def validate(self, record: Record) -> None:
        """Raise :class:`ValidationError` if ``record`` must not be stored; return None to accept."""

    def sign(self, record: Record, private_key: PrivateKey) -> Record:
        """Return ``record`` prepared for publishing by the peer holding ``private_key`` (default: as is)."""
        return record


class CompositeValidator(RecordValidator):
    """Runs ``validators`` in order: :meth:`validate` fails at the first rejection; :meth:`sign` passes
    the record through each validator's ``sign`` in turn."""

    def __init__(self, validators: Iterable[RecordValidator]) -> None:
        self.validators = list(validators)
        for validator in self.validators:
            if not isinstance(validator, RecordValidator):
                raise TypeError(f"CompositeValidator takes RecordValidator instances, got {type(validator).__name__}")

    def validate(self, record: Record) -> None:
        """Raise the first :class:`ValidationError` of any validator."""
        for validator in self.validators:
            validator.validate(record)

    def sign(self, record: Record, private_key: PrivateKey) -> Record:
        """Apply every validator's ``sign`` in order."""
        for validator in self.validators:
            record = validator.sign(record, private_key)
        return record


@functools.lru_cache(maxsize=4096)
def ed25519_key_of_peer_id(peer_id: str) -> Ed25519PublicKey | None:
    """The ed25519 public key embedded in a libp2p peer ID string, or None if ``peer_id`` is not a
    canonical ed25519 identity-multihash peer ID."""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= _MAX_PEER_ID_CHARS:
        return None
    try:
        parsed = ID.from_base58(peer_id)
        if parsed.to_base58() != peer_id:
            return None
        key = parsed.extract_public_key()
    except Exception:  # base58 / multihash / protobuf errors all mean "not a peer ID"
        return None
    return key if isinstance(key, Ed25519PublicKey) else None


class OwnerSignatureValidator(RecordValidator):
    """Accepts an owner-protected record only if it is signed by its owner (see the module docstring);
    unprotected records always pass."""

    def owner_of(self, record: Record) -> tuple[str, Ed25519PublicKey] | None:
        """``(owner peer ID, its public key)`` if ``record`` is protected, None if it is not.

        Raises :class:`ValidationError` if the record names several owners or an unusable one.
        """
        owners: set[str] = set()
        key = _decode_field(record, "key")
        if isinstance(key, str):
            owners.update(OWNER_MARKER.findall(key))
        if record.subkey is not None:
            subkey = _decode_field(record, "subkey")
            if isinstance(subkey, str):
                owners.update(OWNER_MARKER.findall(subkey))
                if ed25519_key_of_peer_id(subkey) is not None:
                    owners.add(subkey)
        if not owners:
            return None
        if len(owners) > 1:
            raise ValidationError(
                f"record for key {_describe_key(record)} names several owners {sorted(owners)}; "
                "a record can be protected by one owner only (put the [owner:...] marker in key or subkey, not both)"
            )
        owner = owners.pop()
        public_key = ed25519_key_of_peer_id(owner)
        if public_key is None:
            raise ValidationError(
                f"record for key {_describe_key(record)} is marked as owned by {owner!r}, which is not an "
                "ed25519 libp2p peer ID (12D3KooW...), so no one can sign it; use the owner's peer ID string"
            )
        return owner, public_key

    def validate(self, record: Record) -> None:
        """Reject a protected record unless its signature verifies against its owner's key."""
        protection = self.owner_of(record)
        if protection is None:
            return
        owner, public_key = protection
        if record.signature is None:
            raise ValidationError(
                f"record for key {_describe_key(record)} is owned by peer {owner} but is not signed; "
                "only that peer can write it (it signs with OwnerSignatureValidator.sign)"
            )
        try:
            valid = public_key.verify(record_signing_payload(record), record.signature)
        except Exception:  # e.g. a signature of the wrong length
            valid = False
        if not valid:
            raise ValidationError(
                f"record for key {_describe_key(record)} must be signed by its owner {owner}, but the signature "
                "does not verify: it was made by another peer or the record was altered after signing"
            )

    def sign(self, record: Record, private_key: PrivateKey) -> Record:
        """Sign ``record`` if it is protected and ``private_key`` belongs to its owner; otherwise return it
        unchanged (a protected record of someone else will then be rejected by :meth:`validate`)."""
        try:
            protection = self.owner_of(record)
        except ValidationError:
            return record
        if protection is None:
            return record
        _, owner_key = protection
        if private_key.get_public_key().serialize() != owner_key.serialize():
            return record
        return dataclasses.replace(record, signature=private_key.sign(record_signing_payload(record)))


def _as_type_tuple(name: str, types: Any) -> tuple[type, ...]:
    if isinstance(types, type):
        types = (types,)
    if not isinstance(types, tuple) or not types or not all(isinstance(t, type) for t in types):
        raise ValueError(f"ValueSchema.{name} must be a non-empty tuple of types, got {types!r}")
    if tuple in types:
        raise ValueError(f"ValueSchema.{name} contains tuple, but msgpack decodes arrays as list; use list")
    return types


def _matches(obj: Any, types: tuple[type, ...]) -> bool:
    """isinstance, except that a bool does not count as an int unless bool (or object) is listed."""
    if isinstance(obj, bool) and bool not in types and object not in types:
        return False
    return isinstance(obj, types)


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


@dataclasses.dataclass(frozen=True)
class ValueSchema:
    """What records under one key prefix may look like (types refer to deserialized objects).

    Attributes:
        value_types: allowed value types, e.g. ``(int, float)``. msgpack yields None, bool, int, float,
            str, bytes, list and dict; a bool does not count as an int unless ``bool`` is listed.
        max_value_bytes: the largest allowed serialized value.
        subkey_types: ``None`` = no subkeys, plain values only; a tuple of types = subkeys of those types
            are allowed (``(object,)`` for any subkey).
        allow_plain: whether a plain (subkey-less) value is allowed; False makes the key dictionary-only.
    """

    value_types: tuple[type, ...]
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    subkey_types: tuple[type, ...] | None = None
    allow_plain: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "value_types", _as_type_tuple("value_types", self.value_types))
        if self.subkey_types is not None:
            object.__setattr__(self, "subkey_types", _as_type_tuple("subkey_types", self.subkey_types))
        if isinstance(self.max_value_bytes, bool) or not isinstance(self.max_value_bytes, int) \
                or self.max_value_bytes < 1:
            raise ValueError(f"ValueSchema.max_value_bytes must be a positive int, got {self.max_value_bytes!r}")
        if self.subkey_types is None and not self.allow_plain:
            raise ValueError("ValueSchema allows neither plain values (allow_plain=False) nor subkeys "
                             "(subkey_types=None); set one of them")


class SchemaValidator(RecordValidator):
    """Checks records against per-prefix :class:`ValueSchema` rules and a global size limit.

    Args:
        rules: ``{key prefix: ValueSchema}``; a record whose deserialized key is a ``str`` is checked
            against the rule with the longest matching prefix. Keys matching no rule (or not str) pass.
        max_value_bytes: limit on the serialized value of every record, matched by a rule or not.
    """

    def __init__(self, rules: Mapping[str, ValueSchema] | None = None,
                 max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> None:
        rules = dict(rules or {})
        for prefix, schema in rules.items():
            if not isinstance(prefix, str) or not isinstance(schema, ValueSchema):
                raise TypeError(f"SchemaValidator rules map str prefixes to ValueSchema, got {prefix!r}: {schema!r}")
        if max_value_bytes < 1:
            raise ValueError(f"max_value_bytes must be positive, got {max_value_bytes}")
        self.max_value_bytes = max_value_bytes
        # Longest prefix first, so the first match is the most specific rule.
        self._rules = sorted(rules.items(), key=lambda item: len(item[0]), reverse=True)

    def rule_for(self, key: Any) -> tuple[str, ValueSchema] | None:
        """The ``(prefix, schema)`` that applies to a deserialized key, or None."""
        if not isinstance(key, str):
            return None
        for prefix, schema in self._rules:
            if key.startswith(prefix):
                return prefix, schema
        return None

    def validate(self, record: Record) -> None:
        """Check the global size limit, then the most specific matching rule (size, plain/subkey, types)."""
        size = len(record.value)
        if size > self.max_value_bytes:
            raise ValidationError(
                f"value for key {_describe_key(record)} is {size} bytes, but this DHT accepts at most "
                f"{self.max_value_bytes}; store something smaller (e.g. a hash or an address of the data)"
            )
        if not self._rules:
            return
        key = _decode_field(record, "key")
        rule = self.rule_for(key)
        if rule is None:
            return
        prefix, schema = rule
        where = f"key {key!r:.80} (rule for prefix {prefix!r})"
        if size > schema.max_value_bytes:
            raise ValidationError(f"value for {where} is {size} bytes; the rule allows at most {schema.max_value_bytes}")
        if record.subkey is None:
            if not schema.allow_plain:
                raise ValidationError(f"{where} only takes dictionary entries; store the value under a subkey")
        else:
            if schema.subkey_types is None:
                raise ValidationError(f"{where} only takes plain values; store it without a subkey")
            subkey = _decode_field(record, "subkey")
            if not _matches(subkey, schema.subkey_types):
                raise ValidationError(
                    f"subkey for {where} must be {_type_names(schema.subkey_types)}, got {type(subkey).__name__}"
                )
        value = _decode_field(record, "value")
        if not _matches(value, schema.value_types):
            raise ValidationError(
                f"value for {where} must be {_type_names(schema.value_types)}, got {type(value).__name__}"
            )
