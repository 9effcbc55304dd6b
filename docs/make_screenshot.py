"""Regenerate docs/dashboard.png, the README's picture of the dashboard: a live local swarm in headless Chromium.

    python docs/make_screenshot.py            # about a minute; needs Debian's chromium and chromium-driver

It runs ``python -m peer.swarm`` (a bootstrap, one expert host, two trainers), waits until the trainers
have averaged a few rounds, takes the screenshot and stores it as a small palette PNG.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.dashboard_check import LocalSwarm, browse, chromium_paths  # noqa: E402


def main() -> int:
    if chromium_paths() is None:
        print("error: install Debian's chromium and chromium-driver first", file=sys.stderr)
        return 1
    out = ROOT / "docs" / "dashboard.png"
    with LocalSwarm("--trainers", "2", "--expert-hosts", "1", "--samples", "2000", "--local-steps", "5") as swarm:
        swarm.wait_api("rounds", lambda r: r["ok"] >= 8, timeout=300)
        seen = browse(swarm.url, out, min_peers=4)
    from PIL import Image

    with Image.open(out) as image:
        image.convert("RGB").quantize(colors=64).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1000} kB): {seen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
