"""Node lifecycle: idempotent start/stop, prompt shutdown with calls in flight, SIGINT in a real process."""
import signal
import subprocess
import threading
import time

import pytest
import trio

from p2p import Node, NodeConfig, P2PError

SERVER = r"""
import sys, trio
from p2p import Node, NodeConfig, setup_logging
setup_logging("INFO")

async def sleep(ctx, seconds):
    await trio.sleep(seconds)
    return "slept"

async def echo(ctx, args):
    return args

with Node(NodeConfig(swarm="lifecycle")) as node:
    node.serve("svc", {"sleep": sleep, "echo": echo})
    print("ADDR", node.addrs[0], flush=True)
    sys.stdin.read()  # until the test closes our stdin, kills us or interrupts us
"""

CALLER = r"""
from p2p import Node, NodeConfig
peer, maddr = input().split()
with Node(NodeConfig(swarm="lifecycle")) as node:
    node.add_addrs(peer, [maddr])
    print("READY", flush=True)
    node.call_sync(peer, "svc", "sleep", 60, timeout=120)
"""


@pytest.fixture(scope="module")
def children(module_python_process):
    """All child processes of this module, started together so their imports overlap."""
    procs = {"server": module_python_process(SERVER), "interrupted_server": module_python_process(SERVER),
             "interrupted_caller": module_python_process(CALLER)}
    for name in ("server", "interrupted_server"):
        procs[name].maddr = procs[name].expect("ADDR ")
        procs[name].peer_id = procs[name].maddr.rsplit("/", 1)[1]
    return procs


def test_start_and_stop_are_idempotent():
    node = Node(NodeConfig(swarm="lifecycle"), start=False)
    assert not node.is_running and node.addrs == []
    with pytest.raises(P2PError):
        node.run(trio.sleep, 0)
    assert node.start() is node
    assert node.start() is node
    assert node.is_running and node.addrs[0].endswith("/p2p/" + node.peer_id)
    assert node.run(trio.sleep, 0, timeout=5) is None
    node.stop()
    node.stop()
    assert not node.is_running
    with pytest.raises(P2PError):
        node.run(trio.sleep, 0)
    Node(NodeConfig(swarm="lifecycle"), start=False).stop()  # stopping a node that never started is harmless


def test_context_manager_stops_the_node():
    with Node(NodeConfig(swarm="lifecycle")) as node:
        assert node.is_running
    assert not node.is_running


def test_run_timeout_and_spawned_tasks():
    with Node(NodeConfig(swarm="lifecycle")) as node:
        with pytest.raises(TimeoutError):
            node.run(trio.sleep, 10, timeout=0.2)
        done = threading.Event()

        async def background():
            done.set()
            await trio.sleep_forever()
        node.spawn(background)
        assert done.wait(5)
        start = time.monotonic()
    assert time.monotonic() - start < 2  # the spawned task was cancelled by stop()


def test_stop_from_inside_the_nodes_own_loop():
    node = Node(NodeConfig(swarm="lifecycle"))
    errors = []

    async def shutdown_handler():  # e.g. an RPC handler that shuts its peer down
        try:
            node.stop()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    node.spawn(shutdown_handler)
    deadline = time.monotonic() + 2
    while node.is_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not node.is_running and errors == []
    node.stop()


