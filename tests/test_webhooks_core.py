"""Webhooks, the pure part (cluster/core/webhooks.py) and its config (``[[webhooks]]``) and
record (``w``): tables of cases."""

from __future__ import annotations

import json

import pytest

from cluster.config import ConfigError, parse_config
from cluster.core import queue as q
from cluster.core.webhooks import (
    EVENT_TYPES,
    CursorBook,
    backoff_delay,
    batch_body,
    event_id,
    resolve_event_names,
    sign,
    verify,
)

SECRET = b"webhook-secret-0123456789"


# ---------------------------------------------------------------------------- signature
@pytest.mark.parametrize("header_of, body, now, ok", [
    (lambda b: sign(SECRET, b, 1000), b'{"a":1}', 1000, True),
    (lambda b: sign(SECRET, b, 1000), b'{"a":1}', 1299, True),       # within 300 s
    (lambda b: sign(SECRET, b, 1000), b'{"a":1}', 1301, False),      # replayed too late
    (lambda b: sign(SECRET, b, 1000), b'{"a":1}', 699, False),       # from the future
    (lambda b: sign(SECRET, b + b" ", 1000), b'{"a":1}', 1000, False),   # body changed
    (lambda b: sign(b"another-secret-0123456", b, 1000), b'{"a":1}', 1000, False),
    (lambda b: sign(SECRET, b, 1000).replace("t=1000", "t=1001"), b'{"a":1}', 1000, False),
    (lambda b: "v1=" + sign(SECRET, b, 1000).split("v1=")[1], b'{"a":1}', 1000, False),  # no t
    (lambda b: "garbage", b'{"a":1}', 1000, False),
    (lambda b: "", b"", 1000, False),
])
def test_signature_verifies_only_the_body_and_time_it_signed(header_of, body, now, ok):
    assert verify([b"old-secret-0123456789", SECRET], header_of(body), body, now) is ok


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    import hashlib
    import hmac
    h = sign(SECRET, b"xyz", 1700000000)
    assert h == "t=1700000000,v1=" + hmac.new(SECRET, b"1700000000.xyz",
                                              hashlib.sha256).hexdigest()
    assert SECRET.decode() not in h


# ---------------------------------------------------------------------------- backoff
@pytest.mark.parametrize("attempt, rand, jitter, want", [
    (1, 0.5, 0.2, 10.0), (2, 0.5, 0.2, 20.0), (3, 0.5, 0.2, 40.0), (8, 0.5, 0.2, 1280.0),
    (9, 0.5, 0.2, 1800.0), (200, 0.5, 0.2, 1800.0),          # capped, no overflow
    (1, 0.0, 0.2, 8.0), (1, 0.999999, 0.2, 12.0),            # +-20 %
    (9, 0.999999, 0.2, 1800.0),                              # jitter never passes the cap
    (3, 0.0, 0.0, 40.0),
])
def test_backoff_doubles_with_jitter_up_to_the_cap(attempt, rand, jitter, want):
    assert backoff_delay(attempt, 10.0, 1800.0, rand, jitter) == pytest.approx(want, rel=1e-5)


def test_default_schedule_retries_for_at_least_eight_hours():
    from cluster.core.webhooks import WebhookEndpoint
    ep = WebhookEndpoint("x", "https://h.test/", b"s" * 16)
    assert ep.retry_for >= 8 * 3600
    t, n = 0.0, 0
    while t < ep.retry_for:    # worst case: every delay at its shortest
        n += 1
        t += backoff_delay(n, ep.retry_initial, ep.retry_max_delay, 0.0, ep.jitter)
    assert 10 < n < 40       # many tries over the 8 hours, not a handful, not thousands


def test_backoff_refuses_attempt_zero():
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(0, 1, 2, 0.5)


# ---------------------------------------------------------------------------- events
@pytest.mark.parametrize("names, want", [
    ([], EVENT_TYPES),
    (["delivered"], {"Delivery"}),
    (["bounced", "expired"], {"Bounce", "OOBBounce", "Expiration"}),
    (["deferred", "transient"], {"TransientFailure"}),
    (["complaint", "suppressed", "unsubscribed"], {"Complaint", "Suppressed", "Suppression"}),
    (["Delivery", "AdminBounce"], {"Delivery", "AdminBounce"}),
])
def test_event_names_resolve_to_types(names, want):
    assert resolve_event_names(names) == frozenset(want)


