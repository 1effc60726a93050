"""MX address guard: may raymta open an SMTP connection to this address?

Role: refuse delivery to addresses that are not the public Internet (loopback, RFC 1918 and ULA
private ranges, link-local, unspecified, multicast, CGNAT, reserved) and to the cluster's own
addresses, unless an operator allowed their network (``delivery.allow_networks``). An MX record
or an address literal (``user@[10.0.0.5]``, RFC 5321 §4.1.3) is chosen by whoever controls the
recipient's domain: honouring it blindly makes a mail loop (our own listener) or a way to
reach internal services from outside.
Owns: the table of refused ranges with their names, the allow/own decision for one address,
and the decision for a whole route (which hosts and addresses remain, or why none does).
Pure: no sockets, no DNS, no Ray; the caller gives the cluster's own addresses.

Order of the decision: an address inside an allowed network is allowed (tests and the demo
allow 127.0.0.0/8 for their loopback sinks, and that includes the cluster's own loopback);
else the cluster's own addresses are refused; else the special ranges are refused. An
IPv4-mapped IPv6 address (``::ffff:10.0.0.5``) is judged as the IPv4 address it carries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["AddressGuard", "GuardDecision", "IPAddress", "IPNetwork", "parse_networks",
           "refused_range"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: (network, what it is): the first match names the refusal; order matters only for the name
_REFUSED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(n), what) for n, what in (
        ("127.0.0.0/8", "a loopback address"),
        ("::1/128", "a loopback address"),
        ("0.0.0.0/8", "an unspecified address"),           # RFC 1122 §3.2.1.3 "this network"
        ("::/128", "an unspecified address"),
        ("10.0.0.0/8", "a private address"),               # RFC 1918
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("fc00::/7", "a private address"),                 # RFC 4193 unique local
        ("169.254.0.0/16", "a link-local address"),        # RFC 3927
        ("fe80::/10", "a link-local address"),             # RFC 4291 §2.5.6
        ("100.64.0.0/10", "a shared (CGNAT) address"),     # RFC 6598
        ("224.0.0.0/4", "a multicast address"),
        ("ff00::/8", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),             # RFC 1112 class E, broadcast
        ("192.0.0.0/24", "a reserved address"),            # RFC 6890 IETF protocol assignments
        ("198.18.0.0/15", "a reserved address"),           # RFC 2544 benchmarking
        ("192.0.2.0/24", "a documentation address"),       # RFC 5737
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("2001:db8::/32", "a documentation address"),      # RFC 3849
    ))


def _unmapped(a: IPAddress) -> IPAddress:
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def refused_range(address: IPAddress) -> str | None:
    """What special range ``address`` is in ("a private address"), or None for a public one."""
    a = _unmapped(address)
    for net, what in _REFUSED:
        if a.version == net.version and a in net:
            return what
    return None


def parse_networks(items: Iterable[str], where: str = "allow_networks") -> tuple[IPNetwork, ...]:
    """Networks from text ("127.0.0.0/8", "::1", "10.1.2.3/32"); a bare address is its /32 or
    /128. Raises ValueError naming ``where`` and the bad item."""
    out = []
    for i, text in enumerate(items):
        try:
            out.append(ipaddress.ip_network(str(text).strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"{where}[{i}]: not a network or address: {text!r} ({e})") from None
    return tuple(out)


@dataclass(frozen=True)
class GuardDecision:
    """A route after the guard: the hosts that remain (each with its allowed addresses only)
    and, when none remains, why."""

    hosts: list[list[Any]]
    refused: int                # addresses dropped
    #: set when no address remains and some were refused: the text of the 5.4.4 refusal
    refusal: str | None


@dataclass(frozen=True)
class AddressGuard:
    """The decision for one delivery source: networks allowed by config, the cluster's own
    addresses (refused unless allowed)."""

    allow: tuple[IPNetwork, ...] = ()
    own: frozenset[IPAddress] = frozenset()

    @classmethod
    def build(cls, allow_networks: Iterable[str], own: Iterable[str] = ()) -> AddressGuard:
        mine = set()
        for a in own:
            try:
                mine.add(_unmapped(ipaddress.ip_address(a.split("%", 1)[0])))
            except ValueError:
                continue      # an interface name or odd text from the OS: nothing to refuse
        return cls(parse_networks(allow_networks), frozenset(mine))

    def why_refused(self, address: str) -> str | None:
        """None when raymta may connect to ``address``; else what it is ("a private
        address", "one of this cluster's own addresses", "not an IP address")."""
        try:
            a = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
        u = _unmapped(a)
        for net in self.allow:
            if (a.version == net.version and a in net) or (u.version == net.version and u in net):
                return None
        if u in self.own:
            return "one of this cluster's own addresses"
        return refused_range(u)

    def check_route(self, hosts: Sequence[Sequence[Any]]) -> GuardDecision:
        """Filter ``[[preference, host, [addresses]], ...]`` (the relay's route form)."""
        kept: list[list[Any]] = []
        refused: list[tuple[str, str, str]] = []
        for pref, host, addresses in hosts:
            ok = []
            for a in addresses:
                why = self.why_refused(a)
                if why is None:
                    ok.append(a)
                else:
                    refused.append((host, a, why))
            if ok:
                kept.append([pref, host, ok])
        refusal = None
        if not kept and refused:
            refusal = _refusal_text(refused)
        return GuardDecision(kept, len(refused), refusal)


def _refusal_text(refused: list[tuple[str, str, str]]) -> str:
    """"mx.example resolves only to 10.0.0.5, a private address; refused
    (delivery.allow_networks)"; several addresses are listed (at most three)."""
    hosts = list(dict.fromkeys(h for h, _, _ in refused))
    if len(refused) == 1:
        host, a, why = refused[0]
        if host.startswith("["):
            what = f"address literal {host} is {why}"
        else:
            what = f"{host} resolves only to {a}, {why}"
    else:
        shown = ", ".join(f"{a} ({why})" for _, a, why in refused[:3])
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        name = hosts[0] if len(hosts) == 1 else f"the MX hosts {', '.join(hosts[:3])}"
        what = f"{name} resolve{'s' if len(hosts) == 1 else ''} only to {shown}{more}"
    return f"{what}; refused (delivery.allow_networks)"
