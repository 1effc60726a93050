"""Submission policy: who may send, as whom, how fast, and what a received message gets.

Owns the decisions an authenticated submission front end (SMTP 587/465, later HTTP) makes
about a sender, apart from any socket: password hashes (scrypt, PHC string form) and their
checking in constant time; the sender domains each user may use, in the envelope and in the
From/Sender header fields; per-IP and per-user connection counts and message rates (GCRA);
the ``Received:`` trace field (RFC 5321 §4.4) and the hop count that detects a mail loop
(RFC 5321 §6.3). It must not open sockets, read files, log, or look at the clock (``now`` is
an argument), and no error or repr it makes contains a password or a password hash.

Pure: the standard library (hashlib.scrypt, email header parsing) and idna only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Iterable, NamedTuple

import idna

from cluster.core.ratespec import Gcra, RateSpec

__all__ = ["PasswordHashError", "SubmissionUser", "UserTable", "Refusal", "LimitBook",
           "hash_password", "check_password_hash", "verify_password", "domain_allowed",
           "envelope_domain", "header_sender_problem", "count_hops", "received_header",
           "completion_fields", "HeaderScan", "scan_header", "rfc5322_date",
           "ApiKey", "ApiKeyTable", "hash_api_key", "new_api_key",
           "SCRYPT_DEFAULTS"]

#: scrypt cost for new hashes: N = 2**14, r = 8, p = 1 (16 MiB, ~50 ms: RFC 7914 §2's
#: interactive-login figure; OWASP's minimum for scrypt)
SCRYPT_DEFAULTS = {"ln": 14, "r": 8, "p": 1}
#: most memory a stored hash may ask scrypt for (so a bad users file cannot exhaust memory)
_SCRYPT_MAXMEM = 256 * 1024 * 1024
_PHC = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,3})\$([A-Za-z0-9+/]+)\$"
                  r"([A-Za-z0-9+/]+)\Z")
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")


class PasswordHashError(ValueError):
    """A stored password hash is not one this module reads (the message never repeats it)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None, ln: int = 14, r: int = 8,
                  p: int = 1) -> str:
    """``$scrypt$ln=14,r=8,p=1$<salt>$<hash>`` (PHC string format, base64 without padding)
    for ``password``; what a config's ``password_hash`` holds."""
    salt = os.urandom(16) if salt is None else salt
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << ln, r=r, p=p,
                        maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"$scrypt$ln={ln},r={r},p={p}${_b64(salt)}${_b64(dk)}"


def check_password_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """The parameters of a stored hash: (ln, r, p, salt, hash); :class:`PasswordHashError`
    when it is not a scrypt PHC string this module can verify."""
    m = _PHC.match(stored) if isinstance(stored, str) else None
    if m is None:
        raise PasswordHashError("not a scrypt hash of the form $scrypt$ln=N,r=R,p=P$salt$hash "
                                "(make one with `raymta hash-password`)")
    ln, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not 1 <= ln <= 20 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise PasswordHashError(f"scrypt parameters out of range (ln={ln}, r={r}, p={p}; "
                                "want ln 1-20, r 1-32, p 1-16)")
    if 128 * r * (1 << ln) > _SCRYPT_MAXMEM // 2:
        raise PasswordHashError(f"scrypt parameters need too much memory (ln={ln}, r={r})")
    salt, dk = _unb64(m.group(4)), _unb64(m.group(5))
    if len(salt) < 8 or len(dk) < 16:
        raise PasswordHashError("scrypt salt under 8 bytes or hash under 16 bytes")
    return ln, r, p, salt, dk


