"""Unit tests for DHT ids (XOR metric) and the Kademlia routing table (dht.records, dht.routing)."""

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from dht.records import DHTID
from dht.routing import KBucket, PeerInfo, RoutingTable

ids = st.integers(min_value=0, max_value=2**160 - 1)
FAST = settings(max_examples=60, deadline=None, database=None)


def peer(node_id: int) -> PeerInfo:
    return PeerInfo(DHTID(node_id), f"peer-{node_id:x}", (f"/ip4/127.0.0.1/tcp/{node_id % 60000 + 1}",))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- DHTID and the XOR metric


@FAST
@given(ids, ids, ids)
def test_xor_is_a_metric(a, b, c):
    a, b, c = DHTID(a), DHTID(b), DHTID(c)
    assert a.xor_distance(a) == 0
    assert (a.xor_distance(b) == 0) == (a == b)
    assert a.xor_distance(b) == b.xor_distance(a)
    assert a.xor_distance(c) <= a.xor_distance(b) + b.xor_distance(c)


@FAST
@given(ids, ids, ids)
def test_xor_is_unidirectional(a, b, c):
    # For a given point and distance there is exactly one id at that distance (Kademlia section 2.1).
    a = DHTID(a)
    if b != c:
        assert a.xor_distance(b) != a.xor_distance(c)


@FAST
@given(ids)
def test_dhtid_bytes_round_trip(value):
    node_id = DHTID(value)
    raw = node_id.to_bytes()
    assert len(raw) == 20
    assert DHTID.from_bytes(raw) == node_id
    assert isinstance(DHTID.from_bytes(raw), DHTID)


def test_dhtid_rejects_out_of_range_and_bad_bytes():
    with pytest.raises(ValueError):
        DHTID(-1)
    with pytest.raises(ValueError):
        DHTID(2**160)
    with pytest.raises(TypeError):
        DHTID(True)
    with pytest.raises(ValueError):
        DHTID.from_bytes(b"\x00" * 19)
    with pytest.raises(ValueError):
        DHTID.random(5, 5)


def test_dhtid_from_peer_id_is_sha1_of_raw_peer_id():
    peer_id = ID.from_pubkey(create_new_key_pair().public_key)
    expected = int.from_bytes(hashlib.sha1(peer_id.to_bytes()).digest(), "big")
    assert DHTID.from_peer_id(peer_id.to_base58()) == expected
    assert DHTID.from_key_bytes(b"abc") == int.from_bytes(hashlib.sha1(b"abc").digest(), "big")
    with pytest.raises(ValueError):
        DHTID.from_peer_id("not base58 0OIl")


def test_dhtid_random_stays_in_range():
    for _ in range(200):
        assert 1000 <= DHTID.random(1000, 1010) < 1010
    assert 0 <= DHTID.random() < 2**160


def test_peer_info_from_peer_id():
    peer_id = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
    info = PeerInfo.from_peer_id(peer_id, ["/ip4/1.2.3.4/tcp/1"])
    assert info.node_id == DHTID.from_peer_id(peer_id)
    assert info.addrs == ("/ip4/1.2.3.4/tcp/1",)
    with pytest.raises(ValueError):
        PeerInfo(DHTID(1), "", ())


# ---------------------------------------------------------------- KBucket


def test_kbucket_order_replacements_and_split():
    bucket = KBucket(0, 2**160, k=2, last_updated=0.0)
    assert bucket.depth == 0
    assert bucket.touch(peer(1)) and bucket.touch(peer(2**159 + 1))
    assert not bucket.touch(peer(3))  # full
    assert bucket.touch(peer(1))  # known peer moves to the tail
    assert list(bucket.peers) == [2**159 + 1, 1]
    for node_id in range(10, 14):
        bucket.add_replacement(peer(node_id))
    assert list(bucket.replacements) == [12, 13]  # bounded to k, freshest last
    low, high = bucket.split()
    assert (low.lower, low.upper, high.lower, high.upper) == (0, 2**159, 2**159, 2**160)
    assert low.depth == high.depth == 1
    assert list(low.peers) == [1] and list(high.peers) == [2**159 + 1]
    assert list(low.replacements) == [12, 13]
    removed, promoted = low.remove(1)
    assert removed.node_id == 1 and promoted.node_id == 13
    assert list(low.peers) == [13] and list(low.replacements) == [12]


