"""Expert modules: the registry of expert architectures and the input contract every expert keeps.

An *expert* is an ordinary :class:`torch.nn.Module` built by a registered factory
``factory(hidden_dim: int, **kwargs) -> nn.Module``. Experts are looked up by name
(``"ffn"``, ``"transformer"`` or anything added with :func:`register_expert`).

Input contract (the one design used everywhere in swarmtrain): every expert module
has a method ``sample_input(batch_size: int, seq_len: int | None = None) -> Tensor``
that returns a float32 tensor of exactly the shape the expert accepts. The batch
dimension is dim 0; experts that work on sequences take the sequence length in
dim 1 (``seq_len=None`` means a default length, an unsupported length raises
``ValueError``); token-wise experts ignore ``seq_len``. A request ``x`` is valid iff
``x.shape[1:] == module.sample_input(1, seq_len=x.shape[1]).shape[1:]`` and it is
finite float32 -- see :meth:`peer.hosting.backend.ExpertBackend.validate_input`, which serves
and trains one expert on a host.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

ExpertFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ExpertFactory] = {}


class UnknownExpertError(ValueError):
    """Raised when an expert name is not in the registry."""


def register_expert(name: str) -> Callable[[ExpertFactory], ExpertFactory]:
    """Decorator that registers ``factory(hidden_dim, **kwargs) -> nn.Module`` under ``name``.

    The module it builds must provide ``sample_input(batch_size, seq_len=None)`` (see the
    module docstring). Registering the same name twice raises ``ValueError``.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"expert name must be a non-empty string without '.', got {name!r}")

    def decorator(factory: ExpertFactory) -> ExpertFactory:
        if name in _REGISTRY:
            raise ValueError(f"an expert named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def expert_names() -> list[str]:
    """Return the sorted names of all registered expert types."""
    return sorted(_REGISTRY)


def create_expert(name: str, hidden_dim: int, **kwargs: Any) -> nn.Module:
    """Build a new expert of type ``name`` with model width ``hidden_dim`` (extra kwargs go to its factory)."""
    if name not in _REGISTRY:
        raise UnknownExpertError(f"unknown expert type {name!r}; registered: {expert_names()}")
    if not isinstance(hidden_dim, int) or hidden_dim <= 0:
        raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
    module = _REGISTRY[name](hidden_dim, **kwargs)
    if not callable(getattr(module, "sample_input", None)):
        raise TypeError(f"expert factory {name!r} returned a module without sample_input(batch_size, seq_len=None)")
    return module


class FeedForwardExpert(nn.Module):
    """Token-wise expert ``Linear(h, m*h) -> GELU -> Linear(m*h, h)``; input and output ``[batch, h]``."""

    def __init__(self, hidden_dim: int, multiplier: int = 4):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.net = nn.Sequential(
            nn.Linear(hidden_dim, multiplier * hidden_dim), nn.GELU(), nn.Linear(multiplier * hidden_dim, hidden_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch, hidden_dim]`` to ``[batch, hidden_dim]``."""
        return self.net(x)

    def sample_input(self, batch_size: int, seq_len: int | None = None) -> torch.Tensor:
        """Return a random float32 input ``[batch_size, hidden_dim]`` (``seq_len`` is ignored: token-wise expert)."""
        return torch.randn(batch_size, self.hidden_dim)


class TransformerExpert(nn.Module):
    """One pre-norm transformer block on ``[batch, seq, h]`` -> ``[batch, seq, h]``.

    ``x = x + Attention(LayerNorm(x)); x = x + FFN(LayerNorm(x))`` with ``num_heads`` heads
    (causal by default, so it can be used inside a language model) and an FFN of width
    ``4h``. It has no positional embedding of its own: positions must already be in ``x``.
    Sequences may have any length from 1 to ``max_seq_len``; ``sample_input`` uses ``default_seq_len``
    (None = ``min(16, max_seq_len)``) when no length is given.
    """

    def __init__(self, hidden_dim: int, num_heads: int = 4, causal: bool = True, max_seq_len: int = 512,
                 default_seq_len: int | None = None):
        super().__init__()
        default_seq_len = min(16, max_seq_len) if default_seq_len is None else default_seq_len
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        if not 1 <= default_seq_len <= max_seq_len:
            raise ValueError(f"need 1 <= default_seq_len <= max_seq_len, got {default_seq_len}, {max_seq_len}")
        self.hidden_dim, self.num_heads, self.causal = hidden_dim, num_heads, causal
        self.max_seq_len, self.default_seq_len = max_seq_len, default_seq_len
        self.ln_attn = nn.LayerNorm(hidden_dim)
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)
        self.ln_ffn = nn.LayerNorm(hidden_dim)
        self.ffn = FeedForwardExpert(hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch, seq, hidden_dim]`` to ``[batch, seq, hidden_dim]``."""
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(width, dim=2)
        heads = lambda t: t.view(batch, seq, self.num_heads, width // self.num_heads).transpose(1, 2)  # noqa: E731
        attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=self.causal)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, width))
        return x + self.ffn(self.ln_ffn(x))

    def sample_input(self, batch_size: int, seq_len: int | None = None) -> torch.Tensor:
        """Return a random float32 input ``[batch_size, seq_len, hidden_dim]``; ValueError if seq_len is unsupported."""
        seq_len = self.default_seq_len if seq_len is None else seq_len
        if not 1 <= seq_len <= self.max_seq_len:
            raise ValueError(f"sequence length must be in [1, {self.max_seq_len}], got {seq_len}")
        return torch.randn(batch_size, seq_len, self.hidden_dim)


@register_expert("ffn")
def _make_ffn(hidden_dim: int, **kwargs: Any) -> nn.Module:
    return FeedForwardExpert(hidden_dim, **kwargs)


@register_expert("transformer")
def _make_transformer(hidden_dim: int, **kwargs: Any) -> nn.Module:
    return TransformerExpert(hidden_dim, **kwargs)


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """Return ``requested`` as a device (checking it exists), or else the best available: cuda, mps, cpu."""
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available")
        if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {requested!r} requested but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
