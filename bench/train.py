"""Swarm training against one process on the same number of samples, and bytes per sample of each sync.

``python bench/train.py [--trainers 4] [--samples 800] [--batch-size 8] [--local-steps 13] [--compression int4] --json``

Four runs, each a fresh local swarm of real ``python -m peer`` processes on loopback (a bootstrap and
two expert hosts serving the whole expert grid, so experts train from scratch every run):

1. ``diloco``: ``--trainers`` trainers, ``--samples`` samples each in batches of ``--batch-size``,
   DiLoCo every ``--local-steps`` steps;
2. ``single``: one trainer on ``trainers * samples`` samples (the same total) in batches of
   ``trainers * batch_size``: the swarm's global batch, so it makes as many updates, of the same size, as
   the swarm. This is the yardstick of ``loss_ratio``: exact gradient averaging of the swarm every step
   is this very run, so it measures what the swarm's sync costs, not what a bigger batch costs;
3. ``single_small_batch``: the same samples in batches of ``--batch-size``, so ``trainers`` times more
   sequential updates than any swarm member makes (``loss_ratio_vs_small_batch``, reported, not a target);
4. ``grad``: ``--trainers`` trainers averaging gradients every step, on ``--grad-samples`` samples each
   (per-step averaging is slow here, and bytes per sample do not depend on how long it runs).

The last line is one JSON object: ``{"eval_loss_swarm", "eval_loss_single", "loss_ratio",
"eval_loss_single_small_batch", "loss_ratio_vs_small_batch", "eval_loss_grad", "bytes_per_sample":
{"grad", "diloco"}, "diloco_vs_grad_bytes", "targets_met", "seconds": {...}}``.
Eval losses are each trainer's final held-out loss (mean over the swarm's trainers); bytes are what the
trainers' averaging rounds sent plus received, divided by the samples they trained on.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FINISHED = re.compile(r"Finished: (\d+) samples in \d+ steps, final eval loss ([\d.]+), averaging (\d+) ok / "
                      r"(\d+) failed, (\d+) bytes")


def peer(log: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "peer", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *flags],
                            stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True, env=env)


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{log.name}: no {text!r}:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)


def run_swarm(tmp: Path, name: str, trainers: int, samples: int, sync: str, local_steps: int,
              timeout: float, compression: str = "none", batch_size: int = 8, extra: tuple[str, ...] = ()) -> dict:
    """One fresh swarm (``extra``: more flags for every trainer); returns the trainers' final results, each with
    its log's text, and the wall time."""
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        boot = peer(tmp / f"{name}-boot.log", "--swarm", name, "--log-level", "WARNING")
        procs.append(boot)
        join = None
        for line in boot.stdout:
            if line.strip().startswith("python -m peer --initial-peers"):
                join = ["--initial-peers", line.split("--initial-peers", 1)[1].split()[0], "--swarm", name]
                break
        if join is None:
            raise RuntimeError("bootstrap did not start")
        for i in range(2):
            log = tmp / f"{name}-experts{i}.log"
            procs.append(peer(log, *join, "--experts", "16", "--device", "cpu"))
            wait_for(log, "Hosting 16 experts", procs[-1], 120)
        logs = [tmp / f"{name}-trainer{i}.log" for i in range(trainers)]
        workers = [peer(logs[i], *join, "--train", "--sync", sync, "--local-steps", str(local_steps),
                        "--max-samples", str(samples), "--shard", f"{i}/{trainers}",
                        "--compression", compression, "--batch-size", str(batch_size), *extra)
                   for i in range(trainers)]
        procs += workers
        results = []
        for w, log in zip(workers, logs):
            rc = w.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
            found = FINISHED.findall(log.read_text(errors="replace"))
            if rc != 0 or not found:
                raise RuntimeError(f"{log.name} failed ({rc}):\n{log.read_text(errors='replace')[-2000:]}")
            n, loss, ok, failed, nbytes = found[-1]
            results.append({"samples": int(n), "eval_loss": float(loss), "rounds_ok": int(ok),
                            "rounds_failed": int(failed), "bytes": int(nbytes), "log": log.read_text(errors="replace")})
        return {"trainers": results, "seconds": round(time.monotonic() - started, 1)}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def summary(run: dict) -> tuple[float, float]:
    """Mean final eval loss and bytes per sample of a run."""
    ts = run["trainers"]
    return (sum(t["eval_loss"] for t in ts) / len(ts),
            sum(t["bytes"] for t in ts) / max(1, sum(t["samples"] for t in ts)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", type=int, default=4)
    p.add_argument("--samples", type=int, default=800, help="samples per swarm trainer (default: %(default)s)")
    p.add_argument("--grad-samples", type=int, default=160, help="samples per trainer of the grad run")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step of each swarm trainer")
    p.add_argument("--local-steps", type=int, default=13, help="DiLoCo inner steps (default: %(default)s)")
    p.add_argument("--compression", default="int4", choices=["none", "fp16", "int8", "int4"],
                   help="how the DiLoCo run's averaging encodes pseudo-gradients (the grad run stays exact)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    p.add_argument("--json", action="store_true", help="(kept for symmetry with the other benches)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        diloco = run_swarm(tmp, "bench-diloco", args.trainers, args.samples, "diloco", args.local_steps, args.timeout,
                           args.compression, args.batch_size)
        total = args.trainers * args.samples
        single = run_swarm(tmp, "bench-single", 1, total, "diloco", args.local_steps, args.timeout,
                           batch_size=args.trainers * args.batch_size)
        small = run_swarm(tmp, "bench-small", 1, total, "diloco", args.local_steps, args.timeout,
                          batch_size=args.batch_size)
        grad = run_swarm(tmp, "bench-grad", args.trainers, args.grad_samples, "grad", 1, args.timeout,
                         batch_size=args.batch_size)
    loss_swarm, bytes_diloco = summary(diloco)
    loss_single, _ = summary(single)
    loss_small, _ = summary(small)
    loss_grad, bytes_grad = summary(grad)
    out = {"trainers": args.trainers, "samples_per_trainer": args.samples, "batch_size": args.batch_size,
           "local_steps": args.local_steps,
           "compression": args.compression,
           "eval_loss_swarm": round(loss_swarm, 4), "eval_loss_single": round(loss_single, 4),
           "loss_ratio": round(loss_swarm / loss_single, 4), "eval_loss_single_small_batch": round(loss_small, 4),
           "loss_ratio_vs_small_batch": round(loss_swarm / loss_small, 4), "eval_loss_grad": round(loss_grad, 4),
           "bytes_per_sample": {"grad": round(bytes_grad), "diloco": round(bytes_diloco)},
           "diloco_vs_grad_bytes": round(bytes_grad / max(bytes_diloco, 1e-9), 1),
           "targets_met": {"loss_ratio<=1.05": loss_swarm / loss_single <= 1.05,
                           "diloco_bytes>=100x_fewer": bytes_grad >= 100 * bytes_diloco},
           "rounds": {"diloco": [t["rounds_ok"] for t in diloco["trainers"]],
                      "grad": [t["rounds_ok"] for t in grad["trainers"]]},
           "seconds": {"diloco": diloco["seconds"], "single": single["seconds"], "single_small_batch": small["seconds"],
                       "grad": grad["seconds"]}}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
