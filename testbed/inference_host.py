"""One expert host of an inference swarm, serving the experts of an exported model file.

    python -m testbed.inference_host --bootstrap MADDR --model-file model.pt --shard 0/2 [--share-state]

Hosts every ``shard``-th expert of the file's grids (its trained weights) with a real
:class:`~peer.hosting.server.ExpertServer`; with ``--share-state`` it also offers the file's dense state under
the training prefix, as a trainer would, so ``LanguageModel.from_swarm`` finds one. Prints one JSON line
(``peer_id``, ``uids``, ``addrs``) when serving, then serves until stdin closes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dht import DHT  # noqa: E402
from peer.config import training_prefix  # noqa: E402
from peer.hosting.backend import ExpertBackend  # noqa: E402
from peer.hosting.config import HostingConfig  # noqa: E402
from peer.hosting.server import ExpertServer  # noqa: E402
from peer.inference.model_file import load_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--model-file", required=True)
    p.add_argument("--shard", default="0/1", help="I/N: host experts I, I+N, I+2N, ... of each layer")
    p.add_argument("--share-state", action="store_true", help="also offer the dense state under --swarm/--model")
    p.add_argument("--swarm", default="default")
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch-window-ms", type=float, default=0.0)
    args = p.parse_args()
    shard, shards = (int(x) for x in args.shard.split("/"))
    model, _ = load_model(args.model_file)
    dht = DHT(initial_peers=[args.bootstrap])
    experts = {}
    for block in model.blocks:
        for i, (uid, module) in enumerate(zip(block.moe.uids, block.moe.experts)):
            if i % shards == shard:
                experts[uid] = ExpertBackend(uid, module, device="cpu")
    server = ExpertServer(dht, experts, HostingConfig(batch_window_ms=args.batch_window_ms, heartbeat=2.0,
                                                      expiration=10.0))
    sharer = None
    if args.share_state:
        from averaging.state import StateSharer
        tensors = [t.detach().clone() for t in model.dense_parameters()]
        metadata = {"step": 1, "samples": 0, "model": args.model, "sync": "diloco"}
        sharer = StateSharer(dht, training_prefix(args.swarm, args.model, "diloco"), lambda: (metadata, tensors),
                             announce_interval=2.0)
        sharer.refresh(force=True)
    print(json.dumps({"peer_id": dht.peer_id, "uids": sorted(experts), "addrs": dht.addrs}), flush=True)
    try:
        for _ in sys.stdin:
            pass
    finally:
        if sharer is not None:
            sharer.shutdown()
        server.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
