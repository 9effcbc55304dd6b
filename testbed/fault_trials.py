"""Randomized fault trials of averaging (in the spirit of Jepsen): does ``Averager.step()`` keep its contract
whatever fault hits a member, whenever it hits?

A :class:`Swarm` is a bootstrap DHT node and ``peers`` averaging peers, each its own process
(testbed/trial_worker.py) and, where network namespaces are available, its own host on a virtual switch
(testbed/netns.py), so that a link can be cut. One trial:

1. every member starts round ``r`` at once (known random contributions, a weight per member);
2. after ``u`` seconds, ``u`` drawn uniformly over the calibrated duration of a round (so faults land in
   matchmaking, in the transfer, in the reduce, in the result exchange and just after), one random member gets
   a fault of a random kind: ``kill`` (SIGKILL), ``stop`` (SIGSTOP: a laptop that sleeps), ``stop_cont``
   (SIGSTOP, SIGCONT a little later), ``cut`` (its link goes down) or ``restart`` (SIGKILL, then a new process);
3. checked on every survivor (:func:`check_round`): it answered within its step deadline, nothing escaped
   ``step()``, ``ok=True`` means every element equals the contributors' weighted mean and every member holds
   the same bits, ``ok=False`` means the tensor still holds its own contribution;
4. the next round, with the faulty member still dead, frozen or cut off, must succeed on every survivor;
5. then the member is healed (restarted, or its link restored) for the next trial.

:func:`run_trials` returns one :class:`TrialRecord` per trial and :func:`summarize` counts trials and
violations per fault kind and per phase (which phase ``u`` fell in, from the calibration rounds' timelines).
"""
from __future__ import annotations

import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .common import Worker, WorkerError
from .netns import Topology, netns_available

WORKER = str(Path(__file__).resolve().parent / "trial_worker.py")
KINDS = ("kill", "stop", "stop_cont", "cut", "restart")
PHASES = ("matchmaking", "transfer", "reduce", "results", "after")
#: the timeline marks (testbed/trial_worker.py -> StepResult.timeline) that end each phase but the last
PHASE_ENDS = ("group", "sent", "reduced", "gathered")
SLACK_S = 1.0   # a step may overrun its deadline by this much (scheduling, the worker's own bookkeeping)


@dataclass
class TrialConfig:
    """What the trials average and how.

    :param peers: averaging members (one more process is the bootstrap node).
    :param size: float32 elements each member averages.
    :param kinds: fault kinds drawn from (``cut`` needs network namespaces; without them it is left out).
    :param compression, error_feedback, clip_tau: the averagers' options (clip_tau: Byzantine-robust rounds).
    :param client: the last member runs in client mode (it accepts no connections, owns no part).
    :param netns: put every process on its own namespace host (None: when available).
    """

    peers: int = 5
    size: int = 1 << 20
    kinds: tuple[str, ...] = KINDS
    compression: str = "none"
    error_feedback: bool = False
    clip_tau: float | None = None
    client: bool = False
    netns: bool | None = None
    matchmaking_time: float = 2.0
    calibration_rounds: int = 3
    #: the fault's moment is drawn uniformly over this span of the calibrated round (fractions of it)
    window: tuple[float, float] = (0.0, 1.0)

    @property
    def tolerance(self) -> float:
        """Largest allowed difference from the exact weighted mean (values are N(0, 1)): float32 sums, or the
        rounding of a lossy code on contributions and results (and, with error feedback, last round's)."""
        return 1e-5 if self.compression == "none" else 2e-2


@dataclass
class TrialRecord:
    kind: str
    member: int
    at_s: float
    phase: str
    violations: list[str] = field(default_factory=list)   # the contract of step() broken (module doc, step 3)
    liveness: list[str] = field(default_factory=list)     # the next round failed on a survivor (step 4)
    ok: int = 0          # survivors whose faulted round succeeded
    failed: int = 0      # ... and failed (correctly unchanged)
    next_ok: int = 0     # survivors whose next round succeeded
    next_failed: int = 0
    started: str = field(default_factory=lambda: time.strftime("%H:%M:%S"))  # wall clock, to find it in the logs


