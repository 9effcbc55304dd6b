"""The invariants of ``bench/chaos.py``, checked continuously while faults are injected.

:class:`Monitor` is told what the driver does to each peer (start, SIGKILL, SIGSTOP/SIGCONT, link cut),
reads every line the peers log and every report of the probe (``testbed/chaos_probe.py``), and records a
:class:`Violation` ``{t, peer, invariant, detail}`` whenever one of these fails:

* ``no_hang`` -- an averaging step lasted longer than its deadline (:func:`averaging_deadline_s`), a running
  trainer showed no training progress for ``step_bound_s``, a running peer answered no DHT ping for
  ``ping_hang_s``, or a peer did not exit within the grace period after SIGTERM;
* ``no_nan`` -- a loss (log line or metrics gauge) or a checkpoint tensor is not finite;
* ``no_crash`` -- a peer exited without being told to, or exited non-zero after SIGTERM;
* ``checkpoint`` -- a trainer's checkpoint (or an expert host's) does not load with
  :func:`peer.checkpoint.load_checkpoint` after a SIGKILL, or a restarted trainer did not resume from it;
* ``dht_records`` -- a live, reachable peer's records were not found by the probe after their grace:
  expert declarations (``HostingConfig.heartbeat`` + 2 DHT RPC timeouts), trainers' state offers
  (``TrainConfig.share_every`` + 2 RPC timeouts) and progress records (written before every averaging
  round, they live ``PROGRESS_TTL_S``);
* ``expert_coverage`` -- every expert host is up and declared, yet some expert UIDs of the model are
  hosted by nobody (a restarted host took UIDs the other host already serves);
* ``recovery`` -- a faulted peer never recovered (trainers: a successful averaging step; expert hosts:
  found in the DHT and answering pings) before the end of the run;
* ``reconvergence`` -- after the quiet period the trainers' averaged dense weights differ (see
  :func:`testbed.chaos_checkpoints.dense_spread`; checked by the driver, like checkpoint loading).

Every bound is derived from the code's own defaults when the monitor is built (:func:`derive_bounds`).
"""
from __future__ import annotations

import math
import re
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field

AVERAGING_LINE = re.compile(r"Averaging step (\d+): (ok|FAILED) with (\d+) peers in ([\d.]+)s")
LOSS_LINE = re.compile(r"step (\d+): train loss (\S+), eval loss (\S+?),")
FIRST_EVAL = re.compile(r"step 0: eval loss (\S+) \(before training\)")
FINAL_EVAL = re.compile(r"Finished: .* final eval loss (\S+?),")
RESUMED = re.compile(r"Resumed from .* at step (\d+)")
LISTENING = re.compile(r"Node (\S+) listening on")
PROGRESS_HINTS = ("Skipped a step", "Caught up with the swarm", "Resumed from")
PROGRESS_TTL_S = 60.0   # peer.training.trainer.Trainer.publish_progress: records expire get_dht_time() + 60


@dataclass
class Violation:
    """One broken invariant: when (seconds since the run began), which peer, which invariant, what happened."""

    t: float
    peer: str
    invariant: str
    detail: str


def dense_numel(model: str = "tiny") -> int:
    """How many values a trainer of ``model`` averages (its trainable dense parameters)."""
    from peer.config import ModelConfig
    from peer.training.model import MoETransformer

    net = MoETransformer(ModelConfig.preset(model))   # local experts: only the dense part is counted
    return sum(p.numel() for p in net.dense_parameters() if p.requires_grad)


def averaging_deadline_s(numel: int) -> float:
    """The budget ``Averager.step`` gives itself for ``numel`` float32 values with the trainer's settings."""
    from averaging.averager import round_config, step_timeout
    from averaging.config import AveragerConfig
    from averaging.matchmaking import Deadlines
    from peer.training.trainer import TrainConfig

    train = TrainConfig()
    config = AveragerConfig(compression=train.compression, matchmaking_time=train.matchmaking_time)
    return step_timeout(config, round_config(config, numel, "chaos"), numel, Deadlines(config.matchmaking_time))


