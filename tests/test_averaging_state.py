"""averaging.state: the state blob format, and state download from donor processes over real sockets.

Three module-scoped donor processes (A, B, C) share several states under different prefixes:

* ``main``: 32 MiB + small tensors of every dtype, at step 7, from A, B and C;
* ``mixed``: 8 MiB from A and B, and from C with corrupted ranges (``corrupt=True``);
* ``bad``: only C, corrupted;
* ``vote``: step 5 from A and B (seed 0) and from C with other contents (seed 1);
* ``newest``: step 4 from A and B, step 6 from C;
* ``slow``: 16 MiB from A, B and C, with a serving delay; the last test kills C mid-transfer.

The downloader is a DHT in the test process. Three donor processes is the minimum: each costs ~6 s of CPU
just to import torch and libp2p.
"""
import functools
import logging
import math
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from averaging.state import (
    StateDownloadError,
    StateFormatError,
    StateSharer,
    StateUnconfirmed,
    decode_state,
    download_state,
    encode_state,
    piece_hashes,
    state_digest,
)
from averaging.state_offers import parse_offers as _parse_offers
from dht import DHT, ValueWithExpiration

MAKE_STATE = r"""
import torch
def make_state(mib, step, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    tensors = [torch.randn(mib << 18, generator=g), torch.randn(3, 5, generator=g).half(),
               torch.randn(2, 7, generator=g).bfloat16(), torch.randint(-2**40, 2**40, (11,), generator=g),
               torch.rand(13, generator=g) > 0.5, torch.tensor(3.5, dtype=torch.float64), torch.empty(0, 4),
               torch.randint(0, 255, (2, 3, 4), generator=g, dtype=torch.uint8), torch.randn(5, generator=g).to(torch.complex64)]
    return {"step": step, "lr": 0.25, "seed": seed, "name": "test"}, tensors
"""
exec(MAKE_STATE)

DONOR = MAKE_STATE + r"""
import logging, sys
from p2p import setup_logging
setup_logging("INFO")
logging.getLogger("averaging.state").setLevel(logging.DEBUG)
import trio
from dht import DHT, get_dht_time
from averaging.state import StateSharer
from averaging.state_format import tensors_digest


class FaultySharer(StateSharer):
    # faults injected from outside the sharer: a slow donor (serve_delay s per range), a lying one (corrupt)

    def __init__(self, *args, serve_delay=0.0, corrupt=False, claim=None, **kwargs):
        self.claim = claim   # (mib, step, seed): announce that state's hash, whatever we serve (a liar)
        super().__init__(*args, **kwargs)
        self.serve_delay, self.corrupt = serve_delay, corrupt

    def _take_snapshot(self, current):
        snap = super()._take_snapshot(current)
        if self.claim is not None:
            snap.state_hash = tensors_digest(make_state(*self.claim)[1])
        return snap

    async def _read_range(self, snap, start, end):
        await trio.sleep(self.serve_delay)
        data = await super()._read_range(snap, start, end)
        if self.corrupt:
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
        return data


states = [(prefix, make_state(mib, step, seed), options) for prefix, mib, step, seed, options in SHARES]
dht = DHT(initial_peers=sys.stdin.readline().split())  # imports overlap with the first donor's start-up
sharers = [FaultySharer(dht, prefix, lambda state=state: state, **options) for prefix, state, options in states]
for sharer in sharers:
    sharer.refresh()
for prefix, claimed in CLAIMS:   # claims of states we do not serve, as a client-mode trainer makes them
    dht.store(prefix + ".claims", {"state_hashes": {str(claimed[1]): tensors_digest(make_state(*claimed)[1])}},
              get_dht_time() + 600, subkey=dht.peer_id)
print("ADDR", dht.addrs[0], flush=True)
sys.stdin.read()
"""


def launch_donor(launcher, shares, claims=()):
    """Start a donor process; it joins the swarm once :func:`join` gives it initial peers."""
    return launcher(f"SHARES = {shares!r}\nCLAIMS = {list(claims)!r}\n" + DONOR)


def join(proc, initial_peers=()):
    proc.proc.stdin.write((" ".join(initial_peers) + "\n").encode())
    proc.proc.stdin.flush()
    proc.maddr = proc.expect("ADDR ", timeout=60)
    proc.peer_id = proc.maddr.rsplit("/", 1)[1]
    return proc


SLOW = {"serve_delay": 0.25}
MAIN_MIB = 32


