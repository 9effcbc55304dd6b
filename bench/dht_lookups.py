"""DHT benchmark: latency, success rate, memory and start-up time of a swarm of real processes.

    python bench/dht_lookups.py --nodes 32 --ops 200 [--procs 4] [--vs-hivemind] [--json]

Layout: one process hosting exactly ONE node (what a volunteer runs; its memory is reported on its
own as ``pss_mib_single_node_process``) plus ``--procs`` processes hosting the other N-1 nodes
(``testbed/dht_worker.py``). The first worker's first node founds the swarm; every other node joins
through the first two nodes. After a warm-up (one unmeasured store per node), the workload is
``--ops`` stores of distinct keys from random nodes, then one get of every key from a random other
node, then one ``latest=True`` get the same way. Each process runs ``--concurrency`` ops at a time
(all processes at once, so P+1 ops are in flight by default: latency under load), or with
``--sequential`` one op at a time in the whole swarm (pure latency). Latencies are measured around
the public blocking API call in the process that owns the node.

``--vs-hivemind`` runs the same workload with ``hivemind.DHT`` nodes in a venv built once at
``.venv-hivemind/`` (hivemind never runs in our environment). Every hivemind node is its own DHT
process plus its own p2pd daemon, as in any hivemind deployment; the worker processes only host the
handles, so "several DHTs per process" here changes nothing about how hivemind nodes run. Memory is
PSS (proportional set size: shared pages divided between their sharers) summed over every process
of the swarm, descendants included, divided by N. ``pss_mib_single_node_process`` is the PSS of the
process tree that hosts one node (hivemind: the parent with hivemind and torch imported, its DHT
process and its p2pd). Our nodes do not need torch, so we also start one more single-node process of
ours that imports torch first, as a training peer would: ``pss_mib_single_node_process_with_torch``.

The last line printed is one JSON object::

    {"nodes": N, ..., "ours": {"store_ms", "store_p95_ms", "get_ms", "get_p95_ms", "get_latest_ms",
     "get_latest_p95_ms", "success_rate", "pss_mib_per_node", "pss_mib_single_node_process", "start_s", ...},
     "hivemind": {same keys}, "ratios": {...}}
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testbed.common import Worker, WorkerError, descendants, ensure_hivemind_venv, print_json, pss_mib, \
    rss_mib, summarize_ms  # noqa: E402

WORKER_SCRIPT = str(Path(__file__).resolve().parent.parent / "testbed" / "dht_worker.py")


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Swarm:
    """N nodes over ``procs`` worker processes plus one single-node process; node i -> (worker, local index)."""

    def __init__(self, impl: str, python: str, nodes: int, procs: int, log_dir: Path, config: str,
                 start_timeout: float, start_parallel: int = 2):
        if nodes < 2:
            raise ValueError("--nodes must be at least 2 (one single-node process plus the rest)")
        procs = max(1, min(procs, nodes - 1))
        sizes = [(nodes - 1) // procs + (i < (nodes - 1) % procs) for i in range(procs)]
        self.impl, self.workers, self.index = impl, [], []
        extra = ["--config", config] if config else []
        # hivemind forks a DHT process per node: fork from one thread only
        extra += ["--start-parallel", "1" if impl == "hivemind" else str(start_parallel)]

        def spawn(name: str, count: int, initial: list[str]) -> Worker:
            argv = [python, WORKER_SCRIPT, "--impl", impl, "--nodes", str(count), "--timeout", "120", *extra]
            if initial:
                argv += ["--initial-peers", *initial]
            return Worker(argv, log_dir / f"{impl}-{name}.log")

        t0 = time.monotonic()
        try:
            first = spawn("w0", sizes[0], [])
            self.workers.append(first)
            ready = first.wait_ready(start_timeout)
            initial = [n["addrs"][0] for n in ready["nodes"][:2]]
            self.workers += [spawn(f"w{i}", size, initial) for i, size in enumerate(sizes[1:], 1)]
            self.single = spawn("single", 1, initial)
            self.workers.append(self.single)
            for w in self.workers:
                w.wait_ready(start_timeout)
        except BaseException:
            self.close()
            raise
        self.start_s = time.monotonic() - t0
        for wi, w in enumerate(self.workers):
            self.index += [(wi, local) for local in range(len(w.ready["nodes"]))]
        log(f"[{impl}] {len(self.index)} nodes in {len(self.workers)} processes ready in {self.start_s:.1f}s")

    def run(self, cmd: str, ops: list[dict], concurrency: int, timeout: float, sequential: bool = False) -> list[dict]:
        """Run global-node ops on their workers (all workers at once, or one op at a time in the whole swarm
        if ``sequential``); results in op order."""
        if sequential:
            return [self.workers[self.index[op["node"]][0]].request(
                cmd, ops=[{**op, "node": self.index[op["node"]][1]}], timeout=60)["results"][0] for op in ops]
        per_worker: dict[int, list[int]] = {}
        for i, op in enumerate(ops):
            per_worker.setdefault(self.index[op["node"]][0], []).append(i)
        pending = {}
        for wi, indices in per_worker.items():
            local_ops = [{**ops[i], "node": self.index[ops[i]["node"]][1]} for i in indices]
            pending[wi] = self.workers[wi].send(cmd, ops=local_ops, concurrency=concurrency, timeout=timeout)
        results: list[dict] = [{}] * len(ops)
        for wi, rid in pending.items():
            reply = self.workers[wi].receive(rid, timeout + 30)
            for i, result in zip(per_worker[wi], reply["results"]):
                results[i] = result
        return results

    def stats(self) -> list[dict]:
        out = []
        for w in self.workers:
            try:
                out += w.request("stats", timeout=30)["nodes"]
            except WorkerError as e:
                log(f"stats failed: {e}")
        return out

    def close(self) -> None:
        for w in self.workers:
            w.close()


def run_workload(impl: str, python: str, args: argparse.Namespace, log_dir: Path) -> dict:
    rng = random.Random(args.seed)
    load_before = os.getloadavg()[0]
    swarm = Swarm(impl, python, args.nodes, args.procs, log_dir, args.config if impl == "ours" else "",
                  args.start_timeout, args.start_parallel)
    try:
        n = len(swarm.index)
        c, timeout = args.concurrency, args.op_timeout * max(1, args.ops) / max(1, args.concurrency)
        warm = swarm.run("store", [{"node": i, "key": f"warmup-{i}", "value": i, "ttl": 600} for i in range(n)], c,
                         timeout)
        log(f"[{impl}] warm-up: {sum(r.get('ok', False) for r in warm)}/{n} stores accepted")

        def value(i: int) -> str:
            return f"{i}-" + "".join(rng.choices(string.ascii_letters, k=max(0, args.value_bytes - 8)))

        keys = [f"bench-{args.seed}-{i}" for i in range(args.ops)]
        values = [value(i) for i in range(args.ops)]
        writers = [rng.randrange(n) for _ in keys]

        def reader(w: int) -> int:
            r = rng.randrange(n - 1)
            return r + (r >= w)  # any node but the writer

        t = time.monotonic()
        seq = args.sequential
        stores = swarm.run("store", [{"node": writers[i], "key": k, "value": values[i], "ttl": 600}
                                     for i, k in enumerate(keys)], c, timeout, seq)
        store_s = time.monotonic() - t
        t = time.monotonic()
        gets = swarm.run("get", [{"node": reader(writers[i]), "key": k} for i, k in enumerate(keys)], c, timeout,
                         seq)
        get_s = time.monotonic() - t
        t = time.monotonic()
        latest = swarm.run("get", [{"node": reader(writers[i]), "key": k, "latest": True}
                                   for i, k in enumerate(keys)], c, timeout, seq)
        latest_s = time.monotonic() - t

        pss = [pss_mib(w.pid) for w in swarm.workers]
        torch_pss = _single_node_with_torch(swarm, python, log_dir) if impl == "ours" else pss[-1]
        stats = swarm.stats()
        ok_store = [r.get("ok") is True for r in stores]
        ok_get = [r.get("found") is True and r.get("value") == v for r, v in zip(gets, values)]
        ok_latest = [r.get("found") is True and r.get("value") == v for r, v in zip(latest, values)]
        errors = sorted({r["error"] for r in stores + gets + latest if r.get("error")})
        ms = {name: summarize_ms([r["ms"] for r in rs if r.get("ms") is not None and r.get("error") is None])
              for name, rs in (("store", stores), ("get", gets), ("get_latest", latest))}
        inner = {name: summarize_ms([r["inner_ms"] for r in rs if r.get("inner_ms") is not None])["median"]
                 for name, rs in (("store", stores), ("get", gets), ("get_latest", latest))}
        sizes = [s["routing_size"] for s in stats if s.get("routing_size") is not None]
        result = {
            "store_ms": ms["store"]["median"], "store_p95_ms": ms["store"]["p95"],
            # keys are handed out in order, so the second half ran later, on a warmer swarm (more open connections)
            "store_ms_second_half": summarize_ms([r["ms"] for r in stores[len(stores) // 2:]
                                                  if r.get("ms") is not None and r.get("error") is None])["median"],
            "get_ms": ms["get"]["median"], "get_p95_ms": ms["get"]["p95"],
            "get_latest_ms": ms["get_latest"]["median"], "get_latest_p95_ms": ms["get_latest"]["p95"],
            "inside_node_thread_ms": inner if any(v is not None for v in inner.values()) else None,
            "success_rate": round((sum(ok_store) + sum(ok_get) + sum(ok_latest)) / (3 * len(keys)), 4),
            "store_success": round(sum(ok_store) / len(keys), 4),
            "get_success": round(sum(ok_get) / len(keys), 4),
            "get_latest_success": round(sum(ok_latest) / len(keys), 4),
            "pss_mib_per_node": round(sum(pss) / n, 1),
            "pss_mib_total": round(sum(pss), 1),
            "pss_mib_single_node_process": round(pss[-1], 1),
            "rss_mib_single_node_process": round(rss_mib(swarm.single.pid), 1),
            "pss_mib_single_node_process_with_torch": round(torch_pss, 1) if torch_pss is not None else None,
            "start_s": round(swarm.start_s, 2),
            "ops_per_s": {"store": round(len(keys) / store_s, 1), "get": round(len(keys) / get_s, 1),
                          "get_latest": round(len(keys) / latest_s, 1)},
            "routing_table_mean": round(statistics.mean(sizes), 1) if sizes else None,
            "processes": len(swarm.workers),
            "os_processes_total": sum(1 + len(descendants(w.pid)) for w in swarm.workers),
            "errors": errors[:10],
            "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        log(f"[{impl}] {json.dumps(result)}")
        if args.dump:
            with open(f"{args.dump}.{impl}.json", "w") as f:
                json.dump({"writers": writers, "stores": stores, "gets": gets, "latest": latest, "stats": stats}, f)
        return result
    finally:
        swarm.close()


def _single_node_with_torch(swarm: Swarm, python: str, log_dir: Path) -> float | None:
    """PSS of one more single-node process of ours that imported torch first (as a training peer has; hivemind
    imports torch anyway), after it joined the swarm and did a store and a get."""
    initial = [n["addrs"][0] for n in swarm.workers[0].ready["nodes"][:2]]
    w = Worker([python, WORKER_SCRIPT, "--impl", "ours", "--nodes", "1", "--import-torch", "--initial-peers", *initial],
               log_dir / "ours-single-torch.log")
    try:
        w.wait_ready(120)
        w.request("store", ops=[{"node": 0, "key": "torch-probe", "value": 1, "ttl": 60}], timeout=60)
        w.request("get", ops=[{"node": 0, "key": "bench-probe-missing"}], timeout=60)
        return pss_mib(w.pid)
    except WorkerError as e:
        log(f"single node with torch failed: {e}")
        return None
    finally:
        w.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--ops", type=int, default=200, help="stores, then as many gets and latest gets")
    parser.add_argument("--procs", type=int, default=4, help="processes hosting the nodes (plus one single-node one)")
    parser.add_argument("--concurrency", type=int, default=1, help="ops in flight per process")
    parser.add_argument("--sequential", action="store_true",
                        help="one op in flight in the whole swarm (pure latency, no load from other ops)")
    parser.add_argument("--value-bytes", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="", help="JSON of DHTConfig fields for our nodes")
    parser.add_argument("--op-timeout", type=float, default=10.0, help="seconds allowed per op (command budget)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--start-parallel", type=int, default=2, help="our nodes joining at once per process")
    parser.add_argument("--vs-hivemind", action="store_true", help="also run hivemind 1.1.12 (builds .venv-hivemind)")
    parser.add_argument("--only-hivemind", action="store_true", help="run hivemind only")
    parser.add_argument("--log-dir", default="", help="where worker logs go (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    parser.add_argument("--dump", default="", help="also write every op's result to DUMP.<impl>.json")
    args = parser.parse_args()
    if args.ops < 1 or args.concurrency < 1:
        parser.error("--ops and --concurrency must be >= 1")

    import tempfile
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="bench-dht-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log(f"worker logs in {log_dir}")
    out: dict[str, Any] = {"nodes": args.nodes, "ops": args.ops, "procs": args.procs,
                           "concurrency_per_process": None if args.sequential else args.concurrency,
                           "sequential": args.sequential, "value_bytes": args.value_bytes}
    if not args.only_hivemind:
        out["ours"] = run_workload("ours", sys.executable, args, log_dir)
    if args.vs_hivemind or args.only_hivemind:
        python = str(ensure_hivemind_venv())
        out["hivemind"] = run_workload("hivemind", python, args, log_dir)
    if "ours" in out and "hivemind" in out:
        ours, hm = out["ours"], out["hivemind"]

        def ratio(key: str) -> float | None:
            return round(ours[key] / hm[key], 3) if ours.get(key) and hm.get(key) else None

        out["ratios"] = {f"{k}_ours_over_hivemind": ratio(k) for k in
                         ("store_ms", "store_ms_second_half", "get_ms", "get_latest_ms", "pss_mib_per_node",
                          "pss_mib_single_node_process", "pss_mib_single_node_process_with_torch", "start_s")}
        out["targets"] = {"get_ms <= hivemind": (ratio("get_ms") or 99) <= 1.0,
                          "store_ms <= 0.8x hivemind": (ratio("store_ms") or 99) <= 0.8,
                          "pss_mib_per_node <= 0.5x hivemind": (ratio("pss_mib_per_node") or 99) <= 0.5}
    out["machine"] = {"cpus": _cpus(), "python": sys.version.split()[0]}
    if not args.json:
        for impl in ("ours", "hivemind"):
            if impl in out:
                r = out[impl]
                print(f"{impl:9s} store {r['store_ms']} ms (p95 {r['store_p95_ms']})  get {r['get_ms']} ms  "
                      f"latest {r['get_latest_ms']} ms  success {r['success_rate']}  "
                      f"PSS/node {r['pss_mib_per_node']} MiB  single-node process {r['pss_mib_single_node_process']}"
                      f" MiB  start {r['start_s']} s")
    print_json(out)


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
