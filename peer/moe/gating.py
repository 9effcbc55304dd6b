"""Routing for a decentralized mixture of experts (DMoE, Ryabinin & Gorbatov 2020, "Learning@home").

Experts live on a ``d``-dimensional grid and are named by their coordinates: with prefix
``"ffn"`` and ``grid_size=(8, 32)`` the experts are ``"ffn.0.0" ... "ffn.7.31"``. The gate
does not score every expert (too many to look up in a DHT); it scores each grid dimension
separately, and an expert's score is the *sum* of its coordinates' scores::

    score(x, "ffn.i.j") = gate_0(x)[i] + gate_1(x)[j]

so the top-k experts can be found dimension by dimension with a beam search that only asks
the network about prefixes ("ffn.3.") that still have live experts under them.

Pipeline of one DMoE layer (the local and the remote layer both follow it):

1. ``scores = GatingFunction(x)`` -- one ``[batch, grid_size[d]]`` tensor per dimension.
2. ``coords, found = beam_search_coords(scores, k, is_alive, prefix)`` (or :func:`beam_search`
   for UID strings) -- the chosen experts of every sample.
3. ``logits = expert_logits(scores, coords, found)`` -- their (differentiable) scores ``[batch, k]``.
4. run the chosen experts; ``answered[b, j]`` says whether expert j of sample b replied.
5. ``y = combine_expert_outputs(outputs, logits, answered)`` -- softmax mixture over those that replied.
6. ``aux = load_balancing_loss(scores, routing_counts(coords, found, grid_size))``.

Prefix strings: a prefix at depth ``d`` names the first ``d`` coordinates and ends with a dot
(``"ffn.3."``), so it never matches a longer number (``"ffn.31.0"``); a full UID has no
trailing dot. See :func:`uid_prefix`.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IsAlive = Callable[[list[str]], Iterable[str]]

_PREFIX_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class InvalidUIDError(ValueError):
    """Raised for a malformed expert UID, prefix or out-of-grid coordinate."""


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not _PREFIX_PATTERN.match(prefix):
        raise InvalidUIDError(f"expert prefix must match {_PREFIX_PATTERN.pattern} (no dots), got {prefix!r}")


def _check_coords(coords: Sequence[int], grid_size: Sequence[int] | None) -> tuple[int, ...]:
    coords = tuple(coords)
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in coords):
        raise InvalidUIDError(f"coordinates must be non-negative ints, got {coords!r}")
    if grid_size is not None:
        if len(coords) != len(grid_size) or any(c >= g for c, g in zip(coords, grid_size)):
            raise InvalidUIDError(f"coordinates {coords} are outside the grid {tuple(grid_size)}")
    return coords


def make_uid(prefix: str, coords: Sequence[int]) -> str:
    """Return the UID of the expert at ``coords``: ``make_uid("ffn", (3, 17)) == "ffn.3.17"``."""
    _check_prefix(prefix)
    coords = _check_coords(coords, None)
    if not coords:
        raise InvalidUIDError("an expert UID needs at least one coordinate")
    return prefix + "." + ".".join(map(str, coords))


def uid_prefix(prefix: str, coords: Sequence[int]) -> str:
    """Return the prefix naming all experts whose first coordinates are ``coords``: ``("ffn", (3,)) -> "ffn.3."``."""
    _check_prefix(prefix)
    coords = _check_coords(coords, None)
    return prefix + "." + "".join(f"{c}." for c in coords)


def parse_uid(uid: str, grid_size: Sequence[int] | None = None) -> tuple[str, tuple[int, ...]]:
    """Split ``"ffn.3.17"`` into ``("ffn", (3, 17))``; with ``grid_size``, also check the coordinates fit the grid."""
    if not isinstance(uid, str):
        raise InvalidUIDError(f"expert UID must be a string, got {type(uid).__name__}")
    prefix, *parts = uid.split(".")
    if not parts or not all(p.isdigit() and p.isascii() and (p == "0" or not p.startswith("0")) for p in parts):
        raise InvalidUIDError(f"malformed expert UID {uid!r}; expected 'prefix.i.j...' with decimal coordinates")
    _check_prefix(prefix)
    return prefix, _check_coords([int(p) for p in parts], grid_size)


def all_uids(prefix: str, grid_size: Sequence[int]) -> list[str]:
    """Return every UID of the grid in row-major order (``ffn.0.0, ffn.0.1, ...``)."""
    sizes = [torch.arange(g) for g in grid_size]
    grid = torch.cartesian_prod(*sizes).view(-1, len(grid_size)) if sizes else torch.empty(0, 0)
    return [make_uid(prefix, row) for row in grid.tolist()]


class GatingFunction(nn.Module):
    """The DMoE gate: one ``Linear(in_features, grid_size[d])`` per grid dimension.

    ``forward(x: [batch, in_features]) -> list[Tensor [batch, grid_size[d]]]`` (unnormalised scores).
    """

    def __init__(self, in_features: int, grid_size: Sequence[int]):
        super().__init__()
        if not grid_size or any(not isinstance(g, int) or g < 1 for g in grid_size):
            raise ValueError(f"grid_size must be a non-empty sequence of positive ints, got {grid_size!r}")
        self.in_features, self.grid_size = in_features, tuple(grid_size)
        self.projections = nn.ModuleList(nn.Linear(in_features, g) for g in self.grid_size)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the per-dimension scores of every sample."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"gate expects [batch, {self.in_features}], got {list(x.shape)}")
        return [projection(x) for projection in self.projections]


def _check_scores(scores: Sequence[torch.Tensor]) -> int:
    if not scores or any(not isinstance(s, torch.Tensor) or s.dim() != 2 for s in scores):
        raise ValueError("scores must be a non-empty list of [batch, grid_size[d]] tensors")
    if len({s.shape[0] for s in scores}) != 1:
        raise ValueError(f"scores disagree on batch size: {[list(s.shape) for s in scores]}")
    if any(not torch.isfinite(s).all() for s in scores):
        raise ValueError("gate scores contain NaN or Inf")
    return scores[0].shape[0]


def beam_search_coords(scores: Sequence[torch.Tensor], k: int, is_alive: IsAlive, prefix: str,
                       beam_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Find each sample's top-k alive experts; return ``(coords [batch, k, D] long, found [batch, k] bool)``.

    Rows are sorted by score, best first; ``found[b, j]`` is False (and ``coords[b, j]`` zeros) where
    fewer than k alive experts were reached. Algorithm, for depth ``d = 0 .. D-1``:

    1. extend every beam of every sample by each coordinate of dimension d; a candidate's score
       is its beam's score plus ``scores[d][b, coordinate]``;
    2. ask ``is_alive`` once, for the whole batch, about the distinct candidate prefixes
       (``"ffn.3."``; at the last depth, full UIDs) and drop the dead ones;
    3. keep each sample's best ``beam_size`` candidates (at the last depth: the best ``k``).

    With everything alive and ``beam_size >= k`` this is exactly the top-k of the summed scores;
    when prefixes are dead it is approximate (a kept prefix may hold only weak experts) unless
    ``beam_size >= prod(grid_size[:-1])``, which makes the search exhaustive.
    """
    _check_prefix(prefix)
    batch = _check_scores(scores)
    beam_size = k if beam_size is None else beam_size
    if k < 1 or beam_size < 1:
        raise ValueError(f"k and beam_size must be >= 1, got k={k}, beam_size={beam_size}")
    grid_size = [s.shape[1] for s in scores]
    if batch == 0:
        return torch.zeros(0, k, len(scores), dtype=torch.long), torch.zeros(0, k, dtype=torch.bool)
    beam_coords = torch.zeros(batch, 1, 0, dtype=torch.long)
    beam_scores = torch.zeros(batch, 1)
    for depth, dim_scores in enumerate(scores):
        dim_scores = dim_scores.detach().float().cpu()
        num_beams, size = beam_coords.shape[1], dim_scores.shape[1]
        # Step 1: every (beam, coordinate) pair is a candidate.
        cand_scores = beam_scores[:, :, None] + dim_scores[:, None, :]
        new_coord = torch.arange(size).view(1, 1, size, 1).expand(batch, num_beams, size, 1)
        cand_coords = torch.cat([beam_coords[:, :, None, :].expand(-1, -1, size, -1), new_coord], dim=3)
        valid = torch.isfinite(beam_scores)[:, :, None].expand(-1, -1, size)
        # Step 2: one is_alive query with the distinct prefixes of the whole batch.
        alive = torch.zeros_like(valid)
        if valid.any():
            rows = cand_coords[valid]  # [M, depth + 1]; encode each row as one mixed-radix integer
            strides = torch.tensor([math.prod(grid_size[i + 1:depth + 1]) for i in range(depth + 1)])
            unique_ids, inverse = torch.unique((rows * strides).sum(dim=1), return_inverse=True)
            unique_rows = (unique_ids[:, None] // strides) % torch.tensor(grid_size[:depth + 1])
            last = depth == len(scores) - 1
            names = [make_uid(prefix, row) if last else uid_prefix(prefix, row) for row in unique_rows.tolist()]
            alive_names = set(is_alive(names))
            alive_unique = torch.tensor([name in alive_names for name in names], dtype=torch.bool)
            alive[valid] = alive_unique[inverse]
        cand_scores = cand_scores.masked_fill(~alive, float("-inf"))
        # Step 3: keep the best candidates of each sample.
        keep = min(k if depth == len(scores) - 1 else beam_size, num_beams * size)
        beam_scores, best = cand_scores.view(batch, -1).topk(keep, dim=1)
        flat_coords = cand_coords.reshape(batch, num_beams * size, depth + 1)
        beam_coords = flat_coords.gather(1, best[:, :, None].expand(-1, -1, depth + 1))
    found = torch.isfinite(beam_scores)
    coords = beam_coords.masked_fill(~found[:, :, None], 0)
    if found.shape[1] < k:  # fewer candidates than k in the whole grid
        missing = k - found.shape[1]
        coords = torch.cat([coords, coords.new_zeros(batch, missing, coords.shape[2])], dim=1)
        found = torch.cat([found, found.new_zeros(batch, missing)], dim=1)
    return coords, found


def expert_logits(scores: Sequence[torch.Tensor], coords: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """Return the chosen experts' scores ``[batch, k]`` (sum over dimensions; -inf where not found).

    Differentiable w.r.t. ``scores``, so the gate learns through :func:`combine_expert_outputs`.
    """
    if coords.dim() != 3 or coords.shape[2] != len(scores) or found.shape != coords.shape[:2]:
        raise ValueError(f"coords {list(coords.shape)} / found {list(found.shape)} do not match {len(scores)} dims")
    total = sum(dim_scores.gather(1, coords[:, :, d]) for d, dim_scores in enumerate(scores))
    return total.masked_fill(~found, float("-inf"))


def routing_counts(coords: torch.Tensor, found: torch.Tensor, grid_size: Sequence[int]) -> list[torch.Tensor]:
    """Per dimension d, ``[batch, grid_size[d]]`` float: how many chosen experts of each sample have coordinate i."""
    counts = []
    for d, size in enumerate(grid_size):
        dim_counts = torch.zeros(coords.shape[0], size, device=coords.device)
        counts.append(dim_counts.scatter_add_(1, coords[:, :, d], found.float()))
    return counts


def combine_expert_outputs(expert_outputs: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mix the chosen experts' outputs with softmax weights over the experts that answered.

    Args:
        expert_outputs: ``[batch, k, *out]``; entries where ``mask`` is False are ignored (may be garbage).
        logits: ``[batch, k]`` scores of those experts (-inf allowed, NaN and +inf are not).
        mask: ``[batch, k]`` bool, True where the expert answered.

    Returns ``[batch, *out]``: ``sum_j w[b, j] * expert_outputs[b, j]`` with ``w = softmax`` of the
    answered logits (renormalised over answered experts only). Rows with no answered expert (or only
    -inf logits) are zeros. Never produces NaN, in the output or in gradients.
    """
    if logits.dim() != 2 or mask.shape != logits.shape or expert_outputs.shape[:2] != logits.shape:
        raise ValueError(f"shape mismatch: outputs {list(expert_outputs.shape)}, logits {list(logits.shape)}, "
                         f"mask {list(mask.shape)}; expected [batch, k, ...], [batch, k], [batch, k]")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if torch.isnan(logits).any() or (logits == float("inf")).any():
        raise ValueError("logits contain NaN or +inf")
    masked = torch.where(mask, logits, torch.full_like(logits, float("-inf")))
    row_max = masked.amax(dim=1, keepdim=True).detach()
    row_valid = torch.isfinite(row_max)
    exp = torch.exp(masked - torch.where(row_valid, row_max, torch.zeros_like(row_max)))
    weights = exp / exp.sum(dim=1, keepdim=True).clamp_min(1.0)  # >= 1 on valid rows (max term is 1)
    outputs = torch.where(mask.view(*mask.shape, *[1] * (expert_outputs.dim() - 2)), expert_outputs,
                          torch.zeros_like(expert_outputs))
    weights = weights.to(outputs.dtype).view(*weights.shape, *[1] * (outputs.dim() - 2))
    return (weights * outputs).sum(dim=1)


def load_balancing_loss(scores: Sequence[torch.Tensor] | torch.Tensor,
                        chosen_mask: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, averaged over grid dimensions; differentiable w.r.t. the gate.

    For each dimension d with ``n = grid_size[d]``: ``p = softmax(scores[d])`` per sample,
    ``P_i = mean_b p[b, i]`` (mean gate probability) and ``f_i`` = share of routed experts whose
    coordinate is i (from ``chosen_mask[d]``, bool or counts ``[batch, n]``, e.g. from
    :func:`routing_counts`); the loss is ``n * sum_i f_i * P_i``. It equals 1 for uniform routing
    with uniform probabilities and grows to n when everything goes to one coordinate.
    """
    if isinstance(scores, torch.Tensor):
        scores = [scores]
    if isinstance(chosen_mask, torch.Tensor):
        chosen_mask = [chosen_mask]
    if len(scores) != len(chosen_mask) or not scores:
        raise ValueError(f"got {len(scores)} score tensors but {len(chosen_mask)} masks")
    losses = []
    for dim_scores, dim_mask in zip(scores, chosen_mask):
        if dim_scores.shape != dim_mask.shape or dim_scores.dim() != 2:
            raise ValueError(f"scores {list(dim_scores.shape)} and mask {list(dim_mask.shape)} must both be [batch, n]")
        if dim_scores.shape[0] == 0:  # empty batch: nothing routed, no imbalance (and no NaN from an empty mean)
            losses.append(dim_scores.sum())
            continue
        counts = dim_mask.detach().to(dim_scores.dtype)
        fraction_routed = counts.sum(dim=0) / counts.sum().clamp_min(1.0)
        mean_prob = F.softmax(dim_scores, dim=1).mean(dim=0)
        losses.append(dim_scores.shape[1] * (fraction_routed * mean_prob).sum())
    return torch.stack(losses).mean()
