"""Read a swarm's state from the DHT into plain dicts and lists (for notebooks, dashboards and scripts).

Nothing here writes to the DHT or calls a peer's RPCs: it reads the records the peers publish anyway.

* **peers** — :meth:`dht.DHT.crawl`: every reachable peer with its addresses and DHT protocol version.
* **experts** — the declarations under each layer's root key ``"<uid_prefix>."`` (see
  :mod:`peer.moe.directory`): which server hosts which experts, and until when the declaration lives.
  Declarations carry UIDs and addresses only, no load figures.
* **averaging** — ``"<prefix>.averaging"``: the matchmaking announcements of trainers looking for an
  averaging group right now, or just done with one (:mod:`averaging.matchmaking`; each lives a few
  seconds), and ``"<prefix>.state"``: trainers offering the current dense state to newcomers
  (:mod:`averaging.state`).
* **progress** — ``"<prefix>.progress"``: each trainer's samples, step and loss (:mod:`peer.training.trainer`,
  rewritten every ``eval_every`` steps).

Here ``prefix = f"{swarm}.{model}.{sync}"`` (:func:`peer.config.training_prefix`), exactly as trainers name it. Example::

    from dht import DHT
    from p2p import NodeConfig
    from peer.swarm_state import read_swarm

    dht = DHT(initial_peers=["/ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."],
              node_config=NodeConfig(swarm="local-demo", client_mode=True))
    state = read_swarm(dht, "local-demo", model="tiny", sync="diloco")
    state["progress"]   # [{"peer_id": "12D3KooW...", "step": 120, "samples": 960, "loss": 3.1, ...}, ...]
    dht.shutdown()

Times are DHT times (unix seconds, :func:`dht.get_dht_time`); ``age_s`` and ``expires_in_s`` are relative
to the moment of reading.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from dht import DHT, ValueWithExpiration, get_dht_time, subkey_entries
from peer.config import ModelConfig, training_keys, training_prefix
from peer.moe.directory import parse_declarations

def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def list_peers(dht: DHT, timeout: float = 10.0) -> list[dict]:
    """Every reachable peer: ``{"peer_id", "addrs", "version"}`` (our own client-mode node is not listed)."""
    return [{"peer_id": p["peer_id"], "addrs": list(p["addrs"]), "version": p["version"]}
            for p in dht.crawl(timeout=timeout)]


def expert_hosts(found: dict[str, ValueWithExpiration | None], config: ModelConfig) -> dict:
    """Group the experts declared under ``config``'s layer root keys by the server hosting them.

    ``found`` maps root keys (``"ffn0."``, ...) to their DHT values. Returns ``{"hosts": [{"peer_id",
    "addrs", "experts", "per_layer", "uids", "expires_in_s"}, ...], "model_experts": experts in the model,
    "hosted": distinct experts hosted somewhere, "missing": UIDs nobody hosts}``.
    """
    now = get_dht_time()
    hosts: dict[str, dict] = {}
    roots = [config.uid_prefix(layer) for layer in range(config.n_layer)]
    for root in roots:
        for entry in parse_declarations(found.get(f"{root}.")):
            if entry.expiration_time <= now:
                continue
            host = hosts.setdefault(entry.peer_id, {"peer_id": entry.peer_id, "addrs": list(entry.addrs),
                                                    "per_layer": {}, "uids": [], "expires_in_s": math.inf})
            host["per_layer"][root] = len(entry.uids)
            host["uids"].extend(sorted(entry.uids))
            host["expires_in_s"] = min(host["expires_in_s"], entry.expiration_time - now)
    for host in hosts.values():
        host["experts"] = len(host["uids"])
    hosted = {uid for host in hosts.values() for uid in host["uids"]}
    per_layer = math.prod(config.grid_size)
    every_uid = [f"{root}." + ".".join(map(str, coords)) for root in roots
                 for coords in itertools.product(*(range(g) for g in config.grid_size))]
    return {"hosts": sorted(hosts.values(), key=lambda h: (-h["experts"], h["peer_id"])),
            "model_experts": per_layer * len(roots), "hosted": len(hosted),
            "missing": [uid for uid in every_uid if uid not in hosted]}


def training_progress(value: ValueWithExpiration | None) -> list[dict]:
    """Rows ``{"peer_id", "step", "samples", "loss", "t", "age_s"}`` of a ``<prefix>.progress`` value."""
    now, rows = get_dht_time(), []
    for peer_id, payload, _expiration in subkey_entries(value):
        step, samples, t = payload.get("step"), payload.get("samples"), _number(payload.get("t"))
        if not (isinstance(step, int) and isinstance(samples, int) and t is not None):
            continue
        rows.append({"peer_id": peer_id, "step": step, "samples": samples, "loss": _number(payload.get("loss")),
                     "t": t, "age_s": now - t})
    return rows


def averaging_announcements(value: ValueWithExpiration | None) -> list[dict]:
    """Rows ``{"peer_id", "status", "bandwidth_mb_s", "client", "t", "expiration_time", "expires_in_s"}`` of
    ``<prefix>.averaging``.

    ``status`` is ``"looking"`` for a peer gathering a group now and ``"done"`` for one that finished
    its round (its tombstone outlives the announcement by a moment); ``t`` is None for "done".
    """
    now, rows = get_dht_time(), []
    for peer_id, payload, expiration in subkey_entries(value):
        if expiration <= now:
            continue
        bandwidth = _number(payload.get("bw"))
        rows.append({"peer_id": peer_id, "status": "done" if payload.get("done") else "looking",
                     "bandwidth_mb_s": None if bandwidth is None else bandwidth / 1e6,
                     "client": bool(payload.get("client", False)), "t": _number(payload.get("t")),
                     "expiration_time": expiration, "expires_in_s": expiration - now})
    return rows


def averaging_rounds(announcements: Iterable[dict]) -> list[dict]:
    """Which "looking" announcements (rows of :func:`averaging_announcements`, e.g. collected over several
    reads) could have met: ``[{"t", "peers": [peer_id, ...]}, ...]`` in time order.

    An announcement joins the round of the first earlier one still alive when it was made (both peers then
    see each other while gathering); otherwise it starts a round. A round with one peer is one where
    nobody else was looking (as far as the reads saw; announcements live a few seconds, so read at least
    every ~2 s): that peer's averaging step failed and it trained on alone.
    """
    looking = sorted((a for a in announcements if a.get("status") == "looking" and a.get("t") is not None),
                     key=lambda a: a["t"])
    rounds: list[dict] = []
    for a in looking:
        current = rounds[-1] if rounds else None
        if current is not None and a["t"] < current["expiration_time"]:
            if a["peer_id"] not in current["peers"]:
                current["peers"].append(a["peer_id"])
        else:
            rounds.append({"t": a["t"], "expiration_time": a["expiration_time"], "peers": [a["peer_id"]]})
    return [{"t": r["t"], "peers": r["peers"]} for r in rounds]


def state_offers(value: ValueWithExpiration | None) -> list[dict]:
    """Rows ``{"peer_id", "step", "megabytes", "addrs", "expires_in_s"}`` of ``<prefix>.state``."""
    now, rows = get_dht_time(), []
    for peer_id, payload, expiration in subkey_entries(value):
        nbytes = _number(payload.get("nbytes"))
        addrs = payload.get("addrs")
        if expiration <= now or nbytes is None:
            continue
        rows.append({"peer_id": peer_id, "step": payload.get("step"), "megabytes": nbytes / 1e6,
                     "addrs": [a for a in addrs if isinstance(a, str)] if isinstance(addrs, list) else [],
                     "expires_in_s": expiration - now})
    return rows


def read_training(dht: DHT, swarm: str, model: str = "tiny", sync: str = "diloco") -> dict:
    """The fast-changing part, in one batch of lookups: ``{"t", "progress", "averaging", "state_offers"}``."""
    prefix = training_prefix(swarm, model, sync)
    keys = training_keys(prefix)
    found = dht.get_many(list(keys.values()), latest=True)
    return {"t": get_dht_time(), "progress": training_progress(found.get(keys["progress"])),
            "averaging": averaging_announcements(found.get(keys["averaging"])),
            "state_offers": state_offers(found.get(keys["state"]))}


def read_swarm(dht: DHT, swarm: str, model: str = "tiny", sync: str = "diloco", crawl_timeout: float = 10.0) -> dict:
    """Everything at once: ``{"t", "prefix", "peers", "experts", "progress", "averaging", "state_offers"}``.

    ``peers`` rows also get a ``"roles"`` list ("expert host", "trainer"; empty for a peer that only
    serves the DHT, such as a bootstrap peer). A trainer counts as one when it published progress,
    announced for averaging or offers its state.
    """
    config = ModelConfig.preset(model)
    state = read_training(dht, swarm, model, sync)
    experts = expert_hosts(dht.get_many(config.expert_root_keys(), latest=True), config)
    peers = list_peers(dht, crawl_timeout)
    hosting = {h["peer_id"] for h in experts["hosts"]}
    training = {row["peer_id"] for part in ("progress", "averaging", "state_offers") for row in state[part]}
    for peer in peers:
        peer["roles"] = [role for role, ids in (("expert host", hosting), ("trainer", training))
                         if peer["peer_id"] in ids]
    return {**state, "prefix": training_prefix(swarm, model, sync), "peers": peers, "experts": experts}


def progress_series(snapshots: Iterable[Sequence[dict]]) -> dict[str, list[dict]]:
    """Per trainer, its distinct progress records in time order, from repeated :func:`training_progress` reads.

    Returns ``{peer_id: [{"t", "step", "samples", "loss", "samples_per_s"}, ...]}``; ``samples_per_s`` is
    the throughput since the trainer's previous record (None for the first one, or after a restart).
    """
    by_peer: dict[str, dict[float, dict]] = {}
    for rows in snapshots:
        for row in rows:
            by_peer.setdefault(row["peer_id"], {})[row["t"]] = row
    series: dict[str, list[dict]] = {}
    for peer_id, records in sorted(by_peer.items()):
        out, previous = [], None
        for t in sorted(records):
            row = records[t]
            rate = None
            if previous is not None and t > previous["t"] and row["samples"] >= previous["samples"]:
                rate = (row["samples"] - previous["samples"]) / (t - previous["t"])
            out.append({"t": t, "step": row["step"], "samples": row["samples"], "loss": row["loss"],
                        "samples_per_s": rate})
            previous = row
        series[peer_id] = out
    return series


def swarm_throughput(series: dict[str, list[dict]]) -> list[tuple[float, float]]:
    """Swarm-wide samples/s over time: at each record time, the sum of every trainer's latest known rate."""
    events = sorted((p["t"], peer_id, p["samples_per_s"]) for peer_id, points in series.items() for p in points
                    if p["samples_per_s"] is not None)
    latest: dict[str, float] = {}
    out = []
    for t, peer_id, rate in events:
        latest[peer_id] = rate
        out.append((t, sum(latest.values())))
    return out


__all__ = ["training_prefix", "list_peers", "expert_hosts", "training_progress", "averaging_announcements",
           "averaging_rounds", "state_offers", "read_training", "read_swarm", "progress_series", "swarm_throughput"]
