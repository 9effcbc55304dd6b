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
* **progress** — ``"<prefix>.progress"``: each trainer's samples, step, loss, rounds and contribution ledger
  (:meth:`peer.training.trainer.Trainer.progress_record`, rewritten every outer step).
* **loads** — ``"experts.load"``: what each expert host served (:meth:`peer.hosting.server.ExpertServer.load`).
* **infos** — ``"peers.info"``: each peer's version, roles, reachability and start time (:mod:`peer.app.roles`).

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
from peer.config import PEER_INFO_KEY, ModelConfig, training_keys, training_prefix
from peer.moe.directory import LOAD_KEY, parse_declarations

_PROGRESS_NUMBERS = ("eval_loss", "sps", "started", "epsilon")
_PROGRESS_INTS = ("round", "peers", "rounds_ok", "rounds_failed", "bytes_sent")
_PROGRESS_TABLES = {"recent": list, "ledger": dict, "experts": dict, "hosts": dict, "dp": dict}


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
    """Rows ``{"peer_id", "step", "samples", "loss", "t", "age_s", ...}`` of a ``<prefix>.progress`` value, with
    the other fields of :meth:`~peer.training.trainer.Trainer.progress_record` (None or empty when absent)."""
    now, rows = get_dht_time(), []
    for peer_id, payload, _expiration in subkey_entries(value):
        step, samples, t = payload.get("step"), payload.get("samples"), _number(payload.get("t"))
        if not (isinstance(step, int) and isinstance(samples, int) and t is not None):
            continue
        row = {"peer_id": peer_id, "step": step, "samples": samples, "loss": _number(payload.get("loss")),
               "t": t, "age_s": now - t, **{k: _number(payload.get(k)) for k in _PROGRESS_NUMBERS}}
        row.update({k: v if isinstance(v := payload.get(k), int) and not isinstance(v, bool) else None
                    for k in _PROGRESS_INTS})
        row.update({k: v if isinstance(v := payload.get(k), kind) else kind() for k, kind in _PROGRESS_TABLES.items()})
        rows.append(row)
    return rows


def host_loads(value: ValueWithExpiration | None) -> list[dict]:
    """Rows ``{"peer_id", "rows", "uids": {uid: [fwd rows, bwd rows, requests, failures, ms]}, "t", "started"}``
    of the ``experts.load`` value."""
    now, rows = get_dht_time(), []
    for peer_id, payload, expiration in subkey_entries(value):
        uids = payload.get("uids")
        if expiration <= now or not isinstance(payload.get("rows"), int) or not isinstance(uids, dict):
            continue
        rows.append({"peer_id": peer_id, "rows": payload["rows"], "t": _number(payload.get("t")),
                     "started": _number(payload.get("started")),
                     "uids": {u: v for u, v in uids.items() if isinstance(u, str) and isinstance(v, list) and len(v) == 5}})
    return rows


def peer_infos(value: ValueWithExpiration | None) -> dict[str, dict]:
    """``{peer_id: {"version", "roles", "reachability", "started"}}`` from the ``peers.info`` value."""
    now, infos = get_dht_time(), {}
    for peer_id, payload, expiration in subkey_entries(value):
        roles = payload.get("roles")
        if expiration > now:
            infos[peer_id] = {"version": str(payload.get("version", "?"))[:32],
                              "roles": [str(r)[:32] for r in roles[:8]] if isinstance(roles, list) else [],
                              "reachability": str(payload.get("reachability", "?"))[:32],
                              "started": _number(payload.get("started"))}
    return infos


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
    """The fast-changing part, in one batch of lookups: ``{"t", "progress", "averaging", "state_offers", "loads",
    "infos"}``."""
    prefix = training_prefix(swarm, model, sync)
    keys = training_keys(prefix)
    found = dht.get_many([*keys.values(), LOAD_KEY, PEER_INFO_KEY], latest=True)
    return {"t": get_dht_time(), "progress": training_progress(found.get(keys["progress"])),
            "averaging": averaging_announcements(found.get(keys["averaging"])),
            "state_offers": state_offers(found.get(keys["state"])), "loads": host_loads(found.get(LOAD_KEY)),
            "infos": peer_infos(found.get(PEER_INFO_KEY))}


def read_swarm(dht: DHT, swarm: str, model: str = "tiny", sync: str = "diloco", crawl_timeout: float = 10.0) -> dict:
    """Everything at once: ``{"t", "prefix", "peers", "experts", "progress", "averaging", "state_offers", "loads",
    "infos"}``.

    ``peers`` rows also get a ``"roles"`` list ("expert host", "trainer"; empty for a peer that only
    serves the DHT, such as a bootstrap peer) and what the peer says of itself in ``peers.info``
    (``version`` is the DHT protocol version, ``software`` the swarmtrain version, plus ``reachability`` and
    ``uptime_s``). A trainer counts as one when it published progress, announced for averaging or offers
    its state. Peers in client mode are not crawled; those that published an info record are listed too.
    """
    config = ModelConfig.preset(model)
    state = read_training(dht, swarm, model, sync)
    experts = expert_hosts(dht.get_many(config.expert_root_keys(), latest=True), config)
    peers = list_peers(dht, crawl_timeout)
    annotate_peers(peers, state, experts)
    return {**state, "prefix": training_prefix(swarm, model, sync), "peers": peers, "experts": experts}


def annotate_peers(peers: list[dict], state: dict, experts: dict) -> list[dict]:
    """Add ``roles``, ``software``, ``reachability`` and ``uptime_s`` to crawled ``peers`` (in place) from a
    :func:`read_training` ``state`` and :func:`expert_hosts` ``experts``, and append the peers that only
    published an info record (client mode: never crawled). Returns ``peers``."""
    listed = {p["peer_id"] for p in peers}
    peers += [{"peer_id": pid, "addrs": [], "version": "?"} for pid in sorted(state["infos"]) if pid not in listed]
    hosting = {h["peer_id"] for h in experts["hosts"]} | {load["peer_id"] for load in state["loads"]}
    training = {row["peer_id"] for part in ("progress", "averaging", "state_offers") for row in state[part]}
    for peer in peers:
        peer["roles"] = [role for role, ids in (("expert host", hosting), ("trainer", training))
                         if peer["peer_id"] in ids]
        info = state["infos"].get(peer["peer_id"], {})
        peer["software"], peer["reachability"] = info.get("version"), info.get("reachability")
        peer["uptime_s"] = state["t"] - info["started"] if info.get("started") is not None else None
    return peers


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


__all__ = ["training_prefix", "list_peers", "expert_hosts", "training_progress", "host_loads", "peer_infos",
           "averaging_announcements", "annotate_peers",
           "averaging_rounds", "state_offers", "read_training", "read_swarm", "progress_series", "swarm_throughput"]
