"""Secure aggregation's arithmetic: pairwise masks that cancel in a group's sum (Bonawitz et al., CCS 2017).

A part owner that sums the members' slices of its part should learn the sum and nothing about any one
member's slice. The steps, for a group of members with distinct peer IDs:

1. **Keys.** Each member makes a fresh X25519 key pair for each matchmaking attempt and signs its public key,
   together with the group key it meets under, with its libp2p identity (ed25519), so nobody (the leader that
   relays the keys included) can put a key of its own between two members (:class:`RoundKeys`,
   :func:`verify_public_key`).
2. **Pairwise seeds.** Members ``i`` and ``j`` derive one 32-byte seed from their X25519 shared secret with
   HKDF-SHA256, bound to the round ID and both peer IDs (:meth:`RoundKeys.pair_seed`); nobody else can.
3. **Fixed point.** Each member encodes ``weight * value`` as integers modulo ``2**32``: ``round(v * scale)``
   (:class:`FixedPoint`); the owner's sum, decoded as a signed 32-bit number over ``scale``, is the weighted sum
   as long as it stays within ``+-2**31 / scale`` (values beyond ``bound`` are clipped, and counted).
4. **Masks.** Member ``i`` adds, for every other member ``j``, the keystream of ChaCha20 under the pair's seed
   (a nonce naming the part and the offset) with sign ``+`` if ``i < j`` and ``-`` otherwise
   (:func:`mask`). Each pair's two masks cancel in the sum modulo ``2**32``; without the seed, a masked slice is
   uniform and independent of the value it hides.
5. **Dropouts.** If member ``d`` dies after the others masked, its slice never arrives and its masks stay in the
   sum. Each survivor ``i`` then sends its own mask with ``d`` (:func:`dropout_correction`), which the owner
   subtracts: the sum over the survivors comes out, and ``d``'s contribution is left out of the round. The
   corrections reveal only masks of pairs with ``d``, whose slice the owner never sees.

What the owner cannot do any more: check one member's slice (NaN, range, CenteredClip), since it sees only
uniform noise until the sum. What still works: the sum's own range, and every check on the result.

This module is the arithmetic; :mod:`averaging.masked_round` runs it inside an all-reduce round.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dht.validation import ed25519_key_of_peer_id

MODULUS_BITS = 32


class SecureAggregationError(ValueError):
    """A key that does not verify, a peer ID that cannot sign, or values the fixed point cannot hold."""


def _signed_payload(context: bytes, public_key: bytes) -> bytes:
    return b"swarmtrain secure aggregation v1|" + context + b"|" + public_key


class RoundKeys:
    """Our fresh X25519 key pair for one round, and the pairwise seeds it yields (steps 1 and 2).

    :param context: what the key is for, signed with it (the group key its member meets under).
    :param peer_id: our peer ID; ``sign`` signs bytes with our identity's private key (ed25519).
    """

    def __init__(self, context: bytes, peer_id: str, sign):
        self.context, self.peer_id = context, peer_id
        self._private = X25519PrivateKey.generate()
        self.public_key = self._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                                  serialization.PublicFormat.Raw)
        self.signature = sign(_signed_payload(context, self.public_key))

    def pair_seed(self, other_id: str, other_public_key: bytes, round_id: bytes = b"") -> bytes:
        """The seed we share with ``other_id`` in round ``round_id`` (verify its key with :func:`verify_public_key`
        first)."""
        if other_id == self.peer_id:
            raise SecureAggregationError("no pairwise seed with ourselves")
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(other_public_key))
        low, high = sorted((self.peer_id, other_id))
        info = b"|".join((b"swarmtrain pair seed", self.context, round_id, low.encode(), high.encode()))
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def verify_public_key(context: bytes, peer_id: str, public_key: bytes, signature: bytes) -> None:
    """Raise :class:`SecureAggregationError` unless ``peer_id``'s identity signed ``public_key`` for ``context``."""
    identity = ed25519_key_of_peer_id(peer_id)
    if identity is None:
        raise SecureAggregationError(f"{peer_id!r} is not an ed25519 peer ID: it cannot sign its round key")
    try:
        ok = isinstance(public_key, bytes) and len(public_key) == 32 and isinstance(signature, bytes) and \
            identity.verify(_signed_payload(context, public_key), signature)
    except Exception:  # a malformed signature
        ok = False
    if not ok:
        raise SecureAggregationError(f"the round key of {peer_id[-8:]} is not signed by its identity")


