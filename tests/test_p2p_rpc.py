"""RPC between real processes: results, remote errors, deadlines, limits, swarm isolation, and bad wire input.

One server process (module-scoped) serves several services with different limits; the client Node runs
in the test process. The server's ``state`` method reports what it has in flight, so every test can check
that a bad call left nothing behind and that the server still answers.
"""
import socket
import struct
import time

import pytest
import trio

from p2p import (MessageTooLarge, Node, NodeConfig, P2PError, P2PTimeout, PeerBusy, PeerUnreachable, RemoteError,
                 StreamAborted, new_identity, pack, peer_id_of)
from p2p.framing import DATA, MSG

SERVER = r"""
import sys, trio
from p2p import Node, NodeConfig, ServiceLimits, StreamAborted, setup_logging
setup_logging("INFO")
node = Node(NodeConfig(swarm="rpctest"))
servers = {}

async def echo(ctx, args):
    return args

async def boom(ctx, args):
    raise ValueError(f"boom: {args}")

async def sleep(ctx, seconds):
    await trio.sleep(seconds)
    return "slept"

async def big_reply(ctx, n):
    return b"r" * n

async def relay_broken(ctx, args):
    raise StreamAborted("a stream to another peer broke")  # as a nested call to a third peer would

def count_tasks():
    count, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        stack.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return count

async def state(ctx, args):
    if args == "tasks":
        return count_tasks()
    return {name: {"in_flight": dict(s.in_flight), "served": s.calls_served, "failed": s.calls_failed}
            for name, s in servers.items()}

methods = {"echo": echo, "boom": boom, "sleep": sleep, "big_reply": big_reply, "relay_broken": relay_broken,
           "state": state}
servers["main"] = node.serve("main", methods)  # default limits
servers["brisk"] = node.serve("brisk", methods, limits=ServiceLimits(read_timeout=1.0, idle_timeout=30.0))
servers["quick"] = node.serve("quick", methods, limits=ServiceLimits(handler_timeout=0.5))
servers["tight"] = node.serve("tight", methods, limits=ServiceLimits(max_concurrent_per_peer=2))
servers["small"] = node.serve("small", methods, limits=ServiceLimits(max_message_bytes=64 << 10))
servers["brief"] = node.serve("brief", methods, limits=ServiceLimits(idle_timeout=1.0))
node.serve("admin", {"state": state, "echo": echo})  # not in `servers`: a state call never counts itself
print("ADDR", node.addrs[0], flush=True)
sys.stdin.read()  # until the test closes our stdin or kills us
node.stop()
"""


@pytest.fixture(scope="module")
def server(module_python_process):
    proc = module_python_process(SERVER)
    proc.maddr = proc.expect("ADDR ")
    proc.peer_id = proc.maddr.rsplit("/", 1)[1]
    return proc


@pytest.fixture(scope="module")
def client(server):
    node = Node(NodeConfig(swarm="rpctest"))
    node.add_addrs(server.peer_id, [server.maddr])
    yield node
    node.stop()


def server_tasks(client, server) -> int:
    """How many trio tasks the server process runs right now."""
    return client.call_sync(server.peer_id, "admin", "state", "tasks", timeout=5)


def assert_no_task_left(client, server, tasks_before):
    deadline = time.monotonic() + 5
    while (tasks := server_tasks(client, server)) > tasks_before:
        assert time.monotonic() < deadline, f"server runs {tasks} tasks, {tasks - tasks_before} more than before"
        time.sleep(0.1)


def assert_healthy(client, server):
    """The server answers a fresh call and has nothing of ours left in flight."""
    deadline = time.monotonic() + 5
    while True:
        state = client.call_sync(server.peer_id, "admin", "state", timeout=5)
        stuck = {name: s["in_flight"] for name, s in state.items() if s["in_flight"]}
        if not stuck:
            break
        assert time.monotonic() < deadline, f"calls left in flight on the server: {stuck}"
        time.sleep(0.1)
    assert client.call_sync(server.peer_id, "main", "echo", "still alive", timeout=5) == "still alive"


