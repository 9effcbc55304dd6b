"""End to end: `python -m peer` processes on loopback train the MoE model together.

One bootstrap, two expert hosts, three trainers (DiLoCo) on their own shards. Checked: the held-out loss
falls; the dense weights of the trainers agree after the last averaging round; a trainer killed mid-run
and restarted resumes from its checkpoint and catches up with the swarm's state; a trainer that joins
mid-run downloads the state before training and takes part in averaging.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
EVAL = re.compile(r"step (\d+): (?:train loss [\d.]+, )?eval loss ([\d.]+)")
FINAL = re.compile(r"averaging (\d+) ok / (\d+) failed")


class Peer:
    """A `python -m peer` process whose stderr goes to a file we can poll."""

    def __init__(self, name: str, tmp: Path, *flags: str):
        self.name, self.log_path = name, tmp / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "peer", *LOOPBACK, *flags], stdout=subprocess.PIPE,
                                     stderr=self._log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def evals(self) -> list[tuple[int, float]]:
        return [(int(m.group(1)), float(m.group(2))) for m in EVAL.finditer(self.log())]

    def wait_for(self, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.log():
            assert self.proc.poll() is None or what in self.log(), f"{self.name} exited:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name}: no {what!r} in {timeout}s:\n{self.log()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self._log.close()


def join_line(peer: Peer, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = peer.proc.stdout.readline()
        assert line, f"bootstrap exited:\n{peer.log()}"
        if line.strip().startswith("python -m peer --initial-peers"):
            return line.split("--initial-peers", 1)[1].split()[0]
    raise AssertionError("no join line")


def start_swarm(tmp: Path, swarm: str, peers: list[Peer], hosts: int = 1) -> list[str]:
    """A bootstrap and ``hosts`` expert hosts serving the 32 experts of the tiny model between them (appended
    to ``peers``, for the caller to stop); returns the flags that join their swarm."""
    boot = Peer("bootstrap", tmp, "--swarm", swarm)
    peers.append(boot)
    join = ["--initial-peers", join_line(boot), "--swarm", swarm]
    for i in range(hosts):
        peers.append(Peer(f"experts{i}", tmp, *join, "--experts", str(32 // hosts), "--device", "cpu"))
        peers[-1].wait_for(f"Hosting {32 // hosts} experts", 60)
    return join


def anchor(checkpoint_dir: Path) -> list[torch.Tensor]:
    return torch.load(checkpoint_dir / "trainer.pt", weights_only=False)["anchor"]


@pytest.mark.slow
def test_swarm_trains_agrees_resumes_and_admits_a_newcomer(tmp_path):
    # batch 8: the first trainers do 90 local steps (an averaging round every 10, evaluations at 0 and 50),
    # so that the newcomer, which starts around their step 50 and does 60 steps, overlaps them for rounds
    samples, newcomer_samples = 720, 480
    peers: list[Peer] = []
    try:
        join = start_swarm(tmp_path, "e2e", peers, hosts=2)
        # while trainer 2 is down only two trainers vouch for the swarm's state: one donor, one confirmation
        train = [*join, "--train", "--local-steps", "10", "--state-confirmations", "1", "--max-samples"]
        ckpt = [tmp_path / f"ckpt{i}" for i in range(4)]
        trainers = [Peer(f"trainer{i}", tmp_path, *train, str(samples), "--shard", f"{i}/3", "--checkpoint-dir",
                         str(ckpt[i])) for i in range(3)]
        peers += trainers

        # trainer 2 is killed once it has checkpointed (step 50), then restarted on the same directory
        trainers[2].wait_for("step 50:", 240)
        time.sleep(1.0)  # the checkpoint of step 50 is written right after the evaluation
        trainers[2].proc.kill()
        trainers[2].proc.wait(10)
        # meanwhile a newcomer joins (shard 0 again: data does not matter here, its catching up does)
        newcomer = Peer("newcomer", tmp_path, *train, str(newcomer_samples), "--shard", "0/3", "--checkpoint-dir",
                        str(ckpt[3]))
        peers.append(newcomer)
        time.sleep(5)
        restarted = Peer("trainer2b", tmp_path, *train, str(samples), "--shard", "2/3", "--checkpoint-dir",
                         str(ckpt[2]))
        peers.append(restarted)

        for p in (trainers[0], trainers[1], restarted, newcomer):
            assert p.proc.wait(timeout=400) == 0, f"{p.name} failed:\n{p.log()[-3000:]}"

        restarted_log, newcomer_log = restarted.log(), newcomer.log()
        assert "Resumed from" in restarted_log and "at step 50" in restarted_log
        assert "Caught up with the swarm" in newcomer_log, newcomer_log[-3000:]
        assert re.search(r"confirmed by [1-3] other peers", newcomer_log), newcomer_log[-3000:]
        # the newcomer averaged with the others after downloading the state
        assert int(FINAL.findall(newcomer_log)[-1][0]) > 0

        for p in (trainers[0], trainers[1]):
            evals = p.evals()
            assert evals[0][0] == 0 and evals[-1][0] == 50, evals
            assert evals[-1][1] < evals[0][1] - 0.5, f"{p.name}: eval loss did not fall: {evals}"

        # every trainer ends on an averaging round (a scheduled one at step 90, or its final one): dense weights agree
        anchors = [anchor(ckpt[i]) for i in (0, 1)]
        for a, b in zip(*anchors):
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    finally:
        for p in reversed(peers):
            p.stop()


def test_the_lr_schedule_follows_the_swarms_samples_between_dht_reads():
    from types import SimpleNamespace

    from peer.training.trainer import TrainConfig, Trainer
    seen = SimpleNamespace(samples=100, samples_seen_at=100, global_samples=400, trainers_seen=4)
    assert Trainer.swarm_samples(seen) == 400
    seen.samples = 110                                   # 10 more of ours: the 4 trainers made about 40
    assert Trainer.swarm_samples(seen) == 440
    alone = SimpleNamespace(samples=110, samples_seen_at=0, global_samples=0, trainers_seen=1)
    assert Trainer.swarm_samples(alone) == 110
    warm = SimpleNamespace(config=TrainConfig(lr=1e-3, warmup_samples=1000))
    assert Trainer.lr_at(warm, 440) == pytest.approx(0.44e-3)   # so a 4-trainer swarm warms up 4x sooner


@pytest.mark.slow
def test_per_step_gradient_averaging_trains_two_trainers_together(tmp_path):
    """``--sync grad`` (peer.training.sync.GradSync): every step averages the gradients of both trainers. (Their
    weights are close, not bit-identical: each follows the LR schedule from its own view of the swarm's samples.)"""
    peers: list[Peer] = []
    try:
        join = start_swarm(tmp_path, "grad", peers)
        ckpt = [tmp_path / f"ckpt{i}" for i in range(2)]
        trainers = [Peer(f"trainer{i}", tmp_path, *join, "--train", "--sync", "grad", "--max-samples", "120",
                         "--shard", f"{i}/2", "--checkpoint-dir", str(ckpt[i])) for i in range(2)]
        peers += trainers
        for t in trainers:
            t.wait_for("Finished:", 300)
            assert t.proc.wait(30) == 0, t.log()[-3000:]
        rounds = [tuple(map(int, FINAL.findall(t.log())[-1])) for t in trainers]
        assert all(ok >= 10 for ok, _ in rounds), rounds   # 15 steps each: most of them averaged
        states = [torch.load(c / "trainer.pt", weights_only=False) for c in ckpt]
        assert all("anchor" not in s and s["step"] == 15 for s in states)   # grad mode keeps no DiLoCo anchor
    finally:
        for p in reversed(peers):
            p.stop()


def test_a_trainer_vouches_for_the_state_it_serves():
    """Its progress record claims, per step, the hash of the state its sharer announces and serves."""
    from averaging.state_format import tensors_digest
    from dht import DHT
    from p2p import NodeConfig
    from peer.training.trainer import CLAIMED_STEPS, TrainConfig, Trainer

    dht = DHT(node_config=NodeConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    trainer = None
    try:
        trainer = Trainer(dht, TrainConfig(state_timeout=2.0))
        announced = trainer.sharer.refresh()
        record = trainer.progress_record()
        assert record["state_hashes"] == {"0": announced["state_hash"]}
        assert announced["state_hash"] == tensors_digest(trainer.sync.shared_tensors())
        for step in range(1, CLAIMED_STEPS + 3):
            trainer.sync_rounds = step
            trainer.take_snapshot()
        claims = trainer.progress_record()["state_hashes"]
        assert list(claims) == [str(s) for s in range(3, CLAIMED_STEPS + 3)]   # the last CLAIMED_STEPS steps
    finally:
        if trainer is not None:
            trainer.shutdown()
        dht.shutdown()


def test_an_averaging_round_that_raises_is_a_failed_round_not_a_crash(caplog):
    """Issue 14: an unexpected error inside a round is logged with its traceback, counted, and training goes on."""
    from dht import DHT
    from p2p import NodeConfig
    from peer.training.trainer import TrainConfig, Trainer

    dht = DHT(node_config=NodeConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    trainer = None
    try:
        trainer = Trainer(dht, TrainConfig(sync="grad", state_timeout=2.0))

        def broken_round(**kwargs):
            raise RuntimeError("injected: a defect inside the round")
        trainer.averager.step = broken_round            # the fault comes from outside the trainer
        with caplog.at_level("ERROR", logger="peer.training.trainer"):
            assert trainer.average(weight=8) is False
        assert trainer.rounds_failed == 1 and trainer.rounds_ok == 0
        assert "injected: a defect inside the round" in caplog.text and "Traceback" in caplog.text
    finally:
        if trainer is not None:
            trainer.shutdown()
        dht.shutdown()
