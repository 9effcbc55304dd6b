"""testbed/netns.py: namespaces per host, a switch, bandwidth caps, and cleanup that always happens.

Skipped unless we are root and ``ip netns`` / ``tc`` work (containers without CAP_SYS_ADMIN cannot).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testbed import netns  # noqa: E402
from testbed.netns import Topology  # noqa: E402

_why_not = netns.netns_available()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=f"network namespaces unavailable: {_why_not}")

# A TCP sink: accepts one connection, reads until EOF, prints bytes and seconds.
SINK = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.monotonic()
    n += len(b)
print(n, time.monotonic() - t0, flush=True)
"""
SOURCE = r"""
import socket, sys, time
for _ in range(100):
    try:
        c = socket.create_connection((sys.argv[1], 5201), timeout=5); break
    except OSError: time.sleep(0.05)
c.sendall(b"x" * int(sys.argv[2])); c.close()
"""


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def transfer(topo: Topology, src: int, dst: int, nbytes: int) -> float:
    """Send ``nbytes`` over TCP from host ``src`` to host ``dst``; returns the receiver's MB/s."""
    sink = topo.run(dst, [sys.executable, "-c", SINK, topo.addr(dst)], stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    topo.check_output(src, [sys.executable, "-c", SOURCE, topo.addr(dst), str(nbytes)])
    n, seconds = sink.stdout.readline().split()
    sink.wait(10)
    assert int(n) == nbytes
    return nbytes / float(seconds) / 1e6


def test_hosts_reach_each_other_and_cap_limits_rate():
    before = namespaces()
    with Topology(3, bandwidth_mbit=[40, 40, None]) as topo:
        assert len({topo.addr(i) for i in range(3)}) == 3
        assert topo.addr(0) in topo.check_output(0, ["ip", "-4", "addr", "show", "eth0"])
        # the root namespace has no route into the test network
        assert topo.addr(0) not in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        capped = transfer(topo, 0, 1, 4_000_000)        # 40 Mbit/s = 5 MB/s on the wire, ~4.8 MB/s of payload
        assert 3.5 < capped < 5.3, capped
        # host 2 is uncapped, but the sender's upload cap still applies on the way to it
        assert transfer(topo, 1, 2, 2_000_000) < 5.3
        created = namespaces() - before
        assert {topo.netns(i) for i in range(3)} | {topo.switch} == created
    assert namespaces() == before


def test_uncapped_is_fast_and_exception_cleans_up():
    before = namespaces()
    with pytest.raises(RuntimeError, match="boom"):
        with Topology(2) as topo:
            sleeper = topo.run(1, [sys.executable, "-c", "import time; time.sleep(60)"])
            assert transfer(topo, 0, 1, 20_000_000) > 50
            raise RuntimeError("boom")
    assert sleeper.poll() is not None  # killed on the way out
    assert namespaces() == before


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        Topology(0)
    with pytest.raises(ValueError):
        Topology(2, bandwidth_mbit=[10])
    with pytest.raises(ValueError):
        Topology(2, bandwidth_mbit=-1)
    with Topology(1) as topo:
        with pytest.raises(IndexError):
            topo.addr(1)


def test_sigterm_and_sigkill_of_driver_leave_nothing_behind():
    before = namespaces()
    driver = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
              "from testbed.netns import Topology\n"
              "with Topology(2, bandwidth_mbit=10) as t:\n"
              "    print(t.name, flush=True); time.sleep(60)\n")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
        name = proc.stdout.readline().strip()
        assert name and any(n.startswith(name) for n in namespaces())
        os.kill(proc.pid, sig)
        proc.wait(10)
        if sig == signal.SIGKILL:  # nothing can run in a SIGKILLed process: the next driver sweeps up
            assert any(n.startswith(name) for n in namespaces())
            assert any(n.startswith(name) for n in netns.cleanup_stale())
        deadline = time.monotonic() + 5
        while namespaces() != before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert namespaces() == before, sig
