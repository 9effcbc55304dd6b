"""Byzantine-robust aggregation: CenteredClip.

CenteredClip (Karimireddy, He & Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021),
as used by BTARD (Gorbunov et al., "Secure Distributed Training at Scale", ICML 2022), replaces the mean of n
vectors by a point v that solves ``sum_i w_i * clip_tau(x_i - v) = 0``. An attacker moves v by at most
``tau * (its weight) / (honest weight)``, however large its vector, while for honest vectors within ``tau`` of v
the result equals their weighted mean.
"""

from __future__ import annotations

import logging
import math

import torch

from .checks import all_finite

logger = logging.getLogger(__name__)


def _clip_factors(norms: torch.Tensor, tau: float) -> torch.Tensor:
    """min(1, tau / norm), computed without dividing by zero (norm 0 is never above tau)."""
    return torch.where(norms > tau, tau / norms, torch.ones_like(norms))


def weighted_median(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise weighted (lower) median of the rows of ``vectors`` [n, d] -> [d].

    For each coordinate: sort the n values, and take the first whose cumulative weight reaches half the total.
    """
    sorted_values, order = torch.sort(vectors, dim=0)
    cumulative = torch.cumsum(weights.to(vectors.dtype)[order], dim=0)
    reached = cumulative >= cumulative[-1:] / 2
    index = reached.to(torch.uint8).argmax(dim=0, keepdim=True)  # first True per column
    return sorted_values.gather(0, index).squeeze(0)


#: ``clip_tau="auto"``: CenteredClip's radius is this many times the honest spread (:func:`honest_spread_tau`)
AUTO_TAU_FACTOR = 2.0


def honest_spread_tau(vectors: torch.Tensor, weights: torch.Tensor, factor: float = AUTO_TAU_FACTOR) -> float:
    """A CenteredClip radius measured from the vectors themselves (what ``clip_tau="auto"`` uses).

    1. The distance (L2) of each row of ``vectors`` [n, d] to their coordinate-wise weighted median.
    2. The weighted (lower) median of those distances: while honest peers hold more than half the weight,
       it is the distance of an honest vector, however far the others lie.
    3. ``factor`` times it: honest vectors, which in many dimensions lie at nearly one distance from the
       center, fall inside the radius (and average exactly), an attacker is clipped to it.

    Returns 0.0 when every vector is the median (nothing to clip)."""
    center = weighted_median(vectors, weights)
    distances = torch.linalg.vector_norm(vectors - center, dim=1)
    return factor * float(weighted_median(distances[:, None], weights.to(distances.dtype))[0])


def centered_clip(
    vectors: torch.Tensor, weights: torch.Tensor, tau: float, n_iters: int = 20, eps: float = 1e-6
) -> torch.Tensor:
    """Robust weighted aggregate of the rows of ``vectors`` [n, d] with non-negative ``weights`` [n] -> [d].

    Algorithm (CenteredClip):

    1. Start from the coordinate-wise weighted median ``v`` (robust even when an attacker's vector is huge).
    2. Repeat up to ``n_iters`` times: ``v <- v + sum_i w_i * clip_tau(x_i - v) / sum_i w_i``, where
       ``clip_tau(z) = z * min(1, tau / ||z||)``.
    3. Stop early once an update moves ``v`` by at most ``eps * max(1, ||v||)`` (L2 norm).

    Guarantee at the fixed point: if every honest vector is within ``tau`` of the result, its distance to the
    honest weighted mean is at most ``tau * W_byzantine / W_honest``. Choose ``tau`` above the honest spread.
    Computes in the dtype of ``vectors`` with one [n, d] scratch tensor. Raises ValueError on bad shapes,
    non-finite inputs, negative or all-zero weights, or ``tau <= 0``.
    """
    if vectors.dim() != 2 or not vectors.dtype.is_floating_point:
        raise ValueError(f"vectors must be a 2-D floating tensor [n, d], got {tuple(vectors.shape)} {vectors.dtype}")
    n = vectors.shape[0]
    if n == 0:
        raise ValueError("centered_clip needs at least one vector")
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be an int >= 0, got {n_iters!r}")
    weights = weights.to(device=vectors.device, dtype=vectors.dtype)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise ValueError("weights must be finite, non-negative, with a positive sum")
    if not all_finite(vectors):
        raise ValueError("vectors contain NaN or inf")

    normalized = weights / weights.sum()
    v = weighted_median(vectors, weights)
    diffs = torch.empty_like(vectors)
    for iteration in range(n_iters):
        torch.sub(vectors, v, out=diffs)
        norms = torch.linalg.vector_norm(diffs, dim=1)
        coefficients = normalized * _clip_factors(norms, tau)  # [n]; 0 where the norm overflowed to inf
        if not bool(torch.isfinite(norms).all()):
            diffs.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # such rows have coefficient 0: avoid 0 * inf
        step = coefficients @ diffs
        v += step
        if float(torch.linalg.vector_norm(step)) <= eps * max(1.0, float(torch.linalg.vector_norm(v))):
            logger.debug("centered_clip converged after %d iterations", iteration + 1)
            break
    if not all_finite(v):
        raise ValueError("centered_clip overflowed; rescale the inputs")
    return v
