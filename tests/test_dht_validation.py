"""Unit tests for wire records (dht.records) and record validators (dht.validation)."""

import dataclasses
import math
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.peer.id import ID

from dht.records import (
    DeserializationError,
    MalformedRecord,
    Record,
    SerializationError,
    ValueWithExpiration,
    deserialize,
    get_dht_time,
    serialize,
)
from dht.validation import (
    CompositeValidator,
    OwnerSignatureValidator,
    RecordValidator,
    SchemaValidator,
    ValidationError,
    ValueSchema,
    record_signing_payload,
)

FAST = settings(max_examples=60, deadline=None, database=None)
EXP = 2_000_000_000.0

ALICE = create_new_key_pair()
BOB = create_new_key_pair()
ALICE_ID = ID.from_pubkey(ALICE.public_key).to_base58()
BOB_ID = ID.from_pubkey(BOB.public_key).to_base58()
OWNERS = OwnerSignatureValidator()


# ---------------------------------------------------------------- serialization

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5) | st.integers(-1000, 1000), children, max_size=4),
    max_leaves=15,
)


@FAST
@given(msgpack_values)
def test_serialize_round_trip(obj):
    assert deserialize(serialize(obj)) == obj


def test_serialize_rejects_unsupported_objects():
    with pytest.raises(SerializationError):
        serialize(object())
    with pytest.raises(SerializationError):
        serialize(2**64)
    assert deserialize(serialize((1, 2))) == [1, 2]


@pytest.mark.parametrize("garbage", [
    b"",                                  # nothing
    b"\xc1",                              # reserved byte
    b"\x01\x02",                          # trailing data
    b"\xdd\xff\xff\xff\xff",              # claims a 4-billion-element array
    b"\xdb\xff\xff\xff\xff",              # claims a 4 GiB string
    b"\xc6\x7f\xff\xff\xff",              # claims a 2 GiB binary
    b"\x91" * 100_000,                    # absurd nesting
    b"\xa3ab\xff",                        # invalid utf-8
    b"\x81\x90\x01",                      # map keyed by a list
    b"\xd4\x05\x01",                      # extension type
], ids=["empty", "reserved", "trailing", "huge-array", "huge-str", "huge-bin", "deep", "utf8", "list-key", "ext"])
def test_deserialize_rejects_garbage_quickly(garbage):
    started = time.perf_counter()
    with pytest.raises(DeserializationError):
        deserialize(garbage)
    assert time.perf_counter() - started < 0.5


def test_deserialize_rejects_non_bytes():
    with pytest.raises(DeserializationError):
        deserialize("text")


@FAST
@given(st.binary(max_size=64))
def test_deserialize_never_crashes_with_other_errors(raw):
    try:
        deserialize(raw)
    except DeserializationError:
        pass


# ---------------------------------------------------------------- records on the wire


def test_record_wire_round_trip_and_key_id():
    record = dataclasses.replace(Record.create("key", {"x": 1}, EXP, subkey="sub"), signature=b"s" * 64)
    wire = msgpack.unpackb(msgpack.packb(record.to_wire(), use_bin_type=True), raw=False)
    assert Record.from_wire(wire) == record
    assert record.key_id == Record.create("key", 0, 1).key_id
    assert Record.create("key", 0, 1).subkey is None
    assert Record.from_wire(Record.create("k", 1, 5).to_wire()).expiration_time == 5.0
    assert isinstance(Record(b"k", None, b"v", 5).expiration_time, float)
    assert ValueWithExpiration("v", 3.0).expiration_time == 3.0
    assert abs(get_dht_time() - time.time()) < 1


@pytest.mark.parametrize("wire", [
    None,
    b"record",
    [b"k", None, b"v", 1.0],                     # too short
    [b"k", None, b"v", 1.0, None, None],         # too long
    ["k", None, b"v", 1.0, None],                # key not bytes
    [b"k", 5, b"v", 1.0, None],                  # subkey not bytes
    [b"k", None, None, 1.0, None],               # value missing
    [b"k", None, b"v", "1.0", None],             # expiration not a number
    [b"k", None, b"v", True, None],              # bool is not a time
    [b"k", None, b"v", math.nan, None],          # NaN
    [b"k", None, b"v", math.inf, None],          # never expires
    [b"k", None, b"v", 10**400, None],           # too large for a float
    [b"k", None, b"v", 1.0, "sig"],              # signature not bytes
    [bytearray(b"k"), None, b"v", 1.0, None],    # msgpack never produces bytearray
])
def test_malformed_wire_records_are_rejected(wire):
    with pytest.raises(MalformedRecord):
        Record.from_wire(wire)


