"""Bounce classification rules (cluster.core.bounce_rules) and their config override."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config, parse_config
from cluster.core.bounce_rules import RULES, BounceRule, RuleError, RuleSet, rules_from_toml
from cluster.core.replies import DEFAULT_RULES, classify


def _set(*rules: BounceRule) -> RuleSet:
    return RuleSet(rules, "test")


@pytest.mark.parametrize("klass, code, enhanced, phase, text, want", [
    # first match wins by order, whatever text position matched
    (5, 550, "5.1.1", "rcpt", "b then a", "text-a"),
    (5, 550, None, "rcpt", "nothing", "code-55x"),
    (5, None, "5.2.2", "response_text", "nothing", "enh-x.2"),   # class from the enhanced code
    (4, 451, "4.2.2", "rcpt", "nothing", "enh-x.2"),
    (4, 451, None, "mail", "nothing", "phase-mail"),
    (4, 451, None, "rcpt", "nothing", "class-4xx"),
    (5, 551, None, "data", "nothing", "code-55x"),
    (5, 500, None, "data", "nothing", "catch-all"),
])
def test_the_first_matching_rule_wins(klass, code, enhanced, phase, text, want) -> None:
    rules = _set(BounceRule("text-a", "policy", text=r"\ba\b"),
                 BounceRule("text-b", "quota", text=r"\bb\b"),
                 BounceRule("enh-x.2", "quota", enhanced="x.2.*"),
                 BounceRule("code-55x", "invalid-recipient", code="55x"),
                 BounceRule("phase-mail", "policy", phase=("mail",)),
                 BounceRule("class-4xx", "other", code="4xx"),
                 BounceRule("catch-all", "other"))
    rule = rules.match(klass, code, enhanced, phase, text)
    assert rule is not None and rule.name == want


@pytest.mark.parametrize("rule, problem", [
    (BounceRule("x", "nonsense"), "unknown category"),
    (BounceRule("x", "quota", klass="throttle"), "unknown class"),
    (BounceRule("x", "quota", code="5"), "code"),
    (BounceRule("x", "quota", enhanced="5.1"), "enhanced"),
    (BounceRule("x", "quota", phase=("quit",)), "unknown phase"),
    (BounceRule("x", "quota", text="(unclosed"), "not a valid regular expression"),
    (BounceRule("x", "quota", text="(?P<g>a)"), "named groups"),
    (BounceRule("x", "quota", text=r"(a)\1"), "back references"),
    (BounceRule("x", "quota", text="(?i)a"), "inline flags"),
    (BounceRule("bad name!", "quota"), "name"),
])
def test_bad_rules_are_refused_naming_source_and_rule(rule, problem) -> None:
    with pytest.raises(RuleError, match=problem) as info:
        _set(BounceRule("ok", "other"), rule)
    assert str(info.value).startswith("test: rule 2 ('")


def test_rule_sets_survive_pickling_for_actors() -> None:
    again = pickle.loads(pickle.dumps(DEFAULT_RULES))
    assert again.rules == DEFAULT_RULES.rules
    assert again.match(5, 550, "5.1.1", "rcpt", "x").name == "enhanced-5.1.1"


def test_toml_rules_go_first_or_replace() -> None:
    doc = {"rule": [{"name": "acme", "text": "acme says no", "code": "5xx",
                     "category": "spam-block", "class": "block"}]}
    extended = rules_from_toml(doc, "acme.toml")
    assert len(extended) == len(RULES) + 1
    c = classify(550, "5.1.1 acme says no", rules=extended)
    assert (c.category, c.bounce_class, c.rule) == ("spam-block", "block", "acme")
    assert classify(550, "5.1.1 user unknown", rules=extended).category == "invalid-recipient"
    alone = rules_from_toml({"replace": True, **doc}, "acme.toml")
    assert len(alone) == 1
    c = classify(550, "5.1.1 user unknown", rules=alone)     # no rule matched: other, soft
    assert (c.category, c.bounce_class, c.outcome.value) == ("other", "soft", "permanent")


@pytest.mark.parametrize("doc, problem", [
    ({"rules": []}, "unknown key 'rules'"),
    ({"replace": "yes"}, "replace"),
    ({"replace": True}, "at least one"),
    ({"rule": [{"name": "a"}]}, "name and category are required"),
    ({"rule": [{"name": "a", "category": "quota", "colour": "red"}]}, "unknown keys"),
    ({"rule": [{"name": "a", "category": "quota", "text": "[z-a]"}]}, "regular expression"),
    ({"rule": [{"name": "a", "category": "quota", "backoff": "no"}]}, "backoff"),
    ({"rule": [{"name": "a", "category": "quota", "phase": [1]}]}, "phase"),
])
def test_bad_toml_rules_are_refused(doc, problem) -> None:
    with pytest.raises(RuleError, match=problem):
        rules_from_toml(doc, "x.toml")


def test_config_loads_a_rules_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "acme"\ntext = "acme quota"\ncategory = "quota"\n')
    (tmp_path / "raymta.toml").write_text('[classification]\nrules_file = "rules.toml"\n')
    cfg = load_config(tmp_path / "raymta.toml")
    assert cfg.classification.rules_file == str(tmp_path / "rules.toml")
    assert cfg.classification.rules is not None
    assert classify(550, "acme quota", rules=cfg.classification.rules).rule == "acme"
    assert parse_config({}).classification.rules is None     # the shipped rules


@pytest.mark.parametrize("content, problem", [
    ('[[rule]]\nname = "broken"\ntext = "(unclosed"\ncategory = "quota"\n',
     r"rules\.toml: rule 1 \('broken'\): text is not a valid regular expression"),
    ('[[rule]]\nname = "odd"\ncategory = "bounced"\n', "unknown category 'bounced'"),
    ("[[rule]\n", "not valid TOML"),
    (None, "cannot read"),
])
def test_a_bad_rules_file_is_a_config_error_naming_file_and_rule(tmp_path: Path, content,
                                                                 problem) -> None:
    if content is not None:
        (tmp_path / "rules.toml").write_text(content)
    with pytest.raises(ConfigError, match=problem) as info:
        parse_config({"classification": {"rules_file": str(tmp_path / "rules.toml")}})
    assert "classification.rules_file" in str(info.value)


def _reference_match(rules, klass, code, enhanced, phase, text):
    """The rules' meaning, evaluated the slow obvious way: each rule in order, every field."""
    import re

    from cluster.core.bounce_rules import _code_regex, _enh_regex
    head = f"{klass or 0}{code or 0:03d} {enhanced or '0.0.0'} {phase}"
    for r in rules:
        ph = "(?:" + "|".join(sorted(r.phase)) + ")" if r.phase else r"\w+"
        if not re.match(rf"{_code_regex(r.code)} {_enh_regex(r.enhanced)} {ph}\Z", head):
            continue
        if r.text is None or re.search(r.text, text, re.IGNORECASE | re.DOTALL):
            return r
    return None


