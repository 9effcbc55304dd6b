"""Tests for peer.moe.experts (registry, built-in experts) and peer.hosting.backend (training, validation)."""

import copy
import threading

import pytest
import torch
from torch import nn

from peer.hosting.backend import ExpertBackend, InvalidInputError, NonFiniteGradientError
from peer.moe import experts
from peer.moe.experts import UnknownExpertError, create_expert, expert_names, pick_device, register_expert


def test_builtin_experts_are_registered_and_keep_shapes():
    assert {"ffn", "transformer"} <= set(expert_names())
    ffn = create_expert("ffn", 16)
    x = ffn.sample_input(5)
    assert x.shape == (5, 16) and x.dtype == torch.float32
    assert ffn(x).shape == (5, 16)
    assert sum(p.numel() for p in ffn.parameters()) == 16 * 64 + 64 + 64 * 16 + 16

    block = create_expert("transformer", 16, num_heads=2, max_seq_len=32)
    x = block.sample_input(3, seq_len=7)
    assert x.shape == (3, 7, 16) and block(x).shape == (3, 7, 16)
    assert block.sample_input(2).shape == (2, block.default_seq_len, 16)
    with pytest.raises(ValueError):
        block.sample_input(1, seq_len=33)


def test_transformer_expert_is_causal_by_default():
    torch.manual_seed(0)
    block = create_expert("transformer", 8, num_heads=2)
    x = block.sample_input(1, seq_len=6)
    changed = x.clone()
    changed[:, -1] += 1.0
    y, y_changed = block(x), block(changed)
    assert torch.allclose(y[:, :-1], y_changed[:, :-1], atol=1e-6)
    assert not torch.allclose(y[:, -1], y_changed[:, -1])


def test_registry_rejects_unknown_and_duplicate_names():
    with pytest.raises(UnknownExpertError):
        create_expert("no-such-expert", 8)
    with pytest.raises(ValueError):
        register_expert("ffn")(lambda hidden_dim: None)
    with pytest.raises(ValueError):
        create_expert("ffn", 0)


def test_custom_expert_registration(monkeypatch):
    monkeypatch.setattr(experts, "_REGISTRY", dict(experts._REGISTRY))  # keep the global registry clean

    class Scale(nn.Module):
        def __init__(self, hidden_dim):
            super().__init__()
            self.hidden_dim = hidden_dim
            self.weight = nn.Parameter(torch.ones(hidden_dim))

        def forward(self, x):
            return x * self.weight

        def sample_input(self, batch_size, seq_len=None):
            return torch.randn(batch_size, self.hidden_dim)

    register_expert("test-scale")(Scale)
    assert "test-scale" in expert_names()
    assert isinstance(create_expert("test-scale", 4), Scale)

    register_expert("test-no-sample")(lambda hidden_dim: nn.Linear(hidden_dim, hidden_dim))
    with pytest.raises(TypeError):
        create_expert("test-no-sample", 4)


@pytest.mark.parametrize("name,kwargs,shape", [("ffn", {}, (6, 12)), ("transformer", {"num_heads": 3}, (2, 5, 12))])
def test_backend_backward_matches_autograd_and_updates_weights(name, kwargs, shape):
    torch.manual_seed(1)
    module = create_expert(name, 12, **kwargs)
    reference = copy.deepcopy(module)
    backend = ExpertBackend("e.0.0", module, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1), device="cpu")
    x, grad_y = torch.randn(*shape), torch.randn(*shape)

    y = backend.forward(x)
    assert torch.allclose(y, reference(x), atol=1e-6)
    assert not y.requires_grad

    x_ref = x.clone().requires_grad_(True)
    reference(x_ref).backward(grad_y)
    grad_x = backend.backward(x, grad_y)
    assert torch.allclose(grad_x, x_ref.grad, atol=1e-5)

    # one SGD step: w <- w - 0.1 * grad
    for p_new, p_ref in zip(module.parameters(), reference.parameters()):
        assert torch.allclose(p_new, p_ref - 0.1 * p_ref.grad, atol=1e-6)
    assert backend.update_count == 1
    assert not torch.allclose(backend.forward(x), y)


def test_backend_clips_gradients():
    torch.manual_seed(2)
    module = nn.Linear(4, 4)
    module.sample_input = lambda batch_size, seq_len=None: torch.randn(batch_size, 4)
    before = [p.detach().clone() for p in module.parameters()]
    backend = ExpertBackend("lin", module, optimizer_factory=lambda p: torch.optim.SGD(p, lr=1.0),
                            max_grad_norm=0.01, device="cpu")
    backend.backward(torch.randn(8, 4), 100 * torch.randn(8, 4))
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(module.parameters(), before)])
    assert step.norm().item() == pytest.approx(0.01, rel=1e-3)


