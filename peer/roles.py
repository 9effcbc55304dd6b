"""What ``python -m peer`` runs besides the DHT: an expert host and/or a trainer, plus metrics.

Expert hosts pick grid UIDs that the swarm covers least (so two hosts started without any
coordination split the grid between them), host them on the chosen device and declare them in the
DHT. Trainers run :class:`~peer.trainer.Trainer`. ``--metrics-port`` serves Prometheus metrics.
"""
from __future__ import annotations

import logging
import random
from collections import Counter

from dht import DHT

from .expert_dht import parse_declarations
from .gating import all_uids
from .model import ModelConfig

logger = logging.getLogger(__name__)


def choose_uids(dht: DHT, config: ModelConfig, count: int, seed: int | None = None) -> list[str]:
    """``count`` expert UIDs of ``config``'s grids, least-hosted first (ties broken at random).

    Declarations under our own peer ID are from before a restart (they outlive a crash by their
    expiration): they do not count as hosted, and among equally hosted UIDs ours come first, so a
    restarted host takes back the experts it served (and has checkpoints of) instead of others' ones."""
    rng = random.Random(seed if seed is not None else dht.peer_id)
    hosted: Counter[str] = Counter()
    ours: set[str] = set()
    roots = [config.uid_prefix(layer) for layer in range(config.n_layer)]
    found = dht.get_many([f"{root}." for root in roots], latest=True)
    for value in found.values():
        for entry in parse_declarations(value):
            (ours.update if entry.peer_id == dht.peer_id else hosted.update)(entry.uids)
    candidates = [uid for root in roots for uid in all_uids(root, config.grid_size)]
    rng.shuffle(candidates)
    candidates.sort(key=lambda uid: (hosted[uid], uid not in ours))
    return candidates[:count]


class Metrics:
    """Prometheus gauges for one peer, served on ``port`` (``/metrics``)."""

    def __init__(self, port: int):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        g = lambda name, doc: prom.Gauge(f"swarmtrain_{name}", doc, registry=self.registry)  # noqa: E731
        self.loss = g("train_loss", "training loss (exponential moving average)")
        self.samples_per_s = g("samples_per_second", "local training throughput")
        self.peers = g("dht_peers", "peers in this node's routing table")
        self.experts_hosted = g("experts_hosted", "experts served by this peer")
        self.averaging_ok = g("averaging_rounds_ok", "averaging rounds that succeeded")
        self.averaging_failed = g("averaging_rounds_failed", "averaging rounds that failed")
        self.samples = g("samples", "samples trained on locally")
        prom.start_http_server(port, registry=self.registry)
        logger.info("Serving Prometheus metrics on :%d/metrics", port)
