"""The one-line training status a volunteer sees (tqdm), mirrored to Prometheus metrics if enabled."""
from __future__ import annotations

import time

from tqdm import tqdm


def privacy_text(trainer) -> str:
    """`` | epsilon 1.23 (delta 1e-05)`` with differential privacy on (``, budget spent`` once it is), else empty."""
    if trainer.privacy is None:
        return ""
    spent = ", budget spent" if trainer.budget_spent else ""
    return f" | epsilon {trainer.privacy.epsilon():.2f} (delta {trainer.privacy.config.delta:g}){spent}"


class StatusLine:
    """``loss 2.31 | 41.2 samples/s | peers 5 | experts used 16 | averaging 12 ok / 1 failed``, and with
    differential privacy ``| epsilon 1.23 (delta 1e-05)``."""

    def __init__(self, trainer, metrics=None, every: float = 1.0):
        self.trainer, self.metrics, self.every = trainer, metrics, every
        # on a terminal only (disable=None): in a log file the bar would add a line per update
        self.bar = tqdm(total=trainer.config.max_samples, unit="sample", dynamic_ncols=True, leave=True, disable=None)
        self._last, self._last_samples = time.monotonic(), trainer.samples

    def update(self, trainer, loss: float) -> None:
        self.bar.update(trainer.samples - self.bar.n)
        now = time.monotonic()
        if now - self._last < self.every:
            return
        speed = (trainer.samples - self._last_samples) / (now - self._last)
        self._last, self._last_samples = now, trainer.samples
        used = sum(len(getattr(m, "last_used_uids", ()) or ()) for m in trainer.model.modules())
        self.bar.set_postfix_str(f"loss {trainer.loss_ema:.3f} | {speed:.1f} samples/s | peers "
                                 f"{len(trainer.dht.routing)} | experts used {used} | averaging "
                                 f"{trainer.rounds_ok} ok / {trainer.rounds_failed} failed" + privacy_text(trainer))
        if self.metrics:
            self.metrics.update_trainer(trainer, speed)

    def __enter__(self) -> "StatusLine":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