def test_malformed_records_are_rejected_locally_too():
    with pytest.raises(MalformedRecord):
        Record("k", None, b"v", 1.0)
    with pytest.raises(MalformedRecord):
        Record(b"k", None, b"v", math.nan)


# ---------------------------------------------------------------- owner signatures


def owned(key, value=1, subkey=None, exp=EXP) -> Record:
    return Record.create(key, value, exp, subkey=subkey)


def test_owner_marker_in_key_requires_owner_signature():
    record = owned(f"params[owner:{ALICE_ID}]", "weights")
    assert OWNERS.owner_of(record)[0] == ALICE_ID
    with pytest.raises(ValidationError, match=ALICE_ID):
        OWNERS.validate(record)  # missing signature names the owner
    signed = OWNERS.sign(record, ALICE.private_key)
    assert signed.signature is not None and signed.value == record.value
    OWNERS.validate(signed)
    # The signature covers the documented payload.
    assert ALICE.public_key.verify(record_signing_payload(signed), signed.signature)


def test_subkey_that_is_a_peer_id_is_protected():
    record = owned("peers-of-group", {"addr": "x"}, subkey=ALICE_ID)
    with pytest.raises(ValidationError, match=ALICE_ID):
        OWNERS.validate(record)
    OWNERS.validate(OWNERS.sign(record, ALICE.private_key))
    # Owner marker inside the subkey works as well.
    OWNERS.validate(OWNERS.sign(owned("k", subkey=f"slot[owner:{BOB_ID}]"), BOB.private_key))


def test_signing_by_non_owner_leaves_record_unsigned_and_rejected():
    record = owned("k", subkey=ALICE_ID)
    assert BOB.private_key is not None and OWNERS.sign(record, BOB.private_key) == record
    wrongly_signed = dataclasses.replace(record, signature=BOB.private_key.sign(record_signing_payload(record)))
    with pytest.raises(ValidationError, match="does not verify"):
        OWNERS.validate(wrongly_signed)


@pytest.mark.parametrize("tamper", [
    lambda r: dataclasses.replace(r, value=serialize("evil")),
    lambda r: dataclasses.replace(r, expiration_time=r.expiration_time + 1000),
    lambda r: dataclasses.replace(r, subkey=serialize(f"other[owner:{ALICE_ID}]")),
    lambda r: dataclasses.replace(r, key=serialize(f"other[owner:{ALICE_ID}]")),
    lambda r: dataclasses.replace(r, signature=bytes(64)),                       # forged
    lambda r: dataclasses.replace(r, signature=r.signature[:-1] + bytes([r.signature[-1] ^ 1])),
    lambda r: dataclasses.replace(r, signature=b"short"),                        # wrong length
    lambda r: dataclasses.replace(r, signature=None),                            # stripped
])
def test_tampered_records_are_rejected(tamper):
    signed = OWNERS.sign(owned(f"k[owner:{ALICE_ID}]", "v", subkey=f"s[owner:{ALICE_ID}]"), ALICE.private_key)
    OWNERS.validate(signed)
    with pytest.raises(ValidationError, match=ALICE_ID):
        OWNERS.validate(tamper(signed))


def test_stealing_a_signature_for_another_owner_fails():
    alices = OWNERS.sign(owned("k", "v", subkey=ALICE_ID), ALICE.private_key)
    stolen = dataclasses.replace(owned("k", "v", subkey=BOB_ID), signature=alices.signature)
    with pytest.raises(ValidationError, match=BOB_ID):
        OWNERS.validate(stolen)


def test_unusable_or_ambiguous_owners_are_rejected():
    with pytest.raises(ValidationError, match="not an ed25519"):
        OWNERS.validate(owned("k[owner:nonsense]"))
    secp_id = ID.from_pubkey(create_secp256k1_key_pair().public_key).to_base58()
    with pytest.raises(ValidationError, match="not an ed25519"):
        OWNERS.validate(owned(f"k[owner:{secp_id}]"))
    two_owners = owned(f"k[owner:{ALICE_ID}]", subkey=BOB_ID)
    with pytest.raises(ValidationError, match="several owners"):
        OWNERS.validate(OWNERS.sign(two_owners, ALICE.private_key))
    # The same owner named twice is fine.
    OWNERS.validate(OWNERS.sign(owned(f"k[owner:{ALICE_ID}]", subkey=ALICE_ID), ALICE.private_key))


