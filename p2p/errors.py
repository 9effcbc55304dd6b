"""Exceptions raised by the p2p layer.

Every failure a caller can see is one of these, so code above (DHT, averaging, experts) can tell
"the remote peer refused" from "the network timed out" from "we sent garbage".
"""
from __future__ import annotations

from contextlib import contextmanager


class P2PError(Exception):
    """Base class for every error raised by ``p2p``."""


class P2PTimeout(P2PError, TimeoutError):
    """A network wait ran past its deadline (connect, call, chunk or credit wait)."""


class PeerUnreachable(P2PError, ConnectionError):
    """We could not open a connection or a stream to the peer (unknown address, refused, dead)."""


class StreamAborted(P2PError, ConnectionError):
    """The other side reset or closed the stream before the exchange was complete."""


class MessageTooLarge(P2PError, ValueError):
    """A frame exceeded the maximum message size configured for the protocol."""


class ProtocolViolation(P2PError, ValueError):
    """The peer sent bytes that do not follow our wire format (bad frame, bad msgpack, bad fields)."""


class RemoteError(P2PError):
    """The remote handler failed; ``remote_type`` names its exception class, ``args[0]`` says why.

    Raised on the caller's side of an RPC: ``RemoteError(peer_id, method, remote_type, message)``.
    """

    def __init__(self, peer_id: str, method: str, remote_type: str, message: str):
        self.peer_id, self.method, self.remote_type, self.remote_message = peer_id, method, remote_type, message
        super().__init__(f"{method} on peer {peer_id[-8:]} failed: {remote_type}: {message}")


class PeerBusy(RemoteError):
    """The remote peer refused the call because this caller has too many calls in flight there."""


@contextmanager
def single_errors():
    """Re-raise a trio nursery's ExceptionGroup of exactly one error as that error.

    Our nurseries run one consumer beside helper tasks that never raise, so a group of one is the
    normal shape of a failure; callers should see ``P2PTimeout``, not ``ExceptionGroup``.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
