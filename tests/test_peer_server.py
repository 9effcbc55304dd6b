"""ExpertServer in a real process: input validation, batching, DHT declarations/withdrawal, checkpoints + restart.

Also unit tests of the pieces it is built from: the tensor wire format, the DHT key layout and the
atomic checkpoint helpers. Children use one torch thread (the test machine has two cores).
"""
import json
import os
import time

import pytest
import torch

from dht import DHT
from p2p import NodeConfig, RemoteError
from peer.hosting.batching import ExpertBatcher
from peer.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from peer.moe.directory import ExpertDirectory, ancestors, declared_keys, parent_key
from peer.hosting.backend import InvalidInputError
from peer.moe.experts import create_expert
from peer.hosting.config import HostingConfig
from peer.hosting.server import ExpertServer, create_experts
from peer.moe.wire import SERVICE, InvalidTensorMessage, tensor_from_wire, tensor_to_wire

HIDDEN = 16

SERVER = r"""
import json, sys, torch
torch.set_num_threads(1)
from p2p import NodeConfig, setup_logging
setup_logging("INFO")
from dht import DHT
from peer.hosting.config import HostingConfig
from peer.hosting.server import ExpertServer, create_experts
cfg = json.loads(%r)
dht = DHT(initial_peers=cfg.get("peers", []), node_config=NodeConfig(identity_path=cfg.get("identity")))
experts = create_experts("ffn", cfg["uids"], cfg["hidden"], seed=cfg.get("seed", 0), max_batch_size=64)
server = ExpertServer(dht, experts, HostingConfig(
    max_batch_size=cfg.get("max_batch", 64), heartbeat=1.0, expiration=30.0, batch_window_ms=cfg.get("window_ms", 1.0),
    checkpoint_dir=cfg.get("ckpt"), checkpoint_interval=cfg.get("ckpt_interval", 60.0)))
print("ADDR", dht.addrs[0], flush=True)
for line in sys.stdin:
    if line.strip() == "quit":
        break
server.shutdown()
print("STOPPED", flush=True)
dht.shutdown()
"""


def start_server(launch, **cfg):
    cfg.setdefault("uids", ["ffn.0.0"])
    cfg.setdefault("hidden", HIDDEN)
    proc = launch(SERVER % json.dumps(cfg))
    proc.maddr = proc.expect("ADDR ", timeout=60)
    proc.peer_id = proc.maddr.rsplit("/", 1)[1]
    return proc


def quit_server(proc):
    proc.proc.stdin.write(b"quit\n")
    proc.proc.stdin.flush()
    proc.expect("STOPPED", timeout=30)
    proc.proc.wait(timeout=30)


def reference_expert(seed=0, index=0):
    torch.manual_seed(seed + index)
    return create_expert("ffn", HIDDEN)


def call(client, server, method, **args):
    return client.node.call_sync(server.peer_id, SERVICE, method, args, timeout=20)


@pytest.fixture(scope="module")
def server(module_python_process):
    return start_server(module_python_process, window_ms=300.0, max_batch=8)


@pytest.fixture(scope="module")
def client(server):
    dht = DHT(initial_peers=[server.maddr], node_config=NodeConfig(client_mode=True))
    yield dht
    dht.shutdown()


# ------------------------------------------------------------------------------------------ units
def test_tensor_wire_roundtrip_and_rejects_malformed_messages():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.randn(3, 4).to(dtype)
        assert torch.equal(tensor_from_wire(tensor_to_wire(t)), t)
    assert tensor_from_wire(tensor_to_wire(torch.zeros(0, 5))).shape == (0, 5)
    dtype, shape, data = tensor_to_wire(torch.ones(2, 2))
    for bad in (["int64", shape, data], [dtype, [2, 3], data], [dtype, [-1, 2], data], [dtype, shape, "x"],
                [dtype, [True, 4], data], "nope", [dtype, shape]):
        with pytest.raises(InvalidTensorMessage):
            tensor_from_wire(bad)


