"""docker/: the Dockerfile, the compose swarm, its helpers, and the same swarm run in network namespaces.

The static tests need no Docker: they check that every compose command is one ``python -m peer``
accepts, that the wiring (volumes, networks, healthchecks, start order, the bootstrap's identity and
address) is consistent, and that the Dockerfile pins what the project pins. The ``slow``/``netns``
test runs the compose services as real processes with docker/netns_swarm.py (root only).
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from peer.app.cli import check_args, parse_args
from peer.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


netns_swarm = _load("netns_swarm")
join_config = _load("join_config")
healthcheck = _load("healthcheck")


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def services():
    return {s.name: s for s in netns_swarm.load_services(COMPOSE)}


@pytest.fixture
def volume_root(tmp_path, services):
    """Volumes as directories, with the join config written by the join-config service's own command."""
    init = services["join-config"]
    argv = netns_swarm.localize(init.command, init.mounts, tmp_path)
    assert join_config.main(argv) == 0
    return tmp_path


def peer_args(service, volume_root):
    args = parse_args(netns_swarm.localize(service.command, service.mounts, volume_root))
    check_args(args)
    return args


# ------------------------------------------------------------------ compose file
def test_compose_has_the_topology(services):
    roles = sorted(s.role for s in services.values())
    assert roles == ["bootstrap", "experts", "experts", "init", "trainer", "trainer", "trainer"]


def test_every_peer_command_is_accepted_by_the_cli(services, volume_root):
    bootstrap = peer_args(services["bootstrap"], volume_root)
    assert bootstrap.initial_peers == []
    for s in services.values():
        if s.role in ("experts", "trainer"):
            args = peer_args(s, volume_root)
            assert len(args.initial_peers) == 1, s.name
            assert args.swarm == bootstrap.swarm, s.name
            assert args.metrics_port, s.name


def test_join_config_names_the_bootstrap_identity_and_address(services, volume_root):
    init = join_config.build_parser().parse_args(services["join-config"].command)
    boot = services["bootstrap"]
    boot_args = peer_args(boot, volume_root)
    # the key join-config writes is the key the bootstrap loads (same volume, same path)
    assert netns_swarm.localize([init.identity], services["join-config"].mounts, volume_root) == \
        [boot_args.identity]
    assert boot_args.announce_maddrs == [init.address]
    assert boot_args.host_maddrs[0].endswith("/tcp/" + init.address.rsplit("/", 1)[1])
    assert init.address.startswith(f"/dns4/{boot.name}/")   # resolvable by Docker's DNS
    from p2p import load_or_create_identity, peer_id_of
    peer_id = peer_id_of(load_or_create_identity(boot_args.identity))
    trainer = peer_args(services["trainer0"], volume_root)
    assert trainer.initial_peers == [f"{init.address}/p2p/{peer_id}"]


def test_trainers_split_the_data_and_expert_hosts_cover_the_grid(services, volume_root):
    trainers = [peer_args(s, volume_root) for s in services.values() if s.role == "trainer"]
    assert sorted(a.shard for a in trainers) == list(range(len(trainers)))
    assert {a.num_shards for a in trainers} == {len(trainers)}
    assert all(a.checkpoint_dir and a.checkpoint_dir.startswith(str(volume_root)) for a in trainers)
    hosts = [peer_args(s, volume_root) for s in services.values() if s.role == "experts"]
    cfg = ModelConfig.preset(hosts[0].model)
    assert sum(a.experts for a in hosts) >= cfg.n_layer * cfg.grid_size[0] * cfg.grid_size[1]
    assert all(a.device == "cpu" and a.expert_checkpoint_dir for a in hosts)
    # every peer keeps its own state: no two services write the same volume directory
    dirs = [a.checkpoint_dir for a in trainers] + [a.expert_checkpoint_dir for a in hosts]
    assert len(set(dirs)) == len(dirs)


def test_volumes_networks_and_build_exist(compose):
    declared_volumes = set(compose["volumes"])
    used = set()
    for name, s in compose["services"].items():
        assert set(s["networks"]) <= set(compose["networks"]), name
        for v in s.get("volumes", []):
            source = v.split(":")[0]
            assert source in declared_volumes, f"{name}: volume {source} is not declared"
            used.add(source)
        for dep in s.get("depends_on", {}):
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
    assert used == declared_volumes
    builds = [s["build"] for s in compose["services"].values() if "build" in s]
    assert len(builds) == 1   # one build; the other services reuse its image tag
    context = (COMPOSE.parent / builds[0]["context"]).resolve()
    assert context == REPO and (context / builds[0]["dockerfile"]).is_file()
    assert {s["image"] for s in compose["services"].values()} == {"swarmtrain:cpu"}


def test_long_running_services_have_matching_healthchecks(services, volume_root):
    for s in services.values():
        if s.role == "init":
            continue
        assert s.healthcheck, f"{s.name} has no healthcheck"
        check = healthcheck_args(s.healthcheck)
        assert check.port == peer_args(s, volume_root).metrics_port, s.name
        assert (check.gauge == "swarmtrain_experts_hosted") == (s.role == "experts"), s.name


def healthcheck_args(argv):
    assert argv[:2] == ["python", "/app/docker/healthcheck.py"]
    port = int(argv[argv.index("--port") + 1])
    gauge = argv[argv.index("--gauge") + 1] if "--gauge" in argv else None
    return type("Check", (), {"port": port, "gauge": gauge})


