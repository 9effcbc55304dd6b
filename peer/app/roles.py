"""What ``python -m peer`` runs besides the DHT: an expert host and/or a trainer, plus metrics.

Expert hosts pick the grid cells the swarm covers least (:mod:`peer.hosting.placement`) and serve them
(:class:`~peer.hosting.server.ExpertServer`); trainers run :class:`~peer.training.trainer.Trainer` with a
status line (:mod:`peer.app.status`); ``--metrics-port`` serves Prometheus metrics (:mod:`peer.app.metrics`).
torch is imported only for those roles: a peer that only serves the DHT starts fast and stays small.
"""
from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger("peer")


def run_roles(dht, args: argparse.Namespace) -> int:
    """Host experts and/or train as the flags say; otherwise just serve the DHT until interrupted."""
    metrics = None
    if args.metrics_port:
        from .metrics import Metrics
        metrics = Metrics(args.metrics_port)
    server = trainer = None
    try:
        if args.experts or args.train:
            from peer.config import ModelConfig
            model_config = ModelConfig.preset(args.model, expert_type=args.expert_type)
        if args.experts:
            from peer.hosting.placement import choose_uids
            from peer.hosting.config import HostingConfig
            from peer.hosting.server import ExpertServer, create_experts
            uids = choose_uids(dht, model_config, args.experts)
            server = ExpertServer(dht, create_experts(args.expert_type, uids, model_config.n_embd, device=args.device),
                                  HostingConfig(checkpoint_dir=args.expert_checkpoint_dir))
            logger.info("Hosting %d experts: %s", len(uids), " ".join(uids))
            if metrics:
                metrics.experts_hosted.set(len(uids))
        if args.train:
            from peer.training.trainer import TrainConfig, Trainer
            trainer = Trainer(dht, TrainConfig(model=args.model, batch_size=args.batch_size, sync=args.sync,
                                               local_steps=args.local_steps, max_samples=args.max_samples,
                                               compression=args.compression, bandwidth=args.bandwidth,
                                               data=args.data, shard=args.shard, num_shards=args.num_shards,
                                               checkpoint_dir=args.checkpoint_dir), model_config=model_config)
            from .status import StatusLine
            with StatusLine(trainer, metrics) as status:
                trainer.run(on_step=status.update)
            return 0
        while True:
            time.sleep(5)
            if metrics:
                metrics.peers.set(len(dht.routing))
    finally:
        if trainer is not None:
            trainer.shutdown()
        if server is not None:
            server.shutdown()
