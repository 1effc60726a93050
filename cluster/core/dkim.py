"""DKIM signing, the pure part: header parsing, canonicalisation and the signature header.

Role: given the raw RFC 5322 message raymta is about to deliver, produce the exact bytes a DKIM
signer signs (RFC 6376 §3.7) and the ``DKIM-Signature`` header field that carries the result.
The signing itself is a callable handed in (``sign(data) -> signature bytes``), so this module
never sees a private key.
Owns: the wire form of a message (the same line-ending rules the SMTP adapter applies, so the
bytes signed are the bytes delivered), header-field parsing, simple and relaxed
canonicalisation of headers and body (RFC 6376 §3.4), the choice of header fields to sign with
oversigning (§5.4.2), the tag list and folding of the signature header (byte-for-byte as
dkimpy writes it), the From domain a message is signed for, the ``sign = "required"`` policy
check (:func:`dkim_refusal`), and DNS-label checks of selectors.
Must not: import ``cryptography``, Ray or anything that does I/O, read the clock (timestamps
are arguments), or log (a caller could log a key by accident through it).
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.utils import getaddresses
from typing import Any, NamedTuple

import idna

__all__ = [
    "ALGORITHMS",
    "DEFAULT_SIGN_HEADERS",
    "DkimError",
    "Header",
    "SignatureSpec",
    "body_canon",
    "body_hash_input",
    "build_signature",
    "canon_header",
    "choose_headers",
    "dkim_refusal",
    "fold",
    "from_domain",
    "header_hash_input",
    "is_valid_selector",
    "parse_headers",
    "select_headers",
    "signing_domains",
    "split_message",
    "wire_form",
]

#: the signature algorithms raymta signs with (RFC 8301 forbids rsa-sha1 for signing)
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")

#: header fields signed by default, each listed once more than it occurs (oversigning,
#: RFC 6376 §5.4.2 and §8.15): an extra occurrence added in transit breaks the signature,
#: and a field the message lacks cannot be added. From first: RFC 6376 §5.4 requires it.
DEFAULT_SIGN_HEADERS: tuple[str, ...] = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "sender",
    "in-reply-to", "references", "mime-version", "content-type", "content-transfer-encoding",
    "list-unsubscribe", "list-unsubscribe-post", "list-id", "feedback-id")

#: one header field: (name as written, value after the colon up to and including its CRLF,
#: continuation lines included)
Header = tuple[bytes, bytes]

_WSP_RUN = re.compile(rb"[\t ]+")
_WSP_EOL = re.compile(rb"[\t ]+\r\n")
_UNFOLD = re.compile(rb"\r?\n")
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+?)[\t ]*:")
# RFC 6376 §3.1: selector = sub-domain *( "." sub-domain ); sub-domain = Let-dig [Ldh-str]
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_NAME = "DKIM-Signature"
_PLACEHOLDER = b"0" * 60


class DkimError(ValueError):
    """A message or parameter the signer cannot work with (says which and why)."""


class SignatureSpec(NamedTuple):
    """What one signature says besides its hashes: d=, s=, a=, c=, i=, x= and h=."""

    domain: str
    selector: str
    algorithm: str = "rsa-sha256"
    header_canon: str = "relaxed"
    body_canon: str = "relaxed"
    #: i= (AUID); None writes ``@domain`` as dkimpy does (RFC 6376 §3.5: the default)
    identity: str | None = None
    #: seconds after t= that x= says the signature expires (None: no x=)
    expire_after: int | None = None
    #: header field names to sign (lowercase, each once: oversigning is added)
    headers: tuple[str, ...] = DEFAULT_SIGN_HEADERS


# ------------------------------------------------------------------------------ message form
def wire_form(raw: bytes) -> bytes:
    """The message as the SMTP adapter puts it on the wire: bare CR and bare LF become CRLF,
    and it ends in CRLF (``cluster/adapters/smtp.py`` ``_dot_stuff`` applies the same rule, so
    the bytes signed are the bytes delivered). Unchanged input is returned as is."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if raw and not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    return raw