def test_kbucket_rejects_unaligned_range():
    with pytest.raises(ValueError):
        KBucket(3, 7, k=2)
    with pytest.raises(ValueError):
        KBucket(0, 2**160, k=0)


# ---------------------------------------------------------------- RoutingTable


def test_never_adds_own_id():
    table = RoutingTable(DHTID(42), k=4)
    assert table.add_or_update(peer(42)) is None
    assert len(table) == 0 and 42 not in table


def test_known_peer_moves_to_tail_and_info_is_updated():
    table = RoutingTable(DHTID(0), k=4)
    for node_id in (5, 6, 7):
        assert table.add_or_update(peer(node_id)) is None
    moved = PeerInfo(DHTID(5), "peer-5", ("/ip4/9.9.9.9/tcp/9",))
    assert table.add_or_update(moved) is None
    assert [p.node_id for p in table.buckets[0].peers.values()] == [6, 7, 5]
    assert table.get(node_id=5).addrs == ("/ip4/9.9.9.9/tcp/9",)
    assert table.get(peer_id="peer-5") == moved
    assert table.get(peer_id="unknown") is None
    with pytest.raises(ValueError):
        table.get()
    with pytest.raises(ValueError):
        table.get(node_id=5, peer_id="peer-5")


def test_full_bucket_far_from_us_returns_least_recently_seen_and_remove_promotes():
    table = RoutingTable(DHTID(0), k=2, depth_modulo=1)  # depth_modulo=1: only our own bucket splits
    far = [2**159 + 1, 2**159 + 2, 2**159 + 3, 2**159 + 4]
    assert table.add_or_update(peer(far[0])) is None
    assert table.add_or_update(peer(far[1])) is None
    # Bucket [0, 2^160) is full and covers our id: it splits; the upper half is still full and far.
    assert table.add_or_update(peer(far[2])) == peer(far[0])
    assert table.add_or_update(peer(far[3])) == peer(far[0])
    assert len(table.buckets) == 2 and len(table) == 2
    assert far[2] not in table
    upper = table.bucket_for(far[0])
    assert list(upper.replacements) == [far[2], far[3]]
    # Contact from the least-recently-seen peer (it answered the ping) keeps the newcomers out.
    assert table.add_or_update(peer(far[0])) is None
    assert table.add_or_update(peer(far[2])) == peer(far[1])
    assert list(upper.replacements) == [far[3], far[2]]
    # The ping to far[1] failed: removing it promotes the freshest replacement.
    assert table.remove(far[1]) == peer(far[1])
    assert far[1] not in table and far[2] in table and "peer-" + format(far[2], "x") in table
    assert table.get(peer_id=peer(far[1]).peer_id) is None
    assert table.remove(far[1]) is None


def test_bucket_with_own_id_keeps_splitting():
    table = RoutingTable(DHTID(0), k=2, depth_modulo=1)
    for node_id in [8, 7, 6, 5, 4, 3, 2, 1]:  # the closest peers arrive last
        table.add_or_update(peer(node_id))
    # Buckets covering our id always split, so the closest peers are never turned away.
    assert [p.node_id for p in table.nearest(DHTID(0), 2)] == [1, 2]
    assert table.bucket_for(1).depth == 159
    assert table.bucket_for(0).covers(0) and len(table.buckets) > 100
    _check_partition(table)


