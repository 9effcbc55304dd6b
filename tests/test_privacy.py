"""Differential privacy of a trainer's contributions (peer.training.privacy, issue 16 item 1).

Unit checks against Google's dp-accounting computed independently, the clip and the noise measured, the
flags' errors; then a real :class:`Trainer` whose averager's rounds are injected (so the accountant's counting,
the budget, the checkpoint, the status line and the Prometheus metrics are checked without a swarm); and a
swarm of real processes in which two DP trainers stop when their budget is spent.
"""
from __future__ import annotations

import math
import socket
import urllib.request

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from averaging.averager import StepResult
from peer.training.privacy import (MAX_NOISE_MULTIPLIER, DPConfig, PrivacyBudgetSpent, Privatizer,
                                   noise_for_epsilon)


def library_epsilon(events: list[tuple[float, int]], delta: float) -> float:
    """The library's own answer, composed event by event."""
    accountant = RdpAccountant()
    for sigma, count in events:
        accountant.compose(dp_accounting.GaussianDpEvent(sigma), count)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("events, delta", [([(1.1, 50)], 1e-5), ([(0.8, 3), (2.5, 40)], 1e-6), ([(4.0, 1)], 1e-3)])
def test_epsilon_equals_the_librarys(events, delta):
    privatizer = Privatizer(DPConfig(clip=1.0, noise_multiplier=events[-1][0], delta=delta))
    privatizer.restore({"rounds": [list(e) for e in events[:-1]]})
    for _ in range(events[-1][1]):
        privatizer.count_round()
    assert privatizer.rounds_counted == sum(n for _, n in events)
    assert privatizer.epsilon() == pytest.approx(library_epsilon(events, delta), rel=1e-9)
    assert Privatizer(DPConfig(clip=1.0, noise_multiplier=1.0)).epsilon() == 0.0   # no round, no cost


@pytest.mark.parametrize("epsilon, rounds", [(8.0, 50), (2.0, 50), (1.0, 5)])
def test_the_solved_noise_is_the_smallest_that_meets_the_target(epsilon, rounds):
    sigma = noise_for_epsilon(epsilon, 1e-5, rounds)
    assert library_epsilon([(sigma, rounds)], 1e-5) <= epsilon
    assert library_epsilon([(sigma * 0.995, rounds)], 1e-5) > epsilon


def test_clipping_and_noise_are_what_the_config_says():
    config = DPConfig(clip=2.0, noise_multiplier=0.5)
    big = [torch.full((600_000,), 0.01), torch.full((400_000,), 0.02)]     # norm ~15.5: clipped to 2
    norm_before = math.sqrt(sum(float(t.pow(2).sum()) for t in big))
    clean = [t * (config.clip / norm_before) for t in big]
    privatizer = Privatizer(config)
    assert privatizer.privatize(big) == pytest.approx(norm_before, rel=1e-6)
    noise = torch.cat([b - c for b, c in zip(big, clean)])
    assert noise.std().item() == pytest.approx(0.5 * 2.0, rel=0.01)        # sigma * C over 1M elements
    assert abs(noise.mean().item()) < 0.005
    assert privatizer.clipped == 1 and privatizer.privatized == 1
    small = [torch.full((1000,), 1e-4)]
    Privatizer(DPConfig(clip=2.0, noise_multiplier=1e-9)).privatize(small)     # under C: not scaled
    assert small[0].mean().item() == pytest.approx(1e-4, rel=1e-3)


