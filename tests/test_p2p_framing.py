"""Unit tests for p2p.framing: msgpack packing and FramedStream's frame header checks (no network)."""
import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p import MessageTooLarge, P2PTimeout, ProtocolViolation, StreamAborted
from p2p.framing import ABORT, CREDIT, DATA, END, MSG, FramedStream, pack, unpack

FAST = settings(max_examples=40, deadline=None, database=None)

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=50) | st.binary(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=8,
)


class FakeRaw:
    """In-memory stand-in for a libp2p stream: ``read`` hands out ``incoming`` in pieces, then EOF or a stall."""

    def __init__(self, incoming: bytes = b"", *, piece: int = 7, stall_at_end: bool = False):
        self.incoming, self.piece, self.stall_at_end = bytearray(incoming), piece, stall_at_end
        self.written = bytearray()

    async def read(self, n: int = -1) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.incoming:
            if self.stall_at_end:
                await trio.sleep_forever()
            return b""
        take = min(n, self.piece, len(self.incoming))
        out = bytes(self.incoming[:take])
        del self.incoming[:take]
        return out

    async def write(self, data) -> None:
        await trio.lowlevel.checkpoint()
        self.written += bytes(data)


def framed(raw, max_frame_bytes=1024, timeout=1.0) -> FramedStream:
    return FramedStream(raw, "12D3KooWFakePeerForUnitTests", max_frame_bytes=max_frame_bytes, timeout=timeout)


def header(length: int, tag: bytes) -> bytes:
    return struct.pack(">IB", length, tag[0])


def read_one(data: bytes, **kw):
    async def main():
        return await framed(FakeRaw(data), **kw).read_frame()
    return trio.run(main)


# ---------------------------------------------------------------- pack / unpack


@FAST
@given(msgpack_values)
def test_pack_unpack_round_trip(value):
    assert unpack(pack(value)) == value


def test_bytes_and_str_stay_distinct():
    assert unpack(pack([b"raw", "text", {1: b"x"}])) == [b"raw", "text", {1: b"x"}]


@pytest.mark.parametrize("garbage", [
    b"\xc1", b"\x92\xa3ab", b"\xdb\xff\xff\xff\xff", b"\x81", b"\xa5\xff\xfe\xfd\xfc\xfb",
    b"\x91" * 100_000 + b"\xc0",  # nesting deeper than the unpacker's stack
    b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",  # claims 4 billion array items / map entries
    b"\x81\x91\x01\x02",  # a list as a map key
])
def test_garbage_msgpack_is_protocol_violation(garbage):
    with pytest.raises(ProtocolViolation, match="malformed msgpack"):
        unpack(garbage)


def test_unpack_respects_size_cap():
    with pytest.raises(ProtocolViolation):
        unpack(pack(b"x" * 1000), max_bytes=100)
    assert unpack(pack(b"x" * 100), max_bytes=100) == b"x" * 100


@FAST
@given(st.binary(max_size=64))
def test_unpack_never_raises_anything_but_protocol_violation(data):
    try:
        unpack(data)
    except ProtocolViolation:
        pass


# ---------------------------------------------------------------- FramedStream


@FAST
@given(st.lists(st.tuples(st.sampled_from([MSG, DATA, CREDIT, END, ABORT]), st.binary(max_size=300)), max_size=6),
       st.integers(min_value=1, max_value=50))
def test_frames_round_trip_through_any_read_sizes(frames, piece):
    async def main():
        out = FakeRaw()
        writer = framed(out)
        for tag, body in frames:
            await writer.write_frame(tag, body)
        reader = framed(FakeRaw(bytes(out.written), piece=piece))
        got = [await reader.read_frame() for _ in frames]
        assert got == frames
        assert reader.bytes_received == writer.bytes_sent == sum(len(b) + 5 for _, b in frames)
        with pytest.raises(StreamAborted):
            await reader.read_frame()  # clean EOF after the last frame
    trio.run(main)


def test_messages_round_trip():
    async def main():
        out = FakeRaw()
        await framed(out).send_msg(["echo", {"x": [1, 2.5, b"\x00"]}])
        assert await framed(FakeRaw(bytes(out.written))).recv_msg() == ["echo", {"x": [1, 2.5, b"\x00"]}]
    trio.run(main)


def test_frame_header_over_the_cap_is_refused_before_reading_the_body():
    with pytest.raises(MessageTooLarge):
        read_one(header(1025, MSG) + b"x" * 1024, max_frame_bytes=1024)
    with pytest.raises(MessageTooLarge):
        read_one(header(2**32 - 1, MSG), max_frame_bytes=1024)  # no body needed: refused from the header
    assert read_one(header(1024, MSG) + b"x" * 1023, max_frame_bytes=1024) == (MSG, b"x" * 1023)


@pytest.mark.parametrize("bad", [header(0, MSG), header(5, b"Z"), header(5, b"\x00"), header(1, b"m")])
def test_bad_frame_header_is_protocol_violation(bad):
    with pytest.raises(ProtocolViolation, match="bad frame header"):
        read_one(bad + b"body")


def test_truncated_frame_is_stream_aborted():
    with pytest.raises(StreamAborted):
        read_one(header(10, MSG) + b"abc")
    with pytest.raises(StreamAborted):
        read_one(b"\x00\x00")


def test_stalled_peer_gives_p2p_timeout_not_a_hang():
    async def main():
        stream = framed(FakeRaw(header(10, MSG) + b"abc", stall_at_end=True), timeout=0.2)
        start = trio.current_time()
        with pytest.raises(P2PTimeout, match="took longer than 0.2s"):
            await stream.read_frame()
        assert trio.current_time() - start < 1.0
    trio.run(main)


def test_oversized_write_is_refused_locally():
    async def main():
        out = FakeRaw()
        with pytest.raises(MessageTooLarge):
            await framed(out, max_frame_bytes=1024).write_frame(DATA, b"x" * 1024)  # body + tag byte > cap
        assert out.written == b""
        await framed(out, max_frame_bytes=1024).write_frame(DATA, b"x" * 1023)
        assert len(out.written) == 5 + 1023
    trio.run(main)


def test_recv_msg_rejects_non_message_frames():
    async def main():
        with pytest.raises(ProtocolViolation, match="expected a message frame"):
            await framed(FakeRaw(header(3, DATA) + b"ab")).recv_msg()
        with pytest.raises(StreamAborted, match="gone"):
            await framed(FakeRaw(header(1 + len(pack("gone")), ABORT) + pack("gone"))).recv_msg()
        with pytest.raises(ProtocolViolation, match="malformed msgpack"):
            await framed(FakeRaw(header(2, MSG) + b"\xc1")).recv_msg()
    trio.run(main)
