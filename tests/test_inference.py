"""Inference: the KV cache, model files (exact and int8), generation from a live swarm, a host dying mid-text,
the CLI, bad input, and forward requests served ahead of backward ones."""
from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch

from averaging.state_format import tensors_digest
import trio

from dht import DHT
from peer.config import ModelConfig
from peer.hosting.backend import ExpertBackend
from peer.hosting.batching import ExpertBatcher
from peer.inference.language_model import LanguageModel
from peer.inference.model_file import ModelFileError, load_model, save_model
from peer.inference.swarm import SwarmUnavailable, export_model
from peer.moe.experts import create_expert
from peer.training.model import KVCache, MoETransformer
from testbed.common import REPO_ROOT, Worker
from testbed.tiny_model import train_briefly


pytestmark = pytest.mark.usefixtures("single_thread")


def random_model(seed: int = 0, **overrides) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig.tiny(**overrides)).eval()


def test_the_cache_gives_the_logits_and_greedy_tokens_of_full_recomputation():
    model = random_model()
    idx = torch.randint(0, 256, (3, 20))
    cache = KVCache()
    first, _ = model(idx[:, :7], cache=cache)
    rest = [model(idx[:, i:i + 1], cache=cache)[0] for i in range(7, 20)]
    full, _ = model(idx)
    assert cache.length == 20
    assert torch.allclose(torch.cat([first, *rest], dim=1), full, atol=1e-5)
    # greedy decoding within the context and well past it (block 64): the same tokens either way
    for new in (30, 200):
        with_cache = model.generate(idx[:, :5], new, temperature=0, use_cache=True)
        without = model.generate(idx[:, :5], new, temperature=0, use_cache=False)
        assert with_cache.shape == (3, 5 + new) and torch.equal(with_cache, without)
    full_cache = KVCache()
    model(torch.zeros(1, 64, dtype=torch.long), cache=full_cache)
    with pytest.raises(ValueError, match="64 cached"):        # the context is full: no position is left
        model(torch.zeros(1, 1, dtype=torch.long), cache=full_cache)


def test_past_the_context_the_model_restarts_on_the_last_half():
    model = random_model()
    block, keep = model.config.block_size, model.config.block_size // 2
    assert [model.context_start(n) for n in (1, block)] == [0, 0]
    assert model.context_start(block + 1) == block + 1 - keep                     # restart on the last half
    assert model.context_start(block + 2) == block + 1 - keep                     # then it grows again
    starts = [model.context_start(n) for n in range(1, 5 * block)]
    assert all(keep <= n - s <= block for n, s in zip(range(1, 5 * block), starts) if n > block)
    # a generation past the context runs the model on no more than block_size positions at once
    seen = []  # positions the model covers on each call: cached ones plus the new ones

    def covered(module, args, kwargs):
        cache = kwargs.get("cache")
        seen.append((cache.length if cache is not None else 0) + args[0].shape[1])

    model.register_forward_pre_hook(covered, with_kwargs=True)
    model.generate(torch.zeros(1, 1, dtype=torch.long), 3 * block, temperature=1.0)
    assert max(seen) == block and len(seen) == 3 * block


