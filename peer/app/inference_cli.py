"""``python -m peer generate`` and ``python -m peer export``: talk to the model the swarm trained, or take it home.

    python -m peer generate --initial-peers MADDR --prompt "Once upon" [--max-new-tokens 200 --temperature 0.8]
    python -m peer export --initial-peers MADDR --out model.pt [--quantize int8]
    python -m peer generate --checkpoint model.pt --prompt "Once upon"        # offline, no swarm

``generate`` joins the swarm in client mode (it serves nobody), downloads the current dense state as a trainer
does, runs the mixture-of-experts layers on the experts their hosts serve, and prints tokens as they come.
``export`` writes one file with the config, the dense state and every expert's weights fetched from the hosts.
Errors end the command with a one-line message and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from p2p import NodeConfig, P2PError, setup_logging

from .cli import EXIT_NETWORK, EXIT_USAGE, read_swarm_key

logger = logging.getLogger("peer")

COMMANDS = ("generate", "export")


def _swarm_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR", required=required,
                   help="full multiaddrs of peers in the swarm (the join command a peer printed)")
    p.add_argument("--swarm", default="default", help="swarm name (default: %(default)s)")
    p.add_argument("--swarm-key", default=None, metavar="FILE", help="the swarm's pre-shared key file, if private")
    p.add_argument("--model", default="tiny", choices=["tiny", "small"], help="model preset the swarm trains")
    p.add_argument("--sync", default="diloco", choices=["diloco", "grad"], help="how the swarm trains it")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="longest wait for the state download and each expert (default: %(default)s s)")
    p.add_argument("--state-confirmations", type=int, default=0, metavar="N",
                   help="use the swarm's state only when N peers besides the one serving it announced its hash "
                        "(default: %(default)s, any trainer's; the hash goes into exported files either way)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="how much to log to stderr (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m peer generate|export``."""
    p = argparse.ArgumentParser(prog="python -m peer", description="Run or export the swarm's model.")
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write text with the swarm's model, or an exported file's",
                         description="Continue a prompt with the swarm's current model (--initial-peers) or "
                                     "with an exported file (--checkpoint), printing tokens as they come.")
    _swarm_flags(gen, required=False)
    gen.add_argument("--checkpoint", default=None, metavar="FILE",
                     help="run offline from a file made by `python -m peer export` instead of the swarm")
    gen.add_argument("--device", default=None, help="cpu, cuda or mps for --checkpoint (default: the best one)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="bytes to generate")
    gen.add_argument("--temperature", type=float, default=0.8, metavar="T",
                     help="sampling temperature; 0 picks the most likely byte every time (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely bytes")
    gen.add_argument("--seed", type=int, default=None, metavar="S", help="make the sampling reproducible")
    exp = sub.add_parser("export", help="write the swarm's whole model to one file",
                         description="Download the dense state and fetch every expert from its hosts into one "
                                     "file that `python -m peer generate --checkpoint` runs offline.")
    _swarm_flags(exp, required=True)
    exp.add_argument("--out", required=True, metavar="FILE", help="where to write the model")
    exp.add_argument("--quantize", default=None, choices=["int8"],
                     help="store weight matrices as int8 with a scale per row (about 4x smaller)")
    return p


def _check(args: argparse.Namespace) -> None:
    if args.command == "generate":
        if bool(args.checkpoint) == bool(args.initial_peers):
            raise ValueError("give either --initial-peers (the live swarm) or --checkpoint FILE (offline)")
        if args.max_new_tokens < 0 or (args.top_k is not None and args.top_k < 1) or not args.temperature >= 0:
            raise ValueError("need --max-new-tokens >= 0, --top-k >= 1 and --temperature >= 0")
    if args.state_confirmations < 0:
        raise ValueError("--state-confirmations must be >= 0")
    for addr in args.initial_peers:
        if "/p2p/" not in addr:
            raise ValueError(f"--initial-peers {addr}: the address must end with /p2p/<peer-id>")


def _join(args: argparse.Namespace):
    from dht import DHT
    psk = read_swarm_key(args.swarm_key) if args.swarm_key else None
    return DHT(initial_peers=args.initial_peers,
               node_config=NodeConfig(swarm=args.swarm, client_mode=True, psk=psk))


def run(args: argparse.Namespace) -> int:
    from peer.inference.language_model import LanguageModel
    from peer.inference.model_file import save_model
    from peer.inference.swarm import export_model

    dht = None
    try:
        if args.command == "generate" and args.checkpoint:
            lm = LanguageModel.from_file(args.checkpoint, args.device)
        else:
            dht = _join(args)
            if args.command == "export":
                model, meta = export_model(dht, swarm=args.swarm, model_name=args.model, sync=args.sync,
                                           timeout=args.timeout, confirmations=args.state_confirmations)
                path = save_model(args.out, model, quantize=args.quantize, meta=meta)
                print(f"Wrote {path} ({path.stat().st_size / 1e6:.2f} MB): the {args.model} model after "
                      f"{meta.get('step', '?')} averaging rounds, {len(meta['experts'])} experts"
                      f"{', int8 weights' if args.quantize else ''}; state hash {meta['state_hash'][:16]}", flush=True)
                return 0
            lm = LanguageModel.from_swarm(dht, swarm=args.swarm, model=args.model, sync=args.sync,
                                          timeout=args.timeout, confirmations=args.state_confirmations)
        sys.stdout.write(args.prompt)
        for piece in lm.stream(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    finally:
        if dht is not None:
            dht.shutdown()


def main(argv: Sequence[str]) -> int:
    """Run ``generate`` or ``export`` with ``argv`` (starting with the command's name)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from peer.inference.model_file import ModelFileError
    from peer.inference.swarm import SwarmUnavailable
    try:
        _check(args)
        return run(args)
    except KeyboardInterrupt:
        return 0
    except (SwarmUnavailable, P2PError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NETWORK
    except (ModelFileError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
