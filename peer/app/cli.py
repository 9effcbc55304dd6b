"""``python -m peer``: run a swarmtrain peer.

With no flags it starts a new swarm and prints the exact command others run to join it. With
``--initial-peers`` it joins an existing swarm. Errors in flags or unreachable initial peers end the
process with a one-line message and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from p2p import NodeConfig, P2PError, parse_maddr, setup_logging

logger = logging.getLogger("peer")

EXIT_USAGE, EXIT_NETWORK = 2, 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m peer`` (also used to check docker-compose commands)."""
    p = argparse.ArgumentParser(
        prog="python -m peer",
        description="Run a swarmtrain peer: join (or start) a swarm of volunteers training together.",
        epilog="Start a swarm with no flags; it prints the command others run to join it. "
               "`python -m peer generate --help` writes text with the swarm's model; "
               "`python -m peer export --help` saves it to one file.")
    net = p.add_argument_group("network")
    net.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                     help="full multiaddrs of peers already in the swarm, e.g. "
                          "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... (omit to start a new swarm)")
    net.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], metavar="MADDR",
                     help="addresses to listen on (default: all interfaces, a free TCP port); "
                          "use a fixed port such as /ip4/0.0.0.0/tcp/31337 for a bootstrap peer")
    net.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MADDR",
                     help="addresses to tell other peers instead of the listen addresses "
                          "(your public IP behind port forwarding, a docker service name, ...)")
    net.add_argument("--identity", default=None, metavar="PATH",
                     help="file with this peer's private key; created on first run so the peer ID "
                          "stays the same across restarts (default: a new identity every run)")
    net.add_argument("--client-mode", action="store_true",
                     help="do not listen at all: this peer only calls others, hosts nothing they can call and "
                          "is never in their routing tables. Not needed behind a NAT: a peer finds out by itself "
                          "whether others can dial it, and if not, is reachable through relays")
    net.add_argument("--no-relay", dest="relay_service", action="store_false",
                     help="when publicly reachable, do not relay for peers behind NATs (by default a public "
                          "peer relays, within limits: 128 reservations, 64 circuits, 100 Mbit/s in all)")
    net.add_argument("--bulk-port", type=int, default=0, metavar="PORT",
                     help="TCP port for big transfers (averaging, state downloads), which go beside libp2p on "
                          "their own encrypted sockets at ~10x less CPU per byte; 0 (default) picks a free port "
                          "on the listen addresses. Behind a NAT, fix it and forward it too; if others cannot "
                          "reach it they fall back to slower libp2p streams")
    net.add_argument("--swarm", default="default",
                     help="swarm name; peers of different swarms ignore each other (default: %(default)s)")
    private = p.add_argument_group("private swarms")
    private.add_argument("--swarm-key", default=None, metavar="FILE",
                         help="file holding the swarm's pre-shared key (64 hex characters; make one with "
                              "python -c \"import secrets; print(secrets.token_hex(32))\" > swarm.key). "
                              "Every connection is encrypted with it: peers without the key cannot connect")
    private.add_argument("--allow-peers", nargs="+", default=None, metavar="PEER_ID_OR_FILE",
                         help="peer IDs (or files listing one per line) allowed to talk to this peer; "
                              "streams from any other peer are refused")
    experts = p.add_argument_group("hosting experts")
    experts.add_argument("--experts", type=int, default=0, metavar="N",
                         help="host N experts of the model's grids (the least-hosted ones) on this machine")
    experts.add_argument("--expert-type", default="ffn", help="expert architecture: ffn (default) or transformer")
    experts.add_argument("--device", default=None,
                         help="where experts run: cuda, mps or cpu (default: the best available)")
    experts.add_argument("--expert-checkpoint-dir", default=None, metavar="DIR",
                         help="save hosted experts' weights and optimizer state here, and reload them on restart")
    train = p.add_argument_group("training")
    train.add_argument("--train", action="store_true", help="train the model with the swarm on local data")
    train.add_argument("--model", default="tiny", choices=["tiny", "small"], help="model size preset (default: tiny)")
    train.add_argument("--data", default=None, metavar="PATH",
                       help="a text file or a folder of .txt files (default: the embedded corpus)")
    train.add_argument("--sync", default="diloco", choices=["diloco", "grad"],
                       help="diloco: average pseudo-gradients every --local-steps steps (default); "
                            "grad: average gradients every step")
    train.add_argument("--local-steps", type=int, default=20, help="DiLoCo inner steps per averaging round")
    train.add_argument("--compression", default="none", choices=["none", "fp16", "int8", "int4"],
                       help="how averaging rounds encode the dense tensors they send: none (exact float32), "
                            "fp16 (half the bytes), int8 (a quarter, blockwise 8-bit) or int4 (an eighth, "
                            "blockwise 4-bit); with --sync diloco, what compression loses in one round is "
                            "sent in the next (error feedback) (default: none)")
    train.add_argument("--bandwidth", type=float, default=None, metavar="MB_S",
                       help="this machine's upload bandwidth in MB/s (100 Mbit = 12.5): the part of each averaging "
                            "round this peer reduces is sized by it, and its transfers are paced to it, which keeps "
                            "a capped link busy (default: measured from this peer's averaging rounds, for part sizes only; "
                            "no pacing)")
    train.add_argument("--batch-size", type=int, default=8, help="sequences per local step")
    train.add_argument("--max-samples", type=int, default=None, help="stop after this many local samples")
    train.add_argument("--shard", default="0/1", metavar="I/N",
                       help="train on shard I of N of the data (give each trainer its own)")
    train.add_argument("--state-confirmations", type=int, default=2, metavar="N",
                       help="accept the swarm's state (downloaded at start and whenever peers are ahead) only when N "
                            "peers besides the one serving it announced its hash for that step; a peer serving "
                            "another state is banned. Lower it in a swarm of fewer than N+2 trainers, where a "
                            "restarted trainer could otherwise never catch up (default: %(default)s)")
    train.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                       help="save the trainer's state here periodically and on exit; resume from it")
    privacy = p.add_argument_group(
        "privacy and robustness", "User-level differential privacy of what this trainer sends to averaging (each "
        "contribution clipped, then Gaussian noise; epsilon from Google's dp-accounting), and robust rounds. "
        "DP does not cover expert calls: the hosts of the experts you use see your hidden states.")
    privacy.add_argument("--dp-clip", type=float, default=None, metavar="C",
                         help="clip each contribution (pseudo-gradient, or gradient with --sync grad) to L2 norm C "
                              "before it leaves this peer; pick C near the norm yours have (the DEBUG log prints it)")
    privacy.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA",
                         help="add Gaussian noise of standard deviation SIGMA*C to every element of a contribution")
    privacy.add_argument("--dp-epsilon", type=float, default=None, metavar="E",
                         help="privacy budget: stop contributing once epsilon would pass E; without --dp-noise, "
                              "the noise is solved so that the planned rounds (--dp-rounds, or from --max-samples) "
                              "stay within E")
    privacy.add_argument("--dp-delta", type=float, default=1e-5, metavar="D",
                         help="the delta of (epsilon, delta)-DP; keep it below 1 / the number of users "
                              "(default: %(default)s)")
    privacy.add_argument("--dp-rounds", type=int, default=None, metavar="N",
                         help="averaging rounds this trainer plans, to solve --dp-epsilon for the noise "
                              "(default: from --max-samples)")
    privacy.add_argument("--dp-when-spent", default="stop", choices=["stop", "local"],
                         help="once the budget is spent: stop training (default), or train on locally without "
                              "averaging again")
    privacy.add_argument("--clip-tau", default=None, metavar="TAU|auto",
                         help="Byzantine-robust averaging: the parts this peer reduces are aggregated with "
                              "CenteredClip of radius TAU (L2) instead of the mean, so a peer sending garbage moves "
                              "them by at most TAU times its weight share; 'auto' measures TAU in every round, per "
                              "part: twice the median distance of the contributions to their median (the honest "
                              "spread while honest peers hold most of the weight). Off by default (exact mean)")
    privacy.add_argument("--secure-aggregation", type=float, default=None, metavar="BOUND",
                         help="secure aggregation: the peers that reduce parts of a round see only masked "
                              "contributions and learn only their sum. Each element of a contribution is clipped "
                              "to +-BOUND (pick it above your pseudo-gradients' largest element, e.g. 1). Costs "
                              "4 bytes an element (no --compression) and rules out --clip-tau; peers with and "
                              "without it do not average together")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON file of flag values (keys as flag names without dashes, e.g. "
                        "initial_peers); flags given on the command line win")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--dashboard-port", default=None, metavar="[HOST:]PORT",
                   help="serve a live web page of the swarm (peers, experts, training, averaging rounds, "
                        "contributions) and its JSON API under /api/ on this port, e.g. 8080 (on 127.0.0.1; "
                        "0.0.0.0:8080 for every interface); works in client mode too")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="how much to log (default: %(default)s)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, with defaults taken from ``--config FILE`` when given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        import yaml

        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            parser.error(f"--config {args.config}: expected a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {args.config}: unknown keys {unknown}")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Validate flag values that argparse cannot; raises ValueError with a user-facing message."""
    for flag in ("initial_peers", "host_maddrs", "announce_maddrs"):
        for addr in getattr(args, flag):
            parse_maddr(addr)
            if flag == "initial_peers" and "/p2p/" not in addr:
                raise ValueError(f"--initial-peers {addr}: the address must end with /p2p/<peer-id>")
    if not args.swarm or "/" in args.swarm:
        raise ValueError(f"--swarm {args.swarm!r}: use a non-empty name without '/'")
    if args.experts < 0:
        raise ValueError("--experts must be >= 0")
    if args.state_confirmations < 0:
        raise ValueError("--state-confirmations must be >= 0")
    if args.bandwidth is not None and not 0 < args.bandwidth < float("inf"):
        raise ValueError(f"--bandwidth {args.bandwidth}: use a positive number of MB/s")
    try:
        shard, num_shards = (int(x) for x in args.shard.split("/"))
        assert 0 <= shard < num_shards
    except (ValueError, AssertionError):
        raise ValueError(f"--shard {args.shard!r}: use I/N with 0 <= I < N") from None
    args.shard, args.num_shards = shard, num_shards
    if args.dashboard_port is not None:
        from .dashboard import parse_listen
        args.dashboard_listen = parse_listen(str(args.dashboard_port))
    check_privacy_args(args)
    args.psk = read_swarm_key(args.swarm_key) if args.swarm_key else None
    if args.allow_peers is not None:
        args.allow_peers = read_peer_ids(args.allow_peers)


def check_privacy_args(args: argparse.Namespace) -> None:
    """``args.dp``: the :class:`~peer.training.privacy.DPConfig` the ``--dp-*`` flags ask for (None: off), and
    ``args.clip_tau`` checked; ValueError with a user-facing message when they do not fit."""
    args.dp = None
    if args.dp_rounds is not None and args.dp_rounds < 1:
        raise ValueError(f"--dp-rounds {args.dp_rounds}: use a positive number of rounds")
    if any(v is not None for v in (args.dp_clip, args.dp_noise, args.dp_epsilon)):
        if not args.train:
            raise ValueError("--dp-* flags apply to a trainer's contributions: add --train")
        from peer.training.privacy import DPConfig
        from peer.training.train_config import TrainConfig
        planned = args.dp_rounds or TrainConfig(sync=args.sync, local_steps=args.local_steps,
                                                batch_size=args.batch_size, max_samples=args.max_samples,
                                                ).planned_rounds()
        args.dp = DPConfig.from_flags(args.dp_clip, args.dp_noise, args.dp_epsilon, args.dp_delta, planned,
                                      args.dp_when_spent)
    if args.clip_tau not in (None, "auto"):
        try:
            tau = float(args.clip_tau)
        except ValueError:
            tau = float("nan")
        if not (tau > 0 and tau != float("inf")):
            raise ValueError(f"--clip-tau {args.clip_tau!r}: use a positive radius, or auto")
        args.clip_tau = tau
    bound = args.secure_aggregation
    if bound is not None:
        if not (bound > 0 and bound != float("inf")):
            raise ValueError(f"--secure-aggregation {bound}: use a positive bound")
        if args.clip_tau is not None or args.compression != "none":
            raise ValueError("--secure-aggregation hides single contributions, which --clip-tau and --compression "
                             "need to see: drop them")


def read_swarm_key(path: str) -> str:
    """The pre-shared key in ``path`` (64 hex characters); ValueError with a user-facing message otherwise."""
    try:
        with open(path) as f:
            psk = f.read().strip()
    except OSError as e:
        raise ValueError(f"--swarm-key {path}: {e.strerror}") from None
    if len(psk) != 64 or any(c not in "0123456789abcdefABCDEF" for c in psk):
        raise ValueError(f"--swarm-key {path}: the file must hold 64 hex characters")
    return psk


def read_peer_ids(items: Sequence[str]) -> list[str]:
    """Peer IDs given directly or as files with one per line (``#`` comments allowed)."""
    from libp2p.peer.id import ID

    ids = []
    for item in items:
        try:
            with open(item) as f:
                lines = [line.split("#", 1)[0].strip() for line in f]
        except OSError:
            lines = [item]
        for line in filter(None, lines):
            try:  # ed25519 IDs start with 12D3KooW, RSA/older ones with Qm
                ok = line.startswith(("12D3KooW", "Qm")) and ID.from_base58(line).to_base58() == line
            except Exception:
                ok = False
            if not ok:
                raise ValueError(f"--allow-peers: {line!r} is not a peer ID (nor a readable file)")
            ids.append(line)
    return ids


def join_command(addrs: Sequence[str], swarm: str) -> str:
    """The exact command another machine runs to join this peer's swarm."""
    cmd = f"python -m peer --initial-peers {addrs[0]}"
    return cmd if swarm == "default" else f"{cmd} --swarm {swarm}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    from dht import DHT  # imported late so --help is fast
    dht = None
    try:
        dht = DHT(initial_peers=args.initial_peers, node_config=NodeConfig(
            swarm=args.swarm, host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
            identity_path=args.identity, client_mode=args.client_mode, psk=args.psk, allowed_peers=args.allow_peers,
            bulk_port=args.bulk_port, relay_service=args.relay_service))
        if dht.node.reachability == "private":   # behind a NAT: others join through a public peer, not us
            print(f"Joined swarm {args.swarm!r} from behind a NAT as {dht.peer_id}, reachable through "
                  f"{len(dht.addrs)} relays: " + (" ".join(dht.addrs) or "none yet"), flush=True)
            if args.initial_peers:
                print("To join this swarm, run:\n  " + join_command(args.initial_peers, args.swarm), flush=True)
        elif dht.addrs:
            print("To join this swarm, run:\n  " + join_command(dht.addrs, args.swarm), flush=True)
            print("All addresses of this peer: " + " ".join(dht.addrs), flush=True)
        else:
            print(f"Joined swarm {args.swarm!r} in client mode as {dht.peer_id}", flush=True)
        from .roles import run_roles
        return run_roles(dht, args)
    except KeyboardInterrupt:
        logger.info("Shutting down")
        return 0
    except (P2PError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NETWORK
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if dht is not None:
            dht.shutdown()
