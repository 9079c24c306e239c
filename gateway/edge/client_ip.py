"""Client IP trust: who the client is when a trusted proxy stands in front.

The peer address is the client unless the peer is one of `trusted_proxies`; then
X-Forwarded-For is walked from the right past every trusted hop, and the first hop
that is not trusted is the client (nginx's `real_ip_recursive on`). Rate limits keyed
by `client_ip` and the access log's view of the client both rest on this.
"""

from __future__ import annotations

import ipaddress

from gateway.types import IPNetwork

__all__ = ["client_is_trusted", "real_client_ip"]


def client_is_trusted(client: str, trusted: tuple[IPNetwork, ...]) -> bool:
    """Whether the address `client` is inside one of the `trusted` networks."""
    if not trusted or not client:
        return False
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in net for net in trusted)


def real_client_ip(peer: str, forwarded_for: bytes | None, trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address: `peer`, unless the peer is a trusted proxy, in which case
    X-Forwarded-For (`forwarded_for`, every such header joined) is walked from the
    right past every trusted hop."""
    if not forwarded_for or not client_is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",")]
    for hop in reversed(hops):
        if hop and not client_is_trusted(hop, trusted):
            return hop
    return hops[0] or peer
