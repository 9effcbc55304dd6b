"""A process hosting several DHT nodes, driven over stdin/stdout JSON lines (benchmarks, swarm tests).

Start it, read one JSON line, then send one command per line and read one reply line per command::

    python testbed/dht_worker.py --nodes 7 --initial-peers /ip4/127.0.0.1/tcp/4001/p2p/12D3... \\
        --config '{"rpc_timeout": 2.0}'
    -> {"event": "ready", "pid": 123, "impl": "ours", "start_s": 2.1,
        "nodes": [{"index": 0, "peer_id": "12D3...", "addrs": ["/ip4/..."], "client": false}, ...]}
    <- {"id": 1, "cmd": "store", "ops": [{"node": 0, "key": "k", "value": 1, "ttl": 60}], "concurrency": 4}
    -> {"id": 1, "results": [{"ok": true, "ms": 12.3, "error": null}], "elapsed_s": 0.01}

Commands (every one takes an optional ``"timeout"`` in seconds, default ``--timeout``; an op still
running at the deadline is reported as ``{"ok": false, "error": "timeout"}``):

* ``store``: ``ops`` = ``[{"node", "key", "value", "expiration_time" | "ttl", "subkey"?}]``; each result
  ``{"ok": bool (the DHT's answer), "ms", "inner_ms", "error"}``. ``ms`` is measured around the blocking
  call, ``inner_ms`` (ours only, else null) inside the node's trio thread: the difference is the cost of
  getting into and out of that thread.
* ``get``: ``ops`` = ``[{"node", "key", "latest"?}]``; each result ``{"found": bool, "value",
  "expiration_time", "ms", "error"}``. A sub-keyed value comes back as
  ``{"subkeys": {subkey: [value, expiration_time]}}`` (subkeys as strings).
  Ops of one command run concurrently, at most ``concurrency`` at a time (default: one per node).
* ``republish``: ``nodes`` (default all) -> ``{"results": [records republished per node]}`` (ours only).
* ``stats``: ``{"nodes": [{"peer_id", "routing_size", "records", "routing_peers"?}], "pid"}``;
  ``"peers": true`` adds each routing table's peer ids.
* ``peek``: ``keys`` -> ``{"nodes": [{key: what the node holds locally for it, as a get result}]}``
  (ours only; no network).
* ``quit``: shut the nodes down and exit (also what happens when stdin closes).

``--impl hivemind`` hosts ``hivemind.DHT`` nodes instead (each runs in its own child process with a
p2pd daemon, as hivemind always does); run it with the python of the hivemind venv
(``testbed/common.py: ensure_hivemind_venv``). hivemind is imported only then, and our packages only
with ``--impl ours``; this file itself needs only the standard library.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

logger = logging.getLogger("dht_worker")


# ------------------------------------------------------------------------------------------ backends
class OursBackend:
    """Our ``dht.DHT``: every node has its own libp2p host and trio thread, all in this process."""

    name = "ours"

    def __init__(self, args: argparse.Namespace):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from p2p.logs import setup_logging
        setup_logging(args.log_level)
        if args.import_torch:  # what a training peer has loaded anyway (hivemind always imports it)
            import torch  # noqa: F401
        import dht
        self.dht = dht
        self.config = dht.DHTConfig(**json.loads(args.config)) if args.config else dht.DHTConfig()
        self.swarm = args.swarm

    def create(self, initial_peers: list[str], client_mode: bool) -> Any:
        from p2p import NodeConfig
        return self.dht.DHT(initial_peers=initial_peers, config=self.config, start=True, node_config=NodeConfig(
            swarm=self.swarm, host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=client_mode))

    @staticmethod
    def describe(node: Any) -> dict:
        return {"peer_id": node.peer_id, "addrs": node.addrs, "client": node.client_mode}

    def now(self) -> float:
        return self.dht.get_dht_time()

    @staticmethod
    def _timed(node: Any, async_fn, *args: Any, timeout: float) -> tuple[Any, float]:
        """Run ``async_fn`` in the node's trio thread; also returns the ms it took inside that thread."""
        async def timed():
            t0 = time.perf_counter()
            out = await async_fn(*args)
            return out, (time.perf_counter() - t0) * 1000
        return node.node.run(timed, timeout=timeout)

    def store(self, node: Any, key: Any, value: Any, expiration_time: float, subkey: Any,
              timeout: float) -> tuple[bool, float]:
        record = node.make_record(key, value, expiration_time, subkey)
        accepted, inner_ms = self._timed(node, node.astore_many, [record], timeout=timeout)
        return accepted[0], inner_ms

    def get(self, node: Any, key: Any, latest: bool, timeout: float) -> tuple[Any, float]:
        return self._timed(node, node.aget, key, latest, timeout=timeout)

    @staticmethod
    def republish(node: Any, timeout: float) -> int:
        return node.node.run(node.republish, timeout=timeout)

    @staticmethod
    def stats(node: Any, with_peers: bool) -> dict:
        out = {"peer_id": node.peer_id, "routing_size": len(node.routing), "records": len(node.storage)}
        if with_peers:
            out["routing_peers"] = [p.peer_id for p in node.routing.all_peers()]
        return out

    def peek(self, node: Any, key: Any) -> Any:
        """What this node holds locally for ``key`` (no network)."""
        from dht.dht import _to_user_value
        from dht.records import DHTID, serialize
        return _to_user_value(node.storage.get(DHTID.from_key_bytes(serialize(key))))

    @staticmethod
    def shutdown(node: Any) -> None:
        node.shutdown()


