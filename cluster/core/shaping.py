"""Adaptive shaping: rules that react to what a site answers (KumoMTA's traffic shaping
automation, in our terms).

A rule matches a remote reply by basic code, enhanced status code (RFC 3463) and a text regex,
optionally only at one mailbox provider (Gmail, Yahoo/AOL, Outlook/Hotmail, Apple iCloud,
Comcast: recognised by the site's MX host names). Its action is one of

- ``suspend``: no mail to the site (or to the site from one egress source) for ``duration``;
- ``set_limits``: lower the site's rate, connections and deliveries per connection for
  ``duration`` (a rule slows a site down, never speeds it up: each field is the smaller of the
  rule's and the configured one);
- ``bounce``: the reply is permanent (e.g. Yahoo ``[TS03]``: "retrying will NOT succeed");
- ``transient``: the reply concerns the recipient only: retried, never a reason to slow the
  site (and a 5xx becomes a 4xx).

Its trigger is ``immediate`` or ``"N/h"`` (the Nth matching reply within an hour fires it).
``suspend`` and ``set_limits`` fire per key (the site, or ``site#source`` for rules with
``scope = "source"``) and last ``duration``; while one is active for a key, further matches do
not fire it again (they do not extend it either: the same burst counts once).

Owns: the rules format (TOML, :func:`rules_from_toml`), the provider table, matching
(:meth:`ShapingRules.match`) and the per-key state (:class:`ShapingEngine`: trigger counters,
active actions, expiry). Pure: no I/O, no Ray, no clock (``now`` is an argument). raymta's own
failures (a result made because raymta paused or throttled a site, DNS errors, connection
failures without a reply) are never fed to rules: :meth:`ShapingEngine.observe` refuses them
(``own=True``, or a text raymta wrote), so a suspension can never re-trigger itself.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cluster.core.ratespec import RateSpec, format_duration, parse_duration
from cluster.core.replies import Classification, Outcome
from cluster.core.sites import SiteLimits

__all__ = [
    "ACTIONS",
    "Action",
    "ShapingEngine",
    "ShapingError",
    "ShapingRule",
    "ShapingRules",
    "apply_limits",
    "own_text",
    "reshape",
    "rules_from_toml",
    "source_key",
    "split_key",
]

ACTIONS = ("suspend", "set_limits", "bounce", "transient")
_KEYS = {"name", "provider", "code", "enhanced", "text", "action", "duration", "trigger",
         "scope", "rate", "max_connections", "deliveries_per_connection"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_CODE = re.compile(r"[245x][0-9x][0-9x]")
_ENH = re.compile(r"([245x])\.(\d{1,3}|\*)\.(\d{1,3}|\*)")
_TRIGGER = re.compile(r"(\d{1,6})\s*/\s*h(?:our)?")
#: texts raymta writes on results it makes itself ("raymta: no connection slot ...")
_OWN = re.compile(r"\braymta\b", re.IGNORECASE)
#: a rule's text is searched in at most this much of a reply
_TEXT_MAX = 2000
_SOURCE_SEP = "#"


class ShapingError(ValueError):
    """A rules file that cannot be used; the message names the file and the rule."""

    def __init__(self, source: str, rule: str, problem: str) -> None:
        super().__init__(f"{source}: shaping rule {rule}: {problem}")


@dataclass(frozen=True)
class ShapingRule:
    name: str
    action: str
    code: str | None = None            # "421", "4xx"
    enhanced: str | None = None        # "4.7.0", "4.7.*"
    text: str | None = None            # regex, case-insensitive
    provider: str = ""                 # "" = any site
    duration: float = 0.0              # suspend / set_limits
    per_hour: int = 0                  # 0 = immediate
    scope: str = "site"                # "site" | "source"
    rates: tuple[RateSpec, ...] = ()   # set_limits
    max_connections: int = 0
    deliveries_per_connection: int = 0
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches_code(self, code: int | None, enhanced: str | None) -> bool:
        if self.code is not None and (
                code is None or not all(p in ("x", c) for p, c in zip(self.code, f"{code:03d}"))):
            return False
        if self.enhanced is not None:
            if enhanced is None:
                return False
            parts = enhanced.split(".")
            if len(parts) != 3 or not all(p in ("x", "*", c) or (p.isdigit() and c.isdigit()
                                                                 and int(p) == int(c))
                                          for p, c in zip(self.enhanced.split("."), parts)):
                return False
        return True

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "action": self.action,
                               "provider": self.provider or "any",
                               "trigger": f"{self.per_hour}/h" if self.per_hour else "immediate"}
        if self.duration:
            out["duration"] = format_duration(self.duration)
        return out


@dataclass(frozen=True)
class Action:
    """A rule in force for a key (a site, or ``site#source``) until ``until``."""

    rule: str
    action: str
    key: str
    until: float
    fired_at: float
    rates: tuple[str, ...] = ()
    max_connections: int = 0
    deliveries_per_connection: int = 0
    text: str = ""      # the reply that fired it (the operator's "why")

    @property
    def site(self) -> str:
        return split_key(self.key)[0]

    @property
    def source(self) -> str:
        return split_key(self.key)[1]

    def to_wire(self) -> dict[str, Any]:
        return {"rule": self.rule, "action": self.action, "key": self.key,
                "until": self.until, "fired_at": self.fired_at, "rates": list(self.rates),
                "max_connections": self.max_connections,
                "deliveries_per_connection": self.deliveries_per_connection,
                "text": self.text}

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> Action:
        return cls(str(w["rule"]), str(w["action"]), str(w["key"]), float(w["until"]),
                   float(w.get("fired_at", 0.0)), tuple(w.get("rates", ())),
                   int(w.get("max_connections", 0)), int(w.get("deliveries_per_connection", 0)),
                   str(w.get("text", "")))


def source_key(site: str, source: str) -> str:
    return f"{site}{_SOURCE_SEP}{source}" if source else site


def split_key(key: str) -> tuple[str, str]:
    site, _, source = key.partition(_SOURCE_SEP)
    return site, source


def own_text(text: str) -> bool:
    """A result raymta made itself (its texts name raymta): never a rule's business."""
    return bool(_OWN.search(text or ""))


def apply_limits(limits: SiteLimits, a: Action) -> SiteLimits:
    """``limits`` lowered by a ``set_limits`` action (each field: the smaller)."""
    kw: dict[str, Any] = {}
    if a.max_connections:
        kw["max_connections"] = min(limits.max_connections, a.max_connections)
    if a.deliveries_per_connection:
        kw["deliveries_per_connection"] = min(limits.deliveries_per_connection,
                                              a.deliveries_per_connection)
    # the rule's rates join the site's; one already there is not added again (the shards
    # send limits a rule lowered, and the throttle applies the rule to them once more)
    added = tuple(r for r in (RateSpec.parse(x) for x in a.rates) if r not in limits.rates)
    if added:
        kw["rates"] = (*limits.rates, *added)
    return replace(limits, **kw) if kw else limits


class ShapingRules:
    """Rules compiled once, with the provider table (provider → MX host suffixes)."""

    def __init__(self, rules: Sequence[ShapingRule], providers: Mapping[str, Sequence[str]],
                 source: str = "rules") -> None:
        self.rules = tuple(rules)
        self.providers = {p: tuple(s.lower().strip(".") for s in sfx)
                          for p, sfx in providers.items()}
        self.source = source
        self._provider_memo: OrderedDict[str, str] = OrderedDict()
        by_provider: dict[str, list[ShapingRule]] = {}
        for r in self.rules:
            by_provider.setdefault(r.provider, []).append(r)
        self._by_provider = {p: tuple(rs) for p, rs in by_provider.items()}

    def __len__(self) -> int:
        return len(self.rules)

    def provider_of(self, site: str) -> str:
        """The provider whose MX suffixes one of the site's hosts ends with ("" for none).
        A site key is its MX host names, comma-joined (:func:`cluster.core.sites.site_key`);
        ``domain:x`` and ``route:h:p`` sites are matched by their name."""
        hit = self._provider_memo.get(site)
        if hit is not None:
            return hit
        hosts = [h.rsplit(":", 1)[-1] if h.startswith("domain:") else h
                 for h in site.lower().split(",")]
        found = ""
        for p, suffixes in self.providers.items():
            if any(h == s or h.endswith("." + s) for h in hosts for s in suffixes):
                found = p
                break
        self._provider_memo[site] = found
        if len(self._provider_memo) > 4096:
            self._provider_memo.popitem(last=False)
        return found

    def match(self, site: str, code: int | None, enhanced: str | None,
              text: str) -> list[ShapingRule]:
        """Every rule that fits a reply from ``site``: its provider's rules, then the generic
        ones, in file order."""
        prov = self.provider_of(site)
        cands = (*(self._by_provider.get(prov, ()) if prov else ()), *self._by_provider.get("", ()))
        text = text[:_TEXT_MAX]
        return [r for r in cands if r.matches_code(code, enhanced)
                and (r.pattern is None or r.pattern.search(text))]

    def outcome(self, site: str, code: int | None, enhanced: str | None,
                text: str) -> str | None:
        """"bounce" or "transient" when an immediate rule re-classifies this reply."""
        for r in self.match(site, code, enhanced, text):
            if r.action in ("bounce", "transient") and not r.per_hour:
                return r.action
        return None


def _rule(raw: Mapping[str, Any], source: str, label: str,
          providers: Mapping[str, Any]) -> ShapingRule:
    def bad(problem: str) -> ShapingError:
        return ShapingError(source, label, problem)
    unknown = set(raw) - _KEYS
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)} (known: {', '.join(sorted(_KEYS))})")
    for k in ("name", "provider", "code", "enhanced", "text", "action", "trigger", "scope"):
        if k in raw and not isinstance(raw[k], str):
            raise bad(f"{k}: expected a string, got {raw[k]!r}")
    name = raw.get("name")
    if not name or not _NAME.fullmatch(name):
        raise bad(f"name {name!r}: use letters, digits and . _ : - (at most 64)")
    action = raw.get("action")
    if action not in ACTIONS:
        raise bad(f"action {action!r}: expected one of {', '.join(ACTIONS)}")
    provider = raw.get("provider", "")
    if provider and provider not in providers:
        raise bad(f"provider {provider!r}: unknown (known: {', '.join(sorted(providers))})")
    code = raw.get("code")
    if code is not None and not _CODE.fullmatch(code):
        raise bad(f"code {code!r}: expected e.g. '421', '45x' or '4xx'")
    enhanced = raw.get("enhanced")
    if enhanced is not None and not _ENH.fullmatch(enhanced):
        raise bad(f"enhanced {enhanced!r}: expected e.g. '4.7.0', 'x.7.*'")
    text = raw.get("text")
    pattern = None
    if text is not None:
        if not text:
            raise bad("text is empty (leave it out to match any text)")
        try:
            pattern = re.compile(text, re.IGNORECASE)
        except re.error as e:
            raise bad(f"text is not a valid regular expression: {e}") from None
    if code is None and enhanced is None and text is None:
        raise bad("give at least one of code, enhanced or text")
    trigger = raw.get("trigger", "immediate")
    per_hour = 0
    if trigger != "immediate":
        m = _TRIGGER.fullmatch(trigger.strip())
        if not m or int(m[1]) < 1:
            raise bad(f"trigger {trigger!r}: expected 'immediate' or 'N/h' (N >= 1)")
        per_hour = int(m[1]) if int(m[1]) > 1 else 0
    scope = raw.get("scope", "site")
    if scope not in ("site", "source"):
        raise bad(f"scope {scope!r}: expected site or source")
    duration = 0.0
    if action in ("suspend", "set_limits"):
        if "duration" not in raw:
            raise bad(f"action {action} needs a duration (e.g. '2h')")
        try:
            duration = parse_duration(raw["duration"])
        except (ValueError, TypeError) as e:
            raise bad(f"duration: {e}") from None
        if duration <= 0:
            raise bad(f"duration must be greater than zero, got {raw['duration']!r}")
    elif "duration" in raw:
        raise bad(f"action {action} takes no duration (it re-classifies one reply)")
    elif per_hour:
        raise bad(f"action {action} is per reply: its trigger must be immediate")
    limit_keys = {"rate", "max_connections", "deliveries_per_connection"} & set(raw)
    if action != "set_limits" and limit_keys:
        raise bad(f"{', '.join(sorted(limit_keys))}: only for action set_limits")
    if action == "set_limits" and not limit_keys:
        raise bad("set_limits needs rate, max_connections or deliveries_per_connection")
    rates: tuple[RateSpec, ...] = ()
    if "rate" in raw:
        rr = raw["rate"] if isinstance(raw["rate"], list) else [raw["rate"]]
        try:
            rates = tuple(RateSpec.parse(r) for r in rr)
        except (ValueError, TypeError, AttributeError) as e:
            raise bad(f"rate: {e}") from None
    ints = {}
    for k in ("max_connections", "deliveries_per_connection"):
        if k in raw:
            v = raw[k]
            if type(v) is not int or v < 1:
                raise bad(f"{k}: expected an integer >= 1, got {v!r}")
            ints[k] = v
    return ShapingRule(name, action, code, enhanced, text, provider, duration, per_hour, scope,
                       rates, ints.get("max_connections", 0),
                       ints.get("deliveries_per_connection", 0), pattern)


