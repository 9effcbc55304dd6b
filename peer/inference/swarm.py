"""The swarm's current model, as a trainer sees it: the dense state downloaded from the trainers that share it,
and the experts where their hosts serve them (for generation) or fetched from them (for export).

1. **Dense state.** :func:`download_dense` fetches the newest state offered under the training prefix
   (:func:`averaging.state.download_state`, the pieces verified against their hashes) and copies its first
   tensors into the model's dense parameters (in DiLoCo the state also carries the outer momentum, not needed
   to run the model).
2. **Remote experts.** :func:`swarm_model` builds the model with
   :class:`~peer.moe.remote.RemoteMixtureOfExperts` layers that never raise for a missing expert: a row whose
   experts failed is re-routed to the next-best alive ones (as the layer does outside autograd), and gets a
   zero expert output only if none answers.
3. **Export.** :func:`fetch_experts` asks one host of every grid cell for its expert's weights (the
   ``weights`` RPC of :class:`~peer.hosting.server.ExpertServer`), trying the next host when one fails, and
   names every cell nobody serves.
"""
from __future__ import annotations

import logging
import random

import torch
import trio

from averaging.state import download_state
from averaging.state_format import tensors_digest
from dht import DHT
from p2p import P2PError
from peer.config import ModelConfig, progress_key, training_prefix
from peer.moe.directory import ExpertDirectory
from peer.moe.gating import all_uids
from peer.moe.remote import RemoteMixtureOfExperts
from peer.moe.wire import SERVICE, InvalidTensorMessage, tensor_from_wire
from peer.training.model import MoETransformer

logger = logging.getLogger(__name__)


class SwarmUnavailable(RuntimeError):
    """What the swarm has is not enough to run or export the model (no state offered, cells nobody serves)."""


def remote_moe_factory(dht: DHT, *, forward_timeout: float = 10.0):
    """``make_moe`` for a model whose experts are called on their hosts, rows re-routed around failures."""
    def make(layer: int, cfg: ModelConfig) -> RemoteMixtureOfExperts:
        return RemoteMixtureOfExperts(cfg.n_embd, cfg.grid_size, dht, cfg.uid_prefix(layer), k_best=cfg.k,
                                      k_min=0, beam_size=cfg.beam_size, on_failure="mask",
                                      forward_timeout=forward_timeout)
    return make


def dense_names(model: MoETransformer) -> list[str]:
    """Names of ``model``'s dense parameters, in :meth:`~peer.training.model.MoETransformer.dense_parameters` order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in model.dense_parameters()]


def download_dense(dht: DHT, model: MoETransformer, *, swarm: str, model_name: str, sync: str,
                   timeout: float = 60.0, confirmations: int = 0) -> dict:
    """Load the swarm's newest dense state into ``model``; returns the state's metadata (``step``, ``samples``,
    and ``state_hash``: the hash trainers announce for that step, see :mod:`averaging.state_offers`).
    ``confirmations``: accept only a state that many peers besides its donor announced."""
    prefix = training_prefix(swarm, model_name, sync)
    found = download_state(dht, prefix, timeout=timeout, confirmations=confirmations,
                           confirm_keys=[progress_key(prefix)])
    if found is None:
        raise SwarmUnavailable(f"no trainer offers the state of {prefix!r} (is anybody training it?)")
    metadata, tensors = found
    dense = list(model.dense_parameters())
    shapes = [tuple(t.shape) for t in tensors[:len(dense)]]
    if len(tensors) < len(dense) or shapes != [tuple(p.shape) for p in dense]:
        raise SwarmUnavailable(f"the state offered under {prefix!r} does not fit the {model_name!r} model")
    with torch.no_grad():
        for p, t in zip(dense, tensors):
            p.copy_(t)
    return {**metadata, "state_hash": tensors_digest(tensors)}


def swarm_model(dht: DHT, *, swarm: str = "default", model_name: str = "tiny", sync: str = "diloco",
                timeout: float = 60.0, confirmations: int = 0) -> tuple[MoETransformer, dict]:
    """The swarm's model with its dense state downloaded and its experts called on their hosts, in eval mode."""
    config = ModelConfig.preset(model_name)
    model = MoETransformer(config, make_moe=remote_moe_factory(dht)).eval()
    meta = download_dense(dht, model, swarm=swarm, model_name=model_name, sync=sync, timeout=timeout,
                          confirmations=confirmations)
    return model, {"swarm": swarm, "model": model_name, "sync": sync, **meta}