def test_sampling_is_reproducible_and_top_k_holds():
    model = random_model()
    idx = torch.randint(0, 256, (2, 4))
    a = model.generate(idx, 20, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(idx, 20, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    logits, _ = model(idx)
    allowed = torch.topk(logits[:, -1], 1).indices
    greedy1 = model.generate(idx, 1, temperature=1.0, top_k=1)
    assert torch.equal(greedy1[:, -1:], allowed)
    with pytest.raises(ValueError):
        model.generate(idx, 1, temperature=-1)


def test_export_then_load_is_exact_and_int8_stays_within_one_percent(tmp_path):
    model = random_model()
    held = train_briefly(model, 60)
    exact = save_model(tmp_path / "fp32.pt", model, meta={"step": 7})
    small = save_model(tmp_path / "int8.pt", model, quantize="int8")
    loaded, meta = load_model(exact)
    assert meta == {"step": 7}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # still tied
    fp32, int8 = LanguageModel.from_file(exact, "cpu"), LanguageModel.from_file(small, "cpu")
    assert fp32.generate("The ", 40, temperature=0) == LanguageModel(model).generate("The ", 40, temperature=0)
    loss32, loss8 = fp32.loss(held, 128), int8.loss(held, 128)
    assert loss32 < 4.5, "the model should have learned something"
    assert abs(loss8 - loss32) <= 0.01 * loss32, (loss32, loss8)
    assert exact.stat().st_size >= 3.5 * small.stat().st_size, (exact.stat().st_size, small.stat().st_size)


def test_bad_input_gets_clear_errors(tmp_path):
    lm = LanguageModel(random_model(vocab_size=128))
    with pytest.raises(ValueError, match="empty"):
        lm.generate("", 5)
    with pytest.raises(ValueError, match="vocabulary"):
        lm.generate("café", 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate("hi", -1)
    assert lm.generate("hi", 0) == ""
    # a file of another config: its weights do not fit what it says
    model = random_model()
    path = save_model(tmp_path / "m.pt", model)
    payload = torch.load(path, weights_only=True)
    payload["config"]["n_embd"] = 128
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="do not fit its config"):
        load_model(tmp_path / "other.pt")
    torch.save({"model": model.state_dict()}, tmp_path / "trainer.pt")   # e.g. a trainer's checkpoint
    with pytest.raises(ModelFileError, match="peer export"):
        load_model(tmp_path / "trainer.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="not a model file"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    cli = subprocess.run([sys.executable, "-m", "peer", "generate", "--checkpoint", str(tmp_path / "junk.pt"),
                          "--prompt", "hi"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stderr.startswith("error: ") and "Traceback" not in cli.stderr


def test_generate_from_a_checkpoint_on_the_command_line(tmp_path):
    model = random_model()
    path = save_model(tmp_path / "m.pt", model)
    expected = LanguageModel(model).generate("Hello", 30, temperature=0)
    out = subprocess.run([sys.executable, "-m", "peer", "generate", "--checkpoint", str(path), "--prompt", "Hello",
                          "--max-new-tokens", "30", "--temperature", "0", "--device", "cpu"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Hello" + expected + "\n"


def test_forward_requests_go_ahead_of_queued_backward_ones():
    backend = ExpertBackend("e", create_expert("ffn", 16), device="cpu")
    order = []
    original = backend.forward, backend.backward
    backend.forward = lambda x: (order.append("forward"), time.sleep(0.05), original[0](x))[-1]
    backend.backward = lambda x, g: (order.append("backward"), original[1](x, g))[-1]

    async def main():
        batcher = ExpertBatcher(backend, 4096, 0.0, trio.CapacityLimiter(1), {"batches": 0, "rows": 0, "compute_s": 0})
        x = torch.randn(2, 16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.run)
            nursery.start_soon(batcher.submit, "forward", x)              # occupies the expert for 50 ms
            await trio.sleep(0.01)
            nursery.start_soon(batcher.submit, "backward", x, torch.ones(2, 16))  # queued first ...
            await trio.sleep(0.01)
            nursery.start_soon(batcher.submit, "forward", x[:1])         # ... served second
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    trio.run(main)
    assert order == ["forward", "forward", "backward"]


# ---------------------------------------------------------------------------------------- through the swarm
@pytest.fixture
def inference_swarm(tmp_path):
    """A bootstrap (this process), two expert hosts (real processes) serving a file's experts half each, the
    first also offering its dense state; yields (dht, model file, hosts)."""
    model = random_model(seed=1)
    path = save_model(tmp_path / "m.pt", model)
    dht = DHT()
    hosts = [Worker([sys.executable, "-m", "testbed.inference_host", "--bootstrap", dht.addrs[0], "--model-file",
                     str(path), "--shard", f"{i}/2", *(["--share-state"] if i == 0 else [])], tmp_path / f"host{i}.log")
             for i in range(2)]
    try:
        for host in hosts:
            host.wait_ready(90)
        yield dht, path, hosts
    finally:
        for host in hosts:
            host.kill()
        dht.shutdown()


@pytest.mark.slow
def test_the_swarm_generates_what_the_file_does_and_survives_a_host_dying(inference_swarm, tmp_path, caplog):
    dht, path, hosts = inference_swarm
    local = LanguageModel.from_file(path, "cpu")
    swarm = LanguageModel.from_swarm(dht, timeout=30)
    assert swarm.meta["step"] == 1
    assert swarm.generate("Hello", 40, temperature=0) == local.generate("Hello", 40, temperature=0)
    # export through the CLI gives back the very same weights
    out = subprocess.run([sys.executable, "-m", "peer", "export", "--initial-peers", dht.addrs[0], "--out",
                          str(tmp_path / "exported.pt"), "--timeout", "20"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    exported, meta = load_model(tmp_path / "exported.pt")
    original, _ = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), original.state_dict().values()))
    assert len(meta["experts"]) == 2 * 16 and meta["step"] == 1
    # the file names the state it holds by the hash its donor announced (what trainers check downloads against)
    assert meta["state_hash"] == tensors_digest([p.detach() for p in original.dense_parameters()])
    # one donor and nobody else vouching for its state: refused when confirmations are asked for
    refused = subprocess.run([sys.executable, "-m", "peer", "export", "--initial-peers", dht.addrs[0], "--out",
                              str(tmp_path / "refused.pt"), "--timeout", "20", "--state-confirmations", "1"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "no state of" in refused.stderr and "is confirmed" in refused.stderr, \
        refused.stderr
    assert not (tmp_path / "refused.pt").exists()
    # one host dies mid-generation: the rows re-route to the other host's experts, no NaN, no crash
    caplog.set_level(logging.INFO, logger="peer.moe.remote")
    pieces = []
    for i, piece in enumerate(swarm.stream("Once upon", 60, temperature=0)):
        pieces.append(piece)
        if i == 10:
            hosts[1].kill()
    assert len("".join(pieces).encode("utf-8", "replace")) >= 50
    assert any("Re-routing" in r.message for r in caplog.records)
    logits, _ = swarm.model(torch.tensor([list(b"Once upon a time")]))
    assert torch.isfinite(logits).all()
    # now half the grid has no host: export names the cells nobody serves
    with pytest.raises(SwarmUnavailable, match="served by nobody"):
        export_model(dht, timeout=3)


def test_the_main_job_shows_what_trainers_write(capsys):
    """``python -m peer.swarm`` echoes a trainer's "sample at step" log lines (Trainer.sample) as it prints losses."""
    import io
    import threading
    from types import SimpleNamespace

    from peer.app.swarm import _echo_losses

    lines = ["12:00:01 INFO peer.training.trainer: sample at step 200: 'The the the'\n",
             "12:00:02 INFO peer.training.trainer: step 200: train loss 2.500, eval loss 2.400, 9 samples\n"]
    _echo_losses(SimpleNamespace(stderr=io.StringIO("".join(lines)), name="trainer0", ready=threading.Event()))
    out = capsys.readouterr().out
    assert "trainer0: step  200  writes 'The the the'" in out and "eval loss 2.400" in out
