"""Large payloads between real processes: byte-exact transfers, and clean failures when either side stalls or dies.

The server process serves streaming RPC methods built on p2p.streams; the client runs in the test process.
Failure tests check the documented promise of p2p.streams: a stalled or slow peer gives P2PTimeout on the
waiting side and StreamAborted on the other side within the deadline, never a hang.
"""
import hashlib
import os
import random
import signal
import time

import pytest

from p2p import Node, NodeConfig, P2PError, P2PTimeout, ProtocolViolation, StreamAborted
from p2p.rpc import open_call, read_reply
from p2p.streams import PayloadSender, receive_payload, recv_bytes, send_bytes

MiB = 1 << 20

SERVER = r"""
import hashlib, random, sys, trio
from p2p import Node, NodeConfig, P2PError, ServiceLimits, setup_logging
from p2p.streams import receive_payload, recv_bytes, send_bytes
setup_logging("INFO")
node = Node(NodeConfig(swarm="payloadtest"))
events = []

async def upload(ctx, args):
    data = await recv_bytes(ctx.stream, max_bytes=args["max_bytes"], timeout=args.get("timeout", 10.0))
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

async def download(ctx, args):
    data = random.Random(args["seed"]).randbytes(args["size"])
    await send_bytes(ctx.stream, data, window_bytes=args.get("window", 8 << 20), timeout=args.get("timeout", 10.0))
    return hashlib.sha256(data).hexdigest()

async def slow_upload(ctx, args):
    # consume one chunk, stall, then try to read on: the sender has given up by then
    await ctx.stream.recv_msg()
    async with receive_payload(ctx.stream, window_bytes=args["window"], timeout=args["timeout"]) as chunks:
        await chunks.__anext__()
        await trio.sleep(args["stall"])
        start = trio.current_time()
        try:
            await chunks.__anext__()
            events.append(("next read", "returned a chunk", 0.0))
        except P2PError as e:
            events.append(("next read", type(e).__name__, trio.current_time() - start))
            raise

async def get_events(ctx, args):
    return events

node.serve("payload", {"upload": upload, "download": download, "slow_upload": slow_upload, "events": get_events},
           limits=ServiceLimits(max_message_bytes=4 << 20, handler_timeout=60))
print("ADDR", node.addrs[0], flush=True)
sys.stdin.read()
node.stop()
"""


@pytest.fixture(scope="module")
def servers(module_python_process):
    """Server processes started together so their imports overlap: one shared, one to freeze, one to kill."""
    procs = {name: module_python_process(SERVER) for name in ("shared", "frozen", "killed")}
    for proc in procs.values():
        proc.maddr = proc.expect("ADDR ")
        proc.peer_id = proc.maddr.rsplit("/", 1)[1]
    return procs


@pytest.fixture(scope="module")
def server(servers):
    return servers["shared"]


@pytest.fixture(scope="module")
def client():
    node = Node(NodeConfig(swarm="payloadtest"))
    yield node
    node.stop()


def connect(client, server):
    client.add_addrs(server.peer_id, [server.maddr])
    return server.peer_id


# ---------------------------------------------------------------- byte-exact transfers


def test_upload_64_mib_byte_exact(client, server):
    peer = connect(client, server)
    data = os.urandom(64 * MiB)

    async def upload():
        async with open_call(client, peer, "payload", "upload", {"max_bytes": 64 * MiB}, timeout=30) as stream:
            await send_bytes(stream, data, timeout=10)
            return await read_reply(stream, "upload")
    assert client.run(upload, timeout=60) == {"sha256": hashlib.sha256(data).hexdigest(), "size": 64 * MiB}


def test_download_64_mib_byte_exact(client, server):
    peer = connect(client, server)

    async def download():
        async with open_call(client, peer, "payload", "download", {"size": 64 * MiB, "seed": 7}, timeout=30) as stream:
            data = await recv_bytes(stream, max_bytes=64 * MiB, timeout=10)
            return hashlib.sha256(data).hexdigest(), await read_reply(stream, "download")
    got, sent = client.run(download, timeout=60)
    assert got == sent == hashlib.sha256(random.Random(7).randbytes(64 * MiB)).hexdigest()


