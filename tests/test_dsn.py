"""Bounce, complaint and auto-reply parsing (cluster.core.dsn, cluster.core.arf): tables of
messages in the formats MTAs send, and bad input that must never raise."""

from __future__ import annotations

import pytest

from cluster.core.arf import parse_fields
from cluster.core.bounce_intake import Claim, decide
from cluster.core.dsn import CONTRACT_KEYS, KINDS, contract, parse_message

ULID = "01JDXK5Q7Z8YB6V3N2M1P0QRST"

RFC3464 = f"""From: Mail Delivery System <MAILER-DAEMON@mx.example.org>
To: b-k1abcdefghij-{ULID.lower()}@bounce.example.com
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

The mail system could not deliver your message.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
Original-Envelope-Id: {ULID}
Arrival-Date: Thu, 29 Apr 2026 23:34:45 +0000

Final-Recipient: rfc822; alice@example.net
Original-Recipient: rfc822;Alice@Example.NET
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx1.example.net
Diagnostic-Code: smtp; 550 5.1.1 <alice@example.net>: Recipient address rejected:
 User unknown in local recipient table

Final-Recipient: rfc822; bob@example.net
Action: delayed
Status: 4.2.2
Diagnostic-Code: smtp; 452 4.2.2 Mailbox full

--B
Content-Type: text/rfc822-headers

From: sender@example.com
To: alice@example.net
Message-ID: <orig-1@example.com>
Subject: hello

--B--
""".encode()

QMAIL = b"""From: MAILER-DAEMON@mail.example.org
To: sender@example.com
Subject: failure notice

Hi. This is the qmail-send program at mail.example.org.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<carol@example.net>:
192.0.2.25 does not like recipient.
Remote host said: 552 5.2.2 <carol@example.net>: Mailbox full
Giving up on 192.0.2.25.

--- Below this line is a copy of the message.

From: sender@example.com
To: carol@example.net
Message-ID: <orig-2@example.com>
Subject: hi

body
"""

EXIM = b"""From: Mail Delivery System <Mailer-Daemon@mx.example.org>
To: sender@example.com
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: dave@example.net
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  dave@example.net
    host mx.example.net [192.0.2.20]
    SMTP error from remote mail server after MAIL FROM:<sender@example.com> SIZE=1543:
    550 5.7.1 Service unavailable; client host blocked using zen.spamhaus.org

------ This is a copy of the message, including all the headers. ------

Message-Id: <orig-3@example.com>
From: sender@example.com
"""

POSTFIX_TEXT = b"""From: MAILER-DAEMON (Mail Delivery System)
To: sender@example.com
Subject: Undelivered Mail Returned to Sender

This is the mail system at host mail.example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

                   The mail system

<erin@example.net>: host mx.example.net[192.0.2.22] said: 550-5.7.26 This mail
    has been blocked because the sender is unauthenticated. 550 5.7.26 Gmail
    requires all senders to authenticate with either SPF or DKIM. (in reply to
    end of DATA command)
"""

EXCHANGE = b"""From: postmaster@outlook.example
To: sender@example.com
Subject: Undeliverable: hello
Content-Type: text/plain

Delivery has failed to these recipients or distribution lists:

Frank<mailto:frank@example.net>
The recipient's e-mail address was not found in the recipient's e-mail system.

Diagnostic information for administrators:

Generating server: mta4.example.org

frank@example.net
#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##

Original message headers:

Message-ID: <orig-4@example.com>
From: sender@example.com
"""

GMAIL = b"""From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: sender@example.com
Subject: Delivery Status Notification (Failure)
X-Failed-Recipients: ivan@example.net

Delivery to the following recipient failed permanently:

     ivan@example.net

Technical details of permanent failure:
Google tried to deliver your message, but it was rejected by the server for the recipient
domain example.net by mx.example.net. [192.0.2.1].

The error that the other server returned was:
552-5.2.2 The email account that you tried to reach is over quota. Please direct
552-5.2.2 the recipient to https://support.google.com/mail/?p=OverQuotaPerm
552 5.2.2 gsmtp

----- Original message -----

Message-ID: <orig-7@example.com>
"""