def test_unknown_event_name_is_named():
    with pytest.raises(ValueError, match="'delivred'"):
        resolve_event_names(["delivered", "delivred"])


def test_batch_body_gives_each_event_its_shard_and_id():
    body = json.loads(batch_body("crm", 3, [{"seq": 7, "type": "Delivery", "id": "01MSG"}]))
    assert body["webhook"] == "crm" and body["shard"] == 3
    assert body["events"][0]["event_id"] == event_id(3, 7) == "3:7"
    assert body["events"][0]["id"] == "01MSG"     # the message's id, as in the events API
    assert body["events"][0]["seq"] == 7 and body["events"][0]["type"] == "Delivery"


# ---------------------------------------------------------------------------- cursor book
def _evs(*spec: tuple[int, str]) -> list[dict]:
    return [{"seq": s, "type": t, "ts": 100.0 + s} for s, t in spec]


def _book(acked: int = 0, pending: int = 100) -> CursorBook:
    return CursorBook(acked, lambda ev: ev["type"] == "Delivery", max_pending=pending)


def test_batches_cover_contiguous_ranges_and_skip_unselected_events():
    b = _book(10)
    assert b.feed(_evs((11, "Reception"), (12, "Delivery"), (13, "Reception"),
                       (14, "Delivery"), (15, "Delivery"), (16, "Reception"))) == 3
    x = b.take(2)
    y = b.take(2)
    assert (x.lo, x.hi, [e["seq"] for e in x.events]) == (10, 14, [12, 14])
    assert (y.lo, y.hi, [e["seq"] for e in y.events]) == (14, 16, [15])
    assert b.take(2) is None
    assert b.backlog() == 3


@pytest.mark.parametrize("acked_batches, want", [
    ([], 10), ([0], 14), ([1], 10), ([0, 1], 16), ([1, 0], 16),
])
def test_committable_cursor_is_the_end_of_the_acknowledged_prefix(acked_batches, want):
    b = _book(10)
    b.feed(_evs((11, "Reception"), (12, "Delivery"), (13, "Reception"),
                (14, "Delivery"), (15, "Delivery"), (16, "Reception")))
    batches = [b.take(2), b.take(2)]
    for i in acked_batches:
        b.acknowledge(batches[i])
    assert b.committable() == want


def test_committed_cursor_drops_covered_batches_and_never_goes_back():
    b = _book(0)
    b.feed(_evs((1, "Delivery"), (2, "Delivery")))
    x = b.take(1)
    b.acknowledge(x)
    b.committed(b.committable())
    assert b.acked == 1 and b.out == [] and b.backlog() == 1
    b.committed(0)
    assert b.acked == 1


def test_only_unselected_events_move_the_cursor_with_an_empty_batch():
    b = _book(5)
    b.feed(_evs((6, "Reception"), (7, "Reception")))
    e = b.take(10)
    assert e is not None and e.events == [] and e.done and (e.lo, e.hi) == (5, 7)
    assert b.committable() == 7 and b.backlog() == 0


def test_repeated_reads_are_ignored_and_the_buffer_is_bounded():
    b = _book(0, pending=3)
    b.feed(_evs((1, "Delivery"), (2, "Delivery")))
    assert b.feed(_evs((1, "Delivery"), (2, "Delivery"), (3, "Delivery"))) == 1
    assert b.room() == 0 and len(b.pending) == 3


def test_given_up_batch_counts_and_lets_the_cursor_pass():
    b = _book(0)
    b.feed(_evs((1, "Delivery"), (2, "Delivery")))
    x = b.take(1)
    y = b.take(1)
    b.acknowledge(y)
    assert b.committable() == 0      # x still out: the cursor waits for it
    b.give_up(x)
    assert b.committable() == 2 and b.given_up == 1


