"""One self-contained file holding a whole model: its config, the dense state and every expert's weights.

The file is a ``torch.save`` of a plain dict (loaded with ``weights_only=True``: no code runs on load)::

    {"format": "swarmtrain-model/1", "config": {ModelConfig fields}, "quantized": None | "int8_per_channel",
     "state": {name: tensor, or {"q", "scale"} when quantized}, "tied": {name: name it shares}, "meta": {...}}

``state`` is the state dict of a :class:`~peer.training.model.MoETransformer` built with in-process experts
(:class:`~peer.moe.local.LocalMixtureOfExperts`): the expert of UID ``uids[i]`` of layer ``l`` is
``blocks.<l>.moe.experts.<i>``, so the file runs on one device with no swarm. A tensor tied to another (the
LM head is the token embedding) is stored once. ``meta`` says where the weights came from (swarm, averaging
step, the experts' hosts and update counts).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from peer.checkpoint import save_checkpoint
from peer.config import ModelConfig
from peer.training.model import MoETransformer

from .quantize import QUANTIZED, dequantize_state, quantize_state

FORMAT = "swarmtrain-model/1"


class ModelFileError(ValueError):
    """A file is not a model file of ours, or its weights do not fit its config."""


def _tied(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor shares storage with an earlier name's (stored once)."""
    seen: dict[tuple[int, int, tuple], str] = {}
    tied = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def save_model(path: str | os.PathLike, model: MoETransformer, *, quantize: str | None = None,
               meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (in-process experts) to ``path`` atomically; ``quantize``: None or ``"int8"``."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    state = model.state_dict()
    tied = _tied(state)
    state = {name: t.detach().cpu() for name, t in state.items() if name not in tied}
    payload = {"format": FORMAT, "config": dataclasses.asdict(model.config), "tied": tied, "meta": dict(meta or {}),
               "quantized": QUANTIZED if quantize else None,
               "state": quantize_state(state) if quantize else {n: t.float().clone() for n, t in state.items()}}
    return save_checkpoint(path, payload)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[MoETransformer, dict]:
    """The model in ``path`` (on ``device``, in eval mode) and its ``meta``; :class:`ModelFileError` if the
    file is not one of ours or its weights do not match its config."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except Exception as e:  # pickle, zip or weights-only errors: not a torch file of plain data
        raise ModelFileError(f"{path}: not a model file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"{path}: not a {FORMAT} file (format {found!r}); make one with `python -m peer export`")
    try:
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        config = ModelConfig(**{k: v for k, v in payload["config"].items() if k in fields})
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{path}: bad config: {e}") from None
    state = dequantize_state(payload.get("state") or {}) if payload.get("quantized") else dict(payload.get("state") or {})
    for name, source in (payload.get("tied") or {}).items():
        if source in state:
            state[name] = state[source]
    model = MoETransformer(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(expected) & set(state) if tuple(expected[n].shape) != tuple(state[n].shape))
    if missing or unexpected or wrong:
        shapes = ", ".join(f"{n} {list(state[n].shape)} (config says {list(expected[n].shape)})" for n in wrong[:3])
        raise ModelFileError(f"{path}: weights do not fit its config: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}, wrong shapes {shapes or '[]'}")
    if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        raise ModelFileError(f"{path}: weights hold NaN or Inf")
    model.load_state_dict(state)
    return model.to(device).eval(), dict(payload.get("meta") or {})
