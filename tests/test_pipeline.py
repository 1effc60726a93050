"""The delivery pipeline end to end: real local Ray, real SMTP sinks and DNS on loopback."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.conftest import (EGRESS_ADDRESS, GREET421_SINK, LIMITED_SINK, MAIN_SINKS, SECONDARY_SINK, raw_message,
                            wait_for)

# own_ray: it reads Ray's metrics endpoint, which keeps the series of earlier tests' actors
pytestmark = [pytest.mark.timeout(300), pytest.mark.own_ray]


def events_for(mc, ids):
    want = set(ids)
    return [e for e in mc.events(0, limit=1_000_000) if e["id"] in want]


def submit_ok(mc, msgs):
    res = mc.submit(msgs)
    bad = [r.error for r in res if not r.accepted]
    assert not bad, bad
    return res


def test_5000_messages_to_20_domains_arrive_once_and_byte_identical(pipeline):
    mc, sinks, domains = pipeline["mc"], pipeline["sinks"], pipeline["domains"]
    n = 5000
    sent: dict[str, bytes] = {}
    msgs = []
    for i in range(n):
        rcpt = f"user{i}@{domains[i % len(domains)]}"
        raw = raw_message(i, rcpt)
        sent[rcpt] = raw
        msgs.append({"sender": "bounces@origin.test", "recipients": [rcpt], "raw": raw})
    ids = []
    t0 = time.time()
    for k in range(0, n, 1000):
        ids += [i for r in submit_ok(mc, msgs[k:k + 1000]) for i in r.ids]
    assert len(ids) == n and len(set(ids)) == n
    assert mc.wait_until_idle(timeout=180), mc.stats()
    elapsed = time.time() - t0
    got = [r for r in sinks.received if r.rcpt_to in sent]
    counts = Counter(r.rcpt_to for r in got)
    assert len(counts) == n, f"{n - len(counts)} recipients never received their message"
    assert max(counts.values()) == 1, f"duplicates: {sum(c - 1 for c in counts.values())}"
    for r in got:
        assert r.data == sent[r.rcpt_to], f"{r.rcpt_to}: body differs"
        assert r.mail_from == "bounces@origin.test"
    # every domain went to the MX hosts its zone names (preference 10 first)
    # every session came from the configured egress source's address
    assert {r.peer[0] for r in got} == {EGRESS_ADDRESS}
    by_sink = Counter(r.sink for r in got)
    assert set(by_sink) <= set(MAIN_SINKS), by_sink
    evs = events_for(mc, ids)
    kinds = Counter(e["type"] for e in evs)
    assert kinds["Reception"] == n and kinds["Delivery"] == n, kinds
    st = mc.status(ids[0])
    assert st["state"] == "delivered" and st["attempts"] == 1 and st["code"] == 250
    print(f"\n5000 messages end to end in {elapsed:.1f}s ({n / elapsed:.0f} msgs/s)")


def test_site_limits_hold_for_connections_and_rate(pipeline):
    mc, sinks = pipeline["mc"], pipeline["sinks"]
    sink = sinks.by_address(LIMITED_SINK)
    n = 300
    rcpts = [f"user{i}@limited.test" for i in range(n)]
    t0 = time.time()
    submit_ok(mc, [{"sender": "s@origin.test", "recipients": [r], "raw": raw_message(i, r)}
                   for i, r in enumerate(rcpts)])
    wait_for(lambda: sum(1 for r in sink.received if r.rcpt_to in set(rcpts)) >= n, 120,
             "the limited site to receive everything")
    got = sorted(r.at for r in sink.received if r.rcpt_to.endswith("@limited.test"))
    assert len(got) == n
    assert sink.max_concurrent_sessions <= 2, sink.max_concurrent_sessions
    # GCRA: from idle, at most burst (5) + 50/s × w in any window of length w. The limit is
    # applied when the throttle grants; the sink's clock adds each message's time in the relay
    # and its session, so grants spaced exactly can arrive a few closer together: 4 messages
    # over was seen once in a clean-clone CI run (2026-12-05 12:05, every test in one
    # session), 3 under load before; without the limit all 300 arrive within a second
    worst, where = 0.0, 0.0
    for w in (0.2, 0.5, 1.0, 2.0, 4.0):
        j = 0
        for i in range(len(got)):
            while got[i] - got[j] > w:
                j += 1
            excess = (i - j + 1) - (5 + 50 * w)
            if excess > worst:
                worst, where = excess, w
    assert worst <= 5, f"a {where}s window saw {worst:.1f} messages beyond burst + 50/s"
    span = got[-1] - got[0]
    assert span >= (n - 5) / 50 * 0.9, f"{n} messages in {span:.1f}s: faster than 50/s"
    print(f"\nlimited site: {n} in {span:.1f}s ({n / span:.1f}/s), max sessions "
          f"{sink.max_concurrent_sessions}, worst window excess {worst:.1f}")
    del t0


def test_transient_permanent_and_mx_failover(pipeline):
    mc, sinks = pipeline["mc"], pipeline["sinks"]
    plan = {"tempfail1@faults.test": "delivered", "tempfail2@faults.test": "delivered",
            "unknown1@faults.test": "bounced", "someone@failover.test": "delivered",
            "someone@primarydown.test": "delivered", "other@faults.test": "delivered"}
    res = submit_ok(mc, [{"sender": "s@origin.test", "recipients": [r], "raw": raw_message(i, r)}
                         for i, r in enumerate(plan)])
    ids = {r.ids[0]: rc for r, rc in zip(res, plan)}
    wait_for(lambda: all(s and s["state"] in ("delivered", "bounced")
                         for s in mc.status(list(ids))), 90, "all six to finish")
    for mid, st in zip(ids, mc.status(list(ids))):
        assert st["state"] == plan[ids[mid]], (ids[mid], st)
    evs = events_for(mc, ids)
    by = {rc: [e for e in evs if e["id"] == mid] for mid, rc in ids.items()}
    # 451 twice, then delivered on the third attempt
    t = [e["type"] for e in by["tempfail1@faults.test"]]
    assert t == ["Reception", "TransientFailure", "TransientFailure", "Delivery"], t
    tf = by["tempfail1@faults.test"][1]
    assert tf["code"] == 451 and tf["enhanced"] == "4.3.0" and tf["next_attempt"] > tf["ts"]
    assert by["tempfail1@faults.test"][-1]["attempt"] == 3
    # 550 5.1.1: one Bounce, no retry
    u = by["unknown1@faults.test"]
    assert [e["type"] for e in u] == ["Reception", "Bounce"]
    assert (u[1]["code"], u[1]["enhanced"], u[1]["category"]) == \
        (550, "5.1.1", "invalid-recipient")
    assert sinks.counts_by_rcpt()["unknown1@faults.test"] == 0
    # 421 greeting on the primary MX → the secondary; primary down → the secondary
    sec = sinks.by_address(SECONDARY_SINK)
    got = {r.rcpt_to for r in sec.received}
    assert {"someone@failover.test", "someone@primarydown.test"} <= got
    assert not sinks.by_address(GREET421_SINK).received
    assert sinks.by_address(GREET421_SINK).sessions_total >= 1  # it was tried first
    for rc in ("someone@failover.test", "someone@primarydown.test"):
        assert [e["type"] for e in by[rc]] == ["Reception", "Delivery"], by[rc]


def test_null_mx_and_nxdomain_bounce_at_once_servfail_is_retried(pipeline):
    mc, dns, sinks = pipeline["mc"], pipeline["dns"], pipeline["sinks"]
    rcpts = ["a@nullmx.test", "b@no-such-domain.test", "c@servfail.test"]
    t0 = time.time()
    res = submit_ok(mc, [{"sender": "s@origin.test", "recipients": [r], "raw": raw_message(i, r)}
                         for i, r in enumerate(rcpts)])
    ids = [r.ids[0] for r in res]
    wait_for(lambda: all(s["state"] == "bounced" for s in mc.status(ids[:2])), 30,
             "null MX and NXDOMAIN to bounce")
    assert time.time() - t0 < 15
    evs = events_for(mc, ids)
    null_b = [e for e in evs if e["id"] == ids[0] and e["type"] == "Bounce"][0]
    nx_b = [e for e in evs if e["id"] == ids[1] and e["type"] == "Bounce"][0]
    assert null_b["attempt"] == 1 and null_b["enhanced"] == "5.1.10", null_b
    assert nx_b["attempt"] == 1 and nx_b["category"] == "bad-domain", nx_b
    wait_for(lambda: any(e["id"] == ids[2] and e["type"] == "TransientFailure"
                         for e in mc.events(0, limit=1_000_000)), 30, "SERVFAIL to defer")
    assert mc.status(ids[2])["state"] in ("deferred", "queued", "inflight")
    dns.set_servfail("servfail.test", False)
    wait_for(lambda: mc.status(ids[2])["state"] == "delivered", 60,
             "the SERVFAIL domain to deliver once DNS answers")
    assert sinks.counts_by_rcpt()["c@servfail.test"] == 1


def test_malformed_submissions_get_clear_errors_and_good_ones_deliver(pipeline):
    mc, sinks = pipeline["mc"], pipeline["sinks"]
    good = [{"sender": "s@origin.test", "recipients": [f"good{i}@d1.test"],
             "from": "S <s@origin.test>", "subject": f"good {i}", "text": "hello\n"}
            for i in range(3)]
    big = "x" * 11_000_000
    bad = [  # (submission, words the error must contain)
        ({"recipients": ["a@d1.test"], "subject": "no sender, no From", "text": "x"}, "sender"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"],
          "raw": b"Subject: x\r\n\r\nbody\r\n"}, "From"),
        ({"sender": "not an address", "recipients": ["a@d1.test"], "from": "a@b.test",
          "text": "x"}, "sender"),
        ({"sender": "s@origin.test", "recipients": ["nobody"], "from": "s@origin.test",
          "text": "x"}, "recipient"),
        ({"sender": "s@origin.test", "recipients": [], "from": "s@origin.test", "text": "x"},
         "recipients"),
        ({"sender": "s@origin.test", "recipients": 42, "from": "s@origin.test", "text": "x"},
         "recipients"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"], "from": "s@origin.test",
          "subject": "hi\r\nBcc: victim@x.test", "text": "x"}, "subject"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"], "from": "s@origin.test",
          "text": big}, "over the limit"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"],
          "raw": "From: s@origin.test\r\nSubject: caf\u00e9\r\n\r\nx\r\n".encode()}, "8-bit"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"], "from": "s@origin.test",
          "text": "x", "colour": "red"}, "colour"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"], "from": "s@origin.test"},
         "'text' and/or 'html'"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"], "raw": b"From: s@o.test\r\n",
          "text": "x"}, "raw"),
        ({"sender": "s@origin.test", "recipients": ["a@xn--zz-.test"], "from": "s@origin.test",
          "text": "x"}, "recipient"),
        ({"sender": "s@origin.test", "recipients": ["a" * 65 + "@d1.test"],
          "from": "s@origin.test", "text": "x"}, "recipient"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"],
          "raw": b"From: s@origin.test\r\n\r\n" + b"y" * 1200 + b"\r\n"}, "998"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"],
          "raw": b"From: s@origin.test\r\n\r\nnul\x00byte\r\n"}, "NUL"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"], "from": "s@origin.test",
          "text": "x", "tags": ["not", "a", "dict"]}, "tags"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"], "from": "s@origin.test",
          "text": "x", "not_before": "next tuesday"}, "not_before"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"], "from": "s@origin.test",
          "text": "x", "max_age": -1}, "max_age"),
        ({"sender": "s@origin.test", "recipients": ["a@d1.test"], "from": "s@origin.test",
          "text": "x", "headers": {"Bad Name": "v"}}, "header"),
        ("not even a dict", "dict"),
    ]
    batch = [good[0]] + [b for b, _ in bad[:10]] + [good[1]] + [b for b, _ in bad[10:]] + \
        [good[2]]
    res = mc.submit(batch)
    assert len(res) == len(batch)
    errors = [r for r in res if not r.accepted]
    assert len(errors) == len(bad)
    bad_iter = iter(bad)
    good_ids = []
    for sub, r in zip(batch, res):
        if any(sub is g for g in good):
            assert r.accepted, r.error
            good_ids += r.ids
            continue
        _, words = next(bad_iter)
        assert not r.accepted
        assert words.lower() in r.error.lower(), (words, r.error)
    assert len({r.error for r in errors}) >= 15   # distinct, specific messages
    wait_for(lambda: all(s["state"] == "delivered" for s in mc.status(good_ids)), 60,
             "the good messages to deliver")
    for i in range(3):
        assert sinks.counts_by_rcpt()[f"good{i}@d1.test"] == 1


def test_cancel_and_scheduled_send(pipeline):
    mc, sinks = pipeline["mc"], pipeline["sinks"]
    later = time.time() + 4
    res = submit_ok(mc, [
        {"sender": "s@origin.test", "recipients": ["sched@d2.test"], "from": "s@origin.test",
         "text": "x", "not_before": later},
        {"sender": "s@origin.test", "recipients": ["cancelme@d2.test"], "from": "s@origin.test",
         "text": "x", "not_before": time.time() + 30},
    ])
    sched, cancel = res[0].ids[0], res[1].ids[0]
    assert mc.status(sched)["state"] == "deferred"
    assert mc.cancel(cancel) == "cancelled"
    assert mc.status(cancel)["state"] == "cancelled"
    wait_for(lambda: mc.status(sched)["state"] == "delivered", 30, "the scheduled message")
    at = [r.at for r in sinks.received if r.rcpt_to == "sched@d2.test"]
    assert len(at) == 1 and at[0] >= later - 0.05
    assert sinks.counts_by_rcpt()["cancelme@d2.test"] == 0
    types = [e["type"] for e in events_for(mc, [cancel])]
    assert types == ["Reception", "AdminBounce"]


def test_idempotency_key_queues_once(pipeline):
    mc = pipeline["mc"]
    m = {"sender": "s@origin.test", "recipients": ["idem@d3.test"], "from": "s@origin.test",
         "text": "x", "idempotency_key": "order-4711"}
    a = mc.submit([m])[0]
    b = mc.submit([m])[0]
    assert a.accepted and b.accepted and b.duplicate and a.ids == b.ids
    wait_for(lambda: mc.status(a.ids[0])["state"] == "delivered", 30, "delivery")
    assert pipeline["sinks"].counts_by_rcpt()["idem@d3.test"] == 1


def test_starttls_opportunistic_and_required(pipeline):
    from cluster.devservers import SmtpSink, self_signed_tls_context
    mc, dns, sinks = pipeline["mc"], pipeline["dns"], pipeline["sinks"]
    tls_sink = SmtpSink("127.0.0.9", sinks.port, tls_context=self_signed_tls_context()).start()
    try:
        dns.add_a("mx.tls.sinks.test", "127.0.0.9")
        dns.add_mx("tls.test", [(10, "mx.tls.sinks.test")])          # opportunistic (default)
        # required, offered, but a self-signed certificate: verification fails, never plain
        dns.add_mx("tlsok.test", [(10, "mx.tls.sinks.test")])
        dns.add_mx("requiretls.test", [(10, "secondary.sinks.test")])  # required, not offered
        rcpts = ["a@tls.test", "b@tlsok.test", "c@requiretls.test", "d@d4.test"]
        res = submit_ok(mc, [{"sender": "s@origin.test", "recipients": [r],
                              "raw": raw_message(i, r)} for i, r in enumerate(rcpts)])
        ids = [r.ids[0] for r in res]
        wait_for(lambda: all(mc.status(i)["state"] == "delivered" for i in ids[:1] + ids[3:]),
                 60, "TLS deliveries")
        got = {r.rcpt_to: r for r in tls_sink.received}
        assert got["a@tls.test"].tls and "b@tlsok.test" not in got
        wait_for(lambda: any(e["id"] == ids[1] and e["type"] == "TransientFailure"
                             for e in mc.events(0, limit=1_000_000)), 30,
                 "the TLS-required site with an unverifiable certificate to defer")
        ev = [e for e in events_for(mc, [ids[1]]) if e["type"] == "TransientFailure"][0]
        assert "certificate verify failed" in ev["text"] and "mx.tls.sinks.test" in ev["text"]
        assert mc.cancel(ids[1]) in ("cancelled", "cancel pending (in flight)")
        plain = [r for r in sinks.received if r.rcpt_to == "d@d4.test"]
        assert len(plain) == 1 and not plain[0].tls     # no STARTTLS offered: plaintext
        wait_for(lambda: any(e["id"] == ids[2] and e["type"] == "TransientFailure"
                             for e in mc.events(0, limit=1_000_000)), 30,
                 "the TLS-required site without STARTTLS to defer")
        ev = [e for e in events_for(mc, [ids[2]]) if e["type"] == "TransientFailure"][0]
        assert "STARTTLS" in ev["text"]
        assert sinks.counts_by_rcpt()["c@requiretls.test"] == 0
        assert mc.cancel(ids[2]) in ("cancelled", "cancel pending (in flight)")
    finally:
        tls_sink.stop()


def test_hot_site_has_its_own_throttle_actor(pipeline):
    import ray
    h = ray.get_actor("throttle:domain:limited.test", namespace="raymta")
    st = ray.get(h.stats.remote())
    assert st["name"] == "throttle:domain:limited.test"
    assert st["sites"]["domain:limited.test"]["max_connections"] == 2
    assert st["sites"]["domain:limited.test"]["granted"] >= 300
    shared = ray.get(ray.get_actor("throttle:pool:0", namespace="raymta").stats.remote())
    assert "domain:limited.test" not in shared["sites"]


def test_metrics_reach_rays_prometheus_endpoint(pipeline):
    """Operators see raymta on the Ray dashboard: the actors' metrics are exported."""
    import urllib.request

    import ray
    port = ray.nodes()[0]["MetricsExportPort"]

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    def delivered(text: str) -> float:
        # Ray prefixes application metrics with "ray_"
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ray_raymta_events_total{") and 'type="Delivery"' in line)

    def ready() -> str | None:
        t = scrape()
        names = ("ray_raymta_events_total", "ray_raymta_delivery_results_total",
                 "ray_raymta_queue_messages", "ray_raymta_replica_lag_seconds",
                 "ray_raymta_replica_lag_records", "ray_raymta_shard_epoch")
        return t if all(n in t for n in names) and delivered(t) >= 5000 else None

    wait_for(ready, 60, "raymta metrics (>= 5000 deliveries) on the Ray metrics endpoint",
             poll=2)


def test_smtp_ingress_queues_durably_and_refuses_bad_mail(pipeline):
    import asyncio
    import socket

    import aiosmtplib

    from cluster.ingress_smtp import SmtpIngress
    mc, sinks = pipeline["mc"], pipeline["sinks"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = raw_message(1, "viasmtp@d5.test")

    async def talk():
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await c.connect()
        await c.ehlo()
        out = {}
        await c.mail("s@origin.test")
        await c.rcpt("viasmtp@d5.test")
        await c.rcpt("second@d6.test")
        out["good"] = await c.data(raw)
        await c.mail("s@origin.test")
        try:
            await c.rcpt("not an address")
        except aiosmtplib.SMTPRecipientRefused as e:
            out["bad_rcpt"] = (e.code, e.message)
        await c.rset()
        await c.mail("s@origin.test")
        await c.rcpt("x@d5.test")
        try:
            await c.data(b"Subject: no From header\r\n\r\nbody\r\n")
        except aiosmtplib.SMTPDataError as e:
            out["bad_data"] = (e.code, e.message)
        await c.quit()
        return out

    with SmtpIngress(mc, "127.0.0.1", port):
        out = asyncio.run(talk())
    code, text = out["good"]
    assert code == 250 and "queued as" in text and "+1 more" in text
    mid = text.split("queued as ")[1].split()[0]
    assert mc.status(mid) is not None          # durable in the queue when 250 was sent
    assert out["bad_rcpt"][0] == 553
    assert out["bad_data"][0] == 554 and "From" in out["bad_data"][1]
    wait_for(lambda: sinks.counts_by_rcpt()["viasmtp@d5.test"] == 1 and
             sinks.counts_by_rcpt()["second@d6.test"] == 1, 30, "SMTP-submitted mail")
    got = [r for r in sinks.received if r.rcpt_to == "viasmtp@d5.test"][0]
    # the message as sent, after the listener's Received field (RFC 5321 §4.4)
    assert got.data.endswith(raw) and got.data.startswith(b"Received: from ")
    assert got.data[:-len(raw)].count(b"Received:") == 1
    assert sinks.counts_by_rcpt()["x@d5.test"] == 0


def test_smtputf8_message_to_an_internationalised_address(pipeline):
    mc, sinks = pipeline["mc"], pipeline["sinks"]
    rcpt = "jos\u00e9@d7.test"
    raw = ("From: Ren\u00e9e <s@origin.test>\r\nTo: " + rcpt + "\r\nSubject: caf\u00e9\r\n"
           "Message-ID: <utf8@origin.test>\r\nDate: Sat, 28 Nov 2026 05:00:00 +0000\r\n\r\n"
           "bonjour\r\n").encode("utf-8")
    res = submit_ok(mc, [{"sender": "s@origin.test", "recipients": [rcpt], "raw": raw,
                          "smtputf8": True}])
    mid = res[0].ids[0]
    wait_for(lambda: mc.status(mid)["state"] == "delivered", 30, "SMTPUTF8 delivery")
    got = [r for r in sinks.received if r.rcpt_to == rcpt]
    assert len(got) == 1 and got[0].data == raw


def test_submit_template_renders_per_recipient_in_the_client(pipeline):
    from cluster.core.message import ValidationError
    mc, sinks, domains = pipeline["mc"], pipeline["sinks"], pipeline["domains"]
    rcpts = [f"tpl{k}@{domains[k]}" for k in range(3)]
    msg = {"from": "News <news@origin.test>", "subject": "Hello {{ name }}",
           "text": "Dear {{ name }},\n{% for i in items %}- {{ i }}\n{% endfor %}",
           "idempotency_key": "tpl-run-1"}
    people = [{"address": r, "variables": {"name": f"P{k}", "items": list(range(k + 1))}}
              for k, r in enumerate(rcpts)]
    # a template that fails for one recipient queues nothing of the message
    with pytest.raises(ValidationError) as e:
        mc.submit_template(msg, people[:2] + [{"address": "x@" + domains[0], "variables": {}}])
    assert e.value.field == "subject" and "line 1" in str(e.value) and "'name'" in str(e.value)
    # a key that leaves no room for ":<n>" is refused for the whole message, not per recipient
    with pytest.raises(ValidationError) as e:
        mc.submit_template({**msg, "idempotency_key": "k" * 199}, people)
    assert e.value.field == "idempotency_key" and "201" in str(e.value)
    res = mc.submit_template(msg, people)
    assert [r.accepted for r in res] == [True] * 3, [r.error for r in res]
    again = mc.submit_template(msg, people)        # the same key per recipient: no new mail
    assert [r.ids for r in again] == [r.ids for r in res] and all(r.duplicate for r in again)
    wait_for(lambda: all(sinks.counts_by_rcpt()[r] >= 1 for r in rcpts), 30,
             "the three rendered messages")
    got = {r.rcpt_to: r.data for r in sinks.received if r.rcpt_to in rcpts}
    for k, r in enumerate(rcpts):
        body = got[r]
        assert f"Subject: Hello P{k}\r\n".encode() in body
        assert f"To: {r}\r\n".encode() in body
        assert body.endswith(f"Dear P{k},\r\n".encode() +
                             b"".join(f"- {i}\r\n".encode() for i in range(k + 1)))
    assert sum(sinks.counts_by_rcpt()[r] for r in rcpts) == 3
