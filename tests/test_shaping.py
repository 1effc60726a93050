"""Adaptive shaping rules (cluster/core/shaping.py): the shipped rules against the providers'
texts, the trigger counters, expiry, bounded memory, raymta's own results, and the rules file's
errors. Pure: no Ray, no I/O but reading the shipped file through the config."""

from __future__ import annotations

import time

import pytest

from cluster.config import ConfigError, parse_config, shipped_shaping_rules
from cluster.core.replies import Outcome, classify
from cluster.core.shaping import ShapingEngine, ShapingError, apply_limits, reshape, rules_from_toml
from cluster.core.sites import SiteLimits
from cluster.core.throttle import ThrottleBook

YAHOO = "mta5.am0.yahoodns.net,mta6.am0.yahoodns.net,mta7.am0.yahoodns.net"
GMAIL = "alt1.gmail-smtp-in.l.google.com,gmail-smtp-in.l.google.com"
OUTLOOK = "hotmail-com.olc.protection.outlook.com"
APPLE = "mx01.mail.icloud.com,mx02.mail.icloud.com"
COMCAST = "mx1.comcast.net,mx2.comcast.net"
OTHER = "mx.example.org"

# (site, code, enhanced, text, rule fired by the first such reply or None, action)
FIRST_REPLY = [
    (YAHOO, 421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to "
     "unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com",
     "yahoo-tss04", "suspend"),
    (YAHOO, 421, "4.7.0", "[TS01] Messages from 192.0.2.1 temporarily deferred due to user "
     "complaints", "yahoo-ts01-ts02", "suspend"),
    (YAHOO, 421, "4.7.0", "[TS02] Messages from 192.0.2.1 temporarily deferred due to "
     "unexpected volume", "yahoo-ts01-ts02", "suspend"),
    (YAHOO, 421, "4.7.0", "[TS03] All messages from 192.0.2.1 will be permanently deferred; "
     "Retrying will NOT succeed", None, None),          # a bounce: per reply, never "fired"
    (GMAIL, 421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail "
     "originating from your IP address. To protect our users from spam, mail sent from your "
     "IP address has been temporarily rate limited.", "gmail-4.7.28-rate-limited",
     "set_limits"),
    (GMAIL, 421, "4.7.0", "Our system has detected an unusual rate of unsolicited mail",
     "gmail-unusual-rate", "set_limits"),
    (GMAIL, 452, "4.2.2", "The email account that you tried to reach is over quota.", None,
     None),
    (OUTLOOK, 421, "4.3.2", "The maximum number of concurrent connections has exceeded a "
     "limit, closing transmission channel", "outlook-too-many-connections", "set_limits"),
    (OUTLOOK, 421, None, "Server has exceeded the maximum number of connections",
     "outlook-too-many-connections", "set_limits"),
    (OUTLOOK, 451, "4.7.650", "The mail server [192.0.2.1] has been temporarily rate limited "
     "due to IP reputation.", "outlook-4.7.650-ip-reputation", "set_limits"),
    (OUTLOOK, 550, "5.7.1", "Unfortunately, messages from [192.0.2.1] weren't sent. Please "
     "contact your Internet service provider since part of their network is on our block "
     "list (S3150).", "outlook-s3150-blocklist", "suspend"),
    (APPLE, 421, "4.7.0", "Too many connections from your IP", "apple-too-many-connections",
     "set_limits"),
    (APPLE, 450, "4.7.1", "Message rate exceeded, try again later", "apple-rate", "set_limits"),
    (COMCAST, 421, None, "resimta-po-01v.sys.comcast.net comcast 192.0.2.1 RL000001 Too many "
     "sessions are opened from your IP", "comcast-rl0000", "set_limits"),
    # generic rules need 3 or 5 per hour: the first one fires nothing
    (OTHER, 421, "4.7.0", "Too many connections, try later", None, None),
    # not a provider of the rule: TSS04 text from another site fires nothing
    (OTHER, 421, "4.7.0", "[TSS04] deferred", None, None),
    # a provider's 5xx that no rule names
    (GMAIL, 550, "5.1.1", "The email account that you tried to reach does not exist.", None,
     None),
]


