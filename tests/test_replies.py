"""Reply policy: parsing reply lines, classifying them, and raymta's own failure outcomes.

The tables state the rules; tests/test_classification_corpora.py measures agreement with the
replies and bounces of the shared corpora.
"""

import csv

import pytest

from cluster.core.bounce_rules import CORPUS_CLASSES, RULES
from cluster.core.replies import (
    CATEGORIES,
    CLASSES,
    DEFAULT_RULES,
    PHASES,
    Classification,
    Outcome,
    Reply,
    classify,
    connection_failure,
    dns_failure,
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
    # (code, text, phase, outcome, category, class, site_backoff)
    # --- delivered
    (250, "2.0.0 OK queued as ABC123", "data", D, None, None, False),
    (None, "2.1.5 Recipient OK", "rcpt", D, None, None, False),
    # --- hard: the address or domain does not exist
    (550, "5.1.1 The email account that you tried to reach does not exist.", "rcpt",
     P, "invalid-recipient", "hard", False),
    (550, "Requested action not taken: mailbox unavailable", "rcpt",
     P, "invalid-recipient", "hard", False),
    (550, "5.5.0 Requested action not taken: mailbox unavailable", "rcpt",
     P, "invalid-recipient", "hard", False),
    (553, "5.1.3 Bad recipient address syntax", "rcpt", P, "invalid-recipient", "hard", False),
    (550, "5.1.2 Host unknown", "rcpt", P, "bad-domain", "hard", False),
    (550, "5.1.1 RESOLVER.ADR.RecipNotFound; not found", "rcpt",
     P, "invalid-recipient", "hard", False),
    (556, "5.1.10 Recipient address has null MX", "rcpt", P, "bad-domain", "hard", False),
    (521, "Host does not accept mail", "greeting", P, "bad-domain", "hard", False),
    (551, "User not local; please try <forward@example.org>", "rcpt",
     P, "invalid-recipient", "hard", False),
    (554, "delivery error: dd This user doesn't have a yahoo.com account", "data",
     P, "invalid-recipient", "hard", False),
    (550, "5.4.1 Recipient address rejected: Access denied. AS(201806281)", "rcpt",
     P, "invalid-recipient", "hard", False),
    (550, "5.1.6 Recipient no longer on server", "rcpt", P, "invalid-recipient", "hard", False),
    # the reply code decides permanence even when the enhanced class disagrees
    (525, "4.7.13 user account is disabled", "rcpt", P, "inactive-mailbox", "soft", False),
    # a 4xx "user unknown" is retried, but says what is wrong
    (450, "4.1.1 <x@y>: Recipient address rejected: User unknown in virtual alias table", "rcpt",
     T, "invalid-recipient", "soft", False),
    # --- soft: may succeed later
    (452, "4.2.2 The email account that you tried to reach is over quota.", "rcpt",
     T, "quota", "soft", False),
    # 552 mailbox full stays permanent (the server chose 5xx), categorised soft
    (552, "5.2.2 Mailbox full", "rcpt", P, "quota", "soft", False),
    (552, "5.3.4 Message size exceeds fixed limit", "data", P, "quota", "soft", False),
    (554, "5.4.6 Hop count exceeded - possible mail loop", "data", P, "routing", "soft", False),
    (451, "4.3.0 Temporary system problem", "rcpt", T, "other", "soft", False),
    (450, "4.2.0 <x@y>: Recipient address rejected: Greylisted, see http://postgrey.example/",
     "rcpt", T, "policy", "soft", False),
    (421, "4.3.2 System not accepting network messages", "greeting", T, "other", "soft", True),
    (550, "5.2.1 The domain example.net is currently suspended. Try later.", "rcpt",
     P, "inactive-mailbox", "soft", False),   # X.2.1 mailbox disabled decides
    (550, "The domain example.net is currently suspended. Try later.", "rcpt",
     P, "inactive-mailbox", "soft", False),
    (None, "connect to mx.example.com[192.0.2.1]:25: Connection timed out", "connect",
     T, "no-answer", "soft", False),
    (None, "Connection refused", "connect", T, "no-answer", "soft", False),
    # --- transient (corpora "throttle"): slow down
    (421, ("4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume "
          "or user complaints - 4.16.55.1"), "mail", T, "rate-limited", "transient", True),
    (421, "Too many concurrent SMTP connections from this IP address; please try again later.",
     "greeting", T, "rate-limited", "transient", True),
    (451, ("4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP "
          "reputation."), "rcpt", T, "rate-limited", "transient", True),
    (421, "4.7.28 Gmail has detected an unusual rate of mail originating from your IP address.",
     "data", T, "rate-limited", "transient", True),
    (450, "4.7.1 Client host rejected: Please try again slower", "rcpt",
     T, "rate-limited", "transient", True),
    (451, "4.7.500 Server busy. Please try again later from [192.0.2.1].", "rcpt",
     T, "rate-limited", "transient", True),
    (451, "4.7.1 Your IP has a poor reputation, try again later", "mail",
     T, "reputation", "transient", True),
    (452, "4.4.5 Insufficient system resources, mail system congestion", "mail",
     T, "rate-limited", "transient", True),
    (421, "", "greeting", T, "rate-limited", "transient", True),
    # per-transaction recipient limit: retry the rest, but it is not a site-wide slowdown
    (452, "4.5.3 Too many recipients", "rcpt", T, "rate-limited", "transient", False),
    # RFC 5321 §4.5.3.1.10: a 552 "too many recipients" on RCPT is treated as 452
    (552, "5.5.3 Too many recipients", "rcpt", T, "rate-limited", "transient", False),
    (552, "5.5.3 Too many recipients", "data", P, "rate-limited", "transient", False),
    # a permanent reply is never a site backoff, whatever it says
    (550, "5.7.1 too many connections, try again later", "rcpt",
     P, "rate-limited", "transient", False),
    # --- block: the sender (our IP) is blocked
    (554, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
     "rcpt", P, "spam-block", "block", False),
    (550, "5.7.1 Part of their network is on our block list (S3150).", "mail",
     P, "spam-block", "block", False),
    (550, "5.7.606 Access denied, banned sending IP [192.0.2.1].", "rcpt",
     P, "spam-block", "block", False),
    (550, "5.7.25 The IP address sending this message does not have a PTR record setup",
     "data", P, "policy", "block", False),
    (550, ("5.7.1 Our system has detected that this message is likely unsolicited mail. To "
          "reduce the amount of spam sent to Gmail, this message has been blocked."), "data",
     P, "spam-content", "block", False),
    (554, "5.7.1 Message rejected as spam by Content Filtering.", "data",
     P, "spam-content", "block", False),
    (550, "Virus detected; content rejected", "data", P, "virus", "block", False),
    (550, "Connections from 192.0.2.1 are being rejected due to a poor email reputation score",
     "greeting", P, "reputation", "block", False),
    (550, "5.7.708 Access denied, traffic not accepted from this IP.", "rcpt",
     P, "spam-block", "block", False),
    (550, "Sender rejected, AUP#CDRBL", "mail", P, "spam-block", "block", False),
    # --- block (corpora "policy"): the message or our sender breaks a policy
    (550, ("5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail "
          "requires all senders to authenticate with either SPF or DKIM."), "data",
     P, "auth-failure", "block", False),
    (550, ("5.7.1 Unauthenticated email from example.com is not accepted due to domain's DMARC "
          "policy"), "data", P, "auth-failure", "block", False),
    (550, "5.7.23 SPF validation failed", "mail", P, "auth-failure", "block", False),
    (451, "4.7.24 SPF validation error (temperror)", "mail", T, "auth-failure", "block", False),
    (554, "5.7.1 <x@example.com>: Relay access denied", "rcpt", P, "relay-denied", "block", False),
    (550, "5.7.1 This message is not RFC 5322 compliant. There are multiple Subject headers.",
     "data", P, "protocol", "block", False),
    (501, "5.1.7 Bad sender address syntax", "mail", P, "policy", "block", False),
    (553, "5.1.8 <x@nowhere.invalid>: Sender address rejected: Domain not found", "mail",
     P, "policy", "block", False),
    (530, "5.7.0 Must issue a STARTTLS command first", "mail", P, "policy", "block", False),
    (550, "Message not accepted for policy reasons", "data", P, "policy", "block", False),
    (503, "Bad sequence of commands", "data", P, "protocol", "block", False),
    (550, "5.2.0 Message Filtered", "data", P, "policy", "block", False),
    (550, "5.1.1 Refused due to recipient preferences", "rcpt", P, "policy", "block", False),
    # --- not a bounce: an auto-reply (only for text that carries no SMTP code)
    (None, "I am out of the office until Monday", "response_text", D, None, None, False),
    # --- other: nothing recognisable
    (550, "Rejected", "rcpt", P, "other", "soft", False),
    (None, "something odd happened", "response_text", T, "other", "soft", False),
    # --- undecided class: an enhanced code decides, else the category
    (None, "5.2.3 Message too large", "response_text", P, "quota", "soft", False),
    (None, "Host or domain name not found", "response_text", P, "bad-domain", "hard", False),
    (352, "5.2.2 mailbox is stuffed", "rcpt", P, "quota", "soft", False),
    # --- provider texts (each rule names its source in bounce_rules.py)
    (None, "User x (a@b.example) not listed in Domino Directory", "response_text", P,
     "invalid-recipient", "hard", False),
    (554, "IP=192.0.2.1 - A problem occurred. (Ask your postmaster for help) (BL)", "rcpt", P,
     "spam-block", "block", False),
    (None, "Il se peut que le groupe n'existe pas. https://groups.google.com/support/",
     "response_text", P, "policy", "block", False),
    (550, ("5.2.1 <a@b.example>: Recipient address rejected: User unknown. See "
           "https://example.org/en/reason/#filtered"), "rcpt", P, "invalid-recipient", "hard",
     False),
    (554, "Blocked - see https://support.proofpoint.com/dnsbl-lookup.cgi?ip=192.0.2.1",
     "rcpt", P, "spam-block", "block", False),
    (421, "example.org (smtp)... Deferred: Connection timed out during user open", "rcpt", T,
     "no-answer", "soft", True),
    (452, "4.4.5 Insufficient disk space; try again later", "mail", T, "quota", "soft", False),
    (None, "Reason: Illegal host/domain name found", "response_text", P, "bad-domain", "hard",
     False),
    (None, "Final-Recipient: RFC822; a@b.example Action: failed", "response_text", T, "other",
     "soft", False),
]


