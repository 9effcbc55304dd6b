"""The dashboard (peer.app.dashboard), contributions on record (peer.training.ledger, peer.contributions) and
python -m peer.swarm's output, ending with a real browser on a live 4-peer swarm."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from averaging.averager import StepResult
from peer.app.dashboard_page import line_chart
from peer.app.swarm_status import parse_finished, status_line, summary_table
from peer.contributions import leaderboard
from peer.training.ledger import ContributionLedger
from testbed.dashboard_check import LocalSwarm, browse, chromium_paths

ROOT = Path(__file__).resolve().parents[1]
A, B, C = "12D3KooWAAAA", "12D3KooWBBBB", "12D3KooWCCCC"


def three_member_round(weights: dict[str, float], client: str) -> dict[str, ContributionLedger]:
    """One committed round of A, B, C where ``client`` owns no part (so it saw no weight)."""
    witnesses = [p for p in weights if p != client]
    ledgers = {p: ContributionLedger(p) for p in weights}
    for p, ledger in ledgers.items():
        result = StepResult(ok=True, group_size=3, contributors=list(weights), witnesses=witnesses,
                            observed_weights={} if p == client else dict(weights))
        ledger.add_round(result, weights[p])
    return ledgers


def rows(ledgers: dict[str, ContributionLedger], samples: int = 100) -> list[dict]:
    return [{"peer_id": p, "samples": samples, "ledger": ledger.record()} for p, ledger in ledgers.items()]


def test_ledgers_confirm_each_other_and_catch_an_inflated_claim():
    ledgers = three_member_round({A: 10.0, B: 20.0, C: 30.0}, client=C)
    # the client's 30 samples are claimed half towards each witness; each witness saw them
    assert ledgers[C].record()["claims"] == {A: 15.0, B: 15.0}
    assert ledgers[A].record()["seen"] == {B: 20.0, C: 15.0}
    board = leaderboard(rows(ledgers))
    assert not board["mismatches"]
    assert {r["peer_id"]: r["confirmed"] for r in board["trainers"]} == {A: 10.0, B: 20.0, C: 30.0}
    assert [r["peer_id"] for r in board["trainers"]] == [C, B, A]  # most confirmed first

    liar = rows(ledgers)
    liar[2]["ledger"] = {**liar[2]["ledger"], "averaged": 300.0, "claims": {A: 150.0, B: 150.0}}
    board = leaderboard(liar)
    c = next(r for r in board["trainers"] if r["peer_id"] == C)
    assert c["averaged"] == 300.0 and c["confirmed"] == 30.0 and c["mismatches"] == 2
    assert {(m["partner"], m["claimed"], m["seen"]) for m in board["mismatches"]} == {(A, 150.0, 15.0), (B, 150.0, 15.0)}

    # a partner that left (no record) leaves the claim towards it unconfirmed, and accuses nobody
    board = leaderboard([r for r in rows(ledgers) if r["peer_id"] != B])
    assert not board["mismatches"]
    assert {r["peer_id"]: r["confirmed"] for r in board["trainers"]} == {A: 0.0, C: 15.0}


def test_a_witness_whose_round_failed_still_vouches_and_failed_rounds_claim_nothing():
    me, partner = ContributionLedger(A), ContributionLedger(B)
    me.add_round(StepResult(ok=True, contributors=[A, B], witnesses=[A, B], observed_weights={A: 8.0, B: 5.0}), 8.0)
    partner.add_round(StepResult(ok=False, contributors=[], witnesses=[A, B], observed_weights={A: 8.0, B: 5.0},
                                 reason="some parts could not be averaged or repaired"), 5.0)
    assert partner.record()["averaged"] == 0 and partner.record()["claims"] == {}
    assert partner.record()["seen"] == {A: 8.0}
    board = leaderboard([{"peer_id": A, "samples": 8, "ledger": me.record()},
                         {"peer_id": B, "samples": 5, "ledger": partner.record()}])
    assert not board["mismatches"] and board["trainers"][0] == {"peer_id": A, "samples": 8, "averaged": 8.0,
                                                                "confirmed": 8.0, "rounds": 1, "mismatches": 0}
    assert [r["ok"] for r in partner.recent] == [False]


def test_host_rows_are_confirmed_by_what_trainers_report_and_garbage_is_ignored():
    progress = [{"peer_id": A, "samples": 1, "hosts": {C: 700}, "ledger": "not a dict"},
                {"peer_id": B, "samples": 1, "hosts": {C: 300, "x": -5, "y": "many"}}]
    board = leaderboard(progress, [{"peer_id": C, "rows": 1200}])
    assert board["hosts"] == [{"peer_id": C, "rows": 1200, "confirmed_rows": 1000}]
    assert all(r["averaged"] == 0.0 and r["confirmed"] == 0.0 for r in board["trainers"])


def test_line_chart_counts_its_points_and_drops_non_finite_ones():
    svg = line_chart("c", {"a": [[1.0, 2.0], [2.0, float("nan")], [3.0, 1.0]], "b": [[2.0, 5.0]]}, y_label="loss")
    assert 'id="c"' in svg and 'data-points="3"' in svg
    assert svg.count("<circle") == 3 and 'data-name="a" data-points="2"' in svg
    assert "no loss yet" in line_chart("e", {}, y_label="loss")


def test_status_line_and_summary_from_a_trainers_own_lines():
    line = ("12:00:00 INFO peer.training.trainer: Finished: 240 samples in 30 steps, final eval loss 3.1241, "
            "averaging 6 ok / 1 failed, 1340000 bytes (670000 sent)")
    assert parse_finished(line) == (240, "3.1241", 6, 1, 670000)
    table = summary_table({"trainer0": parse_finished(line), "trainer1": None})
    assert "trainer0" in table and "3.1241" in table and "0.67" in table and "did not finish" in table
    row = {"step": 12, "loss": 3.5, "sps": 40.25, "peers": 4,
           "last_round": {"ok": False, "contributors": 0, "group": 3, "s": 2.5}}
    assert status_line("trainer1", row) == ("trainer1  step   12 | loss 3.500 | 40.2 samples/s | peers 4 | "
                                            "last round FAILED, 3 peers, 2.50 s")
    assert "waiting" in status_line("trainer2", None)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.headers["content-type"], reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read()


def test_dashboard_serves_the_page_and_a_json_api_in_client_mode_too():
    from dht import DHT
    from p2p import NodeConfig
    from peer.app.dashboard import ENDPOINTS, Dashboard

    boot = DHT(node_config=NodeConfig(swarm="dash", host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    client = DHT(initial_peers=boot.addrs, node_config=NodeConfig(swarm="dash", client_mode=True))
    board = Dashboard(client, swarm="dash", listen=("127.0.0.1", 0), poll_s=0.5)
    try:
        status, kind, body = get(board.url)
        assert status == 200 and kind.startswith("text/html") and b"swarmtrain dashboard" in body
        assert b'id="loss-chart"' in body and b"fetch('/panel')" in body
        index = json.loads(get(board.url + "api/")[2])
        assert set(index["endpoints"]) == set(ENDPOINTS)
        for endpoint in ENDPOINTS:
            status, kind, body = get(board.url.rstrip("/") + endpoint)
            assert status == 200 and kind == "application/json", endpoint
            json.loads(body)  # valid JSON (no inf or NaN)
        swarm = json.loads(get(board.url + "api/swarm")[2])
        assert swarm["me"] == client.peer_id and swarm["swarm"] == "dash"
        assert client.peer_id in [p["peer_id"] for p in swarm["peers"]]  # never crawled, still listed
        assert len(swarm["experts"]["layers"]) == 2 and swarm["experts"]["hosted"] == 0
        status, _, body = get(board.url + "api/nothing")
        assert status == 404 and "see /api/" in json.loads(body)["error"]
        request = urllib.request.Request(board.url + "api/swarm", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 405
        assert get(board.url + "panel")[0] == 200  # still serving after the bad requests
    finally:
        board.shutdown()
        client.shutdown()
        boot.shutdown()


def run_peer(*flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peer", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *flags],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_dashboard_flag_errors_are_one_line():
    bad = run_peer("--dashboard-port", "80a")
    assert bad.returncode == 2 and "--dashboard-port '80a': use PORT or HOST:PORT" in bad.stderr
    assert "Traceback" not in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run_peer("--dashboard-port", str(taken.getsockname()[1]))
    assert busy.returncode == 1 and "dashboard: cannot listen on 127.0.0.1:" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr


def artifacts_dir() -> Path:
    """Where tests leave files of the run (screenshots): $SWARMTRAIN_ARTIFACTS, else artifacts/ (git-ignored)."""
    return Path(os.environ.get("SWARMTRAIN_ARTIFACTS", ROOT / "artifacts"))


@pytest.mark.slow
@pytest.mark.skipif(chromium_paths() is None, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_browser_sees_a_live_four_peer_swarm():
    """A bootstrap, one expert host and two trainers (python -m peer.swarm); headless Chromium on the dashboard."""
    with LocalSwarm("--trainers", "2", "--expert-hosts", "1", "--samples", "480", "--local-steps", "5") as swarm:
        swarm.wait_api("training", lambda t: len(t["trainers"]) == 2 and
                       any(len(points) >= 2 for points in t["loss_series"].values()), timeout=180)
        shot = artifacts_dir() / "dashboard.png"
        seen = browse(swarm.url, shot, min_peers=4)
        assert seen["peers"] >= 4 and seen["trainers"] == 2, seen
        assert seen["expert_cells"] == 32 and seen["hosted_cells"] == 32, seen
        assert seen["loss_points"] >= 2 and seen["leaderboard"] == 2, seen
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # contributions: after rounds, every trainer's averaged samples are confirmed by its partner
        board = swarm.wait_api("contributions", lambda b: all(r["rounds"] >= 2 for r in b["trainers"])
                               and len(b["trainers"]) == 2, timeout=180)
        assert not board["mismatches"], board
        assert all(0 < r["confirmed"] <= r["averaged"] <= r["samples"] for r in board["trainers"]), board
        assert board["hosts"] and board["hosts"][0]["confirmed_rows"] > 0, board
        assert swarm.wait(300) == 0, "\n".join(swarm.lines[-30:])
    out = "\n".join(swarm.lines)
    assert f"dashboard: {swarm.url}" in out
    assert "status: trainer0  step" in out and "last round ok" in out, out[-3000:]
    summary = out[out.index("trainer    samples final loss"):]
    assert "trainer0       480" in summary and "trainer1       480" in summary, summary


def test_prometheus_carries_the_new_figures():
    from types import SimpleNamespace

    from peer.app.metrics import Metrics
    from peer.moe.call_stats import ExpertCallStats
    from peer.app.swarm import free_port

    port = free_port(0)
    metrics = Metrics(port)
    ledger = ContributionLedger(A)
    ledger.add_round(StepResult(ok=True, contributors=[A, B], witnesses=[A, B], observed_weights={A: 8.0, B: 5.0},
                                duration=1.5, bytes_sent=100), 8.0)
    calls = ExpertCallStats()
    calls.record("ffn0.0.0", C, 10, 0.1, ok=False)
    trainer = SimpleNamespace(loss_ema=2.0, history=[{"eval_loss": 2.1}], dht=SimpleNamespace(routing=[1, 2]),
                              rounds_ok=1, rounds_failed=0, bytes_sent=100, ledger=ledger, samples=8, privacy=None,
                              call_stats=lambda: calls)
    metrics.update_trainer(trainer, 3.0)
    metrics.update_host(SimpleNamespace(load=lambda: {"rows": 42, "uids": {"ffn0.0.0": [30, 12, 3, 1, 5.0]}}))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    figures = dict(line.split() for line in text.splitlines() if line.startswith("swarmtrain_"))
    assert figures["swarmtrain_contribution_averaged_samples"] == "8.0"
    assert figures["swarmtrain_contribution_partner_samples_seen"] == "5.0"
    assert figures["swarmtrain_averaging_last_round_seconds"] == "1.5"
    assert figures["swarmtrain_expert_call_failures"] == "1.0"
    assert figures["swarmtrain_expert_rows_served"] == "42.0" and figures["swarmtrain_expert_requests_failed"] == "1.0"
