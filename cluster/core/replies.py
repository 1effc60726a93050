"""SMTP reply policy: what a reply means for the message, the recipient and the site.

All of raymta's reply policy lives here (as all of Postfix's lives in ``smtp_trouble.c``):
parsing reply lines (:func:`parse_reply`), turning a reply into an outcome (delivered,
transient, permanent), a bounce category and a "site wants us to slow down" signal
(:func:`classify`), and the outcomes raymta produces itself, without a server reply
(:func:`dns_failure`, :func:`connection_failure`, :func:`expired`).

The rules are data, meant to be read by operators: :data:`ENHANCED_CODES` (RFC 3463 status
codes by subject.detail), :data:`CAUSE_RULES` (texts that name their cause so plainly they
outrank the enhanced code) and :data:`TEXT_RULES` (texts consulted when the enhanced code is
absent or undecided). Rules are general; none is written for a single server's line.

Pure: no I/O, no Ray, no clock. Must not decide *when* to retry (:mod:`cluster.core.retry`) or
how fast to send (the throttle); it only says what the reply asked for.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "AUTO_REPLY",
    "CATEGORIES",
    "CAUSE_RULES",
    "ENHANCED_CODES",
    "ENHANCED_SUBJECTS",
    "PHASES",
    "TEXT_RULES",
    "Classification",
    "Outcome",
    "Reply",
    "Rule",
    "bounce_category",
    "classify",
    "connection_failure",
    "dns_failure",
    "enhanced_category",
    "expired",
    "parse_reply",
]


class Outcome(str, enum.Enum):
    DELIVERED = "delivered"   # 2xx: done
    TRANSIENT = "transient"   # 4xx (and friends): defer and retry
    PERMANENT = "permanent"   # 5xx: bounce


#: Bounce categories, in the language of mail operators:
#: hard = the address or domain does not exist (suppress it); soft = other failures that may
#: succeed later (mailbox full, network, system); throttle = slow down; block = the *sender* is
#: blocked (blocklists, reputation, PTR, spam, virus); policy = the message or sender breaks a
#: policy (SPF/DKIM/DMARC, relay, content, RFC compliance); not_bounce = not a failure (e.g. an
#: auto-reply); expired = raymta gave up after max_age; unknown = nothing recognisable.
CATEGORIES = ("delivered", "hard", "soft", "throttle", "block", "policy", "not_bounce",
              "expired", "unknown")

#: Where in the conversation a reply was received. "connection" is the SMTP adapter's name for
#: a reply on a connection that then broke; "response_text" is text with unknown phase (e.g.
#: the Diagnostic-Code of a DSN).
PHASES = frozenset({"connect", "connection", "greeting", "ehlo", "starttls", "mail", "rcpt",
                    "data", "dns", "response_text"})

# ---------------------------------------------------------------------------------- parsing

# RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39, then SP or "-" (continuation).
# Servers in the wild also send 1xx/3xx codes and second digits above 5 (570, 571): accepted.
_CODE_LINE = re.compile(r"(?P<code>[1-5]\d\d)(?:(?P<sep>[ -])(?P<rest>.*)|$)", re.DOTALL)
# RFC 3463 §2: class.subject.detail, class 2/4/5, subject and detail 1-3 digits.
_ENH = r"[245]\.\d{1,3}\.\d{1,3}"
_ENH_LEAD = re.compile(rf"#?(?P<enh>{_ENH})(?!\d|\.\d)[\s:;,-]*", re.DOTALL)
_ENH_ANY = re.compile(rf"(?<![\w.])#?(?P<enh>{_ENH})(?!\d|\.\d)")
_ENH_FULL = re.compile(r"(?P<c>[245])\.(?P<s>\d{1,3})\.(?P<d>\d{1,3})")
# What bounce reports and MTA logs put in front of a reply (RFC 3464 §2.3.6 Diagnostic-Code
# "smtp; 550 ...", Postfix "host x said: 550 ...", Exchange "#550 ...", "Remote host said:").
_PREFIX = re.compile(r"(?:e?smtp\s*;\s*|[#:]\s*|.{0,200}?\bsaid:\s*)", re.IGNORECASE | re.DOTALL)
# Other RFC 3464 diagnostic types ("X-Unix; 255", "X-Postfix; ..."): what follows is not an
# SMTP reply, so a number there is not a reply code.
_NON_SMTP_DIAG = re.compile(r"x-[\w.-]+\s*;\s*", re.IGNORECASE)
# A second reply embedded in text: "220-laposte 421 4.2.1 Service refused".
_EMBEDDED = re.compile(rf"(?<!\S)(?P<code>[45]\d\d)[ -](?P<enh>{_ENH})(?!\d|\.\d)\s*")


@dataclass(frozen=True)
class Reply:
    """A parsed reply: basic code (None if the text had none), enhanced status code (RFC 3463,
    None if absent), and the text without either."""

    code: int | None
    enhanced: str | None
    text: str

    def __str__(self) -> str:
        return " ".join(str(p) for p in (self.code, self.enhanced, self.text) if p)


def _norm_enhanced(enh: str) -> str:
    m = _ENH_FULL.fullmatch(enh.lstrip("#"))
    assert m is not None
    return f"{m['c']}.{int(m['s'])}.{int(m['d'])}"


def parse_reply(line: str) -> Reply:
    """Parse a reply as a server sent it, or as a log or DSN quotes it.

    Handles single and multi-line replies (RFC 5321 §4.2: ``550-...`` lines then ``550 ...``;
    texts are joined with a space), enhanced codes after the basic code (RFC 2034), texts
    with no code, enhanced codes without a basic code (``"5.2.2 Mailbox full"``,
    ``"... #5.1.1"``) and the usual quoting prefixes (``"smtp; 550 ..."``, ``"said: 550 ..."``).
    """
    lines = [ln.strip() for ln in line.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return Reply(None, None, "")
    first = lines[0]
    diag = _NON_SMTP_DIAG.match(first)
    if diag:
        text = " ".join([first[diag.end():], *lines[1:]]).strip()
        a = _ENH_ANY.search(text)
        return Reply(None, _norm_enhanced(a["enh"]) if a else None, text)
    if not _CODE_LINE.match(first) and not _ENH_LEAD.match(first):
        p = _PREFIX.match(first)
        if p and (_CODE_LINE.match(first, p.end()) or _ENH_LEAD.match(first, p.end())):
            lines[0] = first[p.end():]
    code: int | None = None
    enhanced: str | None = None
    texts: list[str] = []
    for ln in lines:
        m = _CODE_LINE.match(ln)
        if m:
            c = int(m["code"])
            if code is None or m["sep"] != "-":   # the last line's code is the reply's
                code = c
            ln = (m["rest"] or "").strip()
        e = _ENH_LEAD.match(ln)
        # Servers do send "554 4.4.7" and "552 4.2.2": a failure reply keeps an enhanced code
        # of the other failure class (the basic code decides the outcome, the enhanced code
        # still carries the detail).
        if e and (code is None or code >= 400 or e["enh"][0] == str(code)[0]):
            enhanced = enhanced or _norm_enhanced(e["enh"])
            ln = ln[e.end():]
            # "2.1.5 250 OK": an enhanced code followed by a basic code of the same class
            if code is None:
                m2 = _CODE_LINE.match(ln)
                if m2 and m2["code"][0] == enhanced[0]:
                    code = int(m2["code"])
                    ln = (m2["rest"] or "").strip()
        if ln:
            texts.append(ln)
    text = " ".join(texts)
    if code is not None and code < 400:
        # A positive or intermediate code with a failure reply inside it is a transcript of
        # two replies (a multi-line greeting cut short by "421 ..."): the failure counts.
        emb = _EMBEDDED.search(text)
        if emb and emb["code"][0] == emb["enh"][0]:
            code, enhanced = int(emb["code"]), _norm_enhanced(emb["enh"])
            text = text[emb.end():]
    if enhanced is None:
        # RFC 2034 puts it right after the basic code, but quoted texts carry it anywhere
        # ("... #5.1.1"); only one of the reply's class is believed there.
        for a in _ENH_ANY.finditer(text):
            if code is None or a["enh"][0] == str(code)[0]:
                enhanced = _norm_enhanced(a["enh"])
                break
    if code is not None and enhanced is not None:
        text = _unflatten(text, code, enhanced)
    return Reply(code, enhanced, text.strip())


def _unflatten(text: str, code: int, enhanced: str) -> str:
    # Multi-line replies flattened into one line by a log: drop the repeated "550-5.7.26 "
    # line prefixes so the rules see the sentence.
    subject = enhanced.split(".")[1]
    pat = re.compile(rf"(?<!\S){code}(?:-|\s+(?=[245]\.{subject}\.))"
                     rf"(?:\s*[245]\.{subject}\.\d{{1,3}}(?![\w.]))?\s*")
    return " ".join(pat.sub(" ", text).split())


# ------------------------------------------------------------------------------ the rules

class Rule(NamedTuple):
    """One text rule: when ``pattern`` matches the reply text, the reply is ``category``
    (a :data:`CATEGORIES` member; a pair ``(if_transient, if_permanent)`` when the answer
    depends on the reply's class; None to only set the flag) and ``site_backoff`` says that
    the whole site asked us to slow down (only honoured on transient replies)."""

    pattern: re.Pattern[str]
    category: str | tuple[str, str] | None
    site_backoff: bool


def _r(pattern: str, category: str | tuple[str, str] | None, site_backoff: bool = False) -> Rule:
    return Rule(re.compile(pattern, re.IGNORECASE), category, site_backoff)


#: Auto-replies are not bounces (sisimai "vacation"); only checked for text without any code.
AUTO_REPLY = re.compile(
    r"\b(?:out of (?:the )?office|on (?:vacation|holiday|leave)|i am (?:currently )?away|"
    r"i will be (?:away|out|traveling|travelling|on)|auto(?:matic)?[- ]?(?:reply|response)|"
    r"away (?:from|until) )", re.IGNORECASE)

#: Texts that name their cause plainly. Checked first, in order; they outrank the enhanced
#: code because servers put generic codes on specific refusals (5.1.1 on a rate limit, 5.1.0
#: on an SPF failure, 5.7.1 on everything).
CAUSE_RULES: tuple[Rule, ...] = (
    # --- an explicit spam verdict (checked before authentication: Gmail's auth refusals say
    # "to protect our users from spam", which is not a verdict)
    _r(r"\b(?:rejected|blocked|refused|identified|classified|detected|flagged) (?:as|due to|"
       r"because of|for) (?:\w+ )?spam\b|\bspam (?:detected|classification|content)|"
       r"\bscored as spam", "block"),
    # --- sender authentication (RFC 7208 SPF, RFC 6376 DKIM, RFC 7489 DMARC, RFC 8617 ARC)
    _r(r"\b(?:spf|dkim|dmarc|arc)\b|sender policy framework|domainkeys|\bunauthenticated\b|"
       r"\bauthenticat(?:e|ed|ion)\b|\bsmtp auth", "policy"),
    # --- relaying refused (RFC 5321 §3.6): our sender is not allowed to use the host
    _r(r"\brelay(?:ing)?\b.{0,20}\b(?:denied|not permitted|not allowed|prohibited|refused)|"
       r"\b(?:unable|not configured|not allowed|not permitted|denied) to relay\b|\bno relay",
       "policy"),
    _r(r"\b(?:address|identit(?:y|ies)|sender|domain)s? (?:is |are )?not verified\b|"
       r"failed the check", "policy"),
    # --- the recipient's own filters: about this sender, not the address
    _r(r"recipient(?:'s)? (?:preferences|filter)|blocked by the recipient|"
       r"rejected by (?:the )?recipient|\bfiltered\b|\bcontent filter", "policy"),
    # --- RFC 5322 / RFC 5321 compliance of the message or the session
    _r(r"\brfc[- ]?(?:5322|2822|822|5321|2821)\b|\bnot (?:rfc[- ]?)?compliant|non-?compliant|"
       r"multiple (?:addresses in from|\w+ headers?)|duplicate header|8-?bit data|"
       r"\bbinary content|improperly[- ]formatted|protocol violation|(?:improper|bad) sequence",
       "policy"),
    # --- rates and volume: slow down. Per-transaction recipient limits are not site-wide.
    _r(r"too many recipients(?! this)", "throttle"),
    _r(r"\brate[- ]?limit|\b(?:receiving|sending) mail at a rate|\brate (?:of|exceeded|too)|"
       r"too (?:fast|many (?:messages|mails?|e-?mails|connections|sessions|concurrent|"
       r"recipients this)|much mail)|\bslow(?:er| down)\b|\bfrequency\b|\bthrottl|"
       r"unexpected volume|max(?:imum)? (?:number of )?(?:messages?|connections?|sessions?) "
       r"(?:per|reached|exceeded)|(?:limit|quota) (?:exceeded|reached) for (?:sending|messages)|"
       r"(?:sending|message|connection) (?:limit|quota) (?:exceeded|reached)", "throttle", True),
    # deferred by the site (Yahoo "[TSS04] ... temporarily deferred", "... deferred")
    _r(r"\bdeferred\b|\[(?:TSS?|IPTS)\d+\]", "throttle", True),
    # --- reputation: a 4xx asks us to slow down, a 5xx blocks us
    _r(r"\breputation\b|\b(?:user|spam) complaints\b", ("throttle", "block"), True),
    # --- blocklists (DNSBL/RBL, RFC 5782) and named list operators
    _r(r"\b(?:dnsbl|dnsrbl|uribl|surbl|spamhaus|spamcop|sorbs|barracuda|mailspike|uceprotect|"
       r"spamrats|abuseat|senderscore)|rbl\b|\bblocked using\b|"
       r"\b(?:block|black|deny|ban)[- ]?list(?:ed|ing)?\b|\blisted (?:at|on|in|by)\b", "block"),
    # --- reverse DNS / PTR of our IP (RFC 7372 X.7.25; RFC 1912 §2.1)
    _r(r"\bptr\b|\breverse (?:dns|lookup|mapping|resolution)|\brdns\b|ip name lookup failed|"
       r"mismatches client ip|may not be mail exchanger|client host rejected|"
       r"(?:cannot|can't|unable to) (?:find|resolve) your (?:hostname|host name)", "block"),
    # --- our IP is refused ("Access from ip address ... blocked", "banned sending IP")
    _r(r"\bip(?: address)?\b.{0,40}?\b(?:blocked|banned|blacklisted|blocklisted|rejected|"
       r"forbidden|not allowed|refused|denied)|\b(?:blocked|banned|forbidden|invalid)\b.{0,20}?"
       r"\b(?:ip|client)\b|\bconnections? from .{0,60}?\b(?:rejected|refused|not accepted)|"
       r"\bconnections? (?:are |is )?not accepted from|\b(?:not accepted|refused|rejected|"
       r"not allowed) from (?:this|your|the) (?:ip|host|server|network|client)\b", "block"),
    # --- our sender address or domain is refused (RFC 3463 X.1.7, X.1.8): never the recipient
    _r(r"\bsender (?:address |domain )?(?:rejected|denied|refused|unknown|invalid|not allowed)|"
       r"\bdomain of sender address|\bsender (?:domain )?(?:does not exist|not found)", "policy"),
    # --- the recipient mailbox is known not to exist (Microsoft DBEB: "550 5.4.1 Recipient
    # address rejected: Access denied" is sent for addresses not in the directory)
    _r(r"recipient address rejected: access denied", "hard"),
    # --- spam and malware judgements on our message
    _r(r"\b(?:spam|junk|ube|uce|bulk mail)\b|\bvirus|\bmalware|\bphish|\binfected\b|"
       r"\bcontent rejected\b|\b(?:message|mail) ?scor|\bscored as", "block"),
)

#: Texts consulted when no cause rule matched and the enhanced code is absent or does not
#: decide (undecided X.1.0, X.4.4, X.7.1; the catch-all X.Y.0 of every subject; the generic
#: "soft" of every 4xx). First match with a category wins; flags accumulate.
TEXT_RULES: tuple[Rule, ...] = (
    # --- flags only: the site asks us to come back later (sets site_backoff, no category)
    _r(r"\btry (?:again )?later\b|\bplease try again\b|\bcome back later\b", None, True),
    # --- mailbox suspended / locked: may come back (sisimai "suspend")
    _r(r"\bsuspend(?:ed)?\b|\btemporar(?:y|ily) (?:locked|disabled|blocked)|\bfrozen\b|"
       r"(?:account|mailbox) (?:is |has been )?(?:locked|blocked)", "soft"),
    # --- greylisting (RFC 6647): retry, not a site-wide slowdown
    _r(r"\bgrey ?list|\bgray ?list", "soft"),
    # --- the address or domain does not exist (RFC 3463 X.1.1, X.1.2, X.1.6, X.1.10)
    _r(r"\b(?:user|mailbox|recipient|address|account|addressee)s? (?:is )?(?:unknown|not found|"
       r"does ?n[o']t exist|not exist|invalid|unavailable|rejected\.?$)|"
       r"\b(?:unknown|invalid|no such|non-?existent|bad) (?:user|mailbox|recipient|address|"
       r"account|local ?part|e-?mail address|destination mailbox)|"
       r"\b(?:does ?n[o']t|doesn't|does not) (?:exist|have an? (?:\S+ )?account)|"
       r"\bnot (?:a valid|an existing) (?:user|mailbox|recipient|address)|"
       r"\brecipient not found|\bno (?:mailbox|account) (?:here|by that name|found)|"
       r"address rejected|\bnot our customer|\bno longer (?:on|at|with|valid|available|active)|"
       r"\bhas (?:moved|been replaced)|\breplaced by\b|\bno forwarding address|"
       r"\bunrout(?:e)?able (?:address|domain)|(?:mailbox|account|user|recipient|address)"
       r"(?: \w+)? (?:is |has been )?(?:disabled|deactivated|inactive|closed|terminated)", "hard"),
    _r(r"\b(?:host|domain)(?: or domain name| name)? (?:is )?(?:unknown|not found|"
       r"not reachable|does ?n[o']t exist|invalid)|\b(?:unknown|invalid|no such) (?:host|domain)|"
       r"\bdomain name not found|\bnxdomain\b|null mx|"
       r"\b(?:does ?n[o']t|doesn't|does not) (?:accept|receive) (?:e-?)?mail", "hard"),
    # --- mailbox or system full (X.2.2, X.3.1)
    _r(r"\bmailbox (?:is )?(?:full|stuffed)|\bover ?quota\b|\bquota (?:exceeded|full)|"
       r"\bexceed(?:s|ed)? (?:the )?(?:storage|quota|mailbox)|\b(?:out of|insufficient) "
       r"(?:disk|storage|system storage)|\bdisk quota|\bstorage space|\bsystem full", "soft"),
    # --- message too large (X.2.3, X.3.4)
    _r(r"\b(?:message|mail|e-?mail|data)\b.{0,20}?\btoo (?:large|big)\b|"
       r"\bsize (?:exceeds|limit)|\bexceeds? (?:the )?(?:fixed )?(?:maximum|max|size|limit)|"
       r"\blength exceeds", "soft"),
    # --- delayed / expired at some hop (X.4.7)
    _r(r"\bexpired\b|\btimeout exceeded\b|\bhas been delayed\b|\bwill be retried\b|"
       r"\bunable to deliver in\b", "soft"),
    # --- network and routing (X.4.x)
    _r(r"\btimed? ?out\b|\bconnection (?:refused|reset|lost|closed|dropped)|\blost connection|"
       r"\bno route to host|\b(?:network|host) (?:is )?unreachable|\btoo many hops|"
       r"\bhop count|\b(?:mail|routing) loop|\bloops back|\bunable to connect|"
       r"\b(?:could not|couldn't|did not accept our requests to) connect|"
       r"\bmalformed or unexpected name server|\bservfail\b|\bdns (?:error|failure)", "soft"),
    # --- receiving system trouble (X.3.x)
    _r(r"\bsystem (?:config|error|problem|not accepting|busy)|\bconfiguration error|"
       r"\bmail ?system problem|\bservice (?:currently |temporarily )?(?:unavailable|"
       r"not available)|\btemporar(?:y|ily) (?:failure|error|unavailable|problem)|"
       r"\binternal (?:server )?error|\binsufficient (?:system )?resources|\blocal error|"
       r"\bmailer ?error|\bx-unix\b|\bprocmail\b|\bpipe to\b|\bcould not load\b", "soft"),
    # --- policy refusals that name no cause (content, access, generic policy)
    _r(r"\bpolic(?:y|ies)\b|\bprohibited\b|\bnot permitted\b|\bnot allowed\b|"
       r"\baccess denied\b|\bsecurity\b|\bcontent\b|\bnot accepted\b|\brefused\b",
       "policy"),
)

#: RFC 3463 enhanced status codes by "subject.detail": (category if the reply is 5xx, if 4xx).
#: None means "undecided: let the text decide". Sources: RFC 3463 §3, RFC 4954 (X.7.8-12),
#: RFC 5248 (X.7.10, X.7.13, X.7.14), RFC 6531 (X.6.7-9), RFC 6710 (X.7.15-16), RFC 7293
#: (X.7.17-19), RFC 7372 (X.7.20-26), RFC 7505 (X.1.10, X.7.27), RFC 8617 (X.7.29),
#: RFC 8689 (X.7.30), IANA registry (X.7.28).
ENHANCED_CODES: dict[str, tuple[str | None, str | None]] = {
    "0.0": (None, "soft"),          # other undefined status
    # X.1: addressing (RFC 3463 §3.2)
    "1.0": (None, "soft"),          # other address status: by text
    "1.1": ("hard", "soft"),        # bad destination mailbox address
    "1.2": ("hard", "soft"),        # bad destination system address
    "1.3": ("hard", "soft"),        # bad destination mailbox address syntax
    "1.4": ("hard", "soft"),        # destination mailbox address ambiguous
    "1.6": ("hard", "soft"),        # mailbox has moved, no forwarding address
    "1.7": ("policy", "soft"),      # bad *sender's* mailbox address syntax
    "1.8": ("policy", "soft"),      # bad *sender's* system address
    "1.10": ("hard", "hard"),       # recipient address has null MX (RFC 7505)
    # X.2: mailbox (RFC 3463 §3.3)
    "2.0": ("soft", "soft"),
    "2.1": ("hard", "soft"),        # mailbox disabled, not accepting messages
    "2.2": ("soft", "soft"),        # mailbox full
    "2.3": ("soft", "soft"),        # message length exceeds administrative limit
    "2.4": ("soft", "soft"),        # mailing list expansion problem
    # X.3: mail system (RFC 3463 §3.4)
    "3.0": ("soft", "soft"),
    "3.1": ("soft", "soft"),        # mail system full
    "3.2": ("soft", "soft"),        # system not accepting network messages
    "3.3": ("soft", "soft"),        # system not capable of selected features
    "3.4": ("soft", "soft"),        # message too big for system
    "3.5": ("soft", "soft"),        # system incorrectly configured
    # X.4: network and routing (RFC 3463 §3.5)
    "4.0": ("soft", "soft"),
    "4.1": ("soft", "soft"),        # no answer from host
    "4.2": ("soft", "soft"),        # bad connection
    "4.3": ("soft", "soft"),        # directory server failure
    "4.4": (None, "soft"),          # unable to route: "invalid domain" (hard) or network
    "4.5": ("soft", "throttle"),    # mail system congestion
    "4.6": ("soft", "soft"),        # routing loop detected
    "4.7": ("soft", "soft"),        # delivery time expired
    # X.5: protocol (RFC 3463 §3.6)
    "5.0": ("soft", "soft"),
    "5.1": ("soft", "soft"),        # invalid command
    "5.2": ("soft", "soft"),        # syntax error
    "5.3": ("soft", "soft"),        # too many recipients
    "5.4": ("soft", "soft"),        # invalid command arguments
    "5.5": ("soft", "soft"),        # wrong protocol version
    "5.6": ("policy", "soft"),      # authentication exchange line too long (RFC 4954)
    # X.6: content and media (RFC 3463 §3.7)
    "6.0": ("policy", "soft"),
    "6.1": ("policy", "soft"),      # media not supported
    "6.2": ("policy", "soft"),      # conversion required and prohibited
    "6.3": ("policy", "soft"),      # conversion required but not supported
    "6.5": ("policy", "soft"),      # conversion failed
    "6.6": ("policy", "soft"),      # message content not available (RFC 4468)
    "6.7": ("hard", "soft"),        # non-ASCII address not permitted (RFC 6531)
    "6.9": ("policy", "soft"),      # UTF-8 header cannot be transferred (RFC 6531)
    # X.7: security and policy (RFC 3463 §3.8 and later RFCs)
    "7.0": ("policy", "soft"),
    "7.1": (None, "soft"),          # "delivery not authorized": blocklist, spam, relay... text
    "7.2": ("policy", "soft"),      # mailing list expansion prohibited
    "7.3": ("policy", "soft"),      # security conversion required but not possible
    "7.4": ("policy", "soft"),      # security features not supported
    "7.5": ("policy", "soft"),      # cryptographic failure
    "7.6": ("policy", "soft"),      # cryptographic algorithm not supported
    "7.7": ("policy", "soft"),      # message integrity failure
    "7.8": ("policy", "soft"),      # authentication credentials invalid (RFC 4954)
    "7.9": ("policy", "soft"),      # authentication mechanism too weak (RFC 4954)
    "7.10": ("policy", "soft"),     # encryption needed (RFC 5248)
    "7.11": ("policy", "soft"),     # encryption required for auth mechanism (RFC 4954)
    "7.12": ("policy", "soft"),     # password transition needed (RFC 4954)
    "7.13": ("hard", "soft"),       # user account disabled (RFC 5248)
    "7.14": ("policy", "soft"),     # trust relationship required (RFC 5248)
    "7.15": ("policy", "soft"),     # priority level too low (RFC 6710)
    "7.16": ("soft", "soft"),       # message too big for the priority (RFC 6710)
    "7.17": ("hard", "hard"),       # mailbox owner has changed (RFC 7293)
    "7.18": ("hard", "hard"),       # domain owner has changed (RFC 7293)
    "7.19": ("soft", "soft"),       # RRVS test cannot be completed (RFC 7293)
    "7.20": ("policy", "soft"),     # no passing DKIM signature (RFC 7372)
    "7.21": ("policy", "soft"),     # no acceptable DKIM signature (RFC 7372)
    "7.22": ("policy", "soft"),     # no valid author-matched DKIM signature (RFC 7372)
    "7.23": ("policy", "soft"),     # SPF validation failed (RFC 7372)
    "7.24": ("policy", "soft"),     # SPF validation error (RFC 7372)
    "7.25": ("block", "soft"),      # reverse DNS validation failed (RFC 7372)
    "7.26": ("policy", "soft"),     # multiple authentication checks failed (RFC 7372)
    "7.27": ("policy", "soft"),     # *sender* address has null MX (RFC 7505)
    "7.28": ("throttle", "throttle"),  # mail flood detected (IANA registry)
    "7.29": ("policy", "soft"),     # ARC validation failure (RFC 8617)
    "7.30": ("policy", "soft"),     # REQUIRETLS support required (RFC 8689)
}

#: Fallback by subject when the detail is not in :data:`ENHANCED_CODES` or is undecided and
#: the text said nothing (RFC 3463 §3: the subject alone already says which layer failed).
ENHANCED_SUBJECTS: dict[str, tuple[str | None, str | None]] = {
    "0": (None, "soft"),
    "1": (None, "soft"),
    "2": ("soft", "soft"),
    "3": ("soft", "soft"),
    "4": ("soft", "soft"),
    "5": ("soft", "soft"),
    "6": ("policy", "soft"),
    "7": ("policy", "soft"),
}

#: Basic codes that mean something by themselves, used when neither the enhanced code nor the
#: text decided. RFC 5321 §4.2.2-4.2.3, RFC 7504 (521, 556), RFC 4954 (530, 534, 535, 538).
_CODE_DEFAULTS: dict[int, str] = {
    421: "throttle",   # service not available, closing channel: the site wants a pause
    500: "policy", 501: "policy", 502: "policy", 503: "policy", 504: "policy",  # our command
    521: "hard",       # host does not accept mail (RFC 7504)
    556: "hard",       # domain does not accept mail (RFC 7504)
    551: "hard",       # user not local (RFC 5321 §3.4)
    530: "policy", 534: "policy", 535: "policy", 538: "policy",  # authentication/TLS required
}

#: What a 5xx refuses when nothing else decided, by the phase it came in (RFC 5321 §3.1-3.3):
#: at connect/greeting/EHLO it is our client (IP), at MAIL our sender, at DATA the message.
_PHASE_DEFAULTS: dict[str, str] = {
    "connect": "block", "connection": "block", "greeting": "block", "ehlo": "block",
    "starttls": "policy", "mail": "policy", "data": "policy",
}

_TOO_MANY_RECIPIENTS = re.compile(r"too many recipients", re.IGNORECASE)

_PERMANENCE_BY_CATEGORY = {
    "hard": "permanent", "block": "permanent", "policy": "permanent", "expired": "permanent",
    "soft": "transient", "throttle": "transient", "unknown": "transient",
    "delivered": "delivered", "not_bounce": "delivered",
}


def enhanced_category(enhanced: str, klass: int | None = None) -> str | None:
    """The category an enhanced status code implies by itself (None: it does not say).

    ``klass`` (2, 4 or 5) is the class of the reply it came with; by default the code's own.
    """
    m = _ENH_FULL.fullmatch(enhanced.lstrip("#"))
    if m is None:
        raise ValueError(f"invalid enhanced status code {enhanced!r} (expected e.g. '5.1.1')")
    k = int(m["c"]) if klass is None else klass
    if k == 2:
        return "delivered"
    col = 0 if k == 5 else 1
    sd = f"{int(m['s'])}.{int(m['d'])}"
    exact = ENHANCED_CODES.get(sd)
    if exact is not None and exact[col] is not None:
        return exact[col]
    sub = ENHANCED_SUBJECTS.get(str(int(m["s"])))
    return sub[col] if sub is not None else None


# ---------------------------------------------------------------------------- classification

@dataclass(frozen=True)
class Classification:
    """What one reply (or raymta-made failure) means.

    ``outcome`` says what happens to the message, ``category`` what went wrong (see
    :data:`CATEGORIES`), ``site_backoff`` whether the whole site asked us to slow down.
    """

    outcome: Outcome
    category: str
    code: int | None
    enhanced: str | None
    text: str
    site_backoff: bool = False

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown bounce category {self.category!r} "
                             f"(known: {', '.join(CATEGORIES)})")

    @property
    def permanent(self) -> bool:
        return self.outcome is Outcome.PERMANENT


def _rule_category(rule: Rule, transient: bool | None) -> str | None:
    cat = rule.category
    if isinstance(cat, tuple):
        # undecided class (no code at all): a refusal text with no retry hint is permanent
        return cat[0] if transient else cat[1]
    return cat


def classify(code: int | None, text: str = "", *, enhanced: str | None = None,
             phase: str = "rcpt") -> Classification:
    """Classify a reply: basic ``code`` (None if none), its ``text``, the enhanced code (found
    in the text when not given) and the ``phase`` it answered (see :data:`PHASES`).

    Outcome: 2xx delivered; 4xx transient; 5xx permanent, except 552 "too many recipients"
    on RCPT, which RFC 5321 §4.5.3.1.10 says to treat as 452. Mailbox-full 552s stay
    permanent (the server chose 5xx; many providers do so only after a long over-quota
    period) but are categorised "soft". With no basic code, the enhanced code's class decides,
    else the category (hard/block/policy bounce; soft/throttle/unknown retry).

    Category, first that decides: a :data:`CAUSE_RULES` match; the enhanced code
    (:data:`ENHANCED_CODES`) unless undecided, a catch-all X.Y.0 or a 4xx's generic "soft";
    a :data:`TEXT_RULES` match; the enhanced subject; the basic code; the phase; "unknown".
    """
    if phase not in PHASES:
        raise ValueError(f"unknown SMTP phase {phase!r} (known: {', '.join(sorted(PHASES))})")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int)
                             or not 100 <= code <= 599):
        raise ValueError(f"invalid SMTP reply code {code!r} (expected 100..599)")
    if enhanced is not None:
        if _ENH_FULL.fullmatch(enhanced.strip().lstrip("#")) is None:
            raise ValueError(f"invalid enhanced status code {enhanced!r} (expected e.g. '5.1.1')")
        enhanced = _norm_enhanced(enhanced.strip())
    parsed = parse_reply(text or "")
    if code is None:
        code = parsed.code
    if enhanced is None and parsed.enhanced is not None:
        enhanced = parsed.enhanced
    body = parsed.text

    # The reply's class: the basic code's, else the enhanced code's (RFC 3463 §2).
    klass: int | None = None
    if code is not None and code // 100 in (2, 4, 5):
        klass = code // 100
    elif enhanced is not None:
        klass = int(enhanced[0])

    if klass == 2:
        return Classification(Outcome.DELIVERED, "delivered", code, enhanced, body)
    if klass is None and code is None and AUTO_REPLY.search(body):
        return Classification(Outcome.DELIVERED, "not_bounce", code, enhanced, body)

    transient = None if klass is None else klass == 4
    category, backoff = _category(klass, transient, code, enhanced, body, phase)

    if klass == 5:
        outcome = Outcome.PERMANENT
        # RFC 5321 §4.5.3.1.10: RFC 821 wrongly listed "too many recipients" as 552; clients
        # SHOULD treat a 552 in this case as temporary (the rest go in a new transaction).
        if code == 552 and phase == "rcpt" and _TOO_MANY_RECIPIENTS.search(body):
            outcome = Outcome.TRANSIENT
    elif klass == 4:
        outcome = Outcome.TRANSIENT
    else:
        outcome = Outcome(_PERMANENCE_BY_CATEGORY[category])
    # A site pauses only when the server closes the channel (421) or the reply is about our
    # pace (category throttle). Per-recipient soft failures — greylisting (RFC 6647), a busy
    # mailbox — also say "try again later" but concern one recipient: pausing the whole site
    # for them would starve every other recipient there (Postfix defers only the recipient).
    site_backoff = outcome is Outcome.TRANSIENT and (
        code == 421 or (backoff and category == "throttle"))
    return Classification(outcome, category, code, enhanced, body, site_backoff)


# Addresses are masked before the rules run: a local part such as "userunknown@" or
# "filtered@" is not a statement by the server.
_ADDRESS = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")


def _category(klass: int | None, transient: bool | None, code: int | None,
              enhanced: str | None, body: str, phase: str) -> tuple[str, bool]:
    body = _ADDRESS.sub("addr", body)
    backoff = False
    for rule in CAUSE_RULES:
        if rule.pattern.search(body):
            cat = _rule_category(rule, transient)
            if cat is not None:
                return cat, rule.site_backoff or backoff
            backoff = backoff or rule.site_backoff

    col = 0 if klass != 4 else 1
    exact: str | None = None
    if enhanced is not None:
        _, s, d = enhanced.split(".")
        entry = ENHANCED_CODES.get(f"{s}.{d}")
        exact = entry[col] if entry is not None else None
        # X.4.5 congestion and X.7.28 mail flood ask for a slower pace
        backoff = backoff or f"{s}.{d}" in ("4.5", "7.28")
        # A 4xx's "soft" only says "temporary", and X.Y.0 is the catch-all of its subject
        # (RFC 3463 §3: "other or undefined"): let the text say what is wrong first.
        if exact is not None and not (klass == 4 and exact == "soft") and d != "0":
            return exact, backoff

    for rule in TEXT_RULES:
        if rule.pattern.search(body):
            backoff = backoff or rule.site_backoff
            cat = _rule_category(rule, transient)
            if cat is not None:
                return cat, backoff

    if exact is not None:
        return exact, backoff
    if enhanced is not None:
        sub = ENHANCED_SUBJECTS.get(enhanced.split(".")[1], (None, None))[col]
        if sub is not None and not (klass == 4 and backoff):
            return sub, backoff
    if code is not None and code in _CODE_DEFAULTS:
        return _CODE_DEFAULTS[code], backoff
    if backoff:
        return "throttle", backoff   # "try again later" and nothing else: a pause request
    if klass == 4:
        return "soft", backoff
    if klass == 5 and phase in _PHASE_DEFAULTS:
        return _PHASE_DEFAULTS[phase], backoff
    return "unknown", backoff


def bounce_category(c: Classification) -> str:
    """The category in the vocabulary of bounce reports (sisimai-like classes): delivered is
    "not_bounce" and raymta's own "expired" is a "soft" bounce."""
    if c.category == "delivered":
        return "not_bounce"
    if c.category == "expired":
        return "soft"
    return c.category


# ------------------------------------------------------------------ raymta's own failures

_DNS_KINDS: dict[str, tuple[Outcome, str, str, str]] = {
    # kind: outcome, category, enhanced code, default text
    # NXDOMAIN: the domain does not exist (RFC 3463 X.1.2 bad destination system address)
    "nxdomain": (Outcome.PERMANENT, "hard", "5.1.2", "recipient domain does not exist"),
    # null MX "0 ." (RFC 7505 §3): the domain accepts no mail; X.1.10 is registered for it
    "null_mx": (Outcome.PERMANENT, "hard", "5.1.10", "recipient domain accepts no mail (null MX)"),
    # SERVFAIL / timeout: the resolver or the zone is having a bad day (X.4.3 directory failure)
    "servfail": (Outcome.TRANSIENT, "soft", "4.4.3", "DNS lookup failed (SERVFAIL)"),
    "timeout": (Outcome.TRANSIENT, "soft", "4.4.3", "DNS lookup timed out"),
    # MX hosts exist but none has an address (X.4.4 unable to route): usually transient
    "no_address": (Outcome.TRANSIENT, "soft", "4.4.4", "no address for any MX host"),
}


def dns_failure(kind: str, text: str = "", *, permanent: bool | None = None) -> Classification:
    """A route that could not be resolved. ``kind``: nxdomain, null_mx (permanent, hard),
    servfail, timeout, no_address (transient, soft). ``permanent`` overrides the kind's
    default (the resolver knows when a "no address" answer is authoritative)."""
    if kind not in _DNS_KINDS:
        raise ValueError(f"unknown DNS failure kind {kind!r} (known: {', '.join(_DNS_KINDS)})")
    outcome, category, enh, default = _DNS_KINDS[kind]
    if permanent is not None and permanent != (outcome is Outcome.PERMANENT):
        if permanent:
            outcome, category, enh = Outcome.PERMANENT, "hard", "5" + enh[1:]
        else:
            outcome, category, enh = Outcome.TRANSIENT, "soft", "4" + enh[1:]
    return Classification(outcome, category, None, enh, text or default, False)


# RFC 3463 §3.5: X.4.1 no answer from host, X.4.2 bad connection, X.4.0 other network trouble
_CONNECTION_CODES = (
    (re.compile(r"lost|reset|closed|broken|eof|disconnect", re.IGNORECASE), "4.4.2"),
    (re.compile(r"time[d ]?out|refused|unreachable|no route|connect", re.IGNORECASE), "4.4.1"),
)


def connection_failure(text: str) -> Classification:
    """No usable reply: the connection could not be made or broke. Always worth retrying,
    and not a reason to slow the whole site down (that is what 421 is for)."""
    enh = next((e for pat, e in _CONNECTION_CODES if pat.search(text or "")), "4.4.0")
    return Classification(Outcome.TRANSIENT, "soft", None, enh, text or "connection failed",
                          False)


def expired(text: str = "") -> Classification:
    """raymta gave up: the message reached its maximum age (RFC 3463 X.4.7 delivery time
    expired) without a permanent reply."""
    return Classification(Outcome.PERMANENT, "expired", None, "5.4.7",
                          text or "delivery time expired", False)
