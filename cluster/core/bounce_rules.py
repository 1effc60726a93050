"""Bounce classification rules: (reply code, enhanced status code, text) -> (category, class).

Role: the shipped rules as data (:data:`RULES`), their validation, the TOML form operators use to
extend or replace them (:func:`rules_from_toml`, wired to ``[classification] rules_file``), and
their compilation (:class:`RuleSet`: the fitting rules per code, enhanced code and phase worked
out once, each text searched only where a literal prefilter admits it) to find the first
matching rule. :mod:`cluster.core.replies` uses it to classify every failure.

Categories (:data:`CATEGORIES`, modelled on KumoMTA's and PowerMTA's bounce categories) say what
went wrong; classes (:data:`CLASSES`) say what a sender must do about it:

===========  ====================================================  ===========================
class        meaning                                               corpora classes (README)
===========  ====================================================  ===========================
hard         the address or domain does not exist: suppress it     hard
soft         the recipient's side failed and may recover (full,    soft
             too large, network, system, expired): retry or
             bounce, never suppress
block        the *sender* or the message is refused (blocklist,    block, policy
             reputation, spam, virus, authentication, relay,
             policy, protocol): fix the sender; the address is
             fine
transient    the site asks us to slow down (rate, connections,     throttle
             4xx reputation, "try again later"): pace the site
===========  ====================================================  ===========================

A success or an auto-reply has no class (corpora "not_bounce"). A temporary (4xx) reply never
proves that an address is gone: a rule's "hard" becomes "soft" on a 4xx (RFC 3463 §3: the
class digit, not the detail, says whether the failure is permanent).

How a rule matches: every field given must match; ``code`` is a basic reply code pattern
(``"550"``, ``"55x"``; ``"5xx"``/``"4xx"`` mean the reply's class, taken from the enhanced code
when the reply had no basic code); ``enhanced`` an RFC 3463 pattern (``"5.1.1"``, ``"x.1.1"``,
``"x.7.*"``); ``phase`` the SMTP phases it applies to; ``text`` a case-insensitive regular
expression searched in the reply text (addresses in the text are masked first). Rules are tried
in order and the first that matches wins, so specific texts come before codes, and codes before
the catch-alls. The order of :data:`RULES`, by band:

1. *cause texts*: texts that name their cause so plainly that they outrank the enhanced code
   (servers put 5.1.1 on rate limits and 5.7.1 on everything);
2. *decided enhanced codes* (RFC 3463 and later registrations) whose detail says what failed;
3. *texts* consulted when the code is absent, generic (X.Y.0) or only says "temporary";
4. the remaining enhanced codes, "try again later", enhanced subjects, basic codes
   (RFC 5321 §4.2.2-4.2.3, RFC 7504, RFC 4954), then what a 5xx refuses by the phase it
   answered (RFC 5321 §3: at connect the client, at MAIL the sender, at DATA the message).

Pure: stdlib only, no I/O (the config layer reads a rules file and hands the parsed TOML here).
Must not decide outcomes (delivered/transient/permanent) or retry timing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CATEGORIES",
    "CATEGORY_CLASS",
    "CLASSES",
    "CORPUS_CLASSES",
    "PHASES",
    "RULES",
    "BounceRule",
    "RuleError",
    "RuleSet",
    "compile_rules",
    "default_rules",
    "rules_from_toml",
]

#: The bounce categories, with the class each has unless a rule says otherwise.
CATEGORY_CLASS: dict[str, str] = {
    "invalid-recipient": "hard",   # the mailbox does not exist (X.1.1, X.1.3, X.1.6)
    "inactive-mailbox": "soft",    # disabled, suspended, over-long inactive (X.2.1, X.7.13)
    "quota": "soft",               # mailbox or system full, message too large (X.2.2, X.2.3)
    "bad-domain": "hard",          # the domain does not exist or takes no mail (X.1.2, X.1.10)
    "dns-failure": "soft",         # a lookup failed (SERVFAIL, timeout; X.4.3)
    "routing": "soft",             # no route, loop, too many hops (X.4.4, X.4.6)
    "relay-denied": "block",       # the host will not relay for us (RFC 5321 §3.6)
    "policy": "block",             # a local policy refused the sender or message
    "spam-block": "block",         # our IP or domain is on a blocklist
    "spam-content": "block",       # the message was judged spam
    "virus": "block",              # malware found in the message
    "auth-failure": "block",       # SPF, DKIM, DMARC, ARC or SMTP AUTH (X.7.20-26, X.7.8)
    "rate-limited": "transient",   # too fast, too many connections or messages (X.4.5, X.7.28)
    "reputation": "transient",     # our reputation: a 4xx slows us down, a 5xx blocks us
    "no-answer": "soft",           # no answer from the host, connection broke (X.4.1, X.4.2)
    "protocol": "soft",            # an SMTP protocol error (X.5.x); "block" when it is ours
    "message-expired": "soft",     # delivery time expired, here or at a later hop (X.4.7)
    "other": "soft",               # nothing recognisable
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_CLASS)
CLASSES: tuple[str, ...] = ("hard", "soft", "block", "transient")
#: How the corpora's classes (shared/corpora/README.md) map onto ours; "not_bounce" is no class.
CORPUS_CLASSES: dict[str, str | None] = {
    "hard": "hard", "soft": "soft", "block": "block", "policy": "block", "throttle": "transient",
    "not_bounce": None,
}
#: Where in the conversation a reply was received ("connection": a reply on a connection that
#: then broke; "response_text": text of unknown phase, e.g. a DSN's Diagnostic-Code).
PHASES: frozenset[str] = frozenset({"connect", "connection", "greeting", "ehlo", "starttls",
                                    "mail", "rcpt", "data", "dns", "response_text"})

_CODE_PAT = re.compile(r"[245x][0-9x][0-9x]")
_ENH_PAT = re.compile(r"[245x]\.(?:\d{1,3}|\*)\.(?:\d{1,3}|\*)")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class RuleError(ValueError):
    """A rule that cannot be used; the message names the rules source and the rule."""

    def __init__(self, source: str, rule: str, problem: str) -> None:
        super().__init__(f"{source}: rule {rule}: {problem}")
        self.source, self.rule, self.problem = source, rule, problem


@dataclass(frozen=True)
class BounceRule:
    """One rule. ``klass`` is the class (``class`` in TOML); ``backoff`` says the whole site
    asked us to slow down (honoured on transient replies only)."""

    name: str
    category: str
    klass: str | None = None
    text: str | None = None
    code: str | None = None
    enhanced: str | None = None
    phase: tuple[str, ...] = ()
    backoff: bool = False

    @property
    def bounce_class(self) -> str:
        return self.klass or CATEGORY_CLASS[self.category]


def _check(rule: BounceRule, source: str, label: str) -> None:
    def bad(problem: str) -> RuleError:
        return RuleError(source, label, problem)
    if not _NAME.fullmatch(rule.name):
        raise bad(f"name {rule.name!r}: use letters, digits and . _ : - (at most 64)")
    if rule.category not in CATEGORY_CLASS:
        raise bad(f"unknown category {rule.category!r} (known: {', '.join(CATEGORIES)})")
    if rule.klass is not None and rule.klass not in CLASSES:
        raise bad(f"unknown class {rule.klass!r} (known: {', '.join(CLASSES)})")
    if rule.code is not None and not _CODE_PAT.fullmatch(rule.code):
        raise bad(f"code {rule.code!r}: expected e.g. '550', '55x', '5xx' or '4xx'")
    if rule.enhanced is not None and not _ENH_PAT.fullmatch(rule.enhanced):
        raise bad(f"enhanced {rule.enhanced!r}: expected e.g. '5.1.1', 'x.1.1' or 'x.7.*'")
    for p in rule.phase:
        if p not in PHASES:
            raise bad(f"unknown phase {p!r} (known: {', '.join(sorted(PHASES))})")
    if rule.text is not None:
        if not rule.text:
            raise bad("text is empty (leave it out to match any text)")
        if re.search(r"\(\?P[<=]|\\[1-9]|\(\?[aiLmsux]+\)", rule.text):
            raise bad("text: named groups, back references and inline flags are not allowed "
                      "(every text is matched case-insensitively)")
        try:
            re.compile(rule.text, re.IGNORECASE)
        except re.error as e:
            raise bad(f"text is not a valid regular expression: {e}") from None


def _code_regex(code: str | None) -> str:
    # the subject starts with the reply's class digit, then the basic code or 000
    if code is None:
        return r"\d{4}"
    c = code.replace("x", r"\d")
    if code[1:] == "xx":
        return code[0] + r"\d{3}"
    return code[0] + c


def _enh_regex(enh: str | None) -> str:
    if enh is None:
        return r"\d\.\d+\.\d+"
    c, s, d = enh.split(".")
    return (("[245]" if c == "x" else c) + r"\." + (r"\d+" if s == "*" else str(int(s)))
            + r"\." + (r"\d+" if d == "*" else str(int(d))))


# --- the prefilter: which rules' texts can match at all --------------------------------------
# Each rule's text is searched only when the reply contains a literal that every match of the
# text must contain: for a branch that starts "\bword", a word of the reply starting with
# "word" (checked against a set of word prefixes, one set operation per rule); for a branch
# that starts with another literal, that literal as a substring. A rule whose branches do not
# all start so is always searched. Sound, not heuristic: the prefilter only skips searches
# that cannot succeed (texts are matched case-insensitively; the reply is compared
# case-folded, with the two letters that IGNORECASE equates with "i" but casefold() does not,
# U+0130 and U+0131, mapped to "i").
_PREFIX_LEN = 4
_FOLD_I = {0x130: "i", 0x131: "i"}
_WORD = re.compile(r"\w+")


def _literal_triggers(text: str) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """(word prefixes, substrings) one of which every match of ``text`` contains; None when
    some branch has no such literal (the rule is then always searched). Reads the text with
    the stdlib's own regex parser; should that ever change shape, every rule is searched."""
    try:
        from re import _constants as c  # type: ignore[attr-defined]
        from re import _parser as sp  # type: ignore[attr-defined]
    except ImportError:
        return None

    prefixes: set[str] = set()
    subs: set[str] = set()

    def seq(items: list[tuple[Any, Any]], boundary: bool) -> bool:
        i = 0
        while i < len(items):
            op, av = items[i]
            if op is c.AT:
                boundary = boundary or av is c.AT_BOUNDARY
            elif op not in (c.ASSERT, c.ASSERT_NOT):
                break
            i += 1
        if i == len(items):
            return False
        # a long literal anywhere in the sequence is required as much as a leading one, and
        # more selective than a short leading one ("e-?mail", "(?:mail|message) ... rejected")
        runs, run = [], ""
        for op, av in items[i:]:
            if op is c.LITERAL:
                run += chr(av)
                continue
            if run:
                runs.append(run)
            run = ""
        runs.append(run)
        lead = runs[0] if items[i][0] is c.LITERAL else ""
        lead_word = _WORD.match(lead.casefold()) if lead.isascii() else None
        if not (boundary and lead_word and len(lead_word.group(0)) >= _PREFIX_LEN):
            best = max((r for r in runs if r.isascii()), key=len, default="")
            if len(best) >= 3:
                subs.add(best.casefold())
                return True
        op, av = items[i]
        if op is c.LITERAL:
            lit = ""
            while i < len(items) and items[i][0] is c.LITERAL:
                lit += chr(items[i][1])
                i += 1
            if not lit.isascii():
                return False
            lit = lit.casefold()
            word = _WORD.match(lit)
            if boundary and word:
                prefixes.add(word.group(0)[:_PREFIX_LEN])
            else:
                subs.add(lit)
            return True
        if op is c.SUBPATTERN:
            return alternatives(av[-1], boundary)
        if op is c.BRANCH:
            return all(seq(list(b), boundary) for b in av[1])
        return False

    def alternatives(pattern: Any, boundary: bool) -> bool:
        items = list(pattern)
        if len(items) == 1 and items[0][0] is c.BRANCH:
            return all(seq(list(b), boundary) for b in items[0][1][1])
        return seq(items, boundary)

    try:
        if not alternatives(sp.parse(text, re.IGNORECASE | re.DOTALL), False):
            return None
    except Exception:   # noqa: BLE001 - an unexpected parse tree: no prefilter, still correct
        return None
    return frozenset(prefixes), tuple(sorted(subs))