@pytest.fixture(scope="module")
def donors(module_python_process):
    """Donors A, B and C (see the module docstring); the last test kills C."""
    launch = functools.partial(launch_donor, module_python_process)
    honest = [("main", MAIN_MIB, 7, 0, {}), ("mixed", 8, 3, 0, {}), ("vote", 1, 5, 0, {}), ("newest", 0, 4, 0, {}),
              ("slow", 16, 9, 0, SLOW), ("liar", 1, 8, 0, {})]
    a = launch(honest, claims=[("liar", (1, 9, 0))])
    b = launch(honest, claims=[("liar", (1, 9, 0))])
    c = launch([("main", MAIN_MIB, 7, 0, {}), ("mixed", 8, 3, 0, {"corrupt": True}), ("bad", 2, 1, 0, {"corrupt": True}),
                ("vote", 1, 5, 1, {}), ("newest", 0, 6, 0, {}), ("slow", 16, 9, 0, SLOW),
                ("liar", 1, 9, 1, {"claim": (1, 9, 0)})])
    join(a)
    for proc in (b, c):
        join(proc, [a.maddr])
    return a, b, c


@pytest.fixture(scope="module")
def client(donors):
    dht = DHT(initial_peers=[donors[0].maddr])
    yield dht
    dht.shutdown()


def assert_same_state(got, expected):
    assert got is not None
    (metadata, tensors), (exp_metadata, exp_tensors) = got, expected
    assert metadata == exp_metadata
    assert len(tensors) == len(exp_tensors)
    for t, e in zip(tensors, exp_tensors):
        assert t.dtype == e.dtype and t.shape == e.shape and torch.equal(t, e)


# ---------------------------------------------------------------- blob format (no network)


def test_encode_decode_round_trip_keeps_dtypes_shapes_values_and_metadata():
    state = make_state(1, 3)
    blob = encode_state(*state)
    assert_same_state(decode_state(blob), state)
    assert_same_state(decode_state(bytes(blob)), state)  # read-only input is copied, not rejected
    assert encode_state(*state) == blob  # deterministic: donors of the same state announce the same hash


def test_non_contiguous_and_non_cpu_like_inputs_are_serialized_by_value():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    metadata, tensors = decode_state(encode_state({"step": 0}, [base.t(), base[:, ::2]]))
    assert torch.equal(tensors[0], base.t()) and torch.equal(tensors[1], base[:, ::2])


@pytest.mark.parametrize("metadata", [{}, {"step": "1"}, {"step": -1}, {"step": True}, [("step", 1)],
                                      {"step": 1, "x": object()}])
def test_bad_metadata_is_refused(metadata):
    with pytest.raises(StateFormatError):
        encode_state(metadata, [torch.zeros(2)])


@pytest.mark.parametrize("tensor", [torch.zeros(2, dtype=torch.int8).to_sparse(), "not a tensor",
                                    torch.zeros(2, dtype=torch.uint16)])
def test_unsupported_tensors_are_refused(tensor):
    with pytest.raises(StateFormatError):
        encode_state({"step": 0}, [tensor])


