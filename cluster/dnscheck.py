"""``raymta dns-check``: is a sending domain's DNS set up for delivery to the big mailbox providers?

Role: look up a domain's MX, SPF, DKIM, DMARC, MTA-STS and TLS-RPT records and the reverse
DNS of each egress address, and judge each one pass / warn / fail with the fix to apply.
The judging is pure (the ``check_*`` functions take record text and, for SPF, a lookup
function); :class:`Resolver` does the lookups, always through the configured nameservers
(``[dns] nameservers`` and ``port``; the system resolver only when none are configured).
Owns: the small parsers it needs (SPF per RFC 7208, DMARC per RFC 7489, DKIM key records per
RFC 6376 §3.6.1 and RFC 8463) and the rules of each check.
Must not: send anything but DNS queries, or print a private key (it compares public halves).
"""

from __future__ import annotations

import base64
import functools
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

__all__ = [
    "Check",
    "LookupError_",
    "Resolver",
    "check_dkim",
    "check_dmarc",
    "check_fcrdns",
    "check_mta_sts",
    "check_mx",
    "check_spf",
    "check_tlsrpt",
    "format_table",
    "parse_tags",
    "run_checks",
    "spf_check_host",
    "spf_lookup_count",
]

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass(frozen=True)
class Check:
    area: str        # MX, SPF, DKIM, DMARC, FCrDNS, MTA-STS, TLS-RPT
    status: str      # pass | warn | fail
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class LookupError_(Exception):
    """A lookup that got no usable answer (SERVFAIL, timeout): not the same as "no record"."""


# ------------------------------------------------------------------------------ lookups
class Resolver:
    """DNS lookups through the configured nameservers only. ``txt``/``mx``/``addresses``/
    ``ptr`` return [] for NXDOMAIN and NODATA and raise :class:`LookupError_` otherwise."""

    def __init__(self, nameservers: Sequence[str] = (), port: int = 53, timeout: float = 5.0
                 ) -> None:
        if nameservers:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = list(nameservers)
            r.port = port
        else:   # production without [dns] nameservers: the system's resolver
            r = dns.resolver.Resolver()
        r.timeout = r.lifetime = timeout
        r.cache = None
        self._r = r
        self.queries = 0

    def _ask(self, name: str, rdtype: str) -> list[Any]:
        self.queries += 1
        try:
            return list(self._r.resolve(name, rdtype, search=False))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.NoNameservers:
            raise LookupError_(f"{name} {rdtype}: SERVFAIL") from None
        except dns.exception.Timeout:
            raise LookupError_(f"{name} {rdtype}: timed out") from None
        except dns.exception.DNSException as e:
            raise LookupError_(f"{name} {rdtype}: {type(e).__name__}") from None

    def txt(self, name: str) -> list[str]:
        return [b"".join(rd.strings).decode("utf-8", "replace") for rd in self._ask(name, "TXT")]

    def mx(self, name: str) -> list[tuple[int, str]]:
        return sorted((rd.preference, rd.exchange.to_text(omit_final_dot=True).lower())
                      for rd in self._ask(name, "MX"))

    def addresses(self, name: str) -> list[str]:
        return [rd.address for t in ("A", "AAAA") for rd in self._ask(name, t)]

    def ptr(self, address: str) -> list[str]:
        return [rd.target.to_text(omit_final_dot=True).lower()
                for rd in self._ask(dns.reversename.from_address(address).to_text(), "PTR")]


# ------------------------------------------------------------------------------ MX
def check_mx(domain: str, mx: list[tuple[int, str]], addresses: list[str]) -> Check:
    if len(mx) == 1 and mx[0][1] in ("", "."):
        return Check("MX", WARN, f"{domain} publishes a null MX (RFC 7505): it accepts no mail",
                     "receivers may refuse mail whose return path or From uses a domain that "
                     "takes no replies or bounces: use a domain with real MX hosts there")
    if mx:
        return Check("MX", PASS, f"{domain} MX: " + ", ".join(f"{p} {h}" for p, h in mx))
    if addresses:
        return Check("MX", WARN, f"{domain} has no MX; mail to it goes to its A/AAAA "
                     f"({', '.join(addresses)})", f"publish MX records for {domain}")
    return Check("MX", FAIL, f"{domain} has neither MX nor address records",
                 f"publish MX records for {domain} (bounces and replies need somewhere to go)")