# ---------------------------------------------------------------- plain calls


def test_echo_round_trip(client, server):
    args = {"text": "héllo", "raw": b"\x00\xff" * 100, "nested": [1, 2.5, None, True, {"k": [b""]}]}
    assert client.call_sync(server.peer_id, "main", "echo", args) == args
    assert client.call_sync(server.peer_id, "main", "echo") is None


def test_many_calls_reuse_pooled_streams(client, server):
    async def many():
        async with trio.open_nursery() as nursery:
            results = {}

            async def one(i):
                results[i] = await client.call(server.peer_id, "main", "echo", i, timeout=10)
            for i in range(50):
                nursery.start_soon(one, i)
        return results
    assert client.run(many, timeout=30) == {i: i for i in range(50)}
    assert_healthy(client, server)


def test_pooled_streams_work_after_an_idle_pause(client, server):
    # "brisk" drops stalled callers after read_timeout=1 s but keeps idle pooled streams for 30 s: a call after
    # a longer pause must reuse the stream. "brief" closes idle streams after 1 s, before the caller's pool
    # gives them up (20 s): the caller must notice the closed stream and retry on a fresh one.
    assert client.call_sync(server.peer_id, "brisk", "echo", 1) == 1
    assert client.call_sync(server.peer_id, "brief", "echo", 1) == 1
    time.sleep(1.6)
    assert client.call_sync(server.peer_id, "brisk", "echo", 2) == 2
    assert client.call_sync(server.peer_id, "brief", "echo", 2) == 2
    assert "Bad brisk request" not in server.log() and "Bad brief request" not in server.log()


def test_remote_exception_arrives_as_remote_error(client, server):
    with pytest.raises(RemoteError) as info:
        client.call_sync(server.peer_id, "main", "boom", "xyz")
    err = info.value
    assert err.remote_type == "ValueError"
    assert err.remote_message == "boom: xyz"
    assert err.method == "boom" and err.peer_id == server.peer_id
    assert "ValueError" in str(err) and "boom: xyz" in str(err)
    assert_healthy(client, server)


def test_handler_failing_on_another_stream_is_a_remote_error(client, server):
    # A StreamAborted raised by the handler (say, from its own call to a third peer) is the handler's failure,
    # not a sign that our stream broke: we must be told, not left with an aborted stream (or a retried call).
    assert client.call_sync(server.peer_id, "main", "echo", 0) == 0  # leave a pooled stream to be reused
    with pytest.raises(RemoteError) as info:
        client.call_sync(server.peer_id, "main", "relay_broken", timeout=5)
    assert info.value.remote_type == "StreamAborted"
    assert "another peer" in info.value.remote_message
    assert_healthy(client, server)


def test_unknown_method(client, server):
    with pytest.raises(RemoteError) as info:
        client.call_sync(server.peer_id, "main", "no_such_method", 1)
    assert info.value.remote_type == "UnknownMethod"
    assert "no_such_method" in info.value.remote_message
    assert_healthy(client, server)


def test_unknown_service_is_peer_unreachable(client, server):
    start = time.monotonic()
    with pytest.raises(PeerUnreachable):
        client.call_sync(server.peer_id, "no_such_service", "echo", 1, timeout=5)
    assert time.monotonic() - start < 2


# ---------------------------------------------------------------- deadlines and limits


def test_caller_deadline(client, server):
    start = time.monotonic()
    with pytest.raises(P2PTimeout):
        client.call_sync(server.peer_id, "main", "sleep", 1.5, timeout=0.5)
    assert time.monotonic() - start < 0.5 + 0.5
    # the server keeps serving while the abandoned handler sleeps on
    assert client.call_sync(server.peer_id, "main", "echo", "next", timeout=5) == "next"
    assert_healthy(client, server)


