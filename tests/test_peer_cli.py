"""`python -m peer`: start a swarm, join it with the printed line, use it, Ctrl+C both."""
import os
import signal
import subprocess
import sys
import time

import pytest

from dht import DHT, get_dht_time

from p2p import NodeConfig

LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]


def start_peer(*args):
    return subprocess.Popen([sys.executable, "-m", "peer", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_join_line(proc, timeout=30.0):
    """The second line of 'To join this swarm, run:' / '  python -m peer --initial-peers ...'."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"peer exited early: {proc.stderr.read()}")
        if line.strip().startswith("python -m peer --initial-peers"):
            return line.strip()
    raise AssertionError("no join line printed")


def interrupt(proc, timeout=2.0):
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    rc = proc.wait(timeout=timeout + 3)
    return rc, time.monotonic() - t0


def test_start_join_store_get_and_ctrl_c():
    a = start_peer(*LOOPBACK)
    b = None
    try:
        join = read_join_line(a)
        maddr_a = join.split("--initial-peers", 1)[1].split()[0]
        assert maddr_a.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in maddr_a
        b = start_peer(*join.split()[3:], *LOOPBACK)  # exactly the printed flags
        maddr_b = read_join_line(b).split("--initial-peers", 1)[1].split()[0]
        # a client that only knows A stores; a client that only knows B reads it back
        writer = DHT(initial_peers=[maddr_a], node_config=NodeConfig(client_mode=True))
        reader = DHT(initial_peers=[maddr_b], node_config=NodeConfig(client_mode=True))
        try:
            assert writer.store("cli-key", {"hello": "swarm"}, get_dht_time() + 60)
            found = reader.get("cli-key", latest=True)
            assert found is not None and found.value == {"hello": "swarm"}
            peers = {p["peer_id"] for p in reader.crawl()}
            assert maddr_a.rsplit("/", 1)[1] in peers and maddr_b.rsplit("/", 1)[1] in peers
        finally:
            writer.shutdown()
            reader.shutdown()
        for proc in (b, a):
            rc, took = interrupt(proc)
            assert rc == 0, proc.stderr.read()
            assert took < 2.0, f"Ctrl+C took {took:.2f}s"
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("args, needle", [
    (["--initial-peers", "not-an-address"], "invalid multiaddr"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/4001"], "/p2p/<peer-id>"),
    (["--swarm", "a/b"], "--swarm"),
    (["--train", "--compression", "int3"], "--compression"),
    (["--train", "--bandwidth", "0"], "--bandwidth"),
])
def test_bad_flags_give_one_line_error(args, needle):
    proc = subprocess.run([sys.executable, "-m", "peer", *args, *LOOPBACK], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_initial_peer_exits_nonzero_without_traceback():
    dead = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRUpeFCa1zLWqWe7fs13Phb7UE31mcHakt8d2hYjLZnc1"
    proc = subprocess.run([sys.executable, "-m", "peer", "--initial-peers", dead, *LOOPBACK], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "none of the 1 initial peers answered" in proc.stderr and "Traceback" not in proc.stderr


def test_identity_persists_across_restarts(tmp_path):
    ident = tmp_path / "peer.key"
    ids = []
    for _ in range(2):
        proc = start_peer("--identity", str(ident), *LOOPBACK)
        try:
            ids.append(read_join_line(proc).rsplit("/p2p/", 1)[1])
        finally:
            interrupt(proc)
    assert ids[0] == ids[1]
    assert (ident.stat().st_mode & 0o777) == 0o600