@dataclass(frozen=True)
class FixedPoint:
    """Values in ``[-bound, bound]`` as integers modulo ``2**32`` (step 3), with room for ``members`` of them
    in one sum: ``scale = 2**31 / (members * bound)`` rounded down to a power of two."""

    bound: float
    members: int

    @property
    def scale(self) -> float:
        if not (math.isfinite(self.bound) and self.bound > 0) or self.members < 1:
            raise SecureAggregationError(f"need a positive finite bound and members >= 1, got {self}")
        return 2.0 ** math.floor(math.log2(2.0 ** (MODULUS_BITS - 1) / (self.members * self.bound)))

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``round(clip(values) * scale)`` as int64 in ``[0, 2**32)``; and how many elements were clipped."""
        v = values.detach().to(torch.float64)
        if not bool(torch.isfinite(v).all()):
            raise SecureAggregationError("values contain NaN/inf: nothing to encode")
        clipped = int((v.abs() > self.bound).sum())
        fixed = torch.round(v.clamp(-self.bound, self.bound) * self.scale).to(torch.int64)
        return fixed % (1 << MODULUS_BITS), clipped

    def decode(self, total: torch.Tensor) -> torch.Tensor:
        """A sum modulo ``2**32`` back to float64: read as a signed 32-bit number, over ``scale``."""
        t = total % (1 << MODULUS_BITS)
        signed = torch.where(t >= 1 << (MODULUS_BITS - 1), t - (1 << MODULUS_BITS), t)
        return signed.to(torch.float64) / self.scale


def _keystream(seed: bytes, part: int, offset: int, numel: int) -> torch.Tensor:
    """``numel`` uniform integers in ``[0, 2**32)`` from ChaCha20 under ``seed``, for elements ``offset..`` of
    ``part`` (the nonce names both, so no two uses of one seed share keystream)."""
    # cryptography's 16-byte ChaCha20 nonce starts with the 32-bit block counter: it starts at 0, so the
    # keystreams of two parts (or offsets) never overlap
    nonce = bytes(4) + part.to_bytes(4, "little") + offset.to_bytes(8, "little")
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    raw = encryptor.update(bytes(4 * numel))
    return torch.frombuffer(bytearray(raw), dtype=torch.int32).to(torch.int64) % (1 << MODULUS_BITS)


def mask(encoded: torch.Tensor, me: str, seeds: dict[str, bytes], part: int, offset: int = 0) -> torch.Tensor:
    """Step 4: ``encoded`` plus, for every other member ``j`` (``seeds``: its pair seed), ``+keystream`` if our
    peer ID sorts before ``j``'s, else ``-keystream``; modulo ``2**32``."""
    out = encoded.clone()
    for other, seed in sorted(seeds.items()):
        stream = _keystream(seed, part, offset, encoded.numel()).view(encoded.shape)
        out = out + stream if me < other else out - stream
    return out % (1 << MODULUS_BITS)


def dropout_correction(me: str, dead: str, seed: bytes, shape: torch.Size, part: int, offset: int = 0) -> torch.Tensor:
    """Step 5: what the owner adds to the survivors' sum for our pair with ``dead``: minus the mask we added."""
    stream = _keystream(seed, part, offset, math.prod(shape)).view(shape)
    return (-stream if me < dead else stream) % (1 << MODULUS_BITS)


def sum_masked(slices: list[torch.Tensor]) -> torch.Tensor:
    """The owner's sum of masked slices (and corrections), modulo ``2**32``."""
    total = torch.zeros_like(slices[0])
    for s in slices:
        total = (total + s) % (1 << MODULUS_BITS)
    return total

