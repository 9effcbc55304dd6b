"""Wire compression of float32 chunks exchanged during decentralized averaging.

A *chunk* is a 1-D, contiguous, float32 CPU tensor (a slice of a peer's flat parameter/gradient buffer).
Every compression turns a chunk into ``bytes`` and back:

* :class:`NoCompression` (``"none"``): raw little-endian float32; decompression is zero-copy.
* :class:`Float16Compression` (``"fp16"``): IEEE half precision, saturating at +-65504.
* :class:`Uint8BlockwiseCompression` (``"int8"``): 8-bit blockwise linear quantization.
* :class:`Uint4BlockwiseCompression` (``"int4"``): the same with 4 bits, two codes per byte.

Each compression knows the exact size of its output for a given number of elements
(:meth:`Compression.bytes_for`), so a receiver can pre-size buffers and validate what arrives.
:func:`choose_compression` keeps small tensors uncompressed; error feedback over rounds lives in the
averager (``AveragerConfig(error_feedback=True)``).

Byte order: all multi-byte fields are in the machine's native byte order, which is little-endian on
every platform we support (x86-64, aarch64); a big-endian host is rejected at import time.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from p2p.streams import DEFAULT_CHUNK_BYTES

logger = logging.getLogger(__name__)

if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in the swarm
    raise ImportError("swarmtrain's wire format assumes a little-endian host")

Buffer = bytes | bytearray | memoryview

FLOAT16_MAX = 65504.0


def _check_chunk(chunk: torch.Tensor) -> None:
    """Raise ValueError unless ``chunk`` is a 1-D contiguous float32 CPU tensor."""
    if not isinstance(chunk, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor chunk, got {type(chunk).__name__}")
    if chunk.dtype != torch.float32 or chunk.device.type != "cpu" or chunk.dim() != 1:
        raise ValueError(
            f"chunk must be a 1-D float32 CPU tensor, got dtype={chunk.dtype}, device={chunk.device}, "
            f"shape={tuple(chunk.shape)}"
        )
    if not chunk.is_contiguous():
        raise ValueError("chunk must be contiguous (call .contiguous() before compressing)")


def _view_as(data: Buffer, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
    """Zero-copy view of ``count`` items of ``dtype`` starting ``offset`` bytes into ``data``."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=dtype, count=count, offset=offset)


