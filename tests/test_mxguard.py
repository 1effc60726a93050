"""The MX address guard (cluster.core.mxguard) and the pure TLS policy (cluster.core.tls_policy),
as tables; address literals as routes (cluster.adapters.dns); their config keys."""

from __future__ import annotations

import ipaddress

import pytest

from cluster.adapters.dns import DnsFailure, Route, address_literal_route
from cluster.config import ConfigError, parse_config
from cluster.core.mxguard import AddressGuard, refused_range
from cluster.core.replies import Outcome, address_refused, tls_failure
from cluster.core.sites import SiteLimits, SiteOverride
from cluster.core.tls_policy import BrokenTls, ca_file_for, tls_server_name, verify_text

DEFAULT = AddressGuard.build([])

# address -> what the default guard (nothing allowed, no own addresses) says
REFUSALS = [
    ("127.0.0.1", "a loopback address"),
    ("127.255.0.9", "a loopback address"),
    ("::1", "a loopback address"),
    ("10.0.0.5", "a private address"),
    ("172.16.0.1", "a private address"),
    ("172.31.255.255", "a private address"),
    ("192.168.1.1", "a private address"),
    ("fd00::1", "a private address"),                       # ULA
    ("fc12:3456::1", "a private address"),
    ("169.254.169.254", "a link-local address"),             # the cloud metadata service
    ("fe80::1", "a link-local address"),
    ("fe80::1%eth0", "a link-local address"),                # with a zone
    ("0.0.0.0", "an unspecified address"),
    ("::", "an unspecified address"),
    ("224.0.0.1", "a multicast address"),
    ("ff02::1", "a multicast address"),
    ("100.64.0.1", "a shared (CGNAT) address"),
    ("100.127.255.254", "a shared (CGNAT) address"),
    ("255.255.255.255", "a reserved address"),
    ("192.0.2.10", "a documentation address"),
    ("2001:db8::25", "a documentation address"),
    ("::ffff:10.0.0.5", "a private address"),                # IPv4-mapped: the IPv4 decides
    ("::ffff:127.0.0.1", "a loopback address"),
    ("mx.example", "not an IP address"),
    # public: allowed
    ("8.8.8.8", None),
    ("172.32.0.1", None),                                    # just outside 172.16/12
    ("100.128.0.1", None),                                   # just outside 100.64/10
    ("2a00:1450:4001:80b::201a", None),
    ("::ffff:8.8.8.8", None),
]


@pytest.mark.parametrize("address,why", REFUSALS)
def test_the_default_guard_refuses_non_public_addresses(address: str, why: str | None) -> None:
    assert DEFAULT.why_refused(address) == why


@pytest.mark.parametrize("allow,address,why", [
    (["127.0.0.0/8"], "127.0.0.1", None),
    (["127.0.0.0/8"], "127.9.9.9", None),
    (["127.0.0.0/8"], "::ffff:127.0.0.1", None),             # the mapped form is the same host
    (["127.0.0.0/8"], "::1", "a loopback address"),          # IPv6 loopback is not in it
    (["127.0.0.0/8"], "10.0.0.5", "a private address"),
    (["10.1.2.3"], "10.1.2.3", None),                        # a bare address is its /32
    (["10.1.2.3"], "10.1.2.4", "a private address"),
    (["fd00::/8"], "fd00::25", None),
    (["::ffff:10.0.0.0/104"], "::ffff:10.0.0.7", None),
])
def test_allow_networks_override_the_ranges(allow: list[str], address: str,
                                            why: str | None) -> None:
    assert AddressGuard.build(allow).why_refused(address) == why


def test_the_clusters_own_addresses_are_refused_unless_allowed() -> None:
    own = ["203.0.113.7", "2001:db8:1::7", "lo0", "fe80::1%eth0"]     # odd OS text is skipped
    g = AddressGuard.build([], own)
    assert g.why_refused("203.0.113.7") == "one of this cluster's own addresses"
    assert g.why_refused("::ffff:203.0.113.7") == "one of this cluster's own addresses"
    assert g.why_refused("2001:db8:1::7") == "one of this cluster's own addresses"
    assert g.why_refused("198.51.100.1") == "a documentation address"   # a range, not own
    assert AddressGuard.build(["203.0.113.0/24"], own).why_refused("203.0.113.7") is None
    assert refused_range(ipaddress.ip_address("8.8.4.4")) is None


