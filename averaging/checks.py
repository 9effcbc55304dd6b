"""Value checks every layer of averaging applies to what it sends, receives and holds.

A contribution, a reduced part or a downloaded state with NaN/inf is refused (:func:`all_finite`); with a
declared bound, so is one with a value beyond it (:func:`max_abs`). Both read each element once.
"""
from __future__ import annotations

import math

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True if no element of ``tensor`` is NaN or +-inf.

    Fast path: a finite sum proves every element finite (NaN or inf would make the sum NaN or inf) and costs one
    read pass without temporaries, about 20x faster than ``isfinite(t).all()``. Only when the sum is not finite
    (bad data, or an overflowing sum of huge values) do we check element by element.
    """
    if tensor.numel() == 0:
        return True
    return math.isfinite(tensor.sum().item()) or bool(torch.isfinite(tensor).all())


def max_abs(tensor: torch.Tensor) -> float:
    """Largest ``|x|`` in ``tensor`` (0.0 if empty), in one pass without an ``abs()`` copy."""
    if tensor.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(tensor)
    return max(-float(lo), float(hi))
