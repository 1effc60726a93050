"""Reply policy: parsing reply lines, classifying them, and raymta's own failure outcomes.

The corpus tests measure agreement with replies from real bounces and provider documentation
(``../shared/corpora``, beside the checkout); the tables above them state the rules.
"""

import collections
import csv

import pytest

from cluster.core.replies import (
    CATEGORIES,
    CAUSE_RULES,
    ENHANCED_CODES,
    ENHANCED_SUBJECTS,
    PHASES,
    TEXT_RULES,
    Classification,
    Outcome,
    Reply,
    bounce_category,
    classify,
    connection_failure,
    dns_failure,
    enhanced_category,
    expired,
    parse_reply,
)
from tests.conftest import corpus


D, T, P = Outcome.DELIVERED, Outcome.TRANSIENT, Outcome.PERMANENT

# ---------------------------------------------------------------------------------- parsing

PARSES = [
    ("550 5.1.1 <x@y>: User unknown", 550, "5.1.1", "<x@y>: User unknown"),
    ("550-5.1.1 first line\n550 5.1.1 second", 550, "5.1.1", "first line second"),
    ("421-4.7.0 Try again\r\n421 4.7.0 later", 421, "4.7.0", "Try again later"),
    ("250-first\n250 second", 250, None, "first second"),
    ("451 4.7.650 The mail server has been temporarily rate limited", 451, "4.7.650",
     "The mail server has been temporarily rate limited"),
    ("550 5.1.1", 550, "5.1.1", ""),
    ("550", 550, None, ""),
    ("250 OK", 250, None, "OK"),
    ("", None, None, ""),
    ("Mailbox full", None, None, "Mailbox full"),
    ("5.7.1 Access denied", None, "5.7.1", "Access denied"),
    ("4.2.2 mailbox full", None, "4.2.2", "mailbox full"),
    ("Delivery failed #5.1.1", None, "5.1.1", "Delivery failed #5.1.1"),
    ("5.1.0 - Unknown address error", None, "5.1.0", "Unknown address error"),
    ("550 5.7.01 leading zeros", 550, "5.7.1", "leading zeros"),
    # quoting prefixes of DSNs (RFC 3464 §2.3.6) and MTA logs
    ("smtp; 550 5.1.1 Mailbox does not exist", 550, "5.1.1", "Mailbox does not exist"),
    ("SMTP;450 4.0.0 Temporary failure", 450, "4.0.0", "Temporary failure"),
    ("host mx.example.com[192.0.2.1] said: 554 5.7.1 Spam (in reply to end of DATA command)",
     554, "5.7.1", "Spam (in reply to end of DATA command)"),
    ("Remote host said: 554 INVALID IP", 554, None, "INVALID IP"),
    ("#550 5.2.3 too big ##", 550, "5.2.3", "too big ##"),
    (": 550 5.1.1 <a@b>: Recipient address rejected", 550, "5.1.1",
     "<a@b>: Recipient address rejected"),
    ("smtp; 2.1.5 250 OK", 250, "2.1.5", "OK"),
    # a non-SMTP diagnostic type: the number is an exit status, not a reply code
    ("X-Unix; 255", None, None, "255"),
    # reply code and enhanced class disagree: both are kept (the reply code decides outcome)
    ("554 4.4.7 Message expired", 554, "4.4.7", "Message expired"),
    # a multi-line greeting cut short by a refusal: the refusal is the reply
    ("220-mx.example.net 421 4.2.1 Service refused, try later", 421, "4.2.1",
     "Service refused, try later"),
    # a multi-line reply flattened into one log line
    ("550-5.7.26 The MAIL FROM domain has an SPF record with a 550-5.7.26 hard fail policy",
     550, "5.7.26", "The MAIL FROM domain has an SPF record with a hard fail policy"),
    # server-side lines without codes, as aiosmtplib hands them over
    ("5.7.26 This mail has been blocked\n5.7.26 Gmail requires authentication", None,
     "5.7.26", "This mail has been blocked Gmail requires authentication"),
    # enhanced code later in the text, same class as the reply
    ("501 RCPT TO not accepted: 5.7.1 not configured to relay", 501, "5.7.1",
     "RCPT TO not accepted: 5.7.1 not configured to relay"),
    # IP addresses and other-class numbers are not enhanced codes
    ("550 Connection from 192.0.2.25 refused", 550, None, "Connection from 192.0.2.25 refused"),
    ("550 see policy 4.1.2 of our terms", 550, None, "see policy 4.1.2 of our terms"),
    ("451 upgrade to 5.1.1.4 soon", 451, None, "upgrade to 5.1.1.4 soon"),
]


