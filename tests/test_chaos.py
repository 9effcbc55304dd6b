"""bench/chaos.py: a swarm under random SIGKILL / SIGSTOP / restarts / link cuts keeps its invariants.

The fast tests feed :class:`testbed.chaos_checks.Monitor` made-up timelines and files, to show that each
check fails when it must (a hung trainer, an averaging step past its deadline, NaN, a lost DHT record, a
corrupt checkpoint, diverged weights). The slow test is the bounded CI variant of the chaos run: a real
swarm of 6 peers (+ a probe) in network namespaces, about two minutes; it needs root and ``ip netns``.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from testbed import netns  # noqa: E402
from testbed.chaos_checkpoints import dense_spread, verify_checkpoints  # noqa: E402
from testbed.chaos_checks import Monitor, derive_bounds  # noqa: E402
from testbed.chaos_faults import KINDS, FaultPlan  # noqa: E402

BOUNDS = derive_bounds("tiny")
PEERS = [("trainer0", "trainer", "T0"), ("experts0", "experts", "E0"), ("bootstrap", "bootstrap", "B0")]


def running_swarm(now: float = 0.0) -> Monitor:
    """A monitor that saw every peer start, listen and become ready at ``now``."""
    m = Monitor(PEERS, started=now, bounds=BOUNDS)
    for name, role, peer_id in PEERS:
        m.started_process(name, now)
        m.on_line(name, now, f"INFO p2p.node: Node {peer_id} listening on /ip4/198.18.0.1/tcp/31337")
    m.on_line("experts0", now, "INFO peer: Hosting 16 experts: ffn0.0.0 ...")
    m.on_line("trainer0", now, "INFO averaging.state: State chaos.tiny.diloco: snapshot of step 0, 0.4 MB")
    return m


def invariants(m: Monitor) -> list[str]:
    return [v.invariant for v in m.violations]


def test_bounds_come_from_the_code():
    assert BOUNDS["averaging_deadline_s"] > 2 * 2.0   # at least the matchmaking time, several chunk deadlines
    assert BOUNDS["expert_grace_s"] == 10.0 + 2 * 3.0 and BOUNDS["state_grace_s"] == 10.0 + 2 * 3.0
    assert BOUNDS["step_bound_s"] > BOUNDS["averaging_deadline_s"]


def test_a_silent_trainer_is_a_hang_unless_it_is_stopped():
    m = running_swarm()
    m.on_line("trainer0", 10.0, "INFO averaging.averager: Averaging step 1: ok with 3 peers in 2.10s")
    m.watchdog(10.0 + BOUNDS["step_bound_s"] - 1)
    assert invariants(m) == []
    m.watchdog(10.0 + BOUNDS["step_bound_s"] + 1)
    assert invariants(m) == ["no_hang"]

    m = running_swarm()
    m.on_line("trainer0", 10.0, "INFO averaging.averager: Averaging step 1: ok with 3 peers in 2.10s")
    m.fault_began("trainer0", 11.0, "sigstop")
    m.watchdog(10.0 + 3 * BOUNDS["step_bound_s"])
    assert invariants(m) == []


def test_averaging_past_its_deadline_and_nan_losses_are_caught():
    m = running_swarm()
    late = BOUNDS["averaging_deadline_s"] + BOUNDS["averaging_slack_s"] + 1
    m.on_line("trainer0", 100.0, f"INFO averaging.averager: Averaging step 3: FAILED with 2 peers in {late:.2f}s")
    m.on_line("trainer0", 101.0, "INFO peer.training.trainer: step 50: train loss nan, eval loss 2.9, 400 samples")
    assert invariants(m) == ["no_hang", "no_nan"]
    m = running_swarm()                     # the same step while the trainer itself was paused: not a hang
    m.fault_began("trainer0", 90.0, "sigstop")
    m.fault_ended("trainer0", 95.0, "sigstop")
    m.on_line("trainer0", 100.0, f"INFO averaging.averager: Averaging step 3: FAILED with 2 peers in {late:.2f}s")
    assert invariants(m) == []


def test_live_peers_must_be_found_in_the_dht_after_their_grace():
    m = running_swarm()
    t = BOUNDS["expert_grace_s"] + 1
    everyone = {"ping": {"T0": 0.01, "E0": 0.01, "B0": 0.01}, "metrics": {}, "missing_experts": []}
    m.on_probe({"t0": t, "t1": t + 1, "experts": {"E0": 16}, "state": {"T0": 1}, "progress": {}, **everyone})
    assert invariants(m) == []
    m.on_probe({"t0": t, "t1": t + 1, "experts": {}, "state": {}, "progress": {}, **everyone})
    assert invariants(m) == ["dht_records", "dht_records"]
    m = running_swarm()                     # cut off: not expected to be found
    m.fault_began("experts0", 1.0, "link_cut")
    m.on_probe({"t0": t, "t1": t + 1, "experts": {}, "state": {"T0": 1}, "progress": {}, **everyone})
    assert invariants(m) == []


def test_corrupt_and_nonfinite_checkpoints_are_caught(tmp_path):
    from peer.checkpoint import save_checkpoint

    good = tmp_path / "good"
    save_checkpoint(good / "trainer.pt", {"step": 50, "anchor": [torch.ones(3)]})
    states, problems = verify_checkpoints(good)
    assert problems == [] and states["trainer.pt"]["step"] == 50
    bad = tmp_path / "bad"
    save_checkpoint(bad / "trainer.pt", {"step": 50, "anchor": [torch.ones(1000)]})
    data = (bad / "trainer.pt").read_bytes()
    (bad / "trainer.pt").write_bytes(data[: len(data) // 2])            # a torn write
    save_checkpoint(bad / "nan.pt", {"anchor": [torch.tensor([1.0, math.nan])]})
    _, problems = verify_checkpoints(bad)
    assert len(problems) == 2 and any("non-finite" in p for p in problems)


def test_dense_spread_is_zero_only_for_identical_anchors():
    anchor = [torch.randn(10, 10), torch.randn(10)]
    same = {n: {"anchor": [a.clone() for a in anchor], "sync_rounds": 4} for n in ("a", "b")}
    assert dense_spread(same)["spread"] == 0.0
    same["b"]["anchor"][0][0, 0] += 0.1
    assert dense_spread(same)["spread"] > 1e-4


def test_fault_plan_covers_every_kind_first():
    roles = {"experts0": "experts", "trainer0": "trainer", "trainer1": "trainer"}
    for seed in range(20):
        plan = FaultPlan(seed, roles)
        kinds = []
        while len(kinds) < len(KINDS):
            kind, peer, length = plan.next(sorted(roles), saved={"trainer0"} if "restart" in kinds else set())
            assert 3.0 <= length <= 8.0 and (roles[peer] == "trainer" or kind not in ("kill_during_save",))
            kinds.append(kind)
        assert sorted(kinds) == sorted(KINDS) and kinds.index("restart") < kinds.index("kill_during_save")


_why_not = netns.netns_available()


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(_why_not is not None, reason=f"network namespaces unavailable: {_why_not}")
def test_chaos_run_keeps_every_invariant(tmp_path):
    """The bounded CI variant: ~70 s of faults (longer until every kind was injected), then a quiet period;
    ~2.5 min on 2 CPU cores, at most ~6 min."""
    work = tmp_path / "chaos"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "chaos.py"), "--duration", "70",
                           "--quiet-period", "15", "--seed", "3", "--work-dir", str(work),
                           "--cover-extension", "120", "--json", str(tmp_path / "summary.json")],
                          capture_output=True, text=True, timeout=420, cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output (exit {proc.returncode}); stderr:\n{proc.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    assert summary["error"] is None, summary["error"]
    assert summary["violation_count"] == 0, f"violations (peer logs in {work}/logs): {summary['violations']}"
    for kind in KINDS:
        assert summary["faults"][kind] >= 1, f"no {kind} fault was injected: {summary['fault_log']}"
    checks = summary["checks"]
    for check in ("averaging_deadline", "training_progress", "ping", "dht_experts", "dht_state", "dht_progress",
                  "checkpoint_loads", "finite_loss_lines"):
        assert checks.get(check, 0) > 0, f"the {check} check never ran: {checks}"
    assert summary["reconvergence"]["spread"] <= summary["reconvergence"]["threshold"]
    assert proc.returncode == 0 and summary["ok"] is True
