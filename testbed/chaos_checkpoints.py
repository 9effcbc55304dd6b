"""Checks on files of ``bench/chaos.py``: trainers' and expert hosts' checkpoints, and the trainers' dense weights.

* :func:`verify_checkpoints` -- every ``*.pt`` of a directory must load with the project's own loader
  (:func:`peer.checkpoint.load_checkpoint`) and hold only finite tensors;
* :func:`dense_spread` -- how far apart the trainers' averaged dense weights are, next to how far one
  outer round moves them (so a spread can be read as "N rounds apart").
"""
from __future__ import annotations

import statistics
from pathlib import Path


def nonfinite_tensors(obj, path: str = "") -> list[str]:
    """Paths of floating-point tensors in a nested dict/list/tuple that hold NaN or Inf."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [path or "."] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [bad for k, v in obj.items() for bad in nonfinite_tensors(v, f"{path}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [bad for i, v in enumerate(obj) for bad in nonfinite_tensors(v, f"{path}/{i}")]
    return []


def verify_checkpoints(directory: Path) -> tuple[dict, list[str]]:
    """Load every ``*.pt`` in ``directory`` with the project's loader: ``({file: state}, [problems])``."""
    from peer.checkpoint import CheckpointError, load_checkpoint

    states, problems = {}, []
    for path in sorted(Path(directory).glob("*.pt")):
        try:
            states[path.name] = state = load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        bad = nonfinite_tensors(state)
        if bad:
            problems.append(f"{path.name}: non-finite tensors {bad[:5]}")
    return states, problems


def dense_spread(states: dict[str, dict]) -> dict:
    """How far apart the trainers' averaged dense weights (DiLoCo anchors in their checkpoints) are.

    ``spread`` is ``max_i ||a_i - mean|| / ||mean||`` over trainers ``i``; ``round_update`` is the size of
    one outer step relative to the weights (``outer_lr * ||momentum|| / ||anchor||``, median over
    trainers), i.e. the spread one trainer lagging a single round behind would produce.

    Re-converged trainers have a spread of exactly 0: ``Averager`` writes the same bits into every member
    of a round and the outer SGD step is deterministic, so trainers that folded in the same rounds hold
    bit-identical anchors. ``bench/chaos.py`` requires ``spread <= 1e-6`` by default: far below one round's
    update (1e-2..1e-1 for the tiny model), it only forgives float round-off.
    """
    import torch

    from peer.training.trainer import TrainConfig

    flat = {n: torch.cat([a.flatten().double() for a in s["anchor"]]) for n, s in states.items()}
    mean = torch.stack(list(flat.values())).mean(0)
    norm = float(mean.norm()) or 1.0
    per_trainer = {n: float((a - mean).norm()) / norm for n, a in flat.items()}
    updates = []
    for n, s in states.items():
        buffers = [v.get("momentum_buffer") for v in s.get("outer_opt", {}).get("state", {}).values()]
        buffers = [b for b in buffers if b is not None]
        if buffers:
            momentum = float(torch.cat([b.flatten().double() for b in buffers]).norm())
            updates.append(TrainConfig().outer_lr * momentum / float(flat[n].norm()))
    return {"spread": max(per_trainer.values()), "per_trainer": per_trainer,
            "round_update": statistics.median(updates) if updates else None,
            "sync_rounds": {n: s.get("sync_rounds") for n, s in states.items()},
            "steps": {n: s.get("step") for n, s in states.items()}}