def _blob_with_header(header: dict, data_bytes: int) -> bytes:
    from p2p import pack
    raw = pack(header)
    start = -(-(8 + len(raw)) // 64) * 64
    return b"STST" + len(raw).to_bytes(4, "big") + raw + bytes(start - 8 - len(raw) + data_bytes)


@pytest.mark.parametrize("blob, message", [
    (b"", "too short"),
    (b"XXXX" + bytes(100), "magic"),
    (b"STST" + (1 << 30).to_bytes(4, "big") + bytes(100), "header length"),
    (b"STST" + (3).to_bytes(4, "big") + b"\xc1\xc1\xc1", "msgpack"),
    (_blob_with_header({"v": 2, "metadata": {"step": 0}, "tensors": []}, 0), "'v'"),
    (_blob_with_header({"v": 1, "metadata": {"step": "x"}, "tensors": []}, 0), "step"),
    (_blob_with_header({"v": 1, "metadata": {"step": 0}, "tensors": [["float32", [4]]]}, 15), "describes a .* but it has"),
    (_blob_with_header({"v": 1, "metadata": {"step": 0}, "tensors": [["float32", [4]]]}, 17), "describes a .* but it has"),
    (_blob_with_header({"v": 1, "metadata": {"step": 0}, "tensors": [["float32", [-4]]]}, 0), "bad spec"),
    (_blob_with_header({"v": 1, "metadata": {"step": 0}, "tensors": [["object", [1]]]}, 8), "bad spec"),
    (_blob_with_header({"v": 1, "metadata": {"step": 0}, "tensors": [[["float32"], [1]]]}, 8), "bad spec"),
    (_blob_with_header({"v": 1, "metadata": {"step": 0}, "tensors": [["float32", [1 << 40, 1 << 40]]]}, 0), "describes a"),
    (_blob_with_header({"v": 1, "metadata": {"step": 0}, "tensors": [["bool", [3]]]}, 3)[:-1] + b"\x02", "bool"),
])
def test_garbage_blobs_raise_state_format_error(blob, message):
    with pytest.raises(StateFormatError, match=message):
        decode_state(blob)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_blobs_either_decode_to_the_described_shapes_or_raise_state_format_error(data):
    blob = bytearray(encode_state({"step": 1, "k": [1, 2]}, [torch.ones(3), torch.zeros(2, 2, dtype=torch.bool)]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        metadata, tensors = decode_state(blob[:cut])
    except StateFormatError:
        return
    assert isinstance(metadata["step"], int)
    assert sum(t.numel() * t.element_size() for t in tensors) <= cut


def test_piece_hashes_and_digest():
    blob = bytes(range(256)) * 100  # 25600 bytes = 6 pieces of 4096 + 1024
    hashes = piece_hashes(blob, 4096)
    assert len(hashes) == 32 * math.ceil(len(blob) / 4096)
    assert state_digest(hashes) != state_digest(piece_hashes(blob[:-1] + b"x", 4096))


def test_malformed_announcements_are_skipped_and_offers_grouped():
    good = {"step": 3, "nbytes": 1000, "sha256": "a" * 64, "piece_bytes": 4096, "addrs": ["/ip4/1.2.3.4/tcp/1"]}
    entry = ValueWithExpiration({
        "p1": ValueWithExpiration(good, 0), "p2": ValueWithExpiration(dict(good, addrs=[]), 0),
        "me": ValueWithExpiration(good, 0),
        "p3": ValueWithExpiration(dict(good, step="3"), 0), "p4": ValueWithExpiration([1, 2], 0),
        "p5": ValueWithExpiration(dict(good, sha256="b" * 63), 0), "p6": ValueWithExpiration(dict(good, nbytes=1 << 50), 0),
        "p7": ValueWithExpiration(dict(good, piece_bytes=1), 0), "p8": ValueWithExpiration({"step": 1}, 0),
        "p9": ValueWithExpiration(dict(good, sha256="c" * 64), 0),
    }, 0)
    offers = _parse_offers(entry, exclude="me", max_nbytes=1 << 30)
    assert sorted(len(donors) for donors in offers.values()) == [1, 2]
    assert {p for donors in offers.values() for p, _ in donors} == {"p1", "p2", "p9"}
    assert _parse_offers(None, "me", 1 << 30) == {} and _parse_offers(ValueWithExpiration(5, 0), "me", 1 << 30) == {}


def test_sharer_keeps_the_previous_snapshot_for_a_while_then_names_its_step():
    step = {"step": 1}
    dht = DHT()
    try:
        with pytest.raises(ValueError, match="'/'"):
            StateSharer(dht, "a/b", lambda: (step, []))
        sharer = StateSharer(dht, "keep", lambda: (dict(step), [torch.full((10,), float(step["step"]))]),
                             announce_interval=60.0, keep_previous=0.5)
        first = sharer.refresh()
        assert sharer.refresh() == first  # same step: the snapshot is reused
        step["step"] = 2
        second = sharer.refresh()
        assert second["step"] == 2 and second["sha256"] != first["sha256"]
        assert sharer._snapshot({"sha256": first["sha256"]}).step == 1  # still servable for in-flight downloads
        time.sleep(0.6)
        with pytest.raises(ValueError, match="step 2"):
            sharer._snapshot({"sha256": first["sha256"]})
        sharer.shutdown()
    finally:
        dht.shutdown()


# ---------------------------------------------------------------- downloads between processes
# Marked slow because they share the donors fixture, whose start-up alone takes 10-40 s on a busy 2-core machine.


@pytest.mark.slow
def test_download_from_three_donors_gives_their_exact_state(client, donors, caplog):
    caplog.set_level(logging.INFO, logger="averaging")
    started = time.monotonic()
    got = download_state(client, "main", timeout=60, max_donors=3)
    elapsed = time.monotonic() - started
    assert_same_state(got, make_state(MAIN_MIB, 7))
    done = [r.getMessage() for r in caplog.records if "downloaded step 7" in r.getMessage()]
    assert len(done) == 1 and "dropped {}" in done[0]
    for donor in donors:  # every donor served a part
        assert donor.peer_id[-8:] in done[0]
    print(f"{MAIN_MIB} MiB from 3 donors in {elapsed:.2f}s: {MAIN_MIB * 1.048576 / elapsed:.1f} MB/s")


@pytest.mark.slow
def test_nothing_announced_returns_none_quickly(client):
    started = time.monotonic()
    assert download_state(client, "nothing-here", timeout=30) is None
    assert time.monotonic() - started < 10  # one DHT lookup (milliseconds when idle), not the timeout


@pytest.mark.slow
def test_corrupt_donor_is_dropped_and_the_state_still_verifies(client, donors, caplog):
    caplog.set_level(logging.INFO, logger="averaging")
    got = download_state(client, "mixed", timeout=60, max_donors=3, chunk_bytes=1 << 20)
    assert_same_state(got, make_state(8, 3))
    dropped = [r.getMessage() for r in caplog.records if "dropped after" in r.getMessage()]
    assert len(dropped) == 1 and donors[2].peer_id[-8:] in dropped[0] and "does not match its sha256" in dropped[0]


@pytest.mark.slow
def test_only_corrupt_donors_means_an_error_never_corrupt_tensors(client):
    with pytest.raises(StateDownloadError, match="every offer failed"):
        download_state(client, "bad", timeout=30)


@pytest.mark.slow
def test_highest_step_then_most_donors_wins(client, donors):
    # "vote": A and B announce step 5 / seed 0, C announces step 5 with other contents (seed 1).
    assert_same_state(download_state(client, "vote", timeout=30), make_state(1, 5, seed=0))
    # "newest": A and B announce step 4, C alone announces step 6.
    assert_same_state(download_state(client, "newest", timeout=30), make_state(0, 6))
    # a peer that already holds step 6 downloads nothing; one at step 5 still gets step 6
    assert download_state(client, "newest", timeout=30, newer_than=6) is None
    assert_same_state(download_state(client, "newest", timeout=30, newer_than=5), make_state(0, 6))


@pytest.mark.slow
def test_only_states_other_peers_confirm_are_accepted(client, donors):
    # "vote": A and B hold step 5 / seed 0 (one blob: each vouches for the other), C alone another step 5
    with pytest.raises(StateUnconfirmed, match="no state of 'vote' is confirmed: 2 offers"):
        download_state(client, "vote", timeout=30, confirmations=2)
    assert_same_state(download_state(client, "vote", timeout=30, confirmations=1), make_state(1, 5, seed=0))


@pytest.mark.slow
def test_a_donor_serving_a_state_nobody_else_announced_is_banned(client, donors):
    """"liar": A and B serve step 8 and claim (in records under liar.claims) the step-9 state of seed 0; C offers
    step 9 under that very hash but serves seed 1's tensors. C's offer is the newest and confirmed by two
    others, so it is downloaded first: its bytes match its own blob hash, its tensors do not match the claim."""
    from averaging.bans import BanList

    bans, liar = BanList(), donors[2].peer_id
    with pytest.raises(StateDownloadError, match="every offer failed"):   # step 8 has only one other voucher
        download_state(client, "liar", timeout=30, confirmations=2, confirm_keys=["liar.claims"], bans=bans)
    assert bans.is_banned(liar) and "served a state of step 9 with hash" in bans.why(liar)
    assert bans.banned() == [liar]
    # banned, C is not asked again; A and B's step 8 is confirmed once each vouches for the other
    assert_same_state(download_state(client, "liar", timeout=30, confirmations=1, confirm_keys=["liar.claims"],
                                     bans=bans), make_state(1, 8, seed=0))
    assert_same_state(download_state(client, "liar", timeout=30), make_state(1, 9, seed=1))   # unverified: C wins


@pytest.mark.slow
def test_download_completes_when_a_donor_is_killed_mid_transfer(client, donors, caplog):
    caplog.set_level(logging.INFO, logger="averaging")
    victim = donors[2]  # C; this test runs last in the module
    result, errors = [], []

    def download():
        try:
            result.append(download_state(client, "slow", timeout=60, max_donors=3, chunk_bytes=1 << 20))
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    thread = threading.Thread(target=download)
    thread.start()
    deadline = time.monotonic() + 30
    while "State slow: served bytes" not in victim.log():  # its log also holds ranges of earlier tests
        assert time.monotonic() < deadline and thread.is_alive(), "the victim never served a range"
        time.sleep(0.02)
    victim.proc.kill()  # SIGKILL while it serves its next range
    assert thread.is_alive(), "the download finished before the donor was killed; make it slower"
    thread.join(60)
    assert not errors, errors
    assert_same_state(result[0], make_state(16, 9))
    dropped = [r.getMessage() for r in caplog.records if "dropped after" in r.getMessage()]
    assert len(dropped) == 1 and victim.peer_id[-8:] in dropped[0]
