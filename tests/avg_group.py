"""Run a group of averaging peers as real processes (testbed/avg_worker.py) and collect what they did."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

WORKER = str(Path(__file__).resolve().parent.parent / "testbed" / "avg_worker.py")


class Peer:
    """A worker process; a reader thread turns its JSON stdout lines into a queue."""

    def __init__(self, proc: subprocess.Popen, out: str, log_path: Path):
        self.proc, self.out, self.log_path, self.lines = proc, out, log_path, []
        self.info: dict = {}
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._queue.put(json.loads(line))
        self._queue.put(None)

    def read_line(self, timeout: float) -> dict:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"worker printed nothing in {timeout}s") from None
        if item is None:
            self._queue.put(None)
            raise RuntimeError(f"worker exited: {self.log()[-3000:]}")
        return item

    def results(self, timeout: float) -> list[dict]:
        while True:
            item = self.read_line(timeout)
            if item.get("done"):
                return self.lines
            self.lines.append(item)

    def log(self) -> str:
        """What the worker wrote to stderr (a file, so a chatty worker never blocks on a full pipe)."""
        return self.log_path.read_text(errors="replace")

    def tensor(self) -> torch.Tensor:
        return torch.load(self.out)


def start_peers(bootstrap: str, tmp: Path, specs: list[dict]) -> list[Peer]:
    """Start one worker per spec (keyword flags of avg_worker.py); all wait on stdin for 'go'.

    All workers start at once (each spends seconds importing torch and libp2p), then we wait for
    every one to print its peer info."""
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
        log_path = tmp / f"peer{i}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                    env=env)
        peers.append(Peer(proc, out, log_path))
    try:
        for p in peers:
            p.info = p.read_line(90)
    except BaseException:
        stop(peers)
        raise
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
        for stream in (p.proc.stdin, p.proc.stdout):
            try:
                stream.close()
            except Exception:
                pass