@pytest.mark.parametrize("line, code, enhanced, text", PARSES)
def test_parse_reply_splits_code_enhanced_code_and_text(line, code, enhanced, text):
    assert parse_reply(line) == Reply(code, enhanced, text)


def test_reply_str_puts_the_parts_back_together():
    assert str(parse_reply("550-5.1.1 a\n550 5.1.1 b")) == "550 5.1.1 a b"


# ----------------------------------------------------------------------------- classification

CLASSIFY = [
    # (code, text, phase, outcome, category, site_backoff)
    # --- delivered
    (250, "2.0.0 OK queued as ABC123", "data", D, "delivered", False),
    (None, "2.1.5 Recipient OK", "rcpt", D, "delivered", False),
    # --- hard: the address or domain does not exist
    (550, "5.1.1 The email account that you tried to reach does not exist.", "rcpt",
     P, "hard", False),
    (550, "Requested action not taken: mailbox unavailable", "rcpt", P, "hard", False),
    (550, "5.5.0 Requested action not taken: mailbox unavailable", "rcpt", P, "hard", False),
    (553, "5.1.3 Bad recipient address syntax", "rcpt", P, "hard", False),
    (550, "5.1.2 Host unknown", "rcpt", P, "hard", False),
    (550, "5.1.1 RESOLVER.ADR.RecipNotFound; not found", "rcpt", P, "hard", False),
    (556, "5.1.10 Recipient address has null MX", "rcpt", P, "hard", False),
    (521, "Host does not accept mail", "greeting", P, "hard", False),
    (551, "User not local; please try <forward@example.org>", "rcpt", P, "hard", False),
    (554, "delivery error: dd This user doesn't have a yahoo.com account", "data",
     P, "hard", False),
    (550, "5.4.1 Recipient address rejected: Access denied. AS(201806281)", "rcpt",
     P, "hard", False),
    (550, "5.1.6 Recipient no longer on server", "rcpt", P, "hard", False),
    # the reply code decides permanence even when the enhanced class disagrees
    (525, "4.7.13 user account is disabled", "rcpt", P, "hard", False),
    # a 4xx "user unknown" is retried, but says what is wrong
    (450, "4.1.1 <x@y>: Recipient address rejected: User unknown in virtual alias table", "rcpt",
     T, "hard", False),
    # --- soft: may succeed later
    (452, "4.2.2 The email account that you tried to reach is over quota.", "rcpt",
     T, "soft", False),
    # 552 mailbox full stays permanent (the server chose 5xx), categorised soft
    (552, "5.2.2 Mailbox full", "rcpt", P, "soft", False),
    (552, "5.3.4 Message size exceeds fixed limit", "data", P, "soft", False),
    (554, "5.4.6 Hop count exceeded - possible mail loop", "data", P, "soft", False),
    (451, "4.3.0 Temporary system problem", "rcpt", T, "soft", False),
    (450, "4.2.0 <x@y>: Recipient address rejected: Greylisted, see http://postgrey.example/",
     "rcpt", T, "soft", False),
    (421, "4.3.2 System not accepting network messages", "greeting", T, "soft", True),
    (550, "5.2.1 The domain example.net is currently suspended. Try later.", "rcpt",
     P, "hard", False),   # X.2.1 mailbox disabled decides
    (550, "The domain example.net is currently suspended. Try later.", "rcpt",
     P, "soft", False),
    (None, "connect to mx.example.com[192.0.2.1]:25: Connection timed out", "connect",
     T, "soft", False),
    (None, "Connection refused", "connect", T, "soft", False),
    # --- throttle: slow down
    (421, ("4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume "
          "or user complaints - 4.16.55.1"), "mail", T, "throttle", True),
    (421, "Too many concurrent SMTP connections from this IP address; please try again later.",
     "greeting", T, "throttle", True),
    (451, ("4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP "
          "reputation."), "rcpt", T, "throttle", True),
    (421, "4.7.28 Gmail has detected an unusual rate of mail originating from your IP address.",
     "data", T, "throttle", True),
    (450, "4.7.1 Client host rejected: Please try again slower", "rcpt", T, "throttle", True),
    (451, "4.7.500 Server busy. Please try again later from [192.0.2.1].", "rcpt",
     T, "throttle", True),
    (451, "4.7.1 Your IP has a poor reputation, try again later", "mail", T, "throttle", True),
    (452, "4.4.5 Insufficient system resources, mail system congestion", "mail",
     T, "throttle", True),
    (421, "", "greeting", T, "throttle", True),
    # per-transaction recipient limit: retry the rest, but it is not a site-wide slowdown
    (452, "4.5.3 Too many recipients", "rcpt", T, "throttle", False),
    # RFC 5321 §4.5.3.1.10: a 552 "too many recipients" on RCPT is treated as 452
    (552, "5.5.3 Too many recipients", "rcpt", T, "throttle", False),
    (552, "5.5.3 Too many recipients", "data", P, "throttle", False),
    # a permanent reply is never a site backoff, whatever it says
    (550, "5.7.1 too many connections, try again later", "rcpt", P, "throttle", False),
    # --- block: the sender (our IP) is blocked
    (554, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
     "rcpt", P, "block", False),
    (550, "5.7.1 Part of their network is on our block list (S3150).", "mail",
     P, "block", False),
    (550, "5.7.606 Access denied, banned sending IP [192.0.2.1].", "rcpt", P, "block", False),
    (550, "5.7.25 The IP address sending this message does not have a PTR record setup",
     "data", P, "block", False),
    (550, ("5.7.1 Our system has detected that this message is likely unsolicited mail. To "
          "reduce the amount of spam sent to Gmail, this message has been blocked."), "data",
     P, "block", False),
    (554, "5.7.1 Message rejected as spam by Content Filtering.", "data", P, "block", False),
    (550, "Virus detected; content rejected", "data", P, "block", False),
    (550, "Connections from 192.0.2.1 are being rejected due to a poor email reputation score",
     "greeting", P, "block", False),
    (550, "5.7.708 Access denied, traffic not accepted from this IP.", "rcpt",
     P, "block", False),
    (550, "Sender rejected, AUP#CDRBL", "mail", P, "block", False),
    # --- policy: the message or our sender breaks a policy
    (550, ("5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail "
          "requires all senders to authenticate with either SPF or DKIM."), "data",
     P, "policy", False),
    (550, ("5.7.1 Unauthenticated email from example.com is not accepted due to domain's DMARC "
          "policy"), "data", P, "policy", False),
    (550, "5.7.23 SPF validation failed", "mail", P, "policy", False),
    (451, "4.7.24 SPF validation error (temperror)", "mail", T, "policy", False),
    (554, "5.7.1 <x@example.com>: Relay access denied", "rcpt", P, "policy", False),
    (550, "5.7.1 This message is not RFC 5322 compliant. There are multiple Subject headers.",
     "data", P, "policy", False),
    (501, "5.1.7 Bad sender address syntax", "mail", P, "policy", False),
    (553, "5.1.8 <x@nowhere.invalid>: Sender address rejected: Domain not found", "mail",
     P, "policy", False),
    (530, "5.7.0 Must issue a STARTTLS command first", "mail", P, "policy", False),
    (550, "Message not accepted for policy reasons", "data", P, "policy", False),
    (503, "Bad sequence of commands", "data", P, "policy", False),
    (550, "5.2.0 Message Filtered", "data", P, "policy", False),
    (550, "5.1.1 Refused due to recipient preferences", "rcpt", P, "policy", False),
    # --- not a bounce: an auto-reply (only for text that carries no SMTP code)
    (None, "I am out of the office until Monday", "response_text", D, "not_bounce", False),
    # --- unknown: nothing recognisable
    (550, "Rejected", "rcpt", P, "unknown", False),
    (None, "something odd happened", "response_text", T, "unknown", False),
    # --- undecided class: an enhanced code decides, else the category
    (None, "5.2.3 Message too large", "response_text", P, "soft", False),
    (None, "Host or domain name not found", "response_text", P, "hard", False),
    (352, "5.2.2 mailbox is stuffed", "rcpt", P, "soft", False),
]


