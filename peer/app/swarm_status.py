"""What ``python -m peer.swarm`` prints: a live status line per trainer, events above it, a summary at the end.

The status lines come from the bootstrap peer's dashboard (``/api/training``, :mod:`peer.app.dashboard`):
what each trainer last published in the DHT (step, loss, samples/s, peers, its latest averaging round).
On a terminal the lines are redrawn in place, with events (held-out losses, samples, errors) printed
above them; elsewhere (a log file, CI) they are printed every ``every_s`` seconds when they changed.
The summary table is built from each trainer's last log line (``Finished: ...``), so it needs no network.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import urllib.request

FINISHED = re.compile(r"Finished: (\d+) samples in \d+ steps, final eval loss (\S+?), averaging (\d+) ok / "
                      r"(\d+) failed, \d+ bytes \((\d+) sent\)")


def status_line(name: str, row: dict | None) -> str:
    """``trainer0  step 120 | loss 3.104 | 41.2 samples/s | peers 5 | last round ok, 2 peers, 0.81 s``."""
    if row is None:
        return f"{name:<9} waiting for its first progress record"
    last = row.get("last_round")
    if last:
        outcome = (f"last round {'ok' if last.get('ok') else 'FAILED'}, {last.get('contributors') or last.get('group')} "
                   f"peers, {last.get('s', 0):.2f} s")
    else:
        outcome = "no round yet"
    loss = row.get("loss")
    sps = row.get("sps")
    return (f"{name:<9} step {row.get('step', 0):>4} | loss {'–' if loss is None else f'{loss:.3f}'} | "
            f"{'–' if sps is None else f'{sps:.1f}'} samples/s | peers {row.get('peers') or 0} | {outcome}")


def summary_table(finished: dict[str, tuple]) -> str:
    """The end-of-run table from each trainer's parsed ``Finished`` line (None where it printed none)."""
    lines = [f"{'trainer':<9} {'samples':>8} {'final loss':>10} {'rounds ok':>9} {'failed':>6} {'MB sent':>8}"]
    for name, figures in finished.items():
        if figures is None:
            lines.append(f"{name:<9} {'(did not finish)':>8}")
            continue
        samples, loss, ok, failed, sent = figures
        lines.append(f"{name:<9} {samples:>8} {loss:>10} {ok:>9} {failed:>6} {sent / 1e6:>8.2f}")
    return "\n".join(lines)


def parse_finished(line: str) -> tuple | None:
    m = FINISHED.search(line)
    return None if m is None else (int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4)), int(m.group(5)))


class StatusBoard:
    """Live status lines below a stream of events (thread-safe)."""

    def __init__(self, stream=None, every_s: float = 15.0):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.every_s, self.lines, self._drawn, self._printed = every_s, [], 0, None
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        for line in self.lines:
            self.stream.write(line + "\n")
        self._drawn = len(self.lines)

    def event(self, text: str) -> None:
        """Print ``text`` (one event) above the status lines."""
        with self.lock:
            if self.live:
                self._erase()
            self.stream.write(text + "\n")
            if self.live:
                self._draw()
            self.stream.flush()

    def show(self, lines: list[str]) -> None:
        """Replace the status lines (redrawn on a terminal; printed when they changed elsewhere)."""
        with self.lock:
            self.lines = lines
            if self.live:
                self._erase()
                self._draw()
            elif lines != self._printed:
                self.stream.write("\n".join(f"  status: {line}" for line in lines) + "\n")
                self._printed = lines
            self.stream.flush()

    def follow(self, api_url: str, names: dict[str, str], poll_s: float = 1.0) -> None:
        """Until :attr:`stopped`, poll ``api_url`` (``/api/training``) and show one line per trainer name
        (``names``: name -> peer ID, filled in as trainers start)."""
        while not self.stopped.wait(poll_s if self.live else self.every_s):
            try:
                with urllib.request.urlopen(api_url, timeout=5) as reply:
                    rows = {row["peer_id"]: row for row in json.load(reply)["trainers"]}
            except (OSError, ValueError, KeyError):
                continue  # the dashboard is starting or busy: keep the last lines
            self.show([status_line(name, rows.get(peer_id)) for name, peer_id in sorted(names.items())])

    def close(self) -> None:
        self.stopped.set()
        with self.lock:
            self._drawn = 0  # leave the last lines on screen
