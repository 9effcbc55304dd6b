"""All-reduce with real processes: exact means, weights, compression bounds, NaN senders, and peers that die."""
import json
import os
import random
import signal
import time

import pytest
import torch

import p2p.bulk
from averaging.robust import AUTO_TAU_FACTOR
from dht import DHT
from tests.avg_group import go, start_peers, stop


@pytest.fixture
def bootstrap():
    """A fresh bootstrap per test: no test meets the announcements or dead routing entries of the last one's
    workers (whose rounds used the same prefix and, often, the same tensor shapes)."""
    dht = DHT()
    yield dht.addrs[0]
    dht.shutdown()


def outcome(results: list[list[dict]]) -> list[list[tuple]]:
    """What each member's rounds did, short enough for an assertion message: ok, group size, reason."""
    return [[(line.get("ok"), line.get("group_size"), line.get("reason") or line.get("error")) for line in res]
            for res in results]


def run_group(bootstrap, tmp_path, specs, timeout=90, with_ids=False):
    """Run one worker per spec; returns their result lines and final tensors (and peer IDs if ``with_ids``)."""
    peers = start_peers(bootstrap, tmp_path, specs)
    try:
        # every peer here listens on loopback: each must find itself public and own a part
        for p, spec in zip(peers, specs):
            assert p.info["reachability"] == ("client" if spec.get("client_mode") else "public"), p.info
        go(peers)
        out = [p.results(timeout) for p in peers], [p.tensor() for p in peers]
        return (*out, [p.info["peer_id"] for p in peers]) if with_ids else out
    finally:
        stop(peers)


@pytest.mark.parametrize("n, size", [(2, 1000), (3, 100_003), (5, 77_777)])
def test_exact_weighted_mean(bootstrap, tmp_path, n, size):
    values = [float(3 * i - 2) for i in range(n)]
    weights = [float(i + 1) for i in range(n)]
    specs = [dict(size=size, value=v, weight=w, group=n, matchmaking_time=3) for v, w in zip(values, weights)]
    results, tensors, ids = run_group(bootstrap, tmp_path, specs, with_ids=True)
    expected = sum(v * w for v, w in zip(values, weights)) / sum(weights)
    for res in results:
        assert res[0]["ok"], res
        assert res[0]["group_size"] == n
        # every owner saw each member's declared weight (what contribution ledgers are checked against)
        assert res[0]["observed_weights"] == dict(zip(ids, weights)), res
        assert sorted(res[0]["witnesses"]) == sorted(ids), res
    for t in tensors:
        assert torch.allclose(t, torch.full_like(t, expected), atol=1e-5)
        assert torch.equal(t, tensors[0])  # bit-identical on every member


@pytest.mark.skipif(p2p.bulk.SO_MAX_PACING_RATE is None, reason="kernel pacing is Linux-only")
def test_a_declared_bandwidth_paces_the_round(bootstrap, tmp_path):
    # 2 peers x 4 MB: each uploads 2 MB and returns 2 MB, paced at 0.97 * 2 MB/s: about 2 s (unpaced: ~0.1 s)
    specs = [dict(size=1_000_000, value=v, group=2, matchmaking_time=3, bandwidth=2.0) for v in (1.0, 3.0)]
    results, tensors = run_group(bootstrap, tmp_path, specs)
    for res in results:
        assert res[0]["ok"] and res[0]["allreduce_s"] >= 1.6, res
    for t in tensors:
        assert torch.equal(t, torch.full_like(t, 2.0))


@pytest.mark.slow
def test_eight_peers_random_tensors(bootstrap, tmp_path):
    """Eight members: every one holds, bit for bit, the mean of exactly the contributors the round reports
    (on a loaded machine a member whose slice started too late is left out of every part, never of some)."""
    n, size = 8, 50_001
    specs = [dict(size=size, seed=i, group=n, matchmaking_time=4) for i in range(n)]
    results, tensors, ids = run_group(bootstrap, tmp_path, specs, timeout=120, with_ids=True)
    assert all(r[0]["ok"] and r[0]["group_size"] == n for r in results), outcome(results)
    contributors = results[0][0]["contributors"]
    assert all(r[0]["contributors"] == contributors for r in results)
    assert len(contributors) >= n // 2 and set(contributors) <= set(ids), contributors
    expected = torch.stack([torch.randn(size, generator=torch.Generator().manual_seed(ids.index(p)))
                            for p in contributors]).mean(0)
    for t in tensors:
        assert torch.allclose(t, expected, atol=1e-5)
        assert torch.equal(t, tensors[0])


@pytest.mark.parametrize("compression, tol", [("fp16", 2e-3), ("int8", 0.05)])
def test_compression_error_bounds(bootstrap, tmp_path, compression, tol):
    n, size = 3, 200_000
    specs = [dict(size=size, seed=10 + i, group=n, compression=compression, matchmaking_time=3) for i in range(n)]
    results, tensors = run_group(bootstrap, tmp_path, specs)
    expected = torch.stack([torch.randn(size, generator=torch.Generator().manual_seed(10 + i))
                            for i in range(n)]).mean(0)
    assert all(r[0]["ok"] for r in results), outcome(results)
    for t in tensors:
        err = (t - expected).abs().max().item()
        assert err <= tol, f"{compression}: max abs error {err}"
        assert torch.equal(t, tensors[0])


