"""A tiny model trained for a few steps on the embedded corpus, for benchmarks and tests that need a model
that has learned something (losses that mean something) without a swarm."""
from __future__ import annotations

import torch

from peer.config import ModelConfig
from peer.training.data import ByteDataset, load_corpus
from peer.training.model import MoETransformer


def train_briefly(model: MoETransformer, steps: int, batch_size: int = 16, lr: float = 3e-3) -> bytes:
    """``steps`` AdamW steps of ``model`` on the corpus' train split; returns the held-out (eval split) bytes."""
    text = load_corpus(None)
    train = ByteDataset(text, model.config.block_size, split="train")
    held = ByteDataset(text, model.config.block_size, split="eval")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(train), (batch_size,), generator=g).tolist()
        x, y = (torch.stack(t) for t in zip(*(train[i] for i in rows)))
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return bytes(held.data.tolist())


def trained_tiny(steps: int, seed: int = 0) -> tuple[MoETransformer, bytes]:
    """The tiny preset (seeded), trained :func:`train_briefly`; and the held-out bytes."""
    torch.manual_seed(seed)
    model = MoETransformer(ModelConfig.tiny())
    return model, train_briefly(model, steps)