def test_start_order(services):
    order = [s.name for s in netns_swarm.load_services(COMPOSE)]
    assert order.index("join-config") < order.index("bootstrap") < order.index("experts0") < order.index("experts1")
    assert all(order.index("experts1") < order.index(f"trainer{i}") for i in range(3))
    assert services["bootstrap"].depends_on == {"join-config": "service_completed_successfully"}
    assert services["experts1"].depends_on == {"experts0": "service_healthy"}


# ------------------------------------------------------------------ Dockerfile
def test_dockerfile_pins_torch_and_takes_a_device_arg():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG DEVICE=cpu$", text, re.M)
    installs = re.findall(r"pip install torch\S*", text)
    assert installs and set(installs) == {"pip install torch==2.13.0"}
    assert "cpu)" in text and "cuda)" in text and "download.pytorch.org/whl/cpu" in text
    assert re.search(r'^ENTRYPOINT \["python", "-m", "peer"\]$', text, re.M)
    assert "pip install /app" in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject  # the image and the package pin the same torch
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ".git" in ignore


# ------------------------------------------------------------------ helpers
def test_join_config_is_stable_and_rejects_bad_addresses(tmp_path, capsys):
    key, out = tmp_path / "id" / "boot.key", tmp_path / "join" / "peers.yaml"
    first = join_config.write_join_config(key, "/ip4/10.0.0.2/tcp/31337", out)
    assert join_config.write_join_config(key, "/ip4/10.0.0.2/tcp/31337", out) == first
    assert yaml.safe_load(out.read_text()) == {"initial_peers": [first]}
    assert key.stat().st_mode & 0o077 == 0
    assert join_config.main(["--identity", str(key), "--address", first, "--out", str(out)]) == 1
    assert join_config.main(["--identity", str(key), "--address", "not-a-maddr", "--out", str(out)]) == 1
    assert "error:" in capsys.readouterr().err


def test_healthcheck_reads_the_metrics_endpoint():
    import prometheus_client as prom
    from http.server import HTTPServer

    registry = prom.CollectorRegistry()
    gauge = prom.Gauge("swarmtrain_experts_hosted", "experts", registry=registry)
    server = HTTPServer(("127.0.0.1", 0), prom.MetricsHandler.factory(registry))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert healthcheck.check(port) is None
        assert "expected > 0" in healthcheck.check(port, "swarmtrain_experts_hosted")
        assert "is None" in healthcheck.check(port, "swarmtrain_no_such_gauge")
        gauge.set(16)
        assert healthcheck.main(["--port", str(port), "--gauge", "swarmtrain_experts_hosted"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert "does not answer" in healthcheck.check(port, timeout=1)
    assert healthcheck.gauge_value("# HELP x\nx 2.5\nx_total 1\n", "x") == 2.5


def test_localize_and_flag_override(tmp_path):
    argv = ["python", "/app/docker/x.py", "--config", "/join/peers.yaml", "--data", "/database", "/data"]
    out = netns_swarm.localize(argv, {"/join": "join", "/data": "d0"}, tmp_path)
    assert out == [sys.executable, str(REPO / "docker/x.py"), "--config", str(tmp_path / "join/peers.yaml"),
                   "--data", "/database", str(tmp_path / "d0")]
    assert netns_swarm._set_flag(["--max-samples", "5", "--train"], "--max-samples", "9") == \
        ["--train", "--max-samples", "9"]
    assert netns_swarm._seconds("1m30s") == 90 and netns_swarm._seconds(2) == 2
    with pytest.raises(ValueError):
        netns_swarm._seconds("soon")


def test_load_services_rejects_a_dependency_cycle(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({"services": {"a": {"depends_on": ["b"]}, "b": {"depends_on": ["a"]}}}))
    with pytest.raises(ValueError, match="cycle"):
        netns_swarm.load_services(path)


# ------------------------------------------------------------------ the swarm, for real
def _netns_reason() -> str | None:
    sys.path.insert(0, str(REPO))
    from testbed.netns import netns_available
    return netns_available()


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(420)
def test_compose_swarm_trains_in_network_namespaces(services):
    reason = _netns_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    before = _namespaces()
    # ~100 s on 2 busy cores: 3 trainers x 400 samples reach their step-50 evaluation
    proc = subprocess.run([sys.executable, str(DOCKER / "netns_swarm.py"), "--samples", "400",
                           "--bandwidth-mbit", "50", "--timeout", "300"],
                          capture_output=True, text=True, timeout=400, cwd=REPO)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["ok"], json.dumps(summary, indent=1) + proc.stderr[-3000:]
    assert set(summary["peers"]) == set(services)
    for name, peer in summary["peers"].items():
        assert peer["started"], name
    for name, peer in summary["peers"].items():
        if peer["role"] == "trainer":
            assert peer["exit_code"] == 0, name
            assert peer["final_eval"]["step"] >= 50, name
            assert peer["final_eval"]["eval_loss"] < peer["initial_eval_loss"] - 1.0, name  # it learned
        elif peer["role"] == "init":
            assert peer["exit_code"] == 0
        else:
            assert peer["healthy"] and not peer["died_early"], name
            assert peer["exit_code"] == 0, f"{name} did not shut down cleanly on SIGTERM"
    after = _namespaces()
    assert after == before
    # resolv.conf files exist only for live namespaces (ours are gone with our namespaces)
    assert {d.name for d in netns_swarm.ETC_NETNS.glob("swt*")} <= after
