"""Chaos test of a swarmtrain swarm: random SIGKILL / SIGSTOP / restarts / link cuts, invariants checked throughout.

Needs root (network namespaces) and about 3 GB of memory; nothing is downloaded. Example::

    sudo python bench/chaos.py --duration 240 --quiet-period 60 --seed 1 --json chaos.json

What runs (:class:`testbed.netns.Topology`, one namespace per host on one switch): a bootstrap peer (DHT
only), ``--experts`` expert hosts splitting the tiny model's expert grid, ``--trainers`` trainers
(``--train --model tiny --shard i/N``, each with ``--identity``, ``--checkpoint-dir`` and
``--metrics-port``) and a probe (``testbed/chaos_probe.py``, a client-mode DHT peer). Every peer runs with
``OMP_NUM_THREADS=1``.

Phases: start the swarm and wait until every trainer shares its state; then ``--duration`` seconds of
faults (:mod:`testbed.chaos_faults`: a new one every few seconds, at most ``--max-concurrent`` peers faulted
or recovering at once, never two expert hosts); then ``--quiet-period`` seconds without faults; then every
trainer gets SIGTERM right after a common averaging round and the trainers' final checkpoints are
compared (dense weights must have re-converged); then everything else is stopped.

Invariants, checked while it runs (:mod:`testbed.chaos_checks`, bounds derived from the code's defaults and
printed under ``"bounds"``): no hang (averaging steps within their deadline, training progress, DHT pings,
exit within the compose file's ``stop_grace_period`` after SIGTERM), no NaN (losses, checkpoints), no crash,
no corrupted checkpoint (loaded with the project's loader after every SIGKILL, and resumed from), DHT records
of live peers found, every fault recovered, dense weights re-converged.

The fault phase lasts ``--duration`` seconds, longer (by up to ``--cover-extension``) if some kind of fault
has not been injected by then.

The last line on stdout is one JSON object: ``peers``, ``duration_s``, ``fault_phase_s``, ``faults`` (counts per kind;
``sigkill`` counts every SIGKILL, ``kill_during_save`` the ones that landed inside a checkpoint save),
``violations`` (each ``{t, peer, invariant, detail}``), ``violation_count``, ``recovery_s`` (per kind:
seconds from the end of a fault to that peer's next successful averaging step -- trainers -- or to being
found in the DHT and answering pings -- expert hosts), ``reconvergence``, ``ok``. Exit status 0 iff ``ok``.
Peer logs are kept with ``--work-dir``.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's packages first

from testbed.chaos_faults import KINDS, Fault, FaultPlan, SaveKiller  # noqa: E402
from testbed.chaos_swarm import Swarm  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sudo python bench/chaos.py", description=__doc__.splitlines()[0],
                                epilog="Run as root. The last stdout line is the JSON summary; exit 0 iff no "
                                       "invariant was violated.")
    p.add_argument("--duration", type=float, default=240.0, help="seconds of fault injection (default: %(default)s)")
    p.add_argument("--cover-extension", type=float, default=120.0,
                   help="if some fault kind was not injected within --duration (slow machines recover slowly, "
                        "so fewer faults fit), keep injecting up to this many more seconds until every kind "
                        "was (default: %(default)s)")
    p.add_argument("--quiet-period", type=float, default=60.0,
                   help="seconds without faults before the final checks (default: %(default)s)")
    p.add_argument("--trainers", type=int, default=3, help="trainer peers, at least 2 (default: %(default)s)")
    p.add_argument("--experts", type=int, default=2, help="expert host peers, at least 2 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule (default: %(default)s)")
    p.add_argument("--fault-gap", type=float, nargs=2, default=[6.0, 14.0], metavar=("MIN", "MAX"),
                   help="seconds between fault starts, drawn uniformly (default: 6 14)")
    p.add_argument("--fault-length", type=float, nargs=2, default=[3.0, 8.0], metavar=("MIN", "MAX"),
                   help="seconds a peer stays stopped, cut off or dead (default: 3 8)")
    p.add_argument("--max-concurrent", type=int, default=2, choices=[1, 2],
                   help="peers faulted or still recovering at once (default: %(default)s)")
    p.add_argument("--spread-threshold", type=float, default=1e-6,
                   help="largest relative spread of the trainers' averaged weights after the quiet period "
                        "(default: %(default)s: re-converged trainers hold bit-identical weights; see bench/chaos_checkpoints.dense_spread)")
    p.add_argument("--bandwidth-mbit", type=float, default=0.0, help="per-peer link cap, 0 = none (default)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds the swarm may take to start (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary to FILE")
    p.add_argument("--work-dir", default=None, help="keep identities, checkpoints and peer logs here "
                                                  "(default: a temporary directory, removed)")
    return p


class ChaosRun:
    """One chaos run over a started :class:`testbed.chaos_swarm.Swarm` (phases as in the module docstring)."""

    def __init__(self, args: argparse.Namespace, swarm: Swarm):
        self.args, self.swarm, self.monitor = args, swarm, swarm.monitor
        self.plan = FaultPlan(args.seed, {n: p.role for n, p in swarm.peers.items()}, tuple(args.fault_length))
        self.faults: list[Fault] = []
        self.events: list = []                       # heap of (due, seq, action)
        self.seq = 0
        self.killer_results: queue.Queue = queue.Queue()
        self.armed: dict[str, threading.Event] = {}  # trainers a SaveKiller waits on (value: cancel flag)
        self.missed_saves = 0
        self.recovery_window = 30.0                  # a faulted peer counts as busy at most this long after

    # ------------------------------------------------------------------ scheduling
    def at(self, due: float, action) -> None:
        self.seq += 1
        heapq.heappush(self.events, (due, self.seq, action))

    def run_due(self, now: float) -> None:
        while self.events and self.events[0][0] <= now:
            heapq.heappop(self.events)[2]()

    def busy(self, now: float) -> set[str]:
        out = set(self.armed)
        for f in self.faults:
            if f.ended is None or (f.recovered is None and now < f.ended + self.recovery_window):
                out.add(f.peer)
        return out

    def idle(self, now: float) -> list[str]:
        busy = self.busy(now)
        if len(busy) >= self.args.max_concurrent:
            return []
        roles = {n: p.role for n, p in self.swarm.peers.items()}
        experts_busy = any(roles[n] == "experts" for n in busy)
        return [n for n, p in self.swarm.peers.items() if n not in busy and p.role in ("trainer", "experts")
                and p.is_running() and not (p.role == "experts" and experts_busy)]

    # ------------------------------------------------------------------ faults
    def inject(self, now: float) -> bool:
        choice = self.plan.next(self.idle(now), self.saved_trainers())
        if choice is None:
            return False
        kind, name, length = choice
        peer = self.swarm.peers[name]
        if kind == "kill_during_save":
            cancel = threading.Event()
            self.armed[name] = cancel
            def before_kill() -> None:           # the SIGKILL lands now (in the killer's thread)
                peer.expect_exit = True
                self.monitor.fault_began(name, time.monotonic(), "kill_during_save")
            # the first kill lands right after the temporary file appears; later ones at random points of the write
            delay = self.plan.rng.uniform(0.0, 0.004) if any(f.kind == "kill_during_save" for f in self.faults) else 0.0
            killer = SaveKiller(peer.checkpoint_dir, peer.proc.pid, before_kill=before_kill, delay_s=delay)
            timeout = max(45.0, self.phase_end - now)     # a healthy trainer saves every ~35 s
            threading.Thread(target=lambda: self.killer_results.put((name, length, killer.wait_and_kill(
                timeout, cancel.is_set), killer.races_lost)), daemon=True).start()
            return True
        fault = Fault(kind, name, now, length)
        self.faults.append(fault)
        self.monitor.fault_began(name, now, kind)
        if kind == "sigstop":
            peer.signal(signal.SIGSTOP)
            self.at(now + length, lambda: self.end_pause(fault, signal.SIGCONT))
        elif kind == "link_cut":
            self.swarm.topo.set_link(peer.host, False)
            self.at(now + length, lambda: self.end_link_cut(fault))
        elif kind == "sigkill":
            self.swarm.kill(name, signal.SIGKILL)
            self.after_kill(fault)
        elif kind == "restart":                      # SIGTERM; the main loop keeps running while it exits
            self.swarm.send(name, signal.SIGTERM)
            self.at(now + 0.2, lambda: self.await_exit(fault))
        return True

    def await_exit(self, fault: Fault) -> None:
        peer = self.swarm.peers[fault.peer]
        if peer.proc.poll() is None and time.monotonic() < peer.sent_at + self.swarm.grace_s:
            self.at(time.monotonic() + 0.2, lambda: self.await_exit(fault))
            return
        fault.detail["shutdown_s"] = self.swarm.kill(fault.peer, signal.SIGTERM, send=False)
        self.after_kill(fault)

    def saved_trainers(self) -> list[str]:
        """Trainers that have a checkpoint, the one whose next save (every ``checkpoint_every`` steps) is
        soonest first (its step is read from its metrics: samples / batch size)."""
        from peer.training.trainer import TrainConfig

        every, batch = TrainConfig.checkpoint_every, TrainConfig.batch_size
        saved = [n for n, p in self.swarm.peers.items() if p.checkpoint_dir and (p.checkpoint_dir / "trainer.pt").exists()]
        samples = {n: self.monitor.peers[n].samples for n in saved}
        return sorted(saved, key=lambda n: every - (samples[n] // batch) % every if samples[n] is not None else every)

    def end_pause(self, fault: Fault, sig: int) -> None:
        self.swarm.peers[fault.peer].signal(sig)
        fault.ended = time.monotonic()
        self.monitor.fault_ended(fault.peer, fault.ended, fault.kind)

    def end_link_cut(self, fault: Fault) -> None:
        self.swarm.topo.set_link(self.swarm.peers[fault.peer].host, True)
        fault.ended = time.monotonic()
        self.monitor.fault_ended(fault.peer, fault.ended, fault.kind)

    def after_kill(self, fault: Fault) -> None:
        """The peer is dead: check its checkpoints now, restart it after the fault's length."""
        fault.detail.update(self.swarm.check_checkpoints(fault.peer, fault.kind))
        if fault.kind == "kill_during_save" and "checkpoint_step" not in fault.detail:
            self.monitor.violate(time.monotonic(), fault.peer, "checkpoint",
                                 "the checkpoint that existed before the interrupted save is gone")

        def restart() -> None:
            self.swarm.start_peer(fault.peer, resume_step=fault.detail.get("checkpoint_step"))
            fault.ended = time.monotonic()
            self.monitor.fault_ended(fault.peer, fault.ended, fault.kind)
        self.at(fault.began + fault.duration_s, restart)

    def collect_save_kills(self) -> None:
        while True:
            try:
                name, length, caught, races_lost = self.killer_results.get_nowait()
            except queue.Empty:
                return
            self.armed.pop(name, None)
            if caught is None:
                self.missed_saves += 1
                if not any(f.kind == "kill_during_save" for f in self.faults):
                    self.plan.pending.append("kill_during_save")    # still owed: try again
                continue
            fault = Fault("kill_during_save", name, caught.pop("killed_at"), length,
                          detail={**caught, "races_lost": races_lost,
                                  "interrupted_save_step": self.monitor.peers[name].last_step})
            self.faults.append(fault)
            self.swarm.reap_killed(name)
            self.after_kill(fault)

    def update_recoveries(self) -> None:
        for f in self.faults:
            if f.ended is not None and f.recovered is None:
                f.recovered = self.monitor.recovered_after(f.peer, f.ended)

    # ------------------------------------------------------------------ phases
    def step(self, now: float) -> None:
        self.run_due(now)
        self.collect_save_kills()
        self.swarm.check_exits()
        self.monitor.watchdog(now)
        self.update_recoveries()

    def fault_phase(self) -> None:
        now = time.monotonic()
        soft_end = now + self.args.duration
        self.phase_end = soft_end + self.args.cover_extension
        next_fault = now + self.plan.gap(*self.args.fault_gap) / 2
        while now < self.phase_end and (now < soft_end or not self.every_kind_injected()):
            self.step(now)
            if now >= next_fault and now + self.args.fault_length[1] < self.phase_end:
                next_fault = now + (self.plan.gap(*self.args.fault_gap) if self.inject(now) else 1.0)
            time.sleep(0.2)
            now = time.monotonic()
        self.fault_phase_s = round(now - (soft_end - self.args.duration), 1)
        while self.events or self.armed:             # let every fault in flight end (restarts, SIGCONT, a
            # SaveKiller waiting for the next checkpoint save, at most its timeout)
            self.step(time.monotonic())
            time.sleep(0.2)

    def every_kind_injected(self) -> bool:
        return {f.kind for f in self.faults} >= set(KINDS)

    def quiet_phase(self) -> None:
        end = time.monotonic() + self.args.quiet_period
        while time.monotonic() < end:
            self.step(time.monotonic())
            time.sleep(0.5)

    def close(self) -> None:
        """Disarm SaveKillers still waiting (an error ended the run early)."""
        for cancel in self.armed.values():
            cancel.set()

    def summary(self) -> dict:
        counts = {kind: sum(f.kind == kind for f in self.faults) for kind in KINDS}
        counts["sigkill"] += counts["kill_during_save"]     # every SIGKILL, those landing mid-save included
        counts["kill_during_save_missed"] = self.missed_saves
        recovery = {}
        for kind in KINDS:
            values = [round(f.recovered - f.ended, 2) for f in self.faults if f.kind == kind and f.recovered]
            recovery[kind] = {"n": len(values), "median": statistics.median(values) if values else None,
                              "max": max(values, default=None), "values": values}
        now = time.monotonic()
        for f in self.faults:
            if f.recovered is None:
                self.monitor.violate(now, f.peer, "recovery", f"never recovered from {f.kind} at "
                                                              f"t={f.began - self.swarm.started:.1f}s")
        log = [{"t": round(f.began - self.swarm.started, 2), "kind": f.kind, "peer": f.peer,
                "length_s": round((f.ended or now) - f.began, 2),
                "recovery_s": round(f.recovered - f.ended, 2) if f.recovered else None, **f.detail}
               for f in self.faults]
        return {"faults": counts, "fault_phase_s": getattr(self, "fault_phase_s", None),
                "recovery_s": recovery, "fault_log": log}