def split_message(msg: bytes) -> tuple[bytes, bytes]:
    """(header section with its last CRLF, body) of a message in wire form. The empty line
    between them belongs to neither; a message without one is all header (empty body)."""
    if msg.startswith(b"\r\n"):
        return b"", msg[2:]
    i = msg.find(b"\r\n\r\n")
    if i < 0:
        return msg, b""
    return msg[:i + 2], msg[i + 4:]


def parse_headers(section: bytes) -> list[Header]:
    """Header fields in order. A line starting with WSP continues the previous field; a line
    that is neither (no colon) raises :class:`DkimError` naming it."""
    out: list[list[bytes]] = []
    if not section:
        return []
    lines = section.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    for n, line in enumerate(lines, 1):
        if line[:1] in (b" ", b"\t"):
            if not out:
                raise DkimError(f"header line {n} is a continuation with nothing before it")
            out[-1][1] += line + b"\r\n"
            continue
        m = _FIELD.match(line)
        if m is None:
            raise DkimError(f"header line {n} is not a header field (no name and colon)")
        # the name keeps any WSP before the colon (obsolete syntax, RFC 5322 §4.5): simple
        # canonicalisation must reproduce the field exactly
        out.append([line[:m.end() - 1], line[m.end():] + b"\r\n"])
    return [(n, v) for n, v in out]


# ------------------------------------------------------------------------------ canonicalisation
def canon_header(name: bytes, value: bytes, algorithm: str) -> bytes:
    """One field canonicalised (RFC 6376 §3.4.1, §3.4.2), CRLF included."""
    if algorithm == "simple":
        return name + b":" + value
    v = value.strip(b" \t\r\n")
    if b"\n" in v or b"\t" in v or b"  " in v or b"\r" in v:   # folded or odd spacing
        v = _WSP_RUN.sub(b" ", _UNFOLD.sub(b"", value)).strip(b" \t\r\n")
    return name.lower().rstrip(b" \t") + b":" + v + b"\r\n"


def _strip_trailing_lines(body: bytes) -> bytes:
    # RFC 6376 §3.4.3 / §3.4.4: empty lines at the end are ignored; a body that does not end in
    # CRLF gets one (the wire form always does)
    end = len(body)
    while end >= 2 and body[end - 2:end] == b"\r\n":
        end -= 2
    if end == len(body):
        return body + b"\r\n"
    return body[:end + 2] if end else b""


def body_canon(body: bytes, algorithm: str) -> bytes:
    """The body canonicalised (RFC 6376 §3.4.3 simple, §3.4.4 relaxed)."""
    if algorithm == "simple":
        out = _strip_trailing_lines(body)
        return out or b"\r\n"          # simple: an empty body is one CRLF
    if b"\t" in body or b" \r\n" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", _WSP_EOL.sub(b"\r\n", body))
        body = body.replace(b" \r\n", b"\r\n")
    out = _strip_trailing_lines(body)
    return b"" if out == b"\r\n" else out   # relaxed: an empty body is empty


def body_hash_input(msg: bytes, algorithm: str = "relaxed") -> bytes:
    """The bytes the body hash (bh=) is computed over, for a message in wire form."""
    return body_canon(split_message(msg)[1], algorithm)


# ------------------------------------------------------------------------------ headers to sign
def choose_headers(headers: Sequence[Header], names: Iterable[str] = DEFAULT_SIGN_HEADERS
                   ) -> list[bytes]:
    """The h= list: every occurrence of a listed field, in message order, then each listed
    name once more (oversigning: RFC 6376 §5.4.2). A listed field the message lacks is thus
    listed once, which stops it from being added later."""
    want, extra = _sign_list(tuple(names))
    seen = [low for low in (name.rstrip(b" \t").lower() for name, _ in headers) if low in want]
    return seen + extra


@functools.lru_cache(maxsize=64)
def _sign_list(names: tuple[str, ...]) -> tuple[frozenset[bytes], list[bytes]]:
    wanted: list[bytes] = []
    for n in names:
        b = n.lower().encode("ascii")
        if b not in wanted:
            wanted.append(b)
    if b"from" not in wanted:
        raise DkimError("the From header field must be signed (RFC 6376 §5.4)")
    return frozenset(wanted), wanted


