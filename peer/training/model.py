"""A small GPT-style language model whose feed-forward layers are mixtures of experts.

The transformer (``MoETransformer``) is nanoGPT-shaped: token + position embeddings, ``n_layer``
pre-norm blocks of causal self-attention and a feed-forward layer, a final LayerNorm and an LM
head tied to the token embedding. The feed-forward layer of block ``l`` is whatever
``make_moe(l, config)`` returns, so the same model runs with all experts in-process
(:class:`LocalMixtureOfExperts`, the single-process baseline) or with experts hosted by other
peers (the remote layer, written on top of :mod:`peer.moe.gating`).

Contract for a ``make_moe`` layer:

* ``forward(x: [tokens, n_embd]) -> [tokens, n_embd]`` (the model flattens batch and sequence);
* on every forward it sets ``self.aux_loss`` to a scalar tensor (its auxiliary load-balancing
  loss) or ``None``; the model adds ``config.aux_loss_weight * sum(layer.aux_loss)`` to the loss;
* optionally ``expert_parameters()``: the parameters of its experts. They are excluded from
  :meth:`MoETransformer.dense_parameters` (the parameters every trainer holds and averages).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from peer.config import ModelConfig
from peer.moe.local import local_moe_factory


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