def rules_from_toml(doc: Mapping[str, Any], source: str,
                    base: ShapingRules | None = None) -> ShapingRules:
    """Rules from a parsed TOML document::

        replace = false            # true: these rules replace ``base``'s (the shipped ones)
        [providers]                # provider = MX host suffixes (added to base's)
        yahoo = ["yahoodns.net"]
        [[rule]]                   # tried before base's rules, in file order
        name = "yahoo-tss04"
        provider = "yahoo"         # optional: only at this provider's sites
        code = "421"               # optional, as are enhanced and text (one is needed)
        enhanced = "4.7.0"
        text = '\\[TSS04\\]'
        action = "suspend"         # suspend | set_limits | bounce | transient
        duration = "2h"            # suspend, set_limits
        trigger = "immediate"      # or "3/h"
        scope = "site"             # or "source": per (site, egress source)
        # set_limits: rate = "10/min", max_connections = 2, deliveries_per_connection = 10

    Raises :class:`ShapingError` naming ``source`` and the rule for any bad field."""
    for k in doc:
        if k not in ("replace", "providers", "rule"):
            raise ShapingError(source, "-", f"unknown key {k!r} (expected replace, "
                                            "[providers] and [[rule]])")
    repl = doc.get("replace", False)
    if not isinstance(repl, bool):
        raise ShapingError(source, "-", f"replace: expected true or false, got {repl!r}")
    providers: dict[str, tuple[str, ...]] = dict(base.providers) if base is not None else {}
    raw_p = doc.get("providers", {})
    if not isinstance(raw_p, Mapping):
        raise ShapingError(source, "-", "providers: expected a table of name = [suffixes]")
    for p, sfx in raw_p.items():
        if not isinstance(sfx, list) or not all(isinstance(s, str) and s for s in sfx):
            raise ShapingError(source, "-", f"providers.{p}: expected a list of MX suffixes")
        providers[p] = (*providers.get(p, ()), *sfx)
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise ShapingError(source, "-", "expected an array of tables [[rule]]")
    rules = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_rules):
        label = f"{i + 1}" + (f" ({raw.get('name')!r})" if isinstance(raw, dict) else "")
        if not isinstance(raw, dict):
            raise ShapingError(source, label, "expected a table")
        r = _rule(raw, source, label, providers)
        if r.name in seen:
            raise ShapingError(source, label, f"duplicate rule name {r.name!r}")
        seen.add(r.name)
        rules.append(r)
    kept = [] if repl or base is None else [r for r in base.rules if r.name not in seen]
    return ShapingRules([*rules, *kept], providers,
                        source if base is None else f"{source} + {base.source}")