YAHOO = b"""From: MAILER-DAEMON@yahoo.example
To: sender@example.com
Subject: Failure Notice

Sorry, we were unable to deliver your message to the following address.

<judy@example.net>:
Remote host said: 554 delivery error: dd This user doesn't have a example.net account
(judy@example.net) [0] - mta1.mail.example.net [RCPT_TO]

--- Below this line is a copy of the message.

Message-ID: <orig-8@example.com>
"""

AUTOREPLY = b"""From: grace@example.net
To: sender@example.com
Subject: Out of Office: hello
Auto-Submitted: auto-replied
In-Reply-To: <orig-5@example.com>

I am out of the office until Monday.
"""

ARF = b"""From: <abuse@isp.example>
To: <fbl@bounce.example.com>
Subject: FW: hello
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="F"

--F
Content-Type: text/plain

This is an email abuse report.

--F
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <sender@example.com>
Original-Rcpt-To: <heidi@example.net>
Source-IP: 192.0.2.1
Reported-Domain: example.com
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT
Reporting-MTA: dns; mail.isp.example

--F
Content-Type: message/rfc822

From: sender@example.com
To: heidi@example.net
Message-ID: <orig-6@example.com>
X-Raymta-Id: {ULID}

spam
--F--
""".replace(b"{ULID}", ULID.encode())

BOUNCE_OF_BOUNCE = b"""From: MAILER-DAEMON@mx.example.org
To: MAILER-DAEMON@other.example
Subject: Undelivered Mail Returned to Sender
Content-Type: multipart/report; report-type=delivery-status; boundary="X"

--X
Content-Type: text/plain

Could not deliver.

--X
Content-Type: message/rfc822

From: MAILER-DAEMON@other.example
Subject: Undelivered Mail Returned to Sender
Content-Type: multipart/report; report-type=delivery-status; boundary="Y"

--Y--
--X--
"""

CASES = [
    # (name, raw, kind, recipient, action, status, category, class)
    ("rfc3464", RFC3464, "dsn", "alice@example.net", "failed", "5.1.1", "invalid-recipient",
     "hard"),
    ("qmail", QMAIL, "dsn", "carol@example.net", "failed", "5.2.2", "quota", "soft"),
    # a refusal of MAIL FROM is about our sender, even when the recipient is listed
    ("exim", EXIM, "dsn", "dave@example.net", "failed", "5.7.1", "spam-block", "block"),
    ("postfix without DSN", POSTFIX_TEXT, "dsn", "erin@example.net", "failed", "5.7.26",
     "auth-failure", "block"),
    ("exchange", EXCHANGE, "dsn", "frank@example.net", "failed", "5.1.1", "invalid-recipient",
     "hard"),
    ("gmail", GMAIL, "dsn", "ivan@example.net", "failed", "5.2.2", "quota", "soft"),
    ("yahoo", YAHOO, "dsn", "judy@example.net", "failed", None, "invalid-recipient", "hard"),
    ("autoreply", AUTOREPLY, "autoreply", None, None, None, None, None),
    ("arf", ARF, "arf", "heidi@example.net", None, None, None, None),
]


@pytest.mark.parametrize("name, raw, kind, rcpt, action, status, category, klass", CASES,
                         ids=[c[0] for c in CASES])
def test_formats_give_kind_recipient_status_and_classification(name, raw, kind, rcpt, action,
                                                               status, category, klass):
    r = contract(parse_message(raw), name)
    assert (r["kind"], r["recipient"], r["action"], r["status"], r["category"], r["class"]) == \
        (kind, rcpt, action, status, category, klass), r


def test_rfc3464_fields_per_recipient_and_ties_to_our_message():
    r = parse_message(RFC3464)
    assert (r.kind, r.reason, r.reporting_mta) == ("dsn", "rfc3464", "mx.example.org")
    a, b = r.recipients
    assert (a.original_recipient, a.remote_mta, a.reply_code) == \
        ("Alice@Example.NET", "mx1.example.net", 550)
    assert a.diagnostic == ("550 5.1.1 <alice@example.net>: Recipient address rejected: User "
                            "unknown in local recipient table")
    assert (b.recipient, b.action, b.status, b.category, b.bounce_class) == \
        ("bob@example.net", "delayed", "4.2.2", "quota", "soft")
    assert r.original_message_id == "<orig-1@example.com>"
    assert r.raymta_id == ULID                   # RFC 3461 ENVID


