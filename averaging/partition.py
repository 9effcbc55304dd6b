"""Flattening tensors into one buffer and splitting that buffer among the members of an averaging group.

* :class:`FlatBuffer` packs a list of floating-point tensors (parameters, gradients, optimizer statistics)
  into one contiguous float32 CPU buffer that the all-reduce reads and writes, and copies results back.
* :func:`split_by_bandwidth` assigns each group member a contiguous part of the buffer, proportional to its
  bandwidth, identically on every peer.
* :func:`pacing_rates` splits a member's declared bandwidth over the flows it sends in a round.
* :func:`iter_chunks` cuts a part into fixed-size chunks so that sending, reducing and receiving pipeline.
"""

from __future__ import annotations

import logging
import math
import numbers
from fractions import Fraction
from typing import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class FlatBuffer:
    """One contiguous float32 CPU buffer holding a fixed list of floating-point tensors, end to end.

    The buffer is allocated once, in the constructor, and reused every round: call :meth:`load_from_tensors`
    before averaging and :meth:`store_to_tensors` after it. Tensors may live on any device and have any dtype in
    float16 / bfloat16 / float32 / float64; values are kept as float32 in the buffer (float64 loses precision,
    the other dtypes round-trip exactly). Tensor ``i`` occupies ``buffer[offsets[i] : offsets[i + 1]]`` in
    row-major order.

    Memory: 4 bytes per element of all tensors. Not thread-safe.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        tensors = list(tensors)
        for i, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"tensor {i} is a {type(tensor).__name__}, not a torch.Tensor")
            if tensor.dtype not in FLOATING_DTYPES:
                raise ValueError(
                    f"tensor {i} has dtype {tensor.dtype}; only floating tensors can be averaged "
                    f"({', '.join(str(d) for d in FLOATING_DTYPES)})"
                )
        self._tensors = tensors
        self._shapes = tuple(tuple(t.shape) for t in tensors)
        offsets = [0]
        for tensor in tensors:
            offsets.append(offsets[-1] + tensor.numel())
        self._offsets = tuple(offsets)
        self._buffer = torch.zeros(offsets[-1], dtype=torch.float32)
        self._signature = tuple((shape, str(t.dtype).removeprefix("torch.")) for shape, t in zip(self._shapes, tensors))
        logger.debug("FlatBuffer of %d tensors, %d elements", len(tensors), offsets[-1])

    @property
    def buffer(self) -> torch.Tensor:
        """The flat float32 CPU buffer (the same tensor object for the lifetime of this FlatBuffer)."""
        return self._buffer

    @property
    def numel(self) -> int:
        """Total number of elements of all tensors."""
        return self._offsets[-1]

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start offset of each tensor in the buffer, followed by the total size (``len(tensors) + 1`` items)."""
        return self._offsets

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors this buffer mirrors, in order."""
        return tuple(self._tensors)

    def signature(self) -> tuple[tuple[tuple[int, ...], str], ...]:
        """Hashable ``((shape, dtype_name), ...)``; group members must have equal signatures to average together."""
        return self._signature

    def view(self, index: int) -> torch.Tensor:
        """The slice of the buffer holding tensor ``index``, shaped like that tensor (a view, not a copy)."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].view(self._shapes[index])

    def _check_shapes(self) -> None:
        for i, (tensor, shape) in enumerate(zip(self._tensors, self._shapes)):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {i} changed shape from {shape} to {tuple(tensor.shape)} since FlatBuffer creation")

    @torch.no_grad()
    def load_from_tensors(self) -> torch.Tensor:
        """Copy every tensor (any device, any floating dtype) into the buffer; returns the buffer."""
        self._check_shapes()
        for i, tensor in enumerate(self._tensors):
            self.view(i).copy_(tensor)
        return self._buffer

    @torch.no_grad()
    def store_to_tensors(self) -> None:
        """Copy the buffer back into the tensors, in place, casting to each tensor's own dtype and device."""
        self._check_shapes()
        for i, tensor in enumerate(self._tensors):
            tensor.copy_(self.view(i))

    def __repr__(self) -> str:
        return f"FlatBuffer(tensors={len(self._tensors)}, numel={self.numel})"