def test_depth_modulo_splits_far_buckets_down_to_multiple_depth():
    table = RoutingTable(DHTID(0), k=2, depth_modulo=5)
    far = [2**159 + 1, 2**159 + 2, 2**159 + 3]
    for node_id in far[:2]:
        assert table.add_or_update(peer(node_id)) is None
    assert table.add_or_update(peer(far[2])) == peer(far[0])
    far_bucket = table.bucket_for(far[0])
    assert far_bucket.depth == 5 and not far_bucket.covers(0)
    _check_partition(table)
    # Peers in other depth-1..4 ranges now fit in their own buckets.
    assert table.add_or_update(peer(2**159 + 2**157)) is None
    assert table.add_or_update(peer(2**159 + 2**158)) is None


def test_refilling_after_remove_without_replacements():
    table = RoutingTable(DHTID(0), k=1, depth_modulo=1)
    assert table.add_or_update(peer(2**159)) is None
    assert table.add_or_update(peer(2**159 + 1)) == peer(2**159)
    table.remove(2**159)
    assert 2**159 + 1 in table  # promoted
    table.remove(2**159 + 1)
    assert len(table) == 0
    assert table.add_or_update(peer(2**159 + 5)) is None


def _check_partition(table: RoutingTable) -> None:
    lower = 0
    for bucket in table.buckets:
        assert bucket.lower == lower
        lower = bucket.upper
        for node_id in list(bucket.peers) + list(bucket.replacements):
            assert bucket.covers(node_id)
        assert len(bucket.peers) <= table.k and len(bucket.replacements) <= table.k
    assert lower == 2**160


@settings(max_examples=40, deadline=None, database=None)
@given(
    own=ids,
    peer_ids=st.lists(ids, min_size=0, max_size=120, unique=True),
    targets=st.lists(ids, min_size=1, max_size=5),
    k=st.integers(1, 6),
    depth_modulo=st.integers(1, 6),
    count=st.integers(0, 30),
)
def test_nearest_matches_brute_force(own, peer_ids, targets, k, depth_modulo, count):
    table = RoutingTable(DHTID(own), k=k, depth_modulo=depth_modulo)
    for node_id in peer_ids:
        table.add_or_update(peer(node_id))
    _check_partition(table)
    members = [p.node_id for p in table.all_peers()]
    assert len(members) == len(set(members)) == len(table)
    assert own not in members
    for target in targets + peer_ids[:2]:
        exclude = members[0] if members else None
        expected = sorted((m for m in members if m != exclude), key=lambda m: m ^ target)[:count]
        got = [p.node_id for p in table.nearest(DHTID(target), count, exclude=exclude)]
        assert got == expected


def test_nearest_with_many_peers_and_own_neighbourhood_is_complete():
    rng = random.Random(7)
    own = DHTID(rng.randrange(2**160))
    table = RoutingTable(own, k=8)
    peers = [DHTID(rng.randrange(2**160)) for _ in range(2000)]
    for node_id in peers:
        table.add_or_update(peer(node_id))
    # Kademlia guarantee: the k closest peers to our own id are always kept (their buckets split).
    closest = sorted(peers, key=lambda p: p ^ own)[:8]
    assert [p.node_id for p in table.nearest(own, 8)] == closest
    assert len(table) < 2000 and len(table.buckets) > 10


def test_nearest_rejects_negative_count():
    with pytest.raises(ValueError):
        RoutingTable(DHTID(0)).nearest(DHTID(1), -1)


def test_stale_bucket_ids_and_touch():
    clock = FakeClock()
    table = RoutingTable(DHTID(0), k=1, depth_modulo=1, clock=clock)
    table.add_or_update(peer(2**159))
    clock.now += 10
    table.add_or_update(peer(1))  # splits [0, 2^160); lower half is touched now
    assert len(table.buckets) >= 2
    clock.now += 50
    stale = table.stale_bucket_ids(older_than=55)
    upper = table.bucket_for(2**159)
    assert len(stale) == 1 and upper.covers(stale[0])  # only the upper half was untouched for 60 s
    assert len(table.stale_bucket_ids(older_than=30)) == len(table.buckets)
    table.touch_bucket(2**159)
    assert table.stale_bucket_ids(older_than=55) == []
    assert len(table.stale_bucket_ids(older_than=55, now=clock.now + 100)) == len(table.buckets)
