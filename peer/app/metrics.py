"""Prometheus metrics of one peer (``--metrics-port``)."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


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