@pytest.mark.parametrize("site,code,enh,text,rule,action", FIRST_REPLY)
def test_first_reply_fires_the_providers_rule(site, code, enh, text, rule, action):
    eng = ShapingEngine(shipped_shaping_rules())
    fired = eng.observe(site, "default", code, enh, text, 1000.0)
    assert [(a.rule, a.action) for a in fired] == ([(rule, action)] if rule else [])
    if rule:
        assert fired[0].key == site and fired[0].until > 1000.0


# (site, code, enhanced, text, outcome after reshape)
RECLASSIFY = [
    (YAHOO, 421, "4.7.0", "[TS03] All messages from 192.0.2.1 will be permanently deferred; "
     "Retrying will NOT succeed", Outcome.PERMANENT),
    (GMAIL, 452, "4.2.2", "The email account that you tried to reach is over quota.",
     Outcome.TRANSIENT),
    (YAHOO, 421, "4.7.0", "[TSS04] Messages deferred", Outcome.TRANSIENT),   # unchanged
    (OTHER, 421, "4.7.0", "[TS03] permanently deferred", Outcome.TRANSIENT),  # not yahoo
]


@pytest.mark.parametrize("site,code,enh,text,outcome", RECLASSIFY)
def test_bounce_and_transient_rules_reclassify_one_reply(site, code, enh, text, outcome):
    c = classify(code, f"{enh} {text}", phase="rcpt")
    r = reshape(shipped_shaping_rules(), site, c)
    assert r.outcome is outcome
    if r.outcome is not c.outcome:
        assert not r.site_backoff


def test_n_per_hour_trigger_counts_within_the_hour_only():
    eng = ShapingEngine(shipped_shaping_rules())
    text = "Too many connections from your host"
    # 2 in the first hour, then a gap: the window starts again
    assert eng.observe(OTHER, "", 421, None, text, 0.0) == []
    assert eng.observe(OTHER, "", 421, None, text, 10.0) == []
    assert eng.observe(OTHER, "", 421, None, text, 4000.0) == []
    assert eng.observe(OTHER, "", 421, None, text, 4001.0) == []
    fired = eng.observe(OTHER, "", 421, None, text, 4002.0)
    assert [a.rule for a in fired] == ["generic-too-many-connections"]
    assert fired[0].max_connections == 2 and fired[0].until == 4002.0 + 900


def test_an_active_action_does_not_refire_or_extend_and_expires_once():
    eng = ShapingEngine(shipped_shaping_rules())
    t = "[TSS04] deferred due to user complaints"
    [a] = eng.observe(YAHOO, "", 421, "4.7.0", t, 100.0)
    assert eng.observe(YAHOO, "", 421, "4.7.0", t, 200.0) == []
    assert eng.active[(YAHOO, "suspend")].until == a.until == 100.0 + 7200
    assert eng.suspended(YAHOO, "x", 7299.0) is a
    assert eng.expire(7299.0) == []
    assert eng.expire(7300.0) == [a]
    assert eng.expire(7301.0) == [] and eng.suspended(YAHOO, "", 7301.0) is None
    assert eng.observe(YAHOO, "", 421, "4.7.0", t, 7302.0)   # fires again afterwards


@pytest.mark.parametrize("text,own", [
    ("raymta: no connection slot for this site in time (site paused)", True),
    ("4.4.5 raymta: no connection slot for this site in time", True),
    ("[TSS04] deferred", False),
])
def test_raymtas_own_results_never_trigger(text, own):
    eng = ShapingEngine(shipped_shaping_rules())
    fired = eng.observe(YAHOO, "", 421, "4.7.0", "[TSS04] " + text, 0.0)
    assert bool(fired) is not own
    # no code at all (a DNS or connection failure raymta made): never
    assert eng.observe(YAHOO, "", None, "4.4.3", "[TSS04]", 0.0) == []
    assert eng.observe(YAHOO, "", 421, "4.7.0", "[TSS04]", 0.0, own=True) == []


