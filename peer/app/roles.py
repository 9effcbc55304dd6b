"""What ``python -m peer`` runs besides the DHT: an expert host and/or a trainer, plus metrics.

Expert hosts pick the grid cells the swarm covers least (:mod:`peer.hosting.placement`) and serve them
(:class:`~peer.hosting.server.ExpertServer`); trainers run :class:`~peer.training.trainer.Trainer` with a
status line (:mod:`peer.app.status`); ``--metrics-port`` serves Prometheus metrics (:mod:`peer.app.metrics`),
``--dashboard-port`` a web page (:mod:`peer.app.dashboard`). Every peer says who it is under ``peers.info``
(:class:`InfoPublisher`). torch is imported only for the roles that need it: a peer that only serves the DHT
starts fast and stays small.
"""
from __future__ import annotations

import argparse
import logging
import threading
import time
from importlib import metadata

from dht import get_dht_time
from peer.config import PEER_INFO_KEY

logger = logging.getLogger("peer")


def software_version() -> str:
    try:
        return metadata.version("swarmtrain")
    except metadata.PackageNotFoundError:
        return "unknown"


REACHABILITY = {"client": "client mode", "private": "behind NAT (relayed)", "public": "public"}


class InfoPublisher:
    """Publishes this peer's ``peers.info`` record (version, roles, reachability, start time) every ``every`` s.

    The record lives ``3 * every`` seconds, so a peer that stopped drops off dashboards within that."""

    def __init__(self, dht, roles: list[str], every: float = 30.0):
        self.dht, self.every, self.stop = dht, every, threading.Event()
        self.record = {"version": software_version(), "roles": roles, "started": get_dht_time(),
                       "reachability": REACHABILITY.get(dht.node.reachability, dht.node.reachability)}
        self.thread = threading.Thread(target=self._run, name="peer-info", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.dht.store(PEER_INFO_KEY, self.record, get_dht_time() + 3 * self.every, subkey=self.dht.peer_id)
            except Exception as e:  # the DHT is down for a moment: the next beat retries
                logger.debug("Publishing peer info failed: %s: %s", type(e).__name__, e)
            self.stop.wait(self.every)

    def close(self) -> None:
        self.stop.set()


def run_roles(dht, args: argparse.Namespace) -> int:
    """Host experts and/or train as the flags say; otherwise just serve the DHT until interrupted."""
    metrics = dashboard = None
    if args.metrics_port:
        from .metrics import Metrics
        metrics = Metrics(args.metrics_port)
    roles = [role for role, on in (("expert host", args.experts), ("trainer", args.train)) if on]
    info = InfoPublisher(dht, roles)
    server = trainer = None
    try:
        if getattr(args, "dashboard_listen", None):
            from .dashboard import Dashboard
            dashboard = Dashboard(dht, swarm=args.swarm, model=args.model, sync=args.sync,
                                  expert_type=args.expert_type, listen=args.dashboard_listen)
            print(f"Dashboard: {dashboard.url}", flush=True)
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
                                               checkpoint_dir=args.checkpoint_dir, dp=args.dp,
                                               clip_tau=args.clip_tau, secure_bound=args.secure_aggregation,
                                               state_confirmations=args.state_confirmations), model_config=model_config)
            from .status import StatusLine
            with StatusLine(trainer, metrics) as status:
                trainer.run(on_step=status.update)
            return 0
        while True:
            time.sleep(5)
            if metrics:
                metrics.peers.set(len(dht.routing))
                if server is not None:
                    metrics.update_host(server)
    finally:
        info.close()
        if dashboard is not None:
            dashboard.shutdown()
        if trainer is not None:
            trainer.shutdown()
        if server is not None:
            server.shutdown()
