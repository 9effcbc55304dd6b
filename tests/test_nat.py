"""Home peers behind NAT routers are full members (issue 13), in network namespaces, with the plain CLI.

Each home sits behind its own router (testbed.netns: iptables MASQUERADE, unsolicited inbound dropped);
``keep`` routers keep source ports, ``random`` ones draw a new port per connection. No peer gets a NAT flag:
each finds out by itself that it is private and becomes reachable through relays (public peers)."""
from __future__ import annotations

import re
import shutil
import time

import pytest
import torch

from testbed import netns
from testbed.nat_swarm import NatSwarm

_why_not = netns.netns_available() or (None if shutil.which("iptables") else "no iptables command")
pytestmark = [pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(_why_not is not None, reason=f"NAT routers unavailable: {_why_not}")]

FINAL = re.compile(r"averaging (\d+) ok / (\d+) failed")
SKIPPED = re.compile(r"Skipped a step \((\d+) so far\)")
ROUND = re.compile(r"Averaging step (\d+)")


def skipped(log: str) -> int:
    counts = SKIPPED.findall(log)
    return int(counts[-1]) if counts else 0


def test_a_home_peer_hosts_experts_and_a_trainer_in_another_home_trains_through_them(tmp_path):
    with NatSwarm(["public", "keep", "random"], tmp_path) as swarm:
        swarm.start(0, "boot")
        host = swarm.start(1, "host", *swarm.join, "--experts", "16", "--device", "cpu")
        log = host.wait_for("Hosting 16 experts", 90)
        assert "Reachability: private" in log and "reachable through 1 relays" in log, log[-2000:]
        trainer = swarm.start(2, "trainer", *swarm.join, "--train", "--local-steps", "5", "--max-samples", "64")
        log = trainer.wait_for("Finished:", 300)
        assert trainer.proc.wait(30) == 0
        assert "Reachability: private" in log
        assert skipped(log) == 0, log[-3000:]        # every step reached the experts, through the relay
        assert "eval loss" in log


def test_four_trainers_three_behind_nats_average_every_round(tmp_path):
    """The public trainer owns the parts; the three private ones contribute as clients. Each private trainer's
    rounds all succeed, and they end on bit-identical averaged weights."""
    kinds = ["public", "public", "public", "keep", "keep", "random"]
    with NatSwarm(kinds, tmp_path) as swarm:
        swarm.start(0, "boot")
        swarm.start(1, "experts", *swarm.join, "--experts", "16", "--device", "cpu").wait_for("Hosting 16", 90)
        ckpt = [tmp_path / f"ckpt{i}" for i in range(4)]
        train = [*swarm.join, "--train", "--local-steps", "5"]
        # the public trainer outlasts the others, so that each of their rounds has a part owner
        trainers = [swarm.start(2 + i, f"trainer{i}", *train, "--max-samples", "320" if i == 0 else "160",
                                "--shard", f"{i}/4", "--checkpoint-dir", str(ckpt[i])) for i in range(4)]
        for t in trainers:
            t.wait_for("Finished:", 400)
        private = trainers[1:]
        for t in private:
            log = t.log()
            assert "Reachability: private" in log, log[-2000:]
            ok, failed = map(int, FINAL.findall(log)[-1])
            assert ok == 4 and failed == 0, f"{t.name}: {ok} ok / {failed} failed\n{log[-3000:]}"
        assert trainers[0].log().count("ok with 4 peers") >= 4, trainers[0].log()[-3000:]   # the same rounds
        anchors = [torch.load(c / "trainer.pt", weights_only=False)["anchor"] for c in ckpt[1:]]
        for other in anchors[1:]:
            assert all(torch.equal(a, b) for a, b in zip(anchors[0], other))


