"""A process in the MoE benchmark: an expert server or a training client, ours or hivemind's.

Driven over stdin/stdout JSON lines (see :class:`testbed.common.Worker`)::

    python testbed/moe_worker.py --impl ours --role server --uids expert.0 expert.1 --hidden 1024 \\
        [--initial-peers MADDR ...] [--threads N]
    -> {"event": "ready", "pid": 123, "peer_id": "12D3...", "addrs": ["/ip4/127.0.0.1/tcp/..."]}
    <- {"id": 1, "cmd": "stats"}                         -> {"id": 1, "stats": {...}}

    python testbed/moe_worker.py --impl ours --role client --initial-peers MADDR --hidden 1024 --grid 4
    <- {"id": 1, "cmd": "bench", "batch": 32, "k": 2, "steps": 30, "warmup": 5}
    -> {"id": 1, "ms": [fwd+bwd milliseconds of each measured step], "failures": 0}

``quit`` (or closing stdin) stops the process. ``--impl hivemind`` must run under the python of the
hivemind venv (``testbed/common.py: ensure_hivemind_venv``); hivemind is imported only then and our
packages only with ``--impl ours``. Everything binds to 127.0.0.1; hivemind's UPnP is off.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def reply(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def bench_loop(moe: Any, torch: Any, batch: int, hidden: int, steps: int, warmup: int) -> dict:
    """Time ``steps`` forward+backward passes of ``moe`` on random ``[batch, hidden]`` inputs."""
    torch.manual_seed(0)
    times, failures = [], 0
    for step in range(warmup + steps):
        x = torch.randn(batch, hidden, requires_grad=True)
        start = time.perf_counter()
        try:
            y = moe(x)
            y.pow(2).mean().backward()
        except Exception as e:  # reported, not fatal: the benchmark counts failed steps
            failures += 1
            print(f"step {step} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return {"ms": times, "failures": failures}


# ------------------------------------------------------------------------------------------ ours
def ours_server(args: argparse.Namespace) -> tuple[dict, Any, Any]:
    sys.path.insert(0, REPO_ROOT)
    from p2p import NodeConfig, setup_logging
    setup_logging(args.log_level)
    from dht import DHT
    from peer.hosting.config import HostingConfig
    from peer.hosting.server import ExpertServer, create_experts
    import torch
    dht = DHT(initial_peers=args.initial_peers,
              node_config=NodeConfig(host_maddrs=[args.listen] if args.listen else LOOPBACK))
    optimizer = lambda params: torch.optim.Adam(params, lr=1e-3, fused=args.optimizer == "adam-fused")  # noqa: E731
    experts = create_experts("ffn", args.uids, args.hidden, device=args.device, optimizer_factory=optimizer)
    server = ExpertServer(dht, experts, HostingConfig(batch_window_ms=args.batch_window_ms))

    def handle(cmd: dict) -> dict:
        if cmd["cmd"] == "stats":
            return {"stats": server.stats}
        raise ValueError(f"unknown command {cmd['cmd']!r}")

    def close() -> None:
        server.shutdown()
        dht.shutdown()
    return {"peer_id": dht.peer_id, "addrs": dht.addrs}, handle, close


def ours_client(args: argparse.Namespace) -> tuple[dict, Any, Any]:
    sys.path.insert(0, REPO_ROOT)
    from p2p import NodeConfig, setup_logging
    setup_logging(args.log_level)
    import torch
    from dht import DHT
    from peer.moe.remote import RemoteMixtureOfExperts
    dht = DHT(initial_peers=args.initial_peers,
              node_config=NodeConfig(host_maddrs=[args.listen]) if args.listen else NodeConfig(client_mode=True))
    layers: dict[int, Any] = {}

    def handle(cmd: dict) -> dict:
        if cmd["cmd"] != "bench":
            raise ValueError(f"unknown command {cmd['cmd']!r}")
        if cmd["k"] not in layers:
            layers[cmd["k"]] = RemoteMixtureOfExperts(args.hidden, (args.grid,), dht, args.prefix, k_best=cmd["k"],
                                                      k_min=1, on_failure="mask")
        moe = layers[cmd["k"]]
        result = bench_loop(moe, torch, cmd["batch"], args.hidden, cmd["steps"], cmd["warmup"])
        return {**result, "lookups": moe.directory.lookups}
    return {"peer_id": dht.peer_id}, handle, dht.shutdown


# ------------------------------------------------------------------------------------------ hivemind
def hivemind_server(args: argparse.Namespace) -> tuple[dict, Any, Any]:
    from functools import partial

    import torch
    from hivemind.moe.server import Server
    optimizer = partial(torch.optim.Adam, lr=1e-3, fused=args.optimizer == "adam-fused")
    server = Server.create(expert_uids=args.uids, expert_cls="ffn", hidden_dim=args.hidden, start=True,
                           optim_cls=optimizer,
                           device=args.device or "cpu", host_maddrs=LOOPBACK, nat_port_map=False,
                           initial_peers=args.initial_peers)
    addrs = [str(a) for a in server.dht.get_visible_maddrs()]

    def handle(cmd: dict) -> dict:
        raise ValueError(f"unknown command {cmd['cmd']!r}")

    def close() -> None:
        server.shutdown()
    return {"peer_id": str(server.dht.peer_id), "addrs": addrs}, handle, close


def hivemind_client(args: argparse.Namespace) -> tuple[dict, Any, Any]:
    import hivemind
    import torch
    dht = hivemind.DHT(start=True, host_maddrs=LOOPBACK, nat_port_map=False, initial_peers=args.initial_peers,
                       client_mode=True)

    layers: dict[int, Any] = {}

    def handle(cmd: dict) -> dict:
        if cmd["cmd"] != "bench":
            raise ValueError(f"unknown command {cmd['cmd']!r}")
        if cmd["k"] not in layers:
            layers[cmd["k"]] = hivemind.RemoteMixtureOfExperts(in_features=args.hidden, grid_size=(args.grid,),
                                                               dht=dht, uid_prefix="expert.", k_best=cmd["k"],
                                                               k_min=1)
        return bench_loop(layers[cmd["k"]], torch, cmd["batch"], args.hidden, cmd["steps"], cmd["warmup"])
    return {"peer_id": str(dht.peer_id)}, handle, dht.shutdown


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=("ours", "hivemind"), default="ours")
    parser.add_argument("--role", choices=("server", "client"), required=True)
    parser.add_argument("--uids", nargs="*", default=[])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--grid", type=int, default=4, help="experts in the (1-D) grid, client only")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--listen", default=None, help="listen multiaddr (default: loopback; a client: none)")
    parser.add_argument("--prefix", default="expert", help="uid prefix of the experts a client calls")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--batch-window-ms", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=("adam", "adam-fused"), default="adam-fused",
                        help="the experts' optimizer (lr 1e-3), servers only")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    try:
        setup = {("ours", "server"): ours_server, ("ours", "client"): ours_client,
                 ("hivemind", "server"): hivemind_server, ("hivemind", "client"): hivemind_client}
        info, handle, close = setup[(args.impl, args.role)](args)
    except Exception as e:
        reply({"event": "ready", "error": f"{type(e).__name__}: {e}"})
        raise
    reply({"event": "ready", "pid": os.getpid(), "impl": args.impl, "start_s": round(time.monotonic() - start, 2),
           **info})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("cmd") == "quit":
                break
            try:
                reply({"id": cmd.get("id"), **handle(cmd)})
            except Exception as e:
                reply({"id": cmd.get("id"), "error": f"{type(e).__name__}: {e}"})
    finally:
        close()


if __name__ == "__main__":
    main()
