"""The options of an :class:`~peer.hosting.server.ExpertServer`, in one dataclass the CLI maps its flags onto."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostingConfig:
    """How an expert host batches, declares, checkpoints and limits its experts.

    :param max_batch_size: most rows one batch (and one request) may have.
    :param batch_window_ms: after the first request of a batch, wait this long for more (0: take only
        what is already queued — the lowest latency; requests still batch while the expert is busy).
    :param heartbeat: seconds between re-declarations; ``expiration``: lifetime of each declaration.
    :param checkpoint_dir: where ``<uid>.pt`` files are kept (None: no checkpoints).
    :param checkpoint_interval: seconds between periodic saves of experts that changed.
    :param max_concurrent_batches: batches computed at once (1 suits a CPU or one GPU).
    :param max_message_bytes, handler_timeout, max_concurrent_per_peer: RPC limits (see :class:`p2p.ServiceLimits`).
    :param keep_memory: call :func:`~peer.hosting.server.keep_freed_memory` (process-wide malloc tuning) when starting.
    """

    max_batch_size: int = 4096
    batch_window_ms: float = 0.0
    heartbeat: float = 10.0
    expiration: float = 30.0
    checkpoint_dir: str | Path | None = None
    checkpoint_interval: float = 60.0
    max_concurrent_batches: int = 1
    max_message_bytes: int = 64 << 20
    handler_timeout: float = 60.0
    max_concurrent_per_peer: int = 64
    keep_memory: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.batch_window_ms < 0 or self.max_concurrent_batches < 1:
            raise ValueError("need max_batch_size >= 1, batch_window_ms >= 0, max_concurrent_batches >= 1")
        if not 0 < self.heartbeat < self.expiration:
            raise ValueError(f"need 0 < heartbeat < expiration, got {self.heartbeat}, {self.expiration}")