def run_chaos(args: argparse.Namespace) -> dict:
    """Build the topology, run the phases, return the summary (see the module docstring)."""
    from testbed.chaos_checks import derive_bounds

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="chaos-"))
    started = time.monotonic()
    summary: dict = {"ok": False, "error": None, "seed": args.seed}
    swarm = Swarm(args, work, derive_bounds("tiny"))
    run = None
    try:
        swarm.start()
        run = ChaosRun(args, swarm)
        summary["startup_s"] = round(time.monotonic() - started, 1)
        run.fault_phase()
        run.quiet_phase()
        summary["reconvergence"] = swarm.final_checkpoints(args.spread_threshold, step=run.step)
    except (RuntimeError, OSError, ValueError) as e:
        summary["error"] = f"{type(e).__name__}: {e}"
    finally:
        if run is not None:
            run.close()
            summary.update(run.summary())
        summary["peers"] = swarm.stop_all()
        summary["n_peers"] = len(summary["peers"])
        swarm.close()
        summary.update(swarm.monitor.summary())
        summary["bounds"] = swarm.monitor.bounds
        summary["duration_s"] = round(time.monotonic() - started, 1)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            summary["work_dir"] = str(work)
    summary["ok"] = summary["error"] is None and summary["violation_count"] == 0
    return summary


def finite(obj):
    """``obj`` with NaN/Inf floats replaced by their names, so the summary stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trainers < 2 or args.experts < 2 or args.duration <= 0 or args.quiet_period < 0:
        parser.error("need --trainers >= 2, --experts >= 2, --duration > 0 and --quiet-period >= 0")
    if not 0 < args.fault_gap[0] <= args.fault_gap[1] or not 0 < args.fault_length[0] <= args.fault_length[1]:
        parser.error("--fault-gap and --fault-length need 0 < MIN <= MAX")
    from testbed.netns import netns_available

    why_not = netns_available()
    if why_not:
        print(json.dumps({"ok": False, "error": f"network namespaces unavailable: {why_not}"}))
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):   # unwind through the cleanup in run_chaos
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    try:
        summary = run_chaos(args)
    except KeyboardInterrupt:
        print(json.dumps({"ok": False, "error": "interrupted"}))
        return 130
    text = json.dumps(finite(summary), default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text, flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