class Member:
    """One averaging peer's process (a new one after each restart)."""

    def __init__(self, index: int, worker: Worker, seed: int, weight: float):
        self.index, self.worker, self.seed, self.weight = index, worker, seed, weight
        self.ready = worker.wait_ready(120)
        self.peer_id, self.step_timeout = self.ready["peer_id"], float(self.ready["step_timeout"])


class Swarm:
    """The bootstrap and the members of one series of trials; :meth:`close` (or ``with``) stops everything."""

    def __init__(self, config: TrialConfig, workdir: Path):
        self.config, self.workdir = config, Path(workdir)
        use_netns = config.netns if config.netns is not None else netns_available() is None
        self.topology = Topology(config.peers + 1).__enter__() if use_netns else None
        self.kinds = tuple(k for k in config.kinds if k != "cut" or self.topology is not None)
        self._spawned = 0
        self.members: list[Member | None] = [None] * config.peers
        try:
            self.bootstrap = self._worker(0, ["--bootstrap"])
            ready = self.bootstrap.wait_ready(120)
            self.initial_peers = [a for a in ready["addrs"] if self._host(0) in a][:1] or ready["addrs"][:1]
            for i in range(config.peers):
                self.start_member(i)
        except BaseException:
            self.close()
            raise

    def _host(self, host: int) -> str:
        return self.topology.addr(host) if self.topology is not None else "127.0.0.1"

    def _worker(self, host: int, flags: list[str]) -> Worker:
        self._spawned += 1
        argv = [sys.executable, WORKER, "--host", self._host(host), *flags]
        if self.topology is not None:
            argv = self.topology.command(host, argv)
        return Worker(argv, self.workdir / f"worker{self._spawned}-h{host}.log", env={"OMP_NUM_THREADS": "1"})

    def start_member(self, i: int) -> Member:
        c = self.config
        seed, weight = 1000 + self._spawned, float(1 + i % 3)
        flags = ["--initial-peers", *self.initial_peers, "--seed", str(seed), "--weight", str(weight),
                 "--size", str(c.size), "--group", str(c.peers), "--matchmaking-time", str(c.matchmaking_time),
                 "--compression", c.compression]
        flags += ["--error-feedback"] * c.error_feedback + ["--client-mode"] * (c.client and i == c.peers - 1)
        flags += ["--clip-tau", str(c.clip_tau)] if c.clip_tau is not None else []
        worker = self._worker(i + 1, flags)
        try:
            self.members[i] = Member(i, worker, seed, weight)
        except BaseException:
            worker.kill()
            raise
        return self.members[i]

    def table(self) -> dict[str, list]:
        return {m.peer_id: [m.seed, m.weight] for m in self.members if m is not None}

    def send_round(self, round_no: int, indices: list[int]) -> dict[int, int]:
        table = self.table()
        return {i: self.members[i].worker.send("round", round=round_no, peers=table) for i in indices}

    def receive(self, i: int, request: int, timeout: float) -> dict:
        try:
            return self.members[i].worker.receive(request, timeout)
        except WorkerError as e:
            return {"lost": str(e)[:500]}

    def close(self) -> None:
        for m in self.members:
            if m is not None:
                m.worker.kill()
                m.worker.close(timeout=1)
        if getattr(self, "bootstrap", None) is not None:
            self.bootstrap.close(timeout=5)
        if self.topology is not None:
            self.topology.close()

    def __enter__(self) -> "Swarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_round(replies: dict[int, dict], deadlines: dict[int, float], config: TrialConfig,
                round_no: int) -> list[str]:
    """The contract of ``step()`` on every reply of one round (see the module docstring, step 3)."""
    violations = []
    groups: dict[tuple, set] = defaultdict(set)
    for i, r in replies.items():
        if "lost" in r:
            violations.append(f"round {round_no}: member {i} gave no answer ({r['lost'][:200]})")
            continue
        if "exception" in r:
            violations.append(f"round {round_no}: member {i}: step() raised {r['exception'][:300]}")
            continue
        if r["wall"] > deadlines[i] + SLACK_S:
            violations.append(f"round {round_no}: member {i} returned after {r['wall']:.1f}s, "
                              f"deadline {deadlines[i]:.1f}s")
        if not r["ok"]:
            if not r["unchanged"]:
                violations.append(f"round {round_no}: member {i} failed ({r['reason']}) but its tensor changed")
            continue
        if r.get("max_err") is None:
            violations.append(f"round {round_no}: member {i} ok with unknown contributors {r['contributors']}")
            continue
        if config.clip_tau is None and r["max_err"] > config.tolerance:
            violations.append(f"round {round_no}: member {i} ok but {r['max_err']:.3g} from the mean of its "
                              f"{len(r['contributors'])} contributors")
        if r["bounds_err"] > config.tolerance:
            violations.append(f"round {round_no}: member {i} ok but {r['bounds_err']:.3g} outside its "
                              f"contributors' values")
        groups[tuple(sorted(r["peers"]))].add((r["digest"], tuple(r["contributors"])))
    for group, outcomes in groups.items():
        if len(outcomes) > 1:
            violations.append(f"round {round_no}: members of one group hold different results: "
                              f"{len(outcomes)} digests/contributor sets among {len(group)} peers")
    return violations