def test_payload_over_the_receivers_limit_is_refused(client, server):
    peer = connect(client, server)

    async def download():
        async with open_call(client, peer, "payload", "download", {"size": 2 * MiB, "seed": 1}, timeout=10) as stream:
            await recv_bytes(stream, max_bytes=MiB, timeout=5)
    with pytest.raises(ProtocolViolation, match="not within"):
        client.run(download, timeout=15)
    assert client.call_sync(peer, "payload", "events", timeout=5) is not None  # server still answers


# ---------------------------------------------------------------- stalls and deaths


@pytest.mark.parametrize("window, chunk", [(2 * MiB, MiB), (8 * MiB, 256 << 10)])
def test_slow_consumer_times_out_the_sender_and_aborts_the_receiver(client, server, window, chunk):
    peer = connect(client, server)
    sender_timeout, stall = 1.0, 2.0
    args = {"window": window, "timeout": 10.0, "stall": stall}
    before = len(client.call_sync(peer, "payload", "events", timeout=5))
    data = bytes(32 * MiB)

    async def upload():
        async with open_call(client, peer, "payload", "slow_upload", args, timeout=30) as stream:
            await send_bytes(stream, data, chunk_bytes=chunk, window_bytes=window, timeout=sender_timeout)
    start = time.monotonic()
    with pytest.raises(P2PTimeout, match="consumed nothing"):
        client.run(upload, timeout=15)
    assert time.monotonic() - start < sender_timeout + 1.0

    deadline = time.monotonic() + stall + 5
    while len(events := client.call_sync(peer, "payload", "events", timeout=5)) == before:
        assert time.monotonic() < deadline, "the stalled receiver never tried to read on"
        time.sleep(0.2)
    _, outcome, waited = events[-1]
    assert outcome == "StreamAborted", events
    assert waited < 0.5  # its next read failed at once, not after draining or waiting out its own timeout


def test_sender_frozen_mid_payload_times_out_the_receiver(client, servers):
    frozen = servers["frozen"]
    pid = frozen.pid
    peer = connect(client, frozen)
    receiver_timeout = 1.0

    async def download():
        args = {"size": 64 * MiB, "seed": 3, "window": 2 * MiB}
        async with open_call(client, peer, "payload", "download", args, timeout=30) as stream:
            await stream.recv_msg()  # size header
            async with receive_payload(stream, window_bytes=2 * MiB, timeout=receiver_timeout) as chunks:
                stopped_at = None
                try:
                    async for _ in chunks:
                        if stopped_at is None:
                            os.kill(pid, signal.SIGSTOP)
                            stopped_at = time.monotonic()
                except P2PTimeout:
                    return time.monotonic() - stopped_at
        raise AssertionError("the whole payload arrived although its sender was stopped")
    try:
        waited = client.run(download, timeout=15)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert waited < receiver_timeout + 1.0


def test_receiver_killed_mid_payload_fails_the_sender_quickly(client, servers):
    victim = servers["killed"]
    pid = victim.pid
    peer = connect(client, victim)
    chunk = os.urandom(MiB)

    async def upload():
        async with open_call(client, peer, "payload", "upload", {"max_bytes": 256 * MiB}, timeout=30) as stream:
            await stream.send_msg({"size": 256 * MiB})
            sender = PayloadSender(stream, window_bytes=2 * MiB, timeout=10.0)
            killed_at = None
            try:
                for i in range(256):
                    await sender.send(chunk)
                    if i == 4:
                        os.kill(pid, signal.SIGKILL)
                        killed_at = time.monotonic()
                await sender.finish()
            except P2PError as e:
                return type(e), time.monotonic() - killed_at
        raise AssertionError("the payload was accepted by a killed receiver")
    error, waited = client.run(upload, timeout=20)
    assert issubclass(error, (StreamAborted, P2PError)) and not issubclass(error, P2PTimeout), error
    assert waited < 2.0
