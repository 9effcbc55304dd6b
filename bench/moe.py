"""MoE benchmark: forward+backward latency of a remote mixture-of-experts layer, ours vs the same math locally
(and vs hivemind).

    python bench/moe.py [--servers 2 --experts-per-server 2 --hidden 1024 --batch 32 --k 2]
                        [--steps 30 --rounds 3 --warmup 5] [--vs-hivemind] [--json]

Layout: ``--servers`` expert-server processes, each hosting ``--experts-per-server`` ``ffn`` experts
(``Linear(h, 4h) -> GELU -> Linear(4h, h)``; hivemind's adds a LayerNorm) of a 1-D grid
``expert.0 .. expert.{n-1}``, plus one client process whose ``RemoteMixtureOfExperts(k_best=k, k_min=1)``
times ``--steps`` forward+backward passes of ``y.pow(2).mean()`` on random ``[batch, hidden]`` inputs
(after ``--warmup`` unmeasured ones). Experts train with Adam, lr 1e-3, the same implementation
everywhere (``--optimizer adam-fused``: torch's fused kernel, the default; or ``adam``).

The remote backward includes each expert's optimizer step on its server, so the local reference
``local_fwd_bwd_ms`` is a :class:`peer.training.model.LocalMixtureOfExperts` with the same experts timed for
forward + backward + the experts' Adam step in this process, with 1 and ``--local-threads`` torch threads
(the faster counts; ``local_fwd_bwd_nostep_ms``: the same without the step). ``cpu_ms_per_step`` is the
CPU time of all processes of a setup per step, which stays comparable when the machine is busy. ``--vs-hivemind`` runs
the same layout with hivemind 1.1.12 (``Server.create(expert_cls="ffn")``, ``hivemind.RemoteMixtureOfExperts``)
from the venv ``.venv-hivemind``; hivemind is never imported here. Torch threads: ``--server-threads`` per
server and ``--client-threads`` for the client, for ours and hivemind alike.

All setups are started first; then ``--rounds`` rounds each time a share of the steps of every setup
(ours, hivemind, local) in turn, so a change of the machine's load affects all of them alike.

The last line printed is one JSON object::

    {"config": {...}, "ours": {"fwd_bwd_ms", "fwd_bwd_p95_ms", "samples_per_s", "local_fwd_bwd_ms", ...},
     "hivemind": {same keys}, "ratios": {"ours_vs_local", "ours_vs_local_cpu", "ours_vs_hivemind_samples_per_s",
     "hivemind_vs_ours_cpu", ...}, "load_avg_before": [...], "load_avg_after": [...]}
"""
from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testbed.common import REPO_ROOT, Worker, WorkerError, descendants, ensure_hivemind_venv, percentile, \
    print_json  # noqa: E402

WORKER_SCRIPT = str(Path(__file__).resolve().parent.parent / "testbed" / "moe_worker.py")


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def summarize(ms: list[float], batch: int) -> dict:
    if not ms:
        return {"fwd_bwd_ms": None, "fwd_bwd_p95_ms": None, "samples_per_s": None, "steps": 0}
    median = statistics.median(ms)
    return {"fwd_bwd_ms": round(median, 2), "fwd_bwd_p95_ms": round(percentile(ms, 0.95), 2),
            "samples_per_s": round(batch * 1000 / median, 1), "steps": len(ms)}


@contextmanager
def hivemind_python() -> Iterator[str]:
    """The hivemind venv's python, built once; a file lock keeps concurrent builders from colliding."""
    lock_path = REPO_ROOT / ".venv-hivemind.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            python = ensure_hivemind_venv(log=sys.stderr)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    yield str(python)


