"""One averaging peer of a fault trial (testbed/fault_trials.py), driven over stdin/stdout JSON lines.

Start it, read its ready line, then send one ``round`` request per averaging round::

    python testbed/trial_worker.py --seed 3 --weight 2 --size 1048576 --initial-peers /ip4/...
    -> {"peer_id": "12D3...", "addrs": [...], "step_timeout": 14.2, "pid": 123}
    <- {"id": 1, "cmd": "round", "round": 5, "peers": {"12D3...": [3, 2.0], ...}}
    -> {"id": 1, "ok": true, "contributors": [...], "max_err": 3e-7, "digest": "ab12...", "wall": 1.9, ...}

In round ``r`` a peer of seed ``s`` contributes ``randn(size)`` drawn from generator seed ``s * 1_000_003 + r``
with its ``--weight``; ``peers`` tells it every peer's seed and weight, so it checks its own outcome
against the contract of :meth:`averaging.Averager.step` without moving any tensor to the driver:

* ``ok``: ``max_err`` is the largest difference from the contributors' weighted mean (``bounds_err``: how far
  outside the contributors' element-wise min..max, for robust rounds) and ``digest`` hashes the result,
  so the driver checks that every member holds the same bits;
* not ``ok``: ``unchanged`` says whether the tensor still holds our contribution;
* ``exception``: what escaped ``step()`` (a violation), with its traceback in the log.

``--bootstrap`` runs only a DHT node (the swarm's entry point), never faulted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's packages first

from averaging import Averager, AveragerConfig  # noqa: E402
from averaging.averager import step_timeout  # noqa: E402
from dht import DHT  # noqa: E402
from p2p import NodeConfig, setup_logging  # noqa: E402


def contribution(seed: int, round_no: int, size: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + round_no))


def check(tensor: torch.Tensor, contributors: list[str], peers: dict, round_no: int) -> dict:
    """How far ``tensor`` is from the weighted mean of ``contributors`` (and from their min..max)."""
    unknown = [p for p in contributors if p not in peers]
    if unknown or not contributors:
        return {"max_err": None, "bounds_err": None, "unknown_contributors": unknown}
    total = sum(float(peers[p][1]) for p in contributors)
    mean = torch.zeros(tensor.numel(), dtype=torch.float64)
    low = high = None
    for p in contributors:
        x = contribution(int(peers[p][0]), round_no, tensor.numel())
        mean += x.double() * (float(peers[p][1]) / total)
        low = x.clone() if low is None else torch.minimum(low, x)
        high = x.clone() if high is None else torch.maximum(high, x)
    bounds = torch.clamp(low - tensor, min=0).max().item(), torch.clamp(tensor - high, min=0).max().item()
    return {"max_err": (tensor.double() - mean).abs().max().item(), "bounds_err": max(bounds)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--initial-peers", nargs="*", default=[])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--bootstrap", action="store_true", help="only a DHT node")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--min-group", type=int, default=2)
    p.add_argument("--matchmaking-time", type=float, default=2.0)
    p.add_argument("--compression", default="none")
    p.add_argument("--error-feedback", action="store_true")
    p.add_argument("--clip-tau", type=float, default=None)
    p.add_argument("--client-mode", action="store_true")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args()
    setup_logging(args.log_level)
    dht = DHT(initial_peers=args.initial_peers, node_config=NodeConfig(
        host_maddrs=[f"/ip4/{args.host}/tcp/0"], client_mode=args.client_mode))
    ready = {"peer_id": dht.peer_id, "addrs": dht.addrs, "pid": os.getpid()}
    averager = None
    if not args.bootstrap:
        tensor = torch.zeros(args.size)
        averager = Averager([tensor], dht, "trial", AveragerConfig(
            target_group_size=args.group, min_group_size=args.min_group, matchmaking_time=args.matchmaking_time,
            compression=args.compression, error_feedback=args.error_feedback, clip_tau=args.clip_tau))
        ready["step_timeout"] = step_timeout(averager.config, averager.round_config, args.size,
                                             averager.matchmaker.deadlines)
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("cmd") == "quit":
            break
        reply: dict = {"id": request.get("id")}
        if request.get("cmd") == "round" and averager is not None:
            round_no, peers = int(request["round"]), request["peers"]
            tensor.copy_(contribution(args.seed, round_no, args.size))
            before = tensor.clone()
            started = time.monotonic()
            try:
                res = averager.step(weight=args.weight)
            except BaseException as e:  # a violation: step() promises a result object
                traceback.print_exc()
                reply.update(exception=f"{type(e).__name__}: {e}", wall=time.monotonic() - started)
            else:
                reply.update(ok=res.ok, reason=res.reason, peers=res.peers, excluded=res.excluded,
                             contributors=res.contributors, timeline=res.timeline,
                             wall=time.monotonic() - started, matchmaking_s=res.matchmaking_s)
                if res.ok:
                    reply["digest"] = hashlib.sha256(tensor.numpy().tobytes()).hexdigest()[:16]
                    reply.update(check(tensor, res.contributors, peers, round_no))
                else:
                    reply["unchanged"] = bool(torch.equal(tensor, before))
        print(json.dumps(reply), flush=True)
    if averager is not None:
        averager.shutdown(timeout=0)
    dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
