"""Asynchronous gossip: keep averaging with random small groups, no global rounds, any churn.

Each peer runs :class:`Gossip` in the background: it repeatedly meets whoever else is gossiping
under the same prefix (matchmaking shuffles partners every round), averages with them (pairs by
default) and applies the result as a *delta*, so a training thread may keep updating the tensors
meanwhile. Repeated pairwise averaging converges to the global mean (Boyd et al., "Randomized gossip
algorithms", 2006) without any peer ever waiting for the whole swarm; a partner that dies only costs
that one exchange.

To watch convergence, every peer also publishes a fixed pseudo-random sample of coordinates in the
DHT; :meth:`Gossip.disagreement` reads them all and returns ``max_i |x_i - mean(x)|`` over the sampled
coordinates (an estimate of the true max that uses a few KB instead of whole tensors).
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import trio

from dht import get_dht_time, subkey_entries

if TYPE_CHECKING:
    from .averager import Averager

logger = logging.getLogger(__name__)


class Gossip:
    """Background gossip averaging for one :class:`~averaging.averager.Averager`.

    :param group_size: peers per exchange (2 = classic pairwise gossip).
    :param period: seconds to rest between exchanges (0 = as fast as partners are found).
    :param sample_size: coordinates published for :meth:`disagreement`.
    """

    def __init__(self, averager: "Averager", *, group_size: int = 2, period: float = 0.0, sample_size: int = 256):
        self.av, self.group_size, self.period = averager, group_size, period
        numel = averager.buffer.numel
        generator = torch.Generator().manual_seed(int.from_bytes(averager.prefix.encode()[:8].ljust(8, b"\0"), "big"))
        self.sample_index = torch.randperm(numel, generator=generator)[: min(sample_size, numel)].sort().values
        self.rounds = self.failures = 0
        self.tasks = None   # the gossip loop, while it runs

    @property
    def key(self) -> str:
        return f"{self.av.prefix}.gossip"

    @property
    def running(self) -> bool:
        return self.tasks is not None and not self.tasks.closed

    def start(self) -> None:
        """Begin gossiping in the node's background (returns immediately)."""
        if not self.running:
            self.tasks = self.av.node.task_group(f"gossip {self.key}")
            self.tasks.spawn(self._loop)

    def stop(self) -> None:
        """Cancel the gossip loop, the current exchange included (prompt; tensors stay consistent: a round
        writes them only once it has every part)."""
        if self.tasks is not None:
            self.tasks.close()

    async def _loop(self) -> None:
        while True:
            await self.publish_sample()
            try:
                result = await self.av.astep(1.0, group_key=self.key, group_size=self.group_size, as_delta=True)
            except ValueError as e:  # e.g. our own tensors became NaN: say so and stop
                logger.warning("Gossip stopped: %s", e)
                self.tasks.close()
                return
            self.rounds += result.ok
            self.failures += not result.ok
            await trio.sleep(self.period)

    async def publish_sample(self) -> None:
        """Publish our sampled coordinates (for disagreement estimates) for a few seconds."""
        self.av.buffer.load_from_tensors()
        values = self.av.buffer.buffer[self.sample_index].tolist()
        ttl = max(10.0, 4 * self.av.config.matchmaking_time)
        record = self.av.dht.make_record(f"{self.key}.samples", values, get_dht_time() + ttl, subkey=self.av.peer_id)
        await self.av.dht.astore_many([record], republish=False)

    def disagreement(self) -> float | None:
        """``max_i |x_i - mean(x)|`` over the published samples of all gossiping peers (blocking)."""
        return self.av.node.run(self.adisagreement)

    async def adisagreement(self) -> float | None:
        found = await self.av.dht.aget(f"{self.key}.samples", latest=True)
        rows = [e.value for e in subkey_entries(found, list) if len(e.value) == len(self.sample_index)]
        if len(rows) < 2:
            return None
        x = torch.tensor(rows, dtype=torch.float64)
        value = (x - x.mean(0)).abs().max().item()
        return value if math.isfinite(value) else None