def test_a_route_keeps_its_allowed_addresses_and_drops_the_rest() -> None:
    hosts = [[10, "mx1.example", ["10.0.0.5", "8.8.8.8"]], [20, "mx2.example", ["127.0.0.1"]]]
    d = DEFAULT.check_route(hosts)
    assert d.hosts == [[10, "mx1.example", ["8.8.8.8"]]] and d.refused == 2
    assert d.refusal is None                     # something is left: no refusal


@pytest.mark.parametrize("hosts,text", [
    ([[10, "mx.example", ["10.0.0.5"]]],
     "mx.example resolves only to 10.0.0.5, a private address; refused "
     "(delivery.allow_networks)"),
    ([[0, "[127.0.0.1]", ["127.0.0.1"]]],
     "address literal [127.0.0.1] is a loopback address; refused (delivery.allow_networks)"),
    ([[0, "[IPv6:fe80::1]", ["fe80::1"]]],
     "address literal [IPv6:fe80::1] is a link-local address; refused "
     "(delivery.allow_networks)"),
    ([[10, "mx.example", ["10.0.0.5", "::1"]]],
     "mx.example resolves only to 10.0.0.5 (a private address), ::1 (a loopback address); "
     "refused (delivery.allow_networks)"),
    ([[10, "a.example", ["10.0.0.1"]], [20, "b.example", ["10.0.0.2", "10.0.0.3", "10.0.0.4"]]],
     "the MX hosts a.example, b.example resolve only to 10.0.0.1 (a private address), "
     "10.0.0.2 (a private address), 10.0.0.3 (a private address) and 1 more; refused "
     "(delivery.allow_networks)"),
])
def test_a_route_with_nothing_left_is_refused_with_a_clear_text(hosts: list, text: str) -> None:
    d = DEFAULT.check_route(hosts)
    assert d.hosts == [] and d.refusal == text
    c = address_refused(d.refusal)
    assert (c.outcome, c.enhanced, c.category, c.rule) == \
        (Outcome.PERMANENT, "5.4.4", "routing", "mx-guard")


def test_an_empty_route_is_not_a_refusal() -> None:
    assert DEFAULT.check_route([]).refusal is None


@pytest.mark.parametrize("domain,host,address", [
    ("[127.0.0.1]", "[127.0.0.1]", "127.0.0.1"),
    ("[IPv6:::1]", "[IPv6:::1]", "::1"),
    ("[ipv6:2001:DB8::1]", "[IPv6:2001:db8::1]", "2001:db8::1"),
    ("[IPv6:::ffff:10.0.0.5]", "[IPv6:::ffff:a00:5]", "::ffff:a00:5"),
])
def test_an_address_literal_is_a_route_to_that_address(domain: str, host: str,
                                                       address: str) -> None:
    r = address_literal_route(domain, 100.0, 60.0)
    assert isinstance(r, Route) and r.expires_at == 160.0
    assert [(h.preference, h.name, h.addresses) for h in r.hosts] == [(0, host, (address,))]
    # and the guard judges it as any route
    assert DEFAULT.check_route([[0, host, [address]]]).refusal is not None


@pytest.mark.parametrize("domain", ["[::1]", "[IPv6:127.0.0.1]", "[300.1.1.1]", "[x]"])
def test_a_malformed_address_literal_is_a_permanent_failure(domain: str) -> None:
    r = address_literal_route(domain, 0.0, 60.0)
    assert isinstance(r, DnsFailure) and r.permanent and "invalid address literal" in str(r)


def test_a_domain_is_not_a_literal() -> None:
    assert address_literal_route("example.com", 0.0, 60.0) is None


