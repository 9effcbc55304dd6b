"""Run the services of ``docker/docker-compose.yml`` as processes, each in its own network namespace.

No Docker needed, only root and iproute2: every compose service (bootstrap, expert hosts, trainers,
the one-shot ``join-config``) becomes a host of a :class:`testbed.netns.Topology` with its own IP
address and an upload/download cap, and runs *the very command the compose file gives it*::

    sudo python docker/netns_swarm.py --bandwidth-mbit 50 --samples 400

What is taken from the compose file, so the two cannot drift apart:

* each service's ``entrypoint`` (default: the image's ``python -m peer``) and ``command``; paths
  inside volumes (``/join/peers.yaml``, ``/data/ckpt``) point into one directory per named volume
  under the work directory, so volumes shared by several services are shared here too, and ``/app``
  is this repository;
* the start order: ``depends_on`` with ``service_completed_successfully`` (wait for exit 0) and
  ``service_healthy`` (run the service's healthcheck command in its namespace until it passes);
* service names as host names: a tiny DNS server answers ``A`` queries for every service name, and
  each namespace's ``resolv.conf`` points at it, so ``/dns4/bootstrap/tcp/31337`` is resolved by
  libp2p exactly as Docker's DNS resolves it.

Trainers (services with ``--train``) run ``--samples`` samples each (``--max-samples``); when they
have all exited, the other peers are stopped as ``docker compose stop`` would (SIGTERM, then
SIGKILL after ``stop_grace_period``). The last line printed is one JSON object: per peer its
role, whether it started, its exit code, and the last ``step N: train loss X, eval loss Y`` line its
stderr showed; ``ok`` says whether every peer started and every trainer exited 0 with an eval loss.
Namespaces, processes and ``/etc/netns`` files are removed on every exit path (exceptions, Ctrl+C,
SIGTERM; see :mod:`testbed.netns` for SIGKILL).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"
IMAGE_ENTRYPOINT = ["python", "-m", "peer"]     # ENTRYPOINT of docker/Dockerfile
APP_DIR = "/app"                                # WORKDIR of docker/Dockerfile: the repository
ETC_NETNS = Path("/etc/netns")                  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc
LOSS_LINE = re.compile(r"step (\d+): train loss ([\d.]+), eval loss ([\d.]+)")
FIRST_EVAL = re.compile(r"step 0: eval loss ([\d.]+) \(before training\)")


@dataclass
class Service:
    """One compose service, as far as running it is concerned."""

    name: str
    entrypoint: list[str]                 # the service's entrypoint, or the image's
    command: list[str]                    # its arguments (for peers: what `python -m peer` parses)
    mounts: dict[str, str]                # container path -> named volume
    depends_on: dict[str, str]            # service -> compose condition
    healthcheck: list[str] | None         # argv of the healthcheck test, without "CMD"
    stop_signal: str = "SIGTERM"          # what `docker compose stop` sends (the CLI shuts down cleanly)
    stop_grace_s: float = 10.0            # stop_grace_period: how long after it before SIGKILL

    @property
    def argv(self) -> list[str]:
        return self.entrypoint + self.command

    @property
    def role(self) -> str:
        """init (a one-shot helper with its own entrypoint), trainer, experts or bootstrap."""
        if self.entrypoint != IMAGE_ENTRYPOINT:
            return "init"
        return "trainer" if "--train" in self.command else "experts" if "--experts" in self.command else "bootstrap"


def load_services(path: str | os.PathLike = COMPOSE_FILE) -> list[Service]:
    """The compose file's services in a start order that respects ``depends_on`` (file order otherwise)."""
    with open(path) as f:
        spec = yaml.safe_load(f)
    raw = spec.get("services") or {}
    services = {}
    for name, s in raw.items():
        command = [str(a) for a in (s.get("command") or [])]
        entrypoint = [str(a) for a in s["entrypoint"]] if "entrypoint" in s else list(IMAGE_ENTRYPOINT)
        mounts = {}
        for v in s.get("volumes") or []:
            if not isinstance(v, str) or v.startswith((".", "/", "~")):
                raise ValueError(f"{path}: service {name}: only named volumes in short syntax are supported, got {v!r}")
            volume, target = v.split(":")[:2]
            mounts[target] = volume
        deps = s.get("depends_on") or {}
        deps = {d: "service_started" for d in deps} if isinstance(deps, list) else \
            {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}
        test = (s.get("healthcheck") or {}).get("test")
        health = [str(a) for a in test[1:]] if isinstance(test, list) and test[:1] == ["CMD"] else None
        services[name] = Service(name, entrypoint, command, mounts, deps, health, str(s.get("stop_signal", "SIGTERM")),
                                 _seconds(s.get("stop_grace_period", "10s")))
    ordered: list[Service] = []
    while len(ordered) < len(services):
        ready = [s for s in services.values() if s not in ordered and all(
            d in [o.name for o in ordered] for d in s.depends_on)]
        if not ready:
            raise ValueError(f"{path}: depends_on has a cycle or names an unknown service")
        ordered.append(ready[0])
    return ordered


