"""User-level differential privacy of a trainer's contributions: clip, add Gaussian noise, account for it.

Each trainer is one user (or one data silo). What leaves it for the swarm's averaging is its *contribution*:
the DiLoCo pseudo-gradient ``anchor - params`` of an outer step, or with ``--sync grad`` the gradient of a
step. :class:`Privatizer` makes each one a Gaussian mechanism (DP-FedAvg, McMahan et al., 2018, with the
noise added by the user itself):

1. clip the contribution, all tensors together, to L2 norm ``clip`` (C): whatever the user's data, it moves
   the contribution by at most C — the sensitivity under add/remove-one-user;
2. add independent Gaussian noise of standard deviation ``noise_multiplier * C`` to every element;
3. count one Gaussian event of that noise multiplier for each round whose group formed (data may have left
   the peer; a round that found nobody sent nothing and costs nothing), and report epsilon at ``delta``
   from Google's ``dp-accounting`` library (its Rényi-DP accountant, :class:`dp_accounting.rdp.RdpAccountant`).

Everything downstream — the averaged mean, the anchor it updates, the state newcomers download — is
post-processing of noised contributions and costs no further privacy. What it does **not** cover:
expert calls (a trainer's forward and backward passes send hidden states and their gradients to the
hosts of the experts it uses), the losses in its progress record, and its sample counts (set by the
schedule, not by the data's content).

When a budget is set (``epsilon_budget``) and one more round would exceed it, the budget is spent:
:meth:`Privatizer.may_contribute` turns False and the trainer stops, or trains on without averaging
(``when_spent="local"``), as its config says.

We use ``dp-accounting`` rather than Opacus's accountants: we clip and noise whole contributions, not
per-sample gradients, so Opacus's training hooks would go unused, while dp-accounting is only the
accountant (pure Python on numpy/scipy, no torch version to match) and also solves for the noise
(:func:`dp_accounting.calibrate_dp_mechanism`) when a user gives a target epsilon.
"""
from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: a noise multiplier above this swamps any contribution (noise 100x its norm): training would not move
MAX_NOISE_MULTIPLIER = 100.0
WHEN_SPENT = ("stop", "local")


class PrivacyBudgetSpent(RuntimeError):
    """One more contribution would take this trainer's epsilon past its budget."""


def _accountant():
    from dp_accounting.rdp import RdpAccountant
    return RdpAccountant()