def test_handler_timeout_on_the_server(client, server):
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        client.call_sync(server.peer_id, "quick", "sleep", 5.0, timeout=5)
    assert time.monotonic() - start < 0.5 + 1.0
    assert info.value.remote_type == "P2PTimeout"
    assert "0.5" in info.value.remote_message
    assert client.call_sync(server.peer_id, "quick", "sleep", 0.0, timeout=5) == "slept"
    assert_healthy(client, server)


def test_oversized_request_is_refused(client, server):
    with pytest.raises(RemoteError) as info:
        client.call_sync(server.peer_id, "small", "echo", b"x" * (100 << 10), timeout=5)
    assert info.value.remote_type == "MessageTooLarge"
    assert "65536" in info.value.remote_message
    assert client.call_sync(server.peer_id, "small", "echo", b"x" * (60 << 10), timeout=5) == b"x" * (60 << 10)
    assert "Bad small request" in server.log()
    assert_healthy(client, server)


def test_much_larger_request_still_gets_a_clear_error(client, server):
    # Bigger than yamux's largest window (16 MiB): the refusal must not leave the caller stuck writing.
    request = b"x" * (20 << 20)
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        client.call_sync(server.peer_id, "small", "echo", request, timeout=5, max_message_bytes=32 << 20)
    assert time.monotonic() - start < 3
    assert info.value.remote_type == "MessageTooLarge"
    assert_healthy(client, server)


def test_request_over_the_callers_own_limit_is_refused_locally(client, server):
    with pytest.raises(MessageTooLarge):
        client.call_sync(server.peer_id, "main", "echo", b"x" * 2000, max_message_bytes=1000)


def test_reply_over_the_callers_limit(client, server):
    assert client.call_sync(server.peer_id, "main", "echo", 1) == 1  # the next call reuses this pooled stream
    with pytest.raises(MessageTooLarge):
        client.call_sync(server.peer_id, "main", "big_reply", 5000, max_message_bytes=1000, timeout=5)
    with pytest.raises(RemoteError) as info:  # over the server's own limit: it says so instead of sending it
        client.call_sync(server.peer_id, "small", "big_reply", 100 << 10, timeout=5)
    assert info.value.remote_type == "MessageTooLarge"
    assert_healthy(client, server)


def test_per_peer_concurrency_limit(client, server):
    async def burst():
        outcomes = []

        async def one():
            try:
                outcomes.append(await client.call(server.peer_id, "tight", "sleep", 1.0, timeout=5))
            except PeerBusy as e:
                outcomes.append(e)
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
        return outcomes
    outcomes = client.run(burst, timeout=10)
    assert outcomes.count("slept") == 2
    busy = [o for o in outcomes if isinstance(o, PeerBusy)]
    assert len(busy) == 3 and all(b.remote_type == "PeerBusy" for b in busy)
    assert client.call_sync(server.peer_id, "tight", "sleep", 0.0) == "slept"
    assert_healthy(client, server)


# ---------------------------------------------------------------- who can be called


def test_swarm_isolation(server):
    with Node(NodeConfig(swarm="otherswarm")) as stranger:
        stranger.add_addrs(server.peer_id, [server.maddr])
        start = time.monotonic()
        with pytest.raises(PeerUnreachable):
            stranger.call_sync(server.peer_id, "main", "echo", 1, timeout=5)
        assert time.monotonic() - start < 2


def test_client_mode_node_can_call_but_has_no_addresses(server):
    with Node(NodeConfig(swarm="rpctest", client_mode=True)) as hidden:
        assert hidden.addrs == []
        hidden.add_addrs(server.peer_id, [server.maddr])
        assert hidden.call_sync(server.peer_id, "main", "echo", "from behind NAT", timeout=5) == "from behind NAT"


def test_peer_without_known_address_is_unreachable_quickly(client):
    stranger = peer_id_of(new_identity())
    start = time.monotonic()
    with pytest.raises((PeerUnreachable, P2PTimeout)):
        client.call_sync(stranger, "main", "echo", 1, timeout=3)
    assert time.monotonic() - start < 1.5


