"""Persistent ed25519 identities: a peer keeps its peer ID across restarts.

The private key is stored as the raw 32-byte ed25519 seed, base64-encoded, in a file created with
mode 0600. ``load_or_create_identity(path)`` creates the file on first run and reuses it afterwards.
"""
from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

logger = logging.getLogger(__name__)

_HEADER = "swarmtrain-ed25519-v1"


def new_identity() -> KeyPair:
    """A fresh random ed25519 key pair (not saved anywhere)."""
    private = Ed25519PrivateKey.new()
    return KeyPair(private, private.get_public_key())


def save_identity(key_pair: KeyPair, path: str | os.PathLike) -> None:
    """Write ``key_pair`` to ``path`` atomically with mode 0600 (owner read/write only)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = f"{_HEADER}\n{base64.b64encode(key_pair.private_key.to_bytes()).decode()}\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_identity(path: str | os.PathLike) -> KeyPair:
    """Read a key pair written by :func:`save_identity`; raises ``ValueError`` on a malformed file."""
    path = Path(path).expanduser()
    lines = path.read_text().split()
    if len(lines) != 2 or lines[0] != _HEADER:
        raise ValueError(f"{path} is not a swarmtrain identity file (expected '{_HEADER}' header)")
    try:
        private = Ed25519PrivateKey.from_bytes(base64.b64decode(lines[1], validate=True))
    except Exception as e:
        raise ValueError(f"{path}: corrupted private key ({e})") from e
    if os.stat(path).st_mode & 0o077:
        logger.warning("Identity file %s is readable by other users; run: chmod 600 %s", path, path)
    return KeyPair(private, private.get_public_key())


def load_or_create_identity(path: str | os.PathLike | None) -> KeyPair:
    """Load the identity at ``path``, creating it on first use; ``None`` gives a throwaway identity."""
    if path is None:
        return new_identity()
    path = Path(path).expanduser()
    if path.exists():
        return load_identity(path)
    key_pair = new_identity()
    save_identity(key_pair, path)
    logger.info("Created new identity %s at %s", peer_id_of(key_pair), path)
    return key_pair


def peer_id_of(key_pair: KeyPair) -> str:
    """The base58 peer ID (``12D3KooW...``) that belongs to ``key_pair``."""
    return ID.from_pubkey(key_pair.public_key).to_base58()