def epsilon_after(rounds: list[tuple[float, int]], delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` (pairs of noise multiplier and count), by dp-accounting's RDP
    accountant; 0.0 when no round was counted."""
    import dp_accounting

    events = [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), count)
              for sigma, count in rounds if count > 0]
    if not events:
        return 0.0
    accountant = _accountant()
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(epsilon: float, delta: float, rounds: int) -> float:
    """The smallest noise multiplier whose ``rounds`` contributions stay within ``(epsilon, delta)``.

    Raises ValueError (a user-facing message) when the target cannot be met with a useful noise, i.e.
    it needs more than ``MAX_NOISE_MULTIPLIER``."""
    import dp_accounting

    check_target(epsilon, delta)
    if rounds < 1:
        raise ValueError(f"need at least one planned round to solve for the noise, got {rounds}")
    needed = epsilon_after([(MAX_NOISE_MULTIPLIER, rounds)], delta)
    if needed > epsilon:
        raise ValueError(f"epsilon {epsilon:g} at delta {delta:g} is out of reach in {rounds} rounds: even noise "
                         f"{MAX_NOISE_MULTIPLIER:g} times the clip norm (which drowns every contribution) gives "
                         f"epsilon {needed:.3g}; allow a larger epsilon or plan fewer rounds")
    sigma = dp_accounting.calibrate_dp_mechanism(
        _accountant, lambda s: dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(s), rounds),
        epsilon, delta, dp_accounting.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER), tol=1e-4)
    while epsilon_after([(sigma, rounds)], delta) > epsilon:  # Brent's answer lies within tol, on either side
        sigma += 1e-4
    return float(sigma)


def check_target(epsilon: float, delta: float) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"--dp-epsilon {epsilon!r}: use a positive finite number (typical: 1 to 10)")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"--dp-delta {delta!r}: use a number strictly between 0 and 1 (typical: 1e-5, below "
                         f"1 / the number of users)")


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy of one trainer's contributions (see the module docstring).

    :param clip: C, the L2 norm every contribution is clipped to (all dense tensors together); pick it near
        the norm honest contributions have (the log says how often they were clipped).
    :param noise_multiplier: sigma; each element gets Gaussian noise of standard deviation ``sigma * C``.
    :param delta: the delta at which epsilon is reported (and the budget kept).
    :param epsilon_budget: stop contributing once one more round would take epsilon past this (None: no limit,
        epsilon is only reported).
    :param when_spent: "stop" (end training) or "local" (train on locally, never averaging again).
    """

    clip: float
    noise_multiplier: float
    delta: float = 1e-5
    epsilon_budget: float | None = None
    when_spent: str = "stop"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"--dp-clip {self.clip!r}: use a positive finite L2 norm")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"--dp-noise {self.noise_multiplier!r}: use a positive noise multiplier")
        if not 0 < self.delta < 1:
            raise ValueError(f"--dp-delta {self.delta!r}: use a number strictly between 0 and 1")
        if self.epsilon_budget is not None:
            check_target(self.epsilon_budget, self.delta)
        if self.when_spent not in WHEN_SPENT:
            raise ValueError(f"--dp-when-spent must be one of {WHEN_SPENT}, got {self.when_spent!r}")

    @classmethod
    def from_flags(cls, clip: float | None, noise: float | None, epsilon: float | None, delta: float,
                   planned_rounds: int | None, when_spent: str = "stop") -> DPConfig | None:
        """What the ``--dp-*`` flags ask for: None without any; with ``epsilon`` and no ``noise``, the noise
        solved for ``planned_rounds``; ValueError (a user-facing message) when they do not fit together."""
        if clip is None and noise is None and epsilon is None:
            return None
        if clip is None:
            raise ValueError("differential privacy needs --dp-clip C (the L2 norm each contribution is clipped to)")
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"--dp-clip {clip!r}: use a positive finite L2 norm")
        if noise is None and epsilon is None:
            raise ValueError("--dp-clip needs --dp-noise SIGMA, or --dp-epsilon E to solve for the noise")
        if noise is None:
            if not planned_rounds:
                raise ValueError("--dp-epsilon without --dp-noise needs the planned rounds: give --dp-rounds N "
                                 "or --max-samples")
            noise = noise_for_epsilon(epsilon, delta, planned_rounds)
        return cls(clip=clip, noise_multiplier=noise, delta=delta, epsilon_budget=epsilon, when_spent=when_spent)


class Privatizer:
    """Clips and noises a trainer's contributions in place, and keeps the accountant's count of them."""

    def __init__(self, config: DPConfig, generator: torch.Generator | None = None):
        self.config = config
        self.rounds: dict[float, int] = {}   # noise multiplier -> rounds counted with it (restored ones too)
        self.clipped = self.privatized = 0
        self.spent = False                   # the budget ran out: we send nothing any more
        # Not torch's default generator: trainers seed that alike (identical initial weights), so its noise
        # would be known to every peer. A generator of our own, seeded from the OS's entropy.
        self.generator = generator or torch.Generator().manual_seed(secrets.randbits(63))

    @property
    def rounds_counted(self) -> int:
        return sum(self.rounds.values())

    def epsilon(self, extra_rounds: int = 0) -> float:
        """Epsilon at the config's delta over the counted rounds (plus ``extra_rounds`` more at today's noise)."""
        rounds = dict(self.rounds)
        rounds[self.config.noise_multiplier] = rounds.get(self.config.noise_multiplier, 0) + extra_rounds
        return epsilon_after(list(rounds.items()), self.config.delta)

    def may_contribute(self) -> bool:
        """False once one more round would take epsilon past the budget."""
        budget = self.config.epsilon_budget
        return budget is None or self.epsilon(extra_rounds=1) <= budget

    def prepare(self, tensors: list[torch.Tensor]) -> bool:
        """Clip and noise our contribution before a round (:meth:`privatize`); False (send nothing) once the budget
        is spent, which with ``when_spent="stop"`` first raises :class:`PrivacyBudgetSpent`."""
        if self.spent:
            return False
        if not self.may_contribute():
            self.spent = True
            message = (f"privacy budget spent: one more round would take epsilon past {self.config.epsilon_budget:g} "
                       f"(now {self.epsilon():.3f} at delta {self.config.delta:g} after {self.rounds_counted} rounds)")
            if self.config.when_spent == "stop":
                raise PrivacyBudgetSpent(message)
            logger.warning("%s; training on locally, never averaging again", message)
            return False
        norm = self.privatize(tensors)
        logger.debug("Contribution norm %.4g, clipped to %g and noised", norm, self.config.clip)
        return True

    @torch.no_grad()
    def privatize(self, tensors: list[torch.Tensor]) -> float:
        """Clip ``tensors`` together to L2 norm C and add N(0, (sigma C)^2) to each element, in place; returns
        the norm before clipping."""
        c = self.config
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
        scale = min(1.0, c.clip / norm) if norm > 0 else 1.0
        self.privatized += 1
        self.clipped += scale < 1.0
        std = c.noise_multiplier * c.clip
        for t in tensors:
            if scale < 1.0:
                t.mul_(scale)
            t.add_(torch.randn(t.shape, generator=self.generator, dtype=t.dtype, device="cpu").to(t.device) * std)
        return norm

    def count_round(self) -> None:
        """A round our (privatized) contribution may have left in: one more Gaussian event."""
        sigma = self.config.noise_multiplier
        self.rounds[sigma] = self.rounds.get(sigma, 0) + 1

    def record(self) -> dict:
        """What the trainer's progress record says of its privacy besides epsilon: ``delta``, rounds, C, sigma."""
        c = self.config
        return {"delta": c.delta, "rounds": self.rounds_counted,
                "clip": c.clip, "noise": round(c.noise_multiplier, 4), "budget": c.epsilon_budget,
                "clipped": self.clipped, "privatized": self.privatized}

    def state(self) -> dict:
        """The accountant's count, for the checkpoint: a restarted trainer must not start again at epsilon 0."""
        return {"rounds": [[sigma, n] for sigma, n in self.rounds.items()]}

    def restore(self, state: dict) -> None:
        for sigma, n in state.get("rounds", []):
            self.rounds[float(sigma)] = self.rounds.get(float(sigma), 0) + int(n)