@pytest.mark.parametrize("code, text, phase, outcome, category, backoff", CLASSIFY)
def test_classify_gives_outcome_category_and_site_backoff(code, text, phase, outcome, category,
                                                          backoff):
    c = classify(code, text, phase=phase)
    assert (c.outcome, c.category, c.site_backoff) == (outcome, category, backoff), c


@pytest.mark.parametrize("phase, category", [
    ("connect", "block"), ("connection", "block"), ("greeting", "block"), ("ehlo", "block"),
    ("starttls", "policy"), ("mail", "policy"), ("rcpt", "unknown"), ("data", "policy"),
    ("dns", "unknown"), ("response_text", "unknown"),
])
def test_unrecognised_5xx_is_judged_by_the_phase_it_answered(phase, category):
    # RFC 5321 §3: at connect/EHLO the client is refused, at MAIL the sender, at DATA the message
    c = classify(554, "Go away", phase=phase)
    assert (c.outcome, c.category) == (P, category)


def test_auto_reply_wording_inside_a_real_reply_is_not_a_non_bounce():
    c = classify(550, "I am out of the office", phase="rcpt")
    assert c.outcome is P and c.category != "not_bounce"


@pytest.mark.parametrize("code, text, enhanced, want_code, want_enh, want_text", [
    (550, "550 5.1.1 User unknown", None, 550, "5.1.1", "User unknown"),
    (None, "550 5.1.1 User unknown", None, 550, "5.1.1", "User unknown"),
    (550, "User unknown", "5.1.1", 550, "5.1.1", "User unknown"),
    (550, "5.1.1 User unknown", "5.7.1", 550, "5.7.1", "User unknown"),   # given wins
    (550, "User unknown", "#5.01.1", 550, "5.1.1", "User unknown"),      # normalised
])
def test_classify_fills_codes_from_the_text_and_keeps_given_ones(code, text, enhanced,
                                                                  want_code, want_enh, want_text):
    c = classify(code, text, enhanced=enhanced)
    assert (c.code, c.enhanced, c.text) == (want_code, want_enh, want_text)


