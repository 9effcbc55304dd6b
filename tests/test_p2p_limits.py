"""Per-peer limits: the token bucket and log throttle, a call-rate cap and a concurrent-stream cap on a real node."""
from __future__ import annotations

import time

import trio

from p2p import Node, NodeConfig, P2PError, PeerBusy
from p2p.limits import LogThrottle, RateLimiter


def test_rate_limiter_allows_a_burst_then_the_sustained_rate():
    limiter = RateLimiter(rate=10, burst=5)
    t = 100.0
    assert [limiter.allow("a", t) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("b", t)  # buckets are per peer
    assert not limiter.allow("a", t + 0.05)  # half a token refilled
    assert limiter.allow("a", t + 0.11)
    # over 10 s at most burst + rate * 10 calls get through, however hard a peer tries
    allowed = sum(limiter.allow("c", t + i / 1000) for i in range(10_000))
    assert 5 + 100 - 2 <= allowed <= 5 + 100 + 1, allowed


def test_rate_limiter_state_stays_bounded():
    limiter = RateLimiter(rate=1, burst=1)
    for i in range(25_000):
        limiter.allow(f"peer{i}", now=float(i))
    assert len(limiter._buckets) <= 10_000


def test_log_throttle_once_per_interval_per_key():
    throttle = LogThrottle(10.0)
    assert throttle.should_log("x", 0.0) and throttle.should_log("y", 0.0)
    assert not throttle.should_log("x", 5.0)
    assert throttle.should_log("x", 10.5)


SERVER = r"""
import sys, trio
from p2p import Node, NodeConfig, ServiceLimits, setup_logging
setup_logging("INFO")
node = Node(NodeConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"], max_streams_per_peer=8))
async def hold(ctx, seconds):
    await trio.sleep(float(seconds))
    return "held"
async def echo(ctx, x):
    return x
node.serve("svc", {"hold": hold, "echo": echo}, limits=ServiceLimits(max_calls_per_second=50))
print("ADDR", node.addrs[0], flush=True)
sys.stdin.readline()
"""


def test_stream_and_rate_caps_refuse_one_peer_and_serve_the_others(python_process):
    server = python_process(SERVER)
    addr = server.expect("ADDR ", timeout=60)
    target = addr.rsplit("/", 1)[1]
    greedy, other = Node(NodeConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"])), Node(NodeConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    try:
        outcomes: list[str] = []
        other_ms: list[float] = []

        async def hold_one() -> None:
            try:
                outcomes.append(await greedy.call(target, "svc", "hold", 2.0, timeout=8))
            except P2PError as e:
                outcomes.append(type(e).__name__)

        async def greedy_then_other() -> None:
            await greedy.connect(addr)
            async with trio.open_nursery() as nursery:
                for _ in range(20):  # 20 streams at once against a cap of 8
                    nursery.start_soon(hold_one)
                await trio.sleep(0.5)
                started = trio.current_time()
                reply = await trio.to_thread.run_sync(  # the other peer's node runs its own trio loop
                    lambda: other.run(other.call, target, "svc", "echo", "hi", timeout=5))
                assert reply == "hi"
                other_ms.append((trio.current_time() - started) * 1000)

        other.run(other.connect, addr)
        greedy.run(greedy_then_other, timeout=30)
        # exactly the streams within the cap were served; the rest were reset at once, not queued
        assert outcomes.count("held") == 8, outcomes
        assert len(outcomes) == 20 and all(o in ("held", "PeerUnreachable", "StreamAborted") for o in outcomes), outcomes
        assert other_ms[0] < 1000, other_ms
        # the cap is on streams held open, not a ban: with its streams closed the greedy peer is served again
        assert greedy.run(greedy.call, target, "svc", "echo", 1, timeout=5) == 1

        # call rate: 50/s sustained (burst 50). 300 calls as fast as possible: about 50 + 50/s served
        async def flood() -> dict:
            counts = {"ok": 0, "busy": 0}
            started = trio.current_time()
            for i in range(300):
                try:
                    await greedy.call(target, "svc", "echo", i, timeout=5)
                    counts["ok"] += 1
                except PeerBusy:
                    counts["busy"] += 1
            counts["seconds"] = trio.current_time() - started
            return counts
        counts = greedy.run(flood, timeout=60)
        assert counts["busy"] > 0, counts
        assert counts["ok"] <= 50 + 50 * counts["seconds"] + 2, counts
        assert other.run(other.call, target, "svc", "echo", "still", timeout=5) == "still"  # others unaffected
        time.sleep(1.1)  # the bucket refills
        assert greedy.run(greedy.call, target, "svc", "echo", "again", timeout=5) == "again"
    finally:
        greedy.stop()
        other.stop()
    log = server.log()
    assert "open streams (the cap)" in log and "calls/s" in log, log[-2000:]
    assert log.count("open streams (the cap)") == 1  # one line per peer and 10 s, not one per refusal
    assert "Traceback" not in log
