"""What differential privacy costs the standard run: held-out loss at epsilon ~8 and ~2 against no DP.

``python bench/privacy.py [--trainers 4] [--samples 800] [--local-steps 13] [--clip 1.0] [--epsilons 8 2] --json``

Each run is a fresh local swarm of real ``python -m peer`` processes (:func:`bench.train.run_swarm`: a
bootstrap and two expert hosts), the DiLoCo run of ``bench/train.py`` with its defaults. The DP runs add
``--dp-clip C --dp-epsilon E --dp-delta 1e-5``: every trainer solves the noise for the rounds its
``--max-samples`` plans, and stops early if retried rounds spend the budget sooner. Every epsilon printed
is what each trainer's accountant (dp-accounting, RDP) reported in its log when it finished — never the
target it was asked for.

The last line is one JSON object: ``{"no_dp": {"loss"}, "dp": [{"epsilon", "delta", "loss", "noise",
"rounds", "target_epsilon"}, ...], "plain_round_s", "secure_round_s", ...}``. ``loss`` is the mean of the
trainers' final held-out losses; ``epsilon`` the largest any trainer reached, ``rounds`` the rounds each
counted. ``plain_round_s`` and ``secure_round_s``: the median all-reduce time (matchmaking excluded) of
``--rounds`` rounds of ``--group`` real averaging processes (``testbed/avg_worker.py``) over a buffer the size of
the model's dense parameters, plain (``--round-compression``, default none) and with secure aggregation
(masked, 4 bytes an element), run one after the other in this process; ``secure_ratio`` is their ratio, and
``secure_ratio_by_numel`` the same for ``--round-numel`` buffers too (default: 2M elements, where masking
costs more than the network on loopback). ``secure``: the no-DP swarm again with ``--secure-aggregation 1
--compression none``, its loss and the trainers' mean step.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.train import run_swarm, summary  # noqa: E402
from dht import DHT  # noqa: E402
from tests.avg_group import go, start_peers, stop  # noqa: E402

ROUND = re.compile(r"Averaging step \d+: ok with \d+ peers in ([\d.]+)s")
PRIVACY = re.compile(r"Privacy: epsilon ([\d.]+) at delta ([\d.e-]+) over (\d+) rounds \(noise ([\d.]+) x clip")


def round_times(tmp: Path, size: int, group: int, rounds: int, compression: str, secure: bool) -> list[float]:
    """All-reduce seconds of each successful round of ``group`` worker processes averaging ``size`` floats."""
    spec = dict(size=size, group=group, matchmaking_time=3, rounds=rounds, pause=0.3, compression=compression,
                secure=secure, max_abs_value=10.0)
    bootstrap = DHT()
    peers = start_peers(bootstrap.addrs[0], tmp, [dict(spec, seed=i) for i in range(group)])
    try:
        go(peers)
        lines = [line for p in peers for line in p.results(60 + 10 * rounds)]
    finally:
        stop(peers)
        bootstrap.shutdown()
    return [line["allreduce_s"] for line in lines if line["ok"]]


def dense_numel(model: str = "tiny") -> int:
    """Elements of what trainers average: the model's dense (non-expert) parameters."""
    from peer.config import ModelConfig
    from peer.training.model import MoETransformer
    return sum(t.numel() for t in MoETransformer(ModelConfig.preset(model)).dense_parameters())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", type=int, default=4)
    p.add_argument("--samples", type=int, default=800, help="samples per trainer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=13, help="DiLoCo inner steps (default: %(default)s)")
    p.add_argument("--compression", default="int4", choices=["none", "fp16", "int8", "int4"])
    p.add_argument("--clip", type=float, default=1.0, help="--dp-clip of the DP runs (default: %(default)s)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0], help="target epsilon of each DP run")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    p.add_argument("--round-compression", default="none", choices=["none", "fp16", "int8", "int4"],
                   help="compression of the timed plain rounds (default: %(default)s, as secure rounds send "
                        "4 bytes an element)")
    p.add_argument("--group", type=int, default=4, help="peers of the timed averaging rounds (default: %(default)s)")
    p.add_argument("--round-numel", type=int, nargs="*", default=[2_000_000],
                   help="more buffer sizes to time plain against secure rounds on (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=8, help="timed averaging rounds of each kind (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="(kept for symmetry with the other benches)")
    args = p.parse_args()
    common = dict(trainers=args.trainers, samples=args.samples, sync="diloco", local_steps=args.local_steps,
                  timeout=args.timeout, compression=args.compression, batch_size=args.batch_size)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        tmp = Path(tmp)
        plain = run_swarm(tmp, "bench-nodp", **common)
        for i, epsilon in enumerate(args.epsilons):
            run = run_swarm(tmp, f"bench-dp{i}", **common, extra=(
                "--dp-clip", str(args.clip), "--dp-epsilon", str(epsilon), "--dp-delta", str(args.delta)))
            reports = [PRIVACY.findall(t["log"]) for t in run["trainers"]]
            if not all(reports):
                raise RuntimeError("a DP trainer did not report its epsilon:\n" + run["trainers"][0]["log"][-2000:])
            last = [r[-1] for r in reports]
            runs.append({"target_epsilon": epsilon, "epsilon": max(float(r[0]) for r in last),
                         "delta": float(last[0][1]), "loss": round(summary(run)[0], 4),
                         "noise": float(last[0][3]), "rounds": [int(r[2]) for r in last],
                         "stopped_on_budget": sum("privacy budget spent" in t["log"] for t in run["trainers"]),
                         "seconds": run["seconds"]})
        secure = run_swarm(tmp, "bench-secure", **dict(common, compression="none"),
                           extra=("--secure-aggregation", "1"))
        size = dense_numel()
        medians, times = {}, {}
        for numel in [size, *args.round_numel]:
            for kind in ("plain", "secure"):
                (tmp / f"{kind}{numel}").mkdir()
                times[numel, kind] = round_times(tmp / f"{kind}{numel}", numel, args.group, args.rounds,
                                                 "none" if kind == "secure" else args.round_compression,
                                                 kind == "secure")
                medians[numel, kind] = statistics.median(times[numel, kind]) if times[numel, kind] else None
    median = {kind: medians[size, kind] for kind in ("plain", "secure")}
    ratios = {str(numel): round(medians[numel, "secure"] / medians[numel, "plain"], 3)
              if medians[numel, "secure"] and medians[numel, "plain"] else None for numel in [size, *args.round_numel]}
    steps = [float(x) for t in secure["trainers"] for x in ROUND.findall(t["log"])]
    out = {"trainers": args.trainers, "samples_per_trainer": args.samples, "local_steps": args.local_steps,
           "clip": args.clip, "no_dp": {"loss": round(summary(plain)[0], 4), "seconds": plain["seconds"]},
           "dp": runs, "round_numel": size, "round_group": args.group, "round_compression": args.round_compression,
           "plain_round_s": median["plain"], "secure_round_s": median["secure"],
           "rounds_ok": {f"{kind}{numel}": len(v) for (numel, kind), v in times.items()},
           "secure_ratio": ratios[str(size)], "secure_ratio_by_numel": ratios,
           "secure": {"loss": round(summary(secure)[0], 4), "step_s": round(statistics.mean(steps), 3) if steps
                      else None, "steps_ok": len(steps)}}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
