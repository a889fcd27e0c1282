"""Which network addresses openmlx may connect to on a client's behalf (image URLs, Hub downloads
and their redirects): globally routable unicast only, unless a range is allowed explicitly.

A hostname is judged by every address it resolves to, and an IPv6 address that carries an IPv4
address is judged as that IPv4 address: otherwise ::127.0.0.1 or 64:ff9b::7f00:1 reach loopback.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Optional, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 forms that carry an IPv4 address in their last 32 bits and reach it through a translator or
# the host's own stack: IPv4-compatible (::/96), SIIT (::ffff:0:0:0/96), NAT64 (64:ff9b::/96 and the
# local-use 64:ff9b:1::/48).
_CARRY_IPV4 = tuple(ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48"))


_LOOPBACK_OR_UNSPECIFIED = (ipaddress.ip_address("::"), ipaddress.ip_address("::1"))  # in ::/96, but not IPv4


def embedded_ipv4(ip: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, NAT64, SIIT, 6to4), or None."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip not in _LOOPBACK_OR_UNSPECIFIED and any(ip in net for net in _CARRY_IPV4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_allowed(ip: Address, allowed: Sequence[Network] = ()) -> bool:
    """A globally routable unicast address, or one in `allowed`. IPv6 addresses that carry an IPv4
    address (mapped, compatible, NAT64, SIIT, 6to4) are judged as the IPv4 address they carry."""
    if any(ip in net for net in allowed if net.version == ip.version):
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _LOOPBACK_OR_UNSPECIFIED:
        ip = embedded_ipv4(ip) or ip
        if any(ip in net for net in allowed if net.version == ip.version):
            return True
    return ip.is_global and not ip.is_multicast


def host_addresses(host: str, port: int = 443) -> list[Address]:
    """Every address `host` resolves to (blocking: call it off the event loop)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
