"""Generation benchmark: tokens/s locally (fp32, int8) and through the swarm, the KV cache's cost by position,
concurrent clients, and what int8 costs in loss and saves in bytes.

    python bench/generate.py [--train-steps 300] [--tokens 128] [--clients 8] [--json]

1. Trains the tiny preset on the embedded corpus for ``--train-steps`` AdamW steps (so the losses mean
   something), saves it as an fp32 and an int8 model file (``fp32_file_bytes``, ``int8_file_bytes``) and
   measures both files' held-out loss (``fp32_loss``, ``int8_loss``: nats per byte on the corpus' eval split).
2. ``local_fp32`` / ``local_int8``: greedy generation of ``--tokens`` bytes from each file on this CPU
   (one intra-op thread), ``{tokens_per_s, ms_per_token}``.
3. ``position_cost_ratio``: with the KV cache, one token's forward pass at the end of the context
   (position ``block_size - 1``) over one at position 16 (median of many; goal <= 1.5).
4. ``swarm``: two expert hosts (``testbed/inference_host.py``, real processes on loopback) serve half the
   experts each, one also offers the dense state; a client process generates as ``python -m peer generate``
   does. ``swarm_vs_local`` is its tokens/s over ``local_fp32``'s (goal >= 0.5).
5. ``concurrency_speedup``: ``--clients`` client processes generate at once; their aggregate tokens/s over
   one client's alone (goal >= 4: the hosts batch the clients' rows together).

The last line is one JSON object with those keys.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dht import DHT  # noqa: E402
from peer.inference.language_model import LanguageModel  # noqa: E402
from peer.inference.model_file import save_model  # noqa: E402
from peer.training.model import KVCache, MoETransformer  # noqa: E402
from testbed.common import Worker, print_json  # noqa: E402
from testbed.tiny_model import trained_tiny  # noqa: E402


def speed(lm: LanguageModel, tokens: int) -> dict:
    lm.generate("The ", 4, temperature=0)
    t0 = time.perf_counter()
    lm.generate("The ", tokens, temperature=0)
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": round(tokens / seconds, 2), "ms_per_token": round(1000 * seconds / tokens, 3)}


@torch.no_grad()
def position_cost(model: MoETransformer, position: int, reps: int = 200) -> float:
    """Median seconds of one cached forward step of one token at ``position``."""
    cache = KVCache()
    model(torch.zeros(1, position, dtype=torch.long), cache=cache)
    layers, times = list(cache.layers), []
    token = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(reps):
        cache.layers, cache.length = list(layers), position
        t0 = time.perf_counter()
        model(token, cache=cache)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_clients(bootstrap: str, n: int, tokens: int, workdir: Path) -> list[dict]:
    """``n`` client processes (``testbed/generate_client.py``) that start generating at the same moment."""
    clients = [Worker([sys.executable, "-m", "testbed.generate_client", "--bootstrap", bootstrap,
                       "--tokens", str(tokens)], workdir / f"clients{n}-{i}.log", env={"OMP_NUM_THREADS": "1"})
               for i in range(n)]
    try:
        for c in clients:
            c.wait_ready(120)
        start_at = time.time() + 0.5
        ids = [c.send("go", start_at=start_at) for c in clients]
        return [c.receive(rid, 300) for c, rid in zip(clients, ids)]
    finally:
        for c in clients:
            c.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--tokens", type=int, default=128, help="bytes each measurement generates")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the concurrency measurement")
    p.add_argument("--json", action="store_true", help="print the result indented (it is the last line anyway)")
    args = p.parse_args()
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    model, held = trained_tiny(args.train_steps)
    fp32_path = save_model(workdir / "fp32.pt", model)
    int8_path = save_model(workdir / "int8.pt", model, quantize="int8")
    fp32, int8 = LanguageModel.from_file(fp32_path, "cpu"), LanguageModel.from_file(int8_path, "cpu")
    result = {"fp32_loss": round(fp32.loss(held, 256), 4), "int8_loss": round(int8.loss(held, 256), 4),
              "fp32_file_bytes": fp32_path.stat().st_size, "int8_file_bytes": int8_path.stat().st_size}
    result["int8_size_ratio"] = round(result["fp32_file_bytes"] / result["int8_file_bytes"], 3)
    result["int8_loss_change"] = round(result["int8_loss"] / result["fp32_loss"] - 1, 5)
    result["local_fp32"], result["local_int8"] = speed(fp32, args.tokens), speed(int8, args.tokens)
    block = model.config.block_size
    result["position_cost_ratio"] = round(position_cost(fp32.model, block - 1) / position_cost(fp32.model, 16), 3)
    dht = DHT()
    hosts = [Worker([sys.executable, "-m", "testbed.inference_host", "--bootstrap", dht.addrs[0], "--model-file",
                     str(fp32_path), "--shard", f"{i}/2", *(["--share-state"] if i == 0 else [])],
                    workdir / f"host{i}.log", env={"OMP_NUM_THREADS": "1"}) for i in range(2)]
    try:
        for h in hosts:
            h.wait_ready(120)
        (one,) = run_clients(dht.addrs[0], 1, args.tokens, workdir)
        single = one["tokens"] / one["seconds"]
        result["swarm"] = {"tokens_per_s": round(single, 2), "ms_per_token": round(1000 / single, 3)}
        result["swarm_vs_local"] = round(single / result["local_fp32"]["tokens_per_s"], 3)
        many = run_clients(dht.addrs[0], args.clients, args.tokens, workdir)
        aggregate = sum(r["tokens"] for r in many) / max(r["seconds"] for r in many)
        result["concurrent_tokens_per_s"] = round(aggregate, 2)
        result["concurrency_speedup"] = round(aggregate / single, 3)
        result["swarm_matches_local"] = one["text"] == fp32.generate("The ", args.tokens, temperature=0)
    finally:
        for h in hosts:
            h.kill()
        dht.shutdown()
    print_json(result, indent=2 if args.json else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