def verify_password(password: str | bytes, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time comparison)."""
    ln, r, p, salt, dk = check_password_hash(stored)
    pw = password if isinstance(password, bytes) else password.encode("utf-8")
    got = hashlib.scrypt(pw, salt=salt, n=1 << ln, r=r, p=p, maxmem=_SCRYPT_MAXMEM,
                         dklen=len(dk))
    return hmac.compare_digest(got, dk)


def _a_label(domain: str) -> str:
    d = domain.strip().rstrip(".").lower()
    if d.isascii():
        return d
    return idna.encode(d, uts46=True).decode("ascii")


@dataclass(frozen=True)
class SubmissionUser:
    """One submission account: a login name, its password hash (never shown), the sender
    domains it may use (``example.com``, or ``*.example.com`` for its subdomains), and
    optional limits of its own."""

    name: str
    password_hash: str = field(repr=False)
    domains: tuple[str, ...] = ()
    #: messages per period for this user (None: the ingress default)
    rate: RateSpec | None = None
    #: concurrent authenticated sessions (None: the ingress default)
    max_connections: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _USER_NAME.match(self.name):
            raise ValueError("name: 1-64 letters, digits or . _ @ + - (starting with a letter "
                             "or digit)")
        check_password_hash(self.password_hash)
        if not self.domains:
            raise ValueError("domains: a user needs at least one sender domain")
        out = []
        for d in self.domains:
            wild = isinstance(d, str) and d.startswith("*.")
            try:
                a = _a_label(d[2:] if wild else d)
            except (idna.IDNAError, UnicodeError, AttributeError, TypeError):
                raise ValueError(f"domains: not a domain name: {d!r}") from None
            if not a or "." not in a or "@" in a or any(c.isspace() for c in a):
                raise ValueError(f"domains: not a domain name: {d!r}")
            out.append("*." + a if wild else a)
        object.__setattr__(self, "domains", tuple(out))


def domain_allowed(domain: str, allowed: Iterable[str]) -> bool:
    """``domain`` (any case, U- or A-label) is one of ``allowed`` or under a ``*.`` entry."""
    try:
        d = _a_label(domain)
    except (idna.IDNAError, UnicodeError):
        return False
    for a in allowed:
        if a.startswith("*."):
            if d.endswith(a[1:]) and len(d) > len(a) - 1:
                return True
        elif d == a:
            return True
    return False


def envelope_domain(address: str) -> str:
    """The domain of an envelope address (``""`` for the null sender)."""
    a = address.strip().strip("<>")
    return a.rpartition("@")[2] if "@" in a else ""


_PLACEHOLDER_HASH = "$scrypt$ln=1,r=1,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA"


class UserTable:
    """Users by login name. :meth:`authenticate` spends the same scrypt work for an unknown
    name as for a known one, so a reply's timing does not tell which names exist."""

    def __init__(self, users: Iterable[SubmissionUser] = ()) -> None:
        self._users: dict[str, SubmissionUser] = {}
        for u in users:
            if u.name in self._users:
                raise ValueError(f"user {u.name!r} defined twice")
            self._users[u.name] = u
        self._dummy = hash_password("", salt=b"raymta-no-such-user")

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"UserTable({sorted(self._users)})"

    def get(self, name: str) -> SubmissionUser | None:
        return self._users.get(name)

    def authenticate(self, login: str | bytes, password: str | bytes) -> SubmissionUser | None:
        if isinstance(login, bytes):
            try:
                login = login.decode("utf-8")
            except UnicodeDecodeError:
                login = ""
        user = self._users.get(login)
        ok = verify_password(password, user.password_hash if user else self._dummy)
        return user if ok and user is not None else None


def new_api_key() -> str:
    """A fresh API key: 32 random bytes, URL-safe base64, prefixed so it is recognisable."""
    return "rmta_" + base64.urlsafe_b64encode(os.urandom(32)).decode("ascii").rstrip("=")


def hash_api_key(key: str) -> str:
    """``sha256:<hex>`` of an API key: what a config stores. (A key is 256 random bits, so a
    fast hash is enough; scrypt is for passwords people choose.)"""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class ApiKey:
    """An HTTP API key: a name, its hash (never shown), its sender domains, and whether it may
    read the event stream."""

    name: str
    key_hash: str = field(repr=False)
    domains: tuple[str, ...] = ()
    events: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _USER_NAME.match(self.name):
            raise ValueError("name: 1-64 letters, digits or . _ @ + -")
        if not isinstance(self.key_hash, str) or not _KEY_HASH.match(self.key_hash):
            raise ValueError("key_hash: expected sha256:<64 lowercase hex digits> (make one "
                             "with `raymta new-api-key`)")
        # the same domain rules as a submission user
        norm = SubmissionUser(self.name, _PLACEHOLDER_HASH, self.domains).domains
        object.__setattr__(self, "domains", norm)