def derive_bounds(model: str = "tiny") -> dict:
    """Graces and deadlines, in seconds, from the defaults of the code under test.

    * ``averaging_deadline_s``: ``Averager``'s own budget for one step (averaging.averager.step_timeout:
      matchmaking, the transfer at the declared bandwidth, a start and a repair's deadlines); a logged step may exceed
      it by ``averaging_slack_s`` (logging, a loaded CPU), unless the trainer itself was faulted meanwhile;
    * ``step_bound_s``: the longest a running trainer may go without training progress (a sample, a loss
      or averaging line): one step whose every layer waits out the forward and backward deadline of an
      unresponsive expert host, plus publishing progress (~4 DHT RPC deadlines) and a failing round;
    * ``startup_bound_s``: from launch to the first progress: 30 s to start Python and torch, catching up
      with the swarm (``TrainConfig.state_timeout``), then one step;
    * ``expert_grace_s`` / ``state_grace_s``: how long a peer must have been up and reachable before its
      expert declarations / state offer must be found: its re-announce period plus 2 DHT RPC deadlines;
    * ``progress_ttl_s``, ``progress_margin_s``: a progress record stored while the trainer was reachable
      must be found until it expires, less 2 RPC deadlines;
    * ``ping_grace_s``, ``ping_hang_s``: a reachable peer whose node is up must answer a DHT ping at least
      every ``ping_hang_s`` (each probe round tries twice), counted from ``ping_grace_s`` after it came up.
    """
    import inspect

    from dht.config import DHTConfig
    from peer.config import ModelConfig
    from peer.moe.remote import RemoteMixtureOfExperts
    from peer.hosting.config import HostingConfig
    from peer.training.trainer import TrainConfig

    rpc = DHTConfig().rpc_timeout
    moe = inspect.signature(RemoteMixtureOfExperts.__init__).parameters
    heartbeat = HostingConfig().heartbeat
    config = TrainConfig()
    averaging = averaging_deadline_s(dense_numel(model))
    n_layer = ModelConfig.preset(model).n_layer
    # one local step may wait for every layer's forward and backward call to a silent expert host, then
    # (every local_steps steps) publish progress (a store and a get: ~4 RPC deadlines) and average
    step = n_layer * (moe["forward_timeout"].default + moe["backward_timeout"].default) + 4 * rpc + averaging
    return {"averaging_deadline_s": round(averaging, 2), "averaging_slack_s": 2.0,
            "step_bound_s": round(step, 1),
            # a (re)started trainer: interpreter + torch import (allow 30 s on a loaded machine), catching up
            # with the swarm (TrainConfig.state_timeout), then its first step
            "startup_bound_s": round(30.0 + config.state_timeout + step, 1),
            "expert_grace_s": heartbeat + 2 * rpc, "state_grace_s": config.share_every + 2 * rpc,
            "progress_ttl_s": PROGRESS_TTL_S, "progress_margin_s": 2 * rpc,
            "ping_grace_s": 2 * rpc, "ping_hang_s": 5 * rpc}


@dataclass
class PeerState:
    """What the monitor knows of one peer. Times are ``time.monotonic()``."""

    name: str
    role: str                                   # bootstrap | experts | trainer
    peer_id: str
    alive: bool = False
    leaving: bool = False                       # sent SIGTERM/SIGKILL, not yet exited
    stopped: bool = False
    cut: bool = False
    incarnation: int = 0
    launched_at: float | None = None
    reachable_since: float | None = None        # continuously alive, running and connected since
    listening_at: float | None = None           # this incarnation's node is up
    ready_at: float | None = None               # experts declared / state sharer announced (this incarnation)
    trained_at: float | None = None             # last training progress (this incarnation)
    samples: float | None = None
    last_step: int | None = None                # step of its latest "step N: train loss" line
    last_ping_ok: float | None = None
    last_publish: float | None = None           # latest progress record store (lower bound of its time)
    resume_expected: int | None = None          # checkpoint step a restart must resume from
    seen: list = field(default_factory=list)    # probe rounds that found its records and got a ping answer
    fault_windows: list = field(default_factory=list)
    flagged: set = field(default_factory=set)   # open violation episodes (reported once each)


