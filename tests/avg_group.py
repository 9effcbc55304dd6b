"""Run a group of averaging peers as real processes (bench/avg_worker.py) and collect what they did."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

WORKER = str(Path(__file__).resolve().parent.parent / "bench" / "avg_worker.py")


class Peer:
    def __init__(self, proc: subprocess.Popen, out: str):
        self.proc, self.out, self.lines = proc, out, []
        self.info = self.read_line(90)

    def read_line(self, timeout: float) -> dict:
        import select
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"worker exited: {self.proc.stderr.read()[-3000:]}")
                if line.startswith("{"):
                    return json.loads(line)
        raise TimeoutError("worker printed nothing in time")

    def results(self, timeout: float) -> list[dict]:
        while True:
            item = self.read_line(timeout)
            if item.get("done"):
                return self.lines
            self.lines.append(item)

    def tensor(self) -> torch.Tensor:
        return torch.load(self.out)


def start_peers(bootstrap: str, tmp: Path, specs: list[dict]) -> list[Peer]:
    """Start one worker per spec (keyword flags of avg_worker.py); all wait on stdin for 'go'."""
    peers = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i, spec in enumerate(specs):
        out = str(tmp / f"peer{i}.pt")
        args = [sys.executable, WORKER, "--initial-peers", bootstrap, "--start-at", "-1", "--out", out]
        for k, v in spec.items():
            flag = "--" + k.replace("_", "-")
            if v is True:
                args.append(flag)
            elif v is not False and v is not None:
                args += [flag, str(v)]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        peers.append(Peer(proc, out))
    return peers


def go(peers: list[Peer]) -> float:
    for p in peers:
        p.proc.stdin.write("go\n")
        p.proc.stdin.flush()
    return time.monotonic()


def stop(peers: list[Peer]) -> None:
    for p in peers:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait(10)
        for stream in (p.proc.stdin, p.proc.stdout, p.proc.stderr):
            try:
                stream.close()
            except Exception:
                pass
