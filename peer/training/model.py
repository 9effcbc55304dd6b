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
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peer.config import ModelConfig
from peer.moe.local import local_moe_factory


class KVCache:
    """Keys and values of the positions a model has seen, per layer, so that a new token attends to them
    without recomputing them (:meth:`MoETransformer.forward` with ``cache=``).

    ``length`` positions are held (at most ``block_size``): the next token's position is ``length``.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.length = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's ``k, v [batch, heads, new, head_dim]`` of ``layer``; returns all of them."""
        while len(self.layers) <= layer:
            self.layers.append(None)
        held = self.layers[layer]
        if held is not None:
            k, v = torch.cat([held[0], k], dim=2), torch.cat([held[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``[batch, seq, n_embd]``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Attend each position to itself and earlier positions (those in ``cache`` too, if given)."""
        batch, seq, width = x.shape
        q, k, v = (t.view(batch, seq, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.extend(layer, k, v)
        if past == 0:
            mask, causal = None, True
        else:  # the new positions see every cached one, and the new ones up to themselves
            mask = torch.ones(seq, past + seq, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, seq, width)))


class Block(nn.Module):
    """Pre-norm transformer block whose feed-forward layer is a mixture of experts."""

    def __init__(self, config: ModelConfig, moe: nn.Module):
        super().__init__()
        self.ln_attn, self.attn = nn.LayerNorm(config.n_embd), CausalSelfAttention(config)
        self.ln_moe, self.moe = nn.LayerNorm(config.n_embd), moe
        self.moe_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``x + attn(ln(x))``, then ``x + moe(ln(x))`` with tokens flattened to ``[batch*seq, n_embd]``."""
        x = x + self.attn(self.ln_attn(x), cache, layer)
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return next-token logits for every position and, given targets, the training loss.

        With ``cache``, ``idx`` holds the tokens after the ``cache.length`` ones it has seen (their positions
        follow on), and their keys and values are added to it; together they must fit in ``block_size``.
        """
        past = cache.length if cache is not None else 0
        if idx.dtype != torch.long or idx.dim() != 2 or not 1 <= past + idx.shape[1] <= self.config.block_size:
            raise ValueError(f"idx must be long [batch, 1..{self.config.block_size - past}] (context "
                             f"{self.config.block_size}, {past} cached), got {idx.dtype} {list(idx.shape)}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        positions = torch.arange(past, past + idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        aux_losses = []
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
            aux = getattr(block.moe, "aux_loss", None)
            if aux is not None:
                aux_losses.append(aux)
        if cache is not None:
            cache.length = past + idx.shape[1]
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

    def context_start(self, length: int) -> int:
        """Where the context of the next token starts in a sequence of ``length`` tokens.

        Within ``block_size`` it is the start. Past it, the context restarts on the last ``block_size // 2``
        tokens whenever it fills up (they are re-encoded at positions 0.., as the model was trained: absolute
        position embeddings cannot slide), so a token past the context costs on average what one inside it
        does, and the model sees between ``block_size // 2`` and ``block_size`` tokens.
        """
        block, keep = self.config.block_size, max(self.config.block_size // 2, 1)
        if length <= block:
            return 0
        return length - keep - (length - block - 1) % (block - keep + 1) if block > keep else length - 1

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, use_cache: bool = True,
                        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield ``max_new_tokens`` next tokens ``[batch]`` after ``idx [batch, seq]``, one at a time.

        ``temperature=0`` picks the most likely token (greedy); otherwise tokens are sampled from the softmax
        at ``temperature``, among the ``top_k`` most likely if given. With ``use_cache`` each token runs the
        model on itself only (:class:`KVCache`); without, on its whole context. Both see the same context
        (:meth:`context_start`), so greedy decoding gives the same tokens.
        """
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"need a prompt of at least one token per row, got shape {list(idx.shape)}")
        tokens = idx
        cache, cached_from = None, -1
        for _ in range(max_new_tokens):
            start = self.context_start(tokens.shape[1])
            if not use_cache:
                logits, _ = self(tokens[:, start:])
            elif cache is None or start != cached_from:  # a new context: encode it whole
                cache, cached_from = KVCache(), start
                logits, _ = self(tokens[:, start:], cache=cache)
            else:
                logits, _ = self(tokens[:, -1:], cache=cache)
            logits = logits[:, -1, :]
            if temperature == 0:
                token = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    threshold = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < threshold, float("-inf"))
                token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            yield token

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx [batch, seq]`` and return the extended sequence
        (see :meth:`generate_stream`)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, use_cache, generator))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
