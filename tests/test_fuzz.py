"""Fuzzing: malformed inputs to every decoder and to every RPC handler of a live peer.

Decoders (in process): msgpack frames, DHT records and values, wire tensors, state blobs and
compressed chunks get random bytes and random structures; each must return or raise its own
documented error (a ValueError subclass), never anything else.

Handlers (over real sockets): a server process runs a DHT, an expert server, an averager and a
state sharer; we send random arguments to every method of every service. Each call must end in a
reply or a clear remote error (never a timeout), the server must keep answering pings, and its log
must hold no traceback. ``SWARMTRAIN_FUZZ_EXAMPLES`` sets the examples per target (default 300 in CI: about 3,000 inputs;
raise it for a longer run).
"""
from __future__ import annotations

import math
import os

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from averaging.compression import get_compression
from averaging.state_format import StateFormatError, decode_state, encode_state, piece_hashes, state_digest
from dht import DHT
from dht.records import DeserializationError, MalformedRecord, Record, deserialize
from p2p import NodeConfig, P2PError, P2PTimeout, ProtocolViolation, RemoteError
from p2p.framing import unpack
from peer.moe.wire import WIRE_DTYPES, InvalidTensorMessage, tensor_from_wire, tensor_to_wire

EXAMPLES = int(os.environ.get("SWARMTRAIN_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(),
                    st.text(max_size=40), st.binary(max_size=200))
structures = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                           st.dictionaries(st.text(max_size=10), inner, max_size=6)),
                          max_leaves=30)


def same_msgpack(a, b) -> bool:
    """Equal as msgpack sees them (NaN-safe: compares the encodings)."""
    return msgpack.packb(a, use_bin_type=True) == msgpack.packb(b, use_bin_type=True)