def test_a_relay_killed_mid_circuit_the_home_peer_reserves_elsewhere_and_stays_callable(tmp_path):
    """The home expert host holds slots on two of three public relays; one of them is killed while a trainer
    calls the experts through it. Within 30 s the host holds two slots again (the third relay), and the
    trainer's steps reach the experts again."""
    kinds = ["public", "public", "public", "keep", "keep"]
    with NatSwarm(kinds, tmp_path) as swarm:
        relays = [swarm.start(0, "boot")]
        relays += [swarm.start(i, f"relay{i}", *swarm.join) for i in (1, 2)]
        for r in relays[1:]:
            r.wait_for("DHT", 60)
        host = swarm.start(3, "host", *swarm.join, "--experts", "16", "--device", "cpu")
        log = host.wait_for("Hosting 16 experts", 90)
        held = re.findall(r"Reachable through 2 relays: (\S+), (\S+)", log) or \
            re.findall(r"Reachable through 2 relays: (\S+), (\S+)", host.wait_for("Reachable through 2", 30))
        trainer = swarm.start(4, "trainer", *swarm.join, "--train", "--local-steps", "5", "--max-samples", "4000")
        trainer.wait_for(ROUND, 200)
        # kill the relay the trainer's circuit runs through: the first one the host announces, which callers
        # dial first (the bootstrap, as it happens: the others know enough peers to do without it)
        names = {r.name: r for r in relays}
        ids = {name: re.search(r"Node (\S+) listening", r.log()).group(1) for name, r in names.items()}
        victim = next(name for name, pid in ids.items() if pid[-8:] == held[-1][0])
        names[victim].proc.kill()
        killed_at = time.monotonic()
        host.wait_for("Lost relay", 30)
        while "Reachable through 2 relays" not in host.log().split("Lost relay", 1)[1]:
            assert time.monotonic() - killed_at < 30, host.log()[-2000:]
            time.sleep(0.2)
        # the trainer goes on: its steps are answered again (after a gap while its circuit was down)
        time.sleep(10)
        before = len(ROUND.findall(trainer.log())), skipped(trainer.log())
        time.sleep(20)
        after = len(ROUND.findall(trainer.log())), skipped(trainer.log())
        assert after[0] > before[0] and after[1] - before[1] <= 2, trainer.log()[-3000:]


def test_home_peers_reserve_on_a_js_libp2p_relay_and_reach_each_other_through_it(tmp_path):
    """The only relay is js-libp2p's (our bootstrap runs with --no-relay): the home expert host reserves on it,
    and a trainer in a port-randomising home trains through the experts over circuits it carries."""
    from testbed.nat_swarm import js_relay_missing, start_js_relay
    if js_relay_missing():
        pytest.skip(js_relay_missing())
    with NatSwarm(["public", "public", "keep", "random"], tmp_path) as swarm:
        swarm.start(0, "boot", "--no-relay")
        js, js_addr = start_js_relay(f"/ip4/{swarm.topo.addr(1)}/tcp/4001", swarm.topo.command(1, []))
        try:
            join = [*swarm.join, js_addr]
            host = swarm.start(2, "host", *join, "--experts", "16", "--device", "cpu")
            log = host.wait_for("Hosting 16 experts", 90)
            assert f"Reachable through 1 relays: {js_addr[-8:]}" in log, log[-2000:]
            trainer = swarm.start(3, "trainer", *join, "--train", "--local-steps", "5", "--max-samples", "64")
            log = trainer.wait_for("Finished:", 300)
            assert skipped(log) == 0 and "eval loss" in log, log[-3000:]
        finally:
            js.kill()
            js.wait(5)


def test_hole_punching_between_port_keeping_homes_and_the_relay_where_it_cannot(tmp_path):
    """DCUtR between two port-keeping homes: at least 19 of 20 punches give a direct connection; from a
    port-randomising home the punch fails, and the calls made meanwhile go over the relay without waiting."""
    from testbed.nat_swarm import punch_trials
    with NatSwarm(["public", "keep", "keep", "random"], tmp_path) as swarm:
        swarm.start(0, "boot")
        keep = punch_trials(swarm, 1, 2, attempts=20)
        assert keep["direct"] >= 19, keep
        assert keep["median_s"] <= 2.0, keep
        assert keep["direct_ms"] is not None and keep["relayed_ms"] is not None, keep
        random_nat = punch_trials(swarm, 1, 3, attempts=1)
        assert random_nat["direct"] == 0, random_nat
        assert max(random_nat["first_call_s"]) < 5.0, random_nat
