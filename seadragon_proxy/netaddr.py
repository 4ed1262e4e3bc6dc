"""Client addresses: parsing, normalising, matching against networks, and X-Forwarded-For.

Every address is normalised the same way wherever it comes from (socket peer,
X-Forwarded-For, whitelist entry, config rule): zone ids are dropped and
IPv4-mapped IPv6 addresses are unwrapped, so ``::ffff:10.0.0.7`` is ``10.0.0.7``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

LOOPBACK = ("127.0.0.1", "::1")


def _quote(text: str) -> str:
    """``text`` as a message quotes it: at most 60 characters."""
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "..."


def parse_address(text: str) -> IPAddress:
    """Parse one address; raise ``ValueError`` with a readable message if it is not one."""
    raw = text.strip()
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    raw = raw.split("%", 1)[0]  # zone id: fe80::1%eth0
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        raise ValueError(f"{_quote(text)} is not an IP address") from None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(text: str) -> IPNetwork:
    """Parse an address or a CIDR network; a bare address is a /32 or /128 network.

    Host bits set (``10.0.0.7/8``) are refused rather than silently widened.
    """
    raw = text.strip()
    if "/" not in raw:
        address = parse_address(raw)
        return ipaddress.ip_network(address)
    addr_text, _, prefix_text = raw.partition("/")
    address = parse_address(addr_text)
    if not prefix_text.isdigit():
        raise ValueError(f"{_quote(text)} is not an IP network: the prefix length must be a number")
    prefix = int(prefix_text)
    mapped = ":" in addr_text and isinstance(address, IPv4Address)
    if mapped:  # ::ffff:10.0.0.0/104 is 10.0.0.0/8
        if prefix < 96:
            raise ValueError(
                f"{_quote(text)} is not an IPv4-mapped network: the prefix must be ≥ 96"
            )
        prefix -= 96
    limit = 32 if isinstance(address, IPv4Address) else 128
    if prefix > limit:
        raise ValueError(
            f"{_quote(text)} is not an IP network: the prefix length is more than {limit}"
        )
    try:
        return ipaddress.ip_network(f"{address}/{prefix}", strict=True)
    except ValueError:
        wide = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        raise ValueError(f"{_quote(text)} has host bits set; did you mean {wide}?") from None


def format_network(network: IPNetwork) -> str:
    """A single-address network prints as the address: ``10.0.0.7``, not ``10.0.0.7/32``."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


class NetworkSet:
    """An immutable set of networks with an O(distinct prefix lengths) membership test."""

    __slots__ = ("_by_prefix", "_networks")

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self._networks = tuple(sorted(set(networks), key=lambda n: (n.version, n)))
        by_prefix: dict[tuple[int, int], set[int]] = {}
        for net in self._networks:
            shift = net.max_prefixlen - net.prefixlen
            by_prefix.setdefault((net.version, shift), set()).add(int(net.network_address) >> shift)
        self._by_prefix = tuple((v, s, frozenset(keys)) for (v, s), keys in by_prefix.items())

    @classmethod
    def parse(cls, entries: Iterable[str]) -> NetworkSet:
        return cls(parse_network(e) for e in entries)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, (IPv4Address, IPv6Address)):
            return False
        value = int(address)
        version = address.version
        return any(v == version and value >> s in keys for v, s, keys in self._by_prefix)

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self._networks)

    def __len__(self) -> int:
        return len(self._networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NetworkSet) and self._networks == other._networks

    def __hash__(self) -> int:
        return hash(self._networks)

    def __repr__(self) -> str:
        return f"NetworkSet([{', '.join(str(n) for n in self._networks)}])"


def parse_forwarded_hop(text: str) -> IPAddress:
    """One ``X-Forwarded-For`` entry: an address, ``IPv4:port``, ``[IPv6]`` or ``[IPv6]:port``.

    Anything else (``unknown``, an empty entry, an obfuscated RFC 7239 name, garbage)
    raises ``ValueError``.
    """
    raw = text.strip()
    if raw.startswith("["):
        inside, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            raise ValueError(f"{_quote(text)} is not an address")
        raw = inside
    elif raw.count(":") == 1:  # IPv4:port (a bare IPv6 address has at least two colons)
        raw, _, port = raw.partition(":")
        if not port.isdigit():
            raise ValueError(f"{_quote(text)} is not an address")
    if not raw or "%" in raw:
        raise ValueError(f"{_quote(text)} is not an address")
    return parse_address(raw)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: NetworkSet
) -> IPAddress | None:
    """The address a request is judged by, or ``None`` when it cannot be known.

    The TCP peer, unless the peer is a trusted proxy: then ``X-Forwarded-For`` is
    walked from the right, skipping trusted hops, and the first untrusted address
    is the client. An entry that cannot be read (``unknown``, empty, garbage) makes
    the client unknown: never the trusted hop that passed it on. A trusted peer
    that sends no ``X-Forwarded-For`` at all is itself the client.
    """
    if peer is None:
        return None
    try:
        current = parse_address(peer)
    except ValueError:
        return None
    if current not in trusted:
        return current
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        try:
            current = parse_forwarded_hop(hop)
        except ValueError:
            return None
        if current not in trusted:
            return current
    return current