def _hivemind_routing(_dht: Any, node: Any) -> list[str]:
    """Runs inside a hivemind DHT process (via ``run_coroutine``): the peer ids of its routing table."""
    return [str(peer_id) for peer_id in node.protocol.routing_table.peer_id_to_uid.keys()]


async def _hivemind_routing_coro(dht: Any, node: Any) -> list[str]:
    return _hivemind_routing(dht, node)


class HivemindBackend:
    """``hivemind.DHT`` nodes (the comparison anchor): loopback only, UPnP off, one child process each."""

    name = "hivemind"

    def __init__(self, args: argparse.Namespace):
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
        import hivemind
        from hivemind.utils import get_dht_time
        self.hivemind, self._now = hivemind, get_dht_time
        self.kwargs = json.loads(args.config) if args.config else {}
        self._locks: dict[int, threading.Lock] = {}

    def create(self, initial_peers: list[str], client_mode: bool) -> Any:
        node = self.hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                 nat_port_map=False, client_mode=client_mode, start=True, **self.kwargs)
        self._locks[id(node)] = threading.Lock()
        return node

    @staticmethod
    def describe(node: Any) -> dict:
        return {"peer_id": str(node.peer_id), "addrs": [str(a) for a in node.get_visible_maddrs()],
                "client": bool(node.client_mode)}

    def now(self) -> float:
        return self._now()

    def store(self, node: Any, key: Any, value: Any, expiration_time: float, subkey: Any,
              timeout: float) -> tuple[bool, None]:
        with self._locks[id(node)]:  # one writer at a time on the pipe to the DHT process
            future = node.store(key, value, expiration_time, subkey=subkey, return_future=True)
        return bool(future.result(timeout=timeout)), None

    def get(self, node: Any, key: Any, latest: bool, timeout: float) -> tuple[Any, None]:
        with self._locks[id(node)]:
            future = node.get(key, latest=latest, return_future=True)
        return future.result(timeout=timeout), None

    @staticmethod
    def republish(node: Any, timeout: float) -> int:
        raise NotImplementedError("hivemind has no republish")

    def stats(self, node: Any, with_peers: bool) -> dict:
        with self._locks[id(node)]:
            future = node.run_coroutine(_hivemind_routing_coro, return_future=True)
        peers = future.result(timeout=10)
        out = {"peer_id": str(node.peer_id), "routing_size": len(peers), "records": None}
        if with_peers:
            out["routing_peers"] = peers
        return out

    @staticmethod
    def shutdown(node: Any) -> None:
        node.shutdown()


