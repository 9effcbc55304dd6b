"""The swarm-inspection notebook (notebooks/inspect_swarm.ipynb) and its DHT reader, :mod:`peer.swarm_state`.

Fast tests: :mod:`peer.swarm_state` on hand-made DHT values (expert declarations, progress records, averaging
announcements), no network.

Slow test: the notebook against a live swarm of real processes on loopback — a bootstrap peer and an expert
host (``python -m peer``, via :func:`peer.app.cli.main`) and one trainer that reports progress every 2 steps
(``eval_every=2``; the CLI's default of 50 steps takes minutes on 2 cores). It executes the notebook with
nbclient the way papermill runs it: the bootstrap address comes from ``SWARMTRAIN_INITIAL_PEERS``, the other
parameters from a cell injected after the one tagged ``parameters``. Checked: the peer table lists the
bootstrap, the experts table the host, the progress table the trainer; a PNG plot is displayed and saved.

``python -m pytest -q tests/test_notebook.py`` runs both (about a minute); ``-m "not slow"`` only the fast ones.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from dht import ValueWithExpiration, get_dht_time
from peer.swarm_state import (averaging_announcements, averaging_rounds, expert_hosts, progress_series,
                          swarm_throughput, training_prefix, training_progress)
from peer.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "notebooks" / "inspect_swarm.ipynb"
SWARM = "notebook-test"
LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]

PEER = """
import sys
from peer.app.cli import main
sys.exit(main({argv!r}))
"""

TRAINER = """
from dht import DHT
from p2p import NodeConfig, setup_logging
from peer.training.privacy import DPConfig
from peer.training.trainer import TrainConfig, Trainer