def test_dht_key_layout_covers_every_prefix():
    assert declared_keys("ffn.3.17") == ["ffn.", "ffn.3.", "ffn.3.17"]
    assert declared_keys("expert.2") == ["expert.", "expert.2"]
    assert parent_key("ffn.3.17") == "ffn.3." and parent_key("ffn.3.") == "ffn." and parent_key("ffn.") == "ffn."
    assert ancestors("ffn.3.17") == ["ffn.3.17", "ffn.3.", "ffn."]
    with pytest.raises(ValueError):
        declared_keys("ffn.x")


def test_checkpoint_is_atomic_and_reports_garbage(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, "ffn.0/1")
    assert path.name == "ffn.0_1.pt" and load_checkpoint(path) is None
    save_checkpoint(path, {"w": torch.arange(3)})
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3))

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3))  # the old file is intact
    assert os.listdir(tmp_path) == [path.name]  # and no temporary file is left behind
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_batcher_batches_requests_and_isolates_a_bad_one():
    import trio
    backend = create_experts("ffn", ["ffn.0.0"], HIDDEN, seed=0)["ffn.0.0"]
    stats = {"batches": 0, "rows": 0, "compute_s": 0.0}
    x, grad = torch.randn(3, HIDDEN), torch.ones(3, HIDDEN)
    results = {}

    async def main():
        batcher = ExpertBatcher(backend, 64, 0.2, trio.CapacityLimiter(1), stats)

        async def one(name, g):
            try:
                results[name] = await batcher.submit("backward", x, g)
            except ValueError as e:
                results[name] = e
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.run)
            async with trio.open_nursery() as requests:
                requests.start_soon(one, "good", grad)
                requests.start_soon(one, "bad", torch.full_like(grad, float("nan")))
            nursery.cancel_scope.cancel()
    trio.run(main)
    assert isinstance(results["bad"], InvalidInputError) and "NaN" in str(results["bad"])
    assert results["good"].shape == x.shape and torch.isfinite(results["good"]).all()
    assert stats["batches"] == 3 and backend.update_count == 1  # one failed batch of 2, then each alone


def test_batcher_keeps_forward_and_backward_requests_apart():
    """A backward queued next to forwards (as a training swarm does) starts its own batch, never crashes."""
    import trio
    backend = create_experts("ffn", ["ffn.0.0"], HIDDEN, seed=0)["ffn.0.0"]
    stats = {"batches": 0, "rows": 0, "compute_s": 0.0}
    x = torch.randn(4, HIDDEN)
    results = {}

    async def main():
        batcher = ExpertBatcher(backend, 64, 0.2, trio.CapacityLimiter(1), stats)

        async def one(name, kind, grad=None):
            results[name] = await batcher.submit(kind, x, grad)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(batcher.run)
                async with trio.open_nursery() as requests:
                    for i, (kind, grad) in enumerate([("backward", torch.ones_like(x)), ("forward", None),
                                                      ("forward", None), ("backward", torch.ones_like(x))]):
                        requests.start_soon(one, f"{kind}{i}", kind, grad)
                        await trio.sleep(0)
                nursery.cancel_scope.cancel()
    trio.run(main)
    assert set(results) == {"backward0", "forward1", "forward2", "backward3"}
    assert all(r.shape == x.shape and torch.isfinite(r).all() for r in results.values())
    assert stats["rows"] == 16 and stats["batches"] >= 2


