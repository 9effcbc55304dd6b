"""``ExpertServer``: host experts for the swarm — batched forward/backward RPCs, DHT declarations, checkpoints.

A server runs on the node of an existing :class:`dht.DHT` and serves the ``experts`` service
(:mod:`peer.moe.wire`: ``forward``, ``backward``, ``info``, and ``weights``: an expert's current weights, for
``python -m peer export``). How a call is answered:

1. the handler decodes and validates the tensors (shape, dtype, batch size, finiteness) right away, so a
   bad request is answered with a clear :class:`~p2p.RemoteError` (``InvalidInputError`` etc.) and never
   reaches a batch;
2. it hands the request to its expert's :class:`~peer.hosting.batching.ExpertBatcher`, which gathers concurrent
   requests into batches (up to ``max_batch_size`` rows, waiting ``batch_window_ms`` for more) and runs
   them in a worker thread (``trio.to_thread``, at most ``max_concurrent_batches`` at once), so the node
   keeps serving meanwhile; ``backward`` also applies one optimizer step per batch (Learning@home's
   asynchronous expert updates);
3. the handler sends the result back.

Declarations follow :mod:`peer.moe.directory` (root, prefix and UID keys with this server's peer ID as
owner-signed sub-key, renewed every ``heartbeat`` seconds, expiring after ``expiration``; tombstones on
clean shutdown). With ``checkpoint_dir`` every expert's weights, optimizer state and update count are
saved atomically (:mod:`peer.checkpoint`) every ``checkpoint_interval`` seconds when they changed and on
shutdown, and loaded again when a server with the same UIDs starts.

Example::

    from dht import DHT
    from p2p import NodeConfig
    from peer.hosting.config import HostingConfig

    dht = DHT(initial_peers=[...], node_config=NodeConfig(identity_path="server.key"))
    server = ExpertServer(dht, create_experts("ffn", ["ffn.0.0", "ffn.0.1"], hidden_dim=1024),
                          HostingConfig(checkpoint_dir="ckpt/"))
    ...
    server.shutdown()
"""
from __future__ import annotations

import ctypes
import logging
import platform
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import trio

from dht import DHT, get_dht_time
from p2p import ServiceLimits
from peer.hosting.batching import BatcherStopped, ExpertBatcher
from peer.hosting.config import HostingConfig
from peer.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from peer.moe.directory import LOAD_KEY, declaration_records
from peer.hosting.backend import ExpertBackend, InvalidInputError, OptimizerFactory
from peer.moe.experts import create_expert
from peer.moe.gating import parse_uid
from peer.moe.wire import SERVICE, tensor_from_wire, tensor_to_wire

logger = logging.getLogger(__name__)


class UnknownExpertUID(ValueError):
    """A call named an expert this server does not host."""


class ServerStopped(BatcherStopped):
    """The server is shutting down and takes no more calls."""


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam (lr 1e-3), fused where torch has a fused kernel (CPU, CUDA): ~3.5x faster steps on a CPU."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=1e-3, fused=fused)


def create_experts(expert_type: str, uids: Sequence[str], hidden_dim: int, *, device: str | None = None,
                   optimizer_factory: OptimizerFactory = default_optimizer, max_grad_norm: float | None = None,
                   max_batch_size: int = 4096, seed: int | None = None, **expert_kwargs: Any
                   ) -> dict[str, ExpertBackend]:
    """Build one :class:`ExpertBackend` per UID (``"ffn.0.3"``, ...) of registered type ``expert_type``.

    With ``seed``, expert ``i`` (in the order given) is initialised after ``torch.manual_seed(seed + i)``,
    so the same call elsewhere builds identical weights. ``device=None`` picks cuda, mps or cpu.
    """
    out: dict[str, ExpertBackend] = {}
    for i, uid in enumerate(uids):
        parse_uid(uid)
        if uid in out:
            raise ValueError(f"duplicate expert UID {uid!r}")
        if seed is not None:
            torch.manual_seed(seed + i)
        module = create_expert(expert_type, hidden_dim, **expert_kwargs)
        out[uid] = ExpertBackend(uid, module, optimizer_factory, max_grad_norm, max_batch_size, device)
    return out