def test_unprotected_records_pass():
    secp_id = ID.from_pubkey(create_secp256k1_key_pair().public_key).to_base58()
    for record in [
        owned("plain"),
        owned("dict", subkey="not-a-peer-id"),
        owned("dict", subkey=secp_id),               # only ed25519 peer IDs protect a subkey
        owned(["list", "key"], subkey=7),
        owned(b"bytes[owner:" + ALICE_ID.encode() + b"]"),  # markers count in str keys only
        owned("k", subkey=ALICE_ID + "x"),
        dataclasses.replace(owned("plain"), signature=b"anything"),
    ]:
        OWNERS.validate(record)
        assert OWNERS.sign(record, ALICE.private_key) == record


def test_undecodable_key_is_a_validation_error():
    with pytest.raises(ValidationError, match="not valid msgpack"):
        OWNERS.validate(Record(b"\xc1", None, serialize(1), EXP))


# ---------------------------------------------------------------- schemas

SCHEMAS = SchemaValidator({
    "loss": ValueSchema(value_types=(float,), max_value_bytes=16),
    "loss/history": ValueSchema(value_types=(list,), subkey_types=(int,), allow_plain=False),
    "peers": ValueSchema(value_types=(dict,), subkey_types=(object,)),
    "step": ValueSchema(value_types=(int,)),
}, max_value_bytes=1024)


@pytest.mark.parametrize("record", [
    owned("loss", 0.5),
    owned("loss/of-peer-3", 1.5),                    # prefix match
    owned("loss/history", [1.0, 2.0], subkey=3),     # longest prefix wins
    owned("peers", {"a": 1}),
    owned("peers", {"a": 1}, subkey=["any", "thing"]),
    owned("step", 7),
    owned("unrelated", "anything at all"),
    owned(12345, "non-str keys pass"),
])
def test_schema_accepts(record):
    SCHEMAS.validate(record)


@pytest.mark.parametrize("record, message", [
    (owned("loss", "high"), "must be float"),
    (owned("loss", 1), "must be float"),
    (owned("loss", 0.5, subkey="x"), "only takes plain values"),
    (owned("loss/history", [1.0]), "only takes dictionary entries"),
    (owned("loss/history", [1.0], subkey="3"), "subkey .* must be int"),
    (owned("loss/history", 1.0, subkey=3), "must be list"),
    (owned("step", True), "must be int"),            # a bool is not a step count
    (owned("loss", "x" * 20), "at most 16"),         # per-rule size limit is checked before the type
    (owned("unrelated", "x" * 2000), "at most 1024"),  # global limit applies to every key
    (Record(serialize("step"), None, b"\xc1", EXP), "not valid msgpack"),
])
def test_schema_rejects(record, message):
    with pytest.raises(ValidationError, match=message):
        SCHEMAS.validate(record)


def test_default_global_size_limit():
    validator = SchemaValidator()
    validator.validate(owned("k", b"x" * 60_000))
    with pytest.raises(ValidationError, match="65536"):
        validator.validate(owned("k", b"x" * 70_000))


def test_bad_schemas_are_refused():
    with pytest.raises(ValueError):
        ValueSchema(value_types=())
    with pytest.raises(ValueError, match="use list"):
        ValueSchema(value_types=(tuple,))
    with pytest.raises(ValueError, match="neither"):
        ValueSchema(value_types=(int,), subkey_types=None, allow_plain=False)
    with pytest.raises(ValueError):
        ValueSchema(value_types=(int,), max_value_bytes=0)
    with pytest.raises(TypeError):
        SchemaValidator({b"bytes-prefix": ValueSchema(value_types=(int,))})
    assert ValueSchema(value_types=int).value_types == (int,)


# ---------------------------------------------------------------- composition


def test_composite_runs_all_validators_and_signs():
    validator = CompositeValidator([SCHEMAS, OWNERS])
    good = validator.sign(owned(f"step[owner:{ALICE_ID}]", 3), ALICE.private_key)
    validator.validate(good)
    with pytest.raises(ValidationError, match="must be int"):
        validator.validate(validator.sign(owned(f"step[owner:{ALICE_ID}]", "x"), ALICE.private_key))
    with pytest.raises(ValidationError, match="not signed"):
        validator.validate(owned(f"step[owner:{ALICE_ID}]", 3))
    RecordValidator().validate(owned("anything"))
    assert RecordValidator().sign(owned("x"), ALICE.private_key) == owned("x")
    with pytest.raises(TypeError):
        CompositeValidator([object()])