# ------------------------------------------------------------------------------ SPF
_SPF_MECHS = {"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"}
_SPF_LOOKUP = {"include", "a", "mx", "ptr", "exists"}


def _spf_records(txts: list[str]) -> list[str]:
    return [t for t in txts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def _spf_terms(record: str) -> list[tuple[str, str, str]]:
    """(qualifier, mechanism or modifier name, argument) per term; raises ValueError on a
    syntax error (RFC 7208 §4.6.1: permerror)."""
    out = []
    for term in record.split()[1:]:
        if "=" in term.split(":", 1)[0]:
            name, _, arg = term.partition("=")
            if name.lower() in ("redirect", "exp") and not arg:
                raise ValueError(f"{term!r}: modifier without a value")
            out.append(("", name.lower(), arg))
            continue
        q = "+"
        if term[0] in "+-~?":
            q, term = term[0], term[1:]
        name, sep, arg = term.partition(":")
        if "/" in name:
            name, _, cidr = name.partition("/")
            arg = arg + "/" + cidr if sep else "/" + cidr
        name = name.lower()
        if name not in _SPF_MECHS:
            raise ValueError(f"unknown mechanism {term!r}")
        if name in ("include", "exists", "ip4", "ip6") and not arg:
            raise ValueError(f"{name} needs an argument")
        if name == "ip4":
            ipaddress.IPv4Network(arg, strict=False)
        if name == "ip6":
            ipaddress.IPv6Network(arg, strict=False)
        out.append((q, name, arg))
    return out


def spf_lookup_count(domain: str, txt: Callable[[str], list[str]], _seen: set[str] | None = None
                     ) -> int:
    """DNS-querying terms (include, a, mx, ptr, exists, redirect; RFC 7208 §4.6.4) of
    ``domain``'s SPF record, followed through includes and redirects."""
    seen = _seen if _seen is not None else set()
    if domain in seen:
        return 0
    seen.add(domain)
    recs = _spf_records(txt(domain))
    if len(recs) != 1:
        return 0
    n = 0
    for _q, name, arg in _spf_terms(recs[0]):
        if name in _SPF_LOOKUP or name == "redirect":
            n += 1
        if name in ("include", "redirect") and "%" not in arg:
            n += spf_lookup_count(arg.lower(), txt, seen)
    return n


def _cidr(arg: str, default: str) -> tuple[str, int | None, int | None]:
    dom, v4, v6 = arg, None, None
    parts = arg.split("/")
    dom = parts[0] or default
    if len(parts) >= 2 and parts[1]:
        v4 = int(parts[1])
    if len(parts) >= 3 and parts[2]:
        v6 = int(parts[2])
    return dom, v4, v6


def _in(ip: str, addrs: list[str], v4: int | None, v6: int | None) -> bool:
    a = ipaddress.ip_address(ip)
    for x in addrs:
        b = ipaddress.ip_address(x)
        if a.version != b.version:
            continue
        plen = (v4 if a.version == 4 else v6)
        plen = plen if plen is not None else (32 if a.version == 4 else 128)
        if a in ipaddress.ip_network(f"{b}/{plen}", strict=False):
            return True
    return False


def spf_check_host(ip: str, domain: str, r: Any, depth: int = 0) -> str:
    """RFC 7208 §4 check_host, without macro expansion (a term with a macro matches
    nothing): pass | fail | softfail | neutral | none | permerror | temperror."""
    if depth > 10:
        return "permerror"
    try:
        recs = _spf_records(r.txt(domain))
    except LookupError_:
        return "temperror"
    if not recs:
        return "none"
    if len(recs) > 1:
        return "permerror"
    try:
        terms = _spf_terms(recs[0])
    except ValueError:
        return "permerror"
    results = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
    redirect = None
    try:
        for q, name, arg in terms:
            if name == "redirect":
                redirect = arg
                continue
            if name == "exp" or "%" in arg:
                continue
            hit = False
            if name == "all":
                hit = True
            elif name == "ip4" or name == "ip6":
                net = ipaddress.ip_network(arg, strict=False)
                hit = ipaddress.ip_address(ip) in net
            elif name == "a":
                d, v4, v6 = _cidr(arg, domain)
                hit = _in(ip, r.addresses(d), v4, v6)
            elif name == "mx":
                d, v4, v6 = _cidr(arg, domain)
                hit = any(_in(ip, r.addresses(h), v4, v6) for _, h in r.mx(d)[:10])
            elif name == "include":
                sub = spf_check_host(ip, arg.lower(), r, depth + 1)
                if sub in ("temperror", "permerror"):
                    return sub
                if sub == "none":
                    return "permerror"
                hit = sub == "pass"
            elif name == "exists":
                hit = bool(r.addresses(arg))
            elif name == "ptr":
                hit = False    # RFC 7208 §5.5: SHOULD NOT be used; not evaluated here
            if hit:
                return results[q]
    except LookupError_:
        return "temperror"
    if redirect:
        sub = spf_check_host(ip, redirect.lower(), r, depth + 1)
        return "permerror" if sub == "none" else sub
    return "neutral"


def check_spf(domain: str, txts: list[str], r: Any, egress: Sequence[tuple[str, str]]
              ) -> list[Check]:
    """SPF of the return-path ``domain``: one record, valid syntax, ≤ 10 lookups, a hard or
    soft fail at the end, and a pass for every egress source's address ``(name, ip)``."""
    recs = _spf_records(txts)
    if not recs:
        return [Check("SPF", FAIL, f"{domain} has no SPF record",
                      f'publish TXT "{domain}" "v=spf1 ip4:<each egress address> -all"')]
    if len(recs) > 1:
        return [Check("SPF", FAIL, f"{domain} has {len(recs)} SPF records (RFC 7208 §4.5: "
                      "permerror, receivers treat SPF as broken)",
                      "merge them into one v=spf1 record")]
    rec = recs[0]
    out = []
    try:
        terms = _spf_terms(rec)
    except ValueError as e:
        return [Check("SPF", FAIL, f"{domain} SPF syntax error: {e}: {rec!r}",
                      "fix the record (RFC 7208 §4.6.1 grammar)")]
    out.append(Check("SPF", PASS, f"{domain}: one record: {rec}"))
    try:
        n = spf_lookup_count(domain, r.txt)
    except (LookupError_, ValueError) as e:
        n = -1
        out.append(Check("SPF", WARN, f"could not count lookups: {e}", ""))
    if n > 10:
        out.append(Check("SPF", FAIL, f"{n} DNS-querying terms (include, a, mx, ptr, exists, "
                         "redirect; limit 10, RFC 7208 §4.6.4): receivers return permerror",
                         "flatten includes into ip4:/ip6: terms or drop unused ones"))
    elif n >= 0:
        out.append(Check("SPF", PASS, f"{n} DNS-querying terms (limit 10)"))
    last = [t for t in terms if t[1] in ("all", "redirect")]
    if not last:
        out.append(Check("SPF", WARN, "the record ends without 'all' (unlisted senders get "
                         "neutral)", "end it with -all (or ~all while testing)"))
    elif last[-1][1] == "all":
        q = last[-1][0]
        if q in "-~":
            out.append(Check("SPF", PASS, f"ends in {q}all"))
        else:
            out.append(Check("SPF", FAIL if q == "+" else WARN,
                             f"ends in {q}all: anyone may send as {domain}",
                             "end the record with -all or ~all"))
    for name, ip in egress:
        if not ip:
            out.append(Check("SPF", WARN, f"egress {name}: no bind_address configured, its "
                             "sending address is up to the kernel", "set egress.bind_address"))
            continue
        res = spf_check_host(ip, domain, r)
        st = PASS if res == "pass" else FAIL if res in ("fail", "permerror") else WARN
        out.append(Check("SPF", st, f"egress {name} ({ip}): SPF {res}",
                         "" if st == PASS else f"add ip{ipaddress.ip_address(ip).version}:{ip}"
                         f" to {domain}'s SPF record"))
    return out


# ------------------------------------------------------------------------------ DKIM
def parse_tags(text: str) -> dict[str, str]:
    """A tag=value list (RFC 6376 §3.2), whitespace removed; later duplicates ignored."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if "=" in part:
            k, _, v = part.partition("=")
            out.setdefault(k.strip(), "".join(v.split()))
    return out


def _key_bits(k: str, p: str) -> int | None:
    from cryptography.hazmat.primitives import serialization
    try:
        raw = base64.b64decode(p, validate=True)
    except ValueError:
        return None
    if k == "ed25519":
        return 256 if len(raw) == 32 else None
    try:
        pub = serialization.load_der_public_key(raw)
    except ValueError:
        return None
    return getattr(pub, "key_size", None)


def check_dkim(domain: str, selector: str, txts: list[str], expected_p: str | None,
               algorithm: str | None = None) -> Check:
    """The key record at ``selector._domainkey.domain``: present, one record, v=DKIM1, a key
    (p= not empty: an empty p= revokes it), of the configured type and size, and equal to the
    configured key's public half (``expected_p``) when one is configured."""
    where = f"{selector}._domainkey.{domain}"
    recs = [t for t in txts if "p=" in t or t.startswith("v=DKIM1")]
    publish = f"publish the TXT record `raymta dkim keygen` printed for this key at {where}"
    if not recs:
        return Check("DKIM", FAIL, f"selector {selector}: no key record at {where}", publish)
    if len(recs) > 1:
        return Check("DKIM", FAIL, f"selector {selector}: {len(recs)} records at {where}",
                     "keep one")
    tags = parse_tags(recs[0])
    if tags.get("v", "DKIM1") != "DKIM1":
        return Check("DKIM", FAIL, f"selector {selector}: v={tags['v']} (must be DKIM1 and "
                     "first)", publish)
    p = tags.get("p", "")
    if not p:
        return Check("DKIM", FAIL, f"selector {selector}: p= is empty (the key is revoked)",
                     publish)
    k = tags.get("k", "rsa")
    if algorithm and k != algorithm:
        return Check("DKIM", FAIL, f"selector {selector}: DNS says k={k}, the configured key "
                     f"is {algorithm}", publish)
    bits = _key_bits(k, p)
    if bits is None:
        return Check("DKIM", FAIL, f"selector {selector}: p= is not a valid {k} public key",
                     publish)
    if expected_p is not None and p != expected_p:
        return Check("DKIM", FAIL, f"selector {selector}: the published key does not match "
                     "the configured private key (signatures will fail)",
                     f"{publish}, or configure the matching key file")
    if k == "rsa" and bits < 1024:
        return Check("DKIM", FAIL, f"selector {selector}: RSA {bits} bits (RFC 8301: at "
                     "least 1024; verifiers ignore shorter keys)", "use a 2048-bit key")
    if k == "rsa" and bits < 2048:
        return Check("DKIM", WARN, f"selector {selector}: RSA {bits} bits", "rotate to 2048")
    match = ", matches the configured key" if expected_p is not None else \
        " (no configured key to compare)"
    return Check("DKIM", PASS if expected_p is not None else WARN,
                 f"selector {selector}: {k} {bits} bits published{match}",
                 "" if expected_p is not None else "configure this key in [[dkim.key]]")


# ------------------------------------------------------------------------------ DMARC
def _org(domain: str) -> str:
    # the organisational domain, approximated as the last two labels (no public suffix list)
    return ".".join(domain.split(".")[-2:])


def _aligned(a: str, b: str, mode: str) -> bool:
    return a == b if mode == "s" else _org(a) == _org(b)


def check_dmarc(domain: str, txts: list[str], where: str, dkim_domains: Sequence[str],
                return_path: str) -> list[Check]:
    """DMARC (RFC 7489): one v=DMARC1 record, a policy (none is monitoring only), rua for
    reports, and From aligned with a DKIM d= and with the return-path domain (SPF)."""
    recs = [t for t in txts if t.replace(" ", "").startswith("v=DMARC1")]
    if not recs:
        return [Check("DMARC", FAIL, f"no DMARC record at _dmarc.{domain}",
                      f'publish TXT "_dmarc.{domain}" "v=DMARC1; p=quarantine; '
                      f'rua=mailto:dmarc@{domain}" (Gmail and Yahoo require one for bulk mail)')]
    if len(recs) > 1:
        return [Check("DMARC", FAIL, f"{len(recs)} DMARC records at {where}: receivers ignore "
                      "them all", "keep one")]
    t = parse_tags(recs[0])
    out = []
    p = t.get("p", "")
    if p not in ("none", "quarantine", "reject"):
        out.append(Check("DMARC", FAIL, f"{where}: p={p or '(missing)'}",
                         "set p=quarantine or p=reject (p=none while you watch the reports)"))
    elif p == "none":
        out.append(Check("DMARC", WARN, f"{where}: p=none (monitoring only: spoofed mail is "
                         "not stopped)", "move to p=quarantine, then p=reject, once reports "
                         "show your mail aligned"))
    else:
        out.append(Check("DMARC", PASS, f"{where}: p={p}"))
    if "rua" in t:
        out.append(Check("DMARC", PASS, f"aggregate reports to {t['rua']}"))
    else:
        out.append(Check("DMARC", WARN, "no rua=: you get no aggregate reports",
                         f"add rua=mailto:dmarc-reports@{domain}"))
    adkim, aspf = t.get("adkim", "r"), t.get("aspf", "r")
    ok = [d for d in dkim_domains if _aligned(d, domain, adkim)]
    if ok:
        out.append(Check("DMARC", PASS, f"DKIM d={ok[0]} aligns with From {domain} "
                         f"(adkim={adkim})"))
    else:
        out.append(Check("DMARC", FAIL, f"no configured DKIM key signs with a d= aligned to "
                         f"{domain} (adkim={adkim})",
                         f"add a [[dkim.key]] for {domain} (`raymta dkim keygen --domain "
                         f"{domain} --selector s1`)"))
    if _aligned(return_path, domain, aspf):
        out.append(Check("DMARC", PASS, f"return path {return_path} aligns with From "
                         f"(aspf={aspf})"))
    else:
        out.append(Check("DMARC", WARN, f"return path {return_path} does not align with "
                         f"{domain} (aspf={aspf}): SPF cannot pass DMARC, DKIM must",
                         f"use a return path under {_org(domain)}"))
    return out


# ------------------------------------------------------------------------------ FCrDNS
def check_fcrdns(name: str, address: str, ehlo: str, ptrs: list[str],
                 forward: dict[str, list[str]]) -> Check:
    """Forward-confirmed reverse DNS: the egress address has a PTR whose name resolves back
    to it, and that name is the EHLO name (what Gmail and Yahoo check)."""
    if not ptrs:
        return Check("FCrDNS", FAIL, f"egress {name} ({address}): no PTR record",
                     f"ask the address's owner for PTR {address} -> {ehlo}")
    confirmed = [p for p in ptrs if address in forward.get(p, [])]
    if not confirmed:
        return Check("FCrDNS", FAIL, f"egress {name} ({address}): PTR {', '.join(ptrs)} does "
                     f"not resolve back to {address}",
                     f"add A/AAAA {ptrs[0]} -> {address} or fix the PTR")
    if ehlo.lower().rstrip(".") not in confirmed:
        return Check("FCrDNS", FAIL, f"egress {name} ({address}): PTR {confirmed[0]} but EHLO "
                     f"says {ehlo}", f"set egress.ehlo_name = \"{confirmed[0]}\" (or change "
                     "the PTR)")
    return Check("FCrDNS", PASS, f"egress {name} ({address}) <-> {ehlo}")


def check_mta_sts(domain: str, txts: list[str]) -> Check:
    recs = [t for t in txts if t.replace(" ", "").startswith("v=STSv1")]
    if len(recs) == 1 and "id" in parse_tags(recs[0]):
        return Check("MTA-STS", PASS, f"_mta-sts.{domain}: {recs[0]}")
    if len(recs) > 1:
        return Check("MTA-STS", FAIL, f"{len(recs)} records at _mta-sts.{domain}", "keep one")
    return Check("MTA-STS", WARN, f"no MTA-STS record at _mta-sts.{domain} (RFC 8461)",
                 f'publish TXT "_mta-sts.{domain}" "v=STSv1; id=<yyyymmdd>" and the policy '
                 f"at https://mta-sts.{domain}/.well-known/mta-sts.txt")


def check_tlsrpt(domain: str, txts: list[str]) -> Check:
    recs = [t for t in txts if t.replace(" ", "").startswith("v=TLSRPTv1")]
    if len(recs) == 1 and "rua" in parse_tags(recs[0]):
        return Check("TLS-RPT", PASS, f"_smtp._tls.{domain}: {recs[0]}")
    return Check("TLS-RPT", WARN, f"no TLS-RPT record at _smtp._tls.{domain} (RFC 8460)",
                 f'publish TXT "_smtp._tls.{domain}" "v=TLSRPTv1; rua=mailto:tlsrpt@{domain}"')


# ------------------------------------------------------------------------------ all of it
def _guard(area: str, fn: Callable[[], Any]) -> list[Check]:
    try:
        out = fn()
    except LookupError_ as e:
        return [Check(area, FAIL, f"lookup failed: {e}", "check the zone's nameservers")]
    return out if isinstance(out, list) else [out]


def _dkim_of(r: Resolver, domain: str, selector: str, expected: str | None,
             algorithm: str | None) -> Check:
    return check_dkim(domain, selector, r.txt(f"{selector}._domainkey.{domain}"), expected,
                      algorithm)


def _fcrdns_of(r: Resolver, src: Any) -> Check:
    ptrs = r.ptr(src.bind_address)
    return check_fcrdns(src.name, src.bind_address, src.ehlo_name, ptrs,
                        {p: r.addresses(p) for p in ptrs})


def run_checks(domain: str, cfg: Any, r: Resolver, *, selectors: Sequence[str] = (),
               return_path: str | None = None) -> list[Check]:
    """Every check for ``domain`` with the keys and egress sources of ``cfg``."""
    domain = domain.lower().rstrip(".")
    rp = (return_path or domain).lower()
    out: list[Check] = []
    out += _guard("MX", lambda: check_mx(domain, r.mx(domain),
                                         [] if r.mx(domain) else r.addresses(domain)))
    egress = [(e.name, e.bind_address) for e in cfg.egress]
    out += _guard("SPF", lambda: check_spf(rp, r.txt(rp), r, egress))
    # DKIM: configured keys for the domain (or its parents), and any selector asked for
    from cluster.adapters.dkim_keys import load_private_key, public_key_b64
    from cluster.core.dkim import signing_domains
    keys = [k for d in signing_domains(domain, cfg.dkim.parent_domains)
            for k in cfg.dkim.keys if k.domain == d]
    keys = keys[:] if not keys else [k for k in keys if k.domain == keys[0].domain]
    seen = set()
    for k in keys:
        if selectors and k.selector not in selectors:
            continue
        seen.add(k.selector)
        try:
            key, alg, _bits, _w = load_private_key(k.key_file)
            expected: str | None = public_key_b64(key)
        except ValueError as err:
            out.append(Check("DKIM", FAIL, f"selector {k.selector}: configured key unusable: "
                             f"{err}", "fix the key file"))
            continue
        out += _guard("DKIM", functools.partial(_dkim_of, r, k.domain, k.selector, expected,
                                                alg))
    for s in selectors:
        if s not in seen:
            out += _guard("DKIM", functools.partial(_dkim_of, r, domain, s, None, None))
    if not keys and not selectors:
        out.append(Check("DKIM", FAIL, f"no DKIM key configured for {domain}",
                         f"raymta dkim keygen --domain {domain} --selector s1, then add it "
                         "to [[dkim.key]]"))

    def dmarc() -> list[Check]:
        where = f"_dmarc.{domain}"
        txts = r.txt(where)
        if not [t for t in txts if t.replace(" ", "").startswith("v=DMARC1")] and \
                _org(domain) != domain:
            where = f"_dmarc.{_org(domain)}"
            txts = r.txt(where)
        return check_dmarc(domain, txts, where, sorted({k.domain for k in keys}), rp)
    out += _guard("DMARC", dmarc)
    for src in cfg.egress:
        if not src.bind_address:
            out.append(Check("FCrDNS", WARN, f"egress {src.name}: no bind_address, nothing to "
                             "check", "set egress.bind_address to the sending address"))
            continue
        out += _guard("FCrDNS", functools.partial(_fcrdns_of, r, src))
    out += _guard("MTA-STS", lambda: check_mta_sts(domain, r.txt(f"_mta-sts.{domain}")))
    out += _guard("TLS-RPT", lambda: check_tlsrpt(domain, r.txt(f"_smtp._tls.{domain}")))
    return out


def format_table(domain: str, checks: Sequence[Check], width: int = 100) -> str:
    lines = [f"dns-check {domain}", f"{'':4} {'area':<8} detail / fix"]
    for c in checks:
        lines.append(f"{c.status.upper():<4} {c.area:<8} {c.detail}")
        if c.fix:
            lines.append(f"{'':4} {'':<8}   fix: {c.fix}")
    n = {s: sum(1 for c in checks if c.status == s) for s in (PASS, WARN, FAIL)}
    lines.append(f"{n[PASS]} pass, {n[WARN]} warn, {n[FAIL]} fail")
    return "\n".join(lines)
