"""p2p — one swarmtrain peer's networking, in layers: framing and identity <- the libp2p host (host.py) <- RPC
(rpc.py) <- the bulk data plane (bulk.py) <- `Node`, the facade that runs them all in a trio loop thread;
reachability.py, relay.py and relay_client.py make a peer behind a NAT reachable."""
from .errors import (MessageTooLarge, P2PError, P2PTimeout, PeerBusy, PeerUnreachable, ProtocolViolation,
                     RemoteError, StreamAborted)
from .framing import FramedStream, pack, unpack
from .logs import setup_logging
from .identity import load_or_create_identity, new_identity, peer_id_of
from .config import NodeConfig
from .relay import RelayLimits
from .node import Node, parse_maddr
from .rpc import CallContext, RPCServer, ServiceLimits, call, open_call, read_reply

__all__ = [
    "Node", "NodeConfig", "RelayLimits", "parse_maddr", "setup_logging", "FramedStream", "pack", "unpack", "CallContext", "RPCServer", "ServiceLimits", "call",
    "open_call", "read_reply", "load_or_create_identity", "new_identity", "peer_id_of", "P2PError", "P2PTimeout",
    "PeerBusy", "PeerUnreachable", "ProtocolViolation", "RemoteError", "StreamAborted", "MessageTooLarge",
]
