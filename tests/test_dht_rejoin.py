"""A node that forgot every peer (all its requests failed while it slept or was cut off) joins again by itself."""
from __future__ import annotations

import time

from dht import DHT, get_dht_time
from p2p import P2PError

WRITER = """
import time
from dht import DHT, get_dht_time
dht = DHT(initial_peers=[{boot!r}])
assert dht.store("written-before-you-came", "hello", get_dht_time() + 120)
print("STORED", flush=True)
time.sleep(600)
"""


def test_a_node_that_forgot_everybody_joins_again_before_its_next_lookup(python_process):
    boot = DHT()
    try:
        writer = python_process(WRITER.format(boot=boot.addrs[0]))
        writer.expect("STORED", timeout=60)
        sleeper = DHT(initial_peers=boot.addrs[:1])
        try:
            # what waking from a long sleep looks like: every peer failed a request, so every peer was forgotten
            async def forget_everybody():
                while len(sleeper.routing):
                    for peer in sleeper.routing.all_peers():
                        sleeper.protocol.forget(peer, P2PError("timed out while we slept"))
            sleeper.node.run(forget_everybody)
            assert len(sleeper.routing) == 0
            started = time.monotonic()
            found = sleeper.get("written-before-you-came")
            assert found is not None and found.value == "hello"       # the writer is known again, through boot
            assert len(sleeper.routing) >= 2 and time.monotonic() - started < sleeper.config.rpc_timeout
            # and it is findable again: a store of its own reaches the others
            assert sleeper.store("from-the-sleeper", 1, get_dht_time() + 60)
            assert boot.get("from-the-sleeper") is not None
        finally:
            sleeper.shutdown()
    finally:
        boot.shutdown()
