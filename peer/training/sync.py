"""How a trainer keeps its dense parameters in step with the swarm: one class per ``--sync`` mode.

Both keep the interface a :class:`~peer.training.trainer.Trainer` drives:

* ``tensors`` — what the averager averages (and ``error_feedback`` — whether compression losses carry over);
* :meth:`after_backward` — the optimizer step(s) of one local step, averaging when it is due;
* :meth:`shared_tensors` / :meth:`adopt` — the state a newcomer downloads, and taking the swarm's;
* :meth:`progress_due` — whether the train loop publishes progress at a step (a round may have just done so);
* :meth:`finish` — what a trainer does once it has seen all its samples (its last state is the swarm's);
* :meth:`state` / :meth:`restore` — what goes into, and comes back from, a checkpoint.

Modes:

* :class:`GradSync` (``sync="grad"``) — after every local step the gradients are averaged with a group of
  trainers (weighted by samples), then every trainer applies the same optimizer step.
* :class:`DiLoCoSync` (``sync="diloco"``, Douillard et al., 2023) — ``local_steps`` inner AdamW steps, then
  the *pseudo-gradient* ``anchor - params`` is averaged across trainers and applied to the anchor by an outer
  Nesterov-momentum SGD; every trainer continues from the new anchor. It sends ``local_steps`` times fewer
  bytes per sample.
"""
from __future__ import annotations

import random
from typing import Protocol

import torch

from .train_config import TrainConfig


class Loop(Protocol):
    """What a strategy uses of the trainer that drives it (:class:`~peer.training.trainer.Trainer`)."""

    step: int
    samples_since_sync: int

    def average(self, weight: float) -> bool: ...
    def take_snapshot(self) -> None: ...
    def catch_up(self) -> bool: ...
    def publish_progress(self) -> None: ...
    def announce_state(self) -> None: ...

PROGRESS_STEPS = 10  # with --sync grad, publish progress (and read the swarm's) every this many steps


