"""Private swarms: a pre-shared key keeps strangers from connecting; an allowlist keeps others from every service.

A server peer (its own process) runs a DHT, an expert server and an averager with ``psk`` and
``allowed_peers``. An outsider without the key cannot even connect; one with the key but not on the
allowlist can open no stream: no DHT store, no averaging join, no expert call. An insider uses all three.
"""
from __future__ import annotations

import json
import secrets

import pytest
import torch

from averaging import Averager, AveragerConfig
from dht import DHT, get_dht_time
from dht.dht import DHTBootstrapError
from p2p import NodeConfig, P2PError, peer_id_of
from p2p.identity import load_or_create_identity
from peer.moe.remote import RemoteExpert

SERVER = r"""
import json, sys, torch
from p2p import NodeConfig, setup_logging
setup_logging("INFO")
from averaging import Averager, AveragerConfig
from dht import DHT
from peer.hosting.server import ExpertServer, create_experts
cfg = json.loads(%r)
dht = DHT(node_config=NodeConfig(psk=cfg["psk"], allowed_peers=cfg["allowed"], host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
server = ExpertServer(dht, create_experts("ffn", ["ffn.0.0"], 16, seed=0))
averager = Averager([torch.zeros(8)], dht, "private", AveragerConfig(target_group_size=2, matchmaking_time=2))
print("ADDR", dht.addrs[0], flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def private_server(python_process, tmp_path):
    psk = secrets.token_hex(32)
    insider_key = tmp_path / "insider.key"
    insider_id = peer_id_of(load_or_create_identity(str(insider_key)))
    server = python_process(SERVER % json.dumps({"psk": psk, "allowed": [insider_id]}))
    addr = server.expect("ADDR ", timeout=60)
    return server, addr, psk, str(insider_key)


def test_without_the_swarm_key_nobody_connects(private_server):
    _, addr, psk, _ = private_server
    with pytest.raises(DHTBootstrapError):
        DHT(initial_peers=[addr], node_config=NodeConfig(client_mode=True))
    with pytest.raises(DHTBootstrapError):
        DHT(initial_peers=[addr], node_config=NodeConfig(client_mode=True, psk=secrets.token_hex(32)))


def test_an_outsider_with_the_key_can_use_no_service(private_server):
    server, addr, psk, insider_key = private_server
    server_id = addr.rsplit("/", 1)[1]
    with pytest.raises(DHTBootstrapError):  # its pings are refused: it cannot join the DHT
        DHT(initial_peers=[addr], node_config=NodeConfig(client_mode=True, psk=psk))
    outsider = DHT(node_config=NodeConfig(psk=psk, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))  # a swarm of its own, then it dials
    try:
        outsider.node.run(outsider.node.connect, addr)
        record = outsider.make_record("stolen", "value", get_dht_time() + 60)
        for service, method, args in [("dht", "store", {"records": [record.to_wire()]}),
                                      ("averager.private", "join", {"round": "x"}),
                                      ("experts", "info", {"uid": "ffn.0.0"})]:
            with pytest.raises(P2PError):
                outsider.node.call_sync(server_id, service, method, args, timeout=10)
        expert = RemoteExpert("ffn.0.0", server_id, outsider.node)
        with pytest.raises(P2PError):
            expert(torch.randn(2, 16))
        averager = Averager([torch.ones(8)], outsider, "private",
                            AveragerConfig(target_group_size=2, min_group_size=2, matchmaking_time=2))
        result = averager.step(timeout=15)
        assert not result.ok and result.group_size == 0, result
        averager.shutdown()
        assert f"Refused streams from {outsider.peer_id}" in server.log()
    finally:
        outsider.shutdown()

    # the insider, on the allowlist, uses the same services: the server kept serving
    insider = DHT(initial_peers=[addr], node_config=NodeConfig(psk=psk, identity_path=insider_key, client_mode=True))
    try:
        assert insider.store("shared", {"ok": 1}, get_dht_time() + 60)
        found = insider.get("shared", latest=True)
        assert found is not None and found.value == {"ok": 1}
        assert insider.get("stolen", latest=True) is None
        y = RemoteExpert("ffn.0.0", server_id, insider.node)(torch.randn(2, 16))
        assert y.shape == (2, 16) and torch.isfinite(y).all()
    finally:
        insider.shutdown()


def test_bad_swarm_key_is_a_clear_error():
    with pytest.raises(ValueError, match="64 hex"):
        DHT(start=False, node_config=NodeConfig(psk="not-hex"))