setup_logging("INFO")
dht = DHT(initial_peers=[{join!r}], node_config=NodeConfig(swarm={swarm!r}, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
print("TRAINER", dht.peer_id, flush=True)
config = TrainConfig(model="tiny", sync="diloco", batch_size=4, local_steps=10, eval_every=2, eval_batches=1,
                     max_samples=1_000_000, dp=DPConfig(clip=1.0, noise_multiplier=1.0))
trainer = Trainer(dht, config)
trainer.run(on_step=lambda t, loss: print("PUBLISHED", t.step, flush=True) if t.step % config.eval_every == 0 else None)
"""


def subkeyed(entries: dict, expiration: float) -> ValueWithExpiration:
    """A sub-keyed value as ``DHT.get`` returns it: ``{subkey: ValueWithExpiration(payload, expiration)}``."""
    return ValueWithExpiration({k: ValueWithExpiration(v, expiration) for k, v in entries.items()}, expiration)


def test_expert_hosts_group_declarations_by_host_and_skip_tombstones_and_junk():
    config, later = ModelConfig.tiny(), get_dht_time() + 30
    found = {
        "ffn0.": subkeyed({"hostA": {"uids": ["ffn0.0.0", "ffn0.0.1"], "addrs": ["/ip4/1.2.3.4/tcp/1/p2p/hostA"]},
                           "hostB": {"uids": [], "addrs": []},        # tombstone: hosts nothing any more
                           "hostC": "garbage"}, later),
        "ffn1.": subkeyed({"hostA": {"uids": ["ffn1.3.3"], "addrs": []},
                           "hostD": {"uids": ["ffn1.0.0"], "addrs": []}}, later),
    }
    got = expert_hosts(found, config)
    assert [(h["peer_id"], h["experts"], h["per_layer"]) for h in got["hosts"]] == [
        ("hostA", 3, {"ffn0": 2, "ffn1": 1}), ("hostD", 1, {"ffn1": 1})]
    assert got["model_experts"] == 32 and got["hosted"] == 4 and len(got["missing"]) == 28
    assert "ffn0.0.0" not in got["missing"] and "ffn0.3.3" in got["missing"]
    assert expert_hosts({}, config)["hosts"] == []


def test_progress_series_dedupes_reads_and_computes_throughput():
    def read(a_samples, a_t, b_samples=None, b_t=None):
        value = {"trainerA": {"samples": a_samples, "step": a_samples // 8, "loss": 5.0 - a_t / 100, "t": a_t}}
        if b_samples is not None:
            value["trainerB"] = {"samples": b_samples, "step": 1, "loss": None, "t": b_t}
        value["junk"] = {"samples": "many"}
        return training_progress(subkeyed(value, get_dht_time() + 60))

    snapshots = [read(80, 100.0), read(80, 100.0), read(160, 110.0, 40, 105.0), read(240, 120.0, 120, 115.0)]
    series = progress_series(snapshots)
    assert [p["samples"] for p in series["trainerA"]] == [80, 160, 240]  # the repeated read counted once
    assert [p["samples_per_s"] for p in series["trainerA"]] == [None, 8.0, 8.0]
    assert [p["samples_per_s"] for p in series["trainerB"]] == [None, 8.0]
    assert series["trainerB"][0]["loss"] is None and "junk" not in series
    assert swarm_throughput(series) == [(110.0, 8.0), (115.0, 16.0), (120.0, 16.0)]
    assert swarm_throughput({}) == []


def test_averaging_rounds_group_announcements_alive_at_the_same_time():
    now = get_dht_time()
    value = subkeyed({"p1": {"bw": 1e8, "client": False, "sig": "x", "t": now - 1}}, now + 3)
    value.value["p2"] = ValueWithExpiration({"bw": 5e7, "client": True, "sig": "x", "t": now - 0.5}, now + 3.5)
    value.value["p3"] = ValueWithExpiration({"done": True}, now + 1)
    rows = averaging_announcements(value)
    assert [(r["peer_id"], r["status"]) for r in rows] == [("p1", "looking"), ("p2", "looking"), ("p3", "done")]
    assert rows[0]["bandwidth_mb_s"] == 100.0 and rows[1]["client"] is True
    late = {"peer_id": "p3", "status": "looking", "t": now + 10, "expiration_time": now + 14}
    assert [r["peers"] for r in averaging_rounds([*rows, late])] == [["p1", "p2"], ["p3"]]


def test_training_prefix_names_what_trainers_publish_and_rejects_bad_names():
    assert training_prefix("local-demo", "tiny", "diloco") == "local-demo.tiny.diloco"
    for args in (("s", "tiny", "sgd"), ("s", "huge", "grad"), ("a/b", "tiny", "grad"), ("", "tiny", "grad")):
        with pytest.raises(ValueError):
            training_prefix(*args)


def wait_for_log(child, text: str, timeout: float) -> None:
    """Wait until the child's stderr log contains ``text``; fail with the log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while text not in child.log():
        assert child.proc.poll() is None, f"child exited ({child.proc.returncode}):\n{child.log()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{child.log()[-3000:]}"
        time.sleep(0.2)


def outputs_of(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def html_table(outputs: list[dict], name: str) -> str:
    """The HTML of the notebook's table ``name`` (see the notebook's ``Table`` helper)."""
    found = [out["data"]["text/html"] for out in outputs
             if "text/html" in out.get("data", {}) and f'data-table="{name}"' in out["data"]["text/html"]]
    assert len(found) == 1, f"expected one {name!r} table, got {len(found)}"
    return found[0]


@pytest.mark.slow
def test_notebook_shows_a_live_swarm(python_process, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    boot = python_process(PEER.format(argv=[*LOOPBACK, "--swarm", SWARM, "--log-level", "WARNING"]))
    join = boot.expect("All addresses of this peer: ", timeout=60).split()[0]
    boot_id = join.rsplit("/p2p/", 1)[1]
    experts = python_process(PEER.format(argv=[*LOOPBACK, "--initial-peers", join, "--swarm", SWARM,
                                               "--experts", "32", "--device", "cpu"]))
    host_id = experts.expect("All addresses of this peer: ", timeout=60).split()[0].rsplit("/p2p/", 1)[1]
    wait_for_log(experts, "Hosting 32 experts", timeout=90)
    trainer = python_process(TRAINER.format(join=join, swarm=SWARM))
    trainer_id = trainer.expect("TRAINER ", timeout=60).strip()
    trainer.expect("PUBLISHED ", timeout=90)  # its first progress record is in the DHT

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    plot = tmp_path / "plots" / "progress.png"
    injected = nbformat.v4.new_code_cell(
        f"swarm = {SWARM!r}\nwatch_seconds = 10.0\nsample_every = 1.0\nplot_path = {str(plot)!r}\ncrawl_timeout = 5.0")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    monkeypatch.setenv("SWARMTRAIN_INITIAL_PEERS", join)  # the notebook's default source of initial_peers
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:  # what ran, outputs included, for a look after a failure
        nbformat.write(nb, tmp_path / "inspect_swarm.executed.ipynb")

    outputs = outputs_of(nb)
    assert not [out for out in outputs if out.get("output_type") == "error"]
    peers = html_table(outputs, "peers")
    assert boot_id in peers
    assert host_id[-8:] in html_table(outputs, "experts") and "ffn0: 16, ffn1: 16" in html_table(outputs, "experts")
    progress = html_table(outputs, "progress")
    assert trainer_id[-8:] in progress  # the trainer's row (peer IDs shown as …<last 8>)
    assert "ε 0.00 (δ 1e-05, 0 rounds)" in progress   # its privacy: alone, it never sent a contribution
    assert trainer_id[-8:] in html_table(outputs, "leaderboard")      # its contribution record
    assert host_id[-8:] in html_table(outputs, "host-leaderboard")    # the host's served-rows record
    assert any("image/png" in out.get("data", {}) for out in outputs)
    assert plot.stat().st_size > 1000
    stdout = "".join(out.get("text", "") for out in outputs if out.get("name") == "stdout")
    assert "left the swarm" in stdout
    assert "Generated: The " in stdout, stdout[-2000:]          # it talked to the model the swarm trains
    for child in (boot, experts, trainer):
        assert child.proc.poll() is None, f"a swarm process died while the notebook ran:\n{child.log()[-3000:]}"
