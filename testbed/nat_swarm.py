"""A swarm of ``python -m peer`` processes in network namespaces, some of them behind home NAT routers.

    with NatSwarm(["public", "public", "keep", "random"], tmp_path) as swarm:
        boot = swarm.start(0, "boot")                      # a public bootstrap (and relay)
        host = swarm.start(2, "host", *swarm.join, "--experts", "8")   # behind a port-keeping NAT
        host.wait_for("Hosting 8 experts", 90)

Host ``i`` of :class:`~testbed.netns.Topology` is public or sits behind a router that keeps source ports
(``keep``) or randomises them (``random``). Every peer listens on ``0.0.0.0:31337`` of its own namespace and
is started with the plain CLI: no NAT flags. Logs go to ``<tmp>/<name>.log``.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .netns import Topology

REPO = Path(__file__).resolve().parent.parent
PORT = 31337


class PeerProcess:
    """One ``python -m peer`` process whose output (stdout and stderr) goes to a log file we can poll."""

    def __init__(self, name: str, log_path: Path, proc: subprocess.Popen, log_file):
        self.name, self.log_path, self.proc, self._log = name, log_path, proc, log_file

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, what: str, timeout: float) -> str:
        """Wait until the log holds ``what`` (a string or a compiled regex); returns the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if (what.search(text) if isinstance(what, re.Pattern) else what in text):
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) without {what!r}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what!r} in {timeout}s:\n{text[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()


class NatSwarm:
    """Namespaces for ``kinds`` (one of "public", "keep", "random" per host) and the peers started in them."""

    def __init__(self, kinds: list[str], tmp: Path, *, swarm: str = "nat"):
        self.kinds, self.tmp, self.swarm_name = kinds, Path(tmp), swarm
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.topo = Topology(len(kinds), nat={i: k for i, k in enumerate(kinds) if k != "public"})
        self.peers: list[PeerProcess] = []
        self.join: list[str] = []

    def __enter__(self) -> "NatSwarm":
        self.topo.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self.peers):
            try:
                p.stop()
            except Exception:
                pass
        self.topo.close()

    def start(self, i: int, name: str, *flags: str, env: dict | None = None) -> PeerProcess:
        """Start a peer in host ``i``'s namespace. The first public peer started becomes the bootstrap:
        :attr:`join` holds the flags that join through it."""
        log_path = self.tmp / f"{name}.log"
        log = open(log_path, "ab")
        argv = [sys.executable, "-m", "peer", "--host-maddrs", f"/ip4/0.0.0.0/tcp/{PORT}", "--swarm", self.swarm_name,
                *flags]
        proc = self.topo.run(i, argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                             env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                                  "PYTHONPATH": str(REPO), **(env or {})})
        peer = PeerProcess(name, log_path, proc, log)
        self.peers.append(peer)
        if not self.join and self.kinds[i] == "public":
            peer.wait_for("To join this swarm", 60)
            self.join = ["--initial-peers", self.maddr(i, peer)]
        return peer

    def maddr(self, i: int, peer: PeerProcess) -> str:
        """The full multiaddr of public peer ``peer`` on host ``i``'s switch address."""
        found = re.search(r"All addresses of this peer: (.*)", peer.wait_for("All addresses of this peer", 60))
        return next(a for a in found.group(1).split() if f"/ip4/{self.topo.addr(i)}/" in a)


JS_RELAY = REPO / "testbed" / "js_relay"


def js_relay_missing() -> str | None:
    """None if the js-libp2p relay can run here (node, and its packages: ``npm ci --prefix testbed/js_relay``)."""
    import shutil
    if shutil.which("node") is None:
        return "no node command"
    if not (JS_RELAY / "node_modules" / "libp2p").is_dir():
        return "js-libp2p not installed (npm ci --prefix testbed/js_relay)"
    return None


def start_js_relay(listen: str, prefix: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """Start js-libp2p's circuit relay server on ``listen``; returns the process and its full multiaddr.
    ``prefix`` runs it elsewhere (``Topology.command(i, [])`` for a namespace)."""
    proc = subprocess.Popen([*prefix, "node", str(JS_RELAY / "relay.mjs"), listen], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if not line.startswith("relay "):
        proc.kill()
        raise RuntimeError(f"js relay did not start: {line}{proc.stdout.read()[-2000:]}")
    return proc, line.split()[1]


def punch_trials(swarm: NatSwarm, listen_host: int, dial_host: int, attempts: int, wait: float = 30.0) -> dict:
    """Run ``testbed/punch_worker.py`` (see there) with the listener in ``listen_host``'s home and the dialer in
    ``dial_host``'s, through the swarm's bootstrap as relay; returns the dialer's JSON report."""
    import json
    worker = [sys.executable, str(REPO / "testbed" / "punch_worker.py")]
    relay = swarm.join[1]
    listener = swarm.topo.run(listen_host, [*worker, "listen", "--relay", relay], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        target = json.loads(listener.stdout.readline())["addrs"][0]
        proc = subprocess.run(swarm.topo.command(dial_host, [*worker, "dial", "--relay", relay, "--target", target,
                                                             "--attempts", str(attempts), "--wait", str(wait)]),
                              capture_output=True, text=True, timeout=attempts * (wait + 10) + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"punch_worker dial failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        listener.kill()
        listener.wait(5)