class RemoteSetup:
    """The servers and the client of ``impl`` (``"ours"`` or ``"hivemind"``), started and warmed up."""

    def __init__(self, impl: str, python: str, args: argparse.Namespace, log_dir: Path):
        self.impl, self.args, self.workers = impl, args, []
        self.ms: list[float] = []
        self.cpu_s, self.failures = 0.0, 0
        common = ["--impl", impl, "--hidden", str(args.hidden), "--log-level", args.log_level]
        server_opts = ["--optimizer", args.optimizer, "--batch-window-ms", str(args.batch_window_ms),
                       "--threads", str(args.server_threads)]
        n = args.servers * args.experts_per_server
        try:
            first_addrs: list[str] = []
            for s in range(args.servers):
                uids = [f"expert.{s * args.experts_per_server + e}" for e in range(args.experts_per_server)]
                argv = [python, WORKER_SCRIPT, *common, "--role", "server", "--uids", *uids, *server_opts]
                if first_addrs:
                    argv += ["--initial-peers", *first_addrs]
                worker = Worker(argv, log_dir / f"moe-{impl}-server{s}.log")
                self.workers.append(worker)
                ready = worker.wait_ready(timeout=180)
                first_addrs = first_addrs or ready["addrs"][:1]
                log(f"{impl}: server {s} ready in {ready.get('start_s')} s ({', '.join(uids)})")
            self.client = Worker([python, WORKER_SCRIPT, *common, "--role", "client", "--grid", str(n),
                                  "--threads", str(args.client_threads), "--initial-peers", *first_addrs],
                                 log_dir / f"moe-{impl}-client.log")
            self.workers.append(self.client)
            self.client.wait_ready(timeout=180)
            time.sleep(args.settle)  # let declarations propagate (hivemind's are asynchronous)
            self.run(args.warmup, record=False)
        except BaseException:
            self.close()
            raise

    def run(self, steps: int, record: bool = True) -> None:
        """Time ``steps`` fwd+bwd steps; also counts the CPU time of every process of this setup."""
        cpu_before = sum(cpu_seconds(w.pid) for w in self.workers)
        result = self.client.request("bench", timeout=self.args.timeout, batch=self.args.batch, k=self.args.k,
                                     steps=steps, warmup=0)
        if record:
            self.ms += result["ms"]
            self.failures += result["failures"]
            self.cpu_s += sum(cpu_seconds(w.pid) for w in self.workers) - cpu_before

    def report(self) -> dict:
        out = {**summarize(self.ms, self.args.batch), "failed_steps": self.failures,
               "cpu_ms_per_step": round(self.cpu_s * 1000 / max(1, len(self.ms) + self.failures), 1)}
        if self.impl == "ours":
            out["server_stats"] = [w.request("stats", timeout=10)["stats"] for w in self.workers[:-1]]
        return out

    def close(self) -> None:
        for worker in self.workers:
            worker.close(timeout=20)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its descendants (from /proc/<pid>/stat)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


