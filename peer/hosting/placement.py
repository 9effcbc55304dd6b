"""Which grid cells an expert host serves.

Expert hosts pick grid UIDs that the swarm covers least, so two hosts started without any coordination
split the grid between them (:func:`choose_uids`).
"""
from __future__ import annotations

import random
from collections import Counter

from dht import DHT
from peer.config import ModelConfig
from peer.moe.directory import parse_declarations
from peer.moe.gating import all_uids


def choose_uids(dht: DHT, config: ModelConfig, count: int, seed: int | None = None) -> list[str]:
    """``count`` expert UIDs of ``config``'s grids, least-hosted first (ties broken at random).

    Declarations under our own peer ID are from before a restart (they outlive a crash by their
    expiration): they do not count as hosted, and among equally hosted UIDs ours come first, so a
    restarted host takes back the experts it served (and has checkpoints of) instead of others' ones."""
    rng = random.Random(seed if seed is not None else dht.peer_id)
    hosted: Counter[str] = Counter()
    ours: set[str] = set()
    found = dht.get_many(config.expert_root_keys(), latest=True)
    for value in found.values():
        for entry in parse_declarations(value):
            (ours.update if entry.peer_id == dht.peer_id else hosted.update)(entry.uids)
    candidates = [uid for layer in range(config.n_layer) for uid in all_uids(config.uid_prefix(layer), config.grid_size)]
    rng.shuffle(candidates)
    candidates.sort(key=lambda uid: (hosted[uid], uid not in ours))
    return candidates[:count]