def localize(argv: list[str], mounts: dict[str, str], volume_root: Path) -> list[str]:
    """``argv`` with container paths mapped to this machine: volumes, ``/app`` and ``python``."""
    out = []
    for arg in argv:
        if arg == "python":
            arg = sys.executable
        for target, volume in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if arg == target or arg.startswith(target + "/"):
                arg = str(volume_root / volume) + arg[len(target):]
                break
        else:
            if arg == APP_DIR or arg.startswith(APP_DIR + "/"):
                arg = str(REPO) + arg[len(APP_DIR):]
        out.append(arg)
    return out


class Peer:
    """A running service: its process, its logs, and the eval lines seen on its stderr."""

    def __init__(self, service: Service, host: int, proc: subprocess.Popen, log_dir: Path):
        self.service, self.host, self.proc = service, host, proc
        self.evals: list[dict] = []
        self.initial_eval_loss: float | None = None
        self.tail: list[str] = []
        self.healthy: bool | None = None
        self.died_early = False
        self._threads = [threading.Thread(target=self._pump, args=(proc.stdout, log_dir / f"{service.name}.out", False),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(proc.stderr, log_dir / f"{service.name}.err", True),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream, path: Path, scan: bool) -> None:
        with open(path, "w") as log:
            for line in stream:
                log.write(line)
                log.flush()
                if not scan:
                    continue
                first = FIRST_EVAL.search(line)
                if first:
                    self.initial_eval_loss = float(first.group(1))
                for m in LOSS_LINE.finditer(line):
                    self.evals.append({"step": int(m.group(1)), "train_loss": float(m.group(2)),
                                       "eval_loss": float(m.group(3))})
                text = line.rsplit("\r", 1)[-1].strip()
                if text:
                    self.tail = (self.tail + [text[-300:]])[-5:]

    def join_logs(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout)

    def summary(self) -> dict:
        s = self.service
        out = {"role": s.role, "host": self.host, "started": True, "exit_code": self.proc.returncode,
               "healthy": self.healthy, "died_early": self.died_early,
               "initial_eval_loss": self.initial_eval_loss, "final_eval": self.evals[-1] if self.evals else None,
               "eval_lines": len(self.evals)}
        if self.proc.returncode not in (0, None) or self.died_early or (s.role == "trainer" and not self.evals):
            out["stderr_tail"] = self.tail
        return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python docker/netns_swarm.py", description=__doc__.splitlines()[0])
    p.add_argument("--compose", default=str(COMPOSE_FILE), help="compose file (default: docker/docker-compose.yml)")
    p.add_argument("--bandwidth-mbit", type=float, default=100.0,
                   help="upload and download cap of every peer in Mbit/s, which trainers declare as their "
                        "--bandwidth; 0 = uncapped (default: %(default)s)")
    p.add_argument("--samples", type=int, default=400,
                   help="samples each trainer trains on (its --max-samples; default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (default: %(default)s)")
    p.add_argument("--ready-timeout", type=float, default=120.0,
                   help="seconds a dependency may take to become healthy (default: %(default)s)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="OMP_NUM_THREADS of every peer: many peers share this machine's cores (default: %(default)s)")
    p.add_argument("--work-dir", default=None,
                   help="keep volumes and logs (<service>.out/.err) here (default: a temporary directory, removed)")
    return p


def run_swarm(args: argparse.Namespace) -> dict:
    """Start every service in order, wait for the trainers, stop the rest; returns the summary dict."""
    from testbed.netns import Topology

    services = load_services(args.compose)
    cap = args.bandwidth_mbit or None
    topo = Topology(len(services) + 1, bandwidth_mbit=[cap] * len(services) + [None])  # + the DNS server
    dns_host = len(services)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="netns-swarm-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    volumes = work / "volumes"
    for s in services:
        for volume in s.mounts.values():
            (volumes / volume).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.torch_threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    peers: dict[str, Peer] = {}
    summary = {"ok": False, "bandwidth_mbit": cap, "samples": args.samples, "error": None}
    etc_dirs = [ETC_NETNS / topo.netns(i) for i in range(topo.n_hosts)]
    made_etc_netns = not ETC_NETNS.exists()
    started = time.monotonic()
    deadline = started + args.timeout
    try:
        topo.start()
        made_etc_netns |= _sweep_etc_netns()
        for d in etc_dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / "resolv.conf").write_text(f"nameserver {topo.addr(dns_host)}\noptions ndots:0 timeout:1\n")
        records = {s.name: topo.addr(i) for i, s in enumerate(services)}
        topo.run(dns_host, [sys.executable, str(REPO / "testbed" / "dns_server.py"), topo.addr(dns_host), json.dumps(records)],
                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i, s in enumerate(services):
            for dep, condition in s.depends_on.items():
                _wait_for(peers[dep], condition, topo, volumes, min(deadline, time.monotonic() + args.ready_timeout))
            argv = localize(s.argv, s.mounts, volumes)
            if s.role == "trainer":
                argv = _set_flag(argv, "--max-samples", str(args.samples))
                if cap:  # the link's rate is known here: declare it, so averaging paces its flows to it
                    argv = _set_flag(argv, "--bandwidth", str(cap / 8))
            proc = topo.run(i, argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace")
            peers[s.name] = Peer(s, i, proc, work / "logs")
        trainers = [p for p in peers.values() if p.service.role == "trainer"]
        for p in trainers:
            p.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        for p in peers.values():
            if p.service.role not in ("trainer", "init") and p.proc.poll() is not None:
                p.died_early = True
    except subprocess.TimeoutExpired:
        summary["error"] = f"trainers did not finish within --timeout {args.timeout:.0f} s"
    except (RuntimeError, ValueError, OSError) as e:
        summary["error"] = f"{type(e).__name__}: {e}"
    finally:
        _stop(peers.values())
        topo.close()
        for d in etc_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if made_etc_netns:
            try:
                ETC_NETNS.rmdir()     # only if empty: another run may be using it
            except OSError:
                pass
        for p in peers.values():
            p.join_logs()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    summary["peers"] = {s.name: peers[s.name].summary() if s.name in peers else {"role": s.role, "started": False}
                        for s in services}
    trainers_ok = all(p.get("exit_code") == 0 and p.get("final_eval") for p in summary["peers"].values()
                      if p["role"] == "trainer")
    summary["ok"] = summary["error"] is None and trainers_ok and all(
        p["started"] and not p.get("died_early") for p in summary["peers"].values())
    if args.work_dir:
        summary["work_dir"] = str(work)
    return summary


def _sweep_etc_netns() -> bool:
    """Remove /etc/netns entries of ours left by a driver that was SIGKILLed (its pid is gone); True if any."""
    from testbed.netns import PREFIX

    removed = False
    for d in ETC_NETNS.glob(f"{PREFIX}*"):
        pid = d.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
            removed = True
    return removed


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag value`` replacing any earlier occurrence."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        else:
            out.append(a)
    return out + [flag, value]


def _wait_for(peer: Peer, condition: str, topo, volumes: Path, deadline: float) -> None:
    """Block until ``peer`` meets a compose ``depends_on`` condition; RuntimeError if it cannot."""
    s = peer.service
    while time.monotonic() < deadline:
        if peer.proc.poll() is not None:
            peer.join_logs(2.0)           # so that its last stderr lines are in peer.tail
        if condition == "service_completed_successfully":
            if peer.proc.poll() is not None:
                if peer.proc.returncode != 0:
                    raise RuntimeError(f"{s.name} exited with {peer.proc.returncode}: {' | '.join(peer.tail)}")
                return
        else:
            if peer.proc.poll() is not None:
                raise RuntimeError(f"{s.name} exited ({peer.proc.returncode}) before it was ready: "
                                   f"{' | '.join(peer.tail)}")
            if condition == "service_started" or s.healthcheck is None:
                return
            try:
                check = subprocess.run(topo.command(peer.host, localize(s.healthcheck, s.mounts, volumes)),
                                       capture_output=True, timeout=30)
            except subprocess.TimeoutExpired:
                check = None
            if check is not None and check.returncode == 0:
                peer.healthy = True
                return
        time.sleep(0.5)
    if condition == "service_healthy":
        peer.healthy = False
    raise RuntimeError(f"{s.name} did not reach {condition} in time")


def _seconds(duration) -> float:
    """A compose duration (``10s``, ``1m30s``, ``500ms`` or a number of seconds) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    parts = re.findall(r"([\d.]+)(ms|us|h|m|s)", str(duration))
    if not parts or "".join(n + u for n, u in parts) != str(duration).strip():
        raise ValueError(f"cannot read the duration {duration!r}")
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * unit[u] for n, u in parts)


def _stop(peers) -> None:
    """Like ``docker compose stop``: stop_signal to each running peer, SIGKILL after its stop_grace_period."""
    running = [p for p in peers if p.proc.poll() is None]
    for p in reversed(running):
        try:
            p.proc.send_signal(getattr(signal, p.service.stop_signal))
        except OSError:
            pass
    end = time.monotonic() + max((p.service.stop_grace_s for p in running), default=0.0)
    for p in running:
        try:
            p.proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bandwidth_mbit < 0 or args.samples < 1 or args.timeout <= 0 or args.torch_threads < 1:
        parser.error("need --bandwidth-mbit >= 0, --samples >= 1, --timeout > 0 and --torch-threads >= 1")
    for sig in (signal.SIGTERM, signal.SIGHUP):   # unwind through run_swarm's cleanup
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    from testbed.netns import netns_available

    why_not = netns_available()
    if why_not:
        print(json.dumps({"ok": False, "error": f"network namespaces unavailable: {why_not}"}))
        return 2
    try:
        summary = run_swarm(args)
    except KeyboardInterrupt:
        print(json.dumps({"ok": False, "error": "interrupted"}))
        return 130
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
