"""Int8 weights for small devices: per-output-channel symmetric quantization of a state dict.

A float tensor of two or more dimensions (a Linear or Embedding weight) is stored as int8 values and one
float32 scale per output channel (row): ``w ≈ q * scale``, ``scale = max|w_row| / 127``. That keeps each row's
largest weight exact and bounds every weight's error by half a step of its own row, so rows of very different
magnitudes do not share one coarse step. Vectors (biases, LayerNorm) stay float32: they are a tiny share of
the bytes and the most sensitive to rounding. Loading dequantizes to float32, so the model runs unchanged on
any device; the gain is the file (and download) size, about 4x.
"""
from __future__ import annotations

import torch

QUANTIZED = "int8_per_channel"


def quantize_tensor(w: torch.Tensor) -> dict:
    """``{"q": int8 tensor, "scale": float32 [rows, 1, ...]}`` of a float tensor ``w`` (two or more dims)."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.round(flat / scale).clamp_(-127, 127).to(torch.int8)
    return {"q": q.reshape(w.shape).contiguous(), "scale": scale.reshape(-1, *([1] * (w.dim() - 1)))}


def dequantize_tensor(packed: dict) -> torch.Tensor:
    """The float32 tensor :func:`quantize_tensor` approximated."""
    return packed["q"].float() * packed["scale"].float()


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | dict]:
    """Every float matrix of ``state`` quantized (:func:`quantize_tensor`); other tensors as float32 copies."""
    out: dict[str, torch.Tensor | dict] = {}
    for name, t in state.items():
        if t.is_floating_point() and t.dim() >= 2 and t.numel() >= 256:
            out[name] = quantize_tensor(t)
        else:
            out[name] = t.detach().float().clone() if t.is_floating_point() else t.detach().clone()
    return out


def dequantize_state(state: dict[str, torch.Tensor | dict]) -> dict[str, torch.Tensor]:
    """A plain float32 state dict from :func:`quantize_state`'s output (plain tensors pass through)."""
    return {name: dequantize_tensor(t) if isinstance(t, dict) else t for name, t in state.items()}