async def _afetch_experts(dht: DHT, config: ModelConfig, timeout: float) -> tuple[dict, dict, list[str]]:
    directory = ExpertDirectory(dht, lookup_timeout=timeout)
    uids = [uid for layer in range(config.n_layer) for uid in all_uids(config.uid_prefix(layer), config.grid_size)]
    servers = await directory.aservers(uids)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    origin: dict[str, dict] = {}
    failures: dict[str, list[str]] = {}

    async def fetch(uid: str) -> None:
        entries = list(servers.get(uid) or [])
        random.shuffle(entries)
        for entry in entries:
            dht.node.add_addrs(entry.peer_id, list(entry.addrs))
            try:
                reply = await dht.node.call(entry.peer_id, SERVICE, "weights", {"uid": uid}, timeout=timeout,
                                            max_message_bytes=1 << 30)
                state = {str(k): tensor_from_wire(v, k) for k, v in reply["state"].items()}
            except (P2PError, InvalidTensorMessage, KeyError, TypeError, AttributeError) as e:
                failures.setdefault(uid, []).append(f"{entry.peer_id[-8:]}: {type(e).__name__}: {e}")
                continue
            weights[uid] = state
            origin[uid] = {"host": entry.peer_id, "update_count": reply.get("update_count")}
            return

    async with trio.open_nursery() as nursery:
        for uid in uids:
            nursery.start_soon(fetch, uid)
    missing = [uid for uid in uids if uid not in weights]
    for uid in missing:
        if uid in failures:
            logger.warning("Could not fetch expert %s: %s", uid, "; ".join(failures[uid]))
    return weights, origin, missing


def fetch_experts(dht: DHT, config: ModelConfig, timeout: float = 30.0) -> tuple[dict, dict]:
    """Every expert's weights ``{uid: state dict}`` and where each came from ``{uid: {host, update_count}}``;
    :class:`SwarmUnavailable` naming the grid cells that nobody serves (or whose hosts all failed)."""
    weights, origin, missing = dht.node.run(_afetch_experts, dht, config, timeout)
    if missing:
        raise SwarmUnavailable(f"{len(missing)} of {len(weights) + len(missing)} experts are served by nobody "
                               f"who answered: {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    return weights, origin


def export_model(dht: DHT, *, swarm: str = "default", model_name: str = "tiny", sync: str = "diloco",
                 timeout: float = 60.0, confirmations: int = 0) -> tuple[MoETransformer, dict]:
    """The swarm's whole model in this process (in-process experts), ready for
    :func:`peer.inference.model_file.save_model`; and its provenance."""
    config = ModelConfig.preset(model_name)
    model = MoETransformer(config)
    meta = download_dense(dht, model, swarm=swarm, model_name=model_name, sync=sync, timeout=timeout,
                          confirmations=confirmations)
    weights, origin = fetch_experts(dht, config, timeout=timeout)
    for layer, block in enumerate(model.blocks):
        for uid, expert in zip(block.moe.uids, block.moe.experts):
            try:
                expert.load_state_dict(weights[uid])
            except (RuntimeError, KeyError) as e:
                raise SwarmUnavailable(f"expert {uid} from {origin[uid]['host'][-8:]} does not fit the model: "
                                       f"{str(e)[:200]}") from None
    return model.eval(), {"swarm": swarm, "model": model_name, "sync": sync, **meta, "experts": origin}
