"""Bounce intake without Ray: the ``[bounce]`` config, the VERP return path at send time, RCPT
verdicts, claims and decisions (cluster.core.bounce_intake) as tables, and the listener's SMTP
server (cluster.adapters.bounce_smtp) on loopback with fake shards: 250 only once recorded,
451 when a shard cannot be reached, 550 for a forged tag, 552 for an oversized report."""

from __future__ import annotations

import asyncio
import smtplib
import socket
from typing import Any

import pytest

from cluster.config import ConfigError, parse_config
from cluster.core.bounce_intake import Claim, check_rcpt, claims, decide
from cluster.core.dsn import parse_message
from cluster.core.verp import VerpKeys, encode, return_path

MID = "01JDXK5Q7Z8YB6V3N2M1P0QRST"
OTHER = "01JDXK5Q7Z8YB6V3N2M1P0QRSV"
KEYS = VerpKeys("k2", {"k2": b"s" * 32, "k1": b"t" * 32})
ARGS = {"prefix": "b", "domain": "bounce.example.com"}
SECRET = "do-not-print-me-0123456789"


# ---------------------------------------------------------------------------------- config

def test_bounce_config_first_key_signs_all_verify_and_secrets_stay_out_of_reprs(tmp_path):
    f = tmp_path / "verp.keys"
    f.write_text("# id secret\nk3 " + "z" * 24 + "\n")
    c = parse_config({"bounce": {"domain": "Bounce.Example.com.", "keys": [
        {"id": "k2", "secret": SECRET}, {"id": "k1", "secret": "y" * 20}],
        "key_file": str(f), "fbl_address": "FBL@bounce.example.com",
        "listen_host": "127.0.0.9", "listen_port": 2600, "max_message_size": "2MB"}}).bounce
    assert c.enabled and c.domain == "bounce.example.com" and c.prefix == "b"
    assert c.keys is not None and c.keys.current == "k2" and set(c.keys.keys) == {"k1", "k2",
                                                                                  "k3"}
    assert (c.fbl_address, c.listen_port, c.max_message_size) == (
        "fbl@bounce.example.com", 2600, 2_000_000)
    assert SECRET not in repr(c) and SECRET not in repr(parse_config({"bounce": {
        "domain": "b.example.com", "keys": [{"id": "k2", "secret": SECRET}]}}))
    assert not parse_config({}).bounce.enabled


@pytest.mark.parametrize("raw,key", [
    ({"keys": [{"id": "k1", "secret": "x" * 32}]}, "bounce.domain"),
    ({"domain": "b.example.com"}, "bounce.keys"),
    ({"domain": "b.example.com", "keys": [{"id": "k1", "secret": SECRET[:10]}]},
     "bounce.keys[0].secret"),
    ({"domain": "b.example.com", "keys": [{"id": "K_1!", "secret": SECRET}]}, "bounce.keys"),
    ({"domain": "b.example.com", "keys": [{"id": "k1", "secret": SECRET},
                                          {"id": "k1", "secret": SECRET}]}, "bounce.keys"),
    ({"domain": "b.example.com", "keys": [{"id": "k1", "secret": SECRET}],
      "prefix": "bad prefix"}, "bounce.prefix"),
    ({"domain": "b.example.com", "keys": [{"id": "k1", "secret": SECRET}],
      "listen_host": "localhost"}, "bounce.listen_host"),
    ({"domain": "b.example.com", "key_file": "/nonexistent/verp.keys"}, "bounce.key_file"),
    ({"domain": "b.example.com", "keys": [{"id": "k1", "secret": SECRET}], "colour": 1},
     "bounce.colour"),
])
def test_bad_bounce_config_names_the_key_never_the_secret(raw, key):
    with pytest.raises(ConfigError) as e:
        parse_config({"bounce": raw})
    assert e.value.key == key, str(e.value)
    assert SECRET not in str(e.value) and SECRET[:10] not in str(e.value)


# ----------------------------------------------------------------------- return path, RCPT

@pytest.mark.parametrize("sender,verp", [
    ("news@origin.test", True), ("", False), ("<>", False)])
def test_return_path_is_verp_except_for_the_null_sender(sender, verp):
    rp = return_path(sender, MID, KEYS, **ARGS)
    if not verp:
        assert rp == ""
        return
    assert rp == encode(MID, KEYS, **ARGS) and rp.startswith("b-k2")
    r = check_rcpt(rp, KEYS, **ARGS)
    assert (r.kind, r.message_id) == ("verp", MID)


