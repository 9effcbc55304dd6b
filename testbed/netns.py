"""A throw-away test network of Linux network namespaces: one namespace per host, one virtual switch.

    from testbed.netns import Topology

    with Topology(4, bandwidth_mbit=100) as topo:        # needs root and iproute2 (`ip`, `tc`)
        server = topo.run(0, [sys.executable, "server.py", "--host", topo.addr(0)])
        client = topo.run(1, [sys.executable, "client.py", "--connect", topo.addr(0)])
        topo.set_link(1, up=False)                       # cut host 1's cable; set_link(1, True) restores it
        client.wait()
    # every process started with run() is killed and every namespace and link is gone here,
    # also after an exception, Ctrl+C or SIGTERM

Layout built by :class:`Topology` (names are unique per topology, so topologies can coexist):

* a *switch* namespace holding a Linux bridge ``br0``;
* per host ``i`` a namespace with ``lo`` and ``eth0``, one end of a veth pair whose other end
  (``p<i>``) is a port of the bridge. Host ``i`` has address ``198.18.<k>.<i + 1>/24`` (198.18.0.0/15
  is reserved for network benchmarks, RFC 2544; ``k`` is picked per topology). Nothing is routed
  to the root namespace, so the test network cannot reach or disturb the machine's real network;
* a bandwidth cap per host (``bandwidth_mbit``, one number for all or one per host, ``None`` = none):
  a ``tbf`` qdisc on the host's ``eth0`` (upload) and on its switch port (download), so each host can
  send *and* receive at most that rate, like a volunteer's access link. Traffic-control rates count
  link-layer bytes (Ethernet + IP + TCP headers are ~4% of a full-sized frame).

Cleanup is guaranteed by the context manager (exceptions, KeyboardInterrupt), a SIGTERM/SIGHUP
handler active while the topology is open, ``atexit``, and — for a driver that was SIGKILLed —
:func:`cleanup_stale`, which removes namespaces left by processes that no longer exist (called on
every :class:`Topology` start). Processes started with :meth:`Topology.run` also die with the driver
(``PR_SET_PDEATHSIG``).
"""
from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Sequence