def test_the_literal_prefilter_never_changes_which_rule_matches():
    import csv
    import random

    from tests.conftest import corpus
    with corpus("smtp_replies.csv").open(newline="", encoding="utf-8") as f:
        texts = [row["response_text"] for row in csv.DictReader(f)]
    words = " ".join(texts).split()
    rnd = random.Random(12)
    texts += [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 10))) for _ in range(400)]
    # letters IGNORECASE matches that casefold() treats otherwise, and other odd letters
    texts += ["İP address blocked", "ıp address blocked", "ſpam detected", "\u212aeep", "x\u0345 user"]
    heads = [(5, 550, "5.1.1", "rcpt"), (5, 550, None, "data"), (4, 421, None, "connect"),
             (5, None, "5.7.1", "response_text"), (4, 451, "4.3.0", "mail"),
             (None, None, None, "response_text")]
    for text in texts:
        for head in heads:
            want = _reference_match(RULES, *head, text)
            got = DEFAULT_RULES.match(*head, text)
            assert (got and got.name) == (want and want.name), (head, text)


@pytest.mark.parametrize("code, text, phase, category, klass", [
    # RFC 5321 §3.3: recipients are accepted or refused at RCPT; the same words in reply to
    # DATA come from a filter judging the message (the address was accepted): block
    (550, "5.1.1 <a@example.net>... User unknown", "rcpt", "invalid-recipient", "hard"),
    (550, "5.1.1 <a@example.net>... User unknown", "data", "policy", "block"),
    (550, "Unknown user a@example.net", "data", "policy", "block"),
    (550, "No such user here", "data", "policy", "block"),
    (550, "5.4.1 All recipient addresses rejected : Access denied", "data", "policy", "block"),
    (550, "5.1.1 Recipient address rejected", "data", "policy", "block"),
    # a refusal of MAIL FROM is about our sender, whatever it says (RFC 5321 §3.3)
    (550, "Insecure Mail Relay", "mail", "policy", "block"),
    (553, "5.1.8 Domain of sender address does not exist", "mail", "policy", "block"),
    # the phase unknown (a DSN's Diagnostic-Code alone): the words decide
    (550, "User unknown", "response_text", "invalid-recipient", "hard"),
    # RFC 7504 / RFC 7505: the recipient's host or domain takes no mail, even under the
    # sender-side 5.7.27 a reporter put on it
    (550, "5.7.27 Host does not accept mail", "response_text", "bad-domain", "hard"),
    (556, "5.1.10 Domain does not accept mail", "rcpt", "bad-domain", "hard"),
    (550, "5.7.27 Sender address has null MX", "mail", "policy", "block"),
])
def test_the_phase_a_reply_answered_decides_what_was_refused(code, text, phase, category,
                                                             klass) -> None:
    c = classify(code, text, phase=phase)
    assert (c.category, c.bounce_class) == (category, klass), c