GOOD = encode(MID, KEYS, **ARGS)
OLDKEY = encode(MID, VerpKeys("k1", {"k1": b"t" * 32}), **ARGS)
RCPT_CASES = [
    # (address, fbl, kind, reason fragment)
    (GOOD, "", "verp", ""),
    (f"<{GOOD.upper()}>", "", "verp", ""),
    (OLDKEY, "", "verp", ""),                                    # a rotated-out signer
    (GOOD.replace(MID.lower(), OTHER.lower()), "", "refuse", "bad tag"),   # altered id
    (GOOD[:6] + ("a" if GOOD[6] != "a" else "b") + GOOD[7:], "", "refuse", "bad tag"),
    (encode(MID, VerpKeys("k9", {"k9": b"u" * 32}), **ARGS), "", "refuse", "unknown key"),
    (GOOD.replace("bounce.example.com", "evil.test"), "", "refuse", "wrong domain"),
    ("postmaster@bounce.example.com", "", "refuse", "malformed"),
    ("fbl@bounce.example.com", "fbl@bounce.example.com", "fbl", ""),
    ("FBL@Bounce.Example.com", "fbl@bounce.example.com", "fbl", ""),
    ("fbl@bounce.example.com", "", "refuse", "malformed"),
]


@pytest.mark.parametrize("address,fbl,kind,why", RCPT_CASES)
def test_rcpt_verdicts(address, fbl, kind, why):
    v = check_rcpt(address, KEYS, fbl_address=fbl, **ARGS)
    assert v.kind == kind and why in v.reason


# ------------------------------------------------------------------------ claims, decisions

def _dsn(rcpt: str, status: str, diag: str, action: str = "failed") -> bytes:
    return (
        "From: MAILER-DAEMON@mx.remote.test\r\nTo: <" + GOOD + ">\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.remote.test"
        f"\r\n\r\nFinal-Recipient: rfc822; {rcpt}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diag}\r\n--B--\r\n").encode()


def _arf(rcpt: str, mail_from: str) -> bytes:
    return (
        "From: fbl@isp.test\r\nTo: fbl@bounce.example.com\r\nSubject: FW: complaint\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\r\n\r\n'
        "--A\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
        "--A\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
        "User-Agent: ISP-FBL/1.0\r\nVersion: 1\r\n"
        f"Original-Mail-From: <{mail_from}>\r\nOriginal-Rcpt-To: <{rcpt}>\r\n"
        "--A\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: news@origin.test\r\n"
        f"To: {rcpt}\r\nSubject: hello\r\n--A--\r\n").encode()


HARD = parse_message(_dsn("ann@x.test", "5.1.1", "550 5.1.1 <ann@x.test>: User unknown"))
SOFT = parse_message(_dsn("ann@x.test", "4.2.2", "452 4.2.2 mailbox full", "delayed"))
QUOTA = parse_message(_dsn("ann@x.test", "5.2.2", "552 5.2.2 mailbox full"))
OK = parse_message(_dsn("ann@x.test", "2.0.0", "250 ok", "delivered"))
ARF = parse_message(_arf("ann@x.test", GOOD))
ARF_UNSIGNED = parse_message(_arf("ann@x.test", "news@origin.test"))
AUTO = parse_message(b"From: ann@x.test\r\nTo: x@y.test\r\nSubject: Out of office\r\n"
                     b"Auto-Submitted: auto-replied\r\n\r\nI am away.\r\n")
BROKEN = parse_message(b"From: someone@x.test\r\nSubject: hi\r\n\r\n\xff\xfe garbage")
VERP_RCPT = [check_rcpt(GOOD, KEYS, **ARGS)]
FBL_RCPT = [check_rcpt("fbl@b.test", KEYS, fbl_address="fbl@b.test", **ARGS)]
VERIFIED = Claim(MID, True, "VERP recipient")
UNVERIFIED = Claim(MID, False, "field")

DECISIONS = [
    # (name, report, claim, message's recipient, kind or None, class, category, reason)
    ("hard bounce", HARD, VERIFIED, "ann@x.test", "bounce", "hard", "invalid-recipient", ""),
    ("the message's recipient, not the report's", HARD, VERIFIED, "bob@x.test", "bounce",
     "hard", "invalid-recipient", ""),
    ("delay notice never suppresses", SOFT, VERIFIED, "ann@x.test", "bounce", "soft", None, ""),
    ("quota is soft", QUOTA, VERIFIED, "ann@x.test", "bounce", "soft", "quota", ""),
    ("success notice", OK, VERIFIED, "ann@x.test", None, None, None, "success"),
    ("complaint", ARF, VERIFIED, "ann@x.test", "complaint", None, None, ""),
    ("unknown id", HARD, VERIFIED, None, None, None, None, "unknown message id"),
    ("unverified id, recipient named", HARD, UNVERIFIED, "ann@x.test", "bounce", "hard",
     "invalid-recipient", ""),
    ("unverified id, another recipient", HARD, UNVERIFIED, "bob@x.test", None, None, None,
     "does not name"),
    ("auto-reply", AUTO, VERIFIED, "ann@x.test", None, None, None, "auto-reply"),
    ("garbage", BROKEN, VERIFIED, "ann@x.test", None, None, None, "not a bounce"),
    ("no claim", HARD, None, None, None, None, None, "names no message"),
]


@pytest.mark.parametrize("name,report,claim,rcpt,kind,klass,category,why", DECISIONS,
                         ids=[d[0] for d in DECISIONS])
