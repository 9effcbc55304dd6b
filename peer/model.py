"""A small GPT-style language model whose feed-forward layers are mixtures of experts.

The transformer (``MoETransformer``) is nanoGPT-shaped: token + position embeddings, ``n_layer``
pre-norm blocks of causal self-attention and a feed-forward layer, a final LayerNorm and an LM
head tied to the token embedding. The feed-forward layer of block ``l`` is whatever
``make_moe(l, config)`` returns, so the same model runs with all experts in-process
(:class:`LocalMixtureOfExperts`, the single-process baseline) or with experts hosted by other
peers (the remote layer, written on top of :mod:`peer.gating`).

Contract for a ``make_moe`` layer:

* ``forward(x: [tokens, n_embd]) -> [tokens, n_embd]`` (the model flattens batch and sequence);
* on every forward it sets ``self.aux_loss`` to a scalar tensor (its auxiliary load-balancing
  loss) or ``None``; the model adds ``config.aux_loss_weight * sum(layer.aux_loss)`` to the loss;
* optionally ``expert_parameters()``: the parameters of its experts. They are excluded from
  :meth:`MoETransformer.dense_parameters` (the parameters every trainer holds and averages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peer.experts import create_expert
from peer.gating import (GatingFunction, all_uids, beam_search_coords, combine_expert_outputs, expert_logits,
                         load_balancing_loss, routing_counts)


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`MoETransformer`; use ``ModelConfig.tiny()`` / ``.small()`` for presets."""

    vocab_size: int = 256            # byte-level tokens
    block_size: int = 64             # context length
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    grid_size: tuple[int, ...] = (4, 4)   # expert grid per layer
    k: int = 2                       # experts per token
    beam_size: int | None = None     # beam search width (None = k)
    expert_type: str = "ffn"         # name in the peer.experts registry
    aux_loss_weight: float = 0.01    # weight of the load-balancing loss

    def __post_init__(self) -> None:
        self.grid_size = tuple(self.grid_size)
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "k")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0 or self.aux_loss_weight < 0:
            raise ValueError("need 0 <= dropout < 1 and aux_loss_weight >= 0")
        if self.beam_size is not None and (not isinstance(self.beam_size, int) or self.beam_size < 1):
            raise ValueError(f"ModelConfig.beam_size must be None or a positive int, got {self.beam_size!r}")
        if not self.grid_size or any(g < 1 for g in self.grid_size) or self.k > math.prod(self.grid_size):
            raise ValueError(f"grid_size {self.grid_size} must be positive and hold at least k={self.k} experts")

    def uid_prefix(self, layer: int) -> str:
        """Expert UID prefix of layer ``layer``: ``f"{expert_type}{layer}"``, e.g. ``"ffn0"`` (UIDs ``"ffn0.1.3"``)."""
        return f"{self.expert_type}{layer}"

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A model that trains at several steps/s on 2 CPU cores (2 layers, 64 wide, 4x4 experts, block 64)."""
        return replace(cls(), **overrides)

    @classmethod
    def small(cls, **overrides: Any) -> ModelConfig:
        """nanoGPT-sized (6 layers, 384 wide, 6 heads, block 256) with a 4x8 expert grid per layer, k=4."""
        base = cls(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.1, grid_size=(4, 8), k=4)
        return replace(base, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Return the preset called ``name`` (``"tiny"`` or ``"small"``) with ``overrides`` applied."""
        if name not in ("tiny", "small"):
            raise ValueError(f"unknown preset {name!r}; choose 'tiny' or 'small'")
        return getattr(cls, name)(**overrides)