@pytest.mark.parametrize("code, text, phase, category, klass", [
    # RFC 3463 §3.3: X.2.0 and X.2.1 say the mailbox exists; "user unknown" words under them,
    # the phase unknown, are a filter refusing this mail (sisimai: Status 5.2.0/5.2.1 is
    # "filtered")
    (550, "5.2.1 <a@example.net>... User Unknown", "response_text", "policy", "block"),
    (550, "5.2.0 Unknown user a@example.net", "response_text", "policy", "block"),
    (None, "5.2.1 No such user here", "response_text", "policy", "block"),
    # refused at RCPT, the words keep their meaning (RFC 5321 §3.3); after DATA a filter
    (550, "5.2.1 <a@example.net>... User Unknown", "rcpt", "invalid-recipient", "hard"),
    (550, "5.2.1 <a@example.net>... User Unknown", "data", "policy", "block"),
    # an address code decides, whatever the phase; without any code the words decide
    (550, "5.1.1 <a@example.net>... User Unknown", "response_text", "invalid-recipient", "hard"),
    (550, "<a@example.net>... User Unknown", "response_text", "invalid-recipient", "hard"),
    # other X.2.1 texts are unchanged: a suspended or disabled mailbox may come back
    (550, "5.2.1 The email account that you tried to reach is disabled", "response_text",
     "inactive-mailbox", "soft"),
    # a 4xx proves nothing permanent: a temporary failure of the recipient
    (450, "4.2.1 <a@example.net>... User Unknown", "response_text", "invalid-recipient", "soft"),
])
def test_user_unknown_words_under_a_mailbox_exists_code(code, text, phase, category,
                                                        klass) -> None:
    c = classify(code, text, phase=phase)
    assert (c.category, c.bounce_class) == (category, klass), c


@pytest.mark.parametrize("code, text, category, klass", [
    # au (KDDI): its reception filter answers "550 : User unknown" with the address left out;
    # an address it does not have gets "550 <address>: User unknown"
    (550, ": User unknown", "policy", "block"),
    (None, "smtp;550 : User unknown", "policy", "block"),
    (None, ("Sorry, we were unable to deliver your message to the following address. "
            "<a@example.net>: 550: : User unknown"), "policy", "block"),
    (550, "<a@example.net>: User unknown", "invalid-recipient", "hard"),
    (None, "<a@example.net>: 550 <a@example.net>: User unknown", "invalid-recipient", "hard"),
    # a temporary reply stays temporary
    (450, ": User unknown", "invalid-recipient", "soft"),
])
def test_a_user_unknown_that_names_no_address_is_a_reception_filter(code, text, category,
                                                                     klass) -> None:
    c = classify(code, text, phase="response_text")
    assert (c.category, c.bounce_class) == (category, klass), c


@pytest.mark.parametrize("code, text, phase, category, klass", [
    # RFC 5321 §3.1, §4.1.1.1: before MAIL FROM nothing but our client was named
    (501, "5.0.0 Invalid domain name", "ehlo", "policy", "block"),
    (550, "User unknown", "greeting", "policy", "block"),
    (554, "No such domain", "connect", "policy", "block"),
    # the cause texts still name the reason
    (554, "5.7.1 Service unavailable; Client host blocked using zen.spamhaus.org", "greeting",
     "spam-block", "block"),
    # the same words after RCPT are about the recipient
    (501, "5.0.0 Invalid domain name", "rcpt", "bad-domain", "hard"),
])
def test_a_refusal_before_mail_from_is_of_our_client(code, text, phase, category,
                                                     klass) -> None:
    c = classify(code, text, phase=phase)
    assert (c.category, c.bounce_class) == (category, klass), c
