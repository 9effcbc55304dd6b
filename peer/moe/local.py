"""A mixture-of-experts layer with every expert in this process: the single-process baseline.

Same routing math as the remote layer (:mod:`peer.moe.remote`), built from :mod:`peer.moe.gating`:
gate scores per grid dimension, beam search over the grid, the chosen experts, softmax-combined.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import nn

from peer.config import ModelConfig
from peer.moe.experts import create_expert
from peer.moe.gating import (GatingFunction, all_uids, beam_search_coords, combine_expert_outputs, expert_logits,
                             load_balancing_loss, routing_counts)


class LocalMixtureOfExperts(nn.Module):
    """A DMoE layer with every expert in this process; same math as the remote layer (see :mod:`peer.moe.gating`).

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