def select_headers(headers: Sequence[Header], include: Sequence[bytes]) -> list[Header]:
    """The fields h= names, each name taking the next occurrence from the bottom up
    (RFC 6376 §5.4.2); a name with no occurrence left selects nothing."""
    # per name, its occurrences bottom first; each mention in h= takes the next one
    left: dict[bytes, list[int]] = {}
    for i, (n, _) in enumerate(headers):
        left.setdefault(n.rstrip(b" \t").lower(), []).append(i)
    out: list[Header] = []
    for h in include:
        idx = left.get(h)
        if idx:
            out.append(headers[idx.pop()])
    return out


# ------------------------------------------------------------------------------ the signature
def fold(header: bytes, namelen: int = 0, linesep: bytes = b"\r\n") -> bytes:
    """Fold a tag list at column 72 the way dkimpy does (so raymta's signatures are laid out
    exactly like dkimpy's; the RFC 8463 examples were made this way)."""
    maxleng = 72 - namelen
    if len(header) <= maxleng:
        return header
    if len(header) - header.rfind(b"\r\n") == 2 and len(header) <= maxleng + 2:
        return header
    i = header.rfind(b"\r\n ")
    if i == -1:
        pre = b""
    else:
        i += 3
        pre = header[:i]
        header = header[i:]
    while len(header) > maxleng:
        i = header[:maxleng].rfind(b" ")
        if i == -1:
            j = maxleng
            pre += header[:j] + linesep + b" "
        else:
            j = i + 1
            pre += header[:i] + linesep + b" "
        header = header[j:]
        maxleng = 71
    if len(header) > 2:
        return pre + header
    if pre[:1] == b" ":
        return pre[:-1]
    return pre + header


def _tags(spec: SignatureSpec, include: Sequence[bytes], body_hash: bytes, timestamp: int,
          b: bytes) -> list[tuple[bytes, bytes]]:
    d = spec.domain.encode("ascii")
    tags = [(b"v", b"1"), (b"a", spec.algorithm.encode("ascii")),
            (b"c", f"{spec.header_canon}/{spec.body_canon}".encode("ascii")),
            (b"d", d),
            (b"i", spec.identity.encode("utf-8") if spec.identity else b"@" + d),
            (b"q", b"dns/txt"), (b"s", spec.selector.encode("ascii")),
            (b"t", str(int(timestamp)).encode("ascii"))]
    if spec.expire_after:
        tags.append((b"x", str(int(timestamp) + int(spec.expire_after)).encode("ascii")))
    tags += [(b"h", b" : ".join(include)), (b"bh", body_hash), (b"b", b)]
    return tags


def header_hash_input(headers: Sequence[Header], include: Sequence[bytes], canon: str,
                      unsigned_value: bytes) -> bytes:
    """The bytes the signature covers (RFC 6376 §3.7): the selected fields canonicalised,
    then the DKIM-Signature field itself with an empty b= and without its final CRLF."""
    parts = [canon_header(n, v, canon) for n, v in select_headers(headers, include)]
    last = canon_header(_NAME.encode("ascii"), unsigned_value, canon)
    parts.append(last.rstrip() if canon == "relaxed" else last.rstrip(b"\r\n"))
    return b"".join(parts)


