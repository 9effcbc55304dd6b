"""The swarm of ``bench/chaos.py``: its peers as processes in network namespaces, started, signalled, restarted.

:class:`Swarm` lays out one :class:`testbed.netns.Topology` host per peer -- ``bootstrap`` (DHT only),
``experts0..`` (``--experts N --expert-checkpoint-dir``), ``trainer0..`` (``--train --model tiny
--shard i/N --checkpoint-dir --metrics-port``) -- plus one for the probe (``testbed/chaos_probe.py``). Every
peer has an ``--identity`` file made before it first starts, so its peer ID is known in advance and
survives restarts. Each peer's stderr is read line by line into its log file (``<work>/logs/<name>.log``)
and into the :class:`testbed.chaos_checks.Monitor`; the probe's stdout reports go to the monitor too.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from testbed.chaos_checkpoints import dense_spread, verify_checkpoints
from testbed.chaos_checks import Monitor
from testbed.chaos_probe import docker_module

REPO = Path(__file__).resolve().parent.parent
PORT, METRICS_PORT, SWARM = 31337, 9100, "chaos"


class SwarmPeer:
    """One peer: its command line, its current process and the monitor it reports to."""

    def __init__(self, name: str, role: str, host: int, argv: list[str], peer_id: str, work: Path):
        self.name, self.role, self.host, self.argv, self.peer_id = name, role, host, argv, peer_id
        self.checkpoint_dir = work / name / "ckpt" if role == "trainer" else None
        self.expert_dir = work / name / "experts" if role == "experts" else None
        self.log_path = work / "logs" / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.pump: threading.Thread | None = None
        self.expect_exit = False
        self.sent_at = 0.0                 # when the last SIGTERM/SIGKILL was sent
        self.incarnations, self.exit_codes = 0, []

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.is_running():
            os.kill(self.proc.pid, sig)


class Swarm:
    """Peers of a chaos run (see the module docstring); ``start`` returns once every trainer shares its state."""

    def __init__(self, args, work: Path, bounds: dict):
        from testbed.netns import Topology
        from p2p import load_or_create_identity, peer_id_of

        self.args, self.work = args, work
        (work / "logs").mkdir(parents=True, exist_ok=True)
        roles = [("bootstrap", "bootstrap")] + [(f"experts{i}", "experts") for i in range(args.experts)] + \
                [(f"trainer{i}", "trainer") for i in range(args.trainers)]
        self.topo = Topology(len(roles) + 1, bandwidth_mbit=args.bandwidth_mbit or None)
        self.probe_host = len(roles)
        ids = {name: peer_id_of(load_or_create_identity(str(work / f"{name}.key"))) for name, _ in roles}
        self.bootstrap = f"/ip4/{self.topo.addr(0)}/tcp/{PORT}/p2p/{ids['bootstrap']}"
        from peer.config import ModelConfig
        cfg = ModelConfig.preset("tiny")
        per_host = math.ceil(cfg.n_layer * math.prod(cfg.grid_size) / args.experts)
        self.peers: dict[str, SwarmPeer] = {}
        for host, (name, role) in enumerate(roles):
            argv = [sys.executable, "-m", "peer", "--host-maddrs", f"/ip4/{self.topo.addr(host)}/tcp/{PORT}",
                    "--identity", str(work / f"{name}.key"), "--swarm", SWARM]
            if role != "bootstrap":
                argv += ["--initial-peers", self.bootstrap, "--model", "tiny"]
            peer = SwarmPeer(name, role, host, argv, ids[name], work)
            if role == "experts":
                argv += ["--experts", str(per_host), "--device", "cpu", "--expert-checkpoint-dir", str(peer.expert_dir)]
            if role == "trainer":
                i = int(name[len("trainer"):])
                # a restarted trainer catches up from the others: with the default 3 trainers, only 2 remain
                # to vouch for a state (one donor, one confirmation)
                argv += ["--train", "--shard", f"{i}/{args.trainers}", "--checkpoint-dir", str(peer.checkpoint_dir),
                         "--metrics-port", str(METRICS_PORT),
                         "--state-confirmations", str(min(2, max(0, args.trainers - 2)))]
            self.peers[name] = peer
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        services = docker_module("netns_swarm").load_services()      # the compose file's stop_grace_period
        self.grace_s = max(s.stop_grace_s for s in services if s.role in ("trainer", "experts", "bootstrap"))
        bounds = {**bounds, "shutdown_grace_s": self.grace_s}
        self.started = time.monotonic()
        self.monitor = Monitor([(n, p.role, p.peer_id) for n, p in self.peers.items()], self.started, bounds)
        self.probe: subprocess.Popen | None = None
        self.probe_reader: threading.Thread | None = None

    # ------------------------------------------------------------------ processes
    def start(self) -> None:
        self.topo.start()
        deadline = time.monotonic() + self.args.startup_timeout
        self.start_peer("bootstrap")
        self._wait(lambda: self.monitor.peers["bootstrap"].listening_at, deadline, "the bootstrap peer to listen")
        for name, peer in self.peers.items():   # one expert host after the other: each takes the least-hosted UIDs
            if peer.role == "experts":
                self.start_peer(name)
                self._wait(lambda: self.monitor.peers[name].ready_at, deadline, f"{name} to host experts")
        for name, peer in self.peers.items():
            if peer.role == "trainer":
                self.start_peer(name)
        for name, peer in self.peers.items():
            if peer.role == "trainer":
                self._wait(lambda: self.monitor.peers[name].ready_at, deadline, f"{name} to share its state")
        self._start_probe()

    def _wait(self, condition, deadline: float, what: str) -> None:
        while not condition():
            self.check_exits(restart=False)
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for {what} (--startup-timeout {self.args.startup_timeout:.0f}s)")
            time.sleep(0.2)

    def start_peer(self, name: str, resume_step: int | None = None) -> None:
        peer = self.peers[name]
        if peer.pump is not None:
            peer.pump.join(5.0)            # the previous incarnation's last lines are in before the new ones
        self.monitor.started_process(name, time.monotonic(), resume_step)
        peer.proc = self.topo.run(peer.host, peer.argv, env=self.env, cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, errors="replace")
        peer.expect_exit, peer.incarnations = False, peer.incarnations + 1
        peer.pump = threading.Thread(target=self._pump, args=(peer, peer.proc, peer.incarnations), daemon=True)
        peer.pump.start()

    def _pump(self, peer: SwarmPeer, proc: subprocess.Popen, incarnation: int) -> None:
        with open(peer.log_path, "a") as log:
            log.write(f"===== incarnation {incarnation}, pid {proc.pid}\n")
            for line in proc.stderr:
                now = time.monotonic()
                log.write(f"{now - self.started:8.2f} {line}")
                log.flush()
                self.monitor.on_line(peer.name, now, line)

    def send(self, name: str, sig: int) -> None:
        """Send SIGTERM or SIGKILL to a peer that is to exit (it is no longer expected to answer)."""
        peer = self.peers[name]
        self.monitor.leaving_now(name)
        peer.expect_exit, peer.sent_at = True, time.monotonic()
        peer.signal(sig)

    def kill(self, name: str, sig: int, send: bool = True) -> float | None:
        """Send SIGKILL or SIGTERM (unless ``send`` is False: already sent) and wait for the exit.

        Returns the seconds the exit took, or None if the peer did not exit within the grace period
        (a ``no_hang`` violation; it is then SIGKILLed)."""
        peer = self.peers[name]
        if send:
            self.send(name, sig)
        try:
            peer.proc.wait(timeout=max(0.1, peer.sent_at + (self.grace_s if sig == signal.SIGTERM else 10.0)
                                       - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.monitor.violate(time.monotonic(), name, "no_hang", f"did not exit within {self.grace_s:.0f}s of "
                                                                   f"{signal.Signals(sig).name}")
            peer.proc.kill()
            peer.proc.wait(timeout=10.0)
            return self._exited(peer, None)
        if sig == signal.SIGTERM and peer.proc.returncode != 0:
            self.monitor.violate(time.monotonic(), name, "no_crash", f"exit code {peer.proc.returncode} after SIGTERM")
        return self._exited(peer, time.monotonic() - peer.sent_at)

    def reap_killed(self, name: str) -> None:
        """A peer someone else SIGKILLed (``SaveKiller``): wait for it and record the exit."""
        peer = self.peers[name]
        peer.expect_exit = True
        peer.proc.wait(timeout=10.0)
        self._exited(peer, 0.0)

    def _exited(self, peer: SwarmPeer, seconds: float | None) -> float | None:
        peer.exit_codes.append(peer.proc.returncode)
        self.monitor.exited(peer.name, time.monotonic(), True, peer.proc.returncode)
        return None if seconds is None else round(seconds, 2)

    def check_exits(self, restart: bool = True) -> None:
        """Record peers that exited by themselves (a crash) and start them again."""
        for name, peer in self.peers.items():
            if peer.proc is not None and not peer.expect_exit and peer.proc.poll() is not None:
                peer.expect_exit = True
                peer.exit_codes.append(peer.proc.returncode)
                self.monitor.exited(name, time.monotonic(), False, peer.proc.returncode)
                if restart:
                    self.start_peer(name)

    def _start_probe(self) -> None:
        ids = {p.peer_id: f"/ip4/{self.topo.addr(p.host)}/tcp/{PORT}/p2p/{p.peer_id}" for p in self.peers.values()}
        metrics = {p.peer_id: f"http://{self.topo.addr(p.host)}:{METRICS_PORT}/metrics"
                   for p in self.peers.values() if p.role == "trainer"}
        argv = [sys.executable, str(REPO / "testbed" / "chaos_probe.py"), "--initial-peers", self.bootstrap,
                "--swarm", SWARM, "--peers", json.dumps(ids), "--metrics", json.dumps(metrics), "--interval", "3"]
        log = open(self.work / "logs" / "probe.log", "w")
        self.probe = self.topo.run(self.probe_host, argv, env=self.env, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=log, text=True)
        ready = threading.Event()
        self.probe_reader = threading.Thread(target=self._read_probe, args=(self.probe, ready), daemon=True)
        self.probe_reader.start()
        if not ready.wait(60.0):
            raise RuntimeError(f"the probe did not start; see {self.work / 'logs' / 'probe.log'}")

    def _read_probe(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        reports = open(self.work / "logs" / "probe.jsonl", "w")
        for line in proc.stdout:
            reports.write(line)
            reports.flush()
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if report.get("ready"):
                ready.set()
            elif "t0" in report:
                self.monitor.on_probe(report)

    # ------------------------------------------------------------------ checkpoints
    def check_checkpoints(self, name: str, kind: str) -> dict:
        """After a peer died: its checkpoints must load (the project's loader) and hold finite tensors."""
        peer = self.peers[name]
        directory = peer.checkpoint_dir or peer.expert_dir
        states, problems = verify_checkpoints(directory)
        self.monitor.checks["checkpoint_loads"] += len(states) + len(problems)
        for problem in problems:
            self.monitor.violate(time.monotonic(), name, "checkpoint" if "non-finite" not in problem else "no_nan",
                                 f"after {kind}: {problem}")
        detail = {"checkpoint_files": len(states)}
        if peer.role == "trainer" and "trainer.pt" in states:
            detail["checkpoint_step"] = int(states["trainer.pt"]["step"])
        if peer.role == "trainer":
            detail["temp_files_left"] = len(list(directory.glob(".trainer.pt.*.tmp")))
        return detail

    def final_checkpoints(self, threshold: float, step) -> dict:
        """SIGTERM every trainer right after a common round, then compare their averaged dense weights."""
        trainers = [n for n, p in self.peers.items() if p.role == "trainer"]
        aligned = False
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and not aligned:
            step(time.monotonic())
            last = [self.monitor.last_averaging(n) for n in trainers]
            now = time.monotonic()
            aligned = all(a is not None and a["ok"] and a["group"] == len(trainers) for a in last) and \
                max(a["t"] for a in last) - min(a["t"] for a in last) < 5.0 and now - max(a["t"] for a in last) < 3.0
            time.sleep(0.1)
        for n in trainers:                      # all at once, so that no round is left half-done
            self.send(n, signal.SIGTERM)
        shutdown = {n: self.kill(n, signal.SIGTERM, send=False) for n in trainers}
        states = {}
        for n in trainers:
            loaded, problems = verify_checkpoints(self.peers[n].checkpoint_dir)
            self.monitor.checks["checkpoint_loads"] += len(loaded) + len(problems)
            for problem in problems:
                self.monitor.violate(time.monotonic(), n, "checkpoint", f"final checkpoint: {problem}")
            if "trainer.pt" in loaded:
                states[n] = loaded["trainer.pt"]
        result = {"aligned_shutdown": aligned, "threshold": threshold, "shutdown_s": shutdown,
                  "temp_files_left": {n: len(list(self.peers[n].checkpoint_dir.glob(".trainer.pt.*.tmp")))
                                      for n in trainers}}
        if len(states) < 2:
            self.monitor.violate(time.monotonic(), "trainers", "reconvergence", "fewer than 2 final checkpoints")
            return result
        result.update(dense_spread(states))
        if not result["spread"] <= threshold:
            self.monitor.violate(time.monotonic(), "trainers", "reconvergence",
                                 f"relative spread of the averaged weights {result['spread']:.3g} > {threshold:g} "
                                 f"(sync rounds {result['sync_rounds']})")
        return result

    # ------------------------------------------------------------------ the end
    def stop_all(self) -> dict:
        """SIGTERM every peer still running (in reverse start order), each within the grace period."""
        running = [n for n, p in self.peers.items() if p.is_running() and not p.expect_exit]
        for name in running:                    # like `docker compose stop`: all at once, then wait
            self.send(name, signal.SIGTERM)
        shutdown = {name: self.kill(name, signal.SIGTERM, send=False) for name in running}
        out = {}
        for name, peer in self.peers.items():
            out[name] = {"role": peer.role, "peer_id": peer.peer_id, "incarnations": peer.incarnations,
                         "exit_codes": peer.exit_codes, **({"shutdown_s": shutdown[name]} if name in shutdown else {})}
        if self.probe is not None and self.probe.poll() is None:
            self.probe.terminate()
            try:
                self.probe.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                self.probe.kill()
        return out

    def close(self) -> None:
        for peer in self.peers.values():
            peer.signal(signal.SIGCONT)
        self.topo.close()
        for peer in self.peers.values():
            if peer.pump is not None:
                peer.pump.join(5.0)
