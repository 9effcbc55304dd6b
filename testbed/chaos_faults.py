"""Faults for ``bench/chaos.py``: what to break next (seeded), and a SIGKILL that lands inside a checkpoint save.

Fault kinds (``KINDS``), all on one non-bootstrap peer at a time:

* ``sigkill`` -- SIGKILL, check its checkpoints load, restart it after a few seconds (same identity and
  checkpoint directories, so it must resume);
* ``kill_during_save`` -- the same, but timed by :class:`SaveKiller` to land while a trainer writes its
  checkpoint (trainers only);
* ``restart`` -- SIGTERM (it must exit cleanly within the grace period), then start it again;
* ``sigstop`` -- SIGSTOP for a few seconds, then SIGCONT;
* ``link_cut`` -- its link is cut at the switch for a few seconds (:meth:`testbed.netns.Topology.set_link`).

:class:`FaultPlan` draws them from a seeded RNG: the first ``len(KINDS)`` faults go through every kind
once (in a seeded order; a trainer restart right before the first kill during a save, which needs a
trainer that already has a checkpoint), so even a short run injects each kind; later ones at random.
"""
from __future__ import annotations

import ctypes
import os
import random
import select
import signal
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("sigkill", "kill_during_save", "restart", "sigstop", "link_cut")
TRAINER_ONLY = {"kill_during_save"}
IN_CREATE = 0x100


@dataclass
class Fault:
    """One injected fault; times are ``time.monotonic()``."""

    kind: str
    peer: str
    began: float
    duration_s: float                 # how long the peer stays stopped / cut / down
    ended: float | None = None        # SIGCONT, link up, or the restarted process launched
    recovered: float | None = None
    detail: dict = field(default_factory=dict)


class FaultPlan:
    """Seeded choice of the next fault: ``next(candidates) -> (kind, peer, duration_s)`` or None.

    :param seed: RNG seed (same seed, same run order of kinds, peers and durations).
    :param roles: peer name -> role (``experts`` or ``trainer``; others are never faulted).
    :param duration_s: (min, max) seconds a peer stays stopped, cut or down.
    """

    def __init__(self, seed: int, roles: dict[str, str], duration_s: tuple[float, float] = (3.0, 8.0)):
        self.rng = random.Random(seed)
        self.roles, self.duration_s = roles, duration_s
        self.pending = [k for k in KINDS if k not in ("restart", "kill_during_save")] + ["restart"]
        self.rng.shuffle(self.pending)
        self.pending.insert(self.pending.index("restart") + 1, "kill_during_save")

    def next(self, idle: list[str], saved: list[str] = ()) -> tuple[str, str, float] | None:
        """A fault for one of the ``idle`` peers (those that may be faulted now), or None if none fits.

        ``kill_during_save`` only goes to trainers in ``saved`` (those with a checkpoint already, so that
        the kill tests that the previous one survives): to the first idle one, so list them soonest next
        save first."""
        trainers = sorted(p for p in idle if self.roles.get(p) == "trainer")
        faultable = sorted(p for p in idle if self.roles.get(p) in ("trainer", "experts"))
        fits = {kind: faultable for kind in KINDS}
        fits["kill_during_save"] = [p for p in trainers if p in saved]
        if "kill_during_save" in self.pending and not saved:
            fits["restart"] = trainers    # a clean restart saves a checkpoint: the kill then has one to spare
        if self.pending:          # first every kind once, each as soon as a peer it fits is idle
            kind = next((k for k in self.pending if fits[k]), None)
            if kind is None:
                return None
            self.pending.remove(kind)
        else:
            kinds = [k for k in KINDS if fits[k]]
            if not kinds:
                return None
            kind = self.rng.choice(kinds)
        peer = fits[kind][0] if kind == "kill_during_save" else self.rng.choice(fits[kind])
        return kind, peer, round(self.rng.uniform(*self.duration_s), 2)

    def gap(self, low: float, high: float) -> float:
        """Seconds until the next fault is due."""
        return self.rng.uniform(low, high)


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from ``/proc/<pid>/stat`` (``T``: stopped), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


class SaveKiller:
    """SIGKILL a trainer while it writes a checkpoint: the previous checkpoint must survive.

    ``peer.checkpoint.save_checkpoint`` writes ``.trainer.pt.<random>.tmp`` next to ``trainer.pt`` and
    renames it over the checkpoint once written and fsynced. We watch the directory with inotify; the
    moment a temporary file is created we SIGSTOP the trainer, wait until the kernel reports it stopped,
    and check that the temporary file still exists -- then the trainer is frozen mid-save and SIGKILL
    makes the save never finish. If the save already completed (a very fast save won the race) we SIGCONT
    and wait for the next one.

    :param directory: the trainer's ``--checkpoint-dir``; :param pid: the trainer's process id.
    :param before_kill: called just before the SIGKILL (e.g. to mark the exit as expected).
    :param delay_s: wait this long after the file appears before freezing the trainer, to land later in
        the write (0: right after the file is created; a save takes a few milliseconds).
    """

    def __init__(self, directory: Path, pid: int, before_kill=lambda: None, delay_s: float = 0.0):
        self.directory, self.pid, self.before_kill, self.delay_s = Path(directory), pid, before_kill, delay_s
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.libc.inotify_add_watch(self.fd, str(self.directory).encode(), IN_CREATE) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch({self.directory}) failed")
        self.races_lost = 0

    def wait_and_kill(self, timeout: float, cancelled=lambda: False) -> dict | None:
        """Block until a save is caught and killed (returns what was seen), or None after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and not cancelled():
                ready, _, _ = select.select([self.fd], [], [], min(0.5, max(0.0, deadline - time.monotonic())))
                if not ready:
                    continue
                for name in self._created_names():
                    if name.startswith(".trainer.pt.") and name.endswith(".tmp"):
                        caught = self._freeze_and_kill(name)
                        if caught is not None:
                            return caught
        finally:
            os.close(self.fd)
        return None

    def _created_names(self) -> list[str]:
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        names, offset = [], 0
        while offset + 16 <= len(data):
            _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
            names.append(data[offset + 16:offset + 16 + length].split(b"\0", 1)[0].decode(errors="replace"))
            offset += 16 + length
        return names

    def _freeze_and_kill(self, name: str) -> dict | None:
        if self.delay_s:
            time.sleep(self.delay_s)
        try:
            os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            return None
        for _ in range(200):                        # the signal is asynchronous: wait for the stop
            if process_state(self.pid) in ("T", "t", None):
                break
            time.sleep(0.005)
        tmp = self.directory / name
        if tmp.exists():
            size = tmp.stat().st_size
            self.before_kill()
            os.kill(self.pid, signal.SIGKILL)
            return {"temp_file": name, "temp_bytes_written": size, "killed_at": time.monotonic()}
        self.races_lost += 1
        os.kill(self.pid, signal.SIGCONT)
        return None