def build_signature(headers: Sequence[Header], body_hash: bytes, spec: SignatureSpec,
                    timestamp: int, sign: Callable[[bytes], bytes],
                    include: Sequence[bytes] | None = None) -> bytes:
    """The complete ``DKIM-Signature: ...\\r\\n`` field for a message.

    headers: the message's fields (:func:`parse_headers`); body_hash: the raw digest of the
    canonical body; sign: signs the data of RFC 6376 §3.7 and returns the signature (for
    ed25519-sha256 it signs the SHA-256 digest of that data, RFC 8463 §3; the caller's
    concern). include: the exact h= list, or None for :func:`choose_headers` of
    ``spec.headers``. The layout (tag order, `` : `` in h=, folding, b= starting a line) is
    dkimpy's, byte for byte."""
    if spec.algorithm not in ALGORITHMS:
        raise DkimError(f"unknown signature algorithm {spec.algorithm!r}")
    if include is None:
        include = choose_headers(headers, spec.headers)
    else:
        include = [h.lower() for h in include]
        if b"from" not in include:
            raise DkimError("the From header field must be signed (RFC 6376 §5.4)")
    bh = base64.b64encode(body_hash)
    namelen = len(_NAME)
    # b= gets a 60-character placeholder so that it folds onto a line of its own: the lines
    # before it are then laid out the same with the real signature (this matters for
    # simple header canonicalisation), as dkimpy does
    tags = _tags(spec, include, bh, timestamp, _PLACEHOLDER)
    folded = fold(b"; ".join(k + b"=" + v for k, v in tags), namelen=namelen)
    if not folded.endswith(b"b=" + _PLACEHOLDER):
        raise DkimError("internal: b= placeholder not at the end of the folded header")
    unsigned = b" " + folded[:-len(_PLACEHOLDER)]
    data = header_hash_input(headers, include, spec.header_canon, unsigned)
    signature = base64.b64encode(sign(data))
    tags[-1] = (b"b", signature)
    value = fold(b"; ".join(k + b"=" + v for k, v in tags) + b"\r\n", namelen=namelen)
    return _NAME.encode("ascii") + b": " + value


# ------------------------------------------------------------------------------ domains, policy
def _ascii_domain(domain: str) -> str:
    d = domain.strip().rstrip(".").lower()
    if not d.isascii():
        try:
            d = idna.encode(d, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise DkimError(f"domain {domain!r} is not a valid IDN: {e}") from None
    return d


def from_domain(headers: Sequence[Header]) -> str | None:
    """The domain of the (first) From address, lowercased, as an A-label; None when the
    message has no From field or no address in it."""
    for name, value in headers:
        if name.rstrip(b" \t").lower() == b"from":
            text = _UNFOLD.sub(b"", value).decode("utf-8", "surrogateescape")
            for _, addr in getaddresses([text]):
                if "@" in addr:
                    try:
                        return _ascii_domain(addr.rpartition("@")[2])
                    except DkimError:
                        return None
            return None
    return None


def signing_domains(domain: str, parents: bool) -> list[str]:
    """The domains whose keys may sign for ``domain``: itself, then (with ``parents``) each
    parent with at least two labels (``a.b.example.com`` → ``b.example.com``, ``example.com``),
    so d= stays aligned with the From domain in DMARC's relaxed mode (RFC 7489 §3.1.1)."""
    out = [domain]
    if parents:
        labels = domain.split(".")
        out += [".".join(labels[i:]) for i in range(1, len(labels) - 1)]
    return out


def dkim_refusal(from_domain: str, cfg: Any) -> str | None:
    """Why a message From ``from_domain`` must be refused under the ``sign = "required"``
    policy, or None when it may be queued.

    cfg: a ``cluster.config.Config`` (or its ``dkim`` section, a ``DkimConfig``). A domain
    whose policy (its own, or the default) is ``required`` needs at least one configured key
    for itself or, when ``parent_domains`` is on, for a parent domain. Pure: it checks the
    configuration, not the key files (those are checked when the config is loaded and when a
    relay reads them)."""
    dk = getattr(cfg, "dkim", cfg)
    if dk is None:
        return None
    domain = _ascii_domain(from_domain) if from_domain else ""
    policies: Mapping[str, str] = getattr(dk, "policies", {}) or {}
    policy = getattr(dk, "default_policy", "if-key")
    for d in signing_domains(domain, True):     # example.com's policy covers its subdomains
        if d in policies:
            policy = policies[d]
            break
    if policy != "required":
        return None
    keyed = {k.domain for k in getattr(dk, "keys", ())}
    for d in signing_domains(domain, bool(getattr(dk, "parent_domains", False))):
        if d in keyed:
            return None
    return (f"from: domain {domain or '(none)'!r} requires a DKIM signature (dkim policy "
            "sign = \"required\") but no DKIM key is configured for it")


def is_valid_selector(selector: str) -> bool:
    """Whether ``selector`` is made of DNS labels a selector may use (RFC 6376 §3.1:
    letters, digits and inner hyphens, labels of 1-63 characters separated by dots)."""
    if not selector or len(selector) > 200 or not selector.isascii():
        return False
    return all(_LABEL.match(label) for label in selector.split("."))