def test_error_feedback_cancels_quantization_error_over_rounds(bootstrap, tmp_path):
    """3 peers send the same int4 contributions for 6 rounds. int4 rounds every round the same way, so
    without error feedback the mean of the results keeps one round's full error; with it, each round
    sends what the last one lost and the mean of the results approaches the exact mean (~1/rounds)."""
    n, size, rounds = 3, 50_000, 6
    expected = torch.stack([torch.randn(size, generator=torch.Generator().manual_seed(20 + i))
                            for i in range(n)]).mean(0)
    errors = {}
    for feedback in (False, True):
        specs = [dict(size=size, seed=20 + i, group=n, compression="int4", matchmaking_time=2, rounds=rounds,
                      pause=0.3, same_contribution=True, error_feedback=feedback) for i in range(n)]
        (tmp_path / str(feedback)).mkdir()
        results, tensors = run_group(bootstrap, tmp_path / str(feedback), specs, timeout=120)
        assert all(line["ok"] and line["group_size"] == n for res in results for line in res), outcome(results)
        assert all(torch.equal(t, tensors[0]) for t in tensors)          # bit-identical means of results
        errors[feedback] = (tensors[0] - expected).abs().mean().item()
    assert errors[True] < errors[False] / 3, errors


def test_nan_contributor_is_excluded(bootstrap, tmp_path):
    specs = [dict(size=30_000, value=1.0, group=3, matchmaking_time=3),
             dict(size=30_000, value=3.0, group=3, matchmaking_time=3),
             dict(size=30_000, value=100.0, group=3, matchmaking_time=3, nan=True)]
    results, tensors = run_group(bootstrap, tmp_path, specs)
    # the NaN peer refuses to contribute its own broken tensors; the others average without it
    assert "NaN" in results[2][0].get("error", "")
    for res, t in zip(results[:2], tensors[:2]):
        assert res[0]["ok"], res
        assert torch.all(t == 2.0)
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("clip_tau", [300.0, "auto", None])
def test_centered_clip_bounds_a_byzantine_peer(bootstrap, tmp_path, clip_tau):
    """1 of 4 peers sends its values x1000. With CenteredClip (radius tau) every part stays within
    tau * w_byzantine / w_honest of the honest mean, so the whole vector within sqrt(4 parts) times that;
    the plain mean (the control) is thrown far off. With "auto" each owner measures tau on its part (twice
    the median distance to the median): the honest vectors' spread, not the attacker's."""
    n, size = 4, 50_000
    specs = [dict(size=size, seed=i, group=n, matchmaking_time=3, clip_tau=clip_tau) for i in range(n)]
    specs[3]["scale"] = 1000.0
    results, tensors = run_group(bootstrap, tmp_path, specs)
    assert all(r[0]["ok"] and r[0]["group_size"] == n for r in results), outcome(results)
    honest = torch.stack([torch.randn(size, generator=torch.Generator().manual_seed(i)) for i in range(3)]).mean(0)
    deviation = (tensors[0] - honest).norm().item()
    for t in tensors:
        assert torch.equal(t, tensors[0])
    if clip_tau == "auto":
        # per part, tau <= AUTO_TAU_FACTOR * an honest vector's distance to the median: summed over the parts,
        # at most AUTO_TAU_FACTOR * (the honest spread, with a margin for the median's offset) * w_byz / w_honest
        spread = max((torch.randn(size, generator=torch.Generator().manual_seed(i)) - honest).norm().item()
                     for i in range(3))
        assert deviation <= AUTO_TAU_FACTOR * 1.5 * spread / 3, (deviation, spread)
    elif clip_tau is not None:
        assert deviation <= 2 * clip_tau * 1 / 3 + 1e-3, deviation
    else:
        assert deviation > 10_000, deviation


def test_shape_mismatch_is_a_clear_error(bootstrap, tmp_path):
    specs = [dict(size=1000, value=1.0, group=2, min_group=2, matchmaking_time=3),
             dict(size=1001, value=1.0, group=2, min_group=2, matchmaking_time=3)]
    results, tensors = run_group(bootstrap, tmp_path, specs)
    assert not any(r[0]["ok"] for r in results)
    assert any("tensors differ" in (r[0].get("error", "") + r[0].get("reason", "")) for r in results), results
    assert torch.all(tensors[0] == 1.0) and torch.all(tensors[1] == 1.0)


