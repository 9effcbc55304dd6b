"""``python -m peer.swarm``: a whole small swarm on this machine, as separate peer processes.

One bootstrap peer, ``--expert-hosts`` peers hosting the model's experts and ``--trainers`` peers
training the MoE language model on the embedded corpus (each on its own shard), all on loopback. It
prints the trainers' held-out loss as it falls, a live status line per trainer (from the bootstrap peer's
dashboard, whose URL it prints; :mod:`peer.app.swarm_status`), and a summary table per trainer at the end.
It stops everything after ``--samples`` samples per trainer (or on Ctrl+C). Exactly the processes a real
deployment runs, started with the same flags.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from .swarm_status import StatusBoard, parse_finished, summary_table

LOSS_LINE = re.compile(r"step (\d+): (?:train loss [\d.]+, )?eval loss ([\d.]+)")
SAMPLE_LINE = re.compile(r"sample at step (\d+): (.*)$")
PEER_ID = re.compile(r"/p2p/(\w+)|as (12D3KooW\w+)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peer.swarm", description=__doc__.splitlines()[0])
    p.add_argument("--trainers", type=int, default=2, help="trainer processes (default: %(default)s)")
    p.add_argument("--expert-hosts", type=int, default=2, help="expert host processes (default: %(default)s)")
    p.add_argument("--samples", type=int, default=1200, help="samples each trainer trains on (default: %(default)s)")
    p.add_argument("--model", default="tiny", choices=["tiny", "small"])
    p.add_argument("--sync", default="diloco", choices=["diloco", "grad"])
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--data", default=None, help="text file or folder (default: the embedded corpus)")
    p.add_argument("--swarm", default="local-demo")
    p.add_argument("--dashboard-port", type=int, default=8080,
                   help="the bootstrap peer serves the swarm's web dashboard on 127.0.0.1:PORT (a free port if "
                        "this one is taken; 0: no dashboard and no status lines) (default: %(default)s)")
    return p


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it on loopback, else a free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise OSError("no free TCP port on 127.0.0.1")


def peer_cmd(*flags: str) -> list[str]:
    return [sys.executable, "-m", "peer", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *flags]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # many peers share this machine's cores: one compute thread each, or their thread pools fight
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []
    board = StatusBoard()
    names: dict[str, str] = {}  # trainer name -> peer ID, for the status lines

    def start(name: str, flags: list[str], pipe_stdout: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen(peer_cmd(*flags), env=env, stdout=subprocess.PIPE if pipe_stdout else subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        proc.name, proc.finished = name, None  # type: ignore[attr-defined]
        procs.append(proc)
        # every peer's stderr is read (a full pipe would block the peer): loss lines and errors are shown
        proc.ready = threading.Event()  # type: ignore[attr-defined]
        proc.echo = threading.Thread(target=_echo_losses, args=(proc, board), daemon=True)  # type: ignore[attr-defined]
        proc.echo.start()  # type: ignore[attr-defined]
        return proc

    try:
        dashboard = ["--dashboard-port", f"127.0.0.1:{free_port(args.dashboard_port)}"] if args.dashboard_port else []
        boot = start("bootstrap", ["--swarm", args.swarm, "--log-level", "WARNING", *dashboard], pipe_stdout=True)
        join = None
        for line in boot.stdout:
            if line.strip().startswith("python -m peer --initial-peers"):
                join = line.split("--initial-peers", 1)[1].split()[0]
                break
        if join is None:
            print(f"error: the bootstrap peer did not start (exit code {boot.wait()})", file=sys.stderr)
            return 1
        print(f"bootstrap peer up: {join}")
        if dashboard:
            url = f"http://{dashboard[1]}/"
            print(f"dashboard: {url}  (JSON: {url}api/)", flush=True)
            threading.Thread(target=board.follow, args=(f"{url}api/training", names), daemon=True).start()
        common = ["--initial-peers", join, "--swarm", args.swarm, "--model", args.model]
        from peer.config import ModelConfig
        cfg = ModelConfig.preset(args.model)
        total = cfg.n_layer * cfg.grid_size[0] * cfg.grid_size[1]
        per_host = -(-total // max(1, args.expert_hosts))
        for i in range(args.expert_hosts):
            host = start(f"experts{i}", [*common, "--experts", str(per_host), "--device", "cpu"])
            # wait until it declared its experts, so the next host picks the rest of the grid
            if not host.ready.wait(120):  # type: ignore[attr-defined]
                print(f"error: expert host {i} did not start hosting in 120 s", file=sys.stderr)
                return 1
        print(f"{args.expert_hosts} expert hosts serving {total} experts")
        trainers = [start(f"trainer{i}", [*common, "--train", "--sync", args.sync, "--local-steps",
                                          str(args.local_steps), "--max-samples", str(args.samples), "--shard",
                                          f"{i}/{args.trainers}", "--log-level", "INFO"]
                          + (["--data", args.data] if args.data else []), pipe_stdout=True)
                    for i in range(args.trainers)]
        for t in trainers:
            threading.Thread(target=_read_peer_id, args=(t, names), daemon=True).start()
        print(f"{args.trainers} trainers started; held-out loss as it falls (Ctrl+C stops the swarm):")
        for t in trainers:
            t.wait()
            t.echo.join(timeout=5)
        board.close()
        print("\n" + summary_table({t.name: t.finished for t in trainers}), flush=True)
        failed = [t.name for t in trainers if t.returncode != 0]
        if failed:
            print(f"error: trainers {failed} failed", file=sys.stderr)
            return 1
        print("all trainers finished; stopping the swarm")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the swarm")
        return 130
    finally:
        board.close()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


def _read_peer_id(proc: subprocess.Popen, names: dict[str, str]) -> None:
    """Note a trainer's peer ID (from the join line it prints) in ``names``; read the rest of its stdout."""
    for line in proc.stdout:
        m = PEER_ID.search(line)
        if m and proc.name not in names:  # type: ignore[attr-defined]
            names[proc.name] = m.group(1) or m.group(2)  # type: ignore[attr-defined]


def _echo_losses(proc: subprocess.Popen, board: StatusBoard | None = None) -> None:
    """Print a peer's loss lines and errors; set ``proc.ready`` once it hosts experts, ``proc.finished`` to the
    figures of its ``Finished`` line."""
    say = board.event if board is not None else (lambda text: print(text, flush=True))
    for line in proc.stderr:
        if "Hosting " in line:
            proc.ready.set()  # type: ignore[attr-defined]
        m = LOSS_LINE.search(line)
        sample = SAMPLE_LINE.search(line)
        if (finished := parse_finished(line)) is not None:
            proc.finished = finished  # type: ignore[attr-defined]
        if m:
            say(f"  {proc.name}: step {m.group(1):>4}  eval loss {float(m.group(2)):.3f}")
        elif sample:
            say(f"  {proc.name}: step {sample.group(1):>4}  writes {sample.group(2)}")
        elif "ERROR" in line or "Traceback" in line or "Error" in line:
            say(f"  {proc.name}: {line.rstrip()}")


if __name__ == "__main__":
    sys.exit(main())