# ---------------------------------------------------------------------------- TLS policy

def test_broken_tls_hosts_are_remembered_for_ttl_and_bounded() -> None:
    b = BrokenTls(ttl=60.0, max_hosts=2)
    b.mark("a", 0.0)
    assert b.is_broken("a", 59.9) and not b.is_broken("a", 60.0) and len(b) == 0
    b.mark("a", 0.0)
    b.mark("b", 1.0)
    b.mark("c", 2.0)                       # a goes: the oldest mark
    assert not b.is_broken("a", 3.0) and b.is_broken("b", 3.0) and b.is_broken("c", 3.0)
    assert len(b) == 2


def test_the_ca_file_follows_the_override_that_made_the_site() -> None:
    lim = SiteLimits(tls="required")
    ov = [SiteOverride(lim, domain="bank.test", tls_ca_file="/ca/bank.pem"),
          SiteOverride(lim, mx_suffix="mail.corp.test", tls_ca_file="/ca/corp.pem"),
          SiteOverride(lim, domain="plain.test")]
    assert ca_file_for("domain:bank.test", ["mx.bank.test"], ov) == "/ca/bank.pem"
    assert ca_file_for("domain:plain.test", ["mx.x"], ov, "/ca/default.pem") == "/ca/default.pem"
    assert ca_file_for("mx1.mail.corp.test", ["MX1.mail.corp.test."], ov) == "/ca/corp.pem"
    assert ca_file_for("mx.other.test", ["mx.other.test"], ov) == ""


@pytest.mark.parametrize("host,name", [("mx.example", "mx.example"), ("[192.0.2.1]", "192.0.2.1"),
                                       ("[IPv6:2001:db8::1]", "2001:db8::1")])
def test_the_name_a_certificate_must_match(host: str, name: str) -> None:
    assert tls_server_name(host) == name


def test_verify_failures_read_as_operators_expect() -> None:
    t = verify_text("mx.example", "192.0.2.1",
                    "Hostname mismatch, certificate is not valid for 'mx.example'.", 62)
    assert t == ("TLS required: certificate verify failed: Hostname mismatch, certificate is "
                 "not valid for 'mx.example' for mx.example [192.0.2.1] (hostname mismatch)")
    c = tls_failure(t)
    assert (c.outcome, c.enhanced, c.category, c.bounce_class) == \
        (Outcome.TRANSIENT, "4.7.5", "auth-failure", "soft")
    assert tls_failure("x", no_starttls=True).enhanced == "4.7.10"
    assert verify_text("h", "a", "", 20).endswith("(unknown CA)")


# ---------------------------------------------------------------------------- config

def test_config_keys_parse_and_bad_ones_are_named(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    c = parse_config({"delivery": {"allow_networks": ["127.0.0.0/8", "::1", "10.0.0.1/8"],
                                   "tls_ca_file": str(ca), "tls_broken_ttl": "10m"},
                      "site": [{"domain": "a.test", "tls": "required", "tls_ca_file": str(ca)}]})
    assert c.delivery.allow_networks == ("127.0.0.0/8", "::1/128", "10.0.0.0/8")
    assert c.delivery.tls_ca_file == str(ca) and c.delivery.tls_broken_ttl == 600.0
    assert c.sites[0].tls_ca_file == str(ca)
    assert parse_config({}).delivery.allow_networks == ()      # the guard is on by default
    for raw, where in [({"delivery": {"allow_networks": ["10.0.0/8x"]}},
                        "delivery.allow_networks"),
                       ({"delivery": {"allow_networks": 5}}, "delivery.allow_networks"),
                       ({"delivery": {"tls_ca_file": str(tmp_path / "no.pem")}},
                        "delivery.tls_ca_file"),
                       ({"site": [{"domain": "a.test", "tls_ca_file": "/no/such.pem"}]},
                        "site[0].tls_ca_file")]:
        with pytest.raises(ConfigError) as e:
            parse_config(raw)
        assert where in str(e.value)
