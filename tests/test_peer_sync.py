"""DiLoCo's round schedule and its final round, driven by a stand-in for the trainer (no network).

The stand-in's ``average`` succeeds or fails as the test says and records at which steps it was called; the
strategy's tensors are really updated, so the checks also see the anchor move only on successful rounds.
"""
from __future__ import annotations

import torch

from peer.training.sync import DiLoCoSync
from peer.training.train_config import TrainConfig


class Loop:
    def __init__(self, outcomes):
        self.step = self.samples_since_sync = 0
        self.outcomes = outcomes          # step -> whether a round at that step succeeds (default: it does)
        self.rounds: list[int] = []

    def average(self, weight: float) -> bool:
        self.rounds.append(self.step)
        return self.outcomes.get(self.step, True)

    def take_snapshot(self): pass
    def catch_up(self): return False
    def publish_progress(self): pass
    def announce_state(self): pass


def drive(sync: DiLoCoSync, loop: Loop, param: torch.nn.Parameter, steps: int) -> None:
    for _ in range(steps):
        loop.step += 1
        loop.samples_since_sync += 1
        param.grad = torch.ones_like(param)
        sync.after_backward(loop, 1)
    sync.finish(loop)


def make(local_steps: int):
    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([param], lr=0.1)
    return param, DiLoCoSync([param], opt, TrainConfig(local_steps=local_steps))


def test_rounds_every_local_steps_and_none_extra_at_the_end():
    param, sync = make(local_steps=5)
    loop = Loop({})
    drive(sync, loop, param, 20)
    assert loop.rounds == [5, 10, 15, 20]          # step 20 was a round: finish adds none
    assert torch.equal(param.detach(), sync.anchor[0])


def test_a_failed_round_is_retried_within_local_steps_and_the_last_steps_are_averaged_at_the_end():
    for seed in range(20):
        param, sync = make(local_steps=5)
        sync.rng.seed(seed)
        loop = Loop({5: False})
        drive(sync, loop, param, 21)
        assert loop.rounds[0] == 5 and 6 <= loop.rounds[1] <= 10, loop.rounds
        # after the retry the schedule is every 5 steps again, and the steps after the last round are averaged
        assert all(b - a == 5 for a, b in zip(loop.rounds[1:-2], loop.rounds[2:-1])), loop.rounds
        assert loop.rounds[-1] == 21 and loop.samples_since_sync == 0
        assert torch.equal(param.detach(), sync.anchor[0])


def test_a_failed_final_round_keeps_the_local_progress():
    param, sync = make(local_steps=5)
    loop = Loop({7: False})
    drive(sync, loop, param, 7)
    assert loop.rounds == [5, 7]
    anchor_after_round_5 = sync.anchor[0].clone()
    assert not torch.equal(param.detach(), anchor_after_round_5)   # steps 6, 7 are kept, not thrown away
    assert loop.samples_since_sync == 2
