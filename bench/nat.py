"""Home peers behind NAT routers: hole punching, expert calls over each path, averaging rounds (issue 13).

    sudo python bench/nat.py --json        (root: network namespaces and iptables; about 4 minutes)

Topology (testbed.netns with home routers): a public bootstrap (the relay), a public expert host and client,
two homes behind port-keeping NATs and one behind a port-randomising NAT. Every peer is started plainly: each
finds out by itself whether it is reachable.

* ``punch``: DCUtR attempts between the two port-keeping homes (testbed/punch_worker.py, a fresh dialer each):
  the share that ended on a direct connection and the median time from the circuit to it;
* ``expert``: forward+backward of a 4-expert remote MoE layer (testbed/moe_worker.py, batch ``--batch``,
  hidden ``--hidden``, k=2) with the client reaching the host ``direct`` (both public), ``punched`` (host and
  client in the two port-keeping homes) and ``relayed`` (client in the port-randomising home: punching
  cannot work, every call goes through the relay);
* ``averaging``: median time of a 4-trainer DiLoCo round (``python -m peer --train``) with all trainers public
  against three of them in homes (two port-keeping, one randomising).

The last line is one JSON object: ``punch: {attempts, success_rate, median_s}``, ``expert: {direct, punched,
relayed}`` each ``{fwd_bwd_ms, samples_per_s}``, ``averaging: {all_public_s, three_private_s}``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed.common import Worker  # noqa: E402
from testbed.nat_swarm import NatSwarm, punch_trials  # noqa: E402

WORKER = str(REPO / "testbed" / "moe_worker.py")
ROUND = re.compile(r"Averaging step \d+: ok with 4 peers in ([\d.]+)s")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def expert_paths(swarm: NatSwarm, args, tmp: Path) -> dict:
    """Hosts: public (host 1) and home (host 3); clients: public (2), port-keeping home (4), randomising (5)."""
    join = swarm.join[1:]
    common = [sys.executable, WORKER, "--hidden", str(args.hidden), "--log-level", "WARNING"]
    servers = {}
    for host, prefix in ((1, "pub"), (3, "home")):
        argv = swarm.topo.command(host, [*common, "--role", "server", "--listen", "/ip4/0.0.0.0/tcp/4001",
                                         "--uids", *[f"{prefix}.{e}" for e in range(4)], "--initial-peers", *join])
        servers[prefix] = Worker(argv, tmp / f"server-{prefix}.log")
    out = {}
    try:
        for worker in servers.values():
            worker.wait_ready(180)
        for path, host, prefix in (("direct", 2, "pub"), ("punched", 4, "home"), ("relayed", 5, "home")):
            argv = swarm.topo.command(host, [*common, "--log-level", "INFO", "--role", "client",
                                             "--listen", "/ip4/0.0.0.0/tcp/4002",
                                             "--grid", "4", "--prefix", prefix, "--initial-peers", *join])
            client = Worker(argv, tmp / f"client-{path}.log")
            try:
                client.wait_ready(180)
                time.sleep(2.0)   # the first calls open a circuit and (where it can) punch; let that settle
                client.request("bench", timeout=300, batch=args.batch, k=2, steps=10, warmup=2)
                reply = client.request("bench", timeout=300, batch=args.batch, k=2, steps=args.steps, warmup=0)
            finally:
                client.close()
            median = statistics.median(reply["ms"]) if reply["ms"] else None
            out[path] = {"fwd_bwd_ms": round(median, 2) if median else None,
                         "samples_per_s": round(args.batch * 1000 / median, 1) if median else None,
                         "failures": reply["failures"]}
            log(f"expert {path}: {out[path]}")
    finally:
        for worker in servers.values():
            worker.close()
    return out


def averaging_round(kinds: list[str], samples: int, tmp: Path) -> float | None:
    """Median round time of four trainers (hosts 2..5 of ``kinds``) with an expert host on host 1."""
    tmp.mkdir(parents=True, exist_ok=True)
    with NatSwarm(kinds, tmp) as swarm:
        swarm.start(0, "boot")
        swarm.start(1, "experts", *swarm.join, "--experts", "16", "--device", "cpu").wait_for("Hosting 16", 120)
        trainers = [swarm.start(2 + i, f"trainer{i}", *swarm.join, "--train", "--local-steps", "5",
                                "--max-samples", str(samples * 2 if i == 0 else samples), "--shard", f"{i}/4")
                    for i in range(4)]
        for t in trainers:
            t.wait_for("Finished:", 600)
        times = [float(s) for s in ROUND.findall(trainers[1].log())]
    log(f"averaging {kinds[2:]}: rounds {times}")
    return round(statistics.median(times), 3) if times else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON summary as the last line (always done)")
    parser.add_argument("--attempts", type=int, default=20, help="hole-punch attempts")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="measured expert steps per path")
    parser.add_argument("--samples", type=int, default=240, help="samples per trainer in the averaging runs")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-nat-"))
    log(f"logs in {tmp}")
    kinds = ["public", "public", "public", "keep", "keep", "random"]
    with NatSwarm(kinds, tmp / "paths", swarm="default") as swarm:   # the swarm moe_worker joins
        swarm.start(0, "boot")
        trials = punch_trials(swarm, 3, 4, attempts=args.attempts)
        log(f"punch: {trials}")
        expert = expert_paths(swarm, args, tmp / "paths")
    result = {
        "punch": {"attempts": trials["attempts"], "success_rate": trials["success_rate"],
                  "median_s": trials["median_s"]},
        "expert": expert,
        "averaging": {"all_public_s": averaging_round(["public"] * 6, args.samples, tmp / "avg-public"),
                      "three_private_s": averaging_round(kinds, args.samples, tmp / "avg-private")},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
