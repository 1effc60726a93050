"""MTA-STS (RFC 8461): the TXT record, the policy text, MX patterns and the policy cache.

Role: the pure half of MTA-STS (``cluster.adapters.mta_sts`` does the DNS and HTTPS I/O, the
relay applies the result). A recipient domain publishes ``_mta-sts.<domain> TXT "v=STSv1;
id=..."`` and a policy at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``; with
``mode: enforce`` only MX hosts matching the policy's ``mx`` patterns may be used, each over
TLS with a certificate valid for its name; with ``testing`` mail goes as usual and failures are
only reported; ``none`` withdraws the policy.
Owns: parsing and validating the TXT record (§3.1) and the policy (§3.2), with errors naming
the line; the MX pattern match (§4.1, a ``*.`` wildcard covers one leftmost label); the cache
of policies per domain, kept for their ``max_age`` and fetched again when the TXT ``id``
changes, where a failed fetch keeps an unexpired policy in use (§5.1).
Pure: no sockets, no DNS, no clock (``now`` is an argument), no Ray.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

__all__ = ["MAX_AGE_LIMIT", "MAX_POLICY_BYTES", "StsCache", "StsPolicy", "StsPolicyError",
           "mx_matches", "parse_policy", "parse_txt", "policy_url", "unmatched_text"]

Mode = Literal["enforce", "testing", "none"]

#: RFC 8461 §3.2: max_age is at most 31557600 s (about a year)
MAX_AGE_LIMIT = 31_557_600
#: RFC 8461 §3.3: senders may limit the policy body; 64 KiB is what Postfix' resolvers use
MAX_POLICY_BYTES = 64 * 1024
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class StsPolicyError(ValueError):
    """A TXT record or policy text that is not valid MTA-STS; the text names the line."""


@dataclass(frozen=True)
class StsPolicy:
    mode: Mode
    #: lowercased patterns: "mx.example.com" or "*.example.net"
    mx: tuple[str, ...]
    #: seconds, at most :data:`MAX_AGE_LIMIT`
    max_age: int

    def matches(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)


def policy_url(domain: str, port: int = 443) -> str:
    """§3.3: the policy of ``domain`` is at this URL (``port`` other than 443 only in tests)."""
    where = f"mta-sts.{domain}" + ("" if port == 443 else f":{port}")
    return f"https://{where}/.well-known/mta-sts.txt"


def parse_txt(records: list[str]) -> str | None:
    """The policy id from the TXT strings at ``_mta-sts.<domain>`` (each record's strings
    already joined), or None when the domain publishes no usable record. §3.1: records not
    starting with ``v=STSv1`` are ignored; zero or several remaining, or one that is malformed,
    mean no policy is available (StsPolicyError for a malformed one, naming what is wrong)."""
    ours = [r for r in records if re.match(r"v=STSv1\s*(;|$)", r)]
    if not ours:
        return None
    if len(ours) > 1:
        raise StsPolicyError(f"{len(ours)} TXT records start with v=STSv1; exactly one may")
    ident = None
    for i, part in enumerate(ours[0].split(";")):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise StsPolicyError(f"TXT field {i + 1} {part!r} is not key=value")
        if key.strip() == "id":
            if not _ID.fullmatch(value.strip()):
                raise StsPolicyError(f"TXT id {value.strip()!r} is not 1-32 letters or digits")
            ident = value.strip()
    if ident is None:
        raise StsPolicyError("TXT record has no id field")
    return ident


def _check_pattern(p: str, n: int) -> str:
    p = p.strip().lower().rstrip(".")
    labels = p.split(".")
    body = labels[1:] if labels[0] == "*" else labels
    if not body or len(labels) < 2 or not all(_LABEL.fullmatch(lb) for lb in body):
        raise StsPolicyError(f"line {n}: mx {p!r} is not a host name or a '*.' pattern")
    return p


def parse_policy(text: str) -> StsPolicy:
    """The policy in ``text`` (§3.2: ``key: value`` lines, LF or CRLF). Unknown keys are
    ignored; version, mode and max_age must each appear once; mx at least once unless the
    mode is none. max_age above :data:`MAX_AGE_LIMIT` is lowered to it."""
    fields: dict[str, tuple[str, int]] = {}
    mx: list[str] = []
    for n, raw in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise StsPolicyError(f"line {n}: {line[:60]!r} is not 'key: value'")
        if key == "mx":
            mx.append(_check_pattern(value, n))
        elif key in ("version", "mode", "max_age"):
            if key in fields:
                raise StsPolicyError(f"line {n}: {key} given twice (first on line "
                                     f"{fields[key][1]})")
            fields[key] = (value, n)
    for key in ("version", "mode", "max_age"):
        if key not in fields:
            raise StsPolicyError(f"policy has no {key} line")
    version, n = fields["version"]
    if version != "STSv1":
        raise StsPolicyError(f"line {n}: version {version!r}, expected STSv1")
    mode, n = fields["mode"]
    if mode not in ("enforce", "testing", "none"):
        raise StsPolicyError(f"line {n}: mode {mode!r}, expected enforce, testing or none")
    age, n = fields["max_age"]
    if not re.fullmatch(r"[0-9]{1,10}", age):
        raise StsPolicyError(f"line {n}: max_age {age!r} is not a number of seconds")
    if not mx and mode != "none":
        raise StsPolicyError(f"policy in mode {mode} has no mx line")
    return StsPolicy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT))  # type: ignore[arg-type]


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: ``mx.example.com`` matches itself only; ``*.example.com`` matches exactly one more
    label on the left (``a.example.com``, not ``example.com`` nor ``a.b.example.com``)."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


def unmatched_text(domain: str, policy: StsPolicy, hosts: list[str]) -> str:
    """"MTA-STS: no MX host of example.com matches its policy (mx: *.mail.example.com):
    evil.example.net refused"."""
    shown = ", ".join(hosts[:3]) + (f" and {len(hosts) - 3} more" if len(hosts) > 3 else "")
    return (f"MTA-STS: no MX host of {domain} matches its {policy.mode} policy "
            f"(mx: {', '.join(policy.mx[:5])}): {shown or 'no host'} refused")


