"""Shared helpers of the benchmarks (and of the multi-process tests that reuse them).

* :class:`Worker` -- a child process driven over stdin/stdout JSON lines (one request line, one reply
  line), with a deadline on every reply, its stderr logged to a file, and death with its parent.
* :func:`pss_mib` -- proportional set size of a process *and all its descendants*, read from
  ``/proc/<pid>/smaps_rollup`` (PSS splits shared pages between the processes sharing them, so the PSS
  of several processes adds up to what they really cost together).
* :func:`ensure_hivemind_venv` -- builds, once, the separate venv hivemind needs (it cannot share an
  environment with py-libp2p: protobuf versions and a duplicate proto symbol clash).
* :func:`print_json` / :func:`summarize_ms` -- report helpers.

Standard library only, so any Python can import it.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
HIVEMIND_VENV = REPO_ROOT / ".venv-hivemind"
HIVEMIND_REQUIREMENTS = ("torch==2.13.0", "hivemind==1.1.12")


class WorkerError(RuntimeError):
    """A worker process died, missed a deadline or answered with an error."""


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except Exception:
        pass


class Worker:
    """A child process speaking one JSON object per line on stdin (requests) and stdout (replies).

    The first stdout line that parses as a JSON object is the worker's "ready" message
    (:meth:`wait_ready`); each later request gets exactly one reply line. Lines that are not JSON are
    ignored (stray prints from libraries). stderr goes to ``log_path``.

    :param argv: the full command line (``[python, script, args...]``).
    :param log_path: file receiving the child's stderr.
    :param env: extra environment variables.
    """

    def __init__(self, argv: Sequence[str], log_path: str | Path, env: dict[str, str] | None = None,
                 cwd: str | Path = REPO_ROOT):
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, cwd=cwd, env=full_env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, preexec_fn=_die_with_parent)
        self._replies: queue.Queue[dict | None] = queue.Queue()
        self._lock = threading.Lock()
        self._next_id = 0
        self.ready: dict | None = None
        threading.Thread(target=self._read, daemon=True, name=f"worker-{self.proc.pid}-stdout").start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("{"):
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(msg, dict):
                self._replies.put(msg)
        self._replies.put(None)

    def _next(self, timeout: float, what: str) -> dict:
        try:
            msg = self._replies.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise WorkerError(f"worker {self.pid} gave no {what} within {timeout:.0f}s; log tail:\n{self.log_tail()}")\
                from None
        if msg is None:
            self._replies.put(None)  # keep reporting the death to later callers
            raise WorkerError(f"worker {self.pid} exited ({self.proc.poll()}) before its {what}; log tail:\n"
                              f"{self.log_tail()}")
        return msg

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Block until the worker's first JSON line; raises :class:`WorkerError` if it fails to come."""
        if self.ready is None:
            self.ready = self._next(timeout, "ready line")
            if self.ready.get("error"):
                raise WorkerError(f"worker {self.pid} failed to start: {self.ready['error']}\n{self.log_tail()}")
        return self.ready

    def send(self, cmd: str, **args: Any) -> int:
        """Send a request without waiting; returns its id (pair with :meth:`receive`)."""
        with self._lock:
            self._next_id += 1
            rid = self._next_id
        line = json.dumps({"id": rid, "cmd": cmd, **args}) + "\n"
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerError(f"worker {self.pid} is gone ({e}); log tail:\n{self.log_tail()}") from None
        return rid

    def receive(self, rid: int, timeout: float) -> dict:
        """The reply to request ``rid``; raises :class:`WorkerError` on error replies or past ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next(deadline - time.monotonic(), f"reply to request {rid}")
            if msg.get("id") != rid:
                continue  # a late reply to an earlier request that we stopped waiting for
            if msg.get("error"):
                raise WorkerError(f"worker {self.pid} request {rid} failed: {msg['error']}")
            return msg

    def request(self, cmd: str, timeout: float = 60.0, **args: Any) -> dict:
        """Send one request and wait for its reply (the worker's own deadline is ``timeout`` minus a margin)."""
        args.setdefault("timeout", max(1.0, timeout - 5.0))
        return self.receive(self.send(cmd, **args), timeout)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            self._log.flush()
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the worker and all its descendants (hivemind's DHT processes and p2pd daemons)."""
        for pid in [*descendants(self.pid), self.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self, timeout: float = 15.0) -> None:
        """Ask the worker to quit; kill it (and its descendants) if it has not exited in ``timeout`` s."""
        if self.proc.poll() is None:
            kids = descendants(self.pid)
            try:
                self.send("quit")
                self.proc.stdin.close()
            except (WorkerError, OSError):
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            for pid in kids:  # orphans left behind by a worker that did not clean up
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if self.proc.poll() is None:
                self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        self._log.close()


# ---------------------------------------------------------------------------------------- memory
def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), from ``/proc/<pid>/task/*/children``."""
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            frontier.extend(kids)
    return out


def _rollup_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_mib(pid: int, include_children: bool = True) -> float:
    """PSS of ``pid`` (plus all its descendants) in MiB."""
    pids = [pid, *(descendants(pid) if include_children else [])]
    return sum(_rollup_kib(p, "Pss") for p in pids) / 1024


def rss_mib(pid: int, include_children: bool = True) -> float:
    """RSS of ``pid`` (plus all its descendants) in MiB; counts shared pages once per process."""
    pids = [pid, *(descendants(pid) if include_children else [])]
    return sum(_rollup_kib(p, "Rss") for p in pids) / 1024


# ---------------------------------------------------------------------------------------- hivemind venv
def ensure_hivemind_venv(path: Path = HIVEMIND_VENV, log=sys.stderr) -> Path:
    """The python of a venv with hivemind installed; builds it the first time (a few minutes).

    A marker file written after a successful install makes later calls instant; a half-built venv
    (interrupted install) is completed by the next call.
    """
    python = path / "bin" / "python"
    marker = path / ".swarmtrain-ready"
    wanted = " ".join(HIVEMIND_REQUIREMENTS)
    if marker.exists() and marker.read_text().strip() == wanted:
        return python
    # one builder at a time (several benchmarks may start at once); a lock file of its own, so a caller that
    # holds another lock around this call cannot deadlock with it
    with open(path.with_name(path.name + ".build-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (marker.exists() and marker.read_text().strip() == wanted):
                _build_venv(path, python, marker, wanted, log)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return python


def _build_venv(path: Path, python: Path, marker: Path, wanted: str, log) -> None:
    if not python.exists():
        print(f"creating {path} ...", file=log, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    print(f"installing {wanted} into {path} (once) ...", file=log, flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *HIVEMIND_REQUIREMENTS], check=True,
                   stdout=log, stderr=log)
    subprocess.run([str(python), "-c", "import hivemind; print('hivemind', hivemind.__version__)"], check=True,
                   stdout=log, stderr=log)
    marker.write_text(wanted + "\n")


# ---------------------------------------------------------------------------------------- reporting
def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values`` with linear interpolation; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize_ms(values: Sequence[float]) -> dict:
    """``{"median", "p95", "n"}`` of latencies in ms, rounded to 0.01 ms."""
    if not values:
        return {"median": None, "p95": None, "n": 0}
    return {"median": round(statistics.median(values), 2), "p95": round(percentile(values, 0.95), 2),
            "n": len(values)}


def print_json(obj: Any, *, indent: int | None = None) -> None:
    """Print ``obj`` as one JSON line (or indented) on stdout and flush."""
    print(json.dumps(obj, indent=indent, sort_keys=False), flush=True)
