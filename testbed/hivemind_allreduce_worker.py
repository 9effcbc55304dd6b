"""One hivemind 1.1.12 averaging peer per process: the anchor for bench/allreduce.py.

Runs ONLY inside ``.venv-hivemind`` (hivemind cannot share an environment with py-libp2p); it imports
nothing of ours. Same command-line contract as ``testbed/avg_worker.py`` (the flags the benchmark uses):
prints ``{"peer_id", "addrs"}``, waits for a line on stdin (``--start-at -1``), runs ``--rounds`` steps
printing one JSON line each, saves the tensor to ``--out`` (torch.save) and prints ``{"done": true}``.

The tensor is ``torch.randn(size, generator=Generator().manual_seed(seed))`` exactly as in
avg_worker.py (same torch version in both venvs), so the driver can compute the exact mean.

Each step runs with ``require_trigger=True``: we wait until hivemind's matchmaking has formed the
group (stage AWAITING_TRIGGER), note the time, and allow the all-reduce at once, so the step splits
into ``matchmaking_s`` and ``allreduce_s`` like ours.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--initial-peers", nargs="*", default=[])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--compression", default="none", choices=["none", "fp16", "int8"])
    p.add_argument("--bandwidth", type=float, default=None, help="declared bandwidth (hivemind units), optional")
    p.add_argument("--matchmaking-time", type=float, default=5.0)
    p.add_argument("--start-at", type=float, default=-1)
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import hivemind
    from hivemind.averaging.control import AveragingStage
    from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

    compression = {"none": NoCompression, "fp16": Float16Compression, "int8": Uniform8BitQuantization}[args.compression]()
    tensor = torch.randn(args.size, generator=torch.Generator().manual_seed(args.seed))
    dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{args.host}/tcp/0"], nat_port_map=False,
                       initial_peers=args.initial_peers)
    avg = hivemind.DecentralizedAverager([tensor], dht, start=True, prefix="bench", target_group_size=args.group,
                                         min_group_size=2, compression=compression, next_chunk_timeout=5,
                                         allreduce_timeout=120, min_matchmaking_time=args.matchmaking_time,
                                         bandwidth=args.bandwidth)
    print(json.dumps({"peer_id": str(dht.peer_id), "addrs": [str(a) for a in dht.get_visible_maddrs()]}),
          flush=True)
    if args.start_at < 0:
        sys.stdin.readline()
    time.sleep(max(0.0, args.start_at - time.time()))
    for r in range(args.rounds):
        t0 = time.perf_counter()
        line = {"round": r}
        try:
            control = avg.step(weight=1.0, require_trigger=True, wait=False)
            while control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP) and not control.done():
                time.sleep(0.001)
            t_group = time.perf_counter()
            control.allow_allreduce()
            gathered = control.result(timeout=300)
            t1 = time.perf_counter()
            line.update(ok=gathered is not None, group_size=len(gathered or {}), duration=t1 - t0,
                        matchmaking_s=t_group - t0, allreduce_s=t1 - t_group)
        except Exception as e:  # report, keep going: the driver decides what a failed round means
            line.update(ok=False, error=f"{type(e).__name__}: {e}", duration=time.perf_counter() - t0)
        print(json.dumps(line), flush=True)
        if r + 1 < args.rounds:
            time.sleep(args.pause)
    if args.out:
        with avg.get_tensors() as tensors:
            torch.save(tensors[0].clone(), args.out)
    print(json.dumps({"done": True}), flush=True)
    avg.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
