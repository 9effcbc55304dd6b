"""Logging setup for swarmtrain processes: one readable line per event, libp2p's noise filtered out.

py-libp2p logs WARNING/ERROR lines for routine events (a stream closed by the peer, a reset after our
own timeout, an unreachable address) and TLS logs "peer ID not found" on the root logger. We do not
edit the library; we raise its loggers' level here and drop the known-noise root messages.
"""
from __future__ import annotations

import logging
import sys

_NOISY_ROOT_MESSAGES = ("peer ID not found",)


class _DropLibp2pNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("libp2p", "multiaddr", "aioquic", "zeroconf")):
            return record.levelno >= logging.CRITICAL
        return not (record.name == "root" and any(m in str(record.msg) for m in _NOISY_ROOT_MESSAGES))


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once: ``HH:MM:SS LEVEL name: message`` on stderr; libp2p only from ERROR."""
    if isinstance(level, str):
        if level.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = logging.getLevelNamesMapping()[level.upper()]
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_swarmtrain", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._swarmtrain = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_DropLibp2pNoise())
    root.addHandler(handler)
    root.setLevel(level)
    # libp2p reports routine events (an unreachable peer, a reset stream) as WARNING/ERROR, some through
    # its own handlers; we surface those failures as exceptions of our own, so its loggers speak only
    # at DEBUG (when the user asked for everything) or CRITICAL.
    for name in ("libp2p", "multiaddr", "aioquic", "zeroconf", "async_service"):
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.CRITICAL)