def keep_freed_memory() -> bool:
    """On glibc, stop returning freed heap memory to the OS after every step; True if applied.

    A backward pass frees and re-allocates every gradient buffer (tens of MB per expert). In a worker
    thread glibc hands those pages back to the kernel each time (non-main arenas trim eagerly), so the next
    step page-faults them in again: ~12,000 faults and ~10% more CPU per backward of a 1024-wide ffn.
    Fixing the mmap/trim thresholds keeps them in the process instead (RSS stays at its peak).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


class ExpertServer:
    """Serve ``experts`` (UID -> backend) over ``dht``'s node and declare them in ``dht``.

    :param config: batching, declarations, checkpoints and RPC limits (:class:`~peer.hosting.config.HostingConfig`).
    :param start: start serving now (else call :meth:`start`).
    """

    def __init__(self, dht: DHT, experts: dict[str, ExpertBackend], config: HostingConfig | None = None, *,
                 start: bool = True):
        if not experts:
            raise ValueError("an ExpertServer needs at least one expert")
        for uid in experts:
            parse_uid(uid)
        self.config = c = config or HostingConfig()
        self.dht, self.node, self.experts = dht, dht.node, dict(experts)
        self.max_batch_size, self.batch_window = c.max_batch_size, c.batch_window_ms / 1000
        self.heartbeat, self.expiration = c.heartbeat, c.expiration
        self.checkpoint_dir = Path(c.checkpoint_dir) if c.checkpoint_dir is not None else None
        self.checkpoint_interval, self.max_concurrent_batches = c.checkpoint_interval, c.max_concurrent_batches
        self.limits = ServiceLimits(max_message_bytes=c.max_message_bytes, handler_timeout=c.handler_timeout,
                                    max_concurrent_per_peer=c.max_concurrent_per_peer,
                                    max_calls_per_second=2000.0)  # a GPU host answers many small calls
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "rejected": 0, "compute_s": 0.0, "compute_cpu_s": 0.0}
        #: per expert: [forward rows, backward rows, requests, failures, seconds in requests] (see :meth:`load`)
        self.served: dict[str, list] = {uid: [0, 0, 0, 0, 0.0] for uid in experts}
        self.started_at = get_dht_time()
        self._batchers: dict[str, ExpertBatcher] = {}
        self._out_shapes: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}
        self._saved_counts: dict[str, int] = {}
        self._save_lock = threading.Lock()
        self._scope: trio.CancelScope | None = None
        self._running = self._stopped = False
        self.keep_memory = c.keep_memory
        if start:
            self.start()

    @property
    def uids(self) -> list[str]:
        return sorted(self.experts)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "ExpertServer":
        """Load checkpoints, start serving and batching, declare the experts (returns once declared)."""
        if self._running:
            return self
        if self.keep_memory:
            keep_freed_memory()
        self.load_checkpoints()
        self.node.run(self._astart)
        self._running = True
        self.node.serve(SERVICE, {"forward": self._forward, "backward": self._backward, "info": self._info,
                                  "weights": self._weights},
                        limits=self.limits)
        accepted = self.node.run(self._declare)
        logger.info("ExpertServer %s serving %d experts (%s); declared %d/%d DHT keys", self.node.peer_id[-8:],
                    len(self.experts), ", ".join(self.uids), sum(accepted), len(accepted))
        return self

    async def _astart(self) -> None:
        ready = trio.Event()
        self.node.spawn(self._main, ready)
        await ready.wait()

    async def _main(self, ready: trio.Event) -> None:
        limiter = trio.CapacityLimiter(self.max_concurrent_batches)
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                for uid, backend in self.experts.items():
                    self._batchers[uid] = ExpertBatcher(backend, min(self.max_batch_size, backend.max_batch_size),
                                                        self.batch_window, limiter, self.stats)
                    nursery.start_soon(self._batchers[uid].run)
                nursery.start_soon(self._heartbeat_loop)
                if self.checkpoint_dir is not None:
                    nursery.start_soon(self._checkpoint_loop)
                ready.set()

    def shutdown(self) -> None:
        """Withdraw the experts (tombstones), stop serving, fail waiting calls, save checkpoints. Idempotent."""
        if not self._running or self._stopped:
            return
        self._stopped = True
        if self.node.is_running:
            try:
                self.node.run(self._astop, timeout=10.0)
            except Exception as e:
                logger.warning("ExpertServer shutdown: %s: %s", type(e).__name__, e)
        self._running = False
        self.save_checkpoints(only_changed=True)
        logger.info("ExpertServer %s stopped", self.node.peer_id[-8:])

    stop = shutdown

    async def _astop(self) -> None:
        try:
            with trio.move_on_after(5.0):
                await self._declare(withdraw=True)
        finally:
            for batcher in self._batchers.values():
                batcher.stop()
            if self._scope is not None:
                self._scope.cancel()

    def __enter__(self) -> "ExpertServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- DHT declarations
    async def _declare(self, withdraw: bool = False) -> list[bool]:
        """Store (or, with ``withdraw``, tombstone) this server's declarations; True per accepted record."""
        expiration_time = get_dht_time() + self.expiration + (1e-3 if withdraw else 0.0)
        records = declaration_records(self.dht, self.experts, expiration_time, withdraw=withdraw)
        if not withdraw:
            records.append(self.dht.make_record(LOAD_KEY, self.load(), expiration_time, subkey=self.dht.peer_id))
        accepted = await self.dht.astore_many(records, republish=False)
        if not any(accepted):
            logger.warning("No DHT node accepted the %s of %d experts", "withdrawal" if withdraw else "declaration",
                           len(self.experts))
        return accepted

    async def _heartbeat_loop(self) -> None:
        # behind a NAT our addresses are those of our relays: when one dies and we move, trainers must learn
        # the new circuit addresses now, not at the next beat
        moved = [trio.Event()]

        def on_move(addrs: list[str]) -> None:
            moved[0].set()

        self.node.on_addrs_changed.append(on_move)
        try:
            while True:
                with trio.move_on_after(self.heartbeat):
                    await moved[0].wait()
                moved[0] = trio.Event()
                try:
                    await self._declare()
                except Exception as e:  # the next beat retries; declarations live `expiration` seconds
                    logger.warning("Declaring experts failed: %s: %s", type(e).__name__, e)
        finally:
            self.node.on_addrs_changed.remove(on_move)

    # ---------------------------------------------------------------- RPC handlers
    def _parse(self, args: Any, *fields: str) -> tuple[str, ExpertBackend, list[torch.Tensor]]:
        if not isinstance(args, dict) or not isinstance(args.get("uid"), str):
            raise InvalidInputError("request must be a map with a string 'uid'")
        backend = self.experts.get(args["uid"])
        if backend is None:
            raise UnknownExpertUID(f"this server hosts no expert {args['uid']!r}; it hosts {self.uids}")
        return args["uid"], backend, [tensor_from_wire(args.get(name), name) for name in fields]

    def _check_rows(self, uid: str, x: torch.Tensor) -> None:
        if x.dim() >= 1 and x.shape[0] > self.max_batch_size:
            raise InvalidInputError(f"expert {uid}: batch of {x.shape[0]} rows exceeds this server's "
                                    f"max_batch_size={self.max_batch_size}")

    async def _forward(self, ctx, args: Any) -> dict:
        try:
            uid, backend, (x,) = self._parse(args, "x")
            self._check_rows(uid, x)
            backend.validate_input(x)
        except ValueError:
            self.stats["rejected"] += 1
            raise
        y = await self._submit(uid, "forward", x)
        self._out_shapes[(uid, tuple(x.shape[1:]))] = tuple(y.shape[1:])
        return {"y": tensor_to_wire(y)}

    async def _backward(self, ctx, args: Any) -> dict:
        try:
            uid, backend, (x, grad) = self._parse(args, "x", "grad")
            self._check_rows(uid, x)
            backend.validate_input(x)
            if grad.dtype != torch.float32 or grad.dim() < 1 or grad.shape[0] != x.shape[0]:
                raise InvalidInputError(f"expert {uid}: grad must be float32 with {x.shape[0]} rows like x, got "
                                        f"{grad.dtype} {list(grad.shape)}")
            expected = self._out_shapes.get((uid, tuple(x.shape[1:])))
            if expected is not None and tuple(grad.shape[1:]) != expected:
                raise InvalidInputError(f"expert {uid}: grad has shape {list(grad.shape)}, the output has "
                                        f"[{x.shape[0]}, {', '.join(map(str, expected))}]")
            if not torch.isfinite(grad).all():
                raise InvalidInputError(f"expert {uid}: grad contains NaN or Inf")
        except ValueError:
            self.stats["rejected"] += 1
            raise
        return {"grad_x": tensor_to_wire(await self._submit(uid, "backward", x, grad))}

    async def _info(self, ctx, args: Any) -> dict:
        if not args or not isinstance(args, dict) or args.get("uid") is None:
            return {"uids": self.uids, "peer_id": self.node.peer_id, "stats": dict(self.stats)}
        uid, backend, _ = self._parse(args)
        return backend.info()

    async def _weights(self, ctx, args: Any) -> dict:
        """One expert's current weights (``{"state": {name: tensor}, "update_count"}``), for ``peer export``."""
        uid, backend, _ = self._parse(args)
        state, update_count = await trio.to_thread.run_sync(backend.weights)  # its lock may wait for a step
        return {"state": {name: tensor_to_wire(t.float()) for name, t in state.items()}, "update_count": update_count}

    async def _submit(self, uid: str, kind: str, x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        if not self._running or self._stopped:
            raise ServerStopped("the expert server is shutting down")
        self.stats["requests"] += 1
        served, started = self.served[uid], trio.current_time()
        served[2] += 1
        try:
            out = await self._batchers[uid].submit(kind, x, grad)
        except BaseException:
            served[3] += 1
            raise
        finally:
            served[4] += trio.current_time() - started
        served[0 if kind == "forward" else 1] += int(x.shape[0]) if x.dim() else 1
        return out

    def load(self) -> dict:
        """What this host served so far, as published under :data:`~peer.moe.directory.LOAD_KEY`: the rows of
        every answered forward and backward request (its claim of work done), and per expert ``[forward rows,
        backward rows, requests, failures, mean ms per request]``."""
        uids = {uid: [f, b, n, e, round(1000 * s / n, 2) if n else None] for uid, (f, b, n, e, s) in self.served.items()}
        return {"t": get_dht_time(), "started": self.started_at, "rows": sum(f + b for f, b, *_ in uids.values()),
                "uids": uids}

    # ---------------------------------------------------------------- checkpoints
    def load_checkpoints(self) -> int:
        """Restore every expert that has a checkpoint in ``checkpoint_dir``; returns how many were loaded."""
        if self.checkpoint_dir is None:
            return 0
        loaded = 0
        for uid, backend in self.experts.items():
            state = load_checkpoint(checkpoint_path(self.checkpoint_dir, uid))
            if state is None:
                continue
            if not isinstance(state, dict) or state.get("uid") != uid or "backend" not in state:
                raise ValueError(f"checkpoint for {uid} in {self.checkpoint_dir} belongs to {state.get('uid')!r}"
                                 if isinstance(state, dict) else f"checkpoint for {uid} is not a dict")
            backend.load_state_dict(state["backend"])
            self._saved_counts[uid] = backend.update_count
            loaded += 1
        if loaded:
            logger.info("Loaded %d expert checkpoints from %s", loaded, self.checkpoint_dir)
        return loaded

    def save_checkpoints(self, only_changed: bool = False) -> int:
        """Atomically save every expert (or only those updated since the last save); returns how many."""
        if self.checkpoint_dir is None:
            return 0
        saved = 0
        with self._save_lock:
            for uid, backend in self.experts.items():
                state = backend.state_dict()
                if only_changed and self._saved_counts.get(uid) == state["update_count"]:
                    continue
                save_checkpoint(checkpoint_path(self.checkpoint_dir, uid), {"uid": uid, "backend": state})
                self._saved_counts[uid] = state["update_count"]
                saved += 1
        logger.debug("Saved %d expert checkpoints to %s", saved, self.checkpoint_dir)
        return saved

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(self.checkpoint_interval)
            try:
                await trio.to_thread.run_sync(self.save_checkpoints, True)
            except Exception as e:
                logger.warning("Saving checkpoints failed: %s: %s", type(e).__name__, e)