def reference_unpack(data: bytes):
    """msgpack itself, without our limits: what a successful decode must agree with (or raise)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


msgpack_or_noise = st.one_of(st.binary(max_size=2000), structures.map(lambda obj: msgpack.packb(obj, use_bin_type=True)))


@pytest.mark.parametrize("decode, error", [(unpack, ProtocolViolation), (deserialize, DeserializationError)],
                         ids=["frames", "dht values"])
@FUZZ
@given(data=msgpack_or_noise)
def test_msgpack_decoders_return_exactly_the_message_or_their_own_error(decode, error, data):
    try:
        value = decode(data)
    except error:
        return
    assert same_msgpack(value, reference_unpack(data))


wire_records = st.tuples(st.binary(max_size=20), st.one_of(st.none(), st.binary(max_size=20)), st.binary(max_size=40),
                         st.one_of(st.floats(), st.integers(-(1 << 70), 1 << 70), st.booleans(), st.text(max_size=3)),
                         st.one_of(st.none(), st.binary(max_size=70))).map(list)


@FUZZ
@given(st.one_of(structures, wire_records))
def test_record_from_wire_round_trips_or_says_malformed(obj):
    try:
        record = Record.from_wire(obj)
    except MalformedRecord:
        return
    key, subkey, value, expiration, signature = obj
    assert record.to_wire() == [key, subkey, value, float(expiration), signature]
    assert math.isfinite(record.expiration_time) and not isinstance(expiration, bool)


valid_tensors = st.tuples(st.sampled_from(sorted(WIRE_DTYPES)), st.lists(st.integers(0, 3), max_size=3)).map(
    lambda spec: tensor_to_wire(torch.zeros(spec[1], dtype=WIRE_DTYPES[spec[0]])))


def mutated(wire: list, which: int, junk) -> list:
    out = list(wire)
    out[which % 3] = junk
    return out


@FUZZ
@given(st.one_of(structures, valid_tensors,
                 st.builds(mutated, valid_tensors, st.integers(0, 2), st.one_of(structures, st.binary(max_size=30)))))
def test_wire_tensor_decoder_decodes_exactly_or_says_invalid(obj):
    try:
        t = tensor_from_wire(obj)
    except InvalidTensorMessage:
        return
    dtype, shape, data = obj
    assert t.dtype == WIRE_DTYPES[dtype] and list(t.shape) == list(shape)
    assert tensor_to_wire(t) == [dtype, list(shape), bytes(data)]


@FUZZ
@given(st.binary(max_size=3000), st.integers(0, 4000))
def test_state_blob_decoder_rejects_garbage_and_corruption_with_its_own_error(noise, position):
    metadata, tensors = {"step": 3}, [torch.arange(10, dtype=torch.float32), torch.ones(2, 3)]
    good = encode_state(metadata, tensors)
    digest = state_digest(piece_hashes(good, 4096))
    corrupted = bytearray(good)
    corrupted[position % len(corrupted)] ^= 0xFF
    for blob in (noise, bytes(corrupted), good[: position % len(good)]):
        try:
            decode_state(blob)
        except StateFormatError:
            continue
        # a flip inside tensor data or padding still decodes: the downloader's hash check is what refuses it
        assert blob == bytes(corrupted) and state_digest(piece_hashes(blob, 4096)) != digest
    decoded_metadata, decoded = decode_state(good)
    assert decoded_metadata["step"] == 3 and all(torch.equal(a, b) for a, b in zip(decoded, tensors))


@FUZZ
@given(st.sampled_from(["fp16", "int8", "int4", "none"]), st.binary(max_size=5000), st.integers(0, 5000))
def test_decompress_accepts_exactly_its_own_size(name, blob, count):
    compression = get_compression(name)
    if len(blob) != compression.bytes_for(count):
        with pytest.raises(ValueError, match="must be"):
            compression.decompress(blob, count)
        return
    try:
        out = compression.decompress(blob, count)
    except ValueError as e:                    # the right size, but a block header that is not a number
        assert name in ("int8", "int4") and "corrupt" in str(e)
        return
    assert out.numel() == count and out.dtype == torch.float32


@FUZZ
@given(st.binary(max_size=3000), st.binary(min_size=32, max_size=32))
def test_bulk_record_decoder_rejects_garbage_cleanly(data, key):
    """Whatever arrives on a bulk socket (here: random bytes, then EOF) is a clean error, never a crash or
    a hang, and no garbage is ever returned as plaintext."""
    import trio
    from p2p.bulk import SecureSocket

    async def main():
        a, b = trio.socket.socketpair()
        reader = SecureSocket(b, key, initiator=False)
        with a:
            await a.send(data)
        with trio.fail_after(5):
            try:
                plain = await reader.read()
            except (P2PError, trio.BrokenResourceError, OSError):
                pass
            else:  # data, or an end-of-stream record: either way random bytes passed authentication
                raise AssertionError(f"random bytes were accepted as a record: {plain[:40]!r}")
        await reader.reset()
    trio.run(main)


# ------------------------------------------------------------------------------- live handlers
SERVER = r"""
import sys, torch
from p2p import NodeConfig, setup_logging
setup_logging("INFO")
from averaging import Averager, AveragerConfig
from averaging.state import StateSharer
from dht import DHT
from peer.hosting.server import ExpertServer, create_experts
dht = DHT(node_config=NodeConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
server = ExpertServer(dht, create_experts("ffn", ["ffn.0.0"], 16, seed=0))
averager = Averager([torch.zeros(64)], dht, "fuzz", AveragerConfig(target_group_size=2, matchmaking_time=1))
sharer = StateSharer(dht, "fuzz", lambda: ({"step": 1}, [torch.ones(8)]), announce_interval=5)
print("ADDR", dht.addrs[0], flush=True)
sys.stdin.readline()
"""

METHODS = [("dht", m) for m in ("ping", "store", "find", "peers")] + \
          [("experts", m) for m in ("forward", "backward", "info")] + \
          [("averager.fuzz", m) for m in ("join", "part", "status", "fetch")] + \
          [("state.fuzz", m) for m in ("pieces", "read")] + [("bulk", "open")]


def arguments(method: str):
    """Random structures, and dicts with the field names the handlers read (so checks deeper in are hit)."""
    fields = ["records", "keys", "values", "sender", "uid", "x", "grad", "round", "part", "weight", "repair",
              "group", "peer", "sha256", "start", "end", "step", "signature", "addrs", "client", "expiration",
              "service", "version"]
    shaped = st.dictionaries(st.sampled_from(fields), structures, max_size=6)
    wire_like = st.fixed_dictionaries({"uid": st.sampled_from(["ffn.0.0", "nope", ""]),
                                       "x": structures, "grad": structures})
    return st.one_of(structures, shaped, wire_like)


@pytest.fixture(scope="module")
def fuzz_target(module_python_process):
    server = module_python_process(SERVER)
    addr = server.expect("ADDR ", timeout=90)
    client = DHT(initial_peers=[addr], node_config=NodeConfig(client_mode=True))
    yield server, addr.rsplit("/", 1)[1], client
    client.shutdown()


@pytest.mark.parametrize("service, method", METHODS)
def test_handler_survives_random_arguments(fuzz_target, service, method):
    server, server_id, client = fuzz_target
    outcomes = {"ok": 0, "error": 0}

    @settings(max_examples=max(20, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True)
    @given(arguments(method))
    def one(args):
        try:
            client.node.call_sync(server_id, service, method, args, timeout=8)
            outcomes["ok"] += 1
        except P2PTimeout:
            raise AssertionError(f"{service}.{method} did not answer {args!r:.200}")
        except RemoteError as e:
            assert str(e), "a remote error must say what went wrong"
            outcomes["error"] += 1
        except P2PError:
            outcomes["error"] += 1  # e.g. the server reset a stream it found malformed

    one()
    assert sum(outcomes.values()) >= 20
    # the server still serves everyone, and nothing crashed inside it
    assert isinstance(client.node.call_sync(server_id, "dht", "ping", {"sender": client.protocol.sender_info()}, timeout=5), dict)
    log = server.log()
    assert "Traceback" not in log and "crashed" not in log, log[-3000:]


def test_raw_garbage_frames_leave_the_server_serving(fuzz_target):
    """Bytes that are not even frames, on a real stream of each service; then a normal call works."""
    import trio
    server, server_id, client = fuzz_target
    node = client.node

    async def spray():
        for service in {s for s, _ in METHODS}:
            for junk in (b"\xff" * 64, b"\x00\x00\x00\x05hello", msgpack.packb([1, 2, 3]), os.urandom(300)):
                stream = await node.open_stream(server_id, service, timeout=5)
                try:
                    await stream.raw.write(junk)
                    with trio.move_on_after(3):
                        await stream.raw.read(1 << 16)
                except Exception:
                    pass  # reset by the server: the expected answer to garbage
                finally:
                    await stream.reset()
    node.run(spray, timeout=120)
    assert isinstance(node.call_sync(server_id, "dht", "ping", {"sender": client.protocol.sender_info()}, timeout=5), dict)
    assert "Traceback" not in server.log()


def test_garbage_on_the_bulk_port_leaves_the_server_serving(fuzz_target):
    """Random bytes (short, token-sized, long) on the bulk TCP port are closed; then a bulk call still works."""
    import socket
    server, server_id, client = fuzz_target
    port = client.node.call_sync(server_id, "bulk", "open", {"service": "dht", "version": "1"}, timeout=5)["port"]
    for junk in (b"", b"\x00", os.urandom(16), os.urandom(5000)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(15)
            try:
                assert s.recv(100) == b""     # closed, nothing said
            except ConnectionResetError:
                pass
    async def bulk_ping():
        stream = await client.node.open_stream(server_id, "dht", timeout=5, bulk=True)
        try:
            await stream.send_msg(["ping", {"sender": client.protocol.sender_info()}])
            return type(stream.raw).__name__, await stream.recv_msg()
        finally:
            await stream.close()
    transport, reply = client.node.run(bulk_ping, timeout=30)
    assert transport == "SecureSocket" and reply[0] == "ok", reply
    assert "Traceback" not in server.log()
