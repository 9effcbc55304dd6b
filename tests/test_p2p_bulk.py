"""The bulk data plane (p2p.bulk): big payloads on AES-GCM sealed TCP sockets beside libp2p."""
from __future__ import annotations

import os
import socket
import struct

import pytest
import trio

import p2p.bulk

from p2p import Node, NodeConfig, PeerUnreachable, ProtocolViolation, RemoteError, ServiceLimits, StreamAborted, open_call, read_reply
from p2p.bulk import MAX_RECORD, TOKEN_BYTES, SecureSocket
from p2p.framing import FramedStream
from p2p.streams import recv_bytes, send_bytes

LIMITS = ServiceLimits(max_message_bytes=8 << 20)


def echo_server(**kw) -> tuple[Node, dict]:
    node = Node(NodeConfig(**kw))
    seen: dict = {}

    async def echo(ctx, args):
        data = await recv_bytes(ctx.stream, max_bytes=1 << 30)
        seen.update(peer=ctx.peer_id, transport=type(ctx.stream.raw).__name__)
        await send_bytes(ctx.stream, data)
        return len(data)
    node.serve("echo", {"echo": echo}, limits=LIMITS)
    return node, seen


async def echo_call(caller: Node, server: Node, payload: bytes, bulk: bool = True):
    async with open_call(caller, server.peer_id, "echo", "echo", None, timeout=30,
                         max_message_bytes=LIMITS.max_message_bytes, bulk=bulk) as stream:
        transport = type(stream.raw).__name__
        await send_bytes(stream, payload)
        back = bytes(await recv_bytes(stream, max_bytes=1 << 30))
        n = await read_reply(stream, "echo")
    return transport, back, n


@pytest.fixture
def pair():
    server, seen = echo_server()
    caller = Node()
    caller.run(caller.connect, server.addrs[0])
    yield caller, server, seen
    caller.stop()
    server.stop()


def test_a_big_payload_goes_over_the_bulk_plane_with_the_callers_identity(pair):
    caller, server, seen = pair
    payload = os.urandom(3 * MAX_RECORD + 12345)        # several records, and a partial last one
    transport, back, n = caller.run(echo_call, caller, server, payload)
    assert transport == "SecureSocket" and seen["transport"] == "SecureSocket"
    assert back == payload and n == len(payload)
    assert seen["peer"] == caller.peer_id               # the identity Noise authenticated in the handshake
    assert caller.bulk.opened == 1 and caller.bulk.fallbacks == 0
    transport, back, _ = caller.run(echo_call, caller, server, b"x" * 10, False)
    assert transport == "NetStream" and back == b"x" * 10   # plain calls still use libp2p


def test_a_peer_without_the_bulk_plane_is_reached_over_libp2p():
    server, seen = echo_server(bulk_port=None)
    caller = Node()
    try:
        caller.run(caller.connect, server.addrs[0])
        for _ in range(2):
            transport, back, _ = caller.run(echo_call, caller, server, b"abc" * 1000)
            assert transport == "NetStream" and back == b"abc" * 1000
        assert caller.bulk.fallbacks == 1                  # asked once, then remembered
    finally:
        caller.stop()
        server.stop()


