"""Envelope address validation: the MAIL FROM / RCPT TO paths raymta will put on the wire.

Role: turn the address text a sender submitted into a validated, normalised :class:`Address`, or
raise an :class:`AddressError` that says precisely what is wrong (which part, which character).
Owns: the envelope address grammar (RFC 5321 §4.1.2 Mailbox, §4.1.3 address literals), the size
limits (RFC 5321 §4.5.3.1), the SMTPUTF8 extensions (RFC 6531 §3.3) and the conversion of
internationalised domains to their A-label form (IDNA2008, RFC 5890/5891, via the ``idna``
package when installed, else the stdlib IDNA2003 codec).
Must not: look anything up (no DNS, no network, no disk), import Ray, or accept header-only
syntax: comments, folding white space, display names and obsolete forms (RFC 5322 §3.4.1, §4)
belong in message headers, never in an SMTP envelope.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

try:  # IDNA2008 (RFC 5890-5893); the stdlib "idna" codec only implements IDNA2003 (RFC 3490)
    import idna as _idna
except ImportError:  # pragma: no cover - idna ships with requests, so it is normally present
    _idna = None

__all__ = [
    "MAX_ADDRESS_OCTETS",
    "MAX_DOMAIN_OCTETS",
    "MAX_LABEL_OCTETS",
    "MAX_LOCAL_OCTETS",
    "NULL_REVERSE_PATH",
    "Address",
    "AddressError",
    "parse_address",
]

#: RFC 5321 §4.5.3.1.1: "The maximum total length of a user name or other local-part is 64 octets."
MAX_LOCAL_OCTETS = 64
#: RFC 1035 §2.3.4 / RFC 5321 §4.5.3.1.2 (255 on the wire = 253 in text form)
MAX_DOMAIN_OCTETS = 253
#: RFC 1035 §2.3.4: labels are 63 octets or less
MAX_LABEL_OCTETS = 63
#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets including the angle brackets
MAX_ADDRESS_OCTETS = 254

# RFC 5322 §3.2.3 atext (RFC 5321 §4.1.2 Atom uses it unchanged).
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+-/=?^_`{|}~")
# RFC 1035 §2.3.1 / RFC 5321 §4.1.2 sub-domain: letters, digits, hyphen (LDH).
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_CONTROL_NAMES = {0x00: "NUL", 0x09: "TAB", 0x0A: "LF", 0x0D: "CR", 0x1B: "ESC", 0x7F: "DEL"}
# Characters that look like "@" but are not (a common copy-paste accident).
_AT_LOOKALIKES = {"\uff20": "FULLWIDTH COMMERCIAL AT", "\ufe6b": "SMALL COMMERCIAL AT"}

# RFC 5321 §4.1.3 address literals.
_SNUM = r"(\d{1,3})"
_IPV4_RE = re.compile(rf"{_SNUM}\.{_SNUM}\.{_SNUM}\.{_SNUM}\Z", re.ASCII)
_HEX = r"[0-9A-Fa-f]{1,4}"
_V4 = r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"
_IPV6_FULL_RE = re.compile(rf"{_HEX}(?::{_HEX}){{7}}\Z", re.ASCII)
_IPV6_COMP_RE = re.compile(rf"(?:{_HEX}(?::{_HEX}){{0,5}})?::(?:{_HEX}(?::{_HEX}){{0,5}})?\Z",
                           re.ASCII)
_IPV6V4_FULL_RE = re.compile(rf"{_HEX}(?::{_HEX}){{5}}:({_V4})\Z", re.ASCII)
_IPV6V4_COMP_RE = re.compile(
    rf"(?:{_HEX}(?::{_HEX}){{0,3}})?::(?:{_HEX}(?::{_HEX}){{0,3}}:)?({_V4})\Z", re.ASCII)


_Fail = Callable[[str], "AddressError"]


class AddressError(ValueError):
    """An address that cannot be used in an SMTP envelope.

    ``field`` names where the address came from (``"sender"``, ``"recipients[3]"``...),
    ``reason`` says what is wrong with it, ``address`` is the text as submitted.
    """

    def __init__(self, field: str, reason: str, address: object = "") -> None:
        super().__init__(field, reason, address)
        self.field = field
        self.reason = reason
        self.address = address

    def __str__(self) -> str:
        return f"{self.field}: {self.reason} ({self.address!r})"


@dataclass(frozen=True)
class Address:
    """A validated envelope address.

    ``local`` is the local part in its canonical wire form (a quoted string only when the content
    is not a valid dot-atom, RFC 5322 §3.2.4 / RFC 5321 §4.1.2; NFC-normalised, RFC 6532 §3.1). ``domain`` is the domain as given, lowercased (an address literal keeps its
    brackets); ``ascii_domain`` the same domain in A-label form (what DNS is asked about).
    ``needs_smtputf8`` is true when the local part is non-ASCII, which only an SMTPUTF8 session
    can carry (RFC 6531 §3.2); a non-ASCII domain alone never needs it, its A-label form is used.
    """

    local: str
    domain: str
    ascii_domain: str
    needs_smtputf8: bool

    @property
    def is_null(self) -> bool:
        """True for the null reverse-path ``<>`` (RFC 5321 §4.5.5), used by bounces."""
        return not self.local and not self.domain

    def __str__(self) -> str:
        if self.is_null:
            return ""
        return f"{self.local}@{self.domain if self.needs_smtputf8 else self.ascii_domain}"


#: The null reverse-path ``<>`` (RFC 5321 §4.5.5); only ever returned when ``allow_empty=True``.
NULL_REVERSE_PATH = Address("", "", "", False)


def parse_address(text: str, *, field: str = "recipient", allow_smtputf8: bool = False,
                  allow_empty: bool = False) -> Address:
    """Validate one envelope address (``user@example.com`` or ``<user@example.com>``).

    ``allow_smtputf8`` permits a non-ASCII local part (RFC 6531); ``allow_empty`` accepts ``""``
    and ``"<>"`` as the null reverse-path (RFC 5321 §4.5.5, only valid for MAIL FROM).
    Raises :class:`AddressError` naming ``field`` and the precise reason.
    """

    if not isinstance(text, str):
        raise AddressError(field, f"must be a string, not {type(text).__name__}", text)
    fast = _parse_plain(text)
    if fast is not None:
        return fast

    def fail(reason: str) -> AddressError:
        return AddressError(field, reason, text)

    address = _parse(text, fail, allow_smtputf8, allow_empty)
    if not text.isascii():
        # RFC 6532 §3.1 / RFC 5198: non-ASCII text is sent in NFC. Both the text as given and
        # its NFC form must be valid: normalisation may change lengths, and may merge an ASCII
        # special with a combining mark ("<" + U+0338 -> U+226E) or split a compatibility
        # character into specials (U+037E GREEK QUESTION MARK -> ";").
        nfc = unicodedata.normalize("NFC", text)
        if nfc != text:
            address = _parse(nfc, fail, allow_smtputf8, allow_empty)
    return address


# A plain address: an ASCII dot-atom local part (RFC 5321 §4.1.2 Dot-string: atoms of atext
# joined by single dots) and a domain of letters, digits, dots and hyphens, optionally in <>.
_PLAIN_ADDRESS = re.compile(r"<?([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
                            r"@([A-Za-z0-9.-]+)>?\Z")


def _parse_plain(text: str) -> Address | None:
    """The common case in one regex match (a submitter's hot path: ~2 µs instead of ~10): a
    plain address whose domain is in the cache of domains already checked. Anything else, and
    every error, returns None and takes the full parser, which gives the same result."""
    m = _PLAIN_ADDRESS.match(text)
    if m is None or (text[0] == "<") != (text[-1] == ">"):
        return None
    local, domain_given = m.groups()
    parsed = _DOMAINS.get(domain_given) or _check_new_domain(domain_given)
    if parsed is None or len(local) > MAX_LOCAL_OCTETS or \
            len(local) + 1 + len(parsed[1]) > MAX_ADDRESS_OCTETS:
        return None
    return Address(local, parsed[0], parsed[1], False)


def canonical_plain_domain(text: str) -> str | None:
    """The domain of ``text`` when it is a plain ASCII address exactly as :class:`Address`
    prints it (no brackets, a lowercase domain already checked): a shard leader's re-check of
    the usual recipient in one regex match and a dict lookup. None means "not known to be":
    use :func:`parse_address`."""
    m = _PLAIN_ADDRESS.match(text)
    if m is None or text[0] == "<" or text[-1] == ">":   # the regex allows either bracket
        return None
    local, domain = m.groups()
    if (_DOMAINS.get(domain) or _check_new_domain(domain)) != (domain, domain) or \
            len(local) > MAX_LOCAL_OCTETS or \
            len(text) > MAX_ADDRESS_OCTETS:
        return None
    return domain


def _parse(s: str, fail: _Fail, allow_smtputf8: bool, allow_empty: bool) -> Address:
    _check_characters(s, fail)
    if s[:1].isspace():
        raise fail("leading whitespace")
    if s[-1:].isspace():
        raise fail("trailing whitespace")
    whole = s
    # RFC 5321 §4.1.2: Path = "<" [ A-d-l ":" ] Mailbox ">"; accept the brackets, nothing around.
    if s.startswith("<") or s.endswith(">"):
        if not (s.startswith("<") and s.endswith(">") and len(s) >= 2):
            if s.endswith(">") and "<" in s:
                raise fail("display name not allowed in an envelope address: "
                           "give the bare address")
            raise fail("unbalanced angle brackets")
        s = s[1:-1]
        if "<" in s or ">" in s:
            raise fail("unexpected angle bracket inside <...>")
    if s == "":
        if allow_empty:
            return NULL_REVERSE_PATH
        raise fail("empty address" + (" (the null reverse-path <> is only valid as a sender)"
                                      if whole else ""))
    if s.startswith("@") and ":" in s:
        # RFC 5321 §4.1.2 A-d-l / Appendix C: source routes are obsolete and must not be sent.
        raise fail("source route ('@host:') not allowed")

    # ---- local part: Dot-string or Quoted-string (RFC 5321 §4.1.2)
    if s.startswith('"'):
        content, end = _scan_quoted_string(s, fail)
        rest = s[end:]
        if not rest:
            raise fail("missing @ after the quoted local part")
        if rest[0] != "@":
            if rest[0] == ".":
                raise fail("quoted string mixed with a dot-atom in the local part "
                           "(obsolete form, RFC 5322 §4.4)")
            raise fail(f"unexpected character {_describe(rest[0])} after the quoted local part")
        local_given, domain_given = s[:end], rest[1:]
        local = content if content and _is_dot_atom(content) else _quote(content)
    else:
        at = s.find("@")
        if at < 0:
            for ch, name in _AT_LOOKALIKES.items():
                if ch in s:
                    raise fail(f"missing @ (found {name} U+{ord(ch):04X} instead)")
            raise fail("missing @")
        local_given, domain_given = s[:at], s[at + 1:]
        if not local_given:
            raise fail("empty local part")
        _check_dot_atom(local_given, fail)
        local = local_given

    non_ascii_local = not local.isascii()
    if non_ascii_local and not allow_smtputf8:
        raise fail("non-ASCII local part requires SMTPUTF8 (RFC 6531)")
    n = len(local_given.encode("utf-8"))
    if n > MAX_LOCAL_OCTETS:
        raise fail(f"local part too long ({n} octets, max {MAX_LOCAL_OCTETS}; "
                   "RFC 5321 §4.5.3.1.1)")

    # ---- domain: Domain or address-literal (RFC 5321 §4.1.2, §4.1.3)
    if not domain_given:
        raise fail("empty domain")
    if domain_given.startswith("["):
        domain = ascii_domain = _parse_address_literal(domain_given, fail)
    else:
        parsed = _DOMAINS.get(domain_given)
        if parsed is None:
            parsed = _parse_domain(domain_given, fail)
            if len(_DOMAINS) >= _DOMAINS_MAX:
                _DOMAINS.clear()
            _DOMAINS[domain_given] = parsed
        domain, ascii_domain = parsed

    n = len(f"{local_given}@{ascii_domain}".encode())
    if non_ascii_local:  # may be sent with the U-label domain (RFC 6531 §3.3)
        n = max(n, len(f"{local_given}@{domain}".encode()))
    if n > MAX_ADDRESS_OCTETS:
        raise fail(f"address too long ({n} octets, max {MAX_ADDRESS_OCTETS}; "
                   "RFC 5321 §4.5.3.1.3)")
    return Address(local, domain, ascii_domain, non_ascii_local)


# --------------------------------------------------------------------------- characters

def _describe(ch: str) -> str:
    """A readable name for one character: ``'!'``, ``U+000D (CR)``, ``U+200B (ZERO WIDTH SPACE)``."""
    cp = ord(ch)
    if 0x21 <= cp <= 0x7E:
        return repr(ch)
    name = _CONTROL_NAMES.get(cp) or ("SPACE" if cp == 0x20 else unicodedata.name(ch, ""))
    return f"U+{cp:04X} ({name})" if name else f"U+{cp:04X}"


def _check_characters(text: str, fail: _Fail) -> None:
    """Reject characters that are never valid anywhere in an envelope address."""
    if text.isascii() and text.isprintable():
        return   # printable ASCII: no controls, no DEL (the common case, checked in C)
    for ch in text:
        cp = ord(ch)
        if cp < 0x20 or cp == 0x7F or 0x80 <= cp <= 0x9F:
            # RFC 5321 §4.1.2 admits no controls; CR/LF would also smuggle SMTP commands.
            raise fail(f"control character {_describe(ch)} not allowed")
        if cp < 0x80:
            continue
        cat = unicodedata.category(ch)
        if cat in ("Zs", "Zl", "Zp"):
            raise fail(f"whitespace {_describe(ch)} not allowed")
        if cat == "Cs":
            raise fail(f"lone surrogate {_describe(ch)} not allowed")
        if cat in ("Cf", "Co", "Cn"):
            # invisible format/bidi controls, private-use and unassigned code points: unsafe in
            # an identifier (RFC 6530 §10.1; RFC 8264 §9 / PRECIS IdentifierClass)
            raise fail(f"unsafe character {_describe(ch)} not allowed")


def _bad_char(ch: str, where: str) -> str:
    if ch in "()":
        return (f"comment {_describe(ch)} in the {where}: comments are not allowed in an SMTP "
                "envelope address (RFC 5321 §4.1.2)")
    if ch.isspace():
        return f"whitespace {_describe(ch)} in the {where}"
    if ch == '"':
        return (f"quote character '\"' in the {where} (a quoted local part must be quoted "
                "as a whole)")
    return f"invalid character {_describe(ch)} in the {where}"


def _is_dot_atom(s: str) -> bool:
    """RFC 5321 §4.1.2 Dot-string, with RFC 6531 §3.3 UTF8-non-ascii allowed in atext."""
    return all(part and all(c in _ATEXT or ord(c) > 0x7F for c in part)
               for part in s.split("."))


def _check_dot_atom(local: str, fail: _Fail) -> None:
    for ch in local:
        if ch != "." and ch not in _ATEXT and ord(ch) < 0x80:
            raise fail(_bad_char(ch, "local part"))
    if local.startswith("."):
        raise fail("local part starts with a dot")
    if local.endswith("."):
        raise fail("local part ends with a dot")
    if ".." in local:
        raise fail("consecutive dots in the local part")
    for part in local.split("."):
        if unicodedata.category(part[0]).startswith("M"):
            raise fail(f"local part atom starts with combining character {_describe(part[0])}")


def _scan_quoted_string(s: str, fail: _Fail) -> tuple[str, int]:
    """Parse the Quoted-string at the start of ``s``: (unescaped content, index after it)."""
    out: list[str] = []
    i, n = 1, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            # RFC 5321 §4.1.2: quoted-pairSMTP = %d92 %d32-126 (no controls, no 8-bit)
            if i + 1 >= n:
                raise fail("unterminated quoted string (ends with a backslash)")
            q = s[i + 1]
            if not " " <= q <= "~":
                raise fail(f"invalid quoted-pair: a backslash may only escape printable ASCII, "
                           f"not {_describe(q)} (RFC 5321 §4.1.2)")
            out.append(q)
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        # qtextSMTP = %d32-33 / %d35-91 / %d93-126 (RFC 5321 §4.1.2) / UTF8-non-ascii (RFC 6531)
        out.append(c)
        i += 1
    raise fail("unterminated quoted string in the local part")


def _quote(content: str) -> str:
    """Minimal Quoted-string for ``content``: only DQUOTE and backslash are escaped."""
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- domains

def _parse_address_literal(d: str, fail: _Fail) -> str:
    """RFC 5321 §4.1.3 address-literal; returns its canonical text, brackets included."""
    if not d.endswith("]") or len(d) < 2:
        if "]" in d:
            raise fail("unexpected text after the address literal")
        raise fail("unterminated address literal (missing ']')")
    inner = d[1:-1]
    for ch in inner:
        if ch in "[]\\" or ch.isspace() or ord(ch) > 0x7E:
            raise fail(f"invalid character {_describe(ch)} in the address literal")
    if inner[:5].lower() == "ipv6:":
        v6 = inner[5:]
        groups = v6.replace("::", ":").strip(":")
        n_groups = len(groups.split(":")) if groups else 0
        m4 = _IPV6V4_FULL_RE.match(v6) or _IPV6V4_COMP_RE.match(v6)
        if m4:
            # IPv6v4-comp: "No more than 4 groups in addition to the '::' and IPv4-address-literal"
            if "::" in v6 and n_groups - 1 > 4 or not _valid_ipv4(m4.group(1)):
                raise fail("invalid IPv6 address literal (RFC 5321 §4.1.3)")
        elif _IPV6_FULL_RE.match(v6):
            pass
        elif _IPV6_COMP_RE.match(v6):
            # IPv6-comp: "No more than 6 groups in addition to the '::' may be present"
            if n_groups > 6:
                raise fail("invalid IPv6 address literal: '::' must stand for at least two "
                           "groups (RFC 5321 §4.1.3)")
        else:
            raise fail("invalid IPv6 address literal (RFC 5321 §4.1.3)")
        return f"[IPv6:{v6.lower()}]"
    if ":" in inner:
        tag = inner.split(":", 1)[0]
        raise fail(f"unsupported address literal tag {tag!r}: only IPv4 and IPv6 literals "
                   "can be delivered to (RFC 5321 §4.1.3)")
    m = _IPV4_RE.match(inner)
    if not m or not _valid_ipv4(inner):
        raise fail("invalid IPv4 address literal (RFC 5321 §4.1.3)")
    return "[" + ".".join(str(int(x)) for x in m.groups()) + "]"


def _valid_ipv4(text: str) -> bool:
    m = _IPV4_RE.match(text)
    return bool(m) and all(int(x) <= 255 for x in m.groups())


#: domains that parsed, as given -> (lowercased, A-label): bulk mail goes to few domains, and
#: the domain check (IDNA included) was ~15 % of a submitter's validation time. Bounded.
_DOMAINS: dict[str, tuple[str, str]] = {}
_DOMAINS_MAX = 4096


def _domain_error(reason: str) -> AddressError:
    return AddressError("domain", reason, "")


def _check_new_domain(domain_given: str) -> tuple[str, str] | None:
    """A domain of the plain-address regex not yet in the cache: checked and cached when it
    is good (the long tail: each new recipient domain once, not the whole address through the
    full parser twice), else None (the full parser then says what is wrong with it)."""
    try:
        parsed = _parse_domain(domain_given, _domain_error)
    except AddressError:
        return None
    if len(_DOMAINS) >= _DOMAINS_MAX:
        _DOMAINS.clear()
    _DOMAINS[domain_given] = parsed
    return parsed


#: an all-ASCII domain whose labels are letters, digits and hyphens only (lowercased): the
#: per-character check of _parse_domain has nothing to find
_LDH_DOMAIN = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*\Z")


def _parse_domain(d: str, fail: _Fail) -> tuple[str, str]:
    """Validate a dot-separated domain name; returns (domain lowercased, A-label form)."""
    if d.startswith("."):
        raise fail("domain starts with a dot")
    if d.endswith("."):
        # RFC 5321 §2.3.5: only fully-qualified names without the trailing root dot
        raise fail("domain ends with a dot")
    if ".." in d:
        raise fail("consecutive dots in the domain")
    domain = d.lower()
    if not domain.isascii():  # lowercasing may denormalise (RFC 5891 §5.2 wants NFC)
        domain = unicodedata.normalize("NFC", domain)
    labels = domain.split(".")
    ascii_labels = []
    plain = _LDH_DOMAIN.match(domain) is not None
    for label in labels:
        if not plain:
            for ch in label:
                if ch.isascii() and ch not in _LDH:
                    raise fail(_bad_char(ch, "domain"))
        if label.isascii():
            ascii_label = label
        else:
            ascii_label = _to_a_label(label, fail)
        if len(ascii_label) > MAX_LABEL_OCTETS:
            raise fail(f"domain label too long ({len(ascii_label)} octets, max "
                       f"{MAX_LABEL_OCTETS}; RFC 1035 §2.3.4): {label!r}")
        if ascii_label.startswith("-"):
            raise fail(f"domain label starts with a hyphen: {label!r} (RFC 5321 §4.1.2)")
        if ascii_label.endswith("-"):
            raise fail(f"domain label ends with a hyphen: {label!r} (RFC 5321 §4.1.2)")
        if label.isascii() and label[2:4] == "--":
            if label.startswith("xn--"):
                _check_a_label(label, fail)
            else:
                raise fail(f"reserved domain label {label!r}: hyphens in the 3rd and 4th "
                           "positions are reserved for IDNA (RFC 5890 §2.3.1)")
        ascii_labels.append(ascii_label)
    if len(labels) < 2:
        raise fail(f"domain {d!r} has a single label: a fully-qualified domain such as "
                   "'example.com' is required (RFC 5321 §2.3.5)")
    tld = ascii_labels[-1]
    if not (tld.isalpha() or tld.startswith("xn--")):
        # RFC 3696 §2 / RFC 1123 §2.1: a top-level domain is never numeric; root-zone labels
        # are letters only, or an IDNA A-label.
        raise fail(f"top-level domain {tld!r} is not alphabetic (RFC 3696 §2)")
    ascii_domain = ".".join(ascii_labels)
    if len(ascii_domain) > MAX_DOMAIN_OCTETS:
        raise fail(f"domain too long ({len(ascii_domain)} octets, max {MAX_DOMAIN_OCTETS}; "
                   "RFC 5321 §4.5.3.1.2)")
    return domain, ascii_domain


def _to_a_label(label: str, fail: _Fail) -> str:
    """U-label -> A-label (IDNA2008 when the ``idna`` package is installed)."""
    if unicodedata.category(label[0]).startswith("M"):
        raise fail(f"domain label starts with combining character {_describe(label[0])}")
    try:
        if _idna is not None:
            return _idna.encode(label, uts46=False).decode("ascii")
        return label.encode("idna").decode("ascii")  # pragma: no cover - IDNA2003 fallback
    except (UnicodeError, ValueError) as e:  # idna.IDNAError subclasses UnicodeError
        raise fail(f"invalid internationalized domain label {label!r}: {e} "
                   "(IDNA2008, RFC 5891)") from None


def _check_a_label(label: str, fail: _Fail) -> None:
    """An ``xn--`` label must be valid Punycode that round-trips (RFC 5891 §5.4)."""
    try:
        if _idna is not None:
            ok = _idna.encode(_idna.decode(label)).decode("ascii") == label
        else:  # pragma: no cover - IDNA2003 fallback
            ok = label.encode("ascii").decode("idna").encode("idna").decode("ascii") == label
    except (UnicodeError, ValueError) as e:
        raise fail(f"invalid IDNA A-label {label!r}: {e} (RFC 5891 §5.4)") from None
    if not ok:
        raise fail(f"invalid IDNA A-label {label!r}: does not round-trip (RFC 5891 §5.4)")