def run_round(swarm: Swarm, round_no: int, indices: list[int], fault: Callable[[], None] | None = None,
              fault_at: float = 0.0, extra_wait: dict[int, float] | None = None) -> tuple[dict, dict]:
    """One round on ``indices`` (the fault, if any, fires ``fault_at`` s after the start); replies and deadlines."""
    deadlines = {i: swarm.members[i].step_timeout + (extra_wait or {}).get(i, 0.0) for i in indices}
    requests = swarm.send_round(round_no, indices)
    started = time.monotonic()
    if fault is not None:
        time.sleep(max(0.0, started + fault_at - time.monotonic()))
        fault()
    replies = {}
    for i, rid in requests.items():
        left = started + deadlines[i] + 30.0 - time.monotonic()
        replies[i] = swarm.receive(i, rid, max(left, 1.0))
    return replies, deadlines


@dataclass
class Calibration:
    round_s: float                   # from the start of a round to its last member's answer
    phase_ends: dict[str, float]     # median time each phase ends (PHASE_ENDS)

    def phase(self, at: float) -> str:
        for name, mark in zip(PHASES, PHASE_ENDS):
            if at < self.phase_ends.get(mark, float("inf")):
                return name
        return PHASES[-1]


def calibrate(swarm: Swarm, first_round: int) -> tuple[Calibration, list[str]]:
    """Rounds without faults: how long a round takes and where its phases end (they must also keep the contract)."""
    walls, marks, violations = [], defaultdict(list), []
    everyone = list(range(swarm.config.peers))
    for r in range(swarm.config.calibration_rounds):
        replies, deadlines = run_round(swarm, first_round + r, everyone)
        violations += check_round(replies, deadlines, swarm.config, first_round + r)
        if all(x.get("ok") for x in replies.values()):
            walls.append(max(x["wall"] for x in replies.values()))
            for x in replies.values():
                for k, v in x["timeline"].items():
                    marks[k].append(v)
    if not walls:
        raise RuntimeError(f"no calibration round succeeded on every member: {violations[:3]}")
    return Calibration(statistics.median(walls), {k: statistics.median(v) for k, v in marks.items()}), violations


def run_trials(config: TrialConfig, trials: int, workdir: Path, seed: int = 0,
               on_trial: Callable[[TrialRecord], None] | None = None) -> tuple[Calibration, list[TrialRecord]]:
    """Calibrate, then run ``trials`` faulted rounds (module docstring, steps 1-5)."""
    rng = random.Random(seed)
    records: list[TrialRecord] = []
    with Swarm(config, workdir) as swarm:
        calibration, violations = calibrate(swarm, 0)
        if violations:
            records.append(TrialRecord("none", -1, 0.0, "calibration", violations))
        round_no = config.calibration_rounds
        for _ in range(trials):
            record = one_trial(swarm, calibration, round_no, rng)
            round_no += 2
            records.append(record)
            if on_trial is not None:
                on_trial(record)
    return calibration, records


