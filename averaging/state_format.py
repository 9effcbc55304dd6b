"""The byte format of a shared state (*blob*): metadata and tensors, without pickle, plus its piece hashes.

Layout, written by :func:`encode_state` and checked by :func:`decode_state` (donors are untrusted peers,
so decoding validates everything and never executes anything)::

    b"STST" | header length (4 bytes, big-endian)
    | msgpack {"v": 1, "metadata": {..., "step": int}, "tensors": [[dtype name, shape], ...]}
    | each tensor's raw bytes (C order, little-endian as on every host we run), each starting at a multiple of 64

Offsets are not stored: they follow from the shapes, and the blob must end exactly after the last tensor.
A blob is hashed in pieces of ``piece_bytes``; its digest (:func:`state_digest`) is the SHA-256 of the
concatenated piece SHA-256s, so a downloader can verify each piece on arrival and blame whoever sent it.
"""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from typing import Any

import torch

from p2p import ProtocolViolation, pack, unpack

MAGIC = b"STST"
FORMAT_VERSION = 1
ALIGN = 64
MAX_HEADER_BYTES = 16 << 20
MAX_NDIM = 32
_PREFIX = struct.Struct(">4sI")
MIN_BLOB_BYTES = _PREFIX.size
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)}
_DTYPE_NAMES = {d: name for name, d in _DTYPES.items()}


class StateFormatError(ValueError):
    """A state blob (or one of its pieces) is malformed or does not match its hash."""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _layout(header_bytes: int, specs: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> tuple[list[int], int]:
    """Offsets of each tensor's bytes and the blob's total size."""
    offsets, end = [], _PREFIX.size + header_bytes
    for dtype, shape in specs:
        offsets.append(_align(end))
        end = offsets[-1] + math.prod(shape) * dtype.itemsize
    return offsets, end


def check_step(metadata: Any) -> int:
    """``metadata["step"]``; :class:`StateFormatError` unless metadata is a dict with an int step >= 0."""
    if not isinstance(metadata, dict) or type(metadata.get("step")) is not int or metadata["step"] < 0:
        raise StateFormatError("state metadata must be a dict with an int 'step' >= 0")
    return metadata["step"]


def encode_state(metadata: dict, tensors: Sequence[torch.Tensor]) -> bytearray:
    """Serialize ``metadata`` (msgpack-able dict with int ``"step"``) and dense CPU-copyable tensors to a blob."""
    check_step(metadata)
    flat, specs = [], []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.dtype not in _DTYPE_NAMES:
            raise StateFormatError(f"tensor {i} must be a dense tensor of one of {sorted(_DTYPES)}, got {t!r:.80}")
        t = t.detach().to("cpu").contiguous()
        flat.append(t.reshape(-1).view(torch.uint8) if t.numel() else None)
        specs.append((t.dtype, tuple(t.shape)))
    try:
        header = pack({"v": FORMAT_VERSION, "metadata": metadata,
                       "tensors": [[_DTYPE_NAMES[d], list(s)] for d, s in specs]})
    except Exception as e:
        raise StateFormatError(f"state metadata is not msgpack-serializable: {e}") from None
    offsets, total = _layout(len(header), specs)
    blob = bytearray(total)
    blob[:_PREFIX.size + len(header)] = _PREFIX.pack(MAGIC, len(header)) + header
    for data, offset in zip(flat, offsets):
        if data is not None:
            torch.frombuffer(blob, dtype=torch.uint8, count=data.numel(), offset=offset).copy_(data)
    return blob


def decode_state(blob: bytearray | bytes | memoryview) -> tuple[dict, list[torch.Tensor]]:
    """Parse a blob from :func:`encode_state`; raises :class:`StateFormatError` on anything inconsistent.

    The tensors share memory with ``blob`` (copied first if it is read-only).
    """
    if not isinstance(blob, bytearray):
        blob = bytearray(blob)
    if len(blob) < _PREFIX.size:
        raise StateFormatError(f"state blob of {len(blob)} bytes is too short")
    magic, header_bytes = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise StateFormatError(f"not a state blob (magic {magic!r})")
    if header_bytes > min(MAX_HEADER_BYTES, len(blob) - _PREFIX.size):
        raise StateFormatError(f"header length {header_bytes} does not fit a {len(blob)}-byte blob")
    try:
        header = unpack(bytes(blob[_PREFIX.size:_PREFIX.size + header_bytes]), MAX_HEADER_BYTES)
    except ProtocolViolation as e:
        raise StateFormatError(f"state header: {e}") from None
    if not isinstance(header, dict) or header.get("v") != FORMAT_VERSION or not isinstance(header.get("tensors"), list):
        raise StateFormatError(f"state header must be {{'v': {FORMAT_VERSION}, 'metadata', 'tensors'}}")
    metadata = header.get("metadata")
    check_step(metadata)
    specs = []
    for i, spec in enumerate(header["tensors"]):
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and spec[0] in _DTYPES
                and isinstance(spec[1], list) and len(spec[1]) <= MAX_NDIM
                and all(type(n) is int and 0 <= n < 1 << 48 for n in spec[1])):
            raise StateFormatError(f"tensor {i}: bad spec {spec!r:.100} (want [dtype, [dims >= 0]])")
        specs.append((_DTYPES[spec[0]], tuple(spec[1])))
    offsets, total = _layout(header_bytes, specs)
    if total != len(blob):
        raise StateFormatError(f"header describes a {total}-byte blob but it has {len(blob)} bytes")
    tensors = []
    for i, ((dtype, shape), offset) in enumerate(zip(specs, offsets)):
        numel = math.prod(shape)
        if numel == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        if dtype == torch.bool and torch.frombuffer(blob, dtype=torch.uint8, count=numel, offset=offset).max() > 1:
            raise StateFormatError(f"tensor {i}: bool tensor holds bytes other than 0 and 1")
        tensors.append(torch.frombuffer(blob, dtype=dtype, count=numel, offset=offset).view(shape))
    return metadata, tensors


def piece_hashes(blob: bytes | bytearray | memoryview, piece_bytes: int) -> bytes:
    """Concatenated SHA-256 digests of consecutive ``piece_bytes``-long pieces of ``blob``."""
    view = memoryview(blob).cast("B")
    return b"".join(hashlib.sha256(view[i:i + piece_bytes]).digest() for i in range(0, len(view), piece_bytes))


def state_digest(hashes: bytes) -> str:
    """The announced ``sha256`` of a blob: hex SHA-256 of its :func:`piece_hashes`."""
    return hashlib.sha256(hashes).hexdigest()


def tensors_digest(tensors: Sequence[torch.Tensor]) -> str:
    """The ``state_hash`` of a state: hex SHA-256 over each tensor's dtype, shape and bytes (C order), metadata
    left out, so every peer holding the same tensors — all members of one averaging round — has the same one."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        digest.update(pack([_DTYPE_NAMES.get(t.dtype, str(t.dtype)), list(t.shape)]))
        if t.numel():
            digest.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()
