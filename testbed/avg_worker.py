"""One averaging peer in its own process, for tests and benchmarks.

Joins the swarm, waits until ``--start-at`` (unix time) so that all peers step together, runs
``--rounds`` averaging steps and prints one JSON line per step, then saves its tensor (``--out``,
torch.save) and prints ``{"done": true}``. The tensor is ``--size`` float32 elements equal to
``--value`` (or random with ``--seed``); ``--nan`` poisons it so the peer's contributions must be
rejected by the others. ``--garbage`` makes a Byzantine peer: its tensor is fine (so its own checks pass)
but every chunk it sends, contributions and reduced results alike, is NaN.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's packages first

from averaging import Averager, AveragerConfig
from dht import DHT
from p2p import NodeConfig, setup_logging


class NaNSender:
    """Wraps a compression so that everything it encodes is NaN (decoding is left alone)."""

    def __init__(self, inner):
        self.inner = inner

    def compress(self, values: torch.Tensor):
        return self.inner.compress(torch.full_like(values, float("nan")))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--initial-peers", nargs="*", default=[])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--value", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--min-group", type=int, default=2)
    p.add_argument("--compression", default="none")
    p.add_argument("--bandwidth", type=float, default=None, help="declared MB/s (default: none declared)")
    p.add_argument("--matchmaking-time", type=float, default=2.0)
    p.add_argument("--chunk-timeout", type=float, default=None)
    p.add_argument("--start-at", type=float, default=0.0, help="unix time to start; -1: wait for a line on stdin")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between rounds")
    p.add_argument("--nan", action="store_true")
    p.add_argument("--garbage", action="store_true", help="send NaN in every chunk (a Byzantine peer)")
    p.add_argument("--ban-seconds", type=float, default=600.0)
    p.add_argument("--max-abs-value", type=float, default=None, help="contributions beyond this are banned")
    p.add_argument("--scale", type=float, default=1.0, help="multiply our contribution (a Byzantine peer)")
    p.add_argument("--clip-tau", type=lambda v: v if v == "auto" else float(v), default=None,
                   help="CenteredClip radius (robust rounds), or auto")
    p.add_argument("--secure", action="store_true", help="AveragerConfig(secure_aggregation=True)")
    p.add_argument("--client-mode", action="store_true")
    p.add_argument("--error-feedback", action="store_true", help="AveragerConfig(error_feedback=True)")
    p.add_argument("--no-bulk", action="store_true", help="no bulk data plane: all data on libp2p streams")
    p.add_argument("--same-contribution", action="store_true",
                   help="every round contributes the original tensor again; --out saves the mean of the results")
    p.add_argument("--out", default=None)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args()
    setup_logging(args.log_level)

    if args.value is not None:
        tensor = torch.full((args.size,), args.value)
    else:
        tensor = torch.randn(args.size, generator=torch.Generator().manual_seed(args.seed))
    tensor *= args.scale
    if args.nan:
        tensor[::7] = float("nan")
    dht = DHT(initial_peers=args.initial_peers, node_config=NodeConfig(
        host_maddrs=[f"/ip4/{args.host}/tcp/0"], client_mode=args.client_mode, bulk_port=None if args.no_bulk else 0))
    averager = Averager([tensor], dht, "bench", AveragerConfig(
        target_group_size=args.group, min_group_size=args.min_group, compression=args.compression,
        bandwidth=args.bandwidth, matchmaking_time=args.matchmaking_time, chunk_timeout=args.chunk_timeout,
        clip_tau=args.clip_tau, ban_seconds=args.ban_seconds, max_abs_value=args.max_abs_value,
        error_feedback=args.error_feedback, secure_aggregation=args.secure))
    if args.garbage:
        averager.round_config = dataclasses.replace(averager.round_config, compression=NaNSender(averager.compression))
    print(json.dumps({"peer_id": dht.peer_id, "addrs": dht.addrs, "reachability": dht.node.reachability}), flush=True)
    if args.start_at < 0:
        sys.stdin.readline()
    time.sleep(max(0.0, args.start_at - time.time()))
    results_n = 0
    if args.same_contribution:  # only then: two more copies of a big tensor would weigh on the PSS we measure
        original, results_sum = tensor.clone(), torch.zeros_like(tensor)
    for r in range(args.rounds):
        t0 = time.time()
        if args.same_contribution:
            tensor.copy_(original)
        try:
            res = averager.step(weight=args.weight)
            line = {"round": r, "ok": res.ok, "group_size": res.group_size, "duration": res.duration,
                    "matchmaking_s": res.matchmaking_s, "allreduce_s": res.allreduce_s,
                    "bytes_sent": res.bytes_sent, "bytes_received": res.bytes_received, "excluded": res.excluded,
                    "repaired": res.repaired_parts, "reason": res.reason, "peers": res.peers,
                    "contributors": res.contributors, "observed_weights": res.observed_weights,
                    "witnesses": res.witnesses,
                    "banned": averager.bans.banned()}
        except ValueError as e:
            line = {"round": r, "ok": False, "error": str(e), "duration": time.time() - t0}
        line["wall"] = time.time() - t0
        if args.same_contribution and line["ok"]:
            results_sum += tensor
            results_n += 1
        print(json.dumps(line), flush=True)
        if r + 1 < args.rounds:
            time.sleep(args.pause)
    if args.out:
        torch.save(results_sum / max(results_n, 1) if args.same_contribution else tensor, args.out)
    print(json.dumps({"done": True}), flush=True)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