def test_noise_does_not_come_from_the_seed_every_trainer_shares():
    """Trainers seed torch alike (identical initial weights): noise drawn from that generator would be known to
    every peer, and subtracted."""
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        t = [torch.zeros(1000)]
        Privatizer(DPConfig(clip=1.0, noise_multiplier=1.0)).privatize(t)
        draws.append(t[0])
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("argv, message", [
    (["--dp-clip", "0", "--dp-noise", "1"], "--dp-clip 0.0: use a positive"),
    (["--dp-clip", "-1", "--dp-epsilon", "4", "--dp-rounds", "10"], "--dp-clip -1.0: use a positive"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "1"], "--dp-delta 1.0: use a number strictly between"),
    (["--dp-clip", "1", "--dp-epsilon", "4", "--dp-delta", "0", "--dp-rounds", "5"], "--dp-delta 0.0"),
    (["--dp-clip", "1", "--dp-epsilon", "0", "--dp-rounds", "5"], "--dp-epsilon 0.0: use a positive"),
    (["--dp-clip", "1", "--dp-epsilon", "0.001", "--dp-rounds", "5000"], "is out of reach in 5000 rounds"),
    (["--dp-clip", "1", "--dp-epsilon", "4"], "needs the planned rounds"),
    (["--dp-clip", "1"], "--dp-clip needs --dp-noise"),
    (["--dp-noise", "1"], "needs --dp-clip"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-rounds", "0"], "--dp-rounds 0"),
    (["--clip-tau", "-2"], "--clip-tau '-2': use a positive radius, or auto"),
    (["--secure-aggregation", "0"], "--secure-aggregation 0.0: use a positive bound"),
    (["--secure-aggregation", "1", "--compression", "int8"], "--clip-tau and --compression need to see: drop them"),
    (["--secure-aggregation", "1", "--clip-tau", "auto"], "--clip-tau and --compression need to see: drop them"),
])
def test_bad_privacy_flags_are_one_line_errors(capsys, argv, message):
    from peer.app.cli import EXIT_USAGE, main

    assert main(["--train", *argv]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_the_flags_solve_the_noise_for_the_planned_rounds():
    from peer.app.cli import check_args, parse_args

    args = parse_args(["--train", "--dp-clip", "0.5", "--dp-epsilon", "8", "--max-samples", "800",
                       "--batch-size", "8", "--local-steps", "10"])
    check_args(args)
    assert args.dp.epsilon_budget == 8 and args.dp.clip == 0.5
    assert args.dp.noise_multiplier == pytest.approx(noise_for_epsilon(8, 1e-5, 10))   # 100 steps / 10 per round
    assert MAX_NOISE_MULTIPLIER > args.dp.noise_multiplier > 0


# ---------------------------------------------------------------------------------------- a real trainer


@pytest.fixture
def lone_trainer(tmp_path):
    """A real Trainer (its own DHT, no swarm) with differential privacy; its averager's rounds are replaced by
    ``trainer.rounds_to_come`` (StepResults) and what each round was handed is kept in ``trainer.handed``."""
    from dht import DHT
    from p2p import NodeConfig
    from peer.training.trainer import TrainConfig, Trainer

    dht = DHT(node_config=NodeConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    made = []

    def make(**dp):
        config = TrainConfig(sync="grad", state_timeout=2.0, checkpoint_dir=str(tmp_path / "ckpt"),
                             dp=DPConfig(**{"clip": 0.1, "noise_multiplier": 1.5, **dp}))
        trainer = Trainer(dht, config)
        trainer.rounds_to_come, trainer.handed = [], []

        def injected_round(weight, timeout=None):
            trainer.handed.append(torch.cat([t.flatten() for t in trainer.sync.tensors]).clone())
            return trainer.rounds_to_come.pop(0)
        trainer.averager.step = injected_round
        made.append(trainer)
        return trainer

    yield make
    for trainer in made:
        trainer.shutdown()
    dht.shutdown()


def formed(ok=True):
    return StepResult(ok=ok, group_size=2, peers=["a", "b"], bytes_sent=1000, bytes_received=1000)


def test_the_trainer_counts_rounds_that_formed_and_stops_when_the_budget_is_spent(lone_trainer):
    budget = library_epsilon([(1.5, 3)], 1e-5) * 1.001         # room for exactly 3 rounds
    trainer = lone_trainer(epsilon_budget=budget)
    for t in trainer.sync.tensors:
        t.fill_(1.0)                                             # norm far above C = 0.1
    trainer.rounds_to_come = [formed(), StepResult(ok=False, reason="matchmaking failed: nobody"), formed(False),
                              formed()]
    assert trainer.average(8) is True
    assert trainer.average(8) is False                           # found nobody: nothing left us, nothing counted
    assert trainer.privacy.rounds_counted == 1
    assert trainer.average(8) is False                           # formed, then failed: counted
    assert trainer.average(8) is True
    assert trainer.privacy.rounds_counted == 3
    handed = trainer.handed[0]
    noise_std = 1.5 * 0.1
    assert handed.std().item() == pytest.approx(noise_std, rel=0.05)        # clipped to 0.1, then noised
    assert abs(handed.mean().item() - 0.1 / math.sqrt(handed.numel())) < 3 * noise_std / math.sqrt(handed.numel())
    with pytest.raises(PrivacyBudgetSpent, match="privacy budget spent"):
        trainer.average(8)
    assert len(trainer.handed) == 4 and trainer.budget_spent     # the spent round handed nothing to the averager
    record = trainer.progress_record()
    assert record["epsilon"] == pytest.approx(library_epsilon([(1.5, 3)], 1e-5)) and record["epsilon"] <= budget
    assert record["dp"]["rounds"] == 3 and record["dp"]["delta"] == 1e-5

    from peer.app.status import privacy_text
    assert privacy_text(trainer) == f" | epsilon {record['epsilon']:.2f} (delta 1e-05), budget spent"
    from peer.app.metrics import Metrics
    with socket.socket() as s:     # a free port (released for the metrics server to take)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Metrics(port).update_trainer(trainer, 1.0)
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    value = next(float(line.split()[1]) for line in page.splitlines() if line.startswith("swarmtrain_dp_epsilon "))
    assert value == pytest.approx(record["epsilon"])
    assert "swarmtrain_dp_rounds 3.0" in page


def test_a_restarted_trainer_keeps_its_epsilon_and_local_mode_never_averages_again(lone_trainer):
    trainer = lone_trainer()
    trainer.rounds_to_come = [formed(), formed()]
    trainer.average(8), trainer.average(8)
    trainer.save()
    trainer.shutdown()
    spent_before = trainer.privacy.epsilon()
    budget = library_epsilon([(1.5, 3)], 1e-5) * 1.001
    again = lone_trainer(epsilon_budget=budget, when_spent="local")     # resumes from the same checkpoint
    assert again.privacy.rounds_counted == 2 and again.privacy.epsilon() == pytest.approx(spent_before)
    again.rounds_to_come = [formed()]
    assert again.average(8) is True
    snapshot = again._snapshot
    assert again.average(8) is False and again.average(8) is False    # spent: local training, no raise
    assert len(again.handed) == 1 and again.privacy.rounds_counted == 3
    again.take_snapshot()
    assert again._snapshot is snapshot        # what it trains from now on is not noised: never served


@pytest.mark.slow
def test_dp_trainers_of_a_real_swarm_stop_when_their_budget_is_spent(tmp_path):
    """`python -m peer` processes: two DiLoCo trainers with --dp-epsilon solved for 3 rounds average with each
    other, stop (exit 0) once a fourth round would pass the budget, and publish in the DHT the epsilon their
    accountant reached: the library's for exactly the rounds they took part in. They average with secure
    aggregation (--secure-aggregation): each round's part owner saw only the other's masked contribution."""
    from dht import DHT, subkey_entries
    from p2p import NodeConfig
    from peer.config import progress_key, training_prefix
    from tests.test_peer_train_e2e import Peer, start_swarm

    epsilon, rounds = 20.0, 3
    sigma = noise_for_epsilon(epsilon, 1e-5, rounds)
    peers: list[Peer] = []
    client = None
    try:
        join = start_swarm(tmp_path, "dp", peers)
        trainers = [Peer(f"trainer{i}", tmp_path, *join, "--train", "--local-steps", "4", "--shard", f"{i}/2",
                         "--dp-clip", "1.0", "--dp-epsilon", str(epsilon), "--dp-rounds", str(rounds),
                         "--secure-aggregation", "1")
                    for i in range(2)]
        peers += trainers
        for t in trainers:
            t.wait_for("Finished:", 240)
            assert t.proc.wait(30) == 0, t.log()[-3000:]
            assert "Stopping: privacy budget spent" in t.log(), t.log()[-3000:]
        client = DHT(initial_peers=join[1:2], node_config=NodeConfig(swarm="dp", client_mode=True))
        found = client.get(progress_key(training_prefix("dp", "tiny", "diloco")), latest=True)
        records = [e.value for e in subkey_entries(found)]
        assert len(records) == 2, records
        for record in records:
            assert record["dp"]["rounds"] == rounds and record["dp"]["noise"] == pytest.approx(sigma, abs=1e-4)
            assert record["epsilon"] == pytest.approx(library_epsilon([(sigma, rounds)], 1e-5), rel=1e-4)
            assert record["epsilon"] <= epsilon and record["rounds_ok"] >= 1
    finally:
        if client is not None:
            client.shutdown()
        for p in reversed(peers):
            p.stop()