def test_memory_is_bounded():
    eng = ShapingEngine(shipped_shaping_rules(), max_keys=50)
    for i in range(1000):
        eng.observe(f"mx{i}.example", "", 421, None, "too many connections", float(i))
        eng.observe(f"mx{i}.yahoodns.net", "", 421, None, "[TSS04]", float(i))
    assert len(eng._hits) <= 50 and len(eng.active) <= 50
    assert eng.counters["dropped"] == 950


def test_source_scope_suspends_one_egress_source_only():
    rules = rules_from_toml({"replace": True, "rule": [{"name": "per-ip", "provider": "yahoo", "text": "TSS04",
                                       "action": "suspend", "duration": "10m",
                                       "scope": "source"}]}, "t.toml",
                            shipped_shaping_rules())
    eng = ShapingEngine(rules)
    [a] = eng.observe(YAHOO, "ip1", 421, None, "[TSS04]", 0.0)
    assert a.key == f"{YAHOO}#ip1" and a.site == YAHOO and a.source == "ip1"
    assert eng.suspended(YAHOO, "ip1", 1.0) is a and eng.suspended(YAHOO, "ip2", 1.0) is None
    book = ThrottleBook(shaping=eng)
    lim = SiteLimits()
    assert book.acquire(YAHOO, lim, "relay:n1:ip1", "i", 3, 1.0) == []
    assert len(book.acquire(YAHOO, lim, "relay:n1:ip2", "i", 3, 1.0)) == 3
    assert book.grant(0, YAHOO, lim, 10, 0, 1.0).count == 10   # the site as a whole is not


def test_throttle_book_applies_suspend_and_set_limits():
    eng = ShapingEngine(shipped_shaping_rules())
    book = ThrottleBook(shaping=eng)
    lim = SiteLimits(max_connections=10)
    eng.observe(YAHOO, "", 421, "4.7.0", "[TSS04] deferred", 0.0)
    g = book.grant(0, YAHOO, lim, 100, 0, 1.0)
    assert g.count == 0 and g.retry_after == 7200.0
    assert book.acquire(YAHOO, lim, "relay:n:default", "i", 5, 1.0) == []
    assert book.renew(YAHOO, lim, "relay:n:default", "i", [7, 8], 1.0) == [7, 8]
    eng.observe(COMCAST, "", 421, None, "RL000001 Too many sessions", 0.0)
    assert len(book.acquire(COMCAST, lim, "relay:n:default", "i", 5, 1.0)) == 2
    eng.expire(7200.0)
    assert book.grant(0, YAHOO, lim, 100, 0, 7200.0).count == 100
    assert len(book.acquire(COMCAST, lim, "relay:n:default", "i", 5, 3601.0)) == 5


@pytest.mark.parametrize("held, others, refused", [
    # leases (ids) a relay holds when Outlook's "maximum number of connections" rule (2)
    # fires; another relay's leases; which of this relay's are refused at the next renewal
    ([1, 2, 3, 4, 5], [], [3, 4, 5]),          # the newest above the lowered cap go
    ([1, 2], [], []),                          # within it: all kept
    ([2, 3, 5], [1, 4], [3, 5]),               # the cap is the site's, over both relays
    ([4, 5], [1, 2, 3], [4, 5]),
])
def test_connections_open_when_a_set_limits_rule_fires_are_cut_to_its_cap(held, others,
                                                                          refused):
    eng = ShapingEngine(shipped_shaping_rules())
    book = ThrottleBook(shaping=eng, lease_ttl=20.0)
    lim = SiteLimits(max_connections=10)
    for pool, ids in (("relay:n1:default", held), ("relay:n2:default", others)):
        if ids:
            assert book.renew(OUTLOOK, lim, pool, "i", ids, 0.0) == []   # adopted
    [a] = eng.observe(OUTLOOK, "", 421, "4.3.2", "The maximum number of concurrent "
                      "connections has exceeded a limit, closing transmission channel", 1.0)
    assert a.max_connections == 2
    assert book.renew(OUTLOOK, lim, "relay:n1:default", "i", held, 2.0) == refused
    assert book.acquire(OUTLOOK, lim, "relay:n1:default", "i", 3, 2.0) == []