def start_calls(node, server, n):
    """``n`` blocking calls (each in its own thread) and ``n`` spawned calls that sleep 60 s on ``server``."""
    outcomes = []

    def blocking_call():
        try:
            outcomes.append(node.call_sync(server.peer_id, "svc", "sleep", 60, timeout=120))
        except BaseException as e:  # noqa: BLE001 - we record whatever the caller sees
            outcomes.append(e)

    async def spawned_call():
        await node.call(server.peer_id, "svc", "sleep", 60, timeout=120)
    threads = [threading.Thread(target=blocking_call, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        node.spawn(spawned_call)
    time.sleep(0.5)  # let the calls reach the server
    return threads, outcomes


def test_stop_is_prompt_with_calls_in_flight(children):
    server = children["server"]
    node = Node(NodeConfig(swarm="lifecycle"))
    node.add_addrs(server.peer_id, [server.maddr])
    assert node.call_sync(server.peer_id, "svc", "echo", 1, timeout=10) == 1
    threads, outcomes = start_calls(node, server, 3)
    start = time.monotonic()
    node.stop()
    assert time.monotonic() - start < 2.0
    for t in threads:
        t.join(timeout=2.0)
        assert not t.is_alive(), "a blocking call outlived its node"
    # blocking callers get our error, not trio.Cancelled leaking out of the node's loop
    assert len(outcomes) == 3 and all(type(o) is P2PError and "node stopped" in str(o) for o in outcomes), outcomes


def test_sigint_stops_a_serving_process_within_two_seconds(children):
    server = children["interrupted_server"]
    with Node(NodeConfig(swarm="lifecycle")) as node:
        node.add_addrs(server.peer_id, [server.maddr])
        threads, outcomes = start_calls(node, server, 3)  # the server is interrupted with 6 calls in flight
        assert_exits_on_sigint(server)
        for t in threads:  # its callers hear about it at once
            t.join(timeout=2.0)
            assert not t.is_alive(), "a call to an interrupted server hangs"
        assert len(outcomes) == 3 and all(isinstance(o, P2PError) for o in outcomes), outcomes


def test_sigint_interrupts_a_blocking_call_within_two_seconds(children):
    caller, server = children["interrupted_caller"], children["server"]
    caller.proc.stdin.write(f"{server.peer_id} {server.maddr}\n".encode())
    caller.proc.stdin.flush()
    caller.expect("READY", timeout=30)
    time.sleep(0.5)  # let the call reach the server
    assert_exits_on_sigint(caller)


def assert_exits_on_sigint(child):
    start = time.monotonic()
    child.proc.send_signal(signal.SIGINT)
    try:
        child.proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node process ignored SIGINT for 2 s; log:\n{child.log()}")
    assert time.monotonic() - start < 2.0
    assert "KeyboardInterrupt" in child.log()


def test_closing_a_task_group_cancels_its_tasks_and_only_those():
    with Node(NodeConfig(swarm="lifecycle")) as node:
        mine, other = node.task_group("mine"), node.task_group("other")
        started, cancelled, other_ticks = threading.Event(), threading.Event(), []

        async def worker():
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()

        async def ticker():
            while True:
                other_ticks.append(1)
                await trio.sleep(0.01)
        mine.spawn(worker)
        other.spawn(ticker)
        assert started.wait(5)
        mine.close()
        assert cancelled.wait(5)                      # closing cancels what runs now...
        started.clear()
        mine.spawn(worker)                            # ...and nothing starts in a closed group
        before = len(other_ticks)
        time.sleep(0.2)
        assert len(other_ticks) > before              # the other component's task runs on
        assert not started.is_set()
    mine.close()                                      # closing after the node stopped is harmless


def test_a_dht_sharing_a_node_stops_its_maintenance_when_shut_down():
    from dht import DHT
    with Node(NodeConfig(swarm="lifecycle")) as node:
        dht = DHT(node=node)
        cancelled = threading.Event()

        async def maintenance_like():
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()
        dht.tasks.spawn(maintenance_like)             # a task of the DHT's, like its maintenance loop
        time.sleep(0.2)
        assert not cancelled.is_set()
        dht.shutdown()
        assert cancelled.wait(5) and node.is_running  # its tasks are cancelled; the node is not ours to stop


def test_a_call_whose_nursery_stop_cancels_raises_our_error():
    """A blocking call that runs its own nursery (as a DHT store does) gets P2PError when the node stops
    under it, not a BaseExceptionGroup of Cancelled (which escaped `except Exception` and killed the
    thread of a peer's info publisher with a traceback when the peer shut down)."""
    node = Node(NodeConfig(swarm="lifecycle"))
    entered, outcome = threading.Event(), []

    async def fan_out():
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(trio.sleep_forever)
            entered.set()

    def caller():
        try:
            node.run(fan_out)
        except BaseException as e:  # noqa: BLE001 - the test looks at exactly what escaped
            outcome.append(e)

    t = threading.Thread(target=caller)
    t.start()
    assert entered.wait(5)
    node.stop()
    t.join(timeout=5)
    assert not t.is_alive() and len(outcome) == 1
    assert type(outcome[0]) is P2PError and "node stopped" in str(outcome[0]), repr(outcome[0])