@pytest.mark.parametrize("code, text, phase, outcome, category, klass, backoff", CLASSIFY)
def test_classify_gives_outcome_category_class_and_site_backoff(code, text, phase, outcome,
                                                                category, klass, backoff):
    c = classify(code, text, phase=phase)
    assert (c.outcome, c.category, c.bounce_class, c.site_backoff) == \
        (outcome, category, klass, backoff), c


@pytest.mark.parametrize("phase, category, klass", [
    ("connect", "policy", "block"), ("connection", "policy", "block"),
    ("greeting", "policy", "block"), ("ehlo", "policy", "block"),
    ("starttls", "policy", "block"), ("mail", "policy", "block"), ("rcpt", "other", "soft"),
    ("data", "policy", "block"), ("dns", "other", "soft"), ("response_text", "other", "soft"),
])
def test_unrecognised_5xx_is_judged_by_the_phase_it_answered(phase, category, klass):
    # RFC 5321 §3: at connect/EHLO the client is refused, at MAIL the sender, at DATA the message
    c = classify(554, "Go away", phase=phase)
    assert (c.outcome, c.category, c.bounce_class) == (P, category, klass)


def test_auto_reply_wording_inside_a_real_reply_is_not_a_non_bounce():
    c = classify(550, "I am out of the office", phase="rcpt")
    assert c.outcome is P and c.category is not None and c.bounce_class is not None


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