def one_trial(swarm: Swarm, calibration: Calibration, round_no: int, rng: random.Random) -> TrialRecord:
    n = swarm.config.peers
    kind, victim = rng.choice(swarm.kinds), rng.randrange(n)
    low, high = swarm.config.window
    at = rng.uniform(low * calibration.round_s, high * calibration.round_s)
    record = TrialRecord(kind, victim, at, calibration.phase(at))
    member = swarm.members[victim]
    pid = member.worker.pid
    frozen_s = rng.uniform(0.2, 2 * calibration.round_s) if kind == "stop_cont" else 0.0

    def fault() -> None:
        if kind in ("kill", "restart"):
            os.kill(pid, signal.SIGKILL)
        elif kind in ("stop", "stop_cont"):
            os.kill(pid, signal.SIGSTOP)
            if kind == "stop_cont":
                threading.Timer(frozen_s, os.kill, (pid, signal.SIGCONT)).start()
        elif kind == "cut":
            swarm.topology.set_link(victim + 1, up=False)

    survivors = [i for i in range(n) if i != victim]
    answering = survivors + [victim] * (kind in ("stop_cont", "cut"))
    replies, deadlines = run_round(swarm, round_no, answering, fault, at, {victim: frozen_s})
    record.violations += check_round(replies, deadlines, swarm.config, round_no)
    record.ok = sum(bool(replies[i].get("ok")) for i in survivors)
    record.failed = len(survivors) - record.ok
    if kind == "restart":
        member.worker.kill()
        swarm.start_member(victim)
    # the next round: the faulty member still dead, frozen or cut off (a restarted or resumed one takes part)
    following = survivors + [victim] * (kind in ("stop_cont", "restart", "cut"))
    replies, deadlines = run_round(swarm, round_no + 1, following)
    record.violations += check_round(replies, deadlines, swarm.config, round_no + 1)
    record.next_ok = sum(bool(replies[i].get("ok")) for i in survivors)
    record.next_failed = len(survivors) - record.next_ok
    if record.next_failed:
        reasons = Counter(replies[i].get("reason") or replies[i].get("exception") or replies[i].get("lost", "")[:80]
                          for i in survivors if not replies[i].get("ok"))
        failed = [i for i in survivors if not replies[i].get("ok")]
        record.liveness.append(f"round {round_no + 1}: the next round failed on {record.next_failed} of "
                                 f"{len(survivors)} survivors (members {failed}): {dict(reasons)}")
    # heal: a dead or frozen member is replaced, a cut link restored
    if kind in ("kill", "stop"):
        member.worker.kill()
        swarm.start_member(victim)
    elif kind == "cut":
        swarm.topology.set_link(victim + 1, up=True)
    for i in range(n):   # a survivor that died is a violation, and is replaced so that the series goes on
        if swarm.members[i].worker.proc.poll() is not None:
            record.violations.append(f"member {i} exited (code {swarm.members[i].worker.proc.returncode})")
            swarm.start_member(i)
    return record


def summarize(calibration: Calibration, records: list[TrialRecord], config: TrialConfig) -> dict:
    """Counts of trials and violations per fault kind, per phase, and per both."""
    def count(key) -> dict:
        out: dict[str, dict[str, int]] = {}
        for r in records:
            slot = out.setdefault(key(r), {"trials": 0, "violations": 0, "next_round_failed": 0})
            slot["trials"] += 1
            slot["violations"] += bool(r.violations)
            slot["next_round_failed"] += bool(r.liveness)
        return dict(sorted(out.items()))
    trials = [r for r in records if r.kind != "none"]
    return {
        "trials": len(trials), "violations": sum(bool(r.violations) for r in records),
        "next_round_failed": sum(bool(r.liveness) for r in records),
        "config": asdict(config), "round_s": round(calibration.round_s, 3),
        "phase_ends_s": {k: round(v, 3) for k, v in calibration.phase_ends.items()},
        "by_kind": count(lambda r: r.kind), "by_phase": count(lambda r: r.phase),
        "by_kind_phase": count(lambda r: f"{r.kind}/{r.phase}"),
        "faulted_round_ok": sum(r.ok for r in trials), "faulted_round_failed": sum(r.failed for r in trials),
        "examples": [v for r in records for v in r.violations][:10],
        "next_round_examples": [v for r in records for v in r.liveness][:5],
    }
