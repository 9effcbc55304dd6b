"""What every peer of a swarm must agree on: the model's shape and the names of the DHT keys it meets under.

* :class:`ModelConfig` — the MoE transformer's hyper-parameters (presets ``tiny`` and ``small``); it also
  names each layer's expert grid (``uid_prefix``).
* The DHT keys of training, all derived from one *training prefix* ``f"{swarm}.{model}.{sync}"``
  (:func:`training_prefix`), so trainers of other models or sync modes never meet:

  ============================  ==========================================  ============================
  key                           what lives there                            written by
  ============================  ==========================================  ============================
  ``<prefix>.progress``         each trainer's samples, step, loss          :mod:`peer.training.trainer`
  ``<prefix>.averaging``        matchmaking announcements (seconds)         :mod:`averaging.matchmaking`
  ``<prefix>.gossip``           gossip matchmaking                          :mod:`averaging.gossip`
  ``<prefix>.state``            offers of the current dense state           :mod:`averaging.state`
  ``<uid_prefix(layer)>.``      expert declarations of one layer's grid     :mod:`peer.moe.directory`
  ``experts.load``              rows each expert host served                :mod:`peer.hosting.server`
  ``peers.info``                each peer's version, roles, reachability    :mod:`peer.app.roles`
  ============================  ==========================================  ============================
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from averaging.matchmaking import group_key
from averaging.state import state_key

SYNC_MODES = ("diloco", "grad")
#: a trainer accepts a downloaded state only when this many peers besides its donor announced its hash for its
#: step (:func:`averaging.state.adownload_state`); a swarm needs this many + 1 trainers in step for anyone to catch up
STATE_CONFIRMATIONS = 2
#: where every peer says who it is (sub-key: its peer ID): ``{"version", "roles", "reachability", "started"}``
PEER_INFO_KEY = "peers.info"


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`MoETransformer`; use ``ModelConfig.tiny()`` / ``.small()`` for presets."""

    vocab_size: int = 256            # byte-level tokens
    block_size: int = 64             # context length
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    grid_size: tuple[int, ...] = (4, 4)   # expert grid per layer
    k: int = 2                       # experts per token
    beam_size: int | None = None     # beam search width (None = k)
    expert_type: str = "ffn"         # name in the peer.moe.experts registry
    aux_loss_weight: float = 0.01    # weight of the load-balancing loss

    def __post_init__(self) -> None:
        self.grid_size = tuple(self.grid_size)
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "k")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0 or self.aux_loss_weight < 0:
            raise ValueError("need 0 <= dropout < 1 and aux_loss_weight >= 0")
        if self.beam_size is not None and (not isinstance(self.beam_size, int) or self.beam_size < 1):
            raise ValueError(f"ModelConfig.beam_size must be None or a positive int, got {self.beam_size!r}")
        if not self.grid_size or any(g < 1 for g in self.grid_size) or self.k > math.prod(self.grid_size):
            raise ValueError(f"grid_size {self.grid_size} must be positive and hold at least k={self.k} experts")

    def uid_prefix(self, layer: int) -> str:
        """Expert UID prefix of layer ``layer``: ``f"{expert_type}{layer}"``, e.g. ``"ffn0"`` (UIDs ``"ffn0.1.3"``)."""
        return f"{self.expert_type}{layer}"

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A model that trains at several steps/s on 2 CPU cores (2 layers, 64 wide, 4x4 experts, block 64)."""
        return replace(cls(), **overrides)

    @classmethod
    def small(cls, **overrides: Any) -> ModelConfig:
        """nanoGPT-sized (6 layers, 384 wide, 6 heads, block 256) with a 4x8 expert grid per layer, k=4."""
        base = cls(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.1, grid_size=(4, 8), k=4)
        return replace(base, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Return the preset called ``name`` (``"tiny"`` or ``"small"``) with ``overrides`` applied."""
        if name not in ("tiny", "small"):
            raise ValueError(f"unknown preset {name!r}; choose 'tiny' or 'small'")
        return getattr(cls, name)(**overrides)

    def expert_root_keys(self) -> list[str]:
        """The DHT keys under which each layer's experts are declared: ``["ffn0.", "ffn1.", ...]``."""
        return [f"{self.uid_prefix(layer)}." for layer in range(self.n_layer)]


def training_prefix(swarm: str, model: str, sync: str) -> str:
    """The name trainers of ``model`` with ``sync`` publish under: ``"local-demo.tiny.diloco"``."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
    if not swarm or "/" in swarm:
        raise ValueError(f"swarm must be a non-empty name without '/', got {swarm!r}")
    ModelConfig.preset(model)  # raises ValueError for an unknown preset
    return f"{swarm}.{model}.{sync}"


def progress_key(prefix: str) -> str:
    """Where trainers of ``prefix`` publish their progress (sub-key: peer ID)."""
    return f"{prefix}.progress"


def training_keys(prefix: str) -> dict[str, str]:
    """Every DHT key of training under ``prefix``, by what it holds (see the table above)."""
    return {"progress": progress_key(prefix), "averaging": group_key(prefix), "state": state_key(prefix)}
