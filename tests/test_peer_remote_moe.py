"""RemoteExpert / RemoteMixtureOfExperts against expert servers in real processes.

* the remote layer computes exactly what the same experts compute locally (outputs, input and gate grads);
* it plugs into MoETransformer as ``make_moe``;
* a server SIGKILLed mid-training (between forward and backward) never yields NaN, and the layer carries
  on with the surviving experts; with ``on_failure="raise"`` the error names the failed experts.
"""
import json
import logging
import time

import pytest
import torch

from dht import DHT
from p2p import NodeConfig
from peer.moe.experts import create_expert
from peer.moe.gating import all_uids
from peer.config import ModelConfig
from peer.moe.local import LocalMixtureOfExperts
from peer.training.model import MoETransformer
from peer.moe.remote import NotEnoughExpertsError, RemoteExpert, RemoteMixtureOfExperts

HIDDEN, GRID, PREFIX = 16, (2, 2), "ffn0"  # "ffn0" = ModelConfig(expert_type="ffn").uid_prefix(0)
UIDS = all_uids(PREFIX, GRID)  # ffn0.0.0, ffn0.0.1 on server A; ffn0.1.0, ffn0.1.1 on server B

SERVER = r"""
import json, sys, torch
torch.set_num_threads(1)
from p2p import NodeConfig, setup_logging
setup_logging("INFO")
from dht import DHT
from peer.hosting.config import HostingConfig
from peer.hosting.server import ExpertServer, create_experts
cfg = json.loads(%r)
dht = DHT(initial_peers=cfg["peers"])
frozen = {"optimizer_factory": lambda params: torch.optim.SGD(params, lr=0.0)} if cfg["frozen"] else {}
experts = create_experts("ffn", cfg["uids"], cfg["hidden"], seed=cfg["seed"], **frozen)
server = ExpertServer(dht, experts, HostingConfig(heartbeat=1.0, expiration=30.0))
print("ADDR", dht.addrs[0], flush=True)
sys.stdin.read()
server.shutdown()
dht.shutdown()
"""


def start_servers(launch, frozen, client_mode=True):
    """Servers A and B (started in parallel) and a DHT that knows both (a full node if not client_mode)."""
    procs = [launch(SERVER % json.dumps(dict(peers=[], uids=UIDS[2 * i: 2 * i + 2], hidden=HIDDEN, seed=2 * i,
                                             frozen=frozen)))
             for i in range(2)]
    for proc in procs:
        proc.maddr = proc.expect("ADDR ", timeout=90)
        proc.peer_id = proc.maddr.rsplit("/", 1)[1]
    client = DHT(initial_peers=[p.maddr for p in procs], node_config=NodeConfig(client_mode=client_mode))
    return procs, client


def reference_experts():
    """Local copies of the servers' experts (same seeds: expert i is built after torch.manual_seed(i))."""
    out = []
    for i in range(len(UIDS)):
        torch.manual_seed(i)
        out.append(create_expert("ffn", HIDDEN))
    return out


@pytest.fixture(scope="module")
def frozen_swarm(module_python_process):
    procs, client = start_servers(module_python_process, frozen=True)
    yield procs, client
    client.shutdown()


def test_remote_layer_equals_the_same_experts_run_locally(frozen_swarm):
    procs, client = frozen_swarm
    torch.manual_seed(42)
    remote = RemoteMixtureOfExperts(HIDDEN, GRID, client, PREFIX + ".", k_best=2)
    local = LocalMixtureOfExperts(HIDDEN, GRID, 2, prefix=PREFIX)
    local.gate.load_state_dict(remote.gate.state_dict())
    for module, reference in zip(local.experts, reference_experts()):
        module.load_state_dict(reference.state_dict())
    for step in range(3):  # the servers' optimizers have lr=0, so every step sees the same experts
        x = torch.randn(12, HIDDEN)
        x_remote, x_local = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_remote, y_local = remote(x_remote), local(x_local)
        assert torch.allclose(y_remote, y_local, atol=1e-5), step
        assert remote.mask.all() and not remote.last_failures
        assert torch.allclose(remote.aux_loss, local.aux_loss, atol=1e-6)
        (y_remote * torch.arange(HIDDEN)).sum().backward()
        (y_local * torch.arange(HIDDEN)).sum().backward()
        assert torch.allclose(x_remote.grad, x_local.grad, atol=1e-5)
        for p_remote, p_local in zip(remote.gate.parameters(), local.gate.parameters()):
            assert torch.allclose(p_remote.grad, p_local.grad, atol=1e-5)
        remote.zero_grad(), local.zero_grad()
    assert remote.directory.lookups <= 3  # one root lookup per second at most


