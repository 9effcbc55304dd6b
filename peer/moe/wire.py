"""Wire format of the expert protocol: tensors as raw bytes inside msgpack, and the RPC names.

A tensor travels as ``[dtype: str, shape: list[int], data: bytes]`` where ``data`` is the C-contiguous
little-endian buffer (``dtype`` one of :data:`WIRE_DTYPES`). Decoding checks every field and that the
byte count matches the shape before allocating anything, so a malformed message raises
:class:`InvalidTensorMessage` instead of producing a wrong tensor.

RPC methods of the ``experts`` service (see :mod:`peer.hosting.server`):

* ``forward {"uid", "x"} -> {"y"}``
* ``backward {"uid", "x", "grad"} -> {"grad_x"}`` (also applies one optimizer step on the server)
* ``info {"uid"} -> ExpertBackend.info()``; ``info {}`` -> ``{"uids", "peer_id", "stats"}``
"""
from __future__ import annotations

import math
import sys
from typing import Any

import torch

SERVICE = "experts"
WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                       "bfloat16": torch.bfloat16, "float64": torch.float64}
_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}
MAX_DIMS = 8


class InvalidTensorMessage(ValueError):
    """A serialized tensor is malformed: unknown dtype, bad shape, or a byte count that does not match."""


def tensor_to_wire(tensor: torch.Tensor) -> list:
    """``[dtype, shape, bytes]`` of ``tensor`` (moved to the CPU; gradients detached)."""
    if tensor.dtype not in _NAMES:
        raise InvalidTensorMessage(f"cannot send a {tensor.dtype} tensor; supported: {sorted(WIRE_DTYPES)}")
    tensor = tensor.detach().to("cpu").contiguous()
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""  # 0-dim too
    if sys.byteorder != "little":  # pragma: no cover - every platform torch supports today is little-endian
        raise InvalidTensorMessage("big-endian hosts are not supported by the tensor wire format")
    return [_NAMES[tensor.dtype], list(tensor.shape), data]


def tensor_from_wire(obj: Any, what: str = "tensor") -> torch.Tensor:
    """Decode :func:`tensor_to_wire` output; raises :class:`InvalidTensorMessage` naming ``what`` if malformed."""
    if not (isinstance(obj, (list, tuple)) and len(obj) == 3):
        raise InvalidTensorMessage(f"{what}: expected [dtype, shape, bytes], got {type(obj).__name__}")
    dtype_name, shape, data = obj
    dtype = WIRE_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise InvalidTensorMessage(f"{what}: unsupported dtype {dtype_name!r}; supported: {sorted(WIRE_DTYPES)}")
    if not (isinstance(shape, (list, tuple)) and len(shape) <= MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InvalidTensorMessage(f"{what}: shape must be a list of at most {MAX_DIMS} non-negative ints, "
                                   f"got {shape!r}")
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidTensorMessage(f"{what}: data must be bytes, got {type(data).__name__}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise InvalidTensorMessage(f"{what}: {len(data)} bytes do not fit shape {list(shape)} of {dtype_name} "
                                   f"({expected} bytes)")
    if not expected:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(tuple(shape))