@pytest.mark.parametrize("args, kwargs", [
    ((999, ""), {}),
    ((99, ""), {}),
    (("550", ""), {}),
    ((True, ""), {}),
    ((550, ""), {"phase": "quit"}),
    ((550, ""), {"enhanced": "5.1"}),
    ((550, ""), {"enhanced": "6.1.1"}),
])
def test_classify_rejects_bad_arguments(args, kwargs):
    with pytest.raises(ValueError):
        classify(*args, **kwargs)


# ------------------------------------------------------------------------ raymta's own failures

@pytest.mark.parametrize("kind, permanent, outcome, category, enhanced", [
    ("nxdomain", None, P, "hard", "5.1.2"),
    ("null_mx", None, P, "hard", "5.1.10"),     # RFC 7505
    ("servfail", None, T, "soft", "4.4.3"),
    ("timeout", None, T, "soft", "4.4.3"),
    ("no_address", None, T, "soft", "4.4.4"),
    ("no_address", True, P, "hard", "5.4.4"),   # the resolver knows it is authoritative
    ("nxdomain", False, T, "soft", "4.1.2"),
])
def test_dns_failure_outcomes(kind, permanent, outcome, category, enhanced):
    c = dns_failure(kind, "", permanent=permanent)
    assert (c.outcome, c.category, c.enhanced, c.code, c.site_backoff) == \
        (outcome, category, enhanced, None, False)
    assert c.text