class ShapingEngine:
    """Per-key trigger counters and the actions in force. Bounded: at most ``max_keys``
    counters (least recently used dropped) and ``max_keys`` active actions (the one ending
    first dropped, and counted)."""

    def __init__(self, rules: ShapingRules, max_keys: int = 10_000) -> None:
        self.rules = rules
        self.max_keys = max_keys
        self._hits: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        #: (key, action kind) → Action
        self.active: dict[tuple[str, str], Action] = {}
        self.counters = {"observed": 0, "ignored_own": 0, "matched": 0, "fired": 0,
                         "expired": 0, "dropped": 0}

    def observe(self, site: str, source: str, code: int | None, enhanced: str | None,
                text: str, now: float, *, own: bool = False) -> list[Action]:
        """A remote reply from ``site`` through egress ``source``; the actions it fires."""
        if own or code is None or own_text(text):
            self.counters["ignored_own"] += 1
            return []
        self.counters["observed"] += 1
        fired: list[Action] = []
        for r in self.rules.match(site, code, enhanced, text):
            self.counters["matched"] += 1
            if r.action not in ("suspend", "set_limits"):
                continue   # per reply: the relay re-classifies (ShapingRules.outcome)
            key = source_key(site, source) if r.scope == "source" else site
            cur = self.active.get((key, r.action))
            if cur is not None and cur.until > now:
                continue   # in force: the same burst counts once
            if r.per_hour and not self._count(r.name, key, r.per_hour, now):
                continue
            a = Action(r.name, r.action, key, now + r.duration, now,
                       tuple(str(x) for x in r.rates), r.max_connections,
                       r.deliveries_per_connection, text[:200])
            self.adopt(a)
            self.counters["fired"] += 1
            fired.append(a)
        return fired

    def _count(self, rule: str, key: str, n: int, now: float) -> bool:
        k = (rule, key)
        q = self._hits.get(k)
        if q is None:
            q = self._hits[k] = deque(maxlen=n)
            if len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
        else:
            self._hits.move_to_end(k)
        q.append(now)
        if len(q) >= n and now - q[0] <= 3600.0:
            q.clear()
            return True
        return False

    def adopt(self, a: Action) -> None:
        """Put an action in force (fired here, or recovered after a restart)."""
        self.active[(a.key, a.action)] = a
        if len(self.active) > self.max_keys:
            first = min(self.active, key=lambda k: self.active[k].until)
            del self.active[first]
            self.counters["dropped"] += 1

    def expire(self, now: float) -> list[Action]:
        """Actions that ran out, removed."""
        done = [k for k, a in self.active.items() if a.until <= now]
        out = [self.active.pop(k) for k in done]
        self.counters["expired"] += len(out)
        return out

    def suspended(self, site: str, source: str, now: float) -> Action | None:
        for key in (site, source_key(site, source)) if source else (site,):
            a = self.active.get((key, "suspend"))
            if a is not None and a.until > now:
                return a
        return None

    def limits(self, site: str, limits: SiteLimits, now: float) -> SiteLimits:
        a = self.active.get((site, "set_limits"))
        return apply_limits(limits, a) if a is not None and a.until > now else limits

    def in_force(self, now: float) -> list[Action]:
        return sorted((a for a in self.active.values() if a.until > now),
                      key=lambda a: (a.key, a.action))


def reshape(rules: ShapingRules | None, site: str, c: Classification) -> Classification:
    """A :class:`cluster.core.replies.Classification` as the rules' ``bounce`` / ``transient``
    actions re-classify it (unchanged when none matches): bounce makes a transient reply
    permanent; transient makes a permanent reply transient and never slows the site."""
    if rules is None or c.code is None or c.outcome is Outcome.DELIVERED:
        return c
    what = rules.outcome(site, c.code, c.enhanced, c.text)
    if what is None:
        return c
    if what == "bounce":
        return replace(c, outcome=Outcome.PERMANENT, site_backoff=False,
                       bounce_class=c.bounce_class if c.bounce_class != "soft" else "block",
                       rule=c.rule or "shaping")
    return replace(c, outcome=Outcome.TRANSIENT, site_backoff=False,
                   bounce_class="soft" if c.bounce_class in ("hard", "block") else c.bounce_class)