def test_decisions(name, report, claim, rcpt, kind, klass, category, why):
    d = decide(report, claim, rcpt)
    assert why in d.reason
    if kind is None:
        assert d.item is None
        return
    assert d.item is not None and d.item["kind"] == kind and d.item["id"] == MID
    assert d.item["recipient"] == rcpt and d.item["class"] == klass
    if category is not None:
        assert d.item["category"] == category
    assert set(d.item) >= {"kind", "id", "recipient", "category", "class", "status",
                           "diagnostic", "feedback_type", "reporter"}
    if kind == "complaint":
        assert d.item["feedback_type"] == "abuse" and d.item["reporter"] == "ISP-FBL/1.0"
    if klass == "soft":
        assert d.item["category"] not in ("invalid-recipient", "inactive-mailbox", "bad-domain")


@pytest.mark.parametrize("report,verdicts,want", [
    (HARD, VERP_RCPT, [(MID, True)]),
    (ARF, FBL_RCPT, [(MID, True)]),                # Original-Mail-From is our VERP address
    (ARF_UNSIGNED, FBL_RCPT, []),                  # nothing of ours named
    (parse_message(_dsn("a@x.test", "5.1.1", "550 5.1.1 unknown").replace(
        b"Reporting-MTA", b"Original-Envelope-Id: " + OTHER.encode() + b"\r\nReporting-MTA")),
     FBL_RCPT, [(OTHER, False)]),                  # an id field: unverified
])
def test_claims(report, verdicts, want):
    got = claims(report, verdicts, KEYS, **ARGS)
    assert [(c.message_id, c.verified) for c in got] == want


# ------------------------------------------------------------------ the SMTP server, no Ray

HOST = "127.0.0.61"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class FakeShards:
    def __init__(self) -> None:
        self.known = {MID: "ann@x.test"}
        self.recorded: list[dict[str, Any]] = []
        self.down = False

    async def lookup(self, ids: list[str]) -> dict[str, str | None]:
        if self.down:
            raise ConnectionError("shard unreachable")
        return {i: self.known.get(i) for i in ids}

    async def record(self, items: list[dict[str, Any]]) -> None:
        await asyncio.sleep(0.05)
        if self.down:
            raise ConnectionError("shard unreachable")
        self.recorded.extend(items)


@pytest.fixture()
def server():
    from cluster.adapters.bounce_smtp import BounceServer
    shards = FakeShards()
    port = _free_port(HOST)
    srv = BounceServer(keys=KEYS, fbl_address="fbl@bounce.example.com", lookup=shards.lookup,
                       record=shards.record, host=HOST, port=port, max_size=200_000,
                       timeout=5, **ARGS).start()
    try:
        yield srv, shards
    finally:
        srv.stop()


def _send(port: int, rcpt: str, data: bytes, *, size: int | None = None) -> tuple[str, int, str]:
    with smtplib.SMTP(HOST, port, timeout=30) as s:
        s.ehlo("mx.remote.test")
        code, msg = s.mail("", [f"SIZE={size}"] if size else [])
        if code != 250:
            return "mail", code, msg.decode()
        code, msg = s.rcpt(rcpt)
        if code != 250:
            return "rcpt", code, msg.decode()
        try:
            code, msg = s.data(data)
        except smtplib.SMTPDataError as e:
            return "data", e.smtp_code, e.smtp_error.decode()
        return "data", code, msg.decode()


def test_server_answers_250_after_recording_451_when_the_shard_is_down(server):
    srv, shards = server
    hard = _dsn("ann@x.test", "5.1.1", "550 5.1.1 <ann@x.test>: User unknown")
    step, code, text = _send(srv.port, GOOD, hard)
    assert (step, code) == ("data", 250) and "recorded" in text and "hard bounce" in text
    assert [(i["kind"], i["id"], i["category"]) for i in shards.recorded] == [
        ("bounce", MID, "invalid-recipient")]
    shards.down = True
    assert _send(srv.port, GOOD, hard)[:2] == ("data", 451)
    assert len(shards.recorded) == 1
    shards.down = False
    # a forged tag never reaches DATA; an oversized report is refused, declared or not
    forged = GOOD.replace(MID.lower(), OTHER.lower())
    assert _send(srv.port, forged, hard)[:2] == ("rcpt", 550)
    assert _send(srv.port, GOOD, hard, size=300_000)[:2] == ("mail", 552)
    big = hard + (b"X" * 76 + b"\r\n") * 3500     # 273 kB in lines of 78
    assert _send(srv.port, GOOD, big)[:2] == ("data", 552)
    # auto-replies and garbage: 250, nothing recorded
    auto = b"From: a@x.test\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\nx\r\n"
    step, code, text = _send(srv.port, GOOD, auto)
    assert code == 250 and "nothing recorded" in text and "auto-reply" in text
    assert len(shards.recorded) == 1
    assert srv.counters["rcpt_refused"] == 1 and srv.counters["deferred"] == 1
