"""Unit tests for the local record store (dht.storage): merge rules, expiry, eviction."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht.records import DHTID, Record
from dht.storage import RecordStore, record_size

NOW = 1_000_000.0
FAST = settings(max_examples=60, deadline=None, database=None)


def rec(key, value, expiration, subkey=None) -> Record:
    return Record.create(key, value, NOW + expiration, subkey=subkey)


def kid(key) -> DHTID:
    return rec(key, 0, 1).key_id


def new_store(**kwargs) -> RecordStore:
    return RecordStore(clock=lambda: NOW, **kwargs)


# ---------------------------------------------------------------- plain values


def test_plain_latest_expiration_wins():
    store = new_store()
    assert store.store(rec("k", "a", 10))
    assert not store.store(rec("k", "older", 5))
    assert not store.store(rec("k", "same-time", 10))
    assert store.get(kid("k")).value == rec("k", "a", 10).value
    assert store.store(rec("k", "newer", 20))
    assert store.get(kid("k")) == rec("k", "newer", 20)
    assert len(store) == 1
    assert store.num_bytes == record_size(rec("k", "newer", 20))


def test_expired_records_are_refused_and_hidden():
    store = new_store()
    assert not store.store(rec("k", "v", 0))  # expiration == now counts as expired
    assert not store.store(rec("k", "v", -5))
    assert store.get(kid("k")) is None
    assert store.store(rec("k", "v", 10))
    assert store.get(kid("k"), now=NOW + 9.9) is not None
    assert store.get(kid("k"), now=NOW + 10) is None
    assert kid("k") in store and kid("other") not in store
    assert list(store.items(now=NOW + 10)) == []
    # A later record is accepted after the old one expired, even with an earlier expiration than before.
    assert store.store(rec("k", "v2", 12), now=NOW + 11)
    assert store.purge_expired(now=NOW + 12) == 1
    assert len(store) == 0 and store.num_bytes == 0


def test_get_of_unknown_key_is_none():
    assert new_store().get(kid("nothing")) is None
    assert new_store().get_expiration(kid("nothing")) is None


# ---------------------------------------------------------------- dictionaries


def test_subkeys_merge_and_latest_wins_per_subkey():
    store = new_store()
    assert store.store(rec("d", "from-a", 10, subkey="a"))
    assert store.store(rec("d", "from-b", 5, subkey="b"))
    assert not store.store(rec("d", "stale-a", 9, subkey="a"))
    assert store.store(rec("d", "fresh-b", 7, subkey="b"))
    content = store.get(kid("d"))
    assert set(content) == {rec("d", 0, 1, subkey="a").subkey, rec("d", 0, 1, subkey="b").subkey}
    assert content[rec("d", 0, 1, subkey="b").subkey] == rec("d", "fresh-b", 7, subkey="b")
    assert store.get_expiration(kid("d")) == NOW + 10
    assert len(store) == 2


def test_dictionary_hides_expired_subkeys_and_vanishes_when_all_expire():
    store = new_store()
    store.store(rec("d", 1, 5, subkey="a"))
    store.store(rec("d", 2, 10, subkey="b"))
    assert list(store.get(kid("d"), now=NOW + 6)) == [rec("d", 0, 1, subkey="b").subkey]
    assert store.get_expiration(kid("d"), now=NOW + 6) == NOW + 10
    assert store.get(kid("d"), now=NOW + 10) is None
    returned = store.get(kid("d"))
    returned.clear()  # a copy: mutating it does not touch the store
    assert len(store.get(kid("d"))) == 2


def test_plain_replaces_dictionary_only_if_later_than_all_subkeys():
    store = new_store()
    store.store(rec("m", 1, 5, subkey="a"))
    store.store(rec("m", 2, 10, subkey="b"))
    assert not store.store(rec("m", "plain", 8))
    assert not store.store(rec("m", "plain", 10))
    assert isinstance(store.get(kid("m")), dict)
    assert store.store(rec("m", "plain", 11))
    assert store.get(kid("m")) == rec("m", "plain", 11)
    assert len(store) == 1 and store.num_bytes == record_size(rec("m", "plain", 11))


def test_plain_replaces_dictionary_whose_late_subkeys_expired():
    store = new_store()
    store.store(rec("m", 1, 5, subkey="a"))
    store.store(rec("m", 2, 50, subkey="b"))
    # At NOW+60 every subkey is expired, so the dictionary no longer blocks anything.
    assert store.store(rec("m", "plain", 70), now=NOW + 60)


def test_subkey_replaces_plain_only_if_later():
    store = new_store()
    store.store(rec("m", "plain", 10))
    assert not store.store(rec("m", 1, 10, subkey="a"))
    assert not store.store(rec("m", 1, 3, subkey="a"))
    assert store.get(kid("m")) == rec("m", "plain", 10)
    assert store.store(rec("m", 1, 11, subkey="a"))
    assert store.get(kid("m")) == {rec("m", 1, 11, subkey="a").subkey: rec("m", 1, 11, subkey="a")}
    assert len(store) == 1


def test_items_and_purge():
    store = new_store()
    store.store(rec("p", 1, 5))
    store.store(rec("d", 1, 10, subkey="a"))
    store.store(rec("d", 2, 20, subkey="b"))
    assert sorted(r.expiration_time for _, r in store.items()) == [NOW + 5, NOW + 10, NOW + 20]
    assert all(key_id == r.key_id for key_id, r in store.items())
    assert [r.value for _, r in store.items(now=NOW + 15)] == [rec("d", 2, 20, subkey="b").value]
    assert store.purge_expired(now=NOW + 15) == 2
    assert len(store) == 1
    assert store.purge_expired(now=NOW + 15) == 0


# ---------------------------------------------------------------- memory bounds


def test_eviction_by_count_drops_soonest_expiring():
    store = new_store(max_records=3)
    for i, exp in enumerate([30, 10, 20]):
        assert store.store(rec(f"k{i}", i, exp))
    assert store.store(rec("k3", 3, 40))
    assert store.get(kid("k1")) is None  # expired soonest
    assert {r.expiration_time - NOW for _, r in store.items()} == {20, 30, 40}
    # A newcomer that would expire before everything else is evicted at once and reported as refused.
    assert not store.store(rec("k4", 4, 15))
    assert store.get(kid("k4")) is None
    assert len(store) == 3


def test_eviction_counts_subkeys_and_bytes():
    big = "x" * 1000
    size = record_size(rec("k0", big, 1))
    store = new_store(max_bytes=3 * size)
    for i in range(3):
        assert store.store(rec(f"k{i}", big, 10 + i))
    assert store.num_bytes == 3 * size
    assert store.store(rec("k3", big, 50))
    assert len(store) == 3 and store.num_bytes <= 3 * size
    assert store.get(kid("k0")) is None
    # A record bigger than the whole budget is never kept.
    assert not new_store(max_bytes=100).store(rec("huge", big, 10))
    # Subkeys count as records: the soonest subkey goes first, the dictionary stays.
    store = new_store(max_records=2)
    store.store(rec("d", 1, 5, subkey="a"))
    store.store(rec("d", 2, 10, subkey="b"))
    assert store.store(rec("d", 3, 15, subkey="c"))
    assert set(store.get(kid("d"))) == {rec("d", 0, 1, subkey=s).subkey for s in "bc"}


def test_bad_arguments():
    with pytest.raises(ValueError):
        RecordStore(max_records=0)
    with pytest.raises(TypeError):
        new_store().store(("not", "a", "record"))


# ---------------------------------------------------------------- properties

operations = st.lists(
    st.tuples(
        st.sampled_from(["k1", "k2", "k3"]),          # key
        st.sampled_from([None, None, "a", "b", "c"]),  # subkey (None = plain)
        st.integers(-3, 40),                           # expiration relative to the op's time
        st.integers(0, 30),                            # time step before the op
    ),
    max_size=40,
)


@FAST
@given(operations, st.integers(1, 12))
def test_accounting_invariants_under_random_operations(ops, max_records):
    store = new_store(max_records=max_records)
    now = NOW
    for key, subkey, exp, step in ops:
        now += step
        record = Record.create(key, [exp, step], now + exp, subkey=subkey)
        stored = store.store(record, now=now)
        content = store.get(record.key_id, now=now)
        if stored:
            assert content == record or (isinstance(content, dict) and content[record.subkey] == record)
        if exp <= 0:
            assert not stored
        held = list(store.items(now=now))
        assert len(held) == len(store) <= max_records  # store() purged everything expired at `now`
        assert store.num_bytes == sum(record_size(r) for _, r in held)
        assert all(r.expiration_time > now for _, r in held)
        kinds = {}
        for key_id, r in held:
            kinds.setdefault(key_id, set()).add(r.subkey is None)
        assert all(len(k) == 1 for k in kinds.values())  # never plain and subkeys at once
        assert all(len([r for kid_, r in held if kid_ == key_id and r.subkey is None]) <= 1 for key_id in kinds)


writes = st.lists(
    st.tuples(st.sampled_from(["k1", "k2"]), st.sampled_from(["a", "b", "c"]), st.integers(1, 50)),
    max_size=25,
)


@FAST
@given(writes, st.booleans(), st.randoms(use_true_random=False))
def test_final_state_does_not_depend_on_arrival_order(items, plain, rnd):
    """Without plain/dictionary mixing, nodes that see the same writes converge (value derives from
    expiration so equal expirations mean identical records)."""
    records = [Record.create(key, exp, NOW + exp, subkey=None if plain else subkey) for key, subkey, exp in items]
    shuffled = list(records)
    rnd.shuffle(shuffled)
    first, second = new_store(), new_store()
    for r in records:
        first.store(r)
    for r in shuffled:
        second.store(r)
    assert sorted(first.items(), key=repr) == sorted(second.items(), key=repr)
    for key in ("k1", "k2"):
        exps = [r.expiration_time for r in records if r.key == Record.create(key, 0, 1).key]
        assert first.get_expiration(kid(key)) == (max(exps) if exps else None)


def test_subkey_entries_keep_well_formed_entries_sorted_and_skip_junk():
    from dht import SubkeyEntry, ValueWithExpiration, subkey_entries

    found = ValueWithExpiration({"b": ValueWithExpiration({"x": 1}, 20.0), "a": ValueWithExpiration({"y": 2}, 10),
                                 "c": ValueWithExpiration([1, 2], 30.0), 7: ValueWithExpiration({"z": 3}, 5.0),
                                 "d": "not a ValueWithExpiration"}, 30.0)
    assert subkey_entries(found) == [SubkeyEntry("a", {"y": 2}, 10.0), SubkeyEntry("b", {"x": 1}, 20.0)]
    assert subkey_entries(found, list) == [SubkeyEntry("c", [1, 2], 30.0)]
    assert subkey_entries(None) == [] and subkey_entries(ValueWithExpiration(b"plain", 1.0)) == []