PREFIX = "swt"                 # every namespace we create is named swt<pid>-<n>-...
NETNS_DIR = Path("/run/netns")
MAX_HOSTS = 250
_counter = itertools.count()
_open: set["Topology"] = set()
_lock = threading.Lock()


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed while building the topology (the message has its stderr)."""


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc


def _tc(netns: str, *args: str) -> None:
    argv = ["ip", "netns", "exec", netns, "tc", *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")


def netns_available() -> str | None:
    """None if this process can build topologies (root, ``ip netns`` and ``tc`` work), else why not."""
    if os.geteuid() != 0:
        return "needs root"
    name = f"{PREFIX}{os.getpid()}-probe{next(_counter)}"
    try:
        _ip("netns", "add", name)
        try:
            _ip("link", "set", "lo", "up", netns=name)
            _tc(name, "qdisc", "show")
        finally:
            _ip("netns", "del", name, check=False)
    except (NetnsError, FileNotFoundError) as e:
        return str(e)
    return None


def _kill_netns_processes(netns: str) -> None:
    proc = _ip("netns", "pids", netns, check=False)
    for pid in proc.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete namespaces of ours whose creating process is gone (a SIGKILLed driver); returns their names."""
    removed = []
    try:
        names = [p.name for p in NETNS_DIR.iterdir()]
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        _kill_netns_processes(name)
        if _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Topology:
    """``n_hosts`` network namespaces on one virtual switch, optionally bandwidth-capped; see the module doc.

    :param n_hosts: number of hosts (1..250).
    :param bandwidth_mbit: cap of every host's upload and download in Mbit/s, or a sequence with one
        entry (number or None) per host; None: uncapped (veth speed, several GB/s).
    :param burst_ms: token-bucket depth, in milliseconds of traffic at the capped rate (at least 32 KiB).
    :param queue_ms: how much traffic (in ms at the capped rate) may wait in a cap's queue before drops.
    :param mtu: MTU of the test links.
    :param nat: hosts behind a home router, ``{index: "keep" | "random"}``. Such a host's namespace becomes
        the router (its switch address is the router's WAN address, :meth:`addr`) and the programs of
        :meth:`run` run in a home namespace behind it (address :meth:`home_addr`): outbound connections are
        masqueraded (``keep``: source ports kept where free, so hole punching can work; ``random``: a random
        port per connection, as carrier-grade NATs do), unsolicited inbound ones are dropped. Needs the
        ``iptables`` command (Debian package ``iptables``).
    """

    def __init__(self, n_hosts: int, bandwidth_mbit: float | Sequence[float | None] | None = None, *,
                 burst_ms: float = 5.0, queue_ms: float = 50.0, mtu: int = 1500, nat: dict[int, str] | None = None):
        if isinstance(n_hosts, bool) or not isinstance(n_hosts, int) or not 1 <= n_hosts <= MAX_HOSTS:
            raise ValueError(f"n_hosts must be an int in 1..{MAX_HOSTS}, got {n_hosts!r}")
        caps = list(bandwidth_mbit) if isinstance(bandwidth_mbit, (list, tuple)) else [bandwidth_mbit] * n_hosts
        if len(caps) != n_hosts:
            raise ValueError(f"bandwidth_mbit has {len(caps)} entries for {n_hosts} hosts")
        for cap in caps:
            if cap is not None and not (isinstance(cap, (int, float)) and 0 < cap < 1e6):
                raise ValueError(f"bandwidth caps must be positive Mbit/s or None, got {cap!r}")
        if not burst_ms > 0 or not queue_ms > 0:
            raise ValueError("burst_ms and queue_ms must be positive")
        self.n_hosts, self.caps, self.burst_ms, self.queue_ms, self.mtu = n_hosts, caps, burst_ms, queue_ms, mtu
        self.nat = dict(nat or {})
        for i, kind in self.nat.items():
            if not (isinstance(i, int) and 0 <= i < n_hosts) or kind not in ("keep", "random"):
                raise ValueError(f"nat maps host indices to 'keep' or 'random', got {i!r}: {kind!r}")
        serial = next(_counter)
        self.name = f"{PREFIX}{os.getpid()}-{serial}"
        self.subnet_octet = (os.getpid() * 7 + serial) % 256
        self.switch = f"{self.name}-sw"
        self.hosts = [f"{self.name}-h{i}" for i in range(n_hosts)]
        self.homes = {i: f"{self.name}-l{i}" for i in self.nat}
        self._token = f"{os.getpid() % 0xFFFF:04x}{serial % 256:02x}"  # veth names are made in the root ns
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._old_handlers: dict[int, object] = {}
        self.closed = False

    # ------------------------------------------------------------------ public API
    def addr(self, i: int) -> str:
        """IPv4 address of host ``i`` (e.g. ``198.18.37.1``), reachable from every other host."""
        self._check_index(i)
        return f"198.18.{self.subnet_octet}.{i + 1}"

    def home_addr(self, i: int) -> str:
        """The address host ``i``'s programs have behind its NAT router (its :meth:`addr` if it has none)."""
        self._check_index(i)
        return f"10.{self.subnet_octet}.{i}.2" if i in self.nat else self.addr(i)

    def netns(self, i: int) -> str:
        """Name of the namespace host ``i``'s programs run in (for ``ip netns exec NAME ...``): the home
        behind its router if it has one."""
        self._check_index(i)
        return self.homes.get(i, self.hosts[i])

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs in host ``i``'s namespace."""
        return ["ip", "netns", "exec", self.netns(i), *argv]

    def run(self, i: int, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` in host ``i``'s namespace; returns the Popen (its pid is the program's own pid).

        Keyword arguments go to :class:`subprocess.Popen`. The process is killed when the topology closes
        and when this (driver) process dies.
        """
        if self.closed:
            raise RuntimeError("topology is closed")
        popen_kwargs.setdefault("preexec_fn", _die_with_parent)
        proc = subprocess.Popen(self.command(i, argv), **popen_kwargs)
        self._procs.append(proc)
        return proc

    def set_link(self, i: int, up: bool) -> None:
        """Cut (``up=False``) or restore host ``i``'s link, at its switch port.

        While cut, the host's packets and the packets sent to it are silently dropped in both
        directions, as with an unplugged cable: open TCP connections stall (and resume if the link
        returns before they time out); the host keeps its address and routes.
        """
        self._check_index(i)
        if self.closed:
            raise RuntimeError("topology is closed")
        _ip("link", "set", f"p{i}", "up" if up else "down", netns=self.switch)

    def check_output(self, i: int, argv: Sequence[str], timeout: float = 30.0) -> str:
        """Run ``argv`` in host ``i``'s namespace to completion and return its stdout (raises on failure)."""
        return subprocess.run(self.command(i, argv), capture_output=True, text=True, check=True,
                              timeout=timeout).stdout

    def __enter__(self) -> "Topology":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ build and tear down
    def start(self) -> None:
        """Create the namespaces, links, addresses and caps (``with Topology(...)`` calls this)."""
        cleanup_stale()
        with _lock:
            _open.add(self)
        self._install_signal_handlers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self._add_netns(self.switch)
        _ip("link", "add", "br0", "type", "bridge", netns=self.switch)
        _ip("link", "set", "br0", "up", netns=self.switch)
        for i, host in enumerate(self.hosts):
            self._add_netns(host)
            _ip("link", "set", "lo", "up", netns=host)
            h_end, s_end = f"v{self._token}h{i}", f"v{self._token}s{i}"
            _ip("link", "add", h_end, "mtu", str(self.mtu), "type", "veth", "peer", "name", s_end, "mtu", str(self.mtu))
            try:
                _ip("link", "set", h_end, "netns", host)
                _ip("link", "set", s_end, "netns", self.switch)
            except NetnsError:
                _ip("link", "del", h_end, check=False)
                raise
            _ip("link", "set", h_end, "name", "eth0", netns=host)
            _ip("link", "set", s_end, "name", f"p{i}", netns=self.switch)
            _ip("link", "set", f"p{i}", "master", "br0", netns=self.switch)
            _ip("link", "set", f"p{i}", "up", netns=self.switch)
            _ip("addr", "add", f"{self.addr(i)}/24", "dev", "eth0", netns=host)
            _ip("link", "set", "eth0", "up", netns=host)
            if self.caps[i] is not None:
                self._cap(host, "eth0", self.caps[i])
                self._cap(self.switch, f"p{i}", self.caps[i])
            if i in self.nat:
                self._build_home(i)

    def _build_home(self, i: int) -> None:
        router, home = self.hosts[i], self.homes[i]
        lan = f"10.{self.subnet_octet}.{i}"
        self._add_netns(home)
        _ip("link", "set", "lo", "up", netns=home)
        r_end, h_end = f"v{self._token}r{i}", f"v{self._token}l{i}"
        _ip("link", "add", r_end, "mtu", str(self.mtu), "type", "veth", "peer", "name", h_end, "mtu", str(self.mtu))
        try:
            _ip("link", "set", r_end, "netns", router)
            _ip("link", "set", h_end, "netns", home)
        except NetnsError:
            _ip("link", "del", r_end, check=False)
            raise
        _ip("link", "set", r_end, "name", "lan0", netns=router)
        _ip("link", "set", h_end, "name", "eth0", netns=home)
        _ip("addr", "add", f"{lan}.1/24", "dev", "lan0", netns=router)
        _ip("addr", "add", f"{lan}.2/24", "dev", "eth0", netns=home)
        _ip("link", "set", "lan0", "up", netns=router)
        _ip("link", "set", "eth0", "up", netns=home)
        _ip("route", "add", "default", "via", f"{lan}.1", netns=home)
        masquerade = ["-j", "MASQUERADE"] + (["--random-fully"] if self.nat[i] == "random" else [])
        for argv in (["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                     ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", *masquerade],
                     ["iptables", "-A", "FORWARD", "-i", "eth0", "-m", "state", "--state", "ESTABLISHED,RELATED",
                      "-j", "ACCEPT"],
                     ["iptables", "-A", "FORWARD", "-i", "eth0", "-j", "DROP"],
                     ["iptables", "-A", "INPUT", "-i", "eth0", "-m", "state", "--state", "ESTABLISHED,RELATED",
                      "-j", "ACCEPT"],
                     ["iptables", "-A", "INPUT", "-i", "eth0", "-j", "DROP"]):
            proc = subprocess.run(["ip", "netns", "exec", router, *argv], capture_output=True, text=True)
            if proc.returncode != 0:
                raise NetnsError(f"`{' '.join(argv)}` in {router} failed: {proc.stderr.strip()}")

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)

    def _cap(self, netns: str, dev: str, mbit: float) -> None:
        rate_bytes = mbit * 1e6 / 8
        burst = max(32 * 1024, int(rate_bytes * self.burst_ms / 1000), self.mtu + 100)
        _tc(netns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit * 1000:.0f}kbit",
            "burst", str(burst), "latency", f"{self.queue_ms:.0f}ms")

    def close(self) -> None:
        """Kill the processes, delete the namespaces (and with them every link and qdisc). Idempotent."""
        if self.closed:
            return
        self.closed = True
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    proc.kill()
                except OSError:
                    pass
        for name in reversed(self._created):
            _kill_netns_processes(name)
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self._created):
            _ip("netns", "del", name, check=False)
        self._created.clear()
        self._restore_signal_handlers()
        with _lock:
            _open.discard(self)

    # ------------------------------------------------------------------ helpers
    def _check_index(self, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_hosts:
            raise IndexError(f"host index {i!r} is not in 0..{self.n_hosts - 1}")

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old = signal.getsignal(sig)
            if old in (signal.SIG_DFL, None):  # only take over a signal nobody else handles
                self._old_handlers[sig] = old
                signal.signal(sig, _raise_system_exit)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            if signal.getsignal(sig) is _raise_system_exit:
                signal.signal(sig, old)
        self._old_handlers.clear()

    def __repr__(self) -> str:
        return f"Topology({self.name}, hosts={self.n_hosts}, caps_mbit={self.caps}, closed={self.closed})"


def _raise_system_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through `with Topology(...)`, which cleans up


@atexit.register
def _close_all() -> None:
    for topo in list(_open):
        topo.close()
