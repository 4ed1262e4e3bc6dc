"""Address parsing, normalisation, network sets and X-Forwarded-For resolution."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from seadragon_proxy.netaddr import (
    NetworkSet,
    client_address,
    format_network,
    parse_address,
    parse_network,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.7", "10.0.0.7"),
        (" 10.0.0.7 ", "10.0.0.7"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("::ffff:10.0.0.7", "10.0.0.7"),  # IPv4-mapped is unwrapped
        ("fe80::1%eth0", "fe80::1"),  # zone id dropped
        ("2001:DB8::1", "2001:db8::1"),
    ],
)
def test_parse_address_normalises(text: str, expected: str) -> None:
    assert parse_address(text) == ip_address(expected)


@pytest.mark.parametrize("text", ["", "10.0.0", "10.0.0.256", "example.com", "1.2.3.4/8", "::g"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        parse_address(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.0.0.7", "10.0.0.7/32"),
        ("::1", "::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:10.0.0.7", "10.0.0.7/32"),
    ],
)
def test_parse_network(text: str, expected: str) -> None:
    assert parse_network(text) == ip_network(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.7/8", "did you mean 10.0.0.0/8"),
        ("10.0.0.0/33", "more than 32"),
        ("10.0.0.0/x", "prefix length must be a number"),
        ("::ffff:10.0.0.0/64", "prefix must be ≥ 96"),
        ("nonsense/8", "not an IP address"),
        ("10.0.0.0/-1", "prefix length must be a number"),
    ],
)
def test_parse_network_refuses_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_network(text)


def test_format_network_prints_single_addresses_bare() -> None:
    assert format_network(parse_network("10.0.0.7")) == "10.0.0.7"
    assert format_network(parse_network("10.0.0.0/8")) == "10.0.0.0/8"
    assert format_network(parse_network("::1")) == "::1"


@pytest.mark.parametrize(
    ("address", "inside"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("192.168.1.77", True),
        ("192.168.2.77", False),
        ("::1", True),
        ("2001:db8:5::1", True),
        ("2001:db9::1", False),
        ("127.0.0.1", False),
    ],
)
def test_network_set_membership(address: str, inside: bool) -> None:
    nets = NetworkSet.parse(["10.0.0.0/8", "192.168.1.0/24", "::1", "2001:db8::/32"])
    assert (parse_address(address) in nets) is inside


def test_network_set_equality_ignores_order_and_duplicates() -> None:
    assert NetworkSet.parse(["10.0.0.0/8", "::1"]) == NetworkSet.parse(["::1", "10.0.0.0/8", "::1"])
    assert "10.0.0.1" not in NetworkSet.parse(["10.0.0.0/8"])  # strings are not addresses


TRUSTED = NetworkSet.parse(["127.0.0.1", "10.9.0.0/16"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.5", [], "203.0.113.5"),
        ("203.0.113.5", ["1.2.3.4"], "203.0.113.5"),  # untrusted peer: header ignored
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["1.2.3.4"], "1.2.3.4"),
        ("127.0.0.1", ["6.6.6.6, 1.2.3.4"], "1.2.3.4"),  # client-written left part ignored
        ("127.0.0.1", ["6.6.6.6, 1.2.3.4, 10.9.1.1"], "1.2.3.4"),  # trusted hops skipped
        ("127.0.0.1", ["6.6.6.6", "1.2.3.4"], "1.2.3.4"),  # several headers join in order
        ("127.0.0.1", ["10.9.1.1"], "10.9.1.1"),  # all trusted: the left-most
        ("127.0.0.1", ["::ffff:1.2.3.4"], "1.2.3.4"),
        ("::ffff:127.0.0.1", ["1.2.3.4"], "1.2.3.4"),  # mapped peer is trusted too
        ("127.0.0.1", [" 1.2.3.4 "], "1.2.3.4"),
    ],
)
def test_client_address(peer: str, forwarded: list[str], expected: str) -> None:
    assert client_address(peer, forwarded, TRUSTED) == ip_address(expected)


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        (["203.0.113.9:4711"], "203.0.113.9"),
        (["[2001:db8::9]:443"], "2001:db8::9"),
        (["[2001:db8::9]"], "2001:db8::9"),
        (["2001:db8::9"], "2001:db8::9"),
        (["6.6.6.6, 203.0.113.9:4711, 10.9.1.1:80"], "203.0.113.9"),  # trusted hop with port
        (["[::ffff:1.2.3.4]:80"], "1.2.3.4"),
    ],
)
def test_client_address_understands_ports(forwarded: list[str], expected: str) -> None:
    assert client_address("127.0.0.1", forwarded, TRUSTED) == ip_address(expected)


@pytest.mark.parametrize(
    "forwarded",
    [
        ["unknown"],
        ["1.2.3.4, "],  # a trailing empty entry
        [""],
        [","],
        ["garbage, 10.9.1.1"],  # the trusted hop passed on garbage: not the hop itself
        ["_hidden"],  # an RFC 7239 obfuscated identifier
        ["1.2.3.4:port"],
        ["1.2.3.4:"],
        ["[2001:db8::9]x"],
        ["[2001:db8::9"],
        ["[1.2.3.4]:80:80"],
        ["fe80::1%eth0"],
        ["999.1.1.1"],
        ["1.2.3.4:80:90"],
    ],
)
def test_unreadable_forwarded_for_makes_the_client_unknown(forwarded: list[str]) -> None:
    assert client_address("127.0.0.1", forwarded, TRUSTED) is None


def test_client_address_unknown_peer() -> None:
    assert client_address(None, ["1.2.3.4"], TRUSTED) is None
    assert client_address("not-an-ip", [], TRUSTED) is None
