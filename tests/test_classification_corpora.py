"""Agreement of raymta's bounce classes with the labels of the shared corpora.

Our classes map onto the corpora's as documented in cluster/core/bounce_rules.py (hard -> hard,
soft -> soft, throttle -> transient, block and policy -> block, not_bounce -> no class). Two
corpora:

- ``smtp_replies.csv``: reply lines. A line is the whole evidence only where the label was
  given for the line ("upstream string-level test", unit tests, community rules); that is
  where the 95 % bar applies. The other rows carry labels of whole bounce messages ("reason
  may rely on more than this line": the command it answered, the MTA's own notes) and are
  measured, with their own floor, here and again as messages in the bounce corpus.
- ``bounces/manifest.csv`` + the .eml files, through the DSN parser: every labelled recipient.

Each test prints its agreement and per-class and per-category confusion (``pytest -s``); the
assertion message carries them too. The bars are measured figures, not targets tuned to files:
held-back material of the same kind judges the rules.
"""

from __future__ import annotations

import collections
import csv

from cluster.core.bounce_rules import CORPUS_CLASSES
from cluster.core.dsn import parse_message
from cluster.core.replies import classify, parse_reply
from tests.conftest import corpus


def _rows(*parts: str) -> list[dict[str, str]]:
    with corpus(*parts).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class Tally:
    """Agreement by expected class, with what was given instead and the categories given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.by_class: dict[str | None, collections.Counter[str | None]] = \
            collections.defaultdict(collections.Counter)
        self.by_category: dict[str | None, collections.Counter[str | None]] = \
            collections.defaultdict(collections.Counter)
        self.misses: list[str] = []

    def add(self, expected: str | None, got: str | None, category: str | None,
            what: str) -> None:
        self.by_class[expected][got] += 1
        self.by_category[category][expected] += 1
        if got != expected:
            self.misses.append(f"  {expected!s:>9} <- {got!s:<9} {category!s:<17} {what[:100]}")

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.by_class.values())

    @property
    def agreed(self) -> int:
        return sum(c[k] for k, c in self.by_class.items())

    @property
    def rate(self) -> float:
        return self.agreed / self.total

    def report(self) -> str:
        lines = [f"{self.name}: agreement {self.agreed}/{self.total} = {self.rate:.1%}",
                 "  per expected value: agreed/total, then what was given instead"]
        for k in sorted(self.by_class, key=str):
            c = self.by_class[k]
            others = ", ".join(f"{g}={n}" for g, n in c.most_common() if g != k)
            lines.append(f"    {k!s:>9}: {c[k]:3}/{sum(c.values()):<3} {others}")
        lines.append("  per category (or kind) given: count, and the expected values of its cases")
        for cat in sorted(self.by_category, key=str):
            c = self.by_category[cat]
            lines.append(f"    {cat!s:>17}: {sum(c.values()):3}  " +
                         ", ".join(f"{e}={n}" for e, n in c.most_common()))
        lines.append("  disagreements (expected <- given, category, text):")
        lines.extend(self.misses)
        return "\n".join(lines)


def _reply_tallies() -> tuple[Tally, Tally]:
    line, whole = Tally("smtp_replies.csv, line-level labels"), \
        Tally("smtp_replies.csv, whole-message labels")
    for row in _rows("smtp_replies.csv"):
        if row["expected_class"] not in CORPUS_CLASSES:
            continue          # "unknown": the upstream asserts no class
        reply = parse_reply(row["response_text"])
        code = reply.code
        if code is None and row["smtp_code"].strip():
            code = int(row["smtp_code"])
        enhanced = reply.enhanced or row["enhanced_code"].strip() or None
        # the corpus does not say which command each reply answered
        c = classify(code, row["response_text"], enhanced=enhanced, phase="response_text")
        tally = whole if "whole-message" in row["label_basis"] else line
        tally.add(CORPUS_CLASSES[row["expected_class"]], c.bounce_class, c.category,
                  row["response_text"])
    return line, whole


def test_reply_lines_agree_with_their_labels_at_95_percent():
    line, whole = _reply_tallies()
    print("\n" + line.report() + "\n" + whole.report())
    assert line.total > 80
    # measured: line-level 94/98 = 95.9 %; whole-message 139/156 = 89.1 % (138 before the rules
    # for "User unknown" under X.2.0/X.2.1 and with the address left out; 135 before that; most
    # of the rest are sisimai's "filtered" for a plain "User unknown" of unknown phase)
    assert line.rate >= 0.95, line.report()
    assert whole.rate >= 0.89, whole.report()


def test_permanence_agrees_with_the_reply_corpus():
    rows = [r for r in _rows("smtp_replies.csv") if r["expected_permanent"] in ("true", "false")]
    ok = 0
    for row in rows:
        reply = parse_reply(row["response_text"])
        code = reply.code or (int(row["smtp_code"]) if row["smtp_code"].strip() else None)
        c = classify(code, row["response_text"], enhanced=reply.enhanced or
                     row["enhanced_code"].strip() or None, phase="response_text")
        ok += c.permanent == (row["expected_permanent"] == "true")
    print(f"\nsmtp_replies.csv: permanent/transient agreement {ok}/{len(rows)}")
    assert ok / len(rows) >= 0.96


def _bounce_tallies() -> tuple[Tally, Tally, int]:
    classes, kinds = Tally("bounces/manifest.csv, class per recipient"), \
        Tally("bounces/manifest.csv, kind per file")
    by_file: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    for row in _rows("bounces", "manifest.csv"):
        by_file[row["file"]].append(row)
    files = 0
    for name, rows in by_file.items():
        report = parse_message(corpus(name).read_bytes())
        files += 1
        expected_kind = "arf" if rows[0]["expected_class"] == "complaint" else \
            "not a bounce" if rows[0]["expected_is_bounce"] != "yes" else "dsn"
        got_kind = "not a bounce" if report.kind in ("autoreply", "unknown") and \
            expected_kind == "not a bounce" else report.kind
        if expected_kind == "not a bounce" and report.kind == "dsn" and all(
                r.bounce_class is None for r in report.recipients):
            got_kind = "not a bounce"     # a success or delay notice
        kinds.add(expected_kind, got_kind, report.kind, f"{name} {report.reason}")
        for row in rows:
            expected = CORPUS_CLASSES.get(row["expected_class"], "-")
            if expected in ("-", None) or row["expected_is_bounce"] != "yes":
                continue
            i = int(row["recipient_index"] or 1) - 1
            r = report.recipients[i] if i < len(report.recipients) else report.first
            classes.add(expected, r.bounce_class if r else None, r.category if r else None,
                        f"{name.rsplit('/', 1)[-1]} [{row['expected_reason']}] "
                        f"{(r.diagnostic if r else None) or report.reason}")
    return classes, kinds, files


def test_bounce_messages_agree_with_their_labels():
    classes, kinds, files = _bounce_tallies()
    print("\n" + classes.report() + "\n" + kinds.report())
    assert files > 400
    # measured: 381/411 = 92.7 % of recipient classes, kinds 407/411 = 99.0 % (377 and 405
    # before a bounce of a bounce was read as a report marked as a loop, not skipped as
    # unknown, and "No valid recipients" / "check if address is correct" in a notice without
    # codes became a wrong address; 371 before "User unknown" under
    # X.2.0/X.2.1 with no SMTP command named became a filter's refusal (RFC 3463 §3.3: those
    # codes say the mailbox exists), au/KDDI's "550 : User unknown" (address left out) its
    # reception filter, and Postfix's "<a>: Recipient address rejected:" a RCPT refusal; 369
    # before a notice that returns the message and says it "could not be delivered to
    # <address>" counted as a bounce — au/KDDI's own format; 358/411 = 87.1 % before the SMTP
    # phase was read from Sendmail transcripts and qmail-remote texts and a 4.X.X abandonment
    # stopped counting as hard); kinds 405/411 = 98.5 % (was 403). 14 of the 34 left are
    # sisimai's "filtered" for a "User unknown" that names no SMTP command (12) or that a
    # Sendmail transcript shows refused at RCPT (2): sisimai decides those by the reporting
    # MTA's or the remote host's own habits, and as many "User unknown" of unknown phase are
    # labelled "userunknown" (treating every such one as filtered at the time: 374/411),
    # so no general rule separates them; we follow the words (hard: RFC 5321 §3.3 puts
    # recipient refusals at RCPT). Floors against regressions, not goals: the 95 % is
    # not reached.
    assert classes.rate >= 0.927, classes.report()
    assert kinds.rate >= 0.98, kinds.report()
