"""Unit tests for p2p.identity: key files are private, reused across restarts, and corruption is reported."""
import base64
import os
import stat

import pytest

from p2p import Node, NodeConfig, load_or_create_identity, peer_id_of


def test_identity_file_is_created_with_mode_0600(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    key_pair = load_or_create_identity(path)
    assert path.exists()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert peer_id_of(key_pair).startswith("12D3KooW")
    assert not (tmp_path / "keys" / "peer.key.tmp").exists()


def test_identity_is_reused(tmp_path):
    path = tmp_path / "peer.key"
    first = peer_id_of(load_or_create_identity(path))
    content = path.read_bytes()
    assert peer_id_of(load_or_create_identity(path)) == first
    assert path.read_bytes() == content
    assert peer_id_of(load_or_create_identity(tmp_path / "other.key")) != first


def test_node_keeps_its_peer_id_across_restarts(tmp_path):
    path = str(tmp_path / "node.key")
    assert Node(NodeConfig(identity_path=path), start=False).peer_id == Node(NodeConfig(identity_path=path), start=False).peer_id


def test_no_path_gives_a_fresh_identity():
    assert peer_id_of(load_or_create_identity(None)) != peer_id_of(load_or_create_identity(None))


@pytest.mark.parametrize("content", [
    "",
    "not a key file\n",
    "swarmtrain-ed25519-v1\n",
    "swarmtrain-ed25519-v1\n!!!not-base64!!!\n",
    "swarmtrain-ed25519-v1\n" + base64.b64encode(b"short").decode() + "\n",
    "swarmtrain-ed25519-v2\n" + base64.b64encode(b"k" * 32).decode() + "\n",
    "swarmtrain-ed25519-v1\n" + base64.b64encode(b"k" * 32).decode() + "\nextra\n",
])
def test_corrupt_identity_file_raises_clear_value_error(tmp_path, content):
    path = tmp_path / "peer.key"
    path.write_text(content)
    with pytest.raises(ValueError, match=str(path)):
        load_or_create_identity(path)
    assert path.read_text() == content  # never silently replaced by a new identity


def test_group_readable_identity_still_loads(tmp_path, caplog):
    path = tmp_path / "peer.key"
    first = peer_id_of(load_or_create_identity(path))
    os.chmod(path, 0o644)
    assert peer_id_of(load_or_create_identity(path)) == first
    assert "readable by other users" in caplog.text