class LocalMixtureOfExperts(nn.Module):
    """A DMoE layer with every expert in this process; same math as the remote layer (see :mod:`peer.gating`).

    ``forward(x: [tokens, in_features]) -> [tokens, in_features]``: gate scores per grid dimension,
    beam search over the grid (everything alive), run the chosen experts, softmax-combine them and
    set ``self.aux_loss`` to the load-balancing loss. Only token-wise experts (input ``[batch, h]``)
    are supported. Expert ``self.experts[i]`` has UID ``self.uids[i]`` (row-major grid order).
    """

    def __init__(self, in_features: int, grid_size: tuple[int, ...], k: int, expert_type: str = "ffn",
                 prefix: str = "expert", beam_size: int | None = None, **expert_kwargs: Any):
        super().__init__()
        self.in_features, self.grid_size, self.k = in_features, tuple(grid_size), k
        self.prefix, self.beam_size = prefix, beam_size
        self.gate = GatingFunction(in_features, self.grid_size)
        self.uids = all_uids(prefix, self.grid_size)
        self.experts = nn.ModuleList(create_expert(expert_type, in_features, **expert_kwargs) for _ in self.uids)
        sample_shape = tuple(self.experts[0].sample_input(1).shape)
        if sample_shape != (1, in_features):
            raise ValueError(f"expert type {expert_type!r} takes {sample_shape}; local MoE needs token-wise experts")
        strides = [math.prod(self.grid_size[d + 1:]) for d in range(len(self.grid_size))]
        self.register_buffer("strides", torch.tensor(strides, dtype=torch.long), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route each row of ``x`` to its top-k experts and return their weighted combination."""
        scores = self.gate(x)
        coords, found = beam_search_coords(scores, self.k, lambda names: names, self.prefix, self.beam_size)
        coords, found = coords.to(x.device), found.to(x.device)
        logits = expert_logits(scores, coords, found)
        flat_index = (coords * self.strides).sum(dim=2)
        rows, slots, results = [], [], []
        for expert_index in torch.unique(flat_index[found]).tolist():
            row, slot = torch.nonzero(found & (flat_index == expert_index), as_tuple=True)
            rows.append(row), slots.append(slot)
            results.append(self.experts[expert_index](x[row]))
        outputs = x.new_zeros(x.shape[0], self.k, self.in_features)
        if results:
            outputs = outputs.index_put((torch.cat(rows), torch.cat(slots)), torch.cat(results))
        self.aux_loss = load_balancing_loss(scores, routing_counts(coords, found, self.grid_size))
        return combine_expert_outputs(outputs, logits, found)

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the experts (not of the gate)."""
        return self.experts.parameters()


def local_moe_factory(layer: int, config: ModelConfig) -> nn.Module:
    """Default ``make_moe``: a :class:`LocalMixtureOfExperts` with prefix ``config.uid_prefix(layer)``."""
    return LocalMixtureOfExperts(config.n_embd, config.grid_size, config.k, config.expert_type,
                                 prefix=config.uid_prefix(layer), beam_size=config.beam_size)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``[batch, seq, n_embd]``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend each position to itself and earlier positions."""
        batch, seq, width = x.shape
        q, k, v = (t.view(batch, seq, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, seq, width)))


class Block(nn.Module):
    """Pre-norm transformer block whose feed-forward layer is a mixture of experts."""

    def __init__(self, config: ModelConfig, moe: nn.Module):
        super().__init__()
        self.ln_attn, self.attn = nn.LayerNorm(config.n_embd), CausalSelfAttention(config)
        self.ln_moe, self.moe = nn.LayerNorm(config.n_embd), moe
        self.moe_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + attn(ln(x))``, then ``x + moe(ln(x))`` with tokens flattened to ``[batch*seq, n_embd]``."""
        x = x + self.attn(self.ln_attn(x))
        tokens = self.ln_moe(x).reshape(-1, x.shape[-1])
        y = self.moe(tokens)
        if y.shape != tokens.shape:
            raise ValueError(f"MoE layer returned {list(y.shape)}, expected {list(tokens.shape)}")
        return x + self.moe_dropout(y.view_as(x))


class MoETransformer(nn.Module):
    """GPT language model with mixture-of-experts feed-forward layers.

    ``forward(idx [batch, seq] long, targets=None) -> (logits [batch, seq, vocab], loss or None)``.
    ``loss = cross_entropy + config.aux_loss_weight * sum of the layers' aux_loss``; the two parts of
    the last forward are kept in ``last_lm_loss`` and ``last_aux_loss`` (detached) for logging.
    Targets equal to -1 are ignored. ``make_moe`` defaults to :func:`local_moe_factory`.
    """

    def __init__(self, config: ModelConfig, make_moe: Callable[[int, ModelConfig], nn.Module] | None = None):
        super().__init__()
        self.config = config
        make_moe = make_moe or local_moe_factory
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, make_moe(layer, config)) for layer in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying
        for module in [self.tok_emb, self.pos_emb] + [block.attn for block in self.blocks]:
            module.apply(self._init_weights)
        for block in self.blocks:  # GPT-2 scaled init of residual projections
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * config.n_layer))
        self.last_lm_loss: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return next-token logits for every position and, given targets, the training loss."""
        if idx.dtype != torch.long or idx.dim() != 2 or not 1 <= idx.shape[1] <= self.config.block_size:
            raise ValueError(
                f"idx must be long [batch, 1..{self.config.block_size}], got {idx.dtype} {list(idx.shape)}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        aux_losses = []
        for block in self.blocks:
            x = block(x)
            aux = getattr(block.moe, "aux_loss", None)
            if aux is not None:
                aux_losses.append(aux)
        logits = self.lm_head(self.ln_f(x))
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else logits.new_zeros(())
        self.last_aux_loss = aux_loss.detach()
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {list(targets.shape)} differs from idx {list(idx.shape)}")
        lm_loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        self.last_lm_loss = lm_loss.detach()
        return logits, lm_loss + self.config.aux_loss_weight * aux_loss

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters that belong to experts (those reported by the MoE layers' ``expert_parameters()``)."""
        params: dict[int, nn.Parameter] = {}
        for block in self.blocks:
            if hasattr(block.moe, "expert_parameters"):
                params.update((id(p), p) for p in block.moe.expert_parameters())
        return list(params.values())

    def dense_parameters(self) -> list[nn.Parameter]:
        """Parameters every trainer holds (embeddings, attention, norms, gates): all but the experts'."""
        expert_ids = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in expert_ids]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx [batch, seq]`` and return the extended sequence."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                threshold = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), 1)], dim=1)
        return idx
