"""The options of an :class:`~averaging.averager.Averager`, in one dataclass the CLI maps its flags onto."""
from __future__ import annotations

import math
from dataclasses import dataclass

from p2p.streams import DEFAULT_CHUNK_BYTES as CHUNK_BYTES, DEFAULT_WINDOW_BYTES as WINDOW_BYTES


@dataclass(frozen=True)
class AveragerConfig:
    """How an averager finds its groups and runs its rounds.

    :param target_group_size: peers per all-reduce group; ``min_group_size``: fewest worth a round.
    :param compression: "none", "fp16", "int8" or "int4" (8- or 4-bit blockwise); a buffer under 4096 elements in all
        (16 KB) stays exact, where compressing saves nothing that matters.
    :param bandwidth: this peer's upload bandwidth in MB/s, if you know it. Parts are sized by it, and the
        round's bulk transfers are paced to it (Linux kernel pacing, at ``PACING_SHARE`` of it): the
        flows to the other members split it in proportion to what each carries, so they finish together
        instead of fighting over the uplink's queue (``bench/allreduce.py --netns --bandwidth-mbit 100``, 4 peers:
        all-reduce in 1.07x the bound, against 1.29x unpaced). Declare no more than the link has: pacing
        never sends faster.
        None (default): measured (:mod:`averaging.bandwidth`): the first round sizes parts as if every member
        had ``NOMINAL_BANDWIDTH``, later ones by the upload rate our rounds showed; nothing is paced.
        Client-mode and private peers (behind NAT) contribute but own no part.
    :param matchmaking_time: how long to wait for peers to show up before averaging with those present.
    :param chunk_timeout: deadline for each chunk/keepalive exchange; None derives it from the chunk size
        and bandwidth. A member silent for that long is dropped from the round.
    :param chunk_bytes: bytes of one chunk before compression; ``window_bytes``: bytes in flight per stream.
    :param clip_tau: Byzantine-robust rounds: each part we own is aggregated with CenteredClip of radius
        ``clip_tau`` (:func:`averaging.robust.centered_clip`) instead of the weighted mean, so one peer moves
        a part by at most ``clip_tau * its weight / the honest weight`` (L2) however wrong its values are.
        Pick it above the honest spread of a part (honest contributions within ``clip_tau`` of each other
        average exactly). ``"auto"``: the radius is measured in each round, per part, as twice the median
        distance of the contributions to their coordinate-wise median (:func:`averaging.robust.honest_spread_tau`;
        honest while honest peers hold more than half the weight). None (default): the exact weighted mean.
    :param max_abs_value: if set, a contribution with any element beyond +-max_abs_value is out of range:
        excluded from the round and its sender banned, like NaN (pick it well above honest values).
    :param error_feedback: with a lossy ``compression``, remember what each chunk of our contributions and
        of the parts we reduce lost to compression, and add it to the same chunk next round (EF-SGD), so
        quantization errors cancel over rounds instead of accumulating. Meant for averaging updates (DiLoCo
        pseudo-gradients, gradients), not parameters. Kept only across successful rounds.
    :param secure_aggregation: part owners see only masked contributions and learn only their sum
        (:mod:`averaging.masked_round`: pairwise masks agreed in matchmaking, fixed point modulo 2**32, 4 bytes
        an element). Needs ``max_abs_value`` (contributions are clipped to it: the fixed point's range), and rules
        out ``clip_tau``, lossy ``compression`` and ``error_feedback``, which need to see single contributions.
        Peers with and without it never average together.
    :param ban_seconds: how long a peer that sent NaN/inf, out-of-range or undecodable data is refused
        (:mod:`averaging.bans`); 0 disables banning (such data is still excluded from the round).
    """

    target_group_size: int = 4
    min_group_size: int = 2
    compression: str = "none"
    bandwidth: float | None = None
    matchmaking_time: float = 3.0
    chunk_timeout: float | None = None
    chunk_bytes: int = CHUNK_BYTES
    window_bytes: int = WINDOW_BYTES
    clip_tau: float | str | None = None
    max_abs_value: float | None = None
    error_feedback: bool = False
    ban_seconds: float = 600.0
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.min_group_size <= self.target_group_size:
            raise ValueError("need 2 <= min_group_size <= target_group_size")
        if self.bandwidth is not None and not (self.bandwidth > 0 and math.isfinite(self.bandwidth)):
            raise ValueError("bandwidth must be a positive number of MB/s (or None: not declared)")
        if self.clip_tau not in (None, "auto") and not (isinstance(self.clip_tau, (int, float))
                                                        and math.isfinite(self.clip_tau) and self.clip_tau > 0):
            raise ValueError(f"clip_tau must be a positive finite number or 'auto', got {self.clip_tau!r}")
        if self.max_abs_value is not None and not self.max_abs_value > 0:
            raise ValueError(f"max_abs_value must be > 0, got {self.max_abs_value!r}")
        if self.secure_aggregation and (self.max_abs_value is None or self.clip_tau is not None
                                        or self.compression != "none" or self.error_feedback):
            raise ValueError("secure_aggregation needs max_abs_value (the range contributions are clipped to) and "
                             "no clip_tau, compression or error_feedback (they need single contributions)")
        if not self.matchmaking_time > 0 or self.chunk_bytes < 1 or self.window_bytes < 1:
            raise ValueError("need matchmaking_time > 0, chunk_bytes >= 1 and window_bytes >= 1")
