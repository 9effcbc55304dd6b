"""Byte-level training data: the embedded corpus, train/eval splits and per-peer batch streams.

Text is treated as raw UTF-8 bytes (vocabulary 256), so any text works without a tokenizer.
The default corpus ``peer/training/data/corpus.txt`` ships with the package (built from CPython's own
documentation, see ``peer/training/data/README.md``), so training never needs a download.

Sharding rule: the training bytes are cut into stripes of :data:`STRIPE_BYTES`; stripe ``k`` belongs to
shard ``k mod n``, and peer ``i`` of ``n`` draws its windows only from inside its own stripes. Peers never
see the same bytes, yet every shard samples the whole corpus evenly (contiguous quarters of a corpus
made of documents would give each peer different topics, and their models would drift apart between
averaging rounds). Each peer's random order comes from its own seed ``(seed, i, n)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

DEFAULT_CORPUS = Path(__file__).with_name("corpus.txt")

PathLike = str | os.PathLike


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid UTF-8: {error}") from error


def load_corpus(path: PathLike | None = None) -> str:
    """Return training text: the embedded corpus (``path=None``), one file, or a directory's ``*.txt`` files.

    A directory's ``.txt`` files (searched recursively) are read in sorted path order and joined with
    blank lines. Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a directory with
    no .txt file, an empty text or a file that is not UTF-8.
    """
    path = DEFAULT_CORPUS if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"directory {path} contains no .txt files")
        text = "\n\n".join(_read_text(p) for p in files)
    else:
        text = _read_text(path)
    if not text:
        raise ValueError(f"corpus {path} is empty")
    return text


class ByteDataset:
    """Fixed-length windows of a byte stream for next-byte prediction.

    Args:
        text_or_paths: the text itself (``str`` or ``bytes``), or a ``pathlib.Path`` / list of paths
            read with :func:`load_corpus` (note: a plain ``str`` is always taken as text, not a path).
        block_size: window length; item ``i`` is ``(x, y) = (data[i:i+block], data[i+1:i+block+1])``.
        split: ``"train"`` (the first ``1 - eval_fraction`` of the bytes) or ``"eval"`` (the rest).
        eval_fraction: share of the bytes held out for evaluation, in (0, 1).

    ``self.data`` is the split's bytes as a uint8 tensor; ``len(dataset)`` is the number of windows.
    """

    def __init__(self, text_or_paths: str | bytes | PathLike | Sequence[PathLike], block_size: int,
                 split: str = "train", eval_fraction: float = 0.05):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if isinstance(text_or_paths, str):
            raw = text_or_paths.encode("utf-8")
        elif isinstance(text_or_paths, (bytes, bytearray)):
            raw = bytes(text_or_paths)
        elif isinstance(text_or_paths, os.PathLike):
            raw = load_corpus(text_or_paths).encode("utf-8")
        else:
            raw = "\n\n".join(load_corpus(p) for p in text_or_paths).encode("utf-8")
        boundary = len(raw) - int(len(raw) * eval_fraction)
        part = raw[:boundary] if split == "train" else raw[boundary:]
        if len(part) < block_size + 1:
            raise ValueError(f"{split} split has {len(part)} bytes; need at least block_size + 1 = {block_size + 1}")
        self.block_size, self.split = block_size, split
        self.data = torch.frombuffer(bytearray(part), dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.data) - self.block_size

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the window starting at byte ``start`` as ``(x, y)`` LongTensors of length block_size."""
        if not 0 <= start < len(self):
            raise IndexError(f"window start {start} outside [0, {len(self)})")
        chunk = self.data[start:start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


STRIPE_BYTES = 16384


def shard_ranges(dataset: ByteDataset, shard: tuple[int, int]) -> torch.Tensor:
    """The ``[first, last)`` byte ranges of shard ``shard = (i, n)`` of ``dataset``, as an int64 tensor ``[k, 2]``.

    Stripes are :data:`STRIPE_BYTES` long (at least two windows); shard ``i`` holds stripes ``i, i + n, ...``
    that fit at least one whole window. Shards are disjoint and together cover the data.
    """
    index, count = shard
    if not isinstance(count, int) or count < 1 or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    total, window = len(dataset.data), dataset.block_size + 1
    stripe = max(STRIPE_BYTES, 2 * window)
    firsts = torch.arange(index * stripe, max(total, index * stripe), count * stripe, dtype=torch.int64)
    ranges = torch.stack([firsts, (firsts + stripe).clamp(max=total)], dim=1)
    ranges = ranges[ranges[:, 1] - ranges[:, 0] >= window]
    if not len(ranges):
        raise ValueError(f"shard {shard} holds no window of {window} bytes: {total} bytes cut into stripes of "
                         f"{stripe} give shard {index} none (use fewer shards or a bigger corpus)")
    return ranges


def batches(dataset: ByteDataset, batch_size: int, seed: int = 0,
            shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` LongTensors ``[batch_size, block_size]`` forever, sampling windows inside one shard.

    Each window lies entirely inside one stripe of shard ``i`` of ``n`` (see :func:`shard_ranges`), at a
    uniformly random position of the shard's bytes. The sequence is deterministic for a given
    ``(seed, i, n)`` and differs between peers.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ranges = shard_ranges(dataset, shard)
    block = dataset.block_size
    starts_per_range = ranges[:, 1] - ranges[:, 0] - block      # window starts that fit in each stripe
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *shard]).generate_state(1)[0]))
    offsets = torch.arange(block + 1)
    while True:
        which = torch.multinomial(starts_per_range.double(), batch_size, replacement=True, generator=generator)
        within = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * starts_per_range[which]).long()
        starts = ranges[which, 0] + within
        windows = dataset.data[starts[:, None] + offsets].long()
        yield windows[:, :-1], windows[:, 1:]


def eval_batches(dataset: ByteDataset, batch_size: int,
                 max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield consecutive non-overlapping windows from the start of ``dataset`` (finite, deterministic)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    starts = torch.arange(0, len(dataset), dataset.block_size)
    offsets = torch.arange(dataset.block_size + 1)
    for number, first in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and number >= max_batches:
            return
        windows = dataset.data[starts[first:first + batch_size, None] + offsets].long()
        yield windows[:, :-1], windows[:, 1:]
