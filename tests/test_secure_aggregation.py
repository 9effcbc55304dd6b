"""averaging.secure: the arithmetic of pairwise-masked sums (issue 16 item 2; not yet wired into rounds)."""
from __future__ import annotations

import pytest
import torch

from averaging.secure import FixedPoint, RoundKeys, SecureAggregationError, dropout_correction, mask, sum_masked, \
    verify_public_key
from p2p.identity import new_identity, peer_id_of

ROUND = b"round-1234"


def members(n: int) -> list[tuple[str, RoundKeys]]:
    out = []
    for _ in range(n):
        pair = new_identity()
        peer_id = peer_id_of(pair)
        out.append((peer_id, RoundKeys(ROUND, peer_id, pair.private_key.sign)))
    return out


def seeds_of(group, i):
    """Member i's pair seeds, after verifying every other member's signed key."""
    me, keys = group[i]
    seeds = {}
    for other, their in group:
        if other != me:
            verify_public_key(ROUND, other, their.public_key, their.signature)
            seeds[other] = keys.pair_seed(other, their.public_key)
    return seeds


def test_both_sides_of_a_pair_derive_one_seed_and_other_pairs_another():
    group = members(3)
    (a, ka), (b, kb), (c, _) = group
    assert ka.pair_seed(b, kb.public_key) == kb.pair_seed(a, ka.public_key)
    assert seeds_of(group, 0)[b] != seeds_of(group, 0)[c]


def test_masks_cancel_and_the_sum_is_the_weighted_sum():
    group, numel = members(4), 200_000
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(numel, generator=generator) for _ in group]
    weights = [1.0, 2.0, 3.0, 4.0]
    fixed = FixedPoint(bound=50.0, members=len(group))
    masked = []
    for i, (me, _) in enumerate(group):
        encoded, clipped = fixed.encode(values[i] * weights[i])
        assert clipped == 0
        masked.append(mask(encoded, me, seeds_of(group, i), part=3))
    total = fixed.decode(sum_masked(masked))
    expected = sum((v * w).double() for w, v in zip(weights, values))   # what each member encoded
    assert (total - expected).abs().max().item() <= len(group) * 0.5 / fixed.scale + 1e-12
    assert torch.equal(fixed.decode(sum_masked(list(reversed(masked)))), total)   # any order: the same bits


def test_a_masked_slice_is_independent_of_what_it_hides():
    group, numel = members(3), 1_000_000
    values = torch.linspace(-1, 1, numel)           # as far from uniform noise as a slice gets
    fixed = FixedPoint(bound=1.0, members=3)
    encoded, _ = fixed.encode(values)
    masked = mask(encoded, group[0][0], seeds_of(group, 0), part=0)
    as_float = masked.double()
    correlation = torch.corrcoef(torch.stack([as_float, values.double()]))[0, 1].item()
    assert abs(correlation) < 0.01, correlation
    assert abs(as_float.mean().item() / 2**32 - 0.5) < 0.01   # uniform over [0, 2**32)
    # another part's slice gets another mask
    assert not torch.equal(masked, mask(encoded, group[0][0], seeds_of(group, 0), part=1))


def test_a_member_dying_after_masking_leaves_the_survivors_sum():
    group, numel = members(4), 10_000
    values = [torch.full((numel,), float(i + 1)) for i in range(4)]
    fixed = FixedPoint(bound=10.0, members=4)
    seeds = [seeds_of(group, i) for i in range(4)]
    masked = [mask(fixed.encode(v)[0], me, seeds[i], part=0) for i, ((me, _), v) in enumerate(zip(group, values))]
    dead = group[3][0]
    survivors = masked[:3]
    broken = fixed.decode(sum_masked(survivors))
    assert (broken - 6.0).abs().max().item() > 1.0      # the dead member's masks stay in: garbage
    corrections = [dropout_correction(group[i][0], dead, seeds[i][dead], torch.Size([numel]), part=0) for i in range(3)]
    total = fixed.decode(sum_masked(survivors + corrections))
    assert torch.allclose(total, torch.full((numel,), 6.0, dtype=torch.float64))


def test_keys_signed_by_another_identity_or_for_another_round_are_refused():
    (a, ka), (b, kb) = members(2)
    with pytest.raises(SecureAggregationError, match="not signed by its identity"):
        verify_public_key(ROUND, a, kb.public_key, kb.signature)       # b's key passed off as a's
    with pytest.raises(SecureAggregationError, match="not signed by its identity"):
        verify_public_key(b"another round", a, ka.public_key, ka.signature)
    with pytest.raises(SecureAggregationError, match="not an ed25519 peer ID"):
        verify_public_key(ROUND, "QmNotEd25519", ka.public_key, ka.signature)
    verify_public_key(ROUND, a, ka.public_key, ka.signature)


def test_fixed_point_clips_what_it_cannot_hold_and_refuses_nan():
    fixed = FixedPoint(bound=2.0, members=8)
    encoded, clipped = fixed.encode(torch.tensor([1.0, -3.0, 5.0, -1.5]))
    assert clipped == 2
    assert fixed.decode(encoded).tolist() == [1.0, -2.0, 2.0, -1.5]
    assert 8 * 2.0 * fixed.scale <= 2**31                      # eight of them sum without wrapping
    with pytest.raises(SecureAggregationError, match="NaN"):
        fixed.encode(torch.tensor([float("nan")]))