@pytest.mark.parametrize("kind, permanent, outcome, category, klass, enhanced", [
    ("nxdomain", None, P, "bad-domain", "hard", "5.1.2"),
    ("null_mx", None, P, "bad-domain", "hard", "5.1.10"),     # RFC 7505
    ("servfail", None, T, "dns-failure", "soft", "4.4.3"),
    ("timeout", None, T, "dns-failure", "soft", "4.4.3"),
    ("no_address", None, T, "routing", "soft", "4.4.4"),
    ("no_address", True, P, "bad-domain", "hard", "5.4.4"),   # the resolver is authoritative
    ("nxdomain", False, T, "dns-failure", "soft", "4.1.2"),
])
def test_dns_failure_outcomes(kind, permanent, outcome, category, klass, enhanced):
    c = dns_failure(kind, "", permanent=permanent)
    assert (c.outcome, c.category, c.bounce_class, c.enhanced, c.code, c.site_backoff) == \
        (outcome, category, klass, enhanced, None, False)
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
def test_connection_failure_is_transient_no_answer_and_no_site_backoff(text, enhanced):
    c = connection_failure(text)
    assert (c.outcome, c.category, c.bounce_class, c.site_backoff, c.enhanced) == \
        (T, "no-answer", "soft", False, enhanced)