def test_dns_failure_keeps_the_given_text_and_rejects_unknown_kinds():
    assert dns_failure("timeout", "lookup of x timed out").text == "lookup of x timed out"
    with pytest.raises(ValueError, match="refused"):
        dns_failure("refused", "")


@pytest.mark.parametrize("text, enhanced", [
    ("Connection refused", "4.4.1"),
    ("connect to 192.0.2.1:25: timed out", "4.4.1"),
    ("lost connection with mx.example.com while sending RCPT TO", "4.4.2"),
    ("Connection reset by peer", "4.4.2"),
    ("internal relay error", "4.4.0"),
    ("", "4.4.0"),
])
def test_connection_failure_is_transient_soft_and_no_site_backoff(text, enhanced):
    c = connection_failure(text)
    assert (c.outcome, c.category, c.site_backoff, c.enhanced) == (T, "soft", False, enhanced)


def test_expired_is_permanent_in_its_own_category_and_a_soft_bounce():
    c = expired("message expired after 35 attempts")
    assert (c.outcome, c.category, c.enhanced) == (P, "expired", "5.4.7")
    assert bounce_category(c) == "soft"


@pytest.mark.parametrize("category, bounce", [
    ("delivered", "not_bounce"), ("expired", "soft"), ("hard", "hard"), ("throttle", "throttle"),
    ("not_bounce", "not_bounce"), ("unknown", "unknown"),
])
def test_bounce_category_speaks_the_bounce_report_vocabulary(category, bounce):
    c = Classification(D if category == "delivered" else P, category, None, None, "")
    assert bounce_category(c) == bounce


def test_classification_refuses_categories_outside_the_closed_set():
    with pytest.raises(ValueError, match="bogus"):
        Classification(P, "bogus", 550, None, "")


# ------------------------------------------------------------------------------ the data tables

def test_rule_tables_only_name_known_categories():
    for rule in CAUSE_RULES + TEXT_RULES:
        cats = rule.category if isinstance(rule.category, tuple) else (rule.category,)
        assert all(c is None or c in CATEGORIES for c in cats), rule
    for table in (ENHANCED_CODES, ENHANCED_SUBJECTS):
        for key, cats in table.items():
            assert all(c is None or c in CATEGORIES for c in cats), key
    assert PHASES >= {"connect", "greeting", "ehlo", "starttls", "mail", "rcpt", "data", "dns",
                      "response_text"}


@pytest.mark.parametrize("enhanced, klass, category", [
    ("5.1.1", None, "hard"), ("4.1.1", None, "soft"), ("4.1.1", 5, "hard"),
    ("5.2.2", None, "soft"), ("5.7.1", None, "policy"), ("4.7.28", None, "throttle"),
    ("5.7.25", None, "block"), ("5.0.0", None, None), ("5.7.999", None, "policy"),
    ("2.0.0", None, "delivered"), ("5.9.9", None, None),
])
def test_enhanced_category_by_code_and_reply_class(enhanced, klass, category):
    assert enhanced_category(enhanced, klass) == category


