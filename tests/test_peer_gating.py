"""Tests for peer.moe.gating: UIDs, beam search over the expert grid, output combination, load balancing."""

import itertools

import pytest
import torch

from peer.moe.gating import (GatingFunction, InvalidUIDError, all_uids, beam_search_coords, combine_expert_outputs,
                             expert_logits, load_balancing_loss, make_uid, parse_uid, routing_counts, uid_prefix)


def beam_search(scores, k, is_alive, prefix, beam_size=None) -> list[list[str]]:
    """The UIDs :func:`beam_search_coords` picks for each sample, best first (what these tests compare)."""
    coords, found = beam_search_coords(scores, k, is_alive, prefix, beam_size)
    return [[make_uid(prefix, c) for c, ok in zip(row_coords, row_found) if ok]
            for row_coords, row_found in zip(coords.tolist(), found.tolist())]


def test_uid_roundtrip_and_validation():
    assert make_uid("ffn", (3, 17)) == "ffn.3.17"
    assert parse_uid("ffn.3.17") == ("ffn", (3, 17))
    assert parse_uid("ffn0.7.31", grid_size=(8, 32)) == ("ffn0", (7, 31))
    assert uid_prefix("ffn", (3,)) == "ffn.3." and uid_prefix("ffn", ()) == "ffn."
    assert all_uids("e", (2, 3)) == ["e.0.0", "e.0.1", "e.0.2", "e.1.0", "e.1.1", "e.1.2"]
    assert all_uids("e", (3,)) == ["e.0", "e.1", "e.2"]
    for bad in ["ffn", "ffn.", "ffn.3.", "ffn.-1.2", "ffn.a.2", "ffn.03.1", ".3.1", "f.f.1", "ffn.3.1 ", "ffn.٣.1"]:
        with pytest.raises(InvalidUIDError):
            parse_uid(bad)
    with pytest.raises(InvalidUIDError):
        parse_uid("ffn.8.0", grid_size=(8, 32))
    with pytest.raises(InvalidUIDError):
        parse_uid("ffn.1.2.3", grid_size=(8, 32))
    with pytest.raises(InvalidUIDError):
        make_uid("a.b", (1,))
    with pytest.raises(InvalidUIDError):
        make_uid("ffn", ())
    with pytest.raises(ValueError):
        make_uid("ffn", (1, -2))


def test_gating_function_shapes():
    gate = GatingFunction(10, (8, 32))
    scores = gate(torch.randn(5, 10))
    assert [s.shape for s in scores] == [(5, 8), (5, 32)]
    with pytest.raises(ValueError):
        gate(torch.randn(5, 11))
    with pytest.raises(ValueError):
        GatingFunction(10, (8, 0))


def brute_force_topk(scores, k, alive_uids, prefix):
    """Reference: score every alive expert and take the k best."""
    grid = [s.shape[1] for s in scores]
    result = []
    for b in range(scores[0].shape[0]):
        ranked = []
        for coords in itertools.product(*map(range, grid)):
            uid = make_uid(prefix, coords)
            if uid in alive_uids:
                ranked.append((sum(float(s[b, c]) for s, c in zip(scores, coords)), uid))
        ranked.sort(reverse=True)
        result.append([uid for _, uid in ranked[:k]])
    return result


def make_is_alive(alive_uids, calls):
    """is_alive over a fixed set of UIDs: a prefix is alive if an alive UID starts with it."""
    def is_alive(names):
        calls.append(list(names))
        return {n for n in names if n in alive_uids or (n.endswith(".") and any(u.startswith(n) for u in alive_uids))}
    return is_alive


@pytest.mark.parametrize("grid", [(4, 6), (3, 4, 5), (7,)])
def test_beam_search_equals_brute_force_when_all_alive(grid):
    torch.manual_seed(0)
    scores = [torch.randn(9, g) for g in grid]
    alive = set(all_uids("ffn", grid))
    calls = []
    k = 3
    result = beam_search(scores, k, make_is_alive(alive, calls), "ffn")
    assert result == brute_force_topk(scores, k, alive, "ffn")
    assert len(calls) == len(grid)  # one batched query per grid dimension
    assert all(len(set(c)) == len(c) for c in calls)  # no duplicate names in a query
    assert calls[0] == [uid_prefix("ffn", (i,)) for i in range(grid[0])] or len(grid) == 1


def test_beam_search_with_dead_prefixes():
    torch.manual_seed(1)
    grid = (6, 5)
    scores = [torch.randn(16, g) for g in grid]
    generator = torch.Generator().manual_seed(2)
    everything = all_uids("ffn", grid)
    # rows 0 and 3 are entirely dead, and a random half of the remaining experts too
    alive = {u for u in everything if parse_uid(u)[1][0] not in (0, 3) and torch.rand(1, generator=generator) < 0.5}
    calls = []
    k = 4
    alive_rows = {parse_uid(u)[1][0] for u in alive}
    assert len(alive_rows) >= k  # so a beam of k alive rows always yields k experts
    # exhaustive beam: exactly the brute-force top-k among alive experts
    exact = beam_search(scores, k, make_is_alive(alive, calls), "ffn", beam_size=grid[0])
    assert exact == brute_force_topk(scores, k, alive, "ffn")
    # default beam (= k): only alive experts, distinct, sorted by score, and as many as k when possible
    result = beam_search(scores, k, make_is_alive(alive, calls), "ffn")
    for b, uids in enumerate(result):
        assert uids and set(uids) <= alive and len(set(uids)) == len(uids)
        totals = [sum(float(s[b, c]) for s, c in zip(scores, parse_uid(u)[1])) for u in uids]
        assert totals == sorted(totals, reverse=True)
        assert len(uids) == min(k, len(alive))
    # dead row prefixes are never expanded: no query names a UID under them
    assert not any(n.startswith(("ffn.0.", "ffn.3.")) for n in calls[-1])


