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
import time
from collections.abc import Sequence

from p2p import P2PError, parse_maddr, setup_logging

logger = logging.getLogger("peer")

EXIT_USAGE, EXIT_NETWORK = 2, 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m peer`` (also used to check docker-compose commands)."""
    p = argparse.ArgumentParser(
        prog="python -m peer",
        description="Run a swarmtrain peer: join (or start) a swarm of volunteers training together.",
        epilog="Start a swarm with no flags; it prints the command others run to join it.")
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
                     help="do not accept incoming connections (for peers behind NAT): "
                          "this peer only calls others and is never in their routing tables")
    net.add_argument("--swarm", default="default",
                     help="swarm name; peers of different swarms ignore each other (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="how much to log (default: %(default)s)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Validate flag values that argparse cannot; raises ValueError with a user-facing message."""
    for flag in ("initial_peers", "host_maddrs", "announce_maddrs"):
        for addr in getattr(args, flag):
            parse_maddr(addr)
            if flag == "initial_peers" and "/p2p/" not in addr:
                raise ValueError(f"--initial-peers {addr}: the address must end with /p2p/<peer-id>")
    if not args.swarm or "/" in args.swarm:
        raise ValueError(f"--swarm {args.swarm!r}: use a non-empty name without '/'")


def join_command(addrs: Sequence[str], swarm: str) -> str:
    """The exact command another machine runs to join this peer's swarm."""
    cmd = f"python -m peer --initial-peers {addrs[0]}"
    return cmd if swarm == "default" else f"{cmd} --swarm {swarm}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        dht = DHT(initial_peers=args.initial_peers, swarm=args.swarm, host_maddrs=args.host_maddrs,
                  announce_maddrs=args.announce_maddrs, identity_path=args.identity, client_mode=args.client_mode)
        if dht.addrs:
            print("To join this swarm, run:\n  " + join_command(dht.addrs, args.swarm), flush=True)
            print("All addresses of this peer: " + " ".join(dht.addrs), flush=True)
        else:
            print(f"Joined swarm {args.swarm!r} in client mode as {dht.peer_id}", flush=True)
        while True:
            time.sleep(3600)
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