def test_dead_peer_is_unreachable_quickly(client):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = peer_id_of(new_identity())
    client.add_addrs(dead, [f"/ip4/127.0.0.1/tcp/{port}"])
    start = time.monotonic()
    with pytest.raises((PeerUnreachable, P2PTimeout)):
        client.call_sync(dead, "main", "echo", 1, timeout=3)
    assert time.monotonic() - start < 1.5


def test_peer_that_accepts_but_never_speaks_times_out(client):
    with socket.socket() as listener:  # accepts TCP, never answers the handshake
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        mute = peer_id_of(new_identity())
        client.add_addrs(mute, [f"/ip4/127.0.0.1/tcp/{listener.getsockname()[1]}"])
        start = time.monotonic()
        with pytest.raises((P2PTimeout, PeerUnreachable)):
            client.call_sync(mute, "main", "echo", 1, timeout=1.0)
        assert time.monotonic() - start < 1.0 + 1.0


# ---------------------------------------------------------------- bad bytes on the wire


def raw_exchange(client, server, payload: bytes, service="main", read_timeout=5.0):
    """Open a stream, write ``payload`` as-is, then return the server's first message or the read error."""
    async def exchange():
        stream = await client.open_stream(server.peer_id, service, timeout=read_timeout)
        try:
            await stream.raw.write(payload)
            try:
                return await stream.recv_msg()
            except P2PError as e:
                return e
        finally:
            await stream.reset()
    return client.run(exchange, timeout=read_timeout + 5)


def frame(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, tag[0]) + body


@pytest.mark.parametrize("payload, complaint", [
    (frame(MSG, b"\xc1\xc1garbage"), "malformed msgpack"),
    (frame(MSG, b"\x91" * 100_000 + b"\xc0"), "malformed msgpack"),
    (frame(MSG, b"\xdd\xff\xff\xff\xff"), "malformed msgpack"),
    (frame(MSG, pack([123, {}])), "request must be [method: str, args]"),
    (frame(MSG, pack({"method": "echo", "args": 1})), "request must be [method: str, args]"),
    (frame(MSG, pack(["echo"])), "request must be [method: str, args]"),
    (frame(MSG, pack("echo")), "request must be [method: str, args]"),
    (frame(DATA, pack(["echo", 1])), "expected a request message"),
    (struct.pack(">IB", 2**31, MSG[0]), "limit"),
    (struct.pack(">IB", 5, ord("Z")) + b"abcd", "bad frame header"),
])
def test_bad_request_gets_a_clear_error_and_the_server_carries_on(client, server, payload, complaint):
    assert_healthy(client, server)  # warm the caller's stream pool so only the bad exchange changes the count
    log_before, tasks_before = server.log().count("Bad main request"), server_tasks(client, server)
    reply = raw_exchange(client, server, payload)
    assert isinstance(reply, list) and reply[0] == "err", reply
    assert complaint in reply[2]
    assert_healthy(client, server)
    assert server.log().count("Bad main request") == log_before + 1
    assert_no_task_left(client, server, tasks_before)


def test_stalled_caller_is_dropped_after_read_timeout(client, server):
    assert_healthy(client, server)
    for stall in (b"", frame(MSG, pack(["echo", "x" * 100]))[:20]):  # nothing at all / half a frame
        logged_before, tasks_before = server.log().count("no complete request"), server_tasks(client, server)
        start = time.monotonic()
        reply = raw_exchange(client, server, stall, service="brisk")
        waited = time.monotonic() - start
        assert isinstance(reply, StreamAborted), reply  # dropped: our next read ends at once
        assert 0.9 < waited < 1.0 + 1.5, waited  # the "brisk" service has read_timeout=1.0
        assert server.log().count("no complete request") == logged_before + 1
        assert_healthy(client, server)
        assert_no_task_left(client, server, tasks_before)
