"""Unit tests for averaging.reduce (PartReducer) and averaging.robust (CenteredClip)."""

import math
import random

import pytest
import torch

from averaging.partition import iter_chunks
from averaging.reduce import (
    BadContribution,
    IncompleteReduction,
    PartReducer,
    SenderExcluded,
    UnknownSender,
)
from averaging.robust import centered_clip, weighted_median


def _contributions(n_senders, numel, seed):
    generator = torch.Generator().manual_seed(seed)
    senders = [f"peer{i}" for i in range(n_senders)]
    values = {s: torch.randn(numel, generator=generator) * 10 for s in senders}
    weights = {s: float(w) for s, w in zip(senders, torch.randint(1, 100, (n_senders,), generator=generator))}
    return senders, values, weights


def _feed(reducer, values, weights, seed, chunk_sizes=(7, 100, 1000)):
    """Send every sender's values in random-size chunks, interleaved in a random order."""
    rng = random.Random(seed)
    messages = []
    for sender, tensor in values.items():
        chunk = rng.choice(chunk_sizes)
        messages += [(sender, start, tensor[start:end]) for start, end in iter_chunks(0, tensor.numel(), chunk)]
    rng.shuffle(messages)
    for sender, offset, chunk in messages:
        reducer.add(sender, offset, chunk, weights[sender])


def _assert_close(actual, expected, atol):
    """Max-abs-difference check (cheaper to start than torch's assert_close, which imports a lot on first use)."""
    assert actual.shape == expected.shape
    assert (actual.double() - expected.double()).abs().max().item() <= atol


def _reference(values, weights, senders):
    total = sum(weights[s] for s in senders)
    return sum(values[s].double() * weights[s] for s in senders) / total


@pytest.mark.parametrize("n_senders", range(2, 9))
def test_weighted_mean_in_random_order(n_senders):
    numel = 3001
    senders, values, weights = _contributions(n_senders, numel, seed=n_senders)
    reducer = PartReducer(numel, list(reversed(senders)))
    _feed(reducer, values, weights, seed=n_senders)
    assert reducer.is_complete()
    for sender in senders:
        reducer.sender_finished(sender)
    result = reducer.result()
    assert result.dtype == torch.float32 and result.shape == (numel,)
    _assert_close(result, _reference(values, weights, senders), atol=1e-5)


def test_single_element_chunks():
    senders, values, weights = _contributions(3, 300, seed=9)
    reducer = PartReducer(300, senders)
    _feed(reducer, values, weights, seed=9, chunk_sizes=(1,))
    _assert_close(reducer.result(), _reference(values, weights, senders), atol=1e-5)


def test_bit_identical_for_any_arrival_order_and_sender_list_order():
    numel = 20_000
    senders, values, weights = _contributions(5, numel, seed=42)
    results = []
    for seed in range(6):
        order = senders[:]
        random.Random(seed).shuffle(order)
        reducer = PartReducer(numel, order)
        _feed(reducer, values, weights, seed=seed, chunk_sizes=(1000, 4096, 333, 20_000))
        results.append(reducer.result())
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_exclusion_is_exact():
    numel = 5000
    senders, values, weights = _contributions(4, numel, seed=7)
    reducer = PartReducer(numel, senders)
    _feed(reducer, values, weights, seed=1)
    reducer.exclude("peer2")
    reducer.exclude("peer2")  # idempotent
    survivors = ["peer0", "peer1", "peer3"]
    fresh = PartReducer(numel, survivors)
    _feed(fresh, {s: values[s] for s in survivors}, weights, seed=2)
    assert torch.equal(reducer.result(), fresh.result())  # as if peer2 had never taken part
    assert reducer.active_senders == tuple(survivors)
    assert reducer.excluded_senders == {"peer2"}
    assert reducer.memory_bytes() == 3 * numel * 4
    with pytest.raises(SenderExcluded):
        reducer.add("peer2", 0, values["peer2"][:10], weights["peer2"])


def test_excluding_a_sender_that_never_sent_allows_result():
    reducer = PartReducer(4, ["a", "b"])
    reducer.add("a", 0, torch.tensor([1.0, 2.0, 3.0, 4.0]), weight=2.0)
    with pytest.raises(IncompleteReduction) as info:
        reducer.result()
    assert info.value.missing == {"b": [(0, 4)]}
    reducer.exclude("b")
    assert reducer.result().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_incomplete_lists_missing_ranges():
    reducer = PartReducer(100, ["a", "b"])
    reducer.add("a", 0, torch.zeros(100), 1.0)
    reducer.add("b", 10, torch.zeros(20), 1.0)
    reducer.add("b", 50, torch.zeros(10), 1.0)
    with pytest.raises(IncompleteReduction, match=r"\(0, 10\), \(30, 50\), \(60, 100\)") as info:
        reducer.result()
    assert info.value.missing == {"b": [(0, 10), (30, 50), (60, 100)]}
    assert reducer.missing_ranges("a") == [] and not reducer.is_complete()
    with pytest.raises(BadContribution, match="finished without sending"):
        reducer.sender_finished("b")
    reducer.sender_finished("a")
    assert reducer.finished_senders == {"a"}
    with pytest.raises(BadContribution, match="after the sender finished"):
        reducer.add("a", 0, torch.zeros(1), 1.0)


