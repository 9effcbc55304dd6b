"""Randomized fault trials of averaging: a random fault hits a random member at a random moment of a round.

    python bench/fault_trials.py --trials 200 [--peers 5] [--size 4194304] [--kinds kill stop ...]
                                 [--compression fp16] [--error-feedback] [--client] [--clip-tau 10] [--json]

What a trial is and what it checks: testbed/fault_trials.py (SIGKILL, SIGSTOP, SIGSTOP+SIGCONT, a cut
link, a restart; the moment uniform over the calibrated round duration; on every survivor: the step
returned within its deadline, ok means the contributors' exact weighted mean, bit-identical on every member,
failure means the tensor is unchanged, nothing escaped step(), and the next round succeeds). Link cuts
need root and network namespaces; without them that kind is left out.

Prints one line per trial (to stderr), then, as its last line, one JSON object: ``trials``, ``violations``
(trials with at least one contract violation), ``next_round_failed`` (trials after which the next round
failed on a survivor), ``by_kind`` / ``by_phase`` / ``by_kind_phase`` (``{"trials", "violations"}``),
``round_s`` and ``phase_ends_s`` (the calibration), ``examples`` (the first violations, verbatim).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.fault_trials import KINDS, TrialConfig, run_trials, summarize  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="faulted rounds to run (each followed by a clean one)")
    p.add_argument("--peers", type=int, default=5, help="averaging members")
    p.add_argument("--size", type=int, default=4 << 20, help="float32 elements each member averages")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="fault kinds to draw from")
    p.add_argument("--compression", default="none", help="the averagers' compression (none, fp16, int8, int4)")
    p.add_argument("--error-feedback", action="store_true", help="the averagers keep error feedback")
    p.add_argument("--client", action="store_true", help="the last member runs in client mode")
    p.add_argument("--clip-tau", type=float, default=None, help="Byzantine-robust rounds (CenteredClip radius)")
    p.add_argument("--window", nargs=2, type=float, default=(0.0, 1.0), metavar=("FROM", "TO"),
                   help="draw the fault's moment from this span of the calibrated round (fractions of it)")
    p.add_argument("--no-netns", action="store_true", help="all on loopback (no link cuts)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draw of faults, members and moments")
    p.add_argument("--workdir", default=None, help="where worker logs go (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print the summary indented (it is the last line anyway)")
    args = p.parse_args()
    config = TrialConfig(peers=args.peers, size=args.size, kinds=tuple(args.kinds), compression=args.compression,
                         error_feedback=args.error_feedback, client=args.client, clip_tau=args.clip_tau,
                         window=tuple(args.window),
                         netns=False if args.no_netns else None)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fault-trials-"))
    workdir.mkdir(parents=True, exist_ok=True)
    count = 0

    def report(record) -> None:
        nonlocal count
        count += 1
        print(json.dumps({"trial": count, **asdict(record)}), file=sys.stderr, flush=True)

    calibration, records = run_trials(config, args.trials, workdir, seed=args.seed, on_trial=report)
    summary = summarize(calibration, records, config)
    summary["workdir"] = str(workdir)
    if args.json:
        print(json.dumps(summary, indent=2), file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
