"""A tiny DNS server for a namespace topology: service names as host names, as Docker's DNS gives them.

    python testbed/dns_server.py LISTEN_IP '{"bootstrap": "198.18.0.2", ...}'

Run in its own namespace by ``docker/netns_swarm.py``; each namespace's ``resolv.conf`` points at it, so
``/dns4/bootstrap/tcp/31337`` is resolved by libp2p exactly as inside docker-compose.
"""
from __future__ import annotations

import json
import sys


def serve_dns(listen: str, records: dict[str, str]) -> None:
    """Answer DNS ``A`` queries for ``records`` (name -> IPv4) on UDP ``listen``:53, forever."""
    import socket

    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((listen, 53))
    while True:
        data, client = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
        except Exception:
            continue
        reply = dns.message.make_response(query)
        for q in query.question:
            name = q.name.to_text(omit_final_dot=True).lower()
            if name not in records:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif q.rdtype == dns.rdatatype.A:
                reply.answer.append(dns.rrset.from_text(q.name, 5, "IN", "A", records[name]))
        sock.sendto(reply.to_wire(), client)


if __name__ == "__main__":
    serve_dns(sys.argv[1], json.loads(sys.argv[2]))
