"""Hole-punch trials between two home networks, for tests/test_nat.py and bench/nat.py.

    python testbed/punch_worker.py listen --relay MADDR --port 4001
    -> {"addrs": [circuit address, ...]}         (then serves an echo RPC until stdin closes)

    python testbed/punch_worker.py dial --relay MADDR --target CIRCUIT_ADDR --attempts 20 --port 4100
    -> {"attempts": 20, "direct": 19, "seconds": [...], "first_call_s": [...], "relayed_ms": ..., "direct_ms": ...}

Both ends are private nodes holding a slot on the relay (the reachability check is skipped: the topology
says they are behind NATs). Each dial attempt is a fresh node on its own listen port (a punched TCP
connection is a 4-tuple; reusing one right after closing it would meet its TIME_WAIT): it calls the target
through the circuit, which starts a hole punch (:meth:`p2p.node.Node._punch`), and reports whether it got a
direct connection, how long that took after the circuit opened, and the echo round trip over each path.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from p2p import Node, NodeConfig  # noqa: E402


async def echo(ctx, args):
    return args


def private_node(relay: str, port: int) -> Node:
    node = Node(NodeConfig(host_maddrs=[f"/ip4/0.0.0.0/tcp/{port}"]))
    node.serve("echo", {"echo": echo})
    node.run(node.become_private, {relay.rsplit("/p2p/", 1)[1]: [relay]}, 10.0)
    return node


def hang_up(node: Node) -> None:
    """Close the node's connections, as its process exiting would (a stopped node's sockets otherwise stay
    open until garbage collection, and the relay would keep this attempt's circuit)."""
    async def close_all():
        network = node.host.libp2p.get_network()
        for peer in list(network.connections):
            await network.close_peer(peer)
    node.run(close_all, timeout=5.0)


def rtt_ms(node: Node, peer: str, n: int = 20) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        node.call_sync(peer, "echo", "echo", b"x" * 1000, timeout=10)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def dial(args) -> dict:
    target = args.target.rsplit("/p2p/", 1)[1]
    out = {"attempts": args.attempts, "direct": 0, "seconds": [], "first_call_s": [], "relayed_ms": None,
           "direct_ms": None}
    for i in range(args.attempts):
        node = private_node(args.relay, args.port + i)
        try:
            node.add_addrs(target, [args.target])
            start = time.perf_counter()
            node.call_sync(target, "echo", "echo", b"first", timeout=10)
            out["first_call_s"].append(round(time.perf_counter() - start, 3))
            if i == 0 and node.host.is_relayed(target):
                out["relayed_ms"] = round(rtt_ms(node, target), 2)   # before the punch completes
            deadline = time.monotonic() + args.wait
            while not node.punches and time.monotonic() < deadline:
                # calls keep working while the punch runs (over the circuit until it succeeds)
                node.call_sync(target, "echo", "echo", b"meanwhile", timeout=10)
                time.sleep(0.05)
            if node.punches and node.punches[0][0]:
                out["direct"] += 1
                out["seconds"].append(round(node.punches[0][1], 3))
                if out["direct_ms"] is None:
                    out["direct_ms"] = round(rtt_ms(node, target), 2)
        finally:
            hang_up(node)
            node.stop()
    out["success_rate"] = out["direct"] / args.attempts
    out["median_s"] = statistics.median(out["seconds"]) if out["seconds"] else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=("listen", "dial"))
    parser.add_argument("--relay", required=True, help="full multiaddr of a public relay")
    parser.add_argument("--target", help="circuit address of the listening peer (dial)")
    parser.add_argument("--attempts", type=int, default=20)
    parser.add_argument("--port", type=int, default=4001, help="listen port (dial: of the first attempt)")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for each punch's outcome")
    args = parser.parse_args()
    if args.role == "listen":
        node = private_node(args.relay, args.port)
        print(json.dumps({"addrs": node.addrs}), flush=True)
        sys.stdin.read()
        node.stop()
    else:
        print(json.dumps(dial(args)), flush=True)


if __name__ == "__main__":
    main()
