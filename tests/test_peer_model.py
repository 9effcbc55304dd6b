"""Tests for peer.training.model: config presets, the local mixture of experts and the MoE transformer."""

import itertools

import pytest
import torch
from torch import nn

from peer.training.data import ByteDataset, batches, eval_batches, load_corpus
from peer.config import ModelConfig
from peer.moe.local import LocalMixtureOfExperts
from peer.training.model import MoETransformer


pytestmark = pytest.mark.usefixtures("single_thread")


def test_config_presets_and_validation():
    tiny, small = ModelConfig.tiny(), ModelConfig.small()
    assert tiny.vocab_size == 256 and tiny.n_layer == 2 and 64 <= tiny.n_embd <= 128 and tiny.block_size == 64
    assert small.n_layer == 6 and small.n_embd == 384 and small.block_size == 256
    assert ModelConfig.preset("tiny", k=1).k == 1
    assert tiny.uid_prefix(1) == "ffn1"
    with pytest.raises(ValueError):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError):
        ModelConfig(grid_size=(2, 2), k=5)
    with pytest.raises(ValueError):
        ModelConfig(dropout=1.0)
    with pytest.raises(ValueError):
        ModelConfig(beam_size=0)


def test_local_moe_matches_brute_force_mixture():
    torch.manual_seed(0)
    grid, k = (3, 4), 2
    moe = LocalMixtureOfExperts(8, grid, k, prefix="ffn0")
    x = torch.randn(10, 8)
    y = moe(x)
    scores = moe.gate(x)
    expected = []
    for b in range(x.shape[0]):
        ranked = sorted(((scores[0][b, i] + scores[1][b, j]).item(), i * grid[1] + j)
                        for i, j in itertools.product(range(grid[0]), range(grid[1])))[-k:]
        weights = torch.softmax(torch.tensor([s for s, _ in ranked]), dim=0)
        expected.append(sum(w * moe.experts[e](x[b:b + 1])[0] for w, (_, e) in zip(weights, ranked)))
    assert torch.allclose(y, torch.stack(expected), atol=1e-5)
    assert moe.uids[5] == "ffn0.1.1"
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad

    y.sum().backward()
    assert all(p.grad is not None for p in moe.gate.parameters())
    with pytest.raises(ValueError):
        LocalMixtureOfExperts(8, grid, k, expert_type="transformer", num_heads=2)


def test_tiny_model_forward_backward():
    torch.manual_seed(0)
    config = ModelConfig.tiny()
    model = MoETransformer(config)
    idx = torch.randint(0, 256, (2, config.block_size))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, config.block_size, 256) and loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isclose(loss, model.last_lm_loss + config.aux_loss_weight * model.last_aux_loss)
    assert model.last_aux_loss > 0
    loss.backward()
    dense, experts = model.dense_parameters(), model.expert_parameters()
    assert all(p.grad is not None for p in dense)
    assert any(p.grad is not None for p in experts)
    assert {id(p) for p in dense}.isdisjoint(id(p) for p in experts)
    assert len(dense) + len(experts) == len(list(model.parameters()))
    assert model.lm_head.weight is model.tok_emb.weight
    gate_ids = {id(p) for block in model.blocks for p in block.moe.gate.parameters()}
    assert gate_ids <= {id(p) for p in dense}

    logits, no_loss = model(idx[:, :5])
    assert logits.shape == (2, 5, 256) and no_loss is None
    assert model.generate(idx[:, :3], max_new_tokens=4).shape == (2, 7)
    for bad in [torch.randint(0, 256, (2, config.block_size + 1)), torch.full((1, 4), 256), idx.float()]:
        with pytest.raises(ValueError):
            model(bad)


def test_causality():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.tiny(block_size=16)).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert torch.allclose(logits[:, :-1], logits_changed[:, :-1], atol=1e-5)


def test_custom_make_moe_contract():
    class Dense(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.net = nn.Linear(width, width)
            self.aux_loss = None

        def forward(self, x):
            return self.net(x)

    config = ModelConfig.tiny(n_layer=1, block_size=8)
    layers = []
    model = MoETransformer(config, lambda layer, cfg: layers.append(layer) or Dense(cfg.n_embd))
    assert layers == [0]
    assert len(model.dense_parameters()) == len(list(model.parameters())) and model.expert_parameters() == []
    idx = torch.randint(0, 256, (2, 8))
    _, loss = model(idx, idx)
    assert torch.isclose(loss, model.last_lm_loss) and model.last_aux_loss == 0

    broken = MoETransformer(config, lambda layer, cfg: nn.Linear(cfg.n_embd, 3))
    with pytest.raises(ValueError, match="MoE layer returned"):
        broken(idx)


def test_training_on_embedded_corpus_reduces_loss():
    torch.manual_seed(0)
    config = ModelConfig.tiny(block_size=32)
    model = MoETransformer(config)
    text = load_corpus()
    train, held_out = ByteDataset(text, 32), ByteDataset(text, 32, split="eval")
    x_eval, y_eval = next(eval_batches(held_out, 32))

    def eval_loss():
        model.eval()
        with torch.no_grad():
            model(x_eval, y_eval)
        model.train()
        return model.last_lm_loss.item()

    before = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _, (x, y) in zip(range(30), batches(train, 8, seed=0)):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert before > 5.0  # about ln(256) at initialisation
    assert after < before - 1.0, (before, after)