class ApiKeyTable:
    """API keys by hash; a lookup compares in constant time per candidate."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._by_hash: dict[str, ApiKey] = {}
        for k in keys:
            if k.key_hash in self._by_hash:
                raise ValueError(f"api key {k.name!r}: the same key as "
                                 f"{self._by_hash[k.key_hash].name!r}")
            self._by_hash[k.key_hash] = k

    def __len__(self) -> int:
        return len(self._by_hash)

    def __repr__(self) -> str:
        return f"ApiKeyTable({sorted(k.name for k in self._by_hash.values())})"

    def lookup(self, key: str) -> ApiKey | None:
        # a dict lookup by the key's hash tells a timing observer nothing about the key
        return self._by_hash.get(hash_api_key(key))


@dataclass(frozen=True)
class Refusal:
    """Why a connection or message was refused for now, and when to try again."""

    reason: str
    retry_after: float = 0.0


class LimitBook:
    """Concurrent connections and message rates per client IP and per user.

    Soft state (a restart forgets it). Bounded: rate limiters of idle keys are dropped once
    more than ``max_keys`` are kept."""

    def __init__(self, *, per_ip_connections: int, per_user_connections: int,
                 ip_rate: RateSpec | None, user_rate: RateSpec | None,
                 max_keys: int = 100_000) -> None:
        self.per_ip_connections = per_ip_connections
        self.per_user_connections = per_user_connections
        self.ip_rate = ip_rate
        self.user_rate = user_rate
        self.max_keys = max_keys
        self.ip_conns: dict[str, int] = {}
        self.user_conns: dict[str, int] = {}
        self._ip_gcra: dict[str, Gcra] = {}
        self._user_gcra: dict[str, Gcra] = {}

    # connections ---------------------------------------------------------------------------
    def open_ip(self, ip: str) -> Refusal | None:
        n = self.ip_conns.get(ip, 0)
        if n >= self.per_ip_connections:
            return Refusal(f"too many connections from {ip} ({n}, limit "
                           f"{self.per_ip_connections})")
        self.ip_conns[ip] = n + 1
        return None

    def close_ip(self, ip: str) -> None:
        n = self.ip_conns.get(ip, 0) - 1
        if n > 0:
            self.ip_conns[ip] = n
        else:
            self.ip_conns.pop(ip, None)

    def login(self, user: SubmissionUser) -> Refusal | None:
        limit = user.max_connections or self.per_user_connections
        n = self.user_conns.get(user.name, 0)
        if n >= limit:
            return Refusal(f"too many sessions for user {user.name} ({n}, limit {limit})")
        self.user_conns[user.name] = n + 1
        return None

    def logout(self, name: str) -> None:
        n = self.user_conns.get(name, 0) - 1
        if n > 0:
            self.user_conns[name] = n
        else:
            self.user_conns.pop(name, None)

    # message rates -------------------------------------------------------------------------
    def _limiter(self, book: dict[str, Gcra], key: str, spec: RateSpec, now: float) -> Gcra:
        g = book.get(key)
        if g is None or g.spec != spec:
            if len(book) >= self.max_keys:   # forget idle keys (a full limiter is a new one)
                for k in [k for k, v in book.items() if v.available(now) >= v.spec.burst]:
                    del book[k]
            g = book[key] = Gcra(spec)
        return g

    def take_message(self, ip: str, user: SubmissionUser | None, now: float
                     ) -> Refusal | None:
        """One message from ``ip`` (and ``user``) at ``now``, or why not now: both limits
        are checked before either is charged."""
        checks: list[tuple[Gcra, str]] = []
        if self.ip_rate is not None:
            checks.append((self._limiter(self._ip_gcra, ip, self.ip_rate, now),
                           f"message rate of {ip} over {self.ip_rate}"))
        spec = (user.rate or self.user_rate) if user is not None else None
        if user is not None and spec is not None:
            checks.append((self._limiter(self._user_gcra, user.name, spec, now),
                           f"message rate of user {user.name} over {spec}"))
        for g, why in checks:
            if g.available(now) < 1:
                return Refusal(why, g.wait_time(now))
        for g, _ in checks:
            g.take(now)
        return None


# header fields --------------------------------------------------------------------------------
def _header_section(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    return raw if end < 0 else raw[:end + 2]


def header_sender_problem(raw: bytes, allowed: Iterable[str]) -> str | None:
    """None when the message's From (exactly one field, RFC 5322 §3.6) and Sender (at most
    one) name only addresses in ``allowed`` domains; else what is wrong, naming the field."""
    allowed = tuple(allowed)
    head = _header_section(raw)
    bare = _BARE_CR.search(head)
    if bare is not None:
        # one parser reads a bare CR as a line end, another as text: a field could hide in it
        line = head.count(b"\n", 0, bare.start()) + 1
        return (f"header: bare CR at line {line} "
                "(RFC 5322 §2.3: CR only before LF)")
    msg = BytesHeaderParser(policy=compat32).parsebytes(head)
    froms = msg.get_all("From") or []
    if len(froms) != 1:
        return f"From: the message has {len(froms)} From header fields; exactly one is " \
               "required (RFC 5322 §3.6)"
    senders = msg.get_all("Sender") or []
    if len(senders) > 1:
        return f"Sender: {len(senders)} Sender header fields; at most one (RFC 5322 §3.6)"
    for name, values in (("From", froms), ("Sender", senders)):
        if not values:
            continue
        texts = [_FOLD.sub("", str(v)) for v in values]   # unfold (RFC 5322 §2.2.3)
        if any("\r" in t or "\n" in t for t in texts):
            return f"{name}: contains a line break that is not folding"
        addrs = getaddresses(texts)
        if not addrs or any(not a for _, a in addrs):
            return f"{name}: no address could be read"
        for _, a in addrs:
            if "@" not in a:
                return f"{name}: {a!r} is not an address"
            dom = a.rpartition("@")[2]
            if not domain_allowed(dom, allowed):
                return f"{name}: domain {dom!r} is not one this user may send as"
    return None


_BARE_CR = re.compile(rb"\r(?!\n)")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def count_hops(raw: bytes) -> int:
    """Received fields in the header section: the hops the message has made (RFC 5321 §6.3
    counts them to detect a loop)."""
    return scan_header(raw).hops


class HeaderScan(NamedTuple):
    """What a submission front end needs from a message's header section, read in one pass:
    the Received fields (hops, RFC 5321 §6.3) and whether it has Date and Message-ID."""

    hops: int
    has_date: bool
    has_message_id: bool


#: the fields :func:`scan_header` looks for, at the start of a line (a folded continuation
#: starts with white space, so it never matches); lowercased by the caller
_TRACKED = re.compile(rb"^(received|date|message-id)[ \t]*:", re.IGNORECASE | re.MULTILINE)


def scan_header(raw: bytes) -> HeaderScan:
    """One pass over ``raw``'s header section for :class:`HeaderScan` (the hop count, Date,
    Message-ID), where counting hops and completing the fields each scanned it before."""
    found = _TRACKED.findall(_header_section(raw))
    if not found:
        return HeaderScan(0, False, False)
    names = [n.lower() for n in found]
    return HeaderScan(names.count(b"received"), b"date" in names, b"message-id" in names)


#: (epoch second, its RFC 5322 date-time): a listener stamps thousands of messages a second
#: with the same one (strftime + gmtime was ~1.5 µs a field); one entry, so bounded
_DATE_CACHE: list[tuple[int | None, str]] = [(None, "")]


def rfc5322_date(now: float) -> str:
    """``now`` as an RFC 5322 §3.3 date-time in UTC (``Fri, 04 Dec 2026 22:51:52 +0000``)."""
    sec = int(now // 1)
    cached = _DATE_CACHE[0]
    if cached[0] == sec:
        return cached[1]
    text = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(sec))
    _DATE_CACHE[0] = (sec, text)
    return text


_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")


def received_header(*, helo: str, peer_ip: str, by: str, queue_id: str, now: float,
                    tls_version: str | None = None, cipher: str | None = None,
                    user: str | None = None, for_rcpt: str | None = None) -> bytes:
    """The ``Received:`` field to prepend (RFC 5321 §4.4), CRLF-terminated and folded::

        Received: from client.example ([192.0.2.1])
                by mx.example with ESMTPSA id 01J...
                (version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)
                (authenticated user alice)
                for <rcpt@example.net>; Fri, 04 Dec 2026 22:51:52 +0000

    ``with`` is ESMTP + S (TLS) + A (authenticated) per RFC 3848. What the client said in
    EHLO is reduced to host-name characters so it can never inject a field."""
    helo_clean = _HELO_SAFE.sub("?", helo or "unknown")[:255] or "unknown"
    proto = "ESMTP" + ("S" if tls_version else "") + ("A" if user else "")
    date = rfc5322_date(now)
    lines = [f"Received: from {helo_clean} ([{peer_ip}])",
             f"\tby {by} (raymta) with {proto} id {queue_id}"]
    if tls_version:
        lines.append(f"\t(version={tls_version}" + (f" cipher={cipher})" if cipher else ")"))
    if user:
        lines.append(f"\t(authenticated user {_HELO_SAFE.sub('?', user)})")
    tail = f"; {date}"
    if for_rcpt and not any(c in for_rcpt for c in "\r\n<>"):
        lines.append(f"\tfor <{for_rcpt}>{tail}")
    else:
        lines[-1] += tail
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def completion_fields(raw: bytes, *, now: float, token: str, domain: str,
                      scan: HeaderScan | None = None) -> bytes:
    """The Date and Message-ID fields ``raw`` lacks, as a submission server completes them
    (RFC 6409 §8.2, §8.3), to go after the Received field (trace fields stay on top,
    RFC 5321 §4.4); ``b""`` when it has both. ``scan``: :func:`scan_header` of ``raw``, when
    the caller has it already."""
    if scan is None:
        scan = scan_header(raw)
    out = b""
    if not scan.has_date:
        out += f"Date: {rfc5322_date(now)}\r\n".encode("ascii")
    if not scan.has_message_id:
        out += f"Message-ID: <{token}@{domain}>\r\n".encode("ascii", "replace")
    return out