# ------------------------------------------------------------------------------------------ worker
def _user_value(found: Any) -> dict:
    """A get result (ours or hivemind's ValueWithExpiration) as JSON."""
    if found is None:
        return {"found": False, "value": None, "expiration_time": None}
    value = found.value
    if isinstance(value, dict) and value and all(hasattr(v, "expiration_time") for v in value.values()):
        # sub-keyed: {subkey: ValueWithExpiration} (a plain msgpack dict can never hold such objects)
        value = {"subkeys": {str(sk): [v.value, v.expiration_time] for sk, v in value.items()}}
    return {"found": True, "value": value, "expiration_time": found.expiration_time}


class Worker:
    """The nodes of this process and the commands that drive them."""

    def __init__(self, backend: Any, nodes: list, default_timeout: float):
        self.backend, self.nodes, self.default_timeout = backend, nodes, default_timeout
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="op")

    def _run_ops(self, ops: list[dict], fn, concurrency: int, timeout: float) -> list[dict]:
        """Run ``fn(op) -> dict`` for every op, at most ``concurrency`` at once, all within ``timeout``."""
        deadline = time.monotonic() + timeout
        gate = threading.Semaphore(max(1, concurrency))
        results: list[dict | None] = [None] * len(ops)

        def one(i: int, op: dict) -> None:
            with gate:
                left = deadline - time.monotonic()
                if left <= 0:
                    results[i] = {"ok": False, "ms": None, "error": "timeout"}
                    return
                t0 = time.perf_counter()
                try:
                    out = fn(op, left)
                    results[i] = {**out, "ms": (time.perf_counter() - t0) * 1000, "error": None}
                except Exception as e:
                    name = type(e).__name__
                    error = "timeout" if "Timeout" in name or "TooSlow" in name else f"{name}: {e}"[:300]
                    results[i] = {"ok": False, "ms": (time.perf_counter() - t0) * 1000, "error": error}

        futures = [self.pool.submit(one, i, op) for i, op in enumerate(ops)]
        wait_futures(futures, timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        return [r if r is not None else {"ok": False, "ms": None, "error": "timeout"} for r in list(results)]

    def _node(self, op: dict) -> Any:
        index = op.get("node", 0)
        if not isinstance(index, int) or not 0 <= index < len(self.nodes):
            raise ValueError(f"node index {index!r} out of range 0..{len(self.nodes) - 1}")
        return self.nodes[index]

    def handle(self, msg: dict) -> dict:
        cmd = msg.get("cmd")
        timeout = float(msg.get("timeout") or self.default_timeout)
        concurrency = int(msg.get("concurrency") or len(self.nodes))
        if cmd == "store":
            def store(op: dict, left: float) -> dict:
                exp = op["expiration_time"] if "expiration_time" in op else self.backend.now() + float(op["ttl"])
                ok, inner_ms = self.backend.store(self._node(op), op["key"], op["value"], exp, op.get("subkey"), left)
                return {"ok": bool(ok), "inner_ms": inner_ms}
            return {"results": self._run_ops(msg.get("ops", []), store, concurrency, timeout)}
        if cmd == "get":
            def get(op: dict, left: float) -> dict:
                found, inner_ms = self.backend.get(self._node(op), op["key"], bool(op.get("latest", False)), left)
                return {"ok": True, **_user_value(found), "inner_ms": inner_ms}
            return {"results": self._run_ops(msg.get("ops", []), get, concurrency, timeout)}
        if cmd == "republish":
            indices = msg.get("nodes") or list(range(len(self.nodes)))
            ops = [{"node": i} for i in indices]
            return {"results": self._run_ops(
                ops, lambda op, left: {"ok": True, "count": self.backend.republish(self._node(op), left)},
                concurrency, timeout)}
        if cmd == "stats":
            with_peers = bool(msg.get("peers"))
            return {"pid": os.getpid(), "nodes": [self.backend.stats(n, with_peers) for n in self.nodes]}
        if cmd == "peek":  # ours only: what each node holds locally for some keys
            return {"nodes": [{key: _user_value(self.backend.peek(n, key)) for key in msg["keys"]} for n in self.nodes]}
        if cmd == "ping":
            return {"pid": os.getpid()}
        raise ValueError(f"unknown command {cmd!r}; use store, get, republish, stats, ping or quit")

    def shutdown(self) -> None:
        for node in self.nodes:
            try:
                self.backend.shutdown(node)
            except Exception as e:
                logger.warning("node shutdown failed: %s", e)


def _start_nodes(backend: Any, args: argparse.Namespace) -> list:
    """Start ``--nodes`` nodes; with no initial peers, node 0 founds the swarm and the rest join it.

    The last ``--client-nodes`` nodes run in client mode. Nodes join concurrently, ``--start-parallel`` at a time.
    """
    initial = list(args.initial_peers)
    kinds = [i >= args.nodes - args.client_nodes for i in range(args.nodes)]
    nodes: list = [None] * args.nodes
    first = 0
    if not initial:
        nodes[0] = backend.create([], kinds[0])
        initial = list(backend.describe(nodes[0])["addrs"])
        first = 1
    with ThreadPoolExecutor(max_workers=max(1, args.start_parallel)) as pool:
        futures = {i: pool.submit(backend.create, initial, kinds[i]) for i in range(first, args.nodes)}
        for i, future in futures.items():
            nodes[i] = future.result()
    return nodes


def _write(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("ours", "hivemind"), default="ours")
    parser.add_argument("--nodes", type=int, default=1, help="DHT nodes hosted by this process")
    parser.add_argument("--client-nodes", type=int, default=0, help="how many of them (the last) are clients")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="full multiaddrs to join through")
    parser.add_argument("--config", default="", help="JSON of DHTConfig fields (hivemind: DHT kwargs)")
    parser.add_argument("--swarm", default="default")
    parser.add_argument("--timeout", type=float, default=60.0, help="default deadline of a command, seconds")
    parser.add_argument("--start-parallel", type=int, default=2, help="nodes joining at once")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--import-torch", action="store_true", help="import torch first, as a training peer does")
    args = parser.parse_args()
    if not 0 <= args.client_nodes <= args.nodes or args.nodes < 1:
        parser.error("need --nodes >= 1 and 0 <= --client-nodes <= --nodes")
    if args.client_nodes == args.nodes and not args.initial_peers:
        parser.error("client nodes need --initial-peers (or at least one server node here)")

    t0 = time.monotonic()
    try:
        backend = HivemindBackend(args) if args.impl == "hivemind" else OursBackend(args)
        nodes = _start_nodes(backend, args)
    except Exception as e:
        logger.exception("worker failed to start")
        _write({"event": "ready", "error": f"{type(e).__name__}: {e}"})
        os._exit(1)
    worker = Worker(backend, nodes, args.timeout)
    _write({"event": "ready", "pid": os.getpid(), "impl": backend.name, "start_s": round(time.monotonic() - t0, 3),
            "nodes": [{"index": i, **backend.describe(n)} for i, n in enumerate(nodes)]})

    for line in sys.stdin:  # EOF (the driver died or closed us) ends the loop
        line = line.strip()
        if not line:
            continue
        rid = None
        try:
            msg = json.loads(line)
            rid = msg.get("id")
            if msg.get("cmd") == "quit":
                _write({"id": rid, "bye": True})
                break
            t1 = time.monotonic()
            reply = worker.handle(msg)
            _write({"id": rid, **reply, "elapsed_s": round(time.monotonic() - t1, 4)})
        except Exception as e:
            _write({"id": rid, "error": f"{type(e).__name__}: {e}"[:1000]})

    # Bounded shutdown: never let a stuck node keep the process alive.
    threading.Timer(15.0, lambda: os._exit(0)).start()
    worker.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
