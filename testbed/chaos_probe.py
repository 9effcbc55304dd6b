"""The chaos run's observer: a client-mode DHT peer that reports what the swarm looks like, every few seconds.

``bench/chaos.py`` starts it in its own network namespace; it never stores anything and is never a
replica, so what it finds is what any newcomer would find. Each round it prints one JSON line::

    {"t0": ..., "t1": ...,                               # time.monotonic() when the round began / ended
     "experts": {peer_id: n_uids},                       # live expert declarations (layer root keys)
     "missing_experts": [uid, ...],                      # expert UIDs of the model nobody declares
     "state": {peer_id: step},                           # trainers' state offers (<prefix>.state)
     "progress": {peer_id: {"step", "samples", "t"}},    # trainers' progress records (<prefix>.progress)
     "ping": {peer_id: rtt_s or null},                   # a DHT ping to every peer of --peers
     "metrics": {peer_id: {"samples", "train_loss", ...} or null}}   # --metrics-port of the trainers

``time.monotonic()`` is one clock for every process of the machine (network namespaces do not change
it), so the driver can lay these rounds on its own fault timeline.

Run by hand (from inside the swarm's network)::

    python testbed/chaos_probe.py --initial-peers /ip4/198.18.7.1/tcp/31337/p2p/12D3KooW... --swarm chaos \\
        --peers '{"12D3KooW...": "/ip4/198.18.7.2/tcp/31337/p2p/12D3KooW..."}' --interval 3
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's packages first


@functools.lru_cache(maxsize=None)
def docker_module(name: str):
    """``docker/<name>.py`` as a module (``import docker`` would find the Docker SDK package instead)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"swarmtrain_docker_{name}", REPO / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


#: trainer gauges of peer.app.roles.Metrics that the driver reads (name in the report -> Prometheus name)
GAUGES = {"samples": "swarmtrain_samples", "train_loss": "swarmtrain_train_loss",
          "averaging_ok": "swarmtrain_averaging_rounds_ok", "averaging_failed": "swarmtrain_averaging_rounds_failed"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python testbed/chaos_probe.py", description=__doc__.splitlines()[0])
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="full multiaddrs to join through")
    p.add_argument("--swarm", required=True, help="swarm name of the peers")
    p.add_argument("--model", default="tiny", help="model preset the trainers train (default: %(default)s)")
    p.add_argument("--peers", required=True, help="JSON {peer_id: full multiaddr} of every peer to ping")
    p.add_argument("--metrics", default="{}", help="JSON {peer_id: http://host:port/metrics} to scrape")
    p.add_argument("--interval", type=float, default=3.0, help="seconds between rounds (default: %(default)s)")
    return p


def scrape(url: str, timeout: float) -> dict | None:
    """The trainer gauges at ``url``, or None if it does not answer within ``timeout``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode(errors="replace")
    except OSError:
        return None
    gauge_value = docker_module("healthcheck").gauge_value   # the compose healthcheck's own parser
    return {name: gauge_value(text, metric) for name, metric in GAUGES.items()}


def probe_round(dht, args, peers: dict[str, str], metrics: dict[str, str]) -> dict:
    """One observation of the swarm (see the module docstring); every part has a deadline."""
    import trio

    from dht.routing import PeerInfo
    from peer.config import ModelConfig
    from peer.swarm_state import expert_hosts, state_offers, training_prefix, training_progress

    t0 = time.monotonic()
    report: dict = {"t0": t0, "experts": None, "state": None, "progress": None, "errors": []}
    config = ModelConfig.preset(args.model)
    roots = [f"{config.uid_prefix(layer)}." for layer in range(config.n_layer)]
    prefix = training_prefix(args.swarm, args.model, "diloco")
    keys = [*roots, f"{prefix}.progress", f"{prefix}.state"]
    try:
        found = dht.node.run(dht.aget_many, keys, True, timeout=15.0)
        hosts = expert_hosts(found, config)
        report["experts"] = {h["peer_id"]: h["experts"] for h in hosts["hosts"]}
        report["missing_experts"] = hosts["missing"]
        report["state"] = {row["peer_id"]: row["step"] for row in state_offers(found.get(keys[-1]))}
        report["progress"] = {row["peer_id"]: {"step": row["step"], "samples": row["samples"], "t": row["t"]}
                              for row in training_progress(found.get(keys[-2]))}
    except Exception as e:  # a lookup past its deadline: reported, the driver decides what it means
        report["errors"].append(f"lookup: {type(e).__name__}: {e}")

    async def ping_all() -> dict:
        rtts: dict = {}

        async def one(peer_id: str, maddr: str) -> None:
            for _attempt in range(2):     # like DHT.bootstrap: a busy peer may miss one deadline
                started = trio.current_time()
                if await dht.protocol.ping(PeerInfo.from_peer_id(peer_id, (maddr,))) is not None:
                    rtts[peer_id] = round(trio.current_time() - started, 4)
                    return
            rtts[peer_id] = None

        async with trio.open_nursery() as nursery:
            for peer_id, maddr in peers.items():
                nursery.start_soon(one, peer_id, maddr)
        return rtts

    try:
        report["ping"] = dht.node.run(ping_all, timeout=4 * dht.config.rpc_timeout)
    except Exception as e:
        report["ping"] = {}
        report["errors"].append(f"ping: {type(e).__name__}: {e}")
    report["metrics"] = {peer_id: scrape(url, timeout=2.0) for peer_id, url in metrics.items()}
    report["t1"] = time.monotonic()
    return report


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dht import DHT
    from p2p import NodeConfig, setup_logging

    setup_logging("WARNING")
    peers, metrics = json.loads(args.peers), json.loads(args.metrics)
    dht = DHT(initial_peers=args.initial_peers,
              node_config=NodeConfig(swarm=args.swarm, host_maddrs=["/ip4/0.0.0.0/tcp/0"], client_mode=True))
    try:
        print(json.dumps({"ready": True, "peer_id": dht.peer_id}), flush=True)
        while True:
            started = time.monotonic()
            print(json.dumps(probe_round(dht, args, peers, metrics)), flush=True)
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    finally:
        dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