@pytest.mark.parametrize("raw, msgid", [
    (QMAIL, "<orig-2@example.com>"), (EXIM, "<orig-3@example.com>"),
    (EXCHANGE, "<orig-4@example.com>"), (ARF, "<orig-6@example.com>"),
    (GMAIL, "<orig-7@example.com>"), (YAHOO, "<orig-8@example.com>"),
])
def test_the_returned_message_id_is_found(raw, msgid):
    assert parse_message(raw).original_message_id == msgid


def test_raymta_id_from_the_verp_address_and_from_the_returned_headers():
    verp = QMAIL.replace(b"To: sender@example.com",
                         f"To: b-k1abcdefghij-{ULID.lower()}@bounce.example.com".encode())
    assert parse_message(verp).raymta_id == ULID
    assert parse_message(QMAIL).raymta_id is None
    assert parse_message(ARF).raymta_id == ULID


def test_arf_fields():
    f = parse_message(ARF).feedback
    assert f is not None
    assert (f.feedback_type, f.user_agent, f.version, f.source_ip, f.original_mail_from,
            f.original_rcpt_to, f.reported_domain, f.arrival_date, f.reporting_mta) == \
        ("abuse", "SomeGenerator/1.0", "1", "192.0.2.1", "<sender@example.com>",
         ("heidi@example.net",), ("example.com",), "Thu, 8 Mar 2005 14:00:00 EDT",
         "dns; mail.isp.example")


def test_arf_without_original_rcpt_to_takes_the_attached_to():
    raw = ARF.replace(b"Original-Rcpt-To: <heidi@example.net>\n", b"")
    f = parse_message(raw).feedback
    assert f is not None and f.original_rcpt_to == () and f.original_recipient == \
        "heidi@example.net"


def test_parse_fields_unfolds_and_skips_junk():
    assert parse_fields("A: 1\n  2\njunk line\nB-C:3\n") == [("a", "1 2"), ("b-c", "3")]


BIG = RFC3464.replace(b"--B--", b"--B\nContent-Type: application/octet-stream\n\n"
                      + b"A" * (3 << 20) + b"\n--B--")

BAD = [
    ("empty", b"", "empty message"),
    ("not a message", b"\x00\x01\x02 binary garbage \xff\xfe", "not a message"),
    ("plain mail", b"From: a@example.com\nSubject: hi\n\nhello\n", "not a delivery report"),
    ("report without recipients", (b"From: MAILER-DAEMON@x.example\nSubject: failure notice\n"
                                   b"\nsomething went wrong\n"), "without any recipient"),
    ("not bytes", "a str", "not bytes"),
]


