"""Give a bootstrap peer a stable identity and write the ``--config`` file that lets others join it.

Other peers can only join a swarm through a *full* multiaddr, one that ends in the bootstrap
peer's ID (``/dns4/bootstrap/tcp/31337/p2p/12D3KooW...``), and that ID is only known once the
bootstrap's private key exists. This helper, run once before the bootstrap starts (the
``join-config`` service of ``docker/docker-compose.yml``)::

    python docker/join_config.py --identity /identity/bootstrap.key \\
        --address /dns4/bootstrap/tcp/31337 --out /join/peers.yaml

1. loads the key at ``--identity``, creating it (mode 0600) on the first run, so the ID is the same
   after every restart (the bootstrap peer is then started with ``--identity`` on the same file);
2. writes ``--out``, a YAML flag file for ``python -m peer --config FILE``::

       initial_peers:
       - /dns4/bootstrap/tcp/31337/p2p/12D3KooW...

   atomically (a temporary file renamed into place), so a reader never sees half of it;
3. prints the full multiaddr.

Running it again with the same key is a no-op that rewrites the same file.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

from p2p import load_or_create_identity, parse_maddr, peer_id_of


def build_parser() -> argparse.ArgumentParser:
    """Flags of this helper (also used by tests/test_docker.py to check the compose file)."""
    p = argparse.ArgumentParser(prog="python docker/join_config.py", description=__doc__.splitlines()[0])
    p.add_argument("--identity", required=True, metavar="PATH",
                   help="the bootstrap peer's key file (created on first run)")
    p.add_argument("--address", required=True, metavar="MADDR",
                   help="where others reach the bootstrap, without /p2p, e.g. /dns4/bootstrap/tcp/31337")
    p.add_argument("--out", required=True, metavar="FILE", help="the YAML flag file to write")
    return p


def write_join_config(identity: str | os.PathLike, address: str, out: str | os.PathLike) -> str:
    """Create/load the key, write ``out`` and return the bootstrap's full multiaddr.

    :raises ValueError: ``address`` is not a multiaddr, or it already names a peer ID.
    """
    parse_maddr(address)
    if "/p2p/" in address:
        raise ValueError(f"--address {address}: give it without /p2p/<peer-id>; the ID comes from --identity")
    Path(identity).parent.mkdir(parents=True, exist_ok=True)
    full = f"{address.rstrip('/')}/p2p/{peer_id_of(load_or_create_identity(identity))}"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump({"initial_peers": [full]}, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return full


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        full = write_join_config(args.identity, args.address, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"bootstrap peer: {full} (written to {args.out})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