def test_beam_search_returns_fewer_when_few_experts_alive():
    scores = [torch.randn(3, 4), torch.randn(3, 4)]
    alive = {"ffn.2.1"}
    result = beam_search(scores, 3, make_is_alive(alive, []), "ffn")
    assert result == [["ffn.2.1"]] * 3
    assert beam_search(scores, 3, lambda names: set(), "ffn") == [[], [], []]
    coords, found = beam_search_coords(scores, 3, make_is_alive(alive, []), "ffn")
    assert coords.shape == (3, 3, 2) and found.tolist() == [[True, False, False]] * 3
    # k larger than the whole grid
    coords, found = beam_search_coords([torch.randn(2, 2)], 5, lambda names: names, "e")
    assert coords.shape == (2, 5, 1) and found.sum().item() == 4
    # empty batch
    assert beam_search([torch.randn(0, 3), torch.randn(0, 2)], 2, lambda names: names, "e") == []


def test_beam_search_rejects_bad_scores():
    with pytest.raises(ValueError):
        beam_search([torch.randn(3, 4), torch.randn(2, 4)], 2, lambda n: n, "ffn")
    with pytest.raises(ValueError):
        beam_search([torch.tensor([[float("nan"), 0.0]])], 1, lambda n: n, "ffn")
    with pytest.raises(ValueError):
        beam_search([torch.randn(3, 4)], 0, lambda n: n, "ffn")


def test_expert_logits_and_routing_counts():
    scores = [torch.randn(2, 3, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
    coords = torch.tensor([[[2, 1], [0, 3]], [[1, 1], [0, 0]]])       # e.2.1, e.0.3 | e.1.1, nothing
    found = torch.tensor([[True, True], [True, False]])
    logits = expert_logits(scores, coords, found)
    assert torch.isclose(logits[0, 1], scores[0][0, 0] + scores[1][0, 3])
    assert logits[1, 1] == float("-inf")
    logits[found].sum().backward()
    assert scores[0].grad[0, 2] == 1 and scores[1].grad[1, 1] == 1
    counts = routing_counts(coords, found, (3, 4))
    assert counts[0].tolist() == [[1, 0, 1], [0, 1, 0]]


def test_combine_weights_renormalise_over_answered_experts():
    outputs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    logits = torch.tensor([[0.0, 0.0, 10.0]])
    mask = torch.tensor([[True, True, False]])
    assert torch.allclose(combine_expert_outputs(outputs, logits, mask), torch.tensor([[0.5, 0.5]]))
    all_answered = combine_expert_outputs(outputs, logits, torch.ones_like(mask))
    weights = torch.softmax(logits, dim=1)
    assert torch.allclose(all_answered, (weights[..., None] * outputs).sum(1))


def test_combine_never_nan():
    outputs = torch.randn(4, 3, 5, requires_grad=True)
    garbage = torch.full((4, 3, 5), float("nan"))
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, False], [True, True, True]])
    logits = torch.tensor([[float("-inf")] * 3, [0.3, float("-inf"), 2.0], [float("-inf"), 1.0, 0.0],
                           [float("-inf")] * 3], requires_grad=True)
    mixed = torch.where(mask[..., None], outputs, garbage)  # missing experts may be garbage
    result = combine_expert_outputs(mixed, logits, mask)
    assert torch.isfinite(result).all()
    assert torch.equal(result[0], torch.zeros(5)) and torch.equal(result[3], torch.zeros(5))
    assert torch.allclose(result[1], outputs[1, 0]) and torch.allclose(result[2], outputs[2, 1])
    result.sum().backward()
    assert torch.isfinite(outputs.grad).all() and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError):
        combine_expert_outputs(outputs, torch.full((4, 3), float("nan")), mask)
    with pytest.raises(ValueError):
        combine_expert_outputs(outputs, logits, mask.float())
    with pytest.raises(ValueError):
        combine_expert_outputs(outputs, logits[:, :2], mask[:, :2])


def test_load_balancing_loss_prefers_balanced_routing_and_has_gradients():
    n, batch = 4, 64
    uniform = torch.zeros(batch, n, requires_grad=True)
    balanced_mask = torch.nn.functional.one_hot(torch.arange(batch) % n, n).bool()
    balanced = load_balancing_loss([uniform], [balanced_mask])
    assert balanced.item() == pytest.approx(1.0)

    skewed_scores = torch.zeros(batch, n)
    skewed_scores[:, 0] = 5.0
    skewed_scores.requires_grad_(True)
    skewed_mask = torch.zeros(batch, n, dtype=torch.bool)
    skewed_mask[:, 0] = True
    skewed = load_balancing_loss(skewed_scores, skewed_mask)
    assert skewed.item() > 3.0 and skewed > balanced
    skewed.backward()
    assert skewed_scores.grad is not None and skewed_scores.grad.abs().sum() > 0
    assert (skewed_scores.grad[:, 0] > 0).all()  # gradient descent lowers the over-used expert's score

    # two dimensions: averaged
    two = load_balancing_loss([uniform, skewed_scores], [balanced_mask, skewed_mask])
    assert two.item() == pytest.approx((balanced.item() + skewed.item()) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        load_balancing_loss([uniform], [balanced_mask, balanced_mask])
    empty = load_balancing_loss(torch.zeros(0, n), torch.zeros(0, n, dtype=torch.bool))
    assert empty.item() == 0.0
