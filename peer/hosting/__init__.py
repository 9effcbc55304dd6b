"""Hosting experts: the backend that serves and trains one expert, batching, the RPC server, and placement
(which grid cells to host). Never imports :mod:`peer.training`."""