def test_periodic_checkpoints_and_reload_in_process(tmp_path):
    dht = DHT()
    try:
        experts = create_experts("ffn", ["ffn.0.0"], HIDDEN, seed=0)
        server = ExpertServer(dht, experts, HostingConfig(checkpoint_dir=tmp_path, checkpoint_interval=0.2))
        experts["ffn.0.0"].backward(torch.randn(3, HIDDEN), torch.ones(3, HIDDEN))
        path = checkpoint_path(tmp_path, "ffn.0.0")
        deadline = time.monotonic() + 10
        while not (path.exists() and load_checkpoint(path)["backend"]["update_count"] == 1):
            assert time.monotonic() < deadline, "no periodic checkpoint within 10 s"
            time.sleep(0.05)
        server.shutdown()
        fresh = create_experts("ffn", ["ffn.0.0"], HIDDEN, seed=7)
        assert ExpertServer(dht, fresh, HostingConfig(checkpoint_dir=tmp_path), start=False).load_checkpoints() == 1
        saved, loaded = experts["ffn.0.0"].state_dict(), fresh["ffn.0.0"].state_dict()
        assert loaded["update_count"] == 1
        assert all(torch.equal(saved["module"][k], loaded["module"][k]) for k in saved["module"])
        assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], loaded["optimizer"]["state"][0]["exp_avg"])
        other = create_experts("ffn", ["ffn.0.1"], HIDDEN)
        os.replace(path, checkpoint_path(tmp_path, "ffn.0.1"))  # a file that names another expert
        with pytest.raises(ValueError, match="belongs to 'ffn.0.0'"):
            ExpertServer(dht, other, HostingConfig(checkpoint_dir=tmp_path), start=False).load_checkpoints()
    finally:
        dht.shutdown()


# ------------------------------------------------------------------------------------------ a served expert
def test_bad_inputs_get_clear_remote_errors_and_the_server_keeps_serving(server, client):
    good, wire = torch.randn(4, HIDDEN), tensor_to_wire
    cases = {
        "wrong shape": ({"uid": "ffn.0.0", "x": wire(torch.randn(4, HIDDEN + 1))}, "InvalidInputError", "shape"),
        "wrong dtype": ({"uid": "ffn.0.0", "x": tensor_to_wire(good.double())}, "InvalidInputError", "float32"),
        "oversized batch": ({"uid": "ffn.0.0", "x": tensor_to_wire(torch.randn(9, HIDDEN))}, "InvalidInputError",
                            "max_batch_size=8"),
        "NaN": ({"uid": "ffn.0.0", "x": tensor_to_wire(torch.full((2, HIDDEN), float("nan")))}, "InvalidInputError",
                "NaN"),
        "bytes do not fit": ({"uid": "ffn.0.0", "x": ["float32", [4, HIDDEN], b"1234"]}, "InvalidTensorMessage",
                             "bytes"),
        "unknown expert": ({"uid": "ffn.9.9", "x": tensor_to_wire(good)}, "UnknownExpertUID", "ffn.9.9"),
        "no uid": ({"x": tensor_to_wire(good)}, "InvalidInputError", "uid"),
    }
    for name, (args, remote_type, words) in cases.items():
        with pytest.raises(RemoteError) as info:
            call(client, server, "forward", **args)
        assert info.value.remote_type == remote_type and words in info.value.remote_message, name
    for grad in (torch.randn(4, HIDDEN + 1), torch.randn(3, HIDDEN), torch.full((4, HIDDEN), float("inf"))):
        with pytest.raises(RemoteError) as info:
            call(client, server, "backward", uid="ffn.0.0", x=tensor_to_wire(good), grad=tensor_to_wire(grad))
        assert info.value.remote_type == "InvalidInputError"
    y = tensor_from_wire(call(client, server, "forward", uid="ffn.0.0", x=tensor_to_wire(good))["y"])
    with torch.no_grad():
        assert torch.allclose(y, reference_expert()(good), atol=1e-6)
    info = call(client, server, "info", uid="ffn.0.0")
    assert info["input_shape"] == [HIDDEN] and info["max_batch_size"] == 64 and info["update_count"] == 0