def test_remote_expert_module_forward_and_backward(frozen_swarm):
    procs, client = frozen_swarm
    expert = RemoteExpert(UIDS[3], procs[1].peer_id, client.node)
    reference = reference_experts()[3]
    x = torch.randn(5, HIDDEN, requires_grad=True)
    x_local = x.detach().clone().requires_grad_(True)
    y, y_local = expert(x), reference(x_local)
    assert torch.allclose(y, y_local, atol=1e-5)
    y.pow(2).sum().backward()
    y_local.pow(2).sum().backward()
    assert torch.allclose(x.grad, x_local.grad, atol=1e-5)
    assert expert.info()["update_count"] >= 1


def test_remote_experts_train_even_when_the_input_needs_no_grad(frozen_swarm):
    procs, client = frozen_swarm
    experts = [RemoteExpert(uid, procs[i // 2].peer_id, client.node) for i, uid in enumerate(UIDS)]
    before = [expert.info()["update_count"] for expert in experts]
    remote = RemoteMixtureOfExperts(HIDDEN, GRID, client, PREFIX, k_best=2)
    remote(torch.randn(8, HIDDEN)).sum().backward()  # x does not require grad; the gate does
    after = [expert.info()["update_count"] for expert in experts]
    assert sum(a - b for a, b in zip(after, before)) >= 2 and all(a - b in (0, 1) for a, b in zip(after, before))


def test_remote_layer_plugs_into_moe_transformer(frozen_swarm):
    procs, client = frozen_swarm
    config = ModelConfig.tiny(n_layer=1, n_embd=HIDDEN, n_head=2, block_size=8, grid_size=GRID, k=2)
    model = MoETransformer(config, lambda layer, cfg: RemoteMixtureOfExperts(
        cfg.n_embd, cfg.grid_size, client, cfg.uid_prefix(layer), k_best=cfg.k))
    assert model.expert_parameters() == [] and len(model.dense_parameters()) == len(list(model.parameters()))
    idx = torch.randint(0, config.vocab_size, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and model.last_aux_loss > 0
    assert model.blocks[0].moe.gate.projections[0].weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_server_killed_mid_training_never_gives_nan(python_process, caplog):
    # the client is a full DHT node, so B's declarations outlive B (until they expire) as in a real swarm
    procs, client = start_servers(python_process, frozen=False, client_mode=False)
    try:
        time.sleep(1.5)  # a heartbeat of each server has replicated its declarations to the client
        torch.manual_seed(0)
        moe = RemoteMixtureOfExperts(HIDDEN, GRID, client, PREFIX, k_best=2, k_min=1, on_failure="mask",
                                     forward_timeout=5.0, backward_timeout=5.0, blacklist_seconds=60.0)
        optimizer = torch.optim.SGD(moe.parameters(), lr=0.1)

        def step(kill_before_backward=False):
            x = torch.randn(32, HIDDEN, requires_grad=True)
            y = moe(x)
            assert torch.isfinite(y).all()
            if kill_before_backward:
                procs[1].proc.kill()
                procs[1].proc.wait()
            y.pow(2).mean().backward()
            assert torch.isfinite(x.grad).all()
            assert all(torch.isfinite(p.grad).all() for p in moe.parameters())
            optimizer.step()
            optimizer.zero_grad()
            return y

        step()
        assert moe.mask.all() and not moe.last_failures
        with caplog.at_level(logging.WARNING, logger="peer.moe.remote"):
            step(kill_before_backward=True)  # B's experts fail in backward: zero gradient, logged
        assert any("failed in backward" in r.message and "ffn0.1." in r.message for r in caplog.records)
        for _ in range(2):  # B's experts failed, so they are blacklisted: only A's are chosen
            step()
            assert moe.mask.all() and not moe.last_failures

        fresh = RemoteMixtureOfExperts(HIDDEN, GRID, client, PREFIX, k_best=2, k_min=1, on_failure="mask")
        fresh.gate.load_state_dict(moe.gate.state_dict())
        with torch.no_grad():
            fresh.gate.projections[0].bias.copy_(torch.tensor([-50.0, 50.0]))  # every sample picks ffn0.1.*
        y = fresh(torch.randn(64, HIDDEN))  # B is still declared in the DHT: its calls fail in forward
        assert sorted(f.split("@")[0] for f in fresh.last_failures) == ["ffn0.1.0", "ffn0.1.1"]
        assert not fresh.mask.any() and (y == 0).all()

        strict = RemoteMixtureOfExperts(HIDDEN, GRID, client, PREFIX, k_best=2, k_min=2, forward_timeout=5.0)
        with pytest.raises(NotEnoughExpertsError, match=r"of 64 samples got fewer than k_min=2 .*ffn0\.1\."):
            strict(torch.randn(64, HIDDEN))
    finally:
        client.shutdown()
