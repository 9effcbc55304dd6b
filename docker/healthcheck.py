"""Container healthcheck of a swarmtrain peer: is its Prometheus endpoint up (and a gauge set)?

Used by ``docker/docker-compose.yml`` (and by ``docker/netns_swarm.py``, which runs the same
checks)::

    python docker/healthcheck.py --port 9100                                   # the peer answers
    python docker/healthcheck.py --port 9100 --gauge swarmtrain_experts_hosted   # ...and hosts experts

Exit status 0 when ``http://127.0.0.1:PORT/metrics`` answers and, with ``--gauge NAME``, the gauge
``NAME`` is present and greater than zero; 1 otherwise, with the reason on stderr. Only the standard
library is imported, so a check takes a few milliseconds.
"""
from __future__ import annotations

import argparse
import sys
import urllib.request


def gauge_value(metrics_text: str, name: str) -> float | None:
    """Value of the unlabelled sample ``name`` in Prometheus text format, or None if it is absent."""
    for line in metrics_text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None


def check(port: int, gauge: str | None = None, host: str = "127.0.0.1", timeout: float = 3.0) -> str | None:
    """None if the peer is healthy, else a one-line reason."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
            text = response.read().decode(errors="replace")
    except OSError as e:
        return f"metrics endpoint on port {port} does not answer: {e}"
    if gauge is not None:
        value = gauge_value(text, gauge)
        if value is None or not value > 0:
            return f"gauge {gauge} is {value}, expected > 0"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python docker/healthcheck.py", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True, help="the peer's --metrics-port")
    p.add_argument("--gauge", default=None, help="also require this gauge to be > 0")
    args = p.parse_args(argv)
    reason = check(args.port, args.gauge)
    if reason:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