def test_set_limits_applied_twice_is_applied_once():
    # the shards send limits the rule already lowered and the throttle applies the rule
    # again: the same limits either way, or the site's rate limiter restarts (a fresh burst)
    # each time the two disagree
    eng = ShapingEngine(shipped_shaping_rules())
    [a] = eng.observe(GMAIL, "", 421, "4.7.28", "unusual rate", 0.0)
    once = apply_limits(SiteLimits(), a)
    assert apply_limits(once, a) == once


def test_set_limits_only_lowers():
    eng = ShapingEngine(shipped_shaping_rules())
    [a] = eng.observe(GMAIL, "", 421, "4.7.28", "unusual rate", 0.0)
    low = apply_limits(SiteLimits(max_connections=1, deliveries_per_connection=5), a)
    assert low.max_connections == 1 and len(low.rates) == 2
    assert str(low.rates[1]) in ("1/s", "1/s,burst=1")


def test_operator_rules_come_first_replace_by_name_or_all():
    base = shipped_shaping_rules()
    mine = rules_from_toml({"providers": {"yahoo": ["yahoo.test"]},
                            "rule": [{"name": "yahoo-tss04", "provider": "yahoo",
                                      "text": "TSS04", "action": "suspend",
                                      "duration": "3s"}]}, "mine.toml", base)
    assert len(mine) == len(base) and mine.rules[0].duration == 3.0
    assert mine.provider_of("mx.yahoo.test") == "yahoo"
    only = rules_from_toml({"replace": True, "rule": [{"name": "x", "code": "421",
                                                       "action": "transient"}]}, "o.toml", base)
    assert [r.name for r in only.rules] == ["x"]


BAD = [
    ({"rule": [{"name": "a", "text": "x", "action": "explode"}]}, "action 'explode'"),
    ({"rule": [{"name": "a", "text": "(", "action": "bounce"}]}, "not a valid regular"),
    ({"rule": [{"name": "a", "text": "x", "action": "suspend"}]}, "needs a duration"),
    ({"rule": [{"name": "a", "text": "x", "action": "suspend", "duration": "2 fortnights"}]},
     "duration"),
    ({"rule": [{"name": "a", "text": "x", "action": "set_limits", "duration": "1h"}]},
     "needs rate"),
    ({"rule": [{"name": "a", "text": "x", "action": "set_limits", "duration": "1h",
                "rate": "fast"}]}, "rate"),
    ({"rule": [{"name": "a", "text": "x", "action": "bounce", "trigger": "3/h"}]},
     "trigger must be immediate"),
    ({"rule": [{"name": "a", "text": "x", "action": "suspend", "duration": "1h",
                "trigger": "often"}]}, "trigger 'often'"),
    ({"rule": [{"name": "a", "text": "x", "action": "bounce", "provider": "aliens"}]},
     "provider 'aliens'"),
    ({"rule": [{"name": "a", "action": "bounce"}]}, "at least one of code"),
    ({"rule": [{"name": "a", "code": "4.7", "action": "bounce"}]}, "code '4.7'"),
    ({"rule": [{"name": "a", "enhanced": "4.7", "action": "bounce"}]}, "enhanced '4.7'"),
    ({"rule": [{"name": "a", "code": "421", "action": "bounce", "colour": 1}]}, "unknown keys"),
    ({"rule": [{"name": "a", "code": "421", "action": "bounce"},
               {"name": "a", "code": "421", "action": "bounce"}]}, "duplicate rule name"),
    ({"rules": []}, "unknown key 'rules'"),
]