def clip_and_step(dense: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
    """The inner update of every mode: gradients clipped to norm 1, then the optimizer's step."""
    torch.nn.utils.clip_grad_norm_(dense, 1.0)
    opt.step()


class GradSync:
    """Average the gradients of every step, then step the optimizer (see the module docstring)."""

    name = "grad"
    error_feedback = False
    set_grads_to_none = False   # the averager holds the .grad tensors: they must stay the same objects

    def __init__(self, dense: list[torch.Tensor], opt: torch.optim.Optimizer, config: TrainConfig):
        self.dense, self.opt, self.config = dense, opt, config
        for p in dense:
            p.grad = torch.zeros_like(p)
        self.tensors = [p.grad for p in dense]

    def after_backward(self, trainer: Loop, samples: int) -> None:
        trainer.average(weight=samples)
        clip_and_step(self.dense, self.opt)
        if trainer.step % self.config.eval_every == 0:
            trainer.take_snapshot()

    def progress_due(self, step: int) -> bool:
        return step == 1 or step % PROGRESS_STEPS == 0

    def finish(self, trainer: Loop) -> None:
        pass  # every step was averaged

    def shared_tensors(self) -> list[torch.Tensor]:
        return list(self.dense)

    def adopt(self, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for mine, theirs in zip(self.dense, tensors):
                mine.copy_(theirs)

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass


class DiLoCoSync:
    """Inner steps locally; every ``local_steps`` an outer step on the averaged pseudo-gradient (after a failed round,
    the next comes after a random 1 to ``local_steps`` steps, see :meth:`after_backward`)."""

    name = "diloco"
    error_feedback = True
    set_grads_to_none = True

    def __init__(self, dense: list[torch.Tensor], opt: torch.optim.Optimizer, config: TrainConfig):
        self.dense, self.opt, self.config = dense, opt, config
        self.anchor = [p.detach().clone() for p in dense]
        self.tensors = self.outer_grad = [torch.zeros_like(p) for p in dense]
        self.outer_opt = torch.optim.SGD(self.anchor, lr=config.outer_lr, momentum=config.outer_momentum,
                                         nesterov=True)
        self.next_round = config.local_steps   # the local step after which we average next
        self.last_round = 0                    # the step of our last attempt (it published progress)
        self.rng = random.Random()

    def after_backward(self, trainer: Loop, samples: int) -> None:
        clip_and_step(self.dense, self.opt)
        if trainer.step >= self.next_round:
            self.last_round = trainer.step
            ok = self.outer_step(trainer)
            # Trainers of equal speed keep the phase they have: once their rounds drift further apart than the
            # matchmaking time, every round finds nobody, for good. A failed round is therefore retried after a
            # random number of steps (1 to local_steps), so drifted rounds come together again.
            self.next_round = trainer.step + (self.config.local_steps if ok else
                                              self.rng.randint(1, self.config.local_steps))

    def outer_step(self, trainer: Loop) -> bool:
        """Average pseudo-gradients, apply them to the anchor with Nesterov SGD, restart from it.

        Averaging pseudo-gradients never brings two different anchors back together, so a trainer that
        missed rounds (paused, cut off, or its matchmaking missed the others') first adopts the newer
        anchor and momentum that peers announce, keeping this round's local progress as its pseudo-gradient.
        """
        with torch.no_grad():
            for g, a, p in zip(self.outer_grad, self.anchor, self.dense):
                g.copy_(a - p)
        if trainer.catch_up():
            with torch.no_grad():
                for g, a, p in zip(self.outer_grad, self.anchor, self.dense):
                    p.copy_(a - g)
        trainer.publish_progress()  # once per round, so the LR schedule follows the swarm's samples closely
        if not trainer.average(weight=trainer.samples_since_sync):
            return False  # keep training locally; the next round averages the longer stretch
        with torch.no_grad():
            for a, g in zip(self.anchor, self.outer_grad):
                a.grad = g.clone()
            self.outer_opt.step()
            for p, a in zip(self.dense, self.anchor):
                p.copy_(a)
        trainer.samples_since_sync = 0
        trainer.take_snapshot()
        trainer.announce_state()  # now, so peers that missed this round catch up before their next one
        return True

    def finish(self, trainer: Loop) -> None:
        """A last outer step when the last local steps were not averaged yet: a finished trainer keeps (and
        checkpoints) the swarm's anchor, not its own drift. Trainers that finish together meet in this round
        even when their scheduled rounds fell apart after a failed one."""
        if trainer.samples_since_sync > 0 and self.last_round != trainer.step:
            self.last_round = trainer.step
            self.outer_step(trainer)

    def progress_due(self, step: int) -> bool:
        due = step == 1 or step % self.config.eval_every == 0
        return due and step != self.last_round   # an outer step has just published

    def shared_tensors(self) -> list[torch.Tensor]:
        momentum = [self.outer_opt.state.get(a, {}).get("momentum_buffer") for a in self.anchor]
        return [*self.anchor, *(torch.zeros_like(a) if m is None else m for a, m in zip(self.anchor, momentum))]

    def adopt(self, tensors: list[torch.Tensor]) -> None:
        n = len(self.anchor)
        with torch.no_grad():
            for mine, theirs in zip(self.anchor, tensors[:n]):
                mine.copy_(theirs)
            for a, m in zip(self.anchor, tensors[n:]):
                self.outer_opt.state[a]["momentum_buffer"] = m.clone()
            for p, a in zip(self.dense, self.anchor):
                p.copy_(a)

    def state(self) -> dict:
        return {"anchor": [a.clone() for a in self.anchor], "outer_opt": self.outer_opt.state_dict()}

    def restore(self, state: dict) -> None:
        self.next_round = state.get("step", 0) + self.config.local_steps
        if "anchor" in state:
            with torch.no_grad():
                for a, saved in zip(self.anchor, state["anchor"]):
                    a.copy_(saved)
            self.outer_opt.load_state_dict(state["outer_opt"])


STRATEGIES = {cls.name: cls for cls in (GradSync, DiLoCoSync)}