class Compression(ABC):
    """A way to encode a float32 chunk as bytes. Subclasses are immutable, stateless and thread-safe."""

    name: str

    @abstractmethod
    def bytes_for(self, numel: int) -> int:
        """Exact size in bytes of ``compress(chunk)`` for a chunk of ``numel`` elements."""

    @abstractmethod
    def compress(self, chunk: torch.Tensor) -> bytes:
        """Encode a 1-D contiguous float32 CPU tensor."""

    @abstractmethod
    def _decode(self, data: Buffer, numel: int, out: torch.Tensor | None) -> torch.Tensor:
        """Decode bytes whose length has already been validated (into ``out`` if given)."""

    def decompress(self, data: Buffer, numel: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``data`` (the output of :meth:`compress`) into a float32 tensor of ``numel`` elements.

        Raises ValueError if ``len(data)`` is not exactly :meth:`bytes_for` ``(numel)`` or the data is corrupt.
        ``out`` (optional): a 1-D contiguous float32 CPU tensor of ``numel`` elements to decode into, e.g. a slice
        of the flat buffer; it is returned. Without ``out`` the result may share memory with ``data`` (see
        :class:`NoCompression`): treat it as read-only.
        """
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"numel must be a non-negative int, got {numel!r}")
        if isinstance(data, memoryview) and (data.itemsize != 1 or not data.c_contiguous):
            data = data.cast("B") if data.c_contiguous else data.tobytes()
        expected = self.bytes_for(numel)
        if len(data) != expected:
            raise ValueError(
                f"{self.name} chunk of {numel} elements must be {expected} bytes, got {len(data)} bytes"
            )
        if out is not None:
            _check_chunk(out)
            if out.numel() != numel:
                raise ValueError(f"out has {out.numel()} elements, expected {numel}")
        return self._decode(data, numel, out)


@dataclass(frozen=True)
class NoCompression(Compression):
    """Raw float32 bytes (4 bytes per element). Lossless; decompression is a zero-copy view."""

    name: str = field(default="none", init=False)

    def bytes_for(self, numel: int) -> int:
        return 4 * numel

    def compress(self, chunk: torch.Tensor) -> bytes:
        _check_chunk(chunk)
        return chunk.detach().numpy().tobytes()

    def _decode(self, data: Buffer, numel: int, out: torch.Tensor | None) -> torch.Tensor:
        view = _view_as(data, torch.float32, numel)  # zero-copy: aliases ``data``, callers must not modify it
        return view if out is None else out.copy_(view)


@dataclass(frozen=True)
class Float16Compression(Compression):
    """IEEE float16 (2 bytes per element).

    Relative error <= 2**-11 for |x| in the normal fp16 range [6.1e-5, 65504]; smaller magnitudes have absolute
    error <= 2**-25. Finite values beyond +-65504 saturate to +-65504 (never inf). An infinite input raises
    ValueError; NaN is passed through (receivers reject it, see :class:`averaging.reduce.PartReducer`).
    """

    name: str = field(default="fp16", init=False)

    def bytes_for(self, numel: int) -> int:
        return 2 * numel

    def compress(self, chunk: torch.Tensor) -> bytes:
        _check_chunk(chunk)
        chunk = chunk.detach()
        half = np.empty(chunk.numel(), dtype=np.float16)
        half_tensor = torch.from_numpy(half).copy_(chunk)
        if chunk.numel():
            lo, hi = torch.aminmax(half_tensor)  # fast on 2-byte data; inf here means overflow (or inf input)
            if math.isinf(lo.item()) or math.isinf(hi.item()):
                if torch.isinf(chunk).any():
                    raise ValueError("cannot compress a chunk containing +-inf")
                half_tensor.clamp_(-FLOAT16_MAX, FLOAT16_MAX)
        return half.tobytes()

    def _decode(self, data: Buffer, numel: int, out: torch.Tensor | None) -> torch.Tensor:
        view = _view_as(data, torch.float16, numel)
        return view.to(torch.float32) if out is None else out.copy_(view)


@dataclass(frozen=True)
class Uint8BlockwiseCompression(Compression):
    """8-bit blockwise linear quantization (about 1 byte per element).

    Algorithm, per block of ``block_size`` consecutive elements (the last block may be shorter):

    1. ``lo, hi = min(block), max(block)``; ``half_span = hi/2 - lo/2``; ``center = lo + half_span``;
       ``step = half_span / 127.5`` (halving first keeps everything finite even when ``hi - lo`` would overflow).
    2. ``code = floor(clamp((x - center) / step + 128, 0, 255))``, i.e. ``(x - center) / step + 127.5`` rounded
       to the nearest integer, stored as uint8.
    3. Decoding: ``x' = center + (code - 127.5) * step``.

    Since ``step = (hi - lo) / 255``, the error per element is at most ``(hi - lo) / 255 / 2`` plus float32
    rounding (relative to the block's magnitude, or below 1e-43 absolute at subnormal scale). A constant block is
    reproduced exactly.

    Wire layout for ``n`` elements in ``b = ceil(n / block_size)`` blocks:
    ``center: float32[b] | step: float32[b] | codes: uint8[n]`` -> ``8 * b + n`` bytes.
    Non-finite input raises ValueError; a header with non-finite values raises ValueError on decompression.
    Decoding uses only separately rounded IEEE operations (no fused multiply-add), so every peer decodes the same
    bytes to the same bits. Work is done slab by slab (``slab_elems``, rounded to whole blocks) so float
    temporaries stay in cache; ``slab_elems`` does not affect the wire format.
    """

    block_size: int = 4096
    name: str = field(default="int8", init=False)
    slab_elems: int = field(default=1 << 18, repr=False, compare=False)
    levels = 255          # codes 0..levels; a subclass with fewer levels packs them tighter (see _pack)

    def __post_init__(self):
        for attr in ("block_size", "slab_elems"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{attr} must be a positive int, got {value!r}")

    def num_blocks(self, numel: int) -> int:
        """Number of quantization blocks for ``numel`` elements."""
        return -(-numel // self.block_size)

    def bytes_for(self, numel: int) -> int:
        return 8 * self.num_blocks(numel) + self._code_bytes(numel)

    @staticmethod
    def _code_bytes(numel: int) -> int:
        return numel

    @staticmethod
    def _pack(codes: np.ndarray) -> bytes | np.ndarray:
        return codes

    @staticmethod
    def _unpack(data: Buffer, offset: int, numel: int) -> torch.Tensor:
        return _view_as(data, torch.uint8, numel, offset=offset)

    def _slabs(self, numel: int) -> Iterator[tuple[int, int, int]]:
        """Yield ``(first_block, start, end)`` of consecutive slabs made of whole blocks."""
        slab = max(1, self.slab_elems // self.block_size) * self.block_size
        for start in range(0, numel, slab):
            yield start // self.block_size, start, min(start + slab, numel)

    def _rows(self, *flats: torch.Tensor) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
        """Cut equally long flat tensors that start at a block boundary into 2-D ``[blocks, block_size]`` views.

        Yields ``(first_block, views)`` twice at most: once for all full blocks, once for the shorter tail block.
        """
        numel, bs = flats[0].numel(), self.block_size
        full = numel // bs
        if full:
            yield 0, tuple(f[: full * bs].view(full, bs) for f in flats)
        if numel % bs:
            yield full, tuple(f[full * bs :].view(1, numel - full * bs) for f in flats)

    def compress(self, chunk: torch.Tensor) -> bytes:
        _check_chunk(chunk)
        chunk = chunk.detach()
        numel = chunk.numel()
        nblocks = self.num_blocks(numel)
        header = torch.empty(2, nblocks, dtype=torch.float32)
        centers, steps = header[0], header[1]
        codes = np.empty(numel, dtype=np.uint8)
        codes_tensor = torch.from_numpy(codes)
        work = torch.empty(min(numel, max(1, self.slab_elems // self.block_size) * self.block_size))
        for first_block, start, end in self._slabs(numel):
            for b0, (x, t) in self._rows(chunk[start:end], work[: end - start]):
                blocks = slice(first_block + b0, first_block + b0 + x.shape[0])
                # Step 1: per-block center and step (amin + amax is much faster than aminmax along a dim).
                lo, half_span = torch.amin(x, dim=1), torch.amax(x, dim=1)
                half_span.mul_(0.5).sub_(lo * 0.5)
                center, step = torch.add(lo, half_span, out=centers[blocks]), steps[blocks]
                torch.div(half_span, self.levels / 2, out=step)
                if not bool(torch.isfinite(header[:, blocks]).all()):
                    raise ValueError("cannot compress a chunk containing NaN or +-inf")
                # Step 2: codes. Divide (1/step overflows for subnormal steps); step 0 means x == center.
                # Adding 127.5 + 0.5 and clamping to [0, 255] lets the truncating float->uint8 copy round to
                # nearest. The clamp matters only for subnormal steps, whose rounding error can be large.
                divisor = torch.where(step > 0, step, torch.ones_like(step))
                torch.sub(x, center[:, None], out=t)
                t.div_(divisor[:, None]).add_(self.levels / 2 + 0.5).clamp_(0.0, float(self.levels))
            codes_tensor[start:end].copy_(work[: end - start])
        return b"".join((header.numpy(), self._pack(codes)))

    def _decode(self, data: Buffer, numel: int, out: torch.Tensor | None) -> torch.Tensor:
        nblocks = self.num_blocks(numel)
        result = torch.empty(numel, dtype=torch.float32) if out is None else out
        if numel == 0:
            return result
        centers = _view_as(data, torch.float32, nblocks, offset=0)
        steps = _view_as(data, torch.float32, nblocks, offset=4 * nblocks)
        codes = self._unpack(data, 8 * nblocks, numel)
        if not (bool(torch.isfinite(centers).all()) and bool(torch.isfinite(steps).all()) and bool((steps >= 0).all())):
            raise ValueError("corrupt int8 chunk: block header contains NaN, inf or a negative step")
        for first_block, start, end in self._slabs(numel):
            values = result[start:end]
            values.copy_(codes[start:end])
            for b0, (rows,) in self._rows(values):
                blocks = slice(first_block + b0, first_block + b0 + rows.shape[0])
                rows.sub_(self.levels / 2).mul_(steps[blocks, None]).add_(centers[blocks, None])
        # center + 127.5 * step can exceed float32 max by a rounding error only when a block spans ~2 * max.
        if (centers.abs() + self.levels / 2 * steps.double()).max().item() >= torch.finfo(torch.float32).max / 2:
            result.clamp_(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)
        return result


@dataclass(frozen=True)
class Uint4BlockwiseCompression(Uint8BlockwiseCompression):
    """4-bit blockwise linear quantization (about half a byte per element): :class:`Uint8BlockwiseCompression`'s
    algorithm with codes ``0..15`` (``step = half_span / 7.5``, error at most ``(hi - lo) / 15 / 2`` per element),
    two codes per byte (element ``2i`` in the low nibble, ``2i + 1`` in the high one).

    Meant for DiLoCo's pseudo-gradients, with error feedback (``AveragerConfig(error_feedback=True)``) so what one round loses
    is sent in the next. Wire layout: ``center: float32[b] | step: float32[b] | codes: uint8[ceil(n / 2)]``.
    """

    block_size: int = 1024
    name: str = field(default="int4", init=False)
    levels = 15

    @staticmethod
    def _code_bytes(numel: int) -> int:
        return (numel + 1) // 2

    @staticmethod
    def _pack(codes: np.ndarray) -> np.ndarray:
        if codes.size % 2:
            codes = np.append(codes, np.uint8(0))
        return codes[0::2] | (codes[1::2] << 4)

    @staticmethod
    def _unpack(data: Buffer, offset: int, numel: int) -> torch.Tensor:
        packed = _view_as(data, torch.uint8, (numel + 1) // 2, offset=offset)
        codes = torch.stack((packed & 15, packed >> 4), dim=1).view(-1)
        return codes[:numel]


_COMPRESSIONS = {"none": NoCompression, "fp16": Float16Compression, "int8": Uint8BlockwiseCompression,
                 "int4": Uint4BlockwiseCompression}


def get_compression(name: str, **kwargs) -> Compression:
    """Build a compression by its wire name: ``"none"``, ``"fp16"`` or ``"int8"`` (kwargs go to its constructor)."""
    try:
        return _COMPRESSIONS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown compression {name!r}; expected one of {sorted(_COMPRESSIONS)}") from None


def choose_compression(
    tensor_numel: int, requested_name: str, min_numel_to_compress: int = 65536
) -> Compression:
    """Compression for a tensor of ``tensor_numel`` elements: ``requested_name``, or ``"none"`` if it is small.

    Small tensors (biases, norms) are cheap to send exactly, and their values often matter more per element.
    """
    requested = get_compression(requested_name)  # validates the name even for small tensors
    return NoCompression() if tensor_numel < min_numel_to_compress else requested


def default_chunk_elems(compression: Compression, target_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Elements per chunk so that one compressed chunk is about ``target_bytes``."""
    per_elem = max(compression.bytes_for(1 << 16) / (1 << 16), 1e-3)
    return max(1024, int(math.floor(target_bytes / per_elem)))
