"""Deterministic weighted averaging of one part of the flat buffer, fed chunk by chunk by several senders.

In butterfly all-reduce every group member owns one contiguous part of the flat buffer (see
:func:`averaging.partition.split_by_bandwidth`). Each member sends the owner its local values for that part, in
chunks, in whatever order the network delivers them. The owner accumulates them with a :class:`PartReducer`,
drops members that fail or misbehave (:meth:`PartReducer.exclude`), and sends the weighted mean back to everyone.

Design: the reducer keeps one buffer per sender and reduces only in :meth:`PartReducer.result`, summing senders in
sorted order of their ids. The result therefore depends only on *which* values arrived, never on *when*: two runs
with the same contributions give bit-identical averages whatever the chunk arrival order, and excluding a sender
is exact (its buffer is simply left out) rather than an approximate subtraction.
Memory cost: ``len(expected_senders) * part_numel * dtype size`` bytes (a sender's buffer is allocated at its
first chunk and freed when it is excluded), plus a small scratch buffer during :meth:`PartReducer.result`.
"""

from __future__ import annotations

import bisect
import logging
import math
import numbers
from typing import Hashable, Sequence

import torch

from .checks import all_finite
from .robust import centered_clip, honest_spread_tau

logger = logging.getLogger(__name__)

#: elements reduced at a time in PartReducer.result, so that the running sum stays in cache
_SLAB_ELEMS = 1 << 17


class ReduceError(ValueError):
    """Base class of errors raised by :class:`PartReducer`."""


class BadContribution(ReduceError):
    """A sender's chunk is invalid (NaN/inf, out of range, duplicate, bad weight...). ``.sender`` names it."""

    def __init__(self, sender: Hashable, reason: str):
        super().__init__(f"bad contribution from sender {sender!r}: {reason}")
        self.sender = sender
        self.reason = reason


class UnknownSender(ReduceError):
    """A sender that is not in ``expected_senders``."""


class SenderExcluded(ReduceError):
    """A chunk arrived from a sender that was already excluded (e.g. a late packet after a timeout)."""


class IncompleteReduction(ReduceError):
    """:meth:`PartReducer.result` was called before all remaining senders covered the whole part.

    ``.missing`` maps each such sender to its list of missing ``(start, end)`` ranges (part-relative).
    """

    def __init__(self, message: str, missing: dict[Hashable, list[tuple[int, int]]]):
        super().__init__(message)
        self.missing = missing


def _insert_interval(intervals: list[list[int]], start: int, end: int) -> bool:
    """Insert ``[start, end)`` into sorted disjoint ``intervals``, merging neighbours; False if it overlaps."""
    i = bisect.bisect_right(intervals, [start, math.inf])
    if i > 0 and intervals[i - 1][1] > start:
        return False
    if i < len(intervals) and intervals[i][0] < end:
        return False
    merge_left = i > 0 and intervals[i - 1][1] == start
    merge_right = i < len(intervals) and intervals[i][0] == end
    if merge_left and merge_right:
        intervals[i - 1][1] = intervals[i][1]
        del intervals[i]
    elif merge_left:
        intervals[i - 1][1] = end
    elif merge_right:
        intervals[i][0] = start
    else:
        intervals.insert(i, [start, end])
    return True


def _gaps(intervals: list[list[int]], total: int) -> list[tuple[int, int]]:
    """The ranges of ``[0, total)`` not covered by sorted disjoint ``intervals``."""
    gaps, position = [], 0
    for start, end in intervals:
        if start > position:
            gaps.append((position, start))
        position = end
    if position < total:
        gaps.append((position, total))
    return gaps


