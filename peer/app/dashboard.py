"""``--dashboard-port``: a live web page and a JSON API of the swarm, as this peer sees it.

Any peer can serve it (client mode included): everything shown comes from records every peer can read
in the DHT (:mod:`peer.swarm_state`), so the page looks the same from any member. How it works:

1. A collector task reads the fast-changing records (trainers' progress, hosts' loads, peers' info,
   matchmaking) every ``poll_s`` seconds, and crawls the peers and reads the expert declarations every
   ``crawl_s`` seconds; DHT calls run in worker threads so the page never waits on them.
2. It keeps what records only show for a moment — progress records are rewritten every outer step, a
   trainer's last rounds ride in its record — as history (per trainer loss and throughput, every round
   seen), so the charts cover the dashboard's whole life, capped at ``history`` points per trainer.
3. :meth:`Dashboard.snapshot` composes one JSON object of it; ``/api/swarm`` serves it and the page
   (:mod:`peer.app.dashboard_page`) renders it.

Server: hypercorn's trio worker, in a thread of its own with its own trio loop, on a raw ASGI app (no
web framework). Endpoints (all GET; JSON unless said):

==========================  =====================================================================
``/``                       the page (HTML); ``/panel`` its live part, fetched every ``poll_s``
``/api/``                   this list
``/api/swarm``              everything below in one object, plus ``t``, ``swarm``, ``prefix``, ``me``
``/api/peers``              peers: ID, addresses, roles, reachability, versions, uptime
``/api/experts``            expert grid per layer: hosts, rows served, client latency and failures
``/api/training``           global samples, outer step, trainers' rows, loss and samples/s series
``/api/rounds``             averaging rounds: totals, median duration, the latest ones
``/api/contributions``      the leaderboard (:func:`peer.contributions.leaderboard`)
==========================  =====================================================================
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import socket
import statistics
import threading

import trio

from dht import DHT, get_dht_time
from peer.config import ModelConfig, training_prefix
from peer.contributions import leaderboard
from peer.swarm_state import annotate_peers, expert_hosts, list_peers, progress_series, read_training, \
    swarm_throughput

from .dashboard_page import render_page, render_panel

logger = logging.getLogger(__name__)

ENDPOINTS = {
    "/api/swarm": "everything below in one object, plus t, swarm, prefix and me (this peer's ID)",
    "/api/peers": "peers: peer_id, addrs, roles, reachability, software and DHT versions, uptime_s",
    "/api/experts": "expert grid per layer: each cell's uid, hosts, rows served, latency_ms and failures seen by trainers",
    "/api/training": "global_samples, outer_step, samples_per_s, trainers (latest record each), loss_series, throughput",
    "/api/rounds": "averaging rounds: total, ok, failed, median_s, mean_group, recent (newest first)",
    "/api/contributions": "leaderboard: trainers (confirmed samples), hosts (rows served), mismatches",
}


def parse_listen(value: str) -> tuple[str, int]:
    """``"8080"`` -> ``("127.0.0.1", 8080)``; ``"0.0.0.0:8080"`` -> all interfaces. ValueError if malformed."""
    host, _, port = value.rpartition(":")
    try:
        number = int(port)
        assert 0 <= number < 65536
    except (ValueError, AssertionError):
        raise ValueError(f"--dashboard-port {value!r}: use PORT or HOST:PORT with a port from 0 to 65535") from None
    return host or "127.0.0.1", number


def _finite(x):
    """``x`` with every non-finite float replaced by None (JSON has no inf or NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class Dashboard:
    """A live web page and JSON API of the swarm, served by this peer (see the module docstring).

    :param dht: this peer's running DHT; ``swarm``, ``model``, ``sync``, ``expert_type``: which trainers'
        records and which expert grid to show (those of ``python -m peer``'s flags).
    :param listen: ``(host, port)``; port 0 picks a free one (see :attr:`url`).
    :param poll_s: seconds between reads of the fast records; ``crawl_s``: between crawls of the peers.
    """

    def __init__(self, dht: DHT, *, swarm: str, model: str = "tiny", sync: str = "diloco", expert_type: str = "ffn",
                 listen: tuple[str, int] = ("127.0.0.1", 8080), poll_s: float = 2.0, crawl_s: float = 10.0,
                 history: int = 2000):
        self.dht, self.swarm, self.poll_s, self.crawl_s, self.history = dht, swarm, poll_s, crawl_s, history
        self.config = ModelConfig.preset(model, expert_type=expert_type)
        self.model, self.sync, self.prefix = model, sync, training_prefix(swarm, model, sync)
        self.training: dict = {"t": get_dht_time(), "progress": [], "averaging": [], "state_offers": [], "loads": [],
                               "infos": {}}
        self.peers: list[dict] = []
        self.experts: dict = expert_hosts({}, self.config)
        self.progress: dict[str, dict[float, dict]] = {}   # trainer -> record time -> its progress row
        self.rounds: dict[tuple[str, float], dict] = {}    # (trainer, end time) -> the round as it reported it
        self.error = ""
        self._sock = socket.socket(socket.AF_INET6 if ":" in listen[0] else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(listen)
            self._sock.listen(128)  # connections wait in the backlog until hypercorn accepts them
        except OSError as e:
            self._sock.close()
            raise OSError(f"dashboard: cannot listen on {listen[0]}:{listen[1]}: {e.strerror}") from None
        self.host, self.port = listen[0], self._sock.getsockname()[1]
        self._stop: trio.Event | None = None
        self._token = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name="dashboard", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise OSError("dashboard: the server did not start within 10 s")
        logger.info("Dashboard on %s", self.url)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # ------------------------------------------------------------------ collecting
    async def _main(self) -> None:
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        config.bind = [f"fd://{self._sock.detach()}"]
        config.errorlog, config.accesslog, config.graceful_timeout = logger, None, 1.0
        self._stop, self._token = trio.Event(), trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._collect)
            self._started.set()
            await serve(self._asgi, config, shutdown_trigger=self._stop.wait)
            nursery.cancel_scope.cancel()

    async def _collect(self) -> None:
        last_crawl = -math.inf
        while True:
            try:
                if trio.current_time() - last_crawl >= self.crawl_s:
                    last_crawl = trio.current_time()
                    await self._read_slow()
                await self._read_fast()
                self.error = ""
            except Exception as e:  # the DHT is unreachable for a moment: show what we have, say so
                self.error = f"last read failed: {type(e).__name__}: {e}"[:200]
                logger.info("Dashboard: %s", self.error)
            await trio.sleep(self.poll_s)

    async def _read_slow(self) -> None:
        keys = self.config.expert_root_keys()
        found = await trio.to_thread.run_sync(lambda: self.dht.get_many(keys, latest=True))
        self.experts = expert_hosts(found, self.config)
        self.peers = await trio.to_thread.run_sync(list_peers, self.dht, self.crawl_s)

    async def _read_fast(self) -> None:
        self.training = await trio.to_thread.run_sync(read_training, self.dht, self.swarm, self.model, self.sync)
        for row in self.training["progress"]:
            records = self.progress.setdefault(row["peer_id"], {})
            records[row["t"]] = row
            while len(records) > self.history:
                del records[min(records)]
            for r in row["recent"]:
                if isinstance(r, dict) and isinstance(r.get("t"), (int, float)):
                    self.rounds[(row["peer_id"], float(r["t"]))] = {"peer_id": row["peer_id"], **r}
        while len(self.rounds) > self.history:
            del self.rounds[min(self.rounds, key=lambda k: k[1])]

    # ------------------------------------------------------------------ composing
    def snapshot(self) -> dict:
        """What the dashboard shows, as one JSON-ready object (the keys of :data:`ENDPOINTS`)."""
        peers = annotate_peers([dict(p) for p in self.peers], self.training, self.experts)
        if not any(p["peer_id"] == self.dht.peer_id for p in peers):  # a client-mode peer is never crawled
            peers.insert(0, {"peer_id": self.dht.peer_id, "addrs": list(self.dht.addrs), "version": "?"})
            annotate_peers(peers[:1], {**self.training, "infos": {}}, self.experts)
        return _finite({"t": get_dht_time(), "swarm": self.swarm, "prefix": self.prefix, "me": self.dht.peer_id,
                        "error": self.error, "peers": peers, "experts": self._experts(),
                        "training": self._training(), "rounds": self._rounds(),
                        "contributions": leaderboard(self.training["progress"], self.training["loads"])})

    def _experts(self) -> dict:
        hosts_of: dict[str, list[str]] = {}
        for host in self.experts["hosts"]:
            for uid in host["uids"]:
                hosts_of.setdefault(uid, []).append(host["peer_id"])
        served = {uid: v[0] + v[1] for load in self.training["loads"] for uid, v in load["uids"].items()
                  if isinstance(v[0], int) and isinstance(v[1], int)}
        calls: dict[str, list[float]] = {}   # uid -> [calls, failures, calls * mean ms]
        for row in self.training["progress"]:
            for uid, v in row["experts"].items():
                if isinstance(v, list) and len(v) == 4 and all(isinstance(x, (int, float)) for x in v[:3]):
                    c = calls.setdefault(uid, [0, 0, 0.0])
                    c[0], c[1] = c[0] + v[0], c[1] + v[2]
                    c[2] += v[0] * v[3] if isinstance(v[3], (int, float)) else 0.0
        layers = []
        cols = self.config.grid_size[-1]
        for layer in range(self.config.n_layer):
            root = self.config.uid_prefix(layer)
            cells = []
            for coords in itertools.product(*(range(g) for g in self.config.grid_size)):
                uid = f"{root}." + ".".join(map(str, coords))
                c = calls.get(uid)
                cells.append({"uid": uid, "hosts": sorted(hosts_of.get(uid, [])), "rows": served.get(uid),
                              "latency_ms": round(c[2] / c[0], 2) if c and c[0] else None,
                              "failures": int(c[1]) if c else 0})
            layers.append({"root": root, "grid": [cells[i:i + cols] for i in range(0, len(cells), cols)]})
        return {"layers": layers, "hosts": self.experts["hosts"], "hosted": self.experts["hosted"],
                "model_experts": self.experts["model_experts"], "missing": self.experts["missing"],
                "loads": self.training["loads"]}

    def _training(self) -> dict:
        latest = sorted(self.training["progress"], key=lambda r: r["peer_id"])
        series = progress_series([list(records.values()) for records in self.progress.values()])
        throughput = swarm_throughput(series)
        trainers = [{k: v for k, v in row.items() if k not in ("recent", "experts", "hosts", "ledger")}
                    | {"last_round": row["recent"][-1] if row["recent"] else None} for row in latest]
        return {"global_samples": sum(r["samples"] for r in latest),
                "outer_step": max((r["round"] for r in latest if r.get("round") is not None), default=None),
                "samples_per_s": throughput[-1][1] if throughput else None, "trainers": trainers,
                "loss_series": {peer[-8:]: [[p["t"], p["loss"]] for p in points if p["loss"] is not None]
                                for peer, points in series.items()},
                "throughput": [[t, rate] for t, rate in throughput]}

    def _rounds(self) -> dict:
        rounds = sorted(self.rounds.values(), key=lambda r: -r["t"])
        ok = [r for r in rounds if r.get("ok")]
        return {"total": len(rounds), "ok": len(ok), "failed": len(rounds) - len(ok),
                "median_s": statistics.median(r["s"] for r in ok) if ok else None,
                "mean_group": statistics.mean(r["group"] for r in ok) if ok else None, "recent": rounds[:20]}

    # ------------------------------------------------------------------ serving
    def respond(self, path: str) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` for a GET of ``path``."""
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", render_page(self.snapshot(), self.poll_s).encode()
        if path == "/panel":
            return 200, "text/html; charset=utf-8", render_panel(self.snapshot()).encode()
        if path in ("/api", "/api/"):
            return 200, "application/json", json.dumps({"endpoints": ENDPOINTS}).encode()
        if path == "/api/swarm":
            return 200, "application/json", json.dumps(self.snapshot()).encode()
        section = path.removeprefix("/api/")
        if path.startswith("/api/") and f"/api/{section}" in ENDPOINTS:
            return 200, "application/json", json.dumps(self.snapshot()[section]).encode()
        return 404, "application/json", json.dumps({"error": f"no such page {path!r}; see /api/"}).encode()

    async def _asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            status, kind, body = 405, "application/json", b'{"error": "the dashboard is read-only: use GET"}'
        else:
            try:
                status, kind, body = self.respond(scope["path"])
            except Exception as e:  # a bug in composing must not take the server down: say so, log it
                logger.exception("Dashboard: composing %s failed", scope["path"])
                status, kind, body = 500, "application/json", json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind.encode()), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    def shutdown(self) -> None:
        """Stop serving (idempotent)."""
        if self._thread.is_alive() and self._token is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(timeout=5)
