"""One generate client of ``bench/generate.py``: joins the swarm in client mode, generates, reports its speed.

    python -m testbed.generate_client --bootstrap MADDR --tokens 64

Prints one JSON line ``{"ready": true}`` once it has the model (a :class:`testbed.common.Worker`), then answers
one request ``{"id", "cmd": "go", "start_at": unix time}``: waits until then (so that clients start together),
generates ``--tokens`` bytes greedily and replies ``{"id", "tokens", "seconds", "text"}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dht import DHT  # noqa: E402
from p2p import NodeConfig  # noqa: E402
from peer.inference.language_model import LanguageModel  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", default="The ")
    args = p.parse_args()
    torch.set_num_threads(1)
    dht = DHT(initial_peers=[args.bootstrap], node_config=NodeConfig(client_mode=True))
    lm = LanguageModel.from_swarm(dht, timeout=30)
    lm.generate(args.prompt, 4, temperature=0)  # warm up connections and the expert directory
    print(json.dumps({"ready": True}), flush=True)
    request = json.loads(sys.stdin.readline())
    time.sleep(max(0.0, request["start_at"] - time.time()))
    t0 = time.perf_counter()
    text = lm.generate(args.prompt, args.tokens, temperature=0)
    print(json.dumps({"id": request["id"], "tokens": args.tokens, "seconds": time.perf_counter() - t0,
                      "text": text}), flush=True)
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
