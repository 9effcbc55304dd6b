"""Prometheus metrics of one peer (``--metrics-port``)."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class Metrics:
    """Prometheus gauges for one peer, served on ``port`` (``/metrics``).

    Trainers set theirs through :meth:`update_trainer` (from the status line, once a second), expert hosts
    through :meth:`update_host` (every few seconds)."""

    def __init__(self, port: int):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        g = lambda name, doc: prom.Gauge(f"swarmtrain_{name}", doc, registry=self.registry)  # noqa: E731
        self.loss = g("train_loss", "training loss (exponential moving average)")
        self.eval_loss = g("eval_loss", "latest held-out loss")
        self.samples_per_s = g("samples_per_second", "local training throughput")
        self.peers = g("dht_peers", "peers in this node's routing table")
        self.experts_hosted = g("experts_hosted", "experts served by this peer")
        self.averaging_ok = g("averaging_rounds_ok", "averaging rounds that succeeded")
        self.averaging_failed = g("averaging_rounds_failed", "averaging rounds that failed")
        self.averaging_bytes_sent = g("averaging_bytes_sent", "bytes sent by this peer's averaging rounds")
        self.last_round_seconds = g("averaging_last_round_seconds", "duration of the latest averaging round")
        self.last_round_ok = g("averaging_last_round_ok", "1 if the latest averaging round succeeded, else 0")
        self.samples = g("samples", "samples trained on locally")
        self.averaged_samples = g("contribution_averaged_samples",
                                  "samples this trainer brought into committed averaging rounds (its claim)")
        self.partners_seen_samples = g("contribution_partner_samples_seen",
                                       "samples this trainer saw its averaging partners bring (what it vouches for)")
        self.dp_epsilon = g("dp_epsilon", "differential privacy spent by this trainer's contributions: epsilon at "
                                          "swarmtrain_dp_delta, from the accountant (0 without --dp-*)")
        self.dp_delta = g("dp_delta", "the delta at which swarmtrain_dp_epsilon holds")
        self.dp_rounds = g("dp_rounds", "averaging rounds the privacy accountant counted")
        self.expert_call_failures = g("expert_call_failures", "failed calls to remote experts")
        self.rows_served = g("expert_rows_served", "rows of forward and backward requests this host answered")
        self.requests_failed = g("expert_requests_failed", "expert requests this host failed")
        prom.start_http_server(port, registry=self.registry)
        logger.info("Serving Prometheus metrics on :%d/metrics", port)

    def update_trainer(self, trainer, samples_per_s: float) -> None:
        """Set the trainer's gauges from a :class:`~peer.training.trainer.Trainer`."""
        self.loss.set(trainer.loss_ema if trainer.loss_ema is not None else float("nan"))
        if trainer.history:
            self.eval_loss.set(trainer.history[-1]["eval_loss"])
        self.samples_per_s.set(samples_per_s)
        self.peers.set(len(trainer.dht.routing))
        self.averaging_ok.set(trainer.rounds_ok)
        self.averaging_failed.set(trainer.rounds_failed)
        self.averaging_bytes_sent.set(trainer.bytes_sent)
        if trainer.ledger.recent:
            last = trainer.ledger.recent[-1]
            self.last_round_seconds.set(last["s"])
            self.last_round_ok.set(1 if last["ok"] else 0)
        self.samples.set(trainer.samples)
        self.averaged_samples.set(trainer.ledger.averaged)
        self.partners_seen_samples.set(sum(trainer.ledger.seen.values()))
        self.expert_call_failures.set(sum(t.failures for t in trainer.call_stats().by_host.values()))
        if trainer.privacy is not None:
            self.dp_epsilon.set(trainer.privacy.epsilon())
            self.dp_delta.set(trainer.privacy.config.delta)
            self.dp_rounds.set(trainer.privacy.rounds_counted)

    def update_host(self, server) -> None:
        """Set the host's gauges from an :class:`~peer.hosting.server.ExpertServer`."""
        load = server.load()
        self.experts_hosted.set(len(load["uids"]))
        self.rows_served.set(load["rows"])
        self.requests_failed.set(sum(v[3] for v in load["uids"].values()))