def _top_branches(text: str) -> list[str]:
    """``text`` split at its top-level ``|`` (outside groups and character classes): a text
    matches somewhere iff one of its branches does."""
    out, depth, start, i, in_class = [], 0, 0, 0, False
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]" or (text[i - 1] == "[" or text[i - 2:i] == "[^")
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            out.append(text[start:i])
            start = i + 1
        i += 1
    out.append(text[start:])
    return out


class RuleSet:
    """Rules compiled for matching in order: ``match`` returns the first rule whose code,
    enhanced code and phase fit the reply (the candidates for each such combination are worked
    out once and kept) and whose text, if any, is found in the reply's text. A text is searched
    branch by branch (its top-level alternatives), each only when the literal prefilter above
    admits it: a reply costs a few small searches, not one per rule."""

    _CANDIDATES_MAX = 4096     # combinations of class, code, enhanced code and phase kept
    # Replies repeat (a provider's texts, addresses masked by the caller): the rule found for
    # each of the most recent short ones is kept
    _MEMO_MAX = 2048
    _MEMO_TEXT_MAX = 512

    def __init__(self, rules: Sequence[BounceRule], source: str = "rules") -> None:
        if not rules:
            raise RuleError(source, "-", "no rules")
        for i, r in enumerate(rules):
            _check(r, source, f"{i + 1} ({r.name!r})")
        self.rules: tuple[BounceRule, ...] = tuple(rules)
        self.source = source
        self._heads = []
        # per rule: None (no text), else the ids of its branches; branch ids follow rule order
        self._branches: list[tuple[int, ...] | None] = []
        self._owner: list[int] = []                 # branch id -> rule index
        self._patterns: list[re.Pattern[str]] = []  # branch id -> pattern
        always: list[int] = []                      # branches without a prefilter
        by_prefix: dict[str, set[int]] = {}
        by_sub: dict[str, set[int]] = {}
        n = 0
        for ri, r in enumerate(self.rules):
            phase = "(?:" + "|".join(sorted(r.phase)) + ")" if r.phase else r"\w+"
            self._heads.append(re.compile(
                rf"{_code_regex(r.code)} {_enh_regex(r.enhanced)} {phase}\Z", re.IGNORECASE))
            if r.text is None:
                self._branches.append(None)
                continue
            parts = _top_branches(r.text)
            try:
                compiled = [re.compile(b, re.IGNORECASE | re.DOTALL) for b in parts]
            except re.error:    # a split the lexer got wrong: the whole text, unfiltered
                parts, compiled = [r.text], [re.compile(r.text, re.IGNORECASE | re.DOTALL)]
            branches = []
            for src, pat in zip(parts, compiled):
                trig = _literal_triggers(src)
                if trig is None:
                    always.append(n)
                for pre in trig[0] if trig else ():
                    if len(pre) == _PREFIX_LEN:
                        by_prefix.setdefault(pre, set()).add(n)
                    else:       # a short word ("ip"): as a substring, one lookup per word
                        by_sub.setdefault(pre, set()).add(n)
                for sub in trig[1] if trig else ():
                    by_sub.setdefault(sub, set()).add(n)
                branches.append(n)
                self._owner.append(ri)
                self._patterns.append(pat)
                n += 1
            self._branches.append(tuple(branches))
        self._always = frozenset(always)
        self._by_prefix = by_prefix
        self._by_substring = tuple(by_sub.items())
        self._candidates: dict[str, tuple[frozenset[int], int | None]] = {}
        self._memo: dict[tuple[str, str], int] = {}

    def _candidates_for(self, head: str) -> tuple[frozenset[int], int | None]:
        """The rules with a text whose code, enhanced code and phase fit ``head``, and the
        first fitting rule without a text (None if none): it ends the search."""
        found = self._candidates.get(head)
        if found is None:
            out, stop = [], None
            for i, h in enumerate(self._heads):
                if h.match(head):
                    if self._branches[i] is None:
                        stop = i
                        break
                    out.append(i)
            found = (frozenset(out), stop)
            if len(self._candidates) >= self._CANDIDATES_MAX:
                self._candidates.clear()
            self._candidates[head] = found
        return found

    def match(self, klass: int | None, code: int | None, enhanced: str | None, phase: str,
              text: str) -> BounceRule | None:
        """The first rule matching a reply of class ``klass`` (2, 4, 5 or None), basic ``code``,
        normalised ``enhanced`` code, ``phase`` and ``text``; None if none does."""
        head = f"{klass or 0}{code or 0:03d} {enhanced or '0.0.0'} {phase}"
        memo = len(text) <= self._MEMO_TEXT_MAX
        if memo:
            found = self._memo.get((head, text))
            if found is not None:
                return self.rules[found] if found >= 0 else None
        found = self._find(head, text)
        if memo:
            if len(self._memo) >= self._MEMO_MAX:
                self._memo.clear()
            self._memo[(head, text)] = found
        return self.rules[found] if found >= 0 else None

    def _find(self, head: str, text: str) -> int:
        """The index of the first matching rule, -1 if none."""
        fitting, stop = self._candidates_for(head)
        if fitting:
            owner, patterns = self._owner, self._patterns
            # admitted branches in rule order (branch ids follow it)
            for n in sorted(self._admitted(text) | self._always):
                i = owner[n]
                if stop is not None and i > stop:
                    break
                if i in fitting and patterns[n].search(text):
                    return i
        return stop if stop is not None else -1

    def _admitted(self, text: str) -> set[int]:
        """The branches whose prefilter literals occur in ``text``."""
        if text.isascii():
            folded = text.lower()
            words = _WORD.findall(folded)
        else:
            # words where the rules' \b sees them, then folded one by one
            t = text.translate(_FOLD_I)
            folded = t.casefold()
            words = [w.casefold() for w in _WORD.findall(t)]
        admitted: set[int] = set()
        by_prefix = self._by_prefix
        for w in set(words):
            hit = by_prefix.get(w[:_PREFIX_LEN])
            if hit:
                admitted |= hit
        for sub, rules in self._by_substring:
            if sub in folded:
                admitted |= rules
        return admitted

    def __len__(self) -> int:
        return len(self.rules)

    def __reduce__(self) -> tuple[Any, ...]:
        # sent to actors inside the config: rebuilt (and recompiled) on arrival
        return (RuleSet, (self.rules, self.source))


def compile_rules(rules: Iterable[BounceRule], source: str = "rules") -> RuleSet:
    return RuleSet(tuple(rules), source)


_TOML_KEYS = {"name", "category", "class", "text", "code", "enhanced", "phase", "backoff"}


def rules_from_toml(doc: Mapping[str, Any], source: str) -> RuleSet:
    """A rule set from a parsed TOML document (``tomllib.loads`` of a rules file)::

        replace = false          # true: these rules replace the shipped ones
        [[rule]]                 # tried before the shipped rules, in file order
        name = "acme-over-limit"
        text = "mailbox is over its limit"
        code = "5xx"             # optional, as are enhanced, phase, text, class, backoff
        category = "quota"
        class = "soft"

    Raises :class:`RuleError` naming ``source`` and the rule for any bad field or regex."""
    for k in doc:
        if k not in ("replace", "rule"):
            raise RuleError(source, "-", f"unknown key {k!r} (expected 'replace' and [[rule]])")
    replace = doc.get("replace", False)
    if not isinstance(replace, bool):
        raise RuleError(source, "-", f"replace: expected true or false, got {replace!r}")
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RuleError(source, "-", "expected an array of tables [[rule]]")
    rules = []
    for i, raw in enumerate(raw_rules):
        label = f"{i + 1}" + (f" ({raw.get('name')!r})" if isinstance(raw, dict) else "")
        if not isinstance(raw, dict):
            raise RuleError(source, label, "expected a table")
        unknown = set(raw) - _TOML_KEYS
        if unknown:
            raise RuleError(source, label, f"unknown keys {sorted(unknown)} "
                                           f"(known: {', '.join(sorted(_TOML_KEYS))})")
        for key in ("name", "category", "class", "text", "code", "enhanced"):
            if key in raw and not isinstance(raw[key], str):
                raise RuleError(source, label, f"{key}: expected a string, got {raw[key]!r}")
        if "name" not in raw or "category" not in raw:
            raise RuleError(source, label, "name and category are required")
        phase = raw.get("phase", [])
        if isinstance(phase, str):
            phase = [phase]
        if not isinstance(phase, list) or not all(isinstance(p, str) for p in phase):
            raise RuleError(source, label, f"phase: expected a list of phases, got {phase!r}")
        backoff = raw.get("backoff", False)
        if not isinstance(backoff, bool):
            raise RuleError(source, label, f"backoff: expected true or false, got {backoff!r}")
        rule = BounceRule(raw["name"], raw["category"], raw.get("class"), raw.get("text"),
                          raw.get("code"), raw.get("enhanced"), tuple(phase), backoff)
        _check(rule, source, label)
        rules.append(rule)
    if replace and not rules:
        raise RuleError(source, "-", "replace = true needs at least one [[rule]]")
    return RuleSet(rules if replace else [*rules, *RULES], source)


# ---------------------------------------------------------------------------- the shipped rules

def _R(name: str, category: str, text: str | None = None, *, klass: str | None = None,
       code: str | None = None, enhanced: str | None = None, phase: Iterable[str] = (),
       backoff: bool = False) -> BounceRule:
    return BounceRule(name, category, klass, text, code, enhanced, tuple(phase), backoff)


# "User unknown", "no such user": the words of a server that has no such mailbox, and also the
# words recipient-side filters answer a sender they refuse with. Rules below say where they do
# not prove that the address is gone.
_UNKNOWN_WORDS = (
    r"\b(?:user|mailbox|recipient|address)s? (?:is )?(?:unknown|not found|does ?n[o']t exist|"
    r"not exist|invalid)|\b(?:unknown|invalid|no such) (?:user|mailbox|recipient|address)")


# --- band 1: texts that name their cause plainly ------------------------------------------
_CAUSE: tuple[BounceRule, ...] = (
    # an explicit spam verdict on the message (before authentication: Gmail's auth refusals say
    # "to protect our users from spam", which is not a verdict)
    _R("spam-verdict", "spam-content",
       r"\b(?:rejected|blocked|refused|identified|classified|detected|flagged) (?:as|due to|"
       r"because of|for) (?:\w+ )?spam\b|\bspam (?:detected|classification|content)|"
       r"\bscored as spam"),
    # sender authentication: RFC 7208 SPF, RFC 6376 DKIM, RFC 7489 DMARC, RFC 8617 ARC, SMTP AUTH
    _R("sender-authentication", "auth-failure",
       r"\b(?:spf|dkim|dmarc|arc)\b|sender policy framework|domainkeys|\bunauthenticated\b|"
       r"\bauthenticat(?:e|ed|ion)\b|\bsmtp auth"),
    # relaying refused (RFC 5321 §3.6)
    _R("relay-denied", "relay-denied",
       r"\brelay(?:ing)?\b.{0,20}\b(?:denied|not permitted|not allowed|prohibited|refused)|"
       r"\b(?:unable|not configured|not allowed|not permitted|denied) to relay\b|\bno relay"),
    _R("sender-not-verified", "policy",
       r"\b(?:address|identit(?:y|ies)|sender|domain)s? (?:is |are )?not verified\b|"
       r"failed the check|"
       # Gmail / Google Workspace "CustomFromDenied": the 'Send mail as' alias is misconfigured
       r"\bsend mail as\b"),
    # the recipient's own filters: about this sender, not the address
    _R("recipient-filter", "policy",
       r"recipient(?:'s)? (?:preferences|filter)|blocked by the recipient|"
       r"rejected by (?:the )?recipient|\bfiltered\b|\bcontent filter"),
    # RFC 5322 / RFC 5321 compliance of the message or the session
    _R("not-compliant", "protocol",
       # ("rfc822;" is the address type of a DSN field, not a complaint about the message)
       r"\brfc[- ]?(?:5322|2822|822|5321|2821)\b(?!\s*;)|\bnot (?:rfc[- ]?)?compliant|"
       r"non-?compliant|"
       # Exim: "recipient addresses that were incorrectly constructed ... malformed address"
       r"\bincorrectly constructed|\bmalformed address|"
       r"multiple (?:addresses in from|\w+ headers?)|duplicate header|8-?bit data|"
       r"\bbinary content|improperly[- ]formatted|protocol violation|(?:improper|bad) sequence",
       klass="block"),
    # a per-transaction recipient limit: send the rest in a new transaction; not a site slowdown
    _R("too-many-recipients", "rate-limited", r"too many recipients(?! this)"),
    # rates and volume: the site asks us to slow down
    _R("rate-limit", "rate-limited",
       r"\brate[- ]?limit|\b(?:receiving|sending) mail at a rate|\brate (?:of|exceeded|too)|"
       r"too (?:fast|many (?:messages|mails?|e-?mails|connections|sessions|concurrent|"
       r"recipients this)|much mail)|\bslow(?:er| down)\b|\bfrequency\b|\bthrottl|"
       r"unexpected volume|max(?:imum)? (?:number of )?(?:messages?|connections?|sessions?) "
       r"(?:per|reached|exceeded)|(?:limit|quota) (?:exceeded|reached) for (?:sending|messages)|"
       r"(?:sending|message|connection) (?:limit|quota) (?:exceeded|reached)", backoff=True),
    # deferred by the site (Yahoo "[TSS04] ... temporarily deferred"); Sendmail's own status
    # word "Deferred: <reason>" reports a deferral of any cause and says nothing by itself
    _R("site-deferral", "rate-limited", r"\bdeferred\b(?!:)|\[(?:TSS?|IPTS)\d+\]",
       backoff=True),
    # reputation: a 4xx asks us to slow down, a 5xx blocks us
    _R("reputation-4xx", "reputation", r"\breputation\b|\b(?:user|spam) complaints\b",
       code="4xx", backoff=True),
    _R("reputation", "reputation", r"\breputation\b|\b(?:user|spam) complaints\b",
       klass="block", backoff=True),
    # IBM/HCL Domino: "User x (addr) not listed in Domino Directory" (older releases: "not
    # listed in public Name & Address Book"): no such user, not a blocklist
    _R("domino-not-listed", "invalid-recipient",
       r"\bnot listed in (?:the )?(?:domino directory|public name (?:&|and) address book)"),
    # storage of the receiving system (RFC 5321 §4.2.3 452/552 "insufficient system storage";
    # Sendmail "452 4.4.5 Insufficient disk space"): a full disk, whatever code it came with
    _R("system-storage", "quota",
       r"\binsufficient (?:system )?(?:storage|disk)|\bout of (?:disk|storage) space|"
       r"\bdisk (?:is )?full\b"),
    # blocklists (DNSBL/RBL, RFC 5782) and named list operators; T-Online's "(BL)"/"(RLY:BL)"
    # suffix marks an IP on its blocklist (postmaster.t-online.de)
    _R("blocklist", "spam-block",
       r"\b(?:dnsbl|dnsrbl|uribl|surbl|spamhaus|spamcop|sorbs|barracuda|mailspike|uceprotect|"
       r"spamrats|abuseat|senderscore)|rbl\b|\bblocked using\b|"
       r"\b(?:block|black|deny|ban)[- ]?list(?:ed|ing)?\b|(?<!not )\blisted (?:at|on|in|by)\b|"
       r"\((?:\w+:)?BL\)"),
    # reverse DNS / PTR of our IP (RFC 7372 X.7.25; RFC 1912 §2.1): our configuration
    _R("reverse-dns", "policy",
       r"\bptr\b|\breverse (?:dns|lookup|mapping|resolution)|\brdns\b|ip name lookup failed|"
       r"mismatches client ip|may not be mail exchanger|client host rejected|"
       r"(?:cannot|can't|unable to) (?:find|resolve) your (?:hostname|host name)"),
    # our IP is refused ("Access from ip address ... blocked", "banned sending IP")
    _R("ip-refused", "spam-block",
       r"\bip(?: address)?\b.{0,40}?\b(?:blocked|banned|blacklisted|blocklisted|rejected|"
       r"forbidden|not allowed|refused|denied)|\b(?:blocked|banned|forbidden|invalid)\b.{0,20}?"
       r"\b(?:ip|client)\b|\bconnections? from .{0,60}?\b(?:rejected|refused|not accepted)|"
       r"\bconnections? (?:are |is )?not accepted from|\b(?:not accepted|refused|rejected|"
       r"not allowed) from (?:this|your|the) (?:ip|host|server|network|client)\b"),
    # our sender address or domain is refused (RFC 3463 X.1.7, X.1.8): never the recipient
    _R("sender-refused", "policy",
       r"\bsender (?:address |domain )?(?:rejected|denied|refused|unknown|invalid|not allowed)|"
       r"\bdomain of sender address|\bsender (?:domain )?(?:does not exist|not found)"),
    # Microsoft DBEB: "550 5.4.1 Recipient address rejected: Access denied" for addresses not
    # in the directory
    _R("directory-based-edge-blocking", "invalid-recipient",
       r"recipient address rejected: access denied"),
    # RFC 5321 §3.3: recipients are accepted or refused at RCPT; a "no such user" after DATA
    # comes from a filter judging the message (sisimai "filtered"), not from a missing mailbox
    _R("recipient-refused-after-data", "policy",
       _UNKNOWN_WORDS +
       # "All recipient addresses rejected" read after DATA (m-FILTER, Exchange)
       r"|\brecipients?(?: address(?:es)?)? (?:were |are |is )?rejected",
       phase=("data",)),
    _R("recipient-code-after-data", "policy", code="5xx", enhanced="x.1.*", phase=("data",)),
    # RFC 7504 §3 (521 "Host does not accept mail") and RFC 7505 §4.1 (null MX: the domain
    # "does not accept mail"): the recipient's host or domain, whatever enhanced code a
    # reporter put on it (Sendmail reports a recipient domain's null MX as 5.7.27)
    _R("host-accepts-no-mail", "bad-domain", r"\b(?:host|domain) does not accept (?:e-?)?mail\b",
       code="5xx"),
    # RFC 7504: 521 (host) and 556 (domain) say "this does not accept mail", whatever follows
    _R("code-521", "bad-domain", code="521"),
    _R("code-556", "bad-domain", code="556"),
    # Google Groups: posting refused by the group's settings
    _R("group-posting-refused", "policy",
       r"\bnot have permission to post|\bgroup you tried to contact\b|"
       # the notice of Google Groups in any language links its help centre (URLs reach the
       # rules as their host name)
       r"\bgroups\.google\.com\b"),
    # RFC 5321 §3.1, §4.1.1.1: a 5xx to the connection, the greeting or EHLO/HELO comes before
    # any sender or recipient was named, so whatever it says ("Invalid domain name" for our
    # HELO name) it refuses our client; the cause texts above still name the reason
    _R("client-refused-before-mail", "policy", code="5xx",
       phase=("connect", "greeting", "ehlo")),
    # malware, then spam judgements on the message
    _R("virus", "virus", r"\bvirus|\bmalware|\binfected\b|\btrojan\b|\bworm\b"),
    _R("spam", "spam-content",
       r"\b(?:spam|junk|ube|uce|bulk mail)\b|\bphish|\bcontent rejected\b|"
       r"\b(?:message|mail) ?scor|\bscored as"),
)

# --- RFC 3463 enhanced status codes by subject.detail -------------------------------------
# (category if 5xx, if 4xx); None: undecided, the text decides. A 4xx whose category here has
# class "soft" only says "temporary" and is consulted after the texts. Sources: RFC 3463 §3,
# RFC 4954 (X.7.8-12), RFC 5248 (X.7.10, X.7.13, X.7.14), RFC 6531 (X.6.7-9), RFC 6710
# (X.7.15-16), RFC 7293 (X.7.17-19), RFC 7372 (X.7.20-26), RFC 7505 (X.1.10, X.7.27),
# RFC 8617 (X.7.29), RFC 8689 (X.7.30), IANA registry (X.7.28).
_ENHANCED: tuple[tuple[str, str | None, str | None], ...] = (
    ("1.0", None, None),                         # other address status: by text
    ("1.1", "invalid-recipient", "invalid-recipient"),   # bad destination mailbox address
    ("1.2", "bad-domain", "bad-domain"),         # bad destination system address
    ("1.3", "invalid-recipient", "invalid-recipient"),   # bad destination address syntax
    ("1.4", "invalid-recipient", "invalid-recipient"),   # destination address ambiguous
    ("1.5", None, None),                         # destination address valid (a success detail)
    ("1.6", "invalid-recipient", "invalid-recipient"),   # mailbox moved, no forwarding address
    ("1.7", "policy", "policy"),                 # bad *sender's* mailbox address syntax
    ("1.8", "policy", "policy"),                 # bad *sender's* system address
    ("1.10", "bad-domain", "bad-domain"),        # recipient address has null MX (RFC 7505)
    ("2.0", "other", "other"),
    ("2.1", "inactive-mailbox", "inactive-mailbox"),     # mailbox disabled
    ("2.2", "quota", "quota"),                   # mailbox full
    ("2.3", "quota", "quota"),                   # message length exceeds administrative limit
    ("2.4", "other", "other"),                   # mailing list expansion problem
    ("3.0", "other", "other"),
    ("3.1", "quota", "quota"),                   # mail system full
    ("3.2", "other", "other"),                   # system not accepting network messages
    ("3.3", "other", "other"),                   # system not capable of selected features
    ("3.4", "quota", "quota"),                   # message too big for system
    ("3.5", "other", "other"),                   # system incorrectly configured
    ("4.0", "routing", "routing"),
    ("4.1", "no-answer", "no-answer"),           # no answer from host
    ("4.2", "no-answer", "no-answer"),           # bad connection
    ("4.3", "dns-failure", "dns-failure"),       # directory server failure
    ("4.4", None, "routing"),                    # unable to route: "invalid domain" or network
    ("4.5", "other", "rate-limited"),            # mail system congestion
    ("4.6", "routing", "routing"),               # routing loop detected
    ("4.7", "message-expired", "message-expired"),   # delivery time expired
    ("5.0", "protocol", "protocol"),
    ("5.1", "protocol", "protocol"),             # invalid command
    ("5.2", "protocol", "protocol"),             # syntax error
    ("5.3", "other", "other"),                   # too many recipients (per transaction)
    ("5.4", "protocol", "protocol"),             # invalid command arguments
    ("5.5", "protocol", "protocol"),             # wrong protocol version
    ("5.6", "auth-failure", "auth-failure"),     # authentication exchange line too long
    ("6.0", "policy", "policy"),                 # other media error
    ("6.1", "policy", "policy"),                 # media not supported
    ("6.2", "policy", "policy"),                 # conversion required and prohibited
    ("6.3", "policy", "policy"),                 # conversion required but not supported
    ("6.5", "policy", "policy"),                 # conversion failed
    ("6.6", "policy", "policy"),                 # message content not available (RFC 4468)
    ("6.7", "invalid-recipient", "invalid-recipient"),   # non-ASCII address not permitted
    ("6.9", "policy", "policy"),                 # UTF-8 header cannot be transferred
    ("7.0", "policy", "policy"),
    ("7.1", None, None),                         # "delivery not authorized": by text
    ("7.2", "policy", "policy"),                 # mailing list expansion prohibited
    ("7.3", "policy", "policy"),                 # security conversion not possible
    ("7.4", "policy", "policy"),                 # security features not supported
    ("7.5", "policy", "policy"),                 # cryptographic failure
    ("7.6", "policy", "policy"),                 # cryptographic algorithm not supported
    ("7.7", "policy", "policy"),                 # message integrity failure
    ("7.8", "auth-failure", "auth-failure"),     # authentication credentials invalid
    ("7.9", "auth-failure", "auth-failure"),     # authentication mechanism too weak
    ("7.10", "policy", "policy"),                # encryption needed (RFC 5248)
    ("7.11", "auth-failure", "auth-failure"),    # encryption required for auth mechanism
    ("7.12", "auth-failure", "auth-failure"),    # password transition needed
    ("7.13", "inactive-mailbox", "inactive-mailbox"),    # user account disabled (RFC 5248)
    ("7.14", "policy", "policy"),                # trust relationship required
    ("7.15", "policy", "policy"),                # priority level too low (RFC 6710)
    ("7.16", "quota", "quota"),                  # message too big for the priority
    ("7.17", "invalid-recipient", "invalid-recipient"),  # mailbox owner changed (RFC 7293)
    ("7.18", "bad-domain", "bad-domain"),        # domain owner changed (RFC 7293)
    ("7.19", "other", "other"),                  # RRVS test cannot be completed
    ("7.20", "auth-failure", "auth-failure"),    # no passing DKIM signature (RFC 7372)
    ("7.21", "auth-failure", "auth-failure"),    # no acceptable DKIM signature
    ("7.22", "auth-failure", "auth-failure"),    # no valid author-matched DKIM signature
    ("7.23", "auth-failure", "auth-failure"),    # SPF validation failed
    ("7.24", "auth-failure", "auth-failure"),    # SPF validation error
    ("7.25", "policy", "policy"),                # reverse DNS validation failed
    ("7.26", "auth-failure", "auth-failure"),    # multiple authentication checks failed
    ("7.27", "policy", "policy"),                # *sender* address has null MX (RFC 7505)
    ("7.28", "rate-limited", "rate-limited"),    # mail flood detected (IANA registry)
    ("7.29", "auth-failure", "auth-failure"),    # ARC validation failure (RFC 8617)
    ("7.30", "policy", "policy"),                # REQUIRETLS support required (RFC 8689)
)
# The registered codes that ask for a slower pace (X.4.5 congestion, X.7.28 mail flood)
_PACE_CODES = {"4.5", "7.28"}
# 4xx codes that name a cause beyond "temporary" and so outrank the texts
_DECIDED_4XX = {"1.10", "4.5", "7.17", "7.18", "7.28"}
# 5xx codes whose texts say more than the code: a disabled mailbox (X.2.1, X.7.13) is
# permanent by RFC 3463 §3.3, but "suspended" or "inactive" there means it may come back
_TEXT_FIRST = {"2.1", "7.13"}


def _enhanced_rules(early: bool) -> list[BounceRule]:
    out = []
    for sd, c5, c4 in _ENHANCED:
        generic = sd.endswith(".0")   # X.Y.0 is "other or undefined" (RFC 3463 §3)
        if c5 is not None and early != (generic or sd in _TEXT_FIRST):
            out.append(_R(f"enhanced-5.{sd}", c5, code="5xx", enhanced=f"x.{sd}",
                          klass="hard" if sd in _TEXT_FIRST else None))
        if c4 is not None and early == (sd in _DECIDED_4XX):
            # a 4xx is temporary: even "no such domain" there is only soft (RFC 3463 §3.1)
            out.append(_R(f"enhanced-4.{sd}", c4, code="4xx", enhanced=f"x.{sd}",
                          klass="transient" if sd in _PACE_CODES else "soft",
                          backoff=sd in _PACE_CODES))
    return out


# --- band 3: texts consulted when the code did not decide ----------------------------------
_TEXTS: tuple[BounceRule, ...] = (
    # RFC 5321 §3.3: a refusal of MAIL FROM is about our sender, unless its code said more
    # (a 552 5.2.3 there is RFC 1870's "message too large for SIZE")
    _R("refused-at-mail-from", "policy", code="5xx", phase=("mail",)),
    # mailbox suspended, locked or disabled: may come back (sisimai "suspend")
    _R("mailbox-suspended", "inactive-mailbox",
       r"\b(?:mailbox|account|user|recipient|address|domain)\b.{0,40}?\bsuspended\b|"
       r"\bsuspended (?:account|mailbox|user)|\baccount suspension|"
       r"\b(?:mailbox|account) (?:is |has been )?(?:disabled|deactivated|inactive)\b|"
       r"\btemporar(?:y|ily) (?:locked|disabled|blocked)|\bfrozen\b|"
       r"(?:account|mailbox) (?:is |has been )?(?:locked|blocked)|"
       r"\b(?:disabled|deactivated|inactive) (?:recipient|mailbox|account|user|address)|"
       r"\b(?:mailbox|account|user|recipient|address)\b.{0,40}?\b(?:is|has been) "
       r"(?:disabled|deactivated|inactive)\b"),
    # greylisting (RFC 6647): retry, not a site-wide slowdown
    _R("greylisting", "policy", r"\bgrey ?list|\bgray ?list", klass="soft"),
    # RFC 3463 §3.3: X.2.0 ("the mailbox exists, but something about the destination mailbox
    # has caused the sending of this DSN") and X.2.1 ("the mailbox exists, but is not
    # accepting messages"). "User unknown" words under these codes contradict them, and the
    # code is the specific statement: when nothing shows the refusal came at RCPT (the phase
    # unknown), it is a filter at the mailbox refusing this mail (sisimai's documented
    # taxonomy, Sisimai::Reason::Filtered: Status 5.2.0 or 5.2.1 is reason "filtered"). At RCPT
    # the words keep their meaning (RFC 5321 §3.3: RCPT is where addresses are refused).
    _R("unknown-words-mailbox-exists", "policy", _UNKNOWN_WORDS, code="5xx",
       enhanced="x.2.0", phase=("response_text",)),
    _R("unknown-words-mailbox-disabled", "policy", _UNKNOWN_WORDS, code="5xx",
       enhanced="x.2.1", phase=("response_text",)),
    # au (KDDI): its reception filter refuses a sender with "550 : User unknown", the address
    # left out, where an address it does not have gets "550 <address>: User unknown"
    # (sisimai's documented host table for KDDI, which cites au's support page on returned
    # mail: reasons "filtered" and "userunknown")
    _R("unknown-words-no-address", "policy", r"^\s*:\s*user unknown\b", code="5xx"),
    _R("unknown-words-no-address-quoted", "policy", r"\b550:?\s*:\s*user unknown\b"),
    # the address does not exist (RFC 3463 X.1.1, X.1.6)
    _R("no-such-recipient", "invalid-recipient",
       r"\b(?:user|mailbox|recipient|address|account|addressee)s? (?:is )?(?:unknown|not found|"
       r"does ?n[o']t exist|not exist|invalid|unavailable|rejected\.?$)|"
       r"\b(?:unknown|invalid|no such|non-?existent|bad) (?:user|mailbox|recipient|address|"
       r"account|local ?part|e-?mail address|destination mailbox)|"
       r"\b(?:does ?n[o']t|doesn't|does not) (?:exist|have an? (?:\S+ )?account)|"
       r"\bnot (?:a valid|an existing) (?:user|mailbox|recipient|address)|"
       r"\brecipient not found|\bno (?:mailbox|account) (?:here|by that name|found)|"
       r"\baddress (?:could ?n[o']t|can ?not|was not) (?:be )?found|\baddress not found|"
       r"\b(?:recipient|user) name is not recognized|"
       r"\bnot our customer|\bno longer (?:on|at|with|valid|available|active)|"
       r"\bhas (?:moved|been replaced)|\breplaced by\b|\bno forwarding address|"
       r"\bunrout(?:e)?able address|(?:mailbox|account|user|recipient|address)"
       r"(?: \w+)? (?:is |has been )?(?:closed|terminated|removed|deleted)"),
    # the domain does not exist or takes no mail (X.1.2, X.1.10, RFC 7505, RFC 7504)
    _R("no-such-domain", "bad-domain",
       r"\b(?:host|domain)(?: or domain name| name)? (?:is )?(?:unknown|not found|"
       r"not reachable|does ?n[o']t exist|invalid)|\b(?:unknown|invalid|no such) (?:host|domain)|"
       r"\bdomain name not found|\bnxdomain\b|null mx|\bunrout(?:e)?able domain|"
       r"\b(?:host|domain)[ =]\S+ (?:not found|does ?n[o']t exist|unknown)\b|"
       r"\bno mx (?:record|host)s? (?:found )?for|\bno mail exchanger|"
       # Sun/Oracle Communications Messaging Server: "Illegal host/domain name found"
       r"\billegal (?:host|domain)(?:/domain)? name|"
       r"\bcould ?n[o']t find (?:a mail exchanger|any host named)|"
       r"\b(?:does ?n[o']t|doesn't|does not) (?:accept|receive) (?:e-?)?mail"),
    # mailbox or system full (X.2.2, X.3.1), message too large (X.2.3, X.3.4)
    _R("mailbox-full", "quota",
       r"\bmailbox (?:is )?(?:full|stuffed)|\bover ?quota\b|\bquota (?:exceeded|full)|"
       r"\bexceed(?:s|ed)? (?:the )?(?:storage|quota|mailbox)|\b(?:out of|insufficient) "
       r"(?:disk|storage|system storage)|\bdisk quota|\bstorage space|\bsystem full|"
       r"\binsufficient disk space"),
    _R("message-too-large", "quota",
       r"\b(?:message|mail|e-?mail|data)\b.{0,20}?\btoo (?:large|big)\b|"
       r"\bsize (?:exceeds|limit)|\bexceeds? (?:the )?(?:fixed )?(?:maximum|max|size|limit)|"
       r"\blength exceeds"),
    # delayed or expired at some hop (X.4.7)
    _R("expired", "message-expired",
       r"\bexpired\b|\btimeout exceeded\b|\bhas been delayed\b|\bwill be retried\b|"
       r"\bunable to deliver in\b|\bretry time(?:out)? (?:not reached|exceeded)|"
       r"\btoo long in (?:the )?queue"),
    # lookups (X.4.3), loops and routes (X.4.4, X.4.6), no answer (X.4.1, X.4.2)
    _R("dns-failure", "dns-failure",
       r"\bmalformed or unexpected name server|\bservfail\b|\bdns (?:error|failure|lookup)|"
       # (Sendmail: "Name server: x.: host name lookup failure", a temporary DNS failure)
       r"\bname server (?:failure|timeout)|\bhost name lookup fail(?:ed|ure)"),
    _R("routing", "routing",
       r"\btoo many hops|\bhop count|\b(?:mail|routing) loop|\bloops back|\bno route to host|"
       r"\b(?:network|host) (?:is )?unreachable|\bunable to route"),
    _R("no-answer", "no-answer",
       r"\btimed? ?out\b|\bconnection (?:refused|reset|lost|closed|dropped)|\blost connection|"
       r"\bunable to connect|\b(?:could not|couldn't|did not accept our requests to) connect|"
       r"\bno answer"),
    # receiving system trouble (X.3.x)
    _R("system-error", "other",
       r"\bsystem (?:config|error|problem|not accepting|busy)|\bconfiguration error|"
       r"\bmail ?system problem|\bservice (?:currently |temporarily )?(?:unavailable|"
       r"not available)|\btemporar(?:y|ily) (?:failure|error|unavailable|problem)|"
       r"\binternal (?:server )?error|\binsufficient (?:system )?resources|\blocal error|"
       r"\bmailer ?error|\bx-unix\b|\bprocmail\b|\bpipe to\b|\bcould not load\b"),
    # protocol errors of our session that name themselves
    _R("syntax-error", "protocol",
       r"\bsyntax error|\bcommand (?:not recognized|unrecognized)|\bunrecognized command|"
       r"\bline too long", klass="block"),
    # policy refusals that name no cause (content, access, generic policy)
    _R("policy", "policy",
       r"\bpolic(?:y|ies)\b|\bprohibited\b|\bnot permitted\b|\bnot allowed\b|"
       r"\baccess denied\b|\bsecurity\b|\bcontent\b|\bnot accepted\b|\brefused\b|"
       r"\b(?:mail|message|e-?mail) (?:was |has been )?rejected\b|\bunverif(?:y|i)able\b"),
)

# --- band 4: what is left: subjects, basic codes, phases -------------------------------------
_FALLBACKS: tuple[BounceRule, ...] = (
    # "try again later" with nothing more specific: the site asks for a pause
    _R("try-again-later", "rate-limited",
       r"\btry (?:again )?later\b|\bplease try again\b|\bcome back later\b", backoff=True),
    # subjects alone say which layer failed (RFC 3463 §3) when the detail is unknown
    _R("subject-5.2", "other", code="5xx", enhanced="x.2.*"),
    _R("subject-5.3", "other", code="5xx", enhanced="x.3.*"),
    _R("subject-5.4", "routing", code="5xx", enhanced="x.4.*"),
    _R("subject-5.5", "protocol", code="5xx", enhanced="x.5.*"),
    _R("subject-5.6", "policy", code="5xx", enhanced="x.6.*"),
    _R("subject-5.7", "policy", code="5xx", enhanced="x.7.*"),
    # basic codes that mean something by themselves
    _R("code-421", "rate-limited", code="421", backoff=True),  # closing channel (RFC 5321)
    _R("code-50x", "protocol", code="50x", klass="block"),     # our command (RFC 5321 §4.2.3)
    _R("code-551", "invalid-recipient", code="551"),           # user not local (RFC 5321 §3.4)
    _R("code-530", "auth-failure", code="530"),                # authentication required
    _R("code-534", "auth-failure", code="534"),                # mechanism too weak (RFC 4954)
    _R("code-535", "auth-failure", code="535"),                # credentials invalid (RFC 4954)
    _R("code-538", "auth-failure", code="538"),                # encryption required (RFC 4954)
    _R("temporary", "other", code="4xx", klass="soft"),
    # notices that say only that the address is wrong, in words (no code, no status): "No valid
    # recipients" (a carrier's MMS gateway), "Please check if address is correct" (InterScan
    # MSS). After the subject rules, so that Postfix's "554 5.5.1 Error: no valid recipients"
    # (every RCPT refused, for whatever reason) stays a protocol answer.
    _R("address-wrong-in-words", "invalid-recipient",
       r"\bno valid recipients?\b|\bcheck (?:if|that|whether) (?:the )?(?:e-?mail |recipient'?s? )?"
       r"address(?:es)? (?:is|are) (?:correct|valid|right)\b"),
    # a 5xx that said nothing: what it refused follows from when it came (RFC 5321 §3)
    _R("refused-at-connect", "policy", code="5xx",
       phase=("connect", "connection", "greeting", "ehlo")),
    _R("refused-at-starttls", "policy", code="5xx", phase=("starttls",)),
    _R("refused-sender", "policy", code="5xx", phase=("mail",)),
    _R("refused-message", "policy", code="5xx", phase=("data",)),
    _R("unrecognised", "other"),
)


def default_rules() -> tuple[BounceRule, ...]:
    """The shipped rules, in the order they are tried."""
    return (*_CAUSE, *_enhanced_rules(early=True), *_TEXTS, *_enhanced_rules(early=False),
            *_FALLBACKS)


#: The shipped rules (see :func:`default_rules`).
RULES: tuple[BounceRule, ...] = default_rules()
