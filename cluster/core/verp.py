"""VERP return paths with an HMAC tag: which message a bounce is about, and proof we issued it.

Role: build the envelope sender (return path) of an outgoing message,
``<prefix>-<tag>-<message id>@<bounce domain>``, and read one back from the RCPT of an
incoming bounce or complaint. The tag is ``<key id><mac>``: the id of the key that signed it,
then the first :data:`MAC_CHARS` characters of the lowercase base32 HMAC-SHA256 over
``"raymta-verp-v1" NUL key id NUL message id`` (the id lowercased). A forged or altered address
(another message id, another tag, a truncated tag) fails the check, so a bounce sent by anyone
else cannot suppress a recipient or point at a message it did not come from.

Design decisions:
- The recipient is *not* in the MAC (nor in the address): one message goes to many recipients
  of a site in one SMTP transaction, and one return path per recipient would split every
  transaction. The bounce names its recipient (DSN Final-Recipient); the listener checks that
  recipient against the message's own recipients.
- Keys rotate: :class:`VerpKeys` holds every accepted key by id and names the current one.
  Only the current key signs; any key still listed verifies. Retire a key by removing it once
  bounces to it have stopped coming (a few days after the messages it signed expired).
- Message ids are ULIDs (Crockford base32, case-insensitive): written lowercase in the address
  (some MTAs lowercase local parts anyway), returned uppercase.
- 50 bits of MAC (10 characters) make a blind forgery succeed once in 10^15 tries; the
  comparison is constant-time (``hmac.compare_digest``).

Owns: the address format and the tag. Must not: read keys from files or the clock, do I/O,
or decide what a verified bounce does (the bounce listener and suppression do).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["MAC_CHARS", "VerpError", "VerpKeys", "VerpResult", "decode", "encode", "keyed_tag",
           "return_path"]

#: Characters of the base32 MAC kept in the tag (5 bits each).
MAC_CHARS = 10
_KEY_ID = re.compile(r"[a-z0-9]{1,8}")
_PREFIX = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,30}[a-z0-9])?")
_ULID = re.compile(r"[0-9a-hjkmnp-tv-z]{26}")      # Crockford base32: no i, l, o, u
_DOMAIN = re.compile(r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}")
_MAC_TEXT = re.compile(rf"[a-z2-7]{{{MAC_CHARS}}}")


class VerpError(ValueError):
    """A bad argument when building an address or a key set (never raised by :func:`decode`)."""


@dataclass(frozen=True)
class VerpKeys:
    """The accepted keys by id and the one that signs. Key ids: 1-8 of ``a-z0-9``; secrets at
    least 16 bytes (RFC 2104 §3: at least the hash output length is recommended; 32 bytes)."""

    current: str
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        for kid, secret in self.keys.items():
            if not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
                raise VerpError(f"VERP key id {kid!r}: use 1 to 8 of a-z and 0-9")
            if not isinstance(secret, bytes) or len(secret) < 16:
                raise VerpError(f"VERP key {kid!r}: the secret must be at least 16 bytes")
        if self.current not in self.keys:
            raise VerpError(f"the current VERP key {self.current!r} is not among the keys "
                            f"({', '.join(sorted(self.keys)) or 'none'})")


@dataclass(frozen=True)
class VerpResult:
    """What :func:`decode` found: ``message_id`` and ``key_id`` when the tag verified, else
    ``reason`` says why not (malformed, wrong domain, wrong prefix, unknown key, bad tag)."""

    message_id: str | None
    key_id: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.message_id is not None


def keyed_tag(secret: bytes, purpose: bytes, kid: str, payload: str, chars: int) -> str:
    """The first ``chars`` lowercase base32 characters of HMAC-SHA256 over ``purpose``, the
    key id and ``payload`` (``purpose`` keeps a VERP tag from ever passing as another kind
    of token made with the same key)."""
    data = purpose + b"\0" + kid.encode() + b"\0" + payload.encode()
    digest = hmac.new(secret, data, hashlib.sha256).digest()
    return base64.b32encode(digest).decode().lower()[:chars]


def _mac(secret: bytes, kid: str, message_id: str) -> str:
    return keyed_tag(secret, b"raymta-verp-v1", kid, message_id.lower(), MAC_CHARS)


def encode(message_id: str, keys: VerpKeys, *, prefix: str, domain: str) -> str:
    """The return path for ``message_id`` (a ULID), signed with the current key."""
    mid = message_id.strip().lower()
    if not _ULID.fullmatch(mid):
        raise VerpError(f"not a message id (ULID): {message_id!r}")
    if not _PREFIX.fullmatch(prefix):
        raise VerpError(f"VERP prefix {prefix!r}: use a-z, 0-9, '.', '_' or '-' (1-32 characters)")
    dom = domain.strip().lower().rstrip(".")
    if not _DOMAIN.fullmatch(dom):
        raise VerpError(f"bounce domain {domain!r} is not a host name (give it in IDNA form)")
    kid = keys.current
    return f"{prefix}-{kid}{_mac(keys.keys[kid], kid, mid)}-{mid}@{dom}"


def decode(address: str, keys: VerpKeys, *, prefix: str, domain: str) -> VerpResult:
    """Verify a return path and give its message id (uppercase ULID), or the reason it is not
    ours. Case-insensitive; tolerates angle brackets. Never raises on any input string."""
    if not isinstance(address, str) or len(address) > 320:
        return VerpResult(None, reason="malformed: not an address of at most 320 characters")
    addr = address.strip().removeprefix("<").removesuffix(">").lower()
    local, at, dom = addr.rpartition("@")
    if not at or not local:
        return VerpResult(None, reason="malformed: no local part and domain")
    if dom.rstrip(".") != domain.strip().lower().rstrip("."):
        return VerpResult(None, reason=f"wrong domain: {dom!r} is not the bounce domain")
    parts = local.rsplit("-", 2)
    if len(parts) != 3:
        return VerpResult(None, reason="malformed: expected <prefix>-<tag>-<message id>")
    pfx, tag, mid = parts
    if pfx != prefix.lower():
        return VerpResult(None, reason=f"wrong prefix: {pfx!r}")
    if not _ULID.fullmatch(mid):
        return VerpResult(None, reason="malformed: the message id is not a ULID")
    kid, mac = tag[:-MAC_CHARS], tag[-MAC_CHARS:]
    if not _KEY_ID.fullmatch(kid) or not _MAC_TEXT.fullmatch(mac):
        return VerpResult(None, reason="malformed: the tag is not <key id><mac>")
    secret = keys.keys.get(kid)
    if secret is None:
        return VerpResult(None, reason=f"unknown key: {kid!r} is not an accepted VERP key")
    if not hmac.compare_digest(_mac(secret, kid, mid).encode(), mac.encode()):
        return VerpResult(None, reason="bad tag: the HMAC does not match (forged or altered)")
    return VerpResult(mid.upper(), kid)


def return_path(sender: str, message_id: str, keys: VerpKeys, *, prefix: str,
                domain: str) -> str:
    """The MAIL FROM a message goes out with: its VERP address, except that the null sender
    stays null (RFC 5321 §4.5.5: a notification must not itself be answered, and a VERP
    address would invite exactly that)."""
    if sender in ("", "<>"):
        return ""
    return encode(message_id, keys, prefix=prefix, domain=domain)