class Monitor:
    """Collects events and checks the invariants; thread-safe (log pumps, probe reader and driver call it)."""

    def __init__(self, peers: list[tuple[str, str, str]], started: float, bounds: dict | None = None):
        self.peers = {name: PeerState(name, role, peer_id) for name, role, peer_id in peers}
        self.by_id = {p.peer_id: p for p in self.peers.values()}
        self.started, self.bounds = started, bounds or derive_bounds()
        self.violations: list[Violation] = []
        self.averaging: list[dict] = []
        self.losses: list[dict] = []
        self.probe_rounds = 0
        self.checks: Counter[str] = Counter()     # how often each check ran (a check that never runs proves nothing)
        self.max_silence_s = 0.0
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ bookkeeping
    def violate(self, now: float, peer: str, invariant: str, detail: str) -> None:
        with self.lock:
            self.violations.append(Violation(round(now - self.started, 2), peer, invariant, detail))

    def _episode(self, p: PeerState, key: str, now: float, invariant: str, detail: str) -> None:
        if key not in p.flagged:
            p.flagged.add(key)
            self.violate(now, p.name, invariant, detail)

    def available_since(self, p: PeerState, need_ready: bool = True) -> float | None:
        """Since when ``p`` has been alive, running, connected and (if asked) ready; None if it is not now."""
        if p.reachable_since is None or (need_ready and p.ready_at is None):
            return None
        return max(p.reachable_since, p.ready_at) if need_ready else p.reachable_since

    # ------------------------------------------------------------------ what the driver did
    def started_process(self, name: str, now: float, resume_step: int | None = None) -> None:
        with self.lock:
            p = self.peers[name]
            p.alive, p.leaving, p.stopped, p.incarnation, p.launched_at = True, False, False, p.incarnation + 1, now
            p.listening_at = p.ready_at = p.trained_at = p.samples = p.last_publish = None
            p.resume_expected = resume_step
            p.reachable_since = None if p.cut else now
            p.flagged.clear()

    def exited(self, name: str, now: float, expected: bool, returncode: int | None) -> None:
        with self.lock:
            p = self.peers[name]
            if p.alive and not expected:
                self.violate(now, name, "no_crash", f"exited by itself with code {returncode}")
            p.alive, p.reachable_since = False, None

    def leaving_now(self, name: str) -> None:
        """The driver is about to SIGTERM/SIGKILL ``name``: it is no longer expected to answer."""
        with self.lock:
            p = self.peers[name]
            p.leaving, p.reachable_since = True, None

    def fault_began(self, name: str, now: float, kind: str) -> None:
        with self.lock:
            p = self.peers[name]
            p.fault_windows.append([now, None])
            if kind == "sigstop":
                p.stopped = True
            elif kind == "link_cut":
                p.cut = True
            p.reachable_since = None

    def fault_ended(self, name: str, now: float, kind: str) -> None:
        with self.lock:
            p = self.peers[name]
            if p.fault_windows and p.fault_windows[-1][1] is None:
                p.fault_windows[-1][1] = now
            if kind == "sigstop":
                p.stopped = False
            elif kind == "link_cut":
                p.cut = False
            if p.alive and not p.leaving and not p.stopped and not p.cut:
                p.reachable_since = now

    def _faulted_during(self, p: PeerState, start: float, end: float) -> bool:
        return any(s <= end and (e is None or e >= start) for s, e in p.fault_windows)

    # ------------------------------------------------------------------ what the peers said
    def on_line(self, name: str, now: float, line: str) -> None:
        """One stderr line of peer ``name`` (current incarnation)."""
        with self.lock:
            p = self.peers[name]
            if (m := LISTENING.search(line)) is not None:
                p.listening_at = now
                if m.group(1) != p.peer_id:
                    self.violate(now, name, "checkpoint", f"restarted with peer ID {m.group(1)}, not {p.peer_id}")
            if "Hosting " in line and p.role == "experts":
                p.ready_at = now
            if "snapshot of step" in line and p.role == "trainer" and p.ready_at is None:
                p.ready_at = now          # the state sharer starts after the checkpoint was restored
                if p.resume_expected is not None:
                    self.violate(now, name, "checkpoint", f"restarted without resuming from its checkpoint "
                                                          f"(step {p.resume_expected})")
                    p.resume_expected = None
            if (m := RESUMED.search(line)) is not None:
                if p.resume_expected is not None and int(m.group(1)) != p.resume_expected:
                    self.violate(now, name, "checkpoint", f"resumed at step {m.group(1)}, its checkpoint "
                                                          f"holds step {p.resume_expected}")
                p.resume_expected = None
            if (m := AVERAGING_LINE.search(line)) is not None:
                self._averaging_line(p, now, m)
            for pattern in (LOSS_LINE, FIRST_EVAL, FINAL_EVAL):
                if (m := pattern.search(line)) is not None:
                    self._loss_line(p, now, m, line)
            loss = LOSS_LINE.search(line)
            if loss is not None:
                p.last_step = int(loss.group(1))
            if loss is not None or any(h in line for h in PROGRESS_HINTS):
                p.trained_at = now

    def _averaging_line(self, p: PeerState, now: float, m: re.Match) -> None:
        ok, duration = m.group(2) == "ok", float(m.group(4))
        self.averaging.append({"t": now, "peer": p.name, "ok": ok, "group": int(m.group(3)), "s": duration})
        p.trained_at = now
        began = now - duration
        p.last_publish = began if not self._faulted_during(p, began - 15.0, now) else p.last_publish
        limit = self.bounds["averaging_deadline_s"] + self.bounds["averaging_slack_s"]
        if self._faulted_during(p, began, now):
            return
        self.checks["averaging_deadline"] += 1
        if duration > limit:
            self.violate(now, p.name, "no_hang", f"averaging step {m.group(1)} took {duration:.1f}s, "
                                                 f"deadline {self.bounds['averaging_deadline_s']:.1f}s")

    def _loss_line(self, p: PeerState, now: float, m: re.Match, line: str) -> None:
        values = []
        for text in m.groups()[1:] if m.re is LOSS_LINE else m.groups():
            if text != "skipped" and text != "none":
                try:
                    values.append(float(text))
                except ValueError:
                    values.append(math.nan)
        self.losses.append({"t": now, "peer": p.name, "values": values})
        self.checks["finite_loss_lines"] += 1
        if not all(math.isfinite(v) for v in values):
            self.violate(now, p.name, "no_nan", f"non-finite loss: {line.strip()[-160:]}")

    # ------------------------------------------------------------------ what the probe saw
    def on_probe(self, report: dict) -> None:
        """One round of ``testbed/chaos_probe.py``: check DHT records, pings and training progress."""
        with self.lock:
            self.probe_rounds += 1
            t0, b = report["t0"], self.bounds
            experts_settled: list[PeerState] = []
            for p in self.peers.values():
                since = self.available_since(p, need_ready=p.role != "bootstrap")
                listening = self.available_since(p, need_ready=False)
                ping = (report.get("ping") or {}).get(p.peer_id)
                if ping is not None:
                    p.last_ping_ok = t0
                if listening is not None and p.listening_at is not None:
                    up = max(listening, p.listening_at)
                    self.checks["ping"] += t0 - up > b["ping_grace_s"]
                    if t0 - up > b["ping_grace_s"] and t0 - max(up, p.last_ping_ok or up) > b["ping_hang_s"]:
                        self._episode(p, "ping", t0, "no_hang",
                                      f"answered no DHT ping for {t0 - max(up, p.last_ping_ok or up):.1f}s")
                    elif ping is not None:
                        p.flagged.discard("ping")
                if since is None:
                    continue
                part = {"experts": "experts", "trainer": "state"}.get(p.role)
                if ping is not None and part and p.peer_id in (report.get(part) or {}):
                    p.seen.append(t0)
                if p.role == "experts" and t0 - since > b["expert_grace_s"]:
                    self._require(p, report, "experts", t0, f"expert declarations (live {t0 - since:.0f}s)")
                if p.role == "trainer" and t0 - since > b["state_grace_s"]:
                    self._require(p, report, "state", t0, f"state offer (live {t0 - since:.0f}s)")
                if (p.role == "trainer" and p.last_publish is not None and p.last_publish >= since
                        and t0 < p.last_publish + b["progress_ttl_s"] - b["progress_margin_s"]):
                    self._require(p, report, "progress", t0, f"progress record (stored {t0 - p.last_publish:.0f}s ago)")
                metrics = (report.get("metrics") or {}).get(p.peer_id)
                if p.role == "experts" and t0 - since > b["expert_grace_s"]:
                    experts_settled.append(p)
                if p.role == "trainer" and metrics:
                    self._trainer_metrics(p, t0, metrics)
            hosts = [p for p in self.peers.values() if p.role == "experts"]
            missing = report.get("missing_experts")
            self.checks["expert_coverage"] += len(experts_settled) == len(hosts) and missing is not None
            if len(experts_settled) == len(hosts) and missing:   # every host is up and declared: all UIDs hosted
                self._episode(hosts[0], "coverage", t0, "expert_coverage",
                              f"{len(missing)} expert UIDs hosted by nobody while every host is up: {missing[:8]}")
            elif len(experts_settled) == len(hosts) and missing == []:
                hosts[0].flagged.discard("coverage")

    def _require(self, p: PeerState, report: dict, part: str, t0: float, what: str) -> None:
        self.checks[f"dht_{part}"] += 1
        found = report.get(part)
        if found is None or p.peer_id not in found:
            why = "the lookup failed: " + "; ".join(report.get("errors") or []) if found is None else "not found"
            self.violate(t0, p.name, "dht_records", f"{what}: {why}")

    def _trainer_metrics(self, p: PeerState, t0: float, metrics: dict) -> None:
        loss = metrics.get("train_loss")
        if loss is not None and not math.isfinite(loss):
            self._episode(p, "nan_gauge", t0, "no_nan", f"train loss gauge is {loss}")
        samples = metrics.get("samples")
        if samples is not None and (p.samples is None or samples > p.samples):
            if p.samples is not None or samples > 0:
                p.trained_at = t0
            p.samples = samples

    # ------------------------------------------------------------------ periodic checks
    def watchdog(self, now: float) -> None:
        """Training progress of every running trainer (call every second or so)."""
        with self.lock:
            for p in self.peers.values():
                if p.role != "trainer" or p.reachable_since is None:
                    continue
                if p.trained_at is None:
                    silent, bound, what = now - max(p.reachable_since, p.launched_at), \
                        self.bounds["startup_bound_s"], "since it started"
                else:
                    silent, bound, what = now - max(p.reachable_since, p.trained_at), \
                        self.bounds["step_bound_s"], "since its last progress"
                    self.max_silence_s = max(self.max_silence_s, silent)
                self.checks["training_progress"] += 1
                if silent > bound:
                    self._episode(p, f"silent{p.trained_at}", now, "no_hang",
                                  f"no training progress for {silent:.0f}s {what} (bound {bound:.0f}s)")

    def last_averaging(self, name: str) -> dict | None:
        """The latest averaging step peer ``name`` logged: ``{"t", "peer", "ok", "group", "s"}``."""
        with self.lock:
            steps = [a for a in self.averaging if a["peer"] == name]
        return steps[-1] if steps else None

    def recovered_after(self, name: str, t: float) -> float | None:
        """When ``name`` first worked again after ``t``: trainers, a successful averaging step; expert
        hosts, a probe round that found their declarations and got a ping answer. None: not yet."""
        with self.lock:
            p = self.peers[name]
            if p.role == "trainer":
                times = [a["t"] for a in self.averaging if a["peer"] == name and a["ok"] and a["t"] > t]
            else:
                times = [s for s in p.seen if s > t]
        return times[0] if times else None

    def summary(self) -> dict:
        with self.lock:
            rounds = [a for a in self.averaging]
            return {"violations": [asdict(v) for v in self.violations], "violation_count": len(self.violations),
                    "averaging_steps": {"ok": sum(a["ok"] for a in rounds), "failed": sum(not a["ok"] for a in rounds),
                                        "max_s": max((a["s"] for a in rounds), default=None)},
                    "checks": dict(self.checks), "probe_rounds": self.probe_rounds,
                    "max_training_silence_s": round(self.max_silence_s, 1)}