def test_all_excluded():
    reducer = PartReducer(3, ["a"])
    reducer.exclude("a")
    with pytest.raises(IncompleteReduction, match="every sender was excluded"):
        reducer.result()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_rejected_and_state_unchanged(bad):
    reducer = PartReducer(10, ["a", "b"])
    chunk = torch.ones(5)
    chunk[2] = bad
    with pytest.raises(BadContribution, match="NaN or inf") as info:
        reducer.add("b", 5, chunk, 1.0)
    assert info.value.sender == "b"
    assert reducer.missing_ranges("b") == [(0, 10)]  # nothing was recorded
    reducer.add("b", 5, torch.ones(5), 1.0)  # the range can still be sent properly


def test_float64_values_that_overflow_float32_are_rejected():
    reducer = PartReducer(2, ["a"])
    with pytest.raises(BadContribution, match="NaN or inf"):
        reducer.add("a", 0, torch.tensor([1.0, 1e300], dtype=torch.float64), 1.0)


@pytest.mark.parametrize(
    "offset, values, weight, match",
    [
        (-1, torch.zeros(3), 1.0, "outside the part"),
        (8, torch.zeros(3), 1.0, "outside the part"),
        (0, torch.zeros(11), 1.0, "outside the part"),
        (0, torch.zeros(2, 2), 1.0, "1-D floating"),
        (0, torch.zeros(3, dtype=torch.int64), 1.0, "1-D floating"),
        (0, torch.zeros(3), 0.0, "finite and > 0"),
        (0, torch.zeros(3), -1.0, "finite and > 0"),
        (0, torch.zeros(3), math.nan, "finite and > 0"),
        (0, torch.zeros(3), math.inf, "finite and > 0"),
        (1.5, torch.zeros(3), 1.0, "offset must be an int"),
    ],
)
def test_bad_chunks_are_rejected(offset, values, weight, match):
    reducer = PartReducer(10, ["a"])
    with pytest.raises(BadContribution, match=match):
        reducer.add("a", offset, values, weight)


def test_overlap_weight_change_and_unknown_sender():
    reducer = PartReducer(10, ["a", "b"])
    reducer.add("a", 2, torch.ones(3), 1.0)
    with pytest.raises(BadContribution, match="overlaps"):
        reducer.add("a", 4, torch.ones(2), 1.0)
    with pytest.raises(BadContribution, match="overlaps"):
        reducer.add("a", 0, torch.ones(10), 1.0)
    with pytest.raises(BadContribution, match="differs from its earlier weight"):
        reducer.add("a", 5, torch.ones(2), 2.0)
    reducer.add("a", 0, torch.ones(2), 1.0)  # adjacent chunks are fine, on either side
    reducer.add("a", 5, torch.ones(5), 1.0)
    assert reducer.missing_ranges("a") == []
    with pytest.raises(UnknownSender, match="'c'"):
        reducer.add("c", 0, torch.ones(1), 1.0)
    with pytest.raises(UnknownSender):
        reducer.exclude("c")


def test_constructor_validation_and_out_and_float64():
    with pytest.raises(ValueError, match="duplicates"):
        PartReducer(10, ["a", "a"])
    with pytest.raises(ValueError, match="empty"):
        PartReducer(10, [])
    with pytest.raises(ValueError, match="part_numel"):
        PartReducer(-1, ["a"])
    reducer = PartReducer(3, ["b", "a"], dtype=torch.float64)
    reducer.add("a", 0, torch.tensor([1.0, 2.0, 3.0]), 1)
    reducer.add("b", 0, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 3)
    out = torch.empty(3, dtype=torch.float64)
    assert reducer.result(out=out) is out
    assert out.tolist() == [2.5, 2.0, 1.5]
    with pytest.raises(ValueError, match="out must be"):
        reducer.result(out=torch.empty(3))
    empty = PartReducer(0, ["a"])
    assert empty.is_complete() and empty.result().shape == (0,)


def test_weighted_median():
    vectors = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -5.0]])
    assert weighted_median(vectors, torch.ones(4)).tolist() == [2.0, 10.0]
    assert weighted_median(vectors, torch.tensor([1.0, 1.0, 1.0, 10.0])).tolist() == [100.0, -5.0]