@pytest.mark.parametrize("doc,needle", BAD)
def test_bad_rules_are_refused_naming_file_and_rule(doc, needle):
    with pytest.raises(ShapingError) as e:
        rules_from_toml(doc, "my-rules.toml", shipped_shaping_rules())
    assert "my-rules.toml" in str(e.value) and needle in str(e.value)


def test_config_section(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[[rule]]\nname = "z"\ncode = "421"\naction = "suspend"\nduration = "1m"\n')
    cfg = parse_config({"shaping": {"rules_file": "r.toml", "max_keys": 100}}, tmp_path)
    assert cfg.shaping.rules.rules[0].name == "z" and cfg.shaping.max_keys == 100
    f.write_text('[[rule]]\nname = "z"\ncode = "421"\naction = "suspend"\n')
    with pytest.raises(ConfigError) as e:
        parse_config({"shaping": {"rules_file": "r.toml"}}, tmp_path)
    assert "shaping.rules_file" in str(e.value) and "rule 1 ('z')" in str(e.value)
    with pytest.raises(ConfigError, match="shaping.enabled"):
        parse_config({"shaping": {"enabled": "yes"}})
    assert parse_config({}).shaping.enabled and len(parse_config({}).shaping.rules) >= 14


def test_evaluation_is_cheap():
    eng = ShapingEngine(shipped_shaping_rules())
    replies = [(s, c, e, t) for s, c, e, t, _r, _a in FIRST_REPLY]
    n = 20_000
    t0 = time.perf_counter()
    for i in range(n):
        s, c, e, t = replies[i % len(replies)]
        eng.observe(s, "", c, e, t, float(i))
    per = (time.perf_counter() - t0) / n * 1e6
    print(f"shaping: {per:.1f} µs per evaluation ({len(eng.rules)} rules)")
    assert per < 200


def test_a_rules_pause_record_is_durable_makes_events_and_leaves_an_operators_pause():
    from cluster.core import queue as q
    eng = ShapingEngine(shipped_shaping_rules())
    [a] = eng.observe(YAHOO, "", 421, "4.7.0", "[TSS04] deferred", 10.0)
    st = q.QueueState()
    ev = st.apply(q.pause_record(YAHOO, a.until, 10.0, a.to_wire()), 1)
    assert (ev["type"], ev["rule"], ev["until"]) == ("SiteSuspended", "yahoo-tss04", a.until)
    assert st.is_suspended("yahoo.com", YAHOO, 100.0)
    again = q.QueueState()
    again.restore(st.snapshot())                              # survives a leader restart
    assert again.is_suspended("x", YAHOO, 100.0) and again.shaping_in_force(100.0)
    ev = st.apply(q.pause_record(YAHOO, 0.0, 20.0, a.to_wire()), 2)
    assert (ev["type"], ev["rule"]) == ("SiteResumed", "yahoo-tss04")
    assert not st.is_suspended("x", YAHOO, 30.0) and st.shaping_in_force(30.0) == []
    # an operator's pause of the same site outlives the rule's end
    st.apply(q.pause_record(YAHOO, 99999.0, 40.0), 3)
    st.apply(q.pause_record(YAHOO, 50.0 + 7200, 50.0, {**a.to_wire(), "until": 7250.0}), 4)
    st.apply(q.pause_record(YAHOO, 0.0, 60.0, {**a.to_wire(), "until": 7250.0}), 5)
    assert st.is_suspended("x", YAHOO, 8000.0)
    # set_limits: kept, not a pause
    [b] = eng.observe(COMCAST, "", 421, None, "RL000001", 10.0)
    ev = st.apply(q.pause_record(COMCAST, b.until, 10.0, b.to_wire()), 6)
    assert ev["type"] == "SiteShaped" and ev["limits"]["max_connections"] == 2
    assert not st.is_suspended("comcast.net", COMCAST, 11.0)
    assert [x["rule"] for x in st.shaping_in_force(11.0)] == ["comcast-rl0000"]
    assert st.apply_or_quarantine(q.pause_record(COMCAST, 5.0, 1.0, {"action": "x"}), 7) is None