def test_reset_reads_again_from_the_durable_cursor():
    b = _book(4)
    b.feed(_evs((5, "Delivery"), (6, "Delivery")))
    b.take(1)
    b.reset()
    assert (b.read, b.backlog(), b.out) == (4, 0, [])
    assert b.oldest_ts() is None


# ---------------------------------------------------------------------------- the w record
def test_webhook_record_is_durable_state_that_never_goes_back():
    st = q.QueueState()
    assert st.apply(q.webhook_record("crm", 0, 1.0), 1) is None
    st.apply(q.webhook_record("crm", 7, 2.0), 2)
    st.apply(q.webhook_record("crm", 5, 3.0), 3)      # an older dispatcher's late ack
    st.apply(q.webhook_record("erp", 2, 3.0), 4)
    assert st.webhook_cursors == {"crm": 7, "erp": 2}
    again = q.QueueState()
    again.restore(st.snapshot())
    assert again.webhook_cursors == {"crm": 7, "erp": 2} and again.last_lsn == 4


@pytest.mark.parametrize("rec", [
    ["w", "", 3, 1.0], ["w", None, 3, 1.0], ["w", "crm", -1, 1.0], ["w", "crm", "3", 1.0],
    ["w", "crm", 3.5, 1.0], ["w", "crm", 3], ["w", "crm", 3, "now"],
])
def test_bad_webhook_records_are_quarantined(rec):
    st = q.QueueState()
    assert st.apply_or_quarantine(rec, 1) is None
    assert st.counters_quarantined == 1 and st.webhook_cursors == {} and st.last_lsn == 1


# ---------------------------------------------------------------------------- config
_OK = {"name": "crm", "url": "https://hooks.example/raymta", "secret": "s" * 32}


@pytest.mark.parametrize("change, key", [
    ({"url": "ftp://hooks.example/"}, "webhooks[0].url"),
    ({"url": "https:///nohost"}, "webhooks[0].url"),
    ({"secret": "short"}, "webhooks[0].secret"),
    ({"events": ["delivered", "nope"]}, "webhooks[0].events"),
    ({"events": "delivered"}, "webhooks[0].events"),
    ({"batch_size": 0}, "webhooks[0].batch_size"),
    ({"batch_size": 5000}, "webhooks[0].batch_size"),
    ({"concurrency": 0}, "webhooks[0].concurrency"),
    ({"retry_initial": "10m", "retry_max_delay": "1m"}, "webhooks[0].retry_max_delay"),
    ({"retry_for": "0s"}, "webhooks[0].retry_for"),
    ({"jitter": 1.5}, "webhooks[0].jitter"),
    ({"name": "has space"}, "webhooks[0].name"),
    ({"colour": "red"}, "webhooks[0].colour"),
    ({"secret_file": "/nonexistent/secret"}, "webhooks[0].secret"),
])
def test_bad_webhook_config_names_the_field(change, key):
    with pytest.raises(ConfigError) as e:
        parse_config({"webhooks": [{**_OK, **change}]})
    assert e.value.key == key
    assert "s" * 32 not in str(e.value)


def test_webhook_config_parses_and_hides_its_secret(tmp_path):
    (tmp_path / "hook.secret").write_text("f" * 40 + "\n")
    cfg = parse_config({"webhooks": [
        {**_OK, "events": ["delivered", "bounced"], "retry_initial": "100ms",
         "retry_max_delay": "1s", "retry_for": "30s", "concurrency": 2},
        {"name": "erp", "url": "http://127.0.0.1:8080/h", "secret_file": "hook.secret"}]},
        base=tmp_path)
    a, b = cfg.webhooks
    assert a.events == {"Delivery", "Bounce", "OOBBounce"} and a.retry_initial == 0.1
    assert (a.retry_max_delay, a.retry_for, a.concurrency) == (1.0, 30.0, 2)
    assert b.secret == b"f" * 40 and b.events == EVENT_TYPES and b.retry_for == 8 * 3600
    assert "s" * 32 not in repr(cfg) and "f" * 40 not in repr(cfg)
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config({"webhooks": [_OK, _OK]})