def _honest_and_attacker(attack, d=200, seed=0):
    generator = torch.Generator().manual_seed(seed)
    honest = 1.0 + 0.1 * torch.randn(3, d, generator=generator)
    if attack == "scaled":
        attacker = honest.mean(0) * 1e6
    elif attack == "garbage":
        attacker = torch.randn(d, generator=generator) * 1e15
    else:
        attacker = -honest.mean(0) * 3
    return honest, torch.cat([honest, attacker[None]])


@pytest.mark.parametrize("attack", ["scaled", "garbage", "opposite"])
def test_centered_clip_resists_one_attacker(attack):
    honest, vectors = _honest_and_attacker(attack)
    honest_mean = honest.mean(0)
    tau = 3.0
    spread = (honest - honest_mean).norm(dim=1).max().item()
    assert spread < tau  # the guarantee below needs honest vectors within tau of the result
    result = centered_clip(vectors, torch.ones(4), tau=tau, n_iters=50)
    # fixed point: sum of 3 unclipped honest differences balances one clipped attacker difference (norm <= tau)
    bound = tau * 1 / 3
    assert (result - honest_mean).norm().item() <= bound * 1.01
    assert (vectors.mean(0) - honest_mean).norm().item() > 10 * bound


def test_centered_clip_equals_mean_without_outliers_and_respects_weights():
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(5, 50, generator=generator)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    expected = (weights[:, None] * vectors).sum(0) / weights.sum()
    result = centered_clip(vectors, weights, tau=100.0, n_iters=50)
    _assert_close(result, expected, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vectors=torch.ones(3)), "2-D"),
        (dict(weights=torch.ones(2)), "weights must have shape"),
        (dict(weights=torch.tensor([1.0, -1.0, 1.0])), "non-negative"),
        (dict(weights=torch.zeros(3)), "positive sum"),
        (dict(tau=0.0), "tau"),
        (dict(vectors=torch.tensor([[1.0], [math.nan], [0.0]])), "NaN or inf"),
    ],
)
def test_centered_clip_validation(kwargs, match):
    arguments = dict(vectors=torch.ones(3, 2), weights=torch.ones(3), tau=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        centered_clip(**arguments)


def test_a_whole_part_added_without_copy_is_kept_by_reference_and_averages_the_same():
    own, other = torch.randn(1000), torch.randn(1000)
    by_ref = PartReducer(1000, ["a", "b"])
    by_ref.add("a", 0, own, 1.0, copy=False)
    by_ref.add("b", 0, other, 3.0)
    copied = PartReducer(1000, ["a", "b"])
    copied.add("a", 0, own, 1.0)
    copied.add("b", 0, other, 3.0)
    assert by_ref.memory_bytes() == copied.memory_bytes()
    assert by_ref._buffers["a"].data_ptr() == own.data_ptr()            # no copy of our own slice
    assert copied._buffers["a"].data_ptr() != own.data_ptr()
    assert torch.equal(by_ref.result(), copied.result())
    partial = PartReducer(1000, ["a"])
    partial.add("a", 0, own[:500], 1.0, copy=False)                      # not the whole part: copied as usual
    assert partial._buffers["a"].data_ptr() != own.data_ptr()
    with pytest.raises(BadContribution):                                 # and still checked like any chunk
        PartReducer(3, ["a"]).add("a", 0, torch.tensor([1.0, float("nan"), 2.0]), 1.0, copy=False)


def test_auto_tau_is_the_honest_spread_however_far_the_attacker_is():
    """clip_tau="auto": twice the median distance to the coordinate-wise median, so an attacker, near or far,
    cannot widen the radius, and the reducer's result stays near the honest mean."""
    from averaging.robust import AUTO_TAU_FACTOR, honest_spread_tau

    generator = torch.Generator().manual_seed(3)
    honest = torch.randn(4, 2000, generator=generator, dtype=torch.float64)
    taus = []
    for scale in (1.0, 1e3, 1e9):
        vectors = torch.cat([honest, honest[:1] * scale + 5])
        taus.append(honest_spread_tau(vectors, torch.ones(5, dtype=torch.float64)))
        reducer = PartReducer(2000, list("abcde"), dtype=torch.float64, clip_tau="auto")
        for sender, v in zip("abcde", vectors):
            reducer.add(sender, 0, v, 1.0)
        deviation = (reducer.result() - honest.mean(0)).norm().item()
        assert deviation <= taus[-1] / 4 * 1.01 + (honest.mean(0) - honest.median(0).values).norm().item()
    distances = (honest - honest.mean(0)).norm(dim=1)
    assert max(taus) <= AUTO_TAU_FACTOR * 1.3 * distances.max().item()      # the attacker never widens it
    assert min(taus) >= AUTO_TAU_FACTOR * 0.7 * distances.min().item()
    same = PartReducer(10, ["a", "b"], clip_tau="auto")
    for sender in "ab":
        same.add(sender, 0, torch.ones(10), 1.0)
    assert torch.equal(same.result(), torch.ones(10))                      # nothing to clip: the mean