def _validated_bandwidths(bandwidths: Sequence[float]) -> list[Fraction]:
    if len(bandwidths) == 0:
        raise ValueError("split_by_bandwidth needs at least one member")
    exact = []
    for i, b in enumerate(bandwidths):
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not math.isfinite(b) or b < 0:
            raise ValueError(f"bandwidth of member {i} must be a finite number >= 0, got {b!r}")
        exact.append(Fraction(float(b)))  # exact: a float is a dyadic rational
    if not any(exact):
        raise ValueError("all bandwidths are 0: at least one member must accept a part (not every peer can be a client)")
    return exact


def _largest_remainder(total: int, weights: list[Fraction]) -> list[int]:
    """Integer sizes summing to ``total``, each within 1 of ``total * w / sum(w)`` (Hamilton's method).

    Leftover elements go to the largest fractional remainders, ties broken by member index; all arithmetic is exact.
    """
    weight_sum = sum(weights)
    quotas = [total * w / weight_sum for w in weights]
    sizes = [math.floor(q) for q in quotas]
    leftover = total - sum(sizes)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in by_remainder[:leftover]:
        sizes[i] += 1
    return sizes


def split_by_bandwidth(total: int, bandwidths: Sequence[float], min_part: int = 0) -> list[tuple[int, int]]:
    """Split ``range(total)`` into one contiguous ``[start, end)`` part per member, sized by bandwidth.

    Steps:

    1. Bandwidths are converted to exact rationals; a member with bandwidth 0 (a client-mode peer that only
       sends) gets an empty part.
    2. While some member with positive bandwidth would get fewer than ``min_part`` elements, the one with the
       smallest share (the last such member on ties) is dropped and the others are re-weighted; if everyone would
       be dropped, the member with the largest bandwidth (the first on ties) takes everything.
    3. Sizes are apportioned with the largest-remainder method, so they sum exactly to ``total`` and each is
       within one element of its proportional share.

    Parts are laid out in member order. Pure integer/rational arithmetic: every peer computes the same split.
    Raises ValueError for negative ``total`` / ``min_part``, negative or non-finite bandwidths, or all-zero
    bandwidths.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be an int >= 0, got {total!r}")
    if isinstance(min_part, bool) or not isinstance(min_part, int) or min_part < 0:
        raise ValueError(f"min_part must be an int >= 0, got {min_part!r}")
    weights = _validated_bandwidths(bandwidths)

    active = [i for i, w in enumerate(weights) if w > 0]
    while min_part > 0 and len(active) > 1:
        active_sum = sum(weights[i] for i in active)
        quotas = {i: total * weights[i] / active_sum for i in active}
        smallest = min(active, key=lambda i: (quotas[i], -i))
        if quotas[smallest] >= min_part:
            break
        active.remove(smallest)

    sizes = [0] * len(weights)
    for i, size in zip(active, _largest_remainder(total, [weights[i] for i in active])):
        sizes[i] = size
    parts, start = [], 0
    for size in sizes:
        parts.append((start, start + size))
        start += size
    assert start == total
    return parts


def pacing_rates(parts: Sequence[tuple[int, int]], me: int, rate: float | None) -> tuple[list[float], float | None]:
    """How fast member ``me`` sends each flow of a round, given its bandwidth ``rate`` (bytes/s; None: unpaced).

    Returns ``(upload rate per part, rate of each copy of our own part's result)``. Uploads split ``rate`` in
    proportion to their sizes, and the results of our part split it evenly over the other members, so each
    phase's flows finish together. Our own part is not a flow (0). ``([], None)`` if ``rate`` is None.
    """
    if rate is None:
        return [], None
    uploads = sum(b - a for j, (a, b) in enumerate(parts) if j != me)
    return ([0.0 if j == me else rate * (b - a) / max(1, uploads) for j, (a, b) in enumerate(parts)],
            rate / max(1, len(parts) - 1))


def iter_chunks(start: int, end: int, chunk_elems: int) -> Iterator[tuple[int, int]]:
    """Yield consecutive ``[chunk_start, chunk_end)`` ranges of at most ``chunk_elems`` covering ``[start, end)``."""
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems <= 0:
        raise ValueError(f"chunk_elems must be a positive int, got {chunk_elems!r}")
    if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end < start:
        raise ValueError(f"need integers 0 <= start <= end, got start={start!r}, end={end!r}")
    # validated eagerly above; the ranges themselves are produced lazily
    return ((s, min(s + chunk_elems, end)) for s in range(start, end, chunk_elems))
