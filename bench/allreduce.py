"""All-reduce benchmark: round time, algorithmic bandwidth, error and memory of N averaging peers.

    python bench/allreduce.py --peers 4 --size 67108864 --compression none [--rounds 3] [--vs-hivemind]
                              [--netns --bandwidth-mbit 100] [--json]

One process per peer (ours: ``testbed/avg_worker.py``; hivemind 1.1.12: ``testbed/hivemind_allreduce_worker.py``
in ``.venv-hivemind``, built once), each holding a float32 tensor of ``--size`` elements drawn with seed =
its index. Every peer joins the first one's DHT; when all are up the driver releases them together and
each runs ``--rounds`` averaging steps with the whole group. The two implementations run one after the
other (never at once), with the same sizes.

Measures (per implementation):

* ``round_s``: a round lasts until its slowest member finishes its step (matchmaking included); the
  median over rounds after the first (the first warms up connections). ``allreduce_s``: the same for
  the all-reduce alone (from the moment the member knows its group to the end of its step), and
  ``matchmaking_s``. With one round, that round is used.
* ``algbw_mb_s``: tensor bytes (4 x size) / ``allreduce_s`` in MB/s (1e6 bytes). ``round_algbw_mb_s``
  uses ``round_s``.
* ``max_abs_err``: largest |peer's final tensor - exact mean| over every peer and element, the exact
  mean computed here in float64 from the seeds. (Later rounds average identical tensors again, so
  they add rounding only.)
* ``pss_mib_per_peer``: peak PSS of a peer's process tree (hivemind: with its averager and DHT
  processes and p2pd) sampled every 2 s during the rounds, averaged over peers; ``_idle``: after
  start-up, before the first round.

``--netns`` runs every peer in its own network namespace (:mod:`testbed.netns`) with its upload and
download capped at ``--bandwidth-mbit``; ``bound_s = 2 (N-1)/N * wire bytes / B`` is what a perfect
butterfly/ring all-reduce needs on such links (wire bytes: the compressed tensor). Our peers declare
that bandwidth (MB/s) to their averager, which paces its transfers to it.

The last line printed is one JSON object (see ``--json``); progress goes to stderr.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's packages first
from testbed.common import REPO_ROOT, _die_with_parent, ensure_hivemind_venv, pss_mib  # noqa: E402

OUR_WORKER = str(Path(__file__).resolve().parent.parent / "testbed" / "avg_worker.py")
HIVEMIND_WORKER = str(Path(__file__).resolve().parent.parent / "testbed" / "hivemind_allreduce_worker.py")
WIRE_BYTES_PER_ELEM = {"none": 4.0, "fp16": 2.0, "int8": 1.0 + 8 / 4096, "int4": 0.5 + 8 / 1024}


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Peer:
    """One worker process; its JSON stdout lines go to a queue, its stderr to a log file."""

    def __init__(self, argv: list[str], log_path: Path, topo=None, host: int = 0):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        kwargs = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=REPO_ROOT,
                      text=True)
        if topo is None:
            self.proc = subprocess.Popen(argv, preexec_fn=_die_with_parent, **kwargs)
        else:
            self.proc = topo.run(host, argv, **kwargs)
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                try:
                    self.queue.put(json.loads(line))
                except json.JSONDecodeError:
                    pass
        self.queue.put(None)

    def next(self, timeout: float) -> dict:
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"worker {self.proc.pid} printed nothing in {timeout:.0f}s\n{self.tail()}") from None
        if item is None:
            self.queue.put(None)
            raise RuntimeError(f"worker {self.proc.pid} exited ({self.proc.poll()}):\n{self.tail()}")
        return item

    def tail(self, chars: int = 2500) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        from testbed.common import descendants
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def hivemind_python() -> str:
    """``.venv-hivemind/bin/python``, building the venv under a file lock shared with the other benchmarks."""
    lock_path = REPO_ROOT / ".venv-hivemind.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            python = str(ensure_hivemind_venv())
            subprocess.run([python, "-c", "import hivemind"], check=True, capture_output=True)
            return python
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def median_after_first(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values[1:] if len(values) > 1 else values)


def run_impl(impl: str, args, tmp: Path, topo=None) -> dict:
    """Start N peers of ``impl``, run the rounds, return measurements (and the paths of the final tensors)."""
    python = sys.executable if impl == "ours" else hivemind_python()
    script = OUR_WORKER if impl == "ours" else HIVEMIND_WORKER
    nbytes = 4 * args.size
    line_timeout = 90 + 4 * nbytes / 2e6
    peers: list[Peer] = []
    outs = [tmp / f"{impl}-{i}.pt" for i in range(args.peers)]
    try:
        initial: list[str] = []
        t_start = time.monotonic()
        for i in range(args.peers):
            host = topo.addr(i) if topo else "127.0.0.1"
            argv = [python, script, "--host", host, "--size", str(args.size), "--seed", str(i),
                    "--rounds", str(args.rounds), "--group", str(args.peers), "--compression", args.compression,
                    "--start-at", "-1", "--out", str(outs[i]), "--pause", str(args.pause)]
            if impl == "ours":
                argv += ["--matchmaking-time", str(args.matchmaking_time), "--log-level", args.log_level]
                declared = args.bandwidth_mbit / 8 if args.bandwidth_mbit else args.declared_mb_s
                argv += ["--bandwidth", str(declared)] if declared else []
                argv += ["--no-bulk"] if args.no_bulk else []
            if initial:
                argv += ["--initial-peers", *initial]
            peers.append(Peer(argv, tmp / f"{impl}-{i}.log", topo, i))
            if i == 0:  # everybody joins through the first peer
                ready = peers[0].next(180)
                initial = [a for a in ready["addrs"] if "/p2p/" in a][:1] or ready["addrs"][:1]
        for p in peers[1:]:
            p.next(180)
        start_s = time.monotonic() - t_start
        time.sleep(1.0)  # let the DHT settle
        idle = [pss_mib(p.proc.pid) for p in peers]
        log(f"[{impl}] {args.peers} peers up in {start_s:.1f}s; idle PSS/peer {statistics.mean(idle):.0f} MiB")
        for p in peers:
            p.go()
        rounds: list[list[dict]] = [[] for _ in range(args.rounds)]
        peak = list(idle)
        pending = set(range(args.peers))
        deadline = time.monotonic() + line_timeout * (args.rounds + 1)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rounds did not finish in time; peers still running: {sorted(pending)}")
            for i in list(pending):
                try:
                    item = peers[i].queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is None:
                    peers[i].queue.put(None)
                    raise RuntimeError(f"{impl} peer {i} exited early:\n{peers[i].tail()}")
                if item.get("done"):
                    pending.discard(i)
                elif "round" in item:
                    rounds[item["round"]].append(item)
                    if len(rounds[item["round"]]) == args.peers:
                        r = rounds[item["round"]]
                        log(f"[{impl}] round {item['round']}: ok={all(x.get('ok') for x in r)} "
                            f"step {max(x['duration'] for x in r):.2f}s "
                            f"all-reduce {max(x.get('allreduce_s') or 0 for x in r):.2f}s")
            for i in pending:
                peak[i] = max(peak[i], pss_mib(peers[i].proc.pid))
            time.sleep(max(0.0, 2.0 - 0.05 * len(pending)))  # smaps_rollup of a big process costs ~20 ms
    finally:
        for p in peers:
            if p.proc.poll() is None:
                try:
                    p.proc.wait(20 if impl == "ours" else 10)  # ours lingers a little so others can repair
                except subprocess.TimeoutExpired:
                    pass
            p.kill()
    per_round = []
    for r in rounds:
        per_round.append({
            "ok": len(r) == args.peers and all(x.get("ok") for x in r),
            "group_sizes": sorted({x.get("group_size") for x in r}),
            "step_s": max(x["duration"] for x in r),
            "allreduce_s": max((x.get("allreduce_s") or 0.0) for x in r),
            "matchmaking_s": max((x.get("matchmaking_s") or 0.0) for x in r),
            "errors": [x.get("error") or x.get("reason") for x in r if not x.get("ok")],
            "excluded": sorted({e[-8:] for x in r for e in (x.get("excluded") or [])}),
        })
    round_s = median_after_first([r["step_s"] for r in per_round])
    allreduce_s = median_after_first([r["allreduce_s"] for r in per_round])
    return {
        "round_s": round(round_s, 3),
        "allreduce_s": round(allreduce_s, 3),
        "matchmaking_s": round(median_after_first([r["matchmaking_s"] for r in per_round]), 3),
        "algbw_mb_s": round(nbytes / allreduce_s / 1e6, 1) if allreduce_s else None,
        "round_algbw_mb_s": round(nbytes / round_s / 1e6, 1) if round_s else None,
        "all_ok": all(r["ok"] for r in per_round),
        "rounds": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in per_round],
        "pss_mib_per_peer": round(statistics.mean(peak), 1),
        "pss_mib_per_peer_idle": round(statistics.mean(idle), 1),
        "start_s": round(start_s, 1),
        "_outs": [str(o) for o in outs],
    }


def max_abs_error(outs: list[str], exact) -> float | None:
    import torch
    worst = 0.0
    for path in outs:
        if not os.path.exists(path):
            return None
        t = torch.load(path)
        worst = max(worst, float((t.double() - exact).abs_().max()))
        del t
        os.unlink(path)
    return worst


def exact_mean(size: int, n: int):
    import torch
    acc = torch.zeros(size, dtype=torch.float64)
    for i in range(n):
        acc += torch.randn(size, generator=torch.Generator().manual_seed(i))
    return acc.div_(n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--size", type=int, default=1 << 24, help="float32 elements per peer")
    p.add_argument("--compression", default="none", choices=["none", "fp16", "int8", "int4"],
                   help="int4 has no hivemind counterpart (hivemind's smallest is 8-bit)")
    p.add_argument("--rounds", type=int, default=3, help="the first one is a warm-up")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between rounds")
    p.add_argument("--matchmaking-time", type=float, default=2.0, help="ours (hivemind keeps its default 5 s)")
    p.add_argument("--declared-mb-s", type=float, default=None,
                   help="bandwidth (MB/s) our peers declare without --netns (default: none, so nothing is paced)")
    p.add_argument("--vs-hivemind", action="store_true", help="also run hivemind 1.1.12 (in .venv-hivemind)")
    p.add_argument("--only-hivemind", action="store_true")
    p.add_argument("--netns", action="store_true", help="one network namespace per peer (needs root)")
    p.add_argument("--bandwidth-mbit", type=float, default=None, help="with --netns: per-peer up/down cap")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--log-level", default="WARNING", help="our workers' log level (logs: see --keep-logs)")
    p.add_argument("--no-bulk", action="store_true",
                   help="ours without the bulk data plane (all data on libp2p streams), to compare the two")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    args = p.parse_args()
    if args.peers < 2 or args.size < 1 or args.rounds < 1:
        p.error("need --peers >= 2, --size >= 1, --rounds >= 1")
    if args.bandwidth_mbit is not None and not args.netns:
        p.error("--bandwidth-mbit needs --netns")
    if args.compression == "int4" and (args.vs_hivemind or args.only_hivemind):
        p.error("hivemind has no 4-bit compression to compare int4 with")

    result: dict[str, Any] = {"peers": args.peers, "size": args.size, "compression": args.compression,
                              "bulk": not args.no_bulk,
                              "rounds": args.rounds, "netns": args.netns, "bandwidth_mbit": args.bandwidth_mbit,
                              "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    tmp = Path(tempfile.mkdtemp(prefix="allreduce-bench-"))
    impls = ([] if args.only_hivemind else ["ours"]) + (["hivemind"] if args.vs_hivemind or args.only_hivemind
                                                        else [])
    outs: dict[str, list[str]] = {}
    try:
        with ExitStack() as stack:
            topo = None
            if args.netns:
                from testbed.netns import Topology
                topo = stack.enter_context(Topology(args.peers, bandwidth_mbit=args.bandwidth_mbit))
            for impl in impls:
                try:
                    res = run_impl(impl, args, tmp, topo)
                    outs[impl] = res.pop("_outs")
                    result[impl] = res
                except Exception as e:  # report what broke and go on with the other implementation
                    log(f"[{impl}] FAILED: {e}")
                    result[impl] = {"error": str(e)[-3000:]}
        if outs:
            exact = exact_mean(args.size, args.peers)
            for impl, paths in outs.items():
                result[impl]["max_abs_err"] = max_abs_error(paths, exact)
            del exact
    finally:
        if args.keep_logs:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    ours, hm = result.get("ours", {}), result.get("hivemind", {})
    if ours.get("round_s") and hm.get("round_s"):
        result["ratios"] = {"round_s_ours_over_hivemind": round(ours["round_s"] / hm["round_s"], 3),
                            "allreduce_s_ours_over_hivemind": round(ours["allreduce_s"] / hm["allreduce_s"], 3)}
    if args.netns and args.bandwidth_mbit:
        wire = WIRE_BYTES_PER_ELEM[args.compression] * args.size
        bound = 2 * (args.peers - 1) / args.peers * wire / (args.bandwidth_mbit * 1e6 / 8)
        result["bound_s"] = round(bound, 3)
        for impl in impls:
            if result[impl].get("allreduce_s"):
                result[impl]["allreduce_over_bound"] = round(result[impl]["allreduce_s"] / bound, 3)
                result[impl]["round_over_bound"] = round(result[impl]["round_s"] / bound, 3)
    if not args.json:
        log(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
