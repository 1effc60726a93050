"""Bounce and complaint intake decisions: which RCPT to accept, which message a report is
about, and what (if anything) it tells the queue.

Role: the pure half of the bounce/FBL listener (``actors/bounce_listener.py`` moves the bytes).

- :func:`check_rcpt`: at RCPT, accept only the VERP return paths raymta issued (the HMAC tag
  verified with every accepted key, :mod:`cluster.core.verp`) and the configured feedback-loop
  address; anything else, a forged or altered tag included, is refused (550 5.1.1), so a
  forged bounce never reaches DATA.
  With ``[[unsubscribe]]``, ``unsub-TOKEN@`` (token verified) and ``unsub@`` (token in the
  Subject, checked at DATA) too (:mod:`cluster.core.unsubscribe`).
- :func:`claims`: the message ids a parsed report (:func:`cluster.core.dsn.parse_message`) is
  about: the verified VERP recipients first; for mail to the FBL address, a VERP return path
  named in the report (ARF Original-Mail-From, the returned message's Return-Path) verified
  the same way; else the parser's *unverified* id (Original-Envelope-Id, X-Raymta-Id).
- :func:`decide`: the ``outside_reports`` item for one claim, given the recipient the owning
  shard says the message was for, or the reason nothing is recorded (auto-reply, unknown
  report, bounce of a bounce, success notice, unknown message id, an unverified id whose report
  names another recipient).

Rules kept here:
- The recipient recorded (and maybe suppressed) is always the *message's* recipient as the
  shard knows it, never an address the report names: a report sent to a real return path by
  someone who saw it (every recipient does) cannot suppress anybody else.
- A delay notice (RFC 3464 ``Action: delayed``) and a soft bounce are recorded with class
  soft and never a category that suppresses.

Pure: no I/O, no clock, no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster.core.dsn import Recipient, Report
from cluster.core.suppression import HARD_CATEGORIES, normalize_address
from cluster.core.unsubscribe import read_token, token_from_mail
from cluster.core.verp import VerpKeys, decode

__all__ = ["Claim", "Decision", "RcptVerdict", "check_rcpt", "claims", "decide"]


@dataclass(frozen=True)
class RcptVerdict:
    """``kind``: ``verp`` (a return path we issued: ``message_id`` set), ``fbl`` (the feedback
    loop address), ``unsub`` (a signed unsubscribe address: ``unsubscribe`` = (recipient,
    sender domain)), ``unsub-subject`` (``unsub@``: the token is in the Subject) or ``refuse``
    (``reason`` says why)."""

    kind: str
    message_id: str | None = None
    reason: str = ""
    unsubscribe: tuple[str, str] | None = None

    @property
    def accepted(self) -> bool:
        return self.kind != "refuse"


def check_rcpt(address: str, keys: VerpKeys, *, prefix: str, domain: str,
               fbl_address: str = "",
               unsub_keys: Mapping[str, VerpKeys] | None = None) -> RcptVerdict:
    addr = address.strip().strip("<>").lower()
    if fbl_address and addr == fbl_address.lower():
        return RcptVerdict("fbl")
    local, _, dom = addr.rpartition("@")
    if unsub_keys and dom.rstrip(".") == domain.lower().rstrip(".") and (
            local == "unsub" or local.startswith("unsub-")):
        if local == "unsub":
            return RcptVerdict("unsub-subject")
        t = read_token(token_from_mail(local, None) or "", unsub_keys)
        if t.ok and t.recipient and t.domain:
            return RcptVerdict("unsub", unsubscribe=(t.recipient, t.domain))
        return RcptVerdict("refuse", reason=f"unsubscribe address: {t.reason}")
    r = decode(addr, keys, prefix=prefix, domain=domain)
    if r.ok:
        return RcptVerdict("verp", r.message_id)
    return RcptVerdict("refuse", reason=r.reason or "not a return path of ours")


@dataclass(frozen=True)
class Claim:
    """A message id a report is about; ``verified``: proven by a VERP tag."""

    message_id: str
    verified: bool
    how: str


def claims(report: Report, verdicts: list[RcptVerdict], keys: VerpKeys, *, prefix: str,
           domain: str) -> list[Claim]:
    out: dict[str, Claim] = {}
    for v in verdicts:
        if v.kind == "verp" and v.message_id:
            out.setdefault(v.message_id, Claim(v.message_id, True, "VERP recipient"))
    if out:
        return list(out.values())
    fb = report.feedback
    named = []
    if fb is not None:
        named = [fb.original_mail_from, fb.original_headers.get("Return-Path")]
    for value in named:
        if value:
            r = decode(value, keys, prefix=prefix, domain=domain)
            if r.ok and r.message_id:
                return [Claim(r.message_id, True, "VERP return path named in the report")]
    if report.raymta_id:
        return [Claim(report.raymta_id, False, "message id field of the report (unverified)")]
    return []


@dataclass(frozen=True)
class Decision:
    """``item`` for ``outside_reports``, or None with ``reason`` (for the log line)."""

    item: dict[str, Any] | None
    reason: str


_SUCCESS = ("delivered", "relayed", "expanded")


def _pick(recipients: tuple[Recipient, ...], rcpt: str) -> Recipient | None:
    for r in recipients:
        if r.recipient and normalize_address(r.recipient) == rcpt:
            return r
    for r in recipients:
        if r.original_recipient and normalize_address(r.original_recipient) == rcpt:
            return r
    failed = [r for r in recipients if r.action not in _SUCCESS]
    return (failed or list(recipients))[0] if recipients else None


def _names(report: Report, rcpt: str) -> bool:
    found = set()
    for r in report.recipients:
        for a in (r.recipient, r.original_recipient):
            if a:
                found.add(normalize_address(a))
    fb = report.feedback
    if fb is not None:
        found.update(normalize_address(a) for a in fb.original_rcpt_to)
        if fb.original_recipient:
            found.add(normalize_address(fb.original_recipient))
    return rcpt in found


def decide(report: Report, claim: Claim | None, message_recipient: str | None) -> Decision:
    """What the report records about ``claim``'s message, whose recipient (as the owning shard
    knows it) is ``message_recipient`` (None: the shard does not know the id)."""
    if report.kind == "autoreply":
        return Decision(None, f"auto-reply ({report.reason}): nothing recorded")
    if report.kind not in ("dsn", "arf"):
        return Decision(None, f"not a bounce or complaint ({report.reason}): nothing recorded")
    if report.loop:
        return Decision(None, f"{report.reason}: nothing recorded")
    if claim is None:
        return Decision(None, f"{report.kind} report names no message of ours: nothing "
                        "recorded")
    if message_recipient is None:
        return Decision(None, f"{report.kind} report about unknown message id "
                        f"{claim.message_id} ({claim.how}): nothing recorded")
    rcpt = normalize_address(message_recipient)
    if not claim.verified and not _names(report, rcpt):
        return Decision(None, f"unverified message id {claim.message_id} and the report does "
                        "not name that message's recipient: nothing recorded")
    base: dict[str, Any] = {"id": claim.message_id, "recipient": rcpt}
    if report.kind == "arf":
        fb = report.feedback
        return Decision({**base, "kind": "complaint", "category": None, "class": None,
                         "status": None, "diagnostic": None,
                         "feedback_type": (fb.feedback_type if fb else None) or "abuse",
                         "reporter": report.reporting_mta or (fb.user_agent if fb else None)},
                        f"complaint about {claim.message_id} ({claim.how})")
    r = _pick(report.recipients, rcpt)
    if r is None:
        return Decision(None, "delivery report without a recipient: nothing recorded")
    if r.action in _SUCCESS:
        return Decision(None, f"success notification (action {r.action}) for "
                        f"{claim.message_id}: nothing recorded")
    category, klass = r.category or "other", r.bounce_class or "soft"
    if r.action == "delayed" or klass != "hard":
        # a delay notice or a soft bounce must never suppress
        klass = "soft" if r.action == "delayed" else klass
        if category in HARD_CATEGORIES:
            category = "other" if r.action == "delayed" else category
    return Decision({**base, "kind": "bounce", "category": category, "class": klass,
                     "status": r.status, "diagnostic": r.diagnostic, "feedback_type": None,
                     "reporter": report.reporting_mta or r.remote_mta,
                     **({"action": r.action} if r.action else {})},
                    f"{klass} bounce ({category}) about {claim.message_id} ({claim.how})")
