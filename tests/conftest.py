"""Shared test helpers: run a Python snippet in a child process and wait for the lines it prints.

Multi-peer tests start their server peers as real processes::

    def test_x(python_process):
        server = python_process(SNIPPET)      # SNIPPET prints e.g. "ADDR /ip4/.../p2p/12D3..."
        maddr = server.expect("ADDR ")        # rest of the first line starting with "ADDR "

Children die with the test process (``PR_SET_PDEATHSIG``) and are always killed at teardown (also when
stopped with SIGSTOP). A child's stderr goes to a log file; ``server.log()`` returns it, and it is
printed when ``expect`` fails, so a crashed child explains itself.
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# In-process nodes (bootstraps) would print libp2p's routine dial errors through logging's last-resort handler.
for _name in ("libp2p", "multiaddr", "async_service"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except Exception:
        pass


class PythonProcess:
    """``python -u -c snippet`` with its stdout read line by line and its stderr logged to a file."""

    def __init__(self, snippet: str, log_path: Path):
        self.log_path = log_path
        self._log_file = open(log_path, "wb")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", snippet], cwd=REPO_ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file,
                                     preexec_fn=_die_with_parent)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.decode(errors="replace").rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """Wait for a stdout line starting with ``prefix`` and return the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line from child within {timeout}s; log:\n{self.log()}") from None
            if line is None:
                raise AssertionError(f"child exited ({self.proc.wait()}) before {prefix!r}; log:\n{self.log()}")
            if line.startswith(prefix):
                return line[len(prefix):]

    def log(self) -> str:
        """Everything the child wrote to stderr so far."""
        self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """Kill the child (even if SIGSTOPped) and reap it."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        self._log_file.close()


class _Launcher:
    def __init__(self, log_dir: Path):
        self.log_dir, self.children = log_dir, []

    def __call__(self, snippet: str) -> PythonProcess:
        child = PythonProcess(snippet, self.log_dir / f"child-{len(self.children)}.log")
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            child.kill()


@pytest.fixture
def python_process(tmp_path):
    """Factory ``python_process(snippet) -> PythonProcess``; every child is killed when the test ends."""
    launcher = _Launcher(tmp_path)
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def module_python_process(tmp_path_factory):
    """Like ``python_process`` but the children live until the test module ends (shared servers)."""
    launcher = _Launcher(tmp_path_factory.mktemp("children"))
    yield launcher
    launcher.close()


@pytest.fixture
def single_thread():
    """Tiny matmuls are faster (and steadier on a busy 2-core box) with one intra-op thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