def test_expired_is_permanent_in_its_own_category_and_a_soft_bounce():
    c = expired("message expired after 35 attempts")
    assert (c.outcome, c.category, c.bounce_class, c.enhanced) == \
        (P, "message-expired", "soft", "5.4.7")


@pytest.mark.parametrize("category, klass, want", [
    (None, None, None), ("invalid-recipient", None, "hard"), ("quota", None, "soft"),
    ("rate-limited", None, "transient"), ("spam-block", None, "block"),
    ("inactive-mailbox", "hard", "hard"),      # a rule may say otherwise than the default
])
def test_classification_class_defaults_to_the_categorys(category, klass, want):
    c = Classification(P, category, None, None, "", bounce_class=klass)
    assert c.bounce_class == want


@pytest.mark.parametrize("category, klass, match", [
    ("bogus", None, "bogus"), ("hard", None, "'hard'"), ("quota", "throttle", "throttle"),
])
def test_classification_refuses_categories_and_classes_outside_the_closed_sets(category, klass,
                                                                               match):
    with pytest.raises(ValueError, match=match):
        Classification(P, category, 550, None, "", bounce_class=klass)


# ------------------------------------------------------------------------------ the data tables

def test_the_shipped_rules_name_known_categories_classes_and_phases_and_end_in_a_catch_all():
    assert len(RULES) == len(DEFAULT_RULES) > 100
    names = [r.name for r in RULES]
    assert len(names) == len(set(names)), "rule names are unique"
    for r in RULES:
        assert r.category in CATEGORIES and r.bounce_class in CLASSES, r
        assert set(r.phase) <= PHASES, r
    last = RULES[-1]
    assert (last.text, last.code, last.enhanced, last.phase) == (None, None, None, ())
    assert set(CATEGORIES) == {r.category for r in RULES} | {"message-expired"} or \
        set(CATEGORIES) >= {r.category for r in RULES}


@pytest.mark.parametrize("enhanced, category, klass", [
    ("5.1.1", "invalid-recipient", "hard"), ("4.1.1", "invalid-recipient", "soft"),
    ("5.2.2", "quota", "soft"), ("5.7.1", "policy", "block"), ("4.7.28", "rate-limited",
                                                                "transient"),
    ("5.7.25", "policy", "block"), ("5.0.0", "other", "soft"), ("5.7.999", "policy", "block"),
    ("5.9.9", "other", "soft"), ("5.4.7", "message-expired", "soft"),
    ("5.7.23", "auth-failure", "block"), ("5.1.10", "bad-domain", "hard"),
    ("4.4.5", "rate-limited", "transient"), ("5.5.2", "protocol", "soft"),
    ("5.2.1", "inactive-mailbox", "hard"), ("5.7.13", "inactive-mailbox", "hard"),
])
def test_an_enhanced_code_alone_decides_by_the_registry(enhanced, category, klass):
    c = classify(None, "", enhanced=enhanced, phase="response_text")
    assert (c.category, c.bounce_class) == (category, klass), c


# ---------------------------------------------------------------------------------- the corpora

def test_enhanced_code_table_agrees_with_the_registry_corpus():
    with corpus("enhanced_status_codes.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    total = ok = 0
    misses = []
    for row in rows:
        for column, klass in (("suggested_class_if_5xx", 5), ("suggested_class_if_4xx", 4)):
            suggestion = row[column].strip()
            if not suggestion or "?" in suggestion or suggestion in ("n/a", "unknown"):
                continue
            total += 1
            c = classify(None, "", enhanced=f"{klass}{row['code'][1:]}", phase="response_text")
            # "block|policy": the code alone allows either; the text decides
            if c.bounce_class in {CORPUS_CLASSES[s] for s in suggestion.split("|")}:
                ok += 1
            else:
                misses.append(f"{row['code']} {klass}xx: suggested {suggestion}, "
                              f"given {c.category}/{c.bounce_class}")
    print(f"\nenhanced_status_codes.csv: class agreement {ok}/{total} = {ok / total:.1%}")
    print("\n".join(misses))
    assert total > 100
    # the misses when written: X.1.10, X.7.17, X.7.18 on a 4xx, which we keep soft (a
    # temporary reply never proves an address gone)
    assert ok / total >= 0.97, misses


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