def test_garbage_sender_is_excluded_then_banned(bootstrap, tmp_path):
    """1 of 4 peers is Byzantine: every chunk it sends, its contributions and the reduced part it owns, is NaN.
    Round 1: the honest three exclude its contributions, refuse its NaN result, re-reduce its part among
    themselves and all hold the honest mean; each bans it. Round 2: they average without it; it finds no group."""
    values = [1.0, 2.0, 6.0, 50.0]
    specs = [dict(size=40_000, value=v, group=4, min_group=2, matchmaking_time=3, rounds=2, pause=1.0)
             for v in values]
    specs[3]["garbage"] = True
    results, tensors, ids = run_group(bootstrap, tmp_path, specs, timeout=120, with_ids=True)
    byzantine = ids[3]
    honest_mean = sum(values[:3]) / 3
    for res, t in zip(results[:3], tensors[:3]):
        first, second = res
        assert first["ok"] and first["group_size"] == 4 and byzantine in first["excluded"], outcome(results)
        assert byzantine in first["banned"], first
        assert second["ok"] and second["group_size"] == 3 and byzantine not in second["peers"], second
        assert not torch.isnan(t).any()
        assert torch.all(t == honest_mean), t.unique()
    assert not results[3][1]["ok"], results[3]


def test_out_of_range_sender_is_excluded_and_banned(bootstrap, tmp_path):
    """With max_abs_value=100, a peer sending its values x1000 (beyond 100; it skips its own check) is out of
    range: every honest owner excludes its contributions and bans it; the part it owns comes back out of
    range too, so the honest members refuse it and re-reduce it among themselves: all hold the honest mean."""
    n, size = 4, 50_000
    specs = [dict(size=size, seed=i, group=n, matchmaking_time=6, max_abs_value=100.0) for i in range(n)]
    specs[3].update(scale=1000.0, max_abs_value=None)
    results, tensors, ids = run_group(bootstrap, tmp_path, specs, with_ids=True)
    byzantine = ids[3]
    honest = torch.stack([torch.randn(size, generator=torch.Generator().manual_seed(i)) for i in range(3)]).mean(0)
    for res, t in zip(results[:3], tensors[:3]):
        assert res[0]["ok"] and byzantine in res[0]["excluded"] and byzantine in res[0]["banned"], json.dumps(results)
        assert torch.allclose(t, honest, atol=1e-5), (results, (t - honest).abs().max())
        assert torch.equal(t, tensors[0])


def _subset_means(values):
    """Means over every subset of at least two members (values are distinct powers of two, so these
    means tell the subsets apart and none equals a single member's own value)."""
    from itertools import combinations
    return {sum(c) / len(c) for r in range(2, len(values) + 1) for c in combinations(values, r)}


def _check_survivors(results, tensors, values, victim):
    survivors = [i for i in range(len(values)) if i != victim]
    allowed = sorted(_subset_means(values))
    oks = [i for i in survivors if results[i][0]["ok"]]
    for i in survivors:
        t, r = tensors[i], results[i][0]
        if r["ok"]:
            # every element averaged over >= 2 members (a slow member may miss a part, but nothing is
            # ever left at the local value) ...
            close = torch.zeros_like(t, dtype=torch.bool)
            for a in allowed:
                close |= (t - a).abs() < 1e-4
            assert close.all(), f"peer {i}: elements not averaged: {t[~close][:5]}"
        else:
            assert torch.all(t == values[i]), f"peer {i} failed but changed its tensors"
    for i in oks:  # ... and bit-identical on every survivor that finished
        assert torch.equal(tensors[i], tensors[oks[0]])
    return len(oks)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_member_dies_at_random_moments(tmp_path, sig):
    trials = int(os.environ.get("SWARMTRAIN_FAULT_TRIALS", "10"))
    rng = random.Random(sig)
    n, size, chunk_timeout = 4, 2_000_000, 2.0
    values = [1.0, 2.0, 4.0, 8.0]
    finished_ok = 0
    for trial in range(trials):
        tmp = tmp_path / f"t{trial}"
        tmp.mkdir()
        specs = [dict(size=size, value=v, group=n, matchmaking_time=2, chunk_timeout=chunk_timeout) for v in values]
        # a fresh bootstrap per trial: the dead peers of earlier trials must not slow later joins
        bootstrap = DHT()
        peers = start_peers(bootstrap.addrs[0], tmp, specs)
        victim = rng.randrange(n)
        try:
            go(peers)
            time.sleep(rng.uniform(1.5, 3.5))  # matchmaking takes ~2 s; the transfer follows
            os.kill(peers[victim].proc.pid, sig)
            killed_at = time.monotonic()
            results, tensors = [None] * n, [None] * n
            for i, p in enumerate(peers):
                if i != victim:
                    results[i] = p.results(timeout=60)
                    tensors[i] = p.tensor()
            waited = time.monotonic() - killed_at
            assert waited < 4 * chunk_timeout + 10, f"survivors took {waited:.1f}s after the fault"
            for i in range(n):
                if i != victim:
                    assert results[i][0]["wall"] < 40, results[i]
            finished_ok += _check_survivors(results, tensors, values, victim) > 0
        finally:
            if sig == signal.SIGSTOP:
                os.kill(peers[victim].proc.pid, signal.SIGCONT)
            stop(peers)
            bootstrap.shutdown()
    assert finished_ok >= trials // 2, f"only {finished_ok}/{trials} trials averaged at all"