@pytest.mark.parametrize("name, raw, reason", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_unknown_with_a_reason(name, raw, reason):
    r = parse_message(raw)
    assert r.kind == "unknown" and reason in r.reason, r


def test_a_bounce_of_a_bounce_is_read_but_marked_as_a_loop():
    # the outer report's recipient fields are read (parse-bounce shows them), the report is
    # marked, and the intake records nothing from it
    status = (b"--X\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; "
              b"mx.example.org\n\nFinal-Recipient: rfc822; postmaster@other.example\n"
              b"Action: failed\nStatus: 5.1.1\nDiagnostic-Code: smtp; 550 5.1.1 User unknown"
              b"\n\n--X\nContent-Type: message/rfc822")
    raw = BOUNCE_OF_BOUNCE.replace(b"--X\nContent-Type: message/rfc822", status, 1)
    r = parse_message(raw)
    assert r.kind == "dsn" and r.loop and "bounce of a bounce" in r.reason, r
    assert r.first is not None and (r.first.recipient, r.first.category, r.first.bounce_class) \
        == ("postmaster@other.example", "invalid-recipient", "hard")
    d = decide(r, Claim("01JDXK5Q7Z8YB6V3N2M1P0QRST", True, "verp"), "postmaster@other.example")
    assert d.item is None and "bounce of a bounce" in d.reason and "nothing recorded" in d.reason
    # without a recipient it stays unknown, and still says why it is not acted on
    r = parse_message(BOUNCE_OF_BOUNCE)
    assert r.kind == "unknown" and r.loop and "bounce of a bounce" in r.reason, r
    plain = parse_message(RFC3464)
    assert not plain.loop and "bounce of a bounce" not in plain.reason


@pytest.mark.parametrize("cut", [40, 300, 700, 900, len(RFC3464) - 5])
def test_truncated_reports_never_raise(cut):
    r = parse_message(RFC3464[:cut])
    assert r.kind in KINDS and r.reason


def test_enormous_attachments_are_capped_not_read():
    r = parse_message(BIG, max_bytes=64 * 1024)
    assert r.truncated and r.kind == "dsn"
    assert r.recipients[0].recipient == "alice@example.net"


def test_malformed_mime_still_reads_what_it_can():
    # the boundary never occurs: the body is read as text
    raw = RFC3464.replace(b'boundary="B"', b'boundary="never"')
    r = parse_message(raw)
    assert r.kind == "dsn" and r.first is not None
    assert r.first.recipient == "alice@example.net" and r.first.bounce_class == "hard"


def test_contract_has_exactly_the_documented_keys():
    for raw in (RFC3464, ARF, AUTOREPLY, b""):
        assert tuple(contract(parse_message(raw), "f")) == CONTRACT_KEYS
    assert contract(parse_message(ARF), "f")["feedback_type"] == "abuse"


def test_mutated_and_cut_messages_never_raise():
    import random
    rng = random.Random(12)
    for raw in (RFC3464, QMAIL, EXIM, POSTFIX_TEXT, EXCHANGE, AUTOREPLY, ARF, BOUNCE_OF_BOUNCE):
        for _ in range(40):
            b = bytearray(raw)
            for _ in range(rng.randrange(1, 30)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            r = parse_message(bytes(b[:rng.randrange(len(b) + 1)]))
            assert r.kind in KINDS and r.reason
            assert not r.reason.startswith("unreadable"), r.reason   # handled, not caught


def test_long_texts_are_classified_in_bounded_time():
    import time

    from cluster.core.replies import classify
    t = time.perf_counter()
    c = classify(550, "5.1.1 user unknown " + "x " * 200_000)
    assert c.category == "invalid-recipient"
    assert time.perf_counter() - t < 0.5


def _report(fields: str, notice: str = "The mail system could not deliver your message.") -> bytes:
    return (f"From: MAILER-DAEMON@mx.example.org\nTo: sender@example.com\n"
            f"Subject: Undelivered Mail\nMIME-Version: 1.0\n"
            f"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\n\n"
            f"--B\nContent-Type: text/plain\n\n{notice}\n\n"
            f"--B\nContent-Type: message/delivery-status\n\n"
            f"Reporting-MTA: dns; mx.example.org\n\n{fields}\n--B--\n").encode()


def test_recipients_without_blank_lines_between_them_are_split():
    # AOL's reports run the recipients' fields together (RFC 3464 §2.1 wants a blank line)
    r = parse_message(_report(
        "Final-Recipient: rfc822; a@example.net\nAction: failed\nStatus: 5.2.2\n"
        "Diagnostic-Code: smtp; 550 5.2.2 <a@example.net>... Mailbox Full\n"
        "Final-Recipient: rfc822; b@example.net\nAction: failed\nStatus: 5.1.1\n"
        "Diagnostic-Code: smtp; 550 5.1.1 <b@example.net>... User Unknown\n"))
    assert [(x.recipient, x.bounce_class) for x in r.recipients] == \
        [("a@example.net", "soft"), ("b@example.net", "hard")]


def test_a_status_comment_explains_a_report_without_diagnostic_code():
    r = parse_message(_report("Final-Recipient: rfc822; a@example.net\nAction: delayed\n"
                              "Status: 4.0.0 (example.net: host name lookup failure)\n"))
    a = r.recipients[0]
    assert (a.category, a.bounce_class, a.diagnostic) == ("dns-failure", "soft", None)


def test_the_remote_reply_quoted_after_a_relays_generic_status_decides():
    # Amazon SES: its own "5.1.0 - Unknown address error", then the remote server's reply
    r = parse_message(_report(
        "Final-Recipient: rfc822; a@example.net\nAction: failed\nStatus: 5.0.0\n"
        "Diagnostic-Code: smtp; 5.1.0 - Unknown address error 550-'5.7.1 <a@example.net>... "
        "Access denied' (delivery attempts: 0)\n"))
    assert r.recipients[0].bounce_class == "block"


def test_the_phase_named_in_the_notice_decides_a_bare_refusal():
    # Exim: "SMTP error from remote mail server after EHLO": the refusal is of our client
    notice = ("A message that you sent could not be delivered.\n\n  a@example.net\n"
              "    SMTP error from remote mail server after EHLO mx.example.com:\n"
              "    550 Rejected\n")
    r = parse_message(_report("Final-Recipient: rfc822; a@example.net\nAction: failed\n"
                              "Status: 5.0.0\nDiagnostic-Code: smtp; 550 Rejected\n", notice))
    assert (r.recipients[0].category, r.recipients[0].bounce_class) == ("policy", "block")


@pytest.mark.parametrize("diagnostic, klass", [
    # Postfix smtpd's "<address>: Recipient address rejected: ..." is its refusal of RCPT TO
    # (smtpd_recipient_restrictions): the address, even under an X.2.1
    ("550 5.2.1 <a@example.net>: Recipient address rejected: User unknown", "hard"),
    # the same X.2.1 "User Unknown" with no SMTP command named: a filter (RFC 3463 §3.3)
    ("550 5.2.1 <a@example.net>... User Unknown", "block"),
    # m-FILTER and Exchange after DATA name no single address: not a RCPT refusal
    ("550 5.2.1 All recipient addresses rejected : User unknown", "block"),
])
def test_postfix_recipient_restrictions_name_the_rcpt_phase(diagnostic, klass):
    r = parse_message(_report("Final-Recipient: rfc822; a@example.net\nAction: failed\n"
                              f"Status: 5.2.1\nDiagnostic-Code: smtp; {diagnostic}\n"))
    assert r.recipients[0].bounce_class == klass, r.recipients[0]


SES_NOTIFICATION = (
    b'From: no-reply@sns.amazonaws.com\nTo: sender@example.com\n'
    b'Subject: AWS Notification Message\nContent-Type: text/plain; charset=UTF-8\n\n'
    b'{\n  "Type" : "Notification",\n  "Message" : "{\\"notificationType\\":\\"Bounce\\",'
    b'\\"bounce\\":{\\"bounceType\\":\\"Permanent\\",\\"bouncedRecipients\\":[{'
    b'\\"emailAddress\\":\\"a@example.net\\",\\"action\\":\\"failed\\",'
    b'\\"status\\":\\"5.1.1\\",\\"diagnosticCode\\":\\"smtp; 550 5.1.1 user unknown\\"}],'
    b'\\"reportingMTA\\":\\"dsn; a1.smtp-out.amazonses.com\\"}}"\n}\n')


def test_amazon_ses_bounce_notifications_are_reports():
    r = parse_message(SES_NOTIFICATION)
    assert (r.kind, r.reason, r.reporting_mta) == ("dsn", "ses-notification",
                                                   "a1.smtp-out.amazonses.com")
    a = r.recipients[0]
    assert (a.recipient, a.status, a.diagnostic, a.bounce_class) == \
        ("a@example.net", "5.1.1", "550 5.1.1 user unknown", "hard")
    delivery = SES_NOTIFICATION.replace(b"Bounce", b"Delivery")   # not a bounce: nothing
    assert parse_message(delivery).kind == "unknown"


def test_an_address_verification_report_is_no_bounce():
    # Postfix "sendmail -bv": "Action: deliverable" with a 2.x.x status
    r = parse_message(_report("Final-Recipient: rfc822; a@example.net\nAction: deliverable\n"
                              "Status: 2.1.5\nDiagnostic-Code: smtp; 250 2.1.5 Ok\n"))
    assert (r.recipients[0].category, r.recipients[0].bounce_class) == (None, None)


@pytest.mark.parametrize("status, diag, klass", [
    # RFC 3463 §3.1: a 4.X.X status is a temporary condition that caused abandonment; giving
    # up on it does not prove the domain is gone
    ("4.0.0", ("smtp; DNS Error: DNS type 'mx' lookup of example.net responded with code "
              "NXDOMAIN Domain name not found: example.net"), "soft"),
    ("4.1.1", "smtp; 450 4.1.1 <a@example.net>: Recipient address rejected: User unknown",
     "soft"),
    # RFC 7505: a null MX is a definitive "accepts no mail", whatever class it was given
    ("4.0.0", ("smtp; DNS Error: DNS type 'mx' lookup of example.net responded with code "
              "NOERROR The domain example.net doesn't receive email: returned Null MX"), "hard"),
    # the same texts with a permanent status stay hard
    ("5.0.0", ("smtp; DNS Error: DNS type 'mx' lookup of example.net responded with code "
              "NXDOMAIN Domain name not found: example.net"), "hard"),
    ("5.1.1", "smtp; 550 5.1.1 <a@example.net>: Recipient address rejected: User unknown",
     "hard"),
])
def test_a_failed_action_with_a_temporary_status_is_never_hard(status, diag, klass):
    r = parse_message(_report(f"Final-Recipient: rfc822; a@example.net\nAction: failed\n"
                              f"Status: {status}\nDiagnostic-Code: {diag}\n"))
    assert r.recipients[0].bounce_class == klass


def _sendmail_notice(transcript: str) -> bytes:
    return ("From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.com>\n"
            "To: sender@example.com\nSubject: Returned mail: see transcript for details\n\n"
            "   ----- Transcript of session follows -----\n" + transcript +
            "\n   ----- Unsent message follows -----\nFrom: sender@example.com\n"
            "To: someone@example.net\nSubject: hi\n\nhello\n").encode()


@pytest.mark.parametrize("transcript, want", [
    # the reply to MAIL FROM refuses our sender (RFC 5321 §3.3): block, whatever the verdict
    (("While talking to mx.example.net:\n>>> MAIL From:<sender@example.com>\n"
     "<<< 550 Insecure Mail Relay\n554 <a@example.net>... Remote protocol error\n"),
     [("a@example.net", "550 Insecure Mail Relay", "block")]),
    # a refusal of DATA: the message, not the address
    (("While talking to mx.example.net:\n>>> DATA\n<<< 550 Go away\n"
     "554 <a@example.net>... Remote protocol error\n"),
     [("a@example.net", "550 Go away", "block")]),
    # sessions are separate: a verdict with no reply of its own keeps its own text
    (("While talking to mx.example.net:\n>>> DATA\n<<< 550 Go away\n"
     "554 <a@example.net>... Remote protocol error\n"
     "550 example.org (smtp)... 550 Host unknown\n"
     "554 <b@example.org>... 550 Host unknown (Authoritative answer from name server)\n"
     "While talking to mx.example.co.jp:\n>>> RCPT To:<c@example.co.jp>\n"
     "<<< 550 Requested mailbox not found. No such user here.\n"
     "550 <c@example.co.jp>... User unknown\n"),
     [("a@example.net", "550 Go away", "block"),
      ("b@example.org", ("554 <b@example.org>... 550 Host unknown (Authoritative answer from "
                        "name server)"), "hard"),
      ("c@example.co.jp", "550 Requested mailbox not found. No such user here.", "hard")]),
    # a local mailer's output explains Sendmail's verdict
    ("mail.local: unknown user: a\n554 <a@example.net>... Service unavailable\n",
     [("a@example.net", "554 <a@example.net>... Service unavailable mail.local: unknown user: a",
       "hard")]),
    # pipelining (RFC 2920): the replies read after ">>> DATA" answered the RCPTs when the
    # server then refuses the DATA for want of recipients
    (("... while talking to mx.example.net.:\n>>> DATA\n<<< 550 5.0.0 <a@example.net>... "
     "User unknown\n550 5.1.1 <a@example.net>... User unknown\n<<< 503 5.0.0 Need RCPT\n"),
     [("a@example.net", "550 5.0.0 <a@example.net>... User unknown", "hard")]),
    # without that, a "user unknown" in reply to DATA is a filter's verdict (sisimai
    # "filtered"): the address was accepted at RCPT
    (("... while talking to mx.example.net.:\n>>> DATA\n<<< 550 Unknown user a@example.net\n"
     "554 5.0.0 <a@example.net>... Service unavailable\n"),
     [("a@example.net", "550 Unknown user a@example.net", "block")]),
])
def test_a_sendmail_transcript_gives_each_recipient_the_reply_and_phase_it_got(transcript,
                                                                              want):
    r = parse_message(_sendmail_notice(transcript))
    assert r.kind == "dsn"
    assert [(x.recipient, x.diagnostic, x.bounce_class) for x in r.recipients] == want


@pytest.mark.parametrize("said, klass", [
    # qmail-remote's own words name the command a reply answered
    (("Connected to 192.0.2.1 but my name was rejected.\nRemote host said: 501 5.0.0 Invalid "
     "domain name"), "block"),
    ("Connected to 192.0.2.1 but sender was rejected.\nRemote host said: 550 User unknown",
     "block"),
    ("192.0.2.1 does not like recipient.\nRemote host said: 550 User unknown", "hard"),
    ("192.0.2.1 failed after I sent the message.\nRemote host said: 550 User unknown", "block"),
])
def test_qmail_remote_texts_name_the_phase(said, klass):
    raw = ("From: MAILER-DAEMON@mx.example.com\nTo: sender@example.com\n"
           "Subject: failure notice\n\nHi. This is the qmail-send program at mx.example.com.\n"
           "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
           "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
           f"<a@example.net>:\n{said}\n\n--- Below this line is a copy of the message.\n\n"
           "From: sender@example.com\nTo: a@example.net\n\nhi\n").encode()
    r = parse_message(raw)
    assert (r.recipients[0].recipient, r.recipients[0].bounce_class) == ("a@example.net", klass)


# a provider's own notice (no DSN part, no daemon sender, its subject in another language)
# that returns the message and says it could not be delivered to an address
_RETURNED_NOTICE = (
    "From: no-reply@notify.example.net\nTo: <sender@example.org>\n"
    "Subject: =?UTF-8?B?44Ko44Op44O8?=\nMIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="Z"\n\n--Z\nContent-Type: text/plain\n\n'
    "Your mail sent on: Mon, 1 Jun 2026 10:00:00 +0900\n"
    "     Could not be delivered to: <user@mobile.example.net>\n"
    "     {why}\n\n--Z\nContent-Type: message/rfc822\n\n"
    "From: sender@example.org\nTo: user@mobile.example.net\nSubject: hi\n"
    "Message-ID: <orig-1@example.org>\n\nhello\n--Z--\n")


@pytest.mark.parametrize("why, category, klass", [
    ("As their mailbox is full.", "quota", "soft"),
    ("The user does not exist.", "invalid-recipient", "hard"),
])
def test_a_notice_returning_the_message_undelivered_to_an_address_is_a_bounce(why, category,
                                                                             klass):
    r = parse_message(_RETURNED_NOTICE.format(why=why).encode())
    assert r.kind == "dsn" and r.original_message_id == "<orig-1@example.org>"
    [a] = r.recipients
    assert (a.recipient, a.category, a.bounce_class) == ("user@mobile.example.net", category,
                                                        klass)


def test_a_message_that_mentions_delivery_but_returns_nothing_is_no_bounce():
    # the same sentence without the returned message: a person's mail, not a notice
    raw = (b"From: ann@example.org\nTo: bob@example.net\nSubject: hello\n\n"
           b"The parcel could not be delivered to: <bob@example.net> yesterday.\n")
    assert parse_message(raw).kind in ("unknown", "autoreply")