def test_validate_input_rejects_bad_requests():
    backend = ExpertBackend("ffn.1.2", create_expert("ffn", 8), max_batch_size=4, device="cpu")
    backend.validate_input(torch.randn(4, 8))
    bad = {
        "wrong width": torch.randn(2, 7),
        "extra dim": torch.randn(2, 3, 8),
        "no batch dim": torch.randn(8),
        "float64": torch.randn(2, 8, dtype=torch.float64),
        "int": torch.ones(2, 8, dtype=torch.long),
        "nan": torch.tensor([[float("nan")] * 8]),
        "inf": torch.tensor([[float("inf")] * 8]),
        "oversized batch": torch.randn(5, 8),
        "empty batch": torch.randn(0, 8),
    }
    for reason, x in bad.items():
        with pytest.raises(InvalidInputError):
            backend.forward(x)
        with pytest.raises(ValueError):  # InvalidInputError is a ValueError
            backend.validate_input(x)
    with pytest.raises(InvalidInputError):
        backend.validate_input([[0.0] * 8])
    with pytest.raises(InvalidInputError, match="grad_y"):
        backend.backward(torch.randn(2, 8), torch.randn(3, 8))
    with pytest.raises(InvalidInputError, match="grad_y"):
        backend.backward(torch.randn(2, 8), torch.full((2, 8), float("nan")))
    assert backend.update_count == 0

    seq_backend = ExpertBackend("tr.0", create_expert("transformer", 8, num_heads=2, max_seq_len=10), device="cpu")
    seq_backend.validate_input(torch.randn(2, 10, 8))
    with pytest.raises(InvalidInputError, match="sequence length"):
        seq_backend.validate_input(torch.randn(2, 11, 8))
    with pytest.raises(InvalidInputError):
        seq_backend.validate_input(torch.randn(2, 8))


def test_backend_refuses_to_step_on_non_finite_gradients():
    module = create_expert("ffn", 4)
    backend = ExpertBackend("ffn.0", module, device="cpu")
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(NonFiniteGradientError):
        backend.backward(torch.randn(2, 4), torch.full((2, 4), 3e38))
    assert backend.update_count == 0
    assert all(torch.equal(before[key], value) for key, value in module.state_dict().items())


def test_state_dict_roundtrip_includes_optimizer_and_update_count():
    torch.manual_seed(3)
    backend = ExpertBackend("ffn.0.1", create_expert("ffn", 6), device="cpu")
    for _ in range(3):
        backend.backward(torch.randn(4, 6), torch.randn(4, 6))
    state = backend.state_dict()
    assert state["update_count"] == 3 and state["optimizer"]["state"]

    restored = ExpertBackend("ffn.0.1", create_expert("ffn", 6), device="cpu")
    restored.load_state_dict(state)
    assert restored.update_count == 3
    x, g = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(restored.forward(x), backend.forward(x))
    # identical optimizer state => identical next update
    assert torch.allclose(restored.backward(x, g), backend.backward(x, g))
    assert torch.allclose(restored.forward(x), backend.forward(x), atol=1e-6)
    with pytest.raises(ValueError):
        restored.load_state_dict({"module": state["module"]})


def test_backend_is_thread_safe():
    torch.manual_seed(4)
    backend = ExpertBackend("ffn.0", create_expert("ffn", 8), device="cpu")
    errors = []

    def work():
        try:
            for _ in range(10):
                backend.backward(torch.randn(3, 8), torch.randn(3, 8))
                backend.forward(torch.randn(3, 8))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and backend.update_count == 40


def test_pick_device_and_info():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            pick_device("cuda")
    backend = ExpertBackend("ffn.2.3", create_expert("ffn", 8), max_batch_size=16, device="cpu")
    assert backend.info() == {"name": "ffn.2.3", "input_shape": [8], "dtype": "float32", "max_batch_size": 16,
                              "update_count": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backend_on_cuda_returns_cpu_tensors():
    torch.manual_seed(5)
    module = create_expert("ffn", 8)
    reference = copy.deepcopy(module)
    backend = ExpertBackend("ffn.0", module, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1), device="cuda")
    x, grad_y = torch.randn(3, 8), torch.randn(3, 8)
    y = backend.forward(x)
    assert y.device.type == "cpu" and torch.allclose(y, reference(x), atol=1e-4)
    x_ref = x.clone().requires_grad_(True)
    reference(x_ref).backward(grad_y)
    grad_x = backend.backward(x, grad_y)
    assert grad_x.device.type == "cpu" and torch.allclose(grad_x, x_ref.grad, atol=1e-4)
    state = backend.state_dict()
    assert all(t.device.type == "cpu" for t in state["module"].values())
