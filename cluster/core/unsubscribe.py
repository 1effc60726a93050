"""One-click unsubscribe (RFC 8058, RFC 2369): the signed token, the header fields, and
reading a token back.

Role: for a sender domain configured with ``[[unsubscribe]]``, each message gets

    List-Unsubscribe: <https://.../u/TOKEN>, <mailto:unsub-TOKEN@bounce-domain>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

where TOKEN = ``<key id><mac>-<payload>``: payload is the lowercase unpadded base32 of
``recipient NUL sender domain`` (so the listener knows whom to unsubscribe from what, without
any lookup), mac the first :data:`MAC_CHARS` base32 characters of HMAC-SHA256 over
``"raymta-unsub-v1" NUL key id NUL payload`` with the domain's key. A forged or altered token
(another recipient, another domain, a changed character) fails the check and does nothing.
Keys rotate like VERP keys (:class:`cluster.core.verp.VerpKeys`: the current one signs, every
listed one verifies).

RFC 5321 §4.5.3.1.1 limits a local part to 64 octets: when ``unsub-TOKEN`` is longer (long
addresses), the mailto form is ``mailto:unsub@bounce-domain?subject=unsub-TOKEN`` (RFC 6068),
and the listener reads the token from the Subject.

Pure: no I/O, no clock. Must not decide what an unsubscribe does (a suppression scoped to the
sender domain: the listener asks the shards).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cluster.core.verp import VerpKeys, keyed_tag

__all__ = ["MAC_CHARS", "TokenResult", "add_header_fields", "domain_matches",
           "header_fields", "make_token", "read_token", "token_from_mail"]

MAC_CHARS = 16          # 80 bits
_LOCAL_MAX = 64
_TOKEN = re.compile(rf"([a-z0-9]{{1,8}})([a-z2-7]{{{MAC_CHARS}}})-([a-z2-7]{{2,700}})")


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().lower().rstrip("=")


def _unb32(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


def _mac(secret: bytes, kid: str, payload: str) -> str:
    return keyed_tag(secret, b"raymta-unsub-v1", kid, payload, MAC_CHARS)


def make_token(recipient: str, domain: str, keys: VerpKeys) -> str:
    payload = _b32(f"{recipient.strip().lower()}\0{domain.strip().lower()}".encode())
    kid = keys.current
    return f"{kid}{_mac(keys.keys[kid], kid, payload)}-{payload}"


@dataclass(frozen=True)
class TokenResult:
    recipient: str | None
    domain: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.recipient is not None


def read_token(token: str, keys_for: Mapping[str, VerpKeys]) -> TokenResult:
    """``(recipient, domain)`` of a token signed with the keys of its domain (``keys_for``:
    sender domain -> keys), or the reason it is refused. Never raises."""
    if not isinstance(token, str) or len(token) > 800:
        return TokenResult(None, reason="malformed token")
    m = _TOKEN.fullmatch(token.strip().lower())
    if not m:
        return TokenResult(None, reason="malformed token")
    kid, mac, payload = m.groups()
    try:
        rcpt, sep, domain = _unb32(payload).decode("utf-8").partition("\0")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return TokenResult(None, reason="malformed token payload")
    if not sep or "@" not in rcpt or not domain:
        return TokenResult(None, reason="malformed token payload")
    keys = keys_for.get(domain)
    if keys is None:
        return TokenResult(None, reason=f"no unsubscribe configured for {domain!r}")
    secret = keys.keys.get(kid)
    if secret is None:
        return TokenResult(None, reason=f"unknown key {kid!r}")
    if not hmac.compare_digest(_mac(secret, kid, payload).encode(), mac.encode()):
        return TokenResult(None, reason="bad token: the HMAC does not match (forged or altered)")
    return TokenResult(rcpt, domain)


def domain_matches(sender_domain: str, domain: str) -> bool:
    s, d = sender_domain.lower().rstrip("."), domain.lower().rstrip(".")
    return s == d or s.endswith("." + d)


def header_fields(recipient: str, domain: str, keys: VerpKeys, *, url_base: str,
                  mail_domain: str) -> list[tuple[str, str]]:
    """The List-Unsubscribe fields for one recipient (RFC 2369 §3.2, RFC 8058 §3.1): the HTTPS
    URL first, then the mailto; List-Unsubscribe-Post only when there is a URL."""
    token = make_token(recipient, domain, keys)
    uris = []
    if url_base:
        uris.append(f"<{url_base}{token}>")
    if mail_domain:
        local = f"unsub-{token}"
        uris.append(f"<mailto:{local}@{mail_domain}>" if len(local) <= _LOCAL_MAX else
                    f"<mailto:unsub@{mail_domain}?subject={local}>")
    if not uris:
        return []
    out = [("List-Unsubscribe", ",\r\n ".join(uris))]
    if url_base:
        out.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
    return out


def add_header_fields(message: bytes, fields: list[tuple[str, str]]) -> bytes:
    """``message`` with ``fields`` in front of its header (unless it already has a
    List-Unsubscribe of its own: the sender's wins)."""
    if not fields:
        return message
    end = message.find(b"\r\n\r\n")
    head = message[:end if end >= 0 else len(message)]
    if re.search(rb"(?im)^list-unsubscribe\s*:", head):
        return message
    return b"".join(f"{n}: {v}\r\n".encode() for n, v in fields) + message


def token_from_mail(local_part: str, subject: str | None) -> str | None:
    """The token of mail to ``unsub-TOKEN@`` (or ``unsub@`` with the token in the Subject)."""
    lp = local_part.strip().lower()
    if lp.startswith("unsub-"):
        return lp[len("unsub-"):]
    if lp == "unsub" and subject:
        s = subject.strip().lower()
        return s[len("unsub-"):] if s.startswith("unsub-") else None
    return None
