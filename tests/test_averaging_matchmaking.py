"""Matchmaking edge cases with a real second process."""
import functools

import pytest
import torch

from averaging import Averager, AveragerConfig, MatchmakingFailed
from averaging.group import Member
from dht import DHT
from p2p import NodeConfig

# A "leader" whose join answer redirects the caller to the caller itself: what happens when two peers
# each picked the other as leader (each follows the other for a moment).
LOOPING_LEADER = r"""
import sys
from dht import DHT
from p2p import NodeConfig
dht = DHT(node_config=NodeConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
async def join(ctx, args):
    return {"redirect": ctx.peer_id}
dht.node.serve("averager.loop", {"join": join})
print("ADDR", dht.addrs[0], flush=True)
sys.stdin.readline()
"""


def test_a_redirect_back_to_ourselves_is_a_failed_round_not_an_error(python_process):
    leader = python_process(LOOPING_LEADER)
    addr = leader.expect("ADDR ", timeout=60)
    dht = DHT(initial_peers=[addr], node_config=NodeConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    try:
        averager = Averager([torch.zeros(4)], dht, "loop", AveragerConfig(matchmaking_time=1))
        me = Member(dht.peer_id, averager.bandwidth, False)
        join = functools.partial(averager.matchmaker._join, addr.rsplit("/", 1)[1], me)
        with pytest.raises(MatchmakingFailed, match="redirected to ourselves"):
            dht.node.run(join, timeout=30)
        averager.shutdown()
    finally:
        dht.shutdown()