def test_concurrent_requests_are_batched_and_split_back(server, client):
    import trio
    xs = [torch.randn(n, HIDDEN) for n in (1, 2, 3, 2)]  # 8 rows = max_batch_size: one batch
    before = call(client, server, "info")["stats"]
    results = {}

    async def one(i):
        args = {"uid": "ffn.0.0", "x": tensor_to_wire(xs[i])}
        reply = await client.node.call(server.peer_id, SERVICE, "forward", args, timeout=20)
        results[i] = tensor_from_wire(reply["y"])

    async def all_of_them():
        async with trio.open_nursery() as nursery:
            for i in range(len(xs)):
                nursery.start_soon(one, i)
    client.node.run(all_of_them)
    after = call(client, server, "info")["stats"]
    assert after["requests"] - before["requests"] == 4
    assert after["batches"] - before["batches"] <= 2  # the 300 ms window gathers them (1 if all arrive in time)
    with torch.no_grad():
        expert = reference_expert()
        for i, x in enumerate(xs):
            assert torch.allclose(results[i], expert(x), atol=1e-6)


def test_experts_are_declared_under_every_prefix(server, client):
    directory = ExpertDirectory(client, ttl=0.0)
    assert directory.is_alive(["ffn.0.", "ffn.1."]) == ["ffn.0."]
    assert directory.is_alive(["ffn.0.0", "ffn.0.1"]) == ["ffn.0.0"]
    entries = directory.servers(["ffn.0.0"])["ffn.0.0"]
    assert [e.peer_id for e in entries] == [server.peer_id] and server.maddr in entries[0].addrs
    assert directory.is_alive(["ffn.0."], exclude=lambda uid, peer: peer == server.peer_id) == []
    record = client.get("ffn.0.", latest=True)
    assert list(record.value) == [server.peer_id]  # sub-key = the owner's peer ID (signed)


# ------------------------------------------------------------------------------------------ restart
@pytest.mark.slow
def test_checkpointed_experts_come_back_after_restart_and_withdrawal_is_visible(python_process, tmp_path):
    cfg = dict(uids=["ffn.0.0", "ffn.0.1"], identity=str(tmp_path / "id.key"), ckpt=str(tmp_path / "ckpt"))
    first = start_server(python_process, **cfg)
    client = DHT(initial_peers=[first.maddr])  # a full DHT node: it holds replicas of the declarations
    try:
        x = torch.randn(4, HIDDEN)
        for _ in range(3):  # three Adam steps on ffn.0.1
            call(client, first, "backward", uid="ffn.0.1", x=tensor_to_wire(x),
                 grad=tensor_to_wire(torch.ones(4, HIDDEN)))
        trained = tensor_from_wire(call(client, first, "forward", uid="ffn.0.1", x=tensor_to_wire(x))["y"])
        with torch.no_grad():
            assert not torch.allclose(trained, reference_expert(index=1)(x), atol=1e-4)
        directory = ExpertDirectory(client, ttl=0.0)
        assert directory.is_alive(["ffn.0.0", "ffn.0.1"]) == ["ffn.0.0", "ffn.0.1"]
        time.sleep(1.5)  # a heartbeat has replicated the declarations to the client's node by now
        quit_server(first)
        assert sorted(os.listdir(tmp_path / "ckpt")) == ["ffn.0.0.pt", "ffn.0.1.pt"]
        stored = client.get("ffn.0.", latest=True)  # the tombstone, on the node that outlived the server
        assert stored is not None and stored.value[first.peer_id].value["uids"] == []
        assert directory.is_alive(["ffn.0.", "ffn.0.1"]) == []  # withdrawn long before the 30 s expiration

        second = start_server(python_process, peers=[client.addrs[0]], **cfg)
        assert second.peer_id == first.peer_id  # same identity file
        info = call(client, second, "info", uid="ffn.0.1")
        assert info["update_count"] == 3
        restored = tensor_from_wire(call(client, second, "forward", uid="ffn.0.1", x=tensor_to_wire(x))["y"])
        assert torch.equal(restored, trained)
        assert directory.is_alive(["ffn.0.0", "ffn.0.1"]) == ["ffn.0.0", "ffn.0.1"]  # re-declared over the tombstones
    finally:
        client.shutdown()