class PartReducer:
    """Weighted mean of one part (``part_numel`` elements) over ``expected_senders``, robust to arrival order.

    Usage::

        reducer = PartReducer(part_numel, ["peerA", "peerB", "peerC"])
        reducer.add("peerB", offset=0, values=chunk, weight=32.0)   # any order, any chunking
        ...
        reducer.exclude("peerC")                                   # e.g. it timed out
        mean = reducer.result()                                     # sum_i w_i x_i / sum_i w_i over A, B

    Rules: each sender has one weight (finite, > 0) used for all its chunks; chunks of one sender may not overlap;
    values must be finite. Violations raise :class:`BadContribution` naming the sender and leave the reducer
    unchanged, so the caller can :meth:`exclude` that sender and continue. Sender ids must be hashable and mutually
    orderable (e.g. all ``str``): the sorted order fixes the summation order. Not thread-safe.
    """

    def __init__(self, part_numel: int, expected_senders: Sequence[Hashable], dtype: torch.dtype = torch.float32,
                 clip_tau: float | str | None = None):
        if isinstance(part_numel, bool) or not isinstance(part_numel, int) or part_numel < 0:
            raise ValueError(f"part_numel must be an int >= 0, got {part_numel!r}")
        senders = list(expected_senders)
        if not senders:
            raise ValueError("expected_senders must not be empty")
        if len(set(senders)) != len(senders):
            raise ValueError(f"expected_senders contains duplicates: {senders!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.part_numel = part_numel
        self.dtype = dtype
        self.clip_tau = clip_tau  # None: weighted mean; else CenteredClip of that radius (see result())
        self._order = sorted(senders)  # the summation order: independent of timing and of the caller's list order
        self._buffers: dict[Hashable, torch.Tensor] = {}
        self._weights: dict[Hashable, float] = {}
        self._covered: dict[Hashable, list[list[int]]] = {s: [] for s in senders}
        self._finished: set[Hashable] = set()
        self._excluded: set[Hashable] = set()

    # ---------------------------------------------------------------- queries

    @property
    def expected_senders(self) -> tuple[Hashable, ...]:
        """All senders this reducer was created with, in summation (sorted) order."""
        return tuple(self._order)

    @property
    def active_senders(self) -> tuple[Hashable, ...]:
        """Senders not excluded, in summation order."""
        return tuple(s for s in self._order if s not in self._excluded)

    @property
    def excluded_senders(self) -> frozenset:
        """Senders dropped with :meth:`exclude`."""
        return frozenset(self._excluded)

    @property
    def finished_senders(self) -> frozenset:
        """Senders for which :meth:`sender_finished` succeeded."""
        return frozenset(self._finished)

    def weights(self) -> dict[Hashable, float]:
        """The weight each active sender declared (its first chunk's), in summation order."""
        return {s: self._weights[s] for s in self.active_senders if s in self._weights}

    def missing_ranges(self, sender: Hashable) -> list[tuple[int, int]]:
        """Part-relative ``(start, end)`` ranges that ``sender`` has not sent yet."""
        self._check_known(sender)
        return _gaps(self._covered[sender], self.part_numel)

    def is_complete(self) -> bool:
        """True when at least one sender remains and every remaining sender covered the whole part."""
        active = self.active_senders
        return bool(active) and all(not self.missing_ranges(s) for s in active)

    def memory_bytes(self) -> int:
        """Bytes currently held in per-sender buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    # ---------------------------------------------------------------- updates

    def _check_known(self, sender: Hashable) -> None:
        if sender not in self._covered:
            raise UnknownSender(f"sender {sender!r} is not among the expected senders {self._order!r}")

    def add(self, sender: Hashable, offset: int, values: torch.Tensor, weight: float, *, copy: bool = True) -> None:
        """Record ``values`` as ``sender``'s data for ``part[offset : offset + len(values)]`` with ``weight``.

        ``values`` is a 1-D floating tensor (copied, cast to the reducer dtype; it is not modified or retained).
        ``copy=False``: a contiguous tensor of the reducer dtype covering the whole part is kept as that
        sender's buffer instead of copied (e.g. our own slice, which then must not change before ``result()``).
        Raises :class:`UnknownSender`, :class:`SenderExcluded`, or :class:`BadContribution` (non-finite values,
        out-of-range offset/length, overlap with earlier chunks, a weight that is not finite and > 0 or differs
        from the sender's earlier weight, data after :meth:`sender_finished`).
        """
        self._check_known(sender)
        if sender in self._excluded:
            raise SenderExcluded(f"sender {sender!r} was excluded; its chunk at offset {offset} is ignored")
        if sender in self._finished:
            raise BadContribution(sender, f"chunk at offset {offset} arrived after the sender finished")
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or not values.dtype.is_floating_point:
            raise BadContribution(sender, "values must be a 1-D floating-point tensor")
        if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
            raise BadContribution(sender, f"offset must be an int, got {offset!r}")
        offset, length = int(offset), values.numel()
        if offset < 0 or offset + length > self.part_numel:
            raise BadContribution(
                sender, f"range [{offset}, {offset + length}) is outside the part [0, {self.part_numel})"
            )
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise BadContribution(sender, f"weight must be a real number, got {weight!r}")
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise BadContribution(sender, f"weight must be finite and > 0, got {weight!r}")
        if self._weights.get(sender, weight) != weight:
            raise BadContribution(sender, f"weight {weight!r} differs from its earlier weight {self._weights[sender]!r}")
        if values.dtype != self.dtype:
            values = values.to(self.dtype)  # convert first: a finite float64 may overflow a float32 buffer
        if not all_finite(values):
            raise BadContribution(sender, f"chunk at offset {offset} contains NaN or inf (in {self.dtype})")
        intervals = self._covered[sender]
        if length and not _insert_interval(intervals, offset, offset + length):
            raise BadContribution(sender, f"range [{offset}, {offset + length}) overlaps data it already sent")

        self._weights[sender] = weight
        if length and not copy and length == self.part_numel and values.is_contiguous():
            self._buffers[sender] = values
        elif length:
            buffer = self._buffers.get(sender)
            if buffer is None:
                buffer = self._buffers[sender] = torch.empty(self.part_numel, dtype=self.dtype)
            buffer[offset : offset + length].copy_(values)

    def sender_finished(self, sender: Hashable) -> None:
        """Declare that ``sender`` has sent everything; raises :class:`BadContribution` listing any missing ranges."""
        self._check_known(sender)
        if sender in self._excluded:
            raise SenderExcluded(f"sender {sender!r} was excluded")
        missing = self.missing_ranges(sender)
        if missing:
            raise BadContribution(sender, f"finished without sending ranges {missing}")
        self._finished.add(sender)

    def exclude(self, sender: Hashable) -> None:
        """Drop everything ``sender`` contributed, now and later (idempotent). The result averages the others."""
        self._check_known(sender)
        if sender in self._excluded:
            return
        self._excluded.add(sender)
        self._finished.discard(sender)
        self._buffers.pop(sender, None)
        self._weights.pop(sender, None)
        self._covered[sender] = []
        logger.debug("excluded sender %r from a part of %d elements", sender, self.part_numel)

    # ---------------------------------------------------------------- result

    def result(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted mean over the senders that were not excluded, as a 1-D tensor of ``part_numel`` elements.

        Steps: (1) check every remaining sender covered the whole part (else :class:`IncompleteReduction` with the
        missing ranges); (2) normalise weights ``w_i / sum(w)`` with exactly-rounded ``math.fsum``; (3) sum
        ``x_i * w_i / sum(w)`` over senders in sorted order, slab by slab, using separate multiply and add ops
        (no fused multiply-add), so the result is bit-identical for any arrival order.
        ``out`` (optional): a contiguous tensor of this reducer's dtype and size to write into.
        With ``clip_tau`` set, steps (2)-(3) are replaced by CenteredClip over the senders' vectors (``"auto"``: of
        the radius :func:`~averaging.robust.honest_spread_tau` measures on them).
        """
        active = self.active_senders
        if not active:
            raise IncompleteReduction("every sender was excluded: nothing to average", {})
        missing = {s: self.missing_ranges(s) for s in active}
        missing = {s: gaps for s, gaps in missing.items() if gaps}
        if missing:
            raise IncompleteReduction(f"senders have not covered the whole part yet; missing ranges: {missing}", missing)
        if out is None:
            out = torch.empty(self.part_numel, dtype=self.dtype)
        elif out.shape != (self.part_numel,) or out.dtype != self.dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {self.dtype} tensor of shape ({self.part_numel},)")
        if self.part_numel == 0:
            return out

        if self.clip_tau is not None and len(active) > 1:
            weights = torch.tensor([self._weights[s] for s in active], dtype=torch.float64)
            stacked = torch.stack([self._buffers[s] for s in active])
            tau = honest_spread_tau(stacked, weights) if self.clip_tau == "auto" else self.clip_tau
            if tau > 0:
                return out.copy_(centered_clip(stacked, weights, tau))
            return out.copy_(stacked[0])   # "auto" and every contribution the same: that is the mean
        total_weight = math.fsum(self._weights[s] for s in active)
        scales = [self._weights[s] / total_weight for s in active]
        buffers = [self._buffers[s] for s in active]
        if len(buffers) == 1:
            return out.copy_(buffers[0])
        scratch = torch.empty(min(_SLAB_ELEMS, self.part_numel), dtype=self.dtype)
        for start in range(0, self.part_numel, _SLAB_ELEMS):
            end = min(start + _SLAB_ELEMS, self.part_numel)
            acc, tmp = out[start:end], scratch[: end - start]
            torch.mul(buffers[0][start:end], scales[0], out=acc)
            for buffer, scale in zip(buffers[1:], scales[1:]):
                acc.add_(torch.mul(buffer[start:end], scale, out=tmp))
        if not all_finite(out):
            raise ReduceError("weighted mean overflowed the reducer dtype; use dtype=torch.float64")
        return out
