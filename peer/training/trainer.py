"""The training loop of a volunteer: local steps on local data, dense weights kept in sync with the swarm.

The model's feed-forward layers are :class:`~peer.moe.remote.RemoteMixtureOfExperts` over the swarm's
experts (which train themselves on backward); its dense parameters (embeddings, attention, gates,
norms) live on every trainer and are synchronised by one strategy of :mod:`peer.training.sync`
(``sync="diloco"``, the default, or ``sync="grad"``).

A failed averaging round is not fatal: the trainer keeps training locally (for DiLoCo the next round
averages the longer stretch). Progress (samples, loss) is published in the DHT; the learning-rate
schedule follows the swarm's total samples.

State sharing (:mod:`averaging.state`): every trainer that accepts connections serves a snapshot of the
shared dense state (DiLoCo: the anchor and the outer momentum; grad: the parameters), taken after each
successful averaging round and labelled with the number of rounds the swarm has done. At start — fresh,
or resumed from a checkpoint — a trainer looks for a snapshot newer than its own and downloads it
(verified by hash, from several donors) before it trains, so a newcomer or a restarted peer catches up
instead of dragging the swarm back. Checkpoints are written atomically and resumed after a restart.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from averaging import Averager, AveragerConfig
from averaging.state import StateDownloadError, StateSharer, StateUnconfirmed, download_state
from averaging.state_format import tensors_digest
from dht import DHT, get_dht_time, subkey_entries
from p2p import P2PError

from peer.checkpoint import load_checkpoint, save_checkpoint
from peer.config import ModelConfig, progress_key, training_prefix
from peer.moe.call_stats import ExpertCallStats
from peer.moe.remote import NotEnoughExpertsError, RemoteMixtureOfExperts

from .data import ByteDataset, batches, eval_batches, load_corpus
from .ledger import ContributionLedger
from .model import MoETransformer
from .privacy import PrivacyBudgetSpent, Privatizer
from .sync import STRATEGIES
from .train_config import TrainConfig

logger = logging.getLogger(__name__)

CLAIMED_STEPS = 8   # our progress record vouches for the states of our last this many steps

class Trainer:
    """Trains the swarm's MoE language model on this machine's data shard. Blocking; call :meth:`run`."""

    def __init__(self, dht: DHT, config: TrainConfig, *, model_config: ModelConfig | None = None):
        self.dht, self.config = dht, config
        self.model_config = model_config or ModelConfig.preset(config.model)
        torch.manual_seed(config.seed)  # identical initial dense weights on every trainer
        self.model = MoETransformer(self.model_config, make_moe=self._make_moe)
        self.dense = [p for p in self.model.dense_parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.dense, lr=config.lr, weight_decay=0.01)
        text = load_corpus(config.data)
        self.train_data = ByteDataset(text, self.model_config.block_size, split="train")
        self.eval_data = ByteDataset(text, self.model_config.block_size, split="eval")
        self.batches = batches(self.train_data, config.batch_size, seed=config.seed + config.shard,
                               shard=(config.shard, config.num_shards))
        self.prefix = training_prefix(dht.node.swarm, config.model, config.sync)
        self.sync = STRATEGIES[config.sync](self.dense, self.opt, config)
        self.averager = Averager(self.sync.tensors, dht, self.prefix, AveragerConfig(
            target_group_size=config.group_size, compression=config.compression,
            matchmaking_time=config.matchmaking_time, bandwidth=config.bandwidth, clip_tau=config.clip_tau,
            error_feedback=self.sync.error_feedback and config.secure_bound is None,
            max_abs_value=config.secure_bound, secure_aggregation=config.secure_bound is not None))
        self.privacy = Privatizer(config.dp) if config.dp else None  # clips and noises what we contribute
        self.step = self.samples = self.samples_since_sync = 0
        self.rounds_ok = self.rounds_failed = 0
        self.skipped_steps = 0  # batches skipped because too few experts answered
        self.averaging_bytes = 0  # sent + received by our averaging rounds
        self.bytes_sent = 0       # sent by our averaging rounds
        self.ledger = ContributionLedger(dht.peer_id)  # our averaging contributions and what partners brought
        self.started_at = get_dht_time()
        self._last_published = (time.monotonic(), 0)  # (when, samples): our rate between progress records
        self.sync_rounds = 0  # swarm-wide averaging rounds folded into our dense state (the state's "step")
        self.global_samples = 0      # swarm-wide samples at our last look at the DHT
        self.trainers_seen = 1       # trainers whose progress we saw then (the rate we extrapolate with)
        self.samples_seen_at = 0     # our own sample count at that look
        self.loss_ema: float | None = None
        self.history: list[dict] = []
        self.state_hashes: dict[str, str] = {}   # step -> hash of our shared state then (the last CLAIMED_STEPS)
        self._restore()
        self.take_snapshot()
        self.catch_up()
        self.sharer = None if dht.client_mode else StateSharer(
            dht, self.prefix, lambda: self._snapshot, announce_interval=config.share_every)

    def _make_moe(self, layer: int, cfg: ModelConfig) -> RemoteMixtureOfExperts:
        return RemoteMixtureOfExperts(cfg.n_embd, cfg.grid_size, self.dht, cfg.uid_prefix(layer), k_best=cfg.k,
                                      k_min=self.config.k_min, beam_size=cfg.beam_size)

    # ------------------------------------------------------------------ one step
    def lr_at(self, global_samples: int) -> float:
        """Linear warmup, then cosine decay to 10% over ``total_samples`` swarm-wide samples."""
        c = self.config
        if global_samples < c.warmup_samples:
            return c.lr * max(global_samples, 1) / c.warmup_samples
        progress = min(1.0, (global_samples - c.warmup_samples) / max(1, c.total_samples - c.warmup_samples))
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self) -> float:
        """One local step (plus averaging when it is due); returns the training loss."""
        x, y = next(self.batches)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.swarm_samples())
        self.model.train()
        self.opt.zero_grad(set_to_none=self.sync.set_grads_to_none)
        _, loss = self.model(x, y)
        loss.backward()
        if not math.isfinite(loss.item()):
            raise FloatingPointError("training loss is not finite")
        n = x.shape[0]
        self.step += 1
        self.samples += n
        self.samples_since_sync += n
        self.sync.after_backward(self, n)
        value = float(self.model.last_lm_loss)
        self.loss_ema = value if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * value
        return value

    def average(self, weight: float) -> bool:
        """One averaging round of the sync strategy's tensors; True if it succeeded (counted either way).

        Averaging never ends training: a round that fails is counted and logged, and one that raises (a bug,
        or tensors the averager refuses) is logged with its traceback and counted as failed. With differential
        privacy the tensors are clipped and noised first, and a round whose group formed is counted by the
        accountant; once the budget is spent, :class:`PrivacyBudgetSpent` ends training (``when_spent="stop"``)
        or we never average again (``"local"``)."""
        if self.privacy is not None and not self.privacy.prepare(self.sync.tensors):
            return False
        try:
            result = self.averager.step(weight=weight)
        except Exception:
            logger.exception("Averaging round raised; counted as failed, training goes on locally")
            self.rounds_failed += 1
            if self.privacy is not None:
                self.privacy.count_round()  # it may have sent something before it raised
            return False
        if self.privacy is not None and (result.group_size >= 2 or result.bytes_sent > 0):
            self.privacy.count_round()
        self.averaging_bytes += result.bytes_sent + result.bytes_received
        self.bytes_sent += result.bytes_sent
        self.ledger.add_round(result, weight)
        self.rounds_ok += result.ok
        self.rounds_failed += not result.ok
        if result.ok:
            self.sync_rounds += 1
        return result.ok

    @property
    def budget_spent(self) -> bool:
        """Our privacy budget ran out (with ``dp.when_spent="local"`` we train on alone)."""
        return self.privacy is not None and self.privacy.spent

    # ------------------------------------------------------------------ shared state
    def take_snapshot(self) -> None:
        """Copy the shared state (:meth:`~peer.training.sync.DiLoCoSync.shared_tensors`) for the sharer's
        thread to serialize while we keep training. Not once our privacy budget is spent: what we train
        after that is not noised, so the state we serve stays the last one made from noised rounds."""
        if self.budget_spent:
            return
        metadata = {"step": self.sync_rounds, "samples": max(self.global_samples, self.samples),
                    "model": self.config.model, "sync": self.config.sync}
        self._snapshot = metadata, [t.detach().clone() for t in self.sync.shared_tensors()]
        self.state_hashes[str(self.sync_rounds)] = tensors_digest(self._snapshot[1])   # what we claim, per step
        while len(self.state_hashes) > CLAIMED_STEPS:
            self.state_hashes.pop(next(iter(self.state_hashes)))

    def catch_up(self) -> bool:
        """Download the swarm's shared state if a peer announces a newer one than ours; True if we did."""
        try:
            found = download_state(self.dht, self.prefix, timeout=self.config.state_timeout,
                                   newer_than=self.sync_rounds, confirmations=self.config.state_confirmations,
                                   confirm_keys=[progress_key(self.prefix)], bans=self.averager.bans)
        except StateDownloadError as e:
            hint = " (in a swarm of few trainers, lower --state-confirmations)" if isinstance(e, StateUnconfirmed) else ""
            logger.warning("Could not download the swarm's state, training from our own: %s%s", e, hint)
            return False
        if found is None:
            return False
        metadata, tensors = found
        if [t.shape for t in tensors] != [t.shape for t in self.sync.shared_tensors()]:
            logger.warning("The swarm's state has other shapes than our model (%s); ignoring it", self.prefix)
            return False
        self.sync.adopt(tensors)
        self.sync_rounds = int(metadata["step"])
        self.global_samples = max(self.global_samples, int(metadata.get("samples", 0)))
        self.samples_seen_at = self.samples
        self.take_snapshot()
        logger.info("Caught up with the swarm: its state after %d averaging rounds (%d samples)",
                    self.sync_rounds, self.global_samples)
        return True

    def announce_state(self) -> None:
        """Announce our new state now (in the background), not up to ``share_every`` later."""
        if self.sharer is not None:
            self.sharer.announce_soon()

    # ------------------------------------------------------------------ evaluation, progress, checkpoints
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss over ``eval_batches`` fixed batches."""
        self.model.eval()
        losses = [float(self.model(x, y)[1]) for x, y in
                  eval_batches(self.eval_data, self.config.batch_size, max_batches=self.config.eval_batches)]
        return float(sum(losses) / len(losses))

    def _evaluate_when_possible(self, tries: int = 5) -> float | None:
        """:meth:`evaluate`, retried while too few experts answer; None (logged) if they never do."""
        for attempt in range(tries):
            try:
                return self.evaluate()
            except NotEnoughExpertsError as e:
                if attempt == tries - 1:
                    logger.warning("Evaluation skipped, too few experts answered: %s", str(e)[:300])
                    return None
                time.sleep(1.0)
        return None

    def sample(self, prompt: str = "The ", length: int = 48) -> str | None:
        """A greedy continuation of ``prompt`` by the model as it is now (None, logged, if too few experts answer)."""
        self.model.eval()
        try:
            idx = torch.tensor([list(prompt.encode())], dtype=torch.long)
            tokens = list(self.model.generate_stream(idx, length, temperature=0))
        except (NotEnoughExpertsError, P2PError) as e:
            logger.info("No sample this time, too few experts answered: %s", str(e)[:200])
            return None
        finally:
            self.model.train()
        return prompt + bytes(int(t[0]) for t in tokens).decode("utf-8", errors="replace")

    def swarm_samples(self) -> int:
        """Swarm-wide samples now: the count last read from the DHT, plus our samples since then times the
        trainers seen then (they train at about our pace), so the LR schedule does not lag between reads."""
        since = self.samples - self.samples_seen_at
        return max(self.global_samples + self.trainers_seen * max(0, since), self.samples)

    def call_stats(self) -> ExpertCallStats:
        """What our MoE layers saw of the experts they called, all layers together."""
        total = ExpertCallStats()
        for module in self.model.modules():
            if isinstance(module, RemoteMixtureOfExperts):
                total.merge(module.call_stats)
        return total

    def progress_record(self) -> dict:
        """What we publish under ``<prefix>.progress`` (signed: the sub-key is our peer ID).

        ``samples``, ``step``, ``loss`` (train EMA), ``t``; ``eval_loss`` (latest held-out loss), ``round`` (swarm
        rounds in our state), ``sps`` (our samples/s since the previous record), ``peers`` (routing table),
        ``rounds_ok``/``rounds_failed``/``bytes_sent``, ``started``; ``recent`` (our last rounds), ``ledger``
        (:class:`~peer.training.ledger.ContributionLedger`), ``experts`` (per UID ``[calls, rows, failures,
        mean ms]``), ``hosts`` (rows each host answered us), ``state_hashes`` (step -> hash of our shared state
        then, which newcomers check downloads against); with DP, ``epsilon`` and ``dp`` (the accountant's figures)."""
        now, (then, samples_then) = time.monotonic(), self._last_published
        self._last_published = (now, self.samples)
        calls = self.call_stats()
        return {"samples": self.samples, "step": self.step, "loss": self.loss_ema, "t": get_dht_time(),
                "eval_loss": self.history[-1]["eval_loss"] if self.history else None, "round": self.sync_rounds,
                "sps": round((self.samples - samples_then) / (now - then), 3) if now > then else None,
                "peers": len(self.dht.routing), "rounds_ok": self.rounds_ok, "rounds_failed": self.rounds_failed,
                "bytes_sent": self.bytes_sent, "started": self.started_at, "recent": list(self.ledger.recent),
                "ledger": self.ledger.record(), "experts": {u: t.as_list() for u, t in sorted(calls.by_uid.items())},
                "hosts": {h: t.rows for h, t in sorted(calls.by_host.items())}, "state_hashes": dict(self.state_hashes),
                **({"epsilon": self.privacy.epsilon(), "dp": self.privacy.record()} if self.privacy else {})}

    def publish_progress(self) -> None:
        """Write our progress to the DHT and read everyone's to know the swarm-wide sample count."""
        key = progress_key(self.prefix)
        self.dht.store(key, self.progress_record(), get_dht_time() + 60, subkey=self.dht.peer_id)
        found = self.dht.get(key, latest=True)
        entries = [e.value for e in subkey_entries(found)]
        if entries:
            total = sum(int(e.get("samples", 0)) for e in entries)
            self.global_samples = max(self.global_samples, total)
            self.trainers_seen, self.samples_seen_at = max(1, len(entries)), self.samples

    def state(self) -> dict:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                 "samples": self.samples, "global_samples": self.global_samples, "sync_rounds": self.sync_rounds,
                 "config": asdict(self.config), **self.sync.state()}
        if self.privacy is not None:
            state["privacy"] = self.privacy.state()
        return state

    @property
    def checkpoint_file(self) -> Path | None:
        return Path(self.config.checkpoint_dir) / "trainer.pt" if self.config.checkpoint_dir else None

    def save(self) -> None:
        if self.checkpoint_file is not None:
            save_checkpoint(self.checkpoint_file, self.state())

    def _restore(self) -> None:
        state = load_checkpoint(self.checkpoint_file) if self.checkpoint_file else None
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.samples = state["step"], state["samples"]
        self.global_samples, self.samples_seen_at = state.get("global_samples", 0), self.samples
        self.sync_rounds = state.get("sync_rounds", 0)
        self.sync.restore(state)
        if self.privacy is not None:
            if "privacy" not in state and self.sync_rounds:
                logger.warning("%s holds rounds averaged without differential privacy; epsilon counts only "
                               "the rounds from now on", self.checkpoint_file)
            self.privacy.restore(state.get("privacy", {}))
        logger.info("Resumed from %s at step %d (%d samples)", self.checkpoint_file, self.step, self.samples)

    # ------------------------------------------------------------------ the loop
    def run(self, on_step=None) -> list[dict]:
        """Train until ``max_samples`` (or Ctrl+C); returns the history of evaluations."""
        c = self.config
        started = time.monotonic()
        if self.step == 0 and (eval_loss := self._evaluate_when_possible()) is not None:
            self.history.append({"step": 0, "samples": 0, "eval_loss": eval_loss, "t": 0.0})
            logger.info("step 0: eval loss %.3f (before training)", eval_loss)
        try:
            while c.max_samples is None or self.samples < c.max_samples:
                try:
                    loss = self.train_step()
                except PrivacyBudgetSpent as e:
                    logger.warning("Stopping: %s", e)
                    self.sync.adopt(self.sync.shared_tensors())  # end on the swarm's state, not our drift
                    break
                except NotEnoughExpertsError as e:
                    # experts are missing (a host died, or none has joined yet): nothing was updated, so
                    # skip this batch and retry shortly; beam search finds the survivors or newcomers
                    self.skipped_steps += 1
                    logger.warning("Skipped a step (%d so far): %s", self.skipped_steps, str(e)[:300])
                    time.sleep(1.0)
                    continue
                if self.sync.progress_due(self.step):  # on step 1, so the swarm's size is known early
                    self.publish_progress()
                if self.step % c.eval_every == 0:
                    eval_loss = self._evaluate_when_possible()
                    if eval_loss is not None:
                        self.history.append({"step": self.step, "samples": self.samples, "train_loss": loss,
                                             "eval_loss": eval_loss, "t": time.monotonic() - started})
                    logger.info("step %d: train loss %.3f, eval loss %s, %d samples (swarm %d), "
                                "averaging %d ok / %d failed", self.step, loss,
                                "skipped" if eval_loss is None else f"{eval_loss:.3f}",
                                self.samples, self.global_samples, self.rounds_ok, self.rounds_failed)
                if c.sample_every and self.step % c.sample_every == 0 and (text := self.sample()) is not None:
                    logger.info("sample at step %d: %r", self.step, text)
                if c.checkpoint_dir and self.step % c.checkpoint_every == 0:
                    self.save()
                if on_step is not None:
                    on_step(self, loss)
            if not self.budget_spent:
                self.sync.finish(self)
            if not self.history or self.history[-1]["step"] != self.step:
                eval_loss = self._evaluate_when_possible()
                if eval_loss is not None:
                    self.history.append({"step": self.step, "samples": self.samples, "eval_loss": eval_loss,
                                         "t": time.monotonic() - started})
            try:  # our final figures, for dashboards and leaderboards
                self.publish_progress()
            except (P2PError, OSError) as e:
                logger.warning("Could not publish our final progress: %s", e)
            logger.info("Finished: %d samples in %d steps, final eval loss %s, averaging %d ok / %d failed, "
                        "%d bytes (%d sent)", self.samples, self.step,
                        f"{self.history[-1]['eval_loss']:.4f}" if self.history else "none",
                        self.rounds_ok, self.rounds_failed, self.averaging_bytes, self.bytes_sent)
            if self.privacy is not None:
                p = self.privacy
                logger.info("Privacy: epsilon %.4f at delta %g over %d rounds (noise %.4f x clip %g)", p.epsilon(),
                            p.config.delta, p.rounds_counted, p.config.noise_multiplier, p.config.clip)
        finally:
            if c.checkpoint_dir:
                self.save()
        return self.history

    def shutdown(self) -> None:
        """Stop serving our state and averaging (the DHT stays up; its owner shuts it down)."""
        if self.sharer is not None:
            self.sharer.shutdown()
        self.averager.shutdown()
