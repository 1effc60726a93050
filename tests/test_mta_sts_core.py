"""MTA-STS, the pure part (cluster.core.mta_sts): TXT records, policy texts (good and
malformed, the error naming the line), the leftmost-label wildcard, and the cache's rules
(max_age, a new TXT id, a failed fetch keeping an unexpired policy: RFC 8461 §5.1)."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.core.mta_sts import (
    MAX_AGE_LIMIT,
    StsCache,
    StsPolicy,
    StsPolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
    policy_url,
    unmatched_text,
)

GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.mail.example.com\r\n" \
       "max_age: 86400\r\n"


@pytest.mark.parametrize("records, want", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=x1; ext=ignored"], "x1"),
    ([], None),
    (["v=spf1 -all"], None),
    (["v=STSv10; id=x"], None),                  # not our version tag
])
def test_txt_record_gives_the_policy_id(records, want) -> None:
    assert parse_txt(records) == want


@pytest.mark.parametrize("records, error", [
    (["v=STSv1; id=a", "v=STSv1; id=b"], "2 TXT records start with v=STSv1"),
    (["v=STSv1;"], "no id field"),
    (["v=STSv1; id=has-dash"], "TXT id 'has-dash' is not 1-32 letters or digits"),
    (["v=STSv1; id=" + "a" * 33], "is not 1-32 letters or digits"),
    (["v=STSv1; junk"], "TXT field 2 'junk' is not key=value"),
])
def test_malformed_txt_records_are_named(records, error) -> None:
    with pytest.raises(StsPolicyError, match=error):
        parse_txt(records)


@pytest.mark.parametrize("text, want", [
    (GOOD, StsPolicy("enforce", ("mx1.example.com", "*.mail.example.com"), 86400)),
    ("version: STSv1\nmode: testing\nmx: MX.Example.COM.\nmax_age: 0\n",
     StsPolicy("testing", ("mx.example.com",), 0)),
    ("version: STSv1\nmode: none\nmax_age: 10\n", StsPolicy("none", (), 10)),
    # unknown keys are ignored; whitespace around values is not part of them
    ("version:STSv1\nfuture: x\nmode:   enforce  \nmx: a.b.c\nmax_age: 9999999999\n",
     StsPolicy("enforce", ("a.b.c",), MAX_AGE_LIMIT)),
])
def test_valid_policies_parse(text, want) -> None:
    assert parse_policy(text) == want


@pytest.mark.parametrize("text, error", [
    ("mode: enforce\nmx: a.b\nmax_age: 1\n", "policy has no version line"),
    ("version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n", "line 1: version 'STSv2'"),
    ("version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n",
     "line 2: mode 'strict', expected enforce, testing or none"),
    ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 1d\n",
     "line 4: max_age '1d' is not a number of seconds"),
    ("version: STSv1\nmode: enforce\nmax_age: 5\n", "policy in mode enforce has no mx line"),
    ("version: STSv1\nmode: enforce\nmx: a.*.b\nmax_age: 5\n",
     r"line 3: mx 'a\.\*\.b' is not a host name or a '\*\.' pattern"),
    ("version: STSv1\nmode: enforce\nmx: localhost\nmax_age: 5\n", "line 3: mx 'localhost'"),
    ("version: STSv1\nmode: enforce\nmode: testing\nmx: a.b\nmax_age: 5\n",
     r"line 3: mode given twice \(first on line 2\)"),
    ("version: STSv1\n<html>\n", "line 2: '<html>' is not 'key: value'"),
    ("version: STSv1\nmode: enforce\nmx: a.b\n", "policy has no max_age line"),
])
def test_malformed_policies_name_the_line(text, error) -> None:
    with pytest.raises(StsPolicyError, match=error):
        parse_policy(text)


@pytest.mark.parametrize("pattern, host, want", [
    ("mx.example.com", "mx.example.com", True),
    ("mx.example.com", "MX.Example.com.", True),
    ("mx.example.com", "mx2.example.com", False),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "example.com", False),             # the wildcard needs a label
    ("*.example.com", "a.b.example.com", False),         # and covers one label only
    ("*.example.com", "mx1.example.com.evil.test", False),
])
def test_mx_patterns_match_the_leftmost_label_only(pattern, host, want) -> None:
    assert mx_matches(pattern, host) is want


def test_policy_url_and_refusal_text() -> None:
    assert policy_url("example.com") == "https://mta-sts.example.com/.well-known/mta-sts.txt"
    assert policy_url("x.test", 8443) == "https://mta-sts.x.test:8443/.well-known/mta-sts.txt"
    p = StsPolicy("enforce", ("*.mail.x.test",), 60)
    assert unmatched_text("x.test", p, ["mx.evil.test"]) == (
        "MTA-STS: no MX host of x.test matches its enforce policy (mx: *.mail.x.test): "
        "mx.evil.test refused")


def test_cache_keeps_a_policy_for_max_age_and_fetches_again_on_a_new_id() -> None:
    c = StsCache(recheck=300)
    p = StsPolicy("enforce", ("mx.x.test",), 1000)
    assert c.fresh("x.test", 0) == (False, None)
    assert c.needs_fetch("x.test", "id1", 0)
    c.store("x.test", "id1", p, now=0)
    assert c.fresh("x.test", 10) == (True, p)                 # no DNS for `recheck`
    assert c.fresh("x.test", 400) == (False, None)            # look at the TXT again
    assert not c.needs_fetch("x.test", "id1", 400)            # same id: keep it
    assert c.needs_fetch("x.test", "id2", 400)                # a new id: fetch
    c.fetch_failed("x.test", 400)                             # the fetch failed ...
    assert c.current("x.test", 400) == p                      # ... the policy stays (§5.1)
    c.txt_checked("x.test", 800)                              # the TXT record vanished
    assert c.current("x.test", 800) == p                      # still not withdrawn
    assert c.current("x.test", 1000) is None                  # but max_age ends it
    assert c.needs_fetch("x.test", "id1", 1000)


def test_cache_remembers_no_policy_and_ignores_mode_none_and_is_bounded() -> None:
    c = StsCache(recheck=60, max_domains=2)
    c.txt_checked("none.test", 0)
    assert c.fresh("none.test", 30) == (True, None)
    assert not c.needs_fetch("none.test", None, 30)
    c.store("off.test", "a", StsPolicy("none", (), 100), 0)
    assert c.fresh("off.test", 1) == (True, None)
    c.store("third.test", "a", StsPolicy("testing", ("m.t.test",), 100), 0)
    assert len(c) == 2 and c.fresh("none.test", 1) == (False, None)   # the oldest went


def test_a_connection_plan_follows_the_first_enforced_domain_in_queue_order() -> None:
    from actors.relay_sts import StsGate, StsPlan
    from cluster.config import Config
    from cluster.core.mxguard import AddressGuard
    b = StsPolicy("enforce", ("mx.b.test",), 60)
    a = StsPolicy("enforce", ("*.a.test",), 60)
    c = StsPolicy("enforce", ("mx.c.test",), 60)
    plan = StsPlan(enforce={"c.test": c, "b.test": b, "a.test": a})
    usable = [[10, "mx1.a.test", ["192.0.2.1"]], [20, "mx.b.test", ["192.0.2.2"]]]
    cfg = Config()
    cfg = dataclasses.replace(cfg, delivery=dataclasses.replace(cfg.delivery, mta_sts=False))
    gate = StsGate(cfg, lambda: AddressGuard.build([]))     # no resolver: none is needed
    # c.test's patterns match no MX host: its mail is deferred, it leaves the plan
    assert gate.unmatched(plan, usable) == {"c.test": unmatched_text(
        "c.test", c, ["mx1.a.test", "mx.b.test"])}
    # the head of the queue is now b.test's: its host only, although mx1.a.test is preferred
    assert plan.hosts(usable) == [[20, "mx.b.test", ["192.0.2.2"]]]


@pytest.mark.parametrize("site, hosts, sites, tls, want", [
    ("mx.x.test", ["mx.x.test"], [], "opportunistic", True),
    ("mx.x.test", ["mx.x.test"], [], "required", False),         # site_defaults says required
    ("domain:x.test", ["mx.x.test"], [{"domain": "x.test", "tls": "opportunistic"}],
     "opportunistic", False),                                   # written per site: it wins
    ("domain:x.test", ["mx.x.test"], [{"domain": "x.test", "max_connections": 2}],
     "opportunistic", True),                                    # a [[site]] without tls
    ("mx.google.test", ["mx.google.test"], [{"mx_suffix": "google.test", "tls": "disabled"}],
     "disabled", False),
    ("[192.0.2.1]", ["[192.0.2.1]"], [], "opportunistic", False),   # an address literal
    ("route:smart.test:25", ["smart.test"], [], "opportunistic", False),   # a [routes] host
])
def test_mta_sts_governs_only_sites_without_an_explicit_tls(site, hosts, sites, tls,
                                                           want) -> None:
    from cluster.config import parse_config
    from cluster.core.tls_policy import mta_sts_applies
    cfg = parse_config({"site": sites} if sites else {})
    assert cfg.delivery.mta_sts is True
    assert mta_sts_applies(site, hosts, cfg.sites, tls) is want


@pytest.mark.parametrize("error, checked_at, now, usable", [
    (None, 1000.0, 1000.0, True),          # just looked up
    ("nxdomain", 1000.0, 1299.0, True),    # no record is an answer too
    (None, 1000.0, 1300.0, False),         # as old as the recheck interval: look again
    ("servfail", 1000.0, 1001.0, False),   # a failed lookup is the relay's to repeat
    ("timeout", 1000.0, 1001.0, False),
    (None, 1005.0, 1000.0, True),          # another node's clock ahead: counts as now
])
def test_a_txt_answer_from_the_throttle_stands_in_for_a_lookup(error, checked_at, now,
                                                               usable) -> None:
    assert StsCache(recheck=300).answer_usable(error, checked_at, now) is usable