# ---------------------------------------------------------------------------------- the corpora

def _corpus(name: str) -> list[dict[str, str]]:
    path = corpus(name)
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _classify_row(row: dict[str, str]) -> Classification:
    reply = parse_reply(row["response_text"])
    code = reply.code
    if code is None and row["smtp_code"].strip():
        code = int(row["smtp_code"])
    enhanced = reply.enhanced or row["enhanced_code"].strip() or None
    # the corpus does not say which command each reply answered
    return classify(code, row["response_text"], enhanced=enhanced, phase="response_text")


def test_reply_corpus_agreement():
    rows = _corpus("smtp_replies.csv")
    assert rows, "empty corpus"
    cat_total = cat_ok = perm_total = perm_ok = 0
    confusion: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    misses = []
    for row in rows:
        c = _classify_row(row)
        expected = row["expected_class"]
        if expected != "unknown":
            got = bounce_category(c)
            cat_total += 1
            cat_ok += got == expected
            confusion[expected][got] += 1
            if got != expected:
                misses.append(f"  {expected:>10} <- {got:<10} {row['response_text'][:90]!r}")
        if row["expected_permanent"] in ("true", "false"):
            perm_total += 1
            perm_ok += c.permanent == (row["expected_permanent"] == "true")
    cat_rate, perm_rate = cat_ok / cat_total, perm_ok / perm_total
    print(f"\nsmtp_replies.csv: category agreement {cat_ok}/{cat_total} = {cat_rate:.1%}; "
          f"permanent/transient agreement {perm_ok}/{perm_total} = {perm_rate:.1%}")
    print("per expected class: agreed/total, then what was given instead")
    for expected in sorted(confusion):
        row_counts = confusion[expected]
        total = sum(row_counts.values())
        others = ", ".join(f"{k}={v}" for k, v in row_counts.most_common() if k != expected)
        print(f"  {expected:>10}: {row_counts[expected]:3}/{total:<3} {others}")
    print("disagreements (expected <- given):")
    print("\n".join(misses))
    # achieved 88.2% and 100% when written; the bounds leave room for label noise only
    assert cat_rate >= 0.84
    assert perm_rate >= 0.96


def test_enhanced_code_table_agrees_with_the_registry_corpus():
    rows = _corpus("enhanced_status_codes.csv")
    total = ok = 0
    misses = []
    for row in rows:
        for column, klass in (("suggested_class_if_5xx", 5), ("suggested_class_if_4xx", 4)):
            suggestion = row[column].strip()
            if not suggestion or "?" in suggestion or suggestion == "n/a":
                continue
            total += 1
            got = enhanced_category(f"{klass}{row['code'][1:]}") or "unknown"
            # "block|policy": the code alone allows either; the text decides
            if got in suggestion.split("|"):
                ok += 1
            else:
                misses.append(f"{row['code']} {klass}xx: suggested {suggestion}, table {got}")
    print(f"\nenhanced_status_codes.csv: table agreement {ok}/{total} = {ok / total:.1%}")
    print("\n".join(misses))
    assert total > 100
    assert ok / total >= 0.97


@pytest.mark.parametrize("code, text, phase, backoff", [
    (451, "4.7.1 greylisted, try again later", "rcpt", False),
    (450, "4.2.0 Greylisted for 300 seconds, please try again later", "rcpt", False),
    (451, "4.3.0 mailbox temporarily unavailable, try again", "rcpt", False),
    (421, "4.7.0 too many connections from your IP", "greeting", True),
    (450, "4.2.1 rate limited, slow down", "rcpt", True),
    (451, "4.7.500 Server busy. Please try again later.", "rcpt", True),
    (550, "5.7.1 rate limit exceeded", "rcpt", False),   # permanent: nothing to pause for
])
def test_only_pace_replies_pause_the_whole_site(code, text, phase, backoff):
    assert classify(code, text, phase=phase).site_backoff is backoff