def test_tokens_are_single_use_and_garbage_tokens_are_refused(pair):
    caller, server, _ = pair

    async def handshake():
        return await caller.call(server.peer_id, "bulk", "open", {"service": "echo", "version": "1"})
    reply = caller.run(handshake)
    port = reply["port"]

    def connect_with(token: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(token)
            s.settimeout(5)
            try:
                return s.recv(100)
            except ConnectionResetError:
                return b""
    # a valid token opens a stream; the server then waits for our first record (nothing comes back yet)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(reply["token"])
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.recv(100)
    assert connect_with(reply["token"]) == b""          # replayed: closed at once
    assert connect_with(os.urandom(TOKEN_BYTES)) == b""  # guessed: closed at once
    with pytest.raises(RemoteError, match="do not serve"):
        caller.run(lambda: caller.call(server.peer_id, "bulk", "open", {"service": "nope", "version": "1"}))
    transport, back, _ = caller.run(echo_call, caller, server, b"still serving")
    assert transport == "SecureSocket" and back == b"still serving"


def test_an_outsider_gets_no_bulk_token():
    caller = Node()
    server, _ = echo_server(allowed_peers=[])
    try:
        caller.run(caller.connect, server.addrs[0])
        with pytest.raises((StreamAborted, PeerUnreachable)):   # its stream is reset before the handler runs
            caller.run(lambda: caller.call(server.peer_id, "bulk", "open", {"service": "echo", "version": "1"},
                                           timeout=5))
        assert not server.bulk._tokens
    finally:
        caller.stop()
        server.stop()


async def _socket_pair():
    a, b = trio.socket.socketpair()
    key = os.urandom(32)
    return SecureSocket(a, key, initiator=True), SecureSocket(b, key, initiator=False), a, b


def test_records_round_trip_and_end_of_stream_is_authenticated():
    async def main():
        left, right, _, _ = await _socket_pair()
        framed_l = FramedStream(left, "L" * 8, max_frame_bytes=4 << 20, timeout=5)
        framed_r = FramedStream(right, "R" * 8, max_frame_bytes=4 << 20, timeout=5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(framed_l.send_msg, {"hello": b"x" * 100_000})
            assert await framed_r.recv_msg() == {"hello": b"x" * 100_000}
            await framed_r.send_msg("back")
            assert await framed_l.recv_msg() == "back"
            nursery.start_soon(left.close)
            assert await right.read(10) == b""           # the end record, not a cut
            await right.close()
    trio.run(main)


def test_tampered_replayed_or_cut_records_fail_loudly():
    async def flipped():
        left, right, raw_l, raw_r = await _socket_pair()
        await left.write(b"a" * 1000)
        data = bytearray(await raw_r.recv(2000))
        data[100] ^= 1
        spliced, a2 = trio.socket.socketpair()
        reader = SecureSocket(a2, b"\0" * 32, initiator=False)
        reader._aead = right._aead
        await spliced.send(bytes(data))
        with pytest.raises(ProtocolViolation, match="authentication"):
            await reader.read()

    async def replayed():
        left, right, raw_l, raw_r = await _socket_pair()
        await left.write(b"one")
        record = await raw_r.recv(2000)
        relay, a2 = trio.socket.socketpair()
        reader = SecureSocket(a2, b"\0" * 32, initiator=False)
        reader._aead = right._aead
        await relay.send(record + record)               # the same record twice
        assert await reader.read() == b"one"
        with pytest.raises(ProtocolViolation, match="authentication"):
            await reader.read()

    async def cut():
        left, right, raw_l, _ = await _socket_pair()
        framed = FramedStream(right, "R" * 8, max_frame_bytes=1 << 20, timeout=5)
        await left.write(b"\x00\x00\x00\x10M")          # a frame header promising 15 more bytes
        raw_l.close()                                    # then the TCP connection ends without an end record
        with pytest.raises(StreamAborted, match="cut"):
            await framed.read_frame()

    async def oversized():
        a, b = trio.socket.socketpair()
        reader = SecureSocket(b, os.urandom(32), initiator=False)
        await a.send(struct.pack(">I", 1 << 31))        # a record length far over the limit: refused unread
        with pytest.raises(ProtocolViolation, match="record of"):
            await reader.read()

    for case in (flipped, replayed, cut, oversized):
        trio.run(case)


def test_a_reset_reaches_the_other_side_at_once():
    async def main():
        left, right, _, _ = await _socket_pair()
        framed = FramedStream(right, "R" * 8, max_frame_bytes=1 << 20, timeout=5)
        await left.reset()
        with trio.fail_after(2):
            with pytest.raises(StreamAborted):
                await framed.read_frame()
    trio.run(main)


@pytest.mark.skipif(p2p.bulk.SO_MAX_PACING_RATE is None, reason="kernel pacing is Linux-only")
def test_a_paced_bulk_stream_sends_no_faster_than_its_rate(pair):
    caller, server, _ = pair
    payload = os.urandom(1_500_000)

    async def upload(rate: float | None, bulk: bool = True) -> tuple[float, bool]:
        async with open_call(caller, server.peer_id, "echo", "echo", None, timeout=30,
                             max_message_bytes=LIMITS.max_message_bytes, bulk=bulk) as stream:
            paced = stream.pace(rate) if rate is not None else None
            started = trio.current_time()
            await send_bytes(stream, payload)          # returns once the server consumed it all
            took = trio.current_time() - started
            assert bytes(await recv_bytes(stream, max_bytes=1 << 30)) == payload
            await read_reply(stream, "echo")
        return took, paced

    fast, _ = caller.run(upload, None)
    slow, paced = caller.run(upload, 2e6)              # 1.5 MB at 2 MB/s: 0.75 s
    assert paced and slow >= 0.5 and slow > 2 * fast, (slow, fast)
    _, paced = caller.run(upload, 2e6, False)          # a libp2p stream shares its connection: not paced
    assert not paced


def test_a_bulk_open_cut_short_by_its_deadline_is_a_timeout_not_a_crash():
    """Issue 14, defect 1: a peer that stops answering (a laptop asleep) during the bulk handshake. The open's
    deadline cut the attempt short and left its result unassigned: UnboundLocalError escaped Averager.step."""
    server = Node(NodeConfig(bulk_port=None))

    async def asleep(ctx, args):
        await trio.sleep_forever()
    server.serve(p2p.bulk.SERVICE, {"open": asleep})
    caller = Node()
    try:
        caller.run(caller.connect, server.addrs[0])

        async def open_bulk():
            started = trio.current_time()
            with pytest.raises(p2p.P2PTimeout, match="bulk"):
                await caller.open_stream(server.peer_id, "echo", timeout=0.5, bulk=True)
            return trio.current_time() - started
        assert caller.run(open_bulk, timeout=10) < 2.0
    finally:
        caller.stop()
        server.stop()
