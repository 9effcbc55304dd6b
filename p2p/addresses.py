"""Multiaddr helpers of the p2p layer."""
from __future__ import annotations

import multiaddr


def parse_maddr(addr: str) -> multiaddr.Multiaddr:
    """Parse a multiaddr string with an error message a user can act on."""
    try:
        return multiaddr.Multiaddr(addr)
    except Exception as e:
        raise ValueError(f"invalid multiaddr {addr!r}: {e}") from None


def host_of(maddr: multiaddr.Multiaddr) -> str:
    """The IP of an ``/ip4/...`` or ``/ip6/...`` multiaddr (the wildcard if it has none)."""
    for proto in ("ip4", "ip6"):
        try:
            return maddr.value_for_protocol(proto)
        except Exception:
            continue
    return "0.0.0.0"


def local_ipv4s() -> list[str]:
    """This machine's IPv4 addresses, loopback last (what a wildcard listen address really means)."""
    import ifaddr  # installed with libp2p

    ips = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)]
    return sorted(set(ips), key=lambda ip: (ip.startswith("127."), ip))