@dataclass(frozen=True)
class _Entry:
    policy: StsPolicy | None
    txt_id: str | None
    #: the policy may be used until then (fetched + max_age)
    expires_at: float
    #: the TXT record was last looked at then
    checked_at: float


class StsCache:
    """Policies per recipient domain, bounded (least recently used go first).

    The adapter asks :meth:`fresh` first (a policy, or None, that needs no DNS query now);
    otherwise it looks up the TXT id and asks :meth:`needs_fetch`; it then :meth:`store`\\ s
    a fetched policy, or calls :meth:`txt_checked`/:meth:`fetch_failed` and uses
    :meth:`current`, which is an unexpired cached policy whatever happened since (§5.1)."""

    def __init__(self, recheck: float = 300.0, max_domains: int = 10_000) -> None:
        #: the TXT record of a domain with a cached answer is looked at again after this
        self.recheck = recheck
        self.max_domains = max_domains
        self._d: OrderedDict[str, _Entry] = OrderedDict()

    def _get(self, domain: str) -> _Entry | None:
        e = self._d.get(domain)
        if e is not None:
            self._d.move_to_end(domain)
        return e

    def _put(self, domain: str, e: _Entry) -> None:
        self._d[domain] = e
        self._d.move_to_end(domain)
        while len(self._d) > self.max_domains:
            self._d.popitem(last=False)

    def fresh(self, domain: str, now: float) -> tuple[bool, StsPolicy | None]:
        """(True, the policy in force or None) when the TXT record was looked at less than
        ``recheck`` ago; (False, None) when it must be looked at now."""
        e = self._get(domain)
        if e is None or now >= e.checked_at + self.recheck:
            return False, None
        return True, self.current(domain, now)

    def known(self, domain: str, now: float) -> tuple[bool, StsPolicy | None]:
        """(whether the domain was looked up at all, the policy in force): a cached policy
        holds until it expires even when its TXT record is due to be looked at again."""
        if domain not in self._d:
            return False, None
        return True, self.current(domain, now)

    def current(self, domain: str, now: float) -> StsPolicy | None:
        """The cached policy if not expired (mode none counts as no policy)."""
        e = self._d.get(domain)
        if e is None or e.policy is None or now >= e.expires_at or e.policy.mode == "none":
            return None
        return e.policy

    def needs_fetch(self, domain: str, txt_id: str | None, now: float) -> bool:
        """Whether the policy must be fetched: a TXT id is published and no unexpired policy
        fetched under that id is cached."""
        if txt_id is None:
            return False
        e = self._d.get(domain)
        return e is None or e.txt_id != txt_id or e.policy is None or now >= e.expires_at

    def answer_usable(self, error: str | None, checked_at: float, now: float) -> bool:
        """Whether a TXT answer looked up elsewhere at ``checked_at`` (the throttle's, beside
        the MX lookup) may stand for a lookup of our own now: it is an answer (``error`` None
        or "nxdomain"; a failed lookup is ours to repeat) and younger than ``recheck``. A
        time ahead of ``now`` (clocks of two nodes) counts as now."""
        return error in (None, "nxdomain") and now - min(checked_at, now) < self.recheck

    def txt_checked(self, domain: str, now: float) -> None:
        """The TXT record was looked at (no record, the same id, or a failed lookup): the
        cached policy, if any, stays until it expires (§5.1: a missing record does not
        withdraw it); nothing cached: remember that there is nothing for ``recheck``."""
        e = self._d.get(domain)
        if e is None:
            self._put(domain, _Entry(None, None, now, now))
        else:
            self._put(domain, _Entry(e.policy, e.txt_id, e.expires_at, now))

    def store(self, domain: str, txt_id: str, policy: StsPolicy, now: float) -> None:
        self._put(domain, _Entry(policy, txt_id, now + policy.max_age, now))

    fetch_failed = txt_checked

    def __len__(self) -> int:
        return len(self._d)
