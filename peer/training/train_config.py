"""What a trainer does: :class:`TrainConfig`, the options the CLI's training flags map onto."""
from __future__ import annotations

from dataclasses import dataclass

from peer.config import STATE_CONFIRMATIONS, SYNC_MODES

from .privacy import DPConfig


@dataclass
class TrainConfig:
    """What a trainer does. Every trainer of a swarm should use the same model, sync and schedule.

    :param model: model preset ("tiny" or "small"); ``seed`` fixes the shared initial weights.
    :param sync: "diloco" (``local_steps`` inner steps per averaging round) or "grad" (average every step).
    :param max_samples: stop after this many local samples (None: until interrupted).
    :param total_samples: horizon of the cosine learning-rate schedule, in swarm-wide samples.
    :param bandwidth: upload MB/s declared to the averager (parts and pacing, see :class:`~averaging.Averager`).
    :param dp: differential privacy of our contributions (:class:`~peer.training.privacy.DPConfig`; None: off).
    :param state_confirmations: accept a downloaded state only when this many peers besides its donor announced
        its hash for its step (0: trust any donor whose bytes match its own announcement).
    :param clip_tau: CenteredClip radius for the averaging parts we own (Byzantine-robust rounds, see
        :class:`~averaging.AveragerConfig`); None: the exact weighted mean.
    :param secure_bound: secure aggregation (part owners see only masked contributions, see
        :mod:`averaging.masked_round`), each element of a contribution clipped to +-this; None: off.
    """

    model: str = "tiny"
    batch_size: int = 8
    lr: float = 3e-3
    warmup_samples: int = 1000
    total_samples: int = 1_000_000
    max_samples: int | None = None
    sync: str = "diloco"
    local_steps: int = 20
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    group_size: int = 4
    matchmaking_time: float = 2.0
    compression: str = "none"
    bandwidth: float | None = None
    data: str | None = None
    shard: int = 0
    num_shards: int = 1
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    eval_every: int = 50
    #: every this many steps, log a greedy continuation of "The " (so a user sees the model learn); 0: never
    sample_every: int = 200
    eval_batches: int = 8
    k_min: int = 1
    state_timeout: float = 60.0
    share_every: float = 10.0
    state_confirmations: int = STATE_CONFIRMATIONS
    dp: DPConfig | None = None
    clip_tau: float | None = None
    secure_bound: float | None = None

    def __post_init__(self) -> None:
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {self.sync!r}")
        if self.state_confirmations < 0:
            raise ValueError(f"state_confirmations must be >= 0, got {self.state_confirmations}")
        if self.batch_size < 1 or self.local_steps < 1 or not 0 <= self.shard < self.num_shards:
            raise ValueError("need batch_size >= 1, local_steps >= 1 and 0 <= shard < num_shards")

    def planned_rounds(self) -> int | None:
        """Averaging rounds a trainer plans when it stops after ``max_samples`` (None: no planned end): one per
        ``local_steps`` steps with DiLoCo, one per step with ``sync="grad"``."""
        if self.max_samples is None:
            return None
        steps = -(-self.max_samples // self.batch_size)
        return -(-steps // self.local_steps) if self.sync == "diloco" else steps