class LocalSetup:
    """The same layer with every expert in this process: fwd+bwd (+ the experts' Adam step).

    Timed with 1 torch thread and with ``--local-threads``; ``local_fwd_bwd_ms`` is the faster (the
    conservative reference for the remote layer), the others are reported as measured.
    """

    def __init__(self, args: argparse.Namespace):
        import torch
        from peer.moe.local import LocalMixtureOfExperts
        self.torch, self.args = torch, args
        self.moe = LocalMixtureOfExperts(args.hidden, (args.servers * args.experts_per_server,), args.k,
                                         prefix="expert")
        self.optimizers = [torch.optim.Adam(expert.parameters(), lr=1e-3, fused=args.optimizer == "adam-fused")
                           for expert in self.moe.experts]
        self.configs = [(t, step) for t in sorted({1, args.local_threads}) for step in (True, False)]
        self.ms: dict[tuple[int, bool], list[float]] = {c: [] for c in self.configs}
        self.cpu: dict[tuple[int, bool], float] = {c: 0.0 for c in self.configs}
        self.run(args.warmup, record=False)

    def run(self, steps: int, record: bool = True) -> None:
        torch = self.torch
        for threads, with_step in self.configs:
            torch.set_num_threads(threads)
            for _ in range(steps):
                x = torch.randn(self.args.batch, self.args.hidden, requires_grad=True)
                start, cpu_start = time.perf_counter(), time.process_time()
                self.moe(x).pow(2).mean().backward()
                if with_step:
                    for opt in self.optimizers:
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                if record:
                    self.ms[(threads, with_step)].append((time.perf_counter() - start) * 1000)
                    self.cpu[(threads, with_step)] += time.process_time() - cpu_start
                self.moe.zero_grad(set_to_none=True)

    def report(self) -> dict:
        out: dict[str, Any] = {}
        for (threads, with_step), ms in self.ms.items():
            name = f"local_{threads}t_fwd_bwd{'' if with_step else '_nostep'}"
            out[name + "_ms"] = round(statistics.median(ms), 2)
            out[name + "_cpu_ms"] = round(self.cpu[(threads, with_step)] * 1000 / len(ms), 1)
        out["local_fwd_bwd_ms"] = min(v for k, v in out.items() if k.endswith("t_fwd_bwd_ms"))
        out["local_fwd_bwd_nostep_ms"] = min(v for k, v in out.items() if k.endswith("t_fwd_bwd_nostep_ms"))
        out["local_cpu_ms_per_step"] = out["local_1t_fwd_bwd_cpu_ms"]
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--experts-per-server", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per setup (over all rounds)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds ours/hivemind/local")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-window-ms", type=float, default=0.0, help="our servers' batching window")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads per server process")
    parser.add_argument("--client-threads", type=int, default=1, help="torch threads of the client process")
    parser.add_argument("--local-threads", type=int, default=2, help="torch threads of the local reference")
    parser.add_argument("--local-steps", type=int, default=15, help="measured steps per local configuration")
    parser.add_argument("--optimizer", choices=("adam", "adam-fused"), default="adam-fused",
                        help="the experts' optimizer everywhere (ours, hivemind, local), lr 1e-3")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between start-up and the first step")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--vs-hivemind", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--log-dir", default=os.path.join(tempfile.gettempdir(), "swarmtrain-bench-moe"),
                        help="where the workers' logs go (default: swarmtrain-bench-moe in the temp folder)")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--json", action="store_true", help="(default) print the JSON result as the last line")
    args = parser.parse_args()
    if args.k > args.servers * args.experts_per_server:
        parser.error("--k exceeds the number of experts")
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": {k: getattr(args, k) for k in (
        "servers", "experts_per_server", "hidden", "batch", "k", "steps", "rounds", "warmup", "batch_window_ms",
        "server_threads", "client_threads", "local_threads", "optimizer")}, "load_avg_before": list(os.getloadavg())}
    setups: dict[str, RemoteSetup] = {}
    try:
        local = LocalSetup(args)
        if not args.skip_ours:
            setups["ours"] = RemoteSetup("ours", sys.executable, args, log_dir)
        if args.vs_hivemind:
            try:
                with hivemind_python() as python:
                    setups["hivemind"] = RemoteSetup("hivemind", python, args, log_dir)
            except (WorkerError, OSError, subprocess.CalledProcessError) as e:
                report["hivemind"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        # interleave: each round times a chunk of every setup, so load changes hit all of them alike
        chunk, local_chunk = max(1, args.steps // args.rounds), max(1, args.local_steps // args.rounds)
        for r in range(args.rounds):
            names = list(setups)
            for name in names[r % max(1, len(names)):] + names[:r % max(1, len(names))]:
                setups[name].run(chunk)
            local.run(local_chunk)
            log(f"round {r + 1}/{args.rounds} done")
        local_report = local.report()
        for name, setup in setups.items():
            report[name] = {**setup.report(), **local_report}
            log(f"{name}: {report[name]}")
    finally:
        for setup in setups.values():
            setup.close()
    local = local_report
    ours, hm = report.get("ours", {}), report.get("hivemind", {})
    ratios = {}
    if ours.get("fwd_bwd_ms"):
        ratios["ours_vs_local"] = round(ours["fwd_bwd_ms"] / local["local_fwd_bwd_ms"], 2)
        ratios["ours_vs_local_nostep"] = round(ours["fwd_bwd_ms"] / local["local_fwd_bwd_nostep_ms"], 2)
        ratios["ours_vs_local_cpu"] = round(ours["cpu_ms_per_step"] / local["local_cpu_ms_per_step"], 2)
    if ours.get("samples_per_s") and hm.get("samples_per_s"):
        ratios["ours_vs_hivemind_samples_per_s"] = round(ours["samples_per_s"] / hm["samples_per_s"], 2)
        ratios["hivemind_vs_ours_cpu"] = round(hm["cpu_ms_per_step"] / ours["cpu_ms_per_step"], 2)
    report["ratios"] = ratios
    report["load_avg_after"] = list(os.getloadavg())
    print_json(report)


if __name__ == "__main__":
    main()
