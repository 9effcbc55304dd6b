"""Error feedback (EF-SGD): what lossy compression lost in one round is sent again in the next.

Each chunk slot of a round is keyed ``(kind, first, end)`` by its element range: ``("sent", a, b)`` for our
contribution to elements ``a:b``, ``("result", a, b)`` for the mean of a part we reduce. A round works on a
:class:`RoundFeedback`: it compresses through it (adding what the slot lost before, staging what it
loses now) and marks residuals it used up. Only a successful round's staged residuals are adopted
(:meth:`ErrorFeedback.adopt`): a failed round's data was never applied, so its loss must not be sent again.
"""
from __future__ import annotations

import torch

from .compression import Compression

Slot = tuple[str, int, int]


class ErrorFeedback:
    """The residuals kept across successful rounds of one averager: at most one per element and kind."""

    def __init__(self) -> None:
        self.kept: dict[Slot, torch.Tensor] = {}

    def adopt(self, staged: dict[Slot, torch.Tensor | None]) -> None:
        """Keep a successful round's residuals. A slot the round did not touch keeps its residual (next round
        may send that range again); one it used up (None) is dropped, and so is any old slot that overlaps a
        new one without being the same range (the group, hence the part layout, changed)."""
        for key, residual in staged.items():
            kind, a, b = key
            for old in [k for k in self.kept if k[0] == kind and k != key and k[1] < b and a < k[2]]:
                del self.kept[old]
            if residual is None:
                self.kept.pop(key, None)
            else:
                self.kept[key] = residual


class RoundFeedback:
    """One round's view of :class:`ErrorFeedback` (or of none: then it only compresses)."""

    def __init__(self, feedback: ErrorFeedback | None, compression: Compression):
        self.feedback, self.compression = feedback, compression
        self.lossy = feedback is not None and compression.name != "none"
        self.staged: dict[Slot, torch.Tensor | None] = {}

    def take(self, key: Slot) -> torch.Tensor | None:
        """The residual kept for ``key``, marked used up by this round (for values that go in exactly)."""
        residual = self.feedback.kept.get(key) if self.feedback is not None else None
        if residual is not None:
            self.staged[key] = None
        return residual

    def compress(self, key: Slot, values: torch.Tensor, out: torch.Tensor | None = None) -> bytes:
        """Compress ``values`` (decoding into ``out`` if given), corrected by and staging ``key``'s residual."""
        previous = self.feedback.kept.get(key) if self.lossy else None
        corrected = values + previous if previous is not None else values.clone() if self.lossy else values
        blob = self.compression.compress(corrected)
        if out is not None or self.lossy:
            decoded = self.compression.decompress(blob, values.numel(), out=out)
            if self.lossy:
                self.staged[key] = corrected.sub_(decoded)
        return blob

    def adopt(self) -> None:
        """The round succeeded: its residuals become the ones kept."""
        if self.feedback is not None:
            self.feedback.adopt(self.staged)
