"""The submission model: validate what a sender hands raymta and render the wire message.

Role: turn one submission dict (see ``prepare``) into a :class:`PreparedMessage` holding the final
bytes the recipient's server will receive plus the validated envelope and queueing options, or
raise a :class:`ValidationError` that names the field (and, for a raw message, the line) at fault.
Owns: the submission format and its limits, the checks a message must pass before it is queued
(RFC 5322 syntax and line limits, RFC 6532 8-bit headers, header injection), MIME rendering of
structured submissions (stdlib ``email``, policy SMTP), Message-ID/Date completion, and the
time-ordered ids (ULIDs) used for message ids.
Must not: import Ray, touch the network or the disk, read the clock (``now`` is an argument) or
change a raw message beyond line-ending normalisation and the prepended Message-ID/Date fields.
Delivery-time concerns (DKIM signing, dot-stuffing, 8BITMIME negotiation) live elsewhere.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import threading
import zlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import errors as email_errors
from email import policy as email_policy
from email.headerregistry import Address as HeaderAddress
from email.headerregistry import Group
from email.message import EmailMessage
from email.utils import format_datetime, parsedate_to_datetime
from typing import NamedTuple

from cluster.core.addresses import Address, AddressError, parse_address
from cluster.core.dsn_build import DSN_OF_KEY, DSN_REQUEST_KEY
from cluster.core.ratespec import parse_duration
from cluster.core.sites import stable_hash

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_LINE_OCTETS",
    "MAX_METADATA_BYTES",
    "MAX_RECIPIENTS",
    "MAX_TAGS",
    "MAX_TAG_KEY",
    "MAX_TAG_VALUE",
    "SUBMISSION_KEYS",
    "PreparedMessage",
    "ValidationError",
    "message_id_time",
    "new_message_id",
    "prepare",
    "prepare_parsed",
    "validate_batch",
]

MAX_RECIPIENTS = 1000
MAX_TAGS = 32
MAX_TAG_KEY = 64
MAX_TAG_VALUE = 256
MAX_METADATA_BYTES = 4096
MAX_IDEMPOTENCY_KEY = 200
#: the longest a message may stay queued (``max_age``), and how far ahead ``not_before`` may
#: be: a queue's lifetime is bounded (DESIGN: bounded everything)
MAX_QUEUE_LIFETIME = 30 * 86400.0
#: RFC 5322 §2.1.1: "Each line of characters MUST be no more than 998 characters ... excluding
#: the CRLF."
MAX_LINE_OCTETS = 998
DEFAULT_MAX_SIZE = 10_000_000

_STRUCTURED_KEYS = ("from", "to", "cc", "reply_to", "subject", "text", "html", "headers")
_STRUCTURED_KEY_SET = frozenset(_STRUCTURED_KEYS)
_SENDERS: dict[str, Address] = {}   # sender text → checked address (prepare)
SUBMISSION_KEYS = frozenset(("sender", "recipients", "raw", *_STRUCTURED_KEYS, "tags",
                             "metadata", "idempotency_key", "not_before", "max_age", "smtputf8",
                             "dsn"))

# RFC 5322 §3.6: fields that may occur at most once in a message.
_SINGLETON_FIELDS = {"date": "Date", "from": "From", "sender": "Sender", "reply-to": "Reply-To",
                     "to": "To", "cc": "Cc", "bcc": "Bcc", "message-id": "Message-ID",
                     "in-reply-to": "In-Reply-To", "references": "References",
                     "subject": "Subject"}
# Extra ``headers`` a structured submission may not set, and why.
_RESERVED_HEADERS = {
    "from": "use the 'from' field", "to": "use the 'to' field", "cc": "use the 'cc' field",
    "reply-to": "use the 'reply_to' field", "subject": "use the 'subject' field",
    "bcc": "a Bcc header would disclose blind recipients: list them in 'recipients' only",
    "mime-version": "set by raymta", "content-type": "set by raymta from 'text'/'html' "
    "(submit a 'raw' message for another MIME structure)",
    "content-transfer-encoding": "set by raymta",
    # RFC 5321 §4.4: Return-Path is added at final delivery; an originator SHOULD NOT send one.
    "return-path": "added by the final delivery server (RFC 5321 §4.4)",
}
# RFC 5322 §3.6.8 field-name = 1*ftext; ftext = %d33-57 / %d59-126 (printable ASCII but ":")
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+):")
_INJECTION_NAMES = {"\r": "CR", "\n": "LF", "\x00": "NUL"}
_MSG_ID = re.compile(r"<[^<>@\s]+@[^<>@\s]+>\Z")


class ValidationError(ValueError):
    """A submission that cannot be queued: ``field`` says where, ``reason`` says what.

    ``index`` is the position in the batch when the error came from :func:`validate_batch`.
    """

    def __init__(self, field: str, reason: str, *, index: int | None = None) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason
        self.index = index

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class PreparedMessage(NamedTuple):
    """A validated submission (a named tuple: made for every message a sender submits, it
    costs a fifth of a frozen dataclass)."""

    body: bytes               # final wire bytes, CRLF, what the recipient's server will receive
    sender: str               # normalized envelope sender ("" for null reverse-path)
    recipients: tuple[Address, ...]  # deduped, validated
    tags: dict[str, str]
    metadata: dict
    idempotency_key: str | None
    not_before: float | None
    max_age: float | None
    smtputf8: bool
    added_headers: tuple[str, ...]   # e.g. ("Message-ID", "Date")


# --------------------------------------------------------------------------- entry points

def prepare(submission: dict, *, now: float, max_size: int = DEFAULT_MAX_SIZE) -> PreparedMessage:
    """Validate one submission and render its wire bytes.

    Keys: ``sender``, ``recipients`` (required), then either ``raw`` (a complete RFC 5322
    message, bytes or str) or the structured fields ``from``, ``to``, ``cc``, ``reply_to``,
    ``subject``, ``text``, ``html``, ``headers``; and the options ``tags``, ``metadata``,
    ``idempotency_key``, ``not_before``, ``max_age``, ``smtputf8``, ``dsn`` (true: a bounce or
    expiry sends a DSN to the envelope sender; kept as metadata ``raymta.dsn``). A key set to None counts as
    absent. ``now`` (epoch seconds) dates the message; ``max_size`` bounds the final bytes.
    """
    _check_max_size(max_size)
    if not isinstance(submission, dict):
        raise ValidationError("submission", f"must be a dict, not {type(submission).__name__}")
    if not SUBMISSION_KEYS.issuperset(submission):
        for key in submission:
            if key not in SUBMISSION_KEYS:
                raise ValidationError(str(key), _unknown_key_reason(key))
    sub = ({k: v for k, v in submission.items() if v is not None}
           if None in submission.values() else submission)

    smtputf8 = sub.get("smtputf8", False)
    if not isinstance(smtputf8, bool):
        raise ValidationError("smtputf8", f"must be true or false, not {_type(smtputf8)}")

    structured = [] if _STRUCTURED_KEY_SET.isdisjoint(sub) else \
        [k for k in _STRUCTURED_KEYS if k in sub]
    if "raw" in sub and structured:
        raise ValidationError("raw", "cannot be combined with the structured fields "
                              f"{', '.join(map(repr, structured))}: give either a complete "
                              "message in 'raw' or build one from fields")
    if "raw" not in sub and "text" not in sub and "html" not in sub:
        raise ValidationError("text", "missing: give 'text' and/or 'html', or a complete "
                              "message in 'raw'")

    recipients = _recipients(sub.get("recipients"), smtputf8)
    sender = None
    if "sender" in sub:
        # one sender sends many messages: the last few checked are kept (ASCII ones only,
        # whose result does not depend on smtputf8)
        sender = _SENDERS.get(sub["sender"]) if type(sub["sender"]) is str else None
        if sender is None:
            sender = _address(sub["sender"], "sender", smtputf8, allow_empty=True)
            if sub["sender"].isascii():
                if len(_SENDERS) >= 256:
                    _SENDERS.clear()
                _SENDERS[sub["sender"]] = sender
    tags = _tags(sub.get("tags"))
    dsn = sub.get("dsn", False)
    if not isinstance(dsn, bool):
        raise ValidationError("dsn", f"must be true or false, not {_type(dsn)}")
    meta_in = sub.get("metadata")
    if dsn:   # a DSN to the envelope sender on a bounce or expiry (cluster/core/dsn_build.py)
        meta_in = {**(meta_in if isinstance(meta_in, dict) else {}), DSN_REQUEST_KEY: True} \
            if meta_in is None or isinstance(meta_in, dict) else meta_in
    metadata = _metadata(meta_in)
    idem = _idempotency_key(sub.get("idempotency_key"))
    not_before = _not_before(sub.get("not_before"))
    if not_before is not None and not_before > now + MAX_QUEUE_LIFETIME:
        raise ValidationError("not_before", f"more than {MAX_QUEUE_LIFETIME / 86400:g} days "
                              "ahead")
    max_age = _max_age(sub.get("max_age"))

    if "raw" in sub:
        body, sender, added = _prepare_raw(sub["raw"], sender, smtputf8, now, max_size)
    else:
        body, sender, added = _prepare_structured(sub, sender, smtputf8, now, max_size)
    if len(body) > max_size:
        raise ValidationError("body", _too_big(len(body), max_size))
    # (positional: a named tuple made from keywords costs four times as much)
    return PreparedMessage(body, str(sender), recipients, tags, metadata, idem, not_before,
                           max_age, smtputf8, added)


def validate_batch(submissions: list, *, now: float, max_size: int = DEFAULT_MAX_SIZE
                   ) -> list[PreparedMessage | ValidationError]:
    """:func:`prepare` every submission; one result per input, in order.

    A bad submission yields its :class:`ValidationError` (with ``index`` set) in its slot and
    never affects the others; a non-dict element gets an error naming its index.
    """
    _check_max_size(max_size)
    if not isinstance(submissions, (list, tuple)):
        raise ValidationError("submissions", f"must be a list, not {_type(submissions)}")
    out: list[PreparedMessage | ValidationError] = []
    for i, sub in enumerate(submissions):
        if not isinstance(sub, dict):
            out.append(ValidationError(f"submissions[{i}]", "must be a dict, not "
                                       f"{_type(sub)}", index=i))
            continue
        try:
            out.append(prepare(sub, now=now, max_size=max_size))
        except ValidationError as e:
            out.append(ValidationError(e.field, e.reason, index=i))
        except Exception as e:  # noqa: BLE001 - one odd submission must not sink its batch
            out.append(ValidationError("submission", "could not be processed: "
                                       f"{type(e).__name__}: {e}", index=i))
    return out


def prepare_parsed(sender: Address, recipients: Sequence[Address], raw: bytes, *,
                   smtputf8: bool = False, dsn: bool = False, now: float,
                   max_size: int = DEFAULT_MAX_SIZE) -> PreparedMessage:
    """:func:`prepare` of ``{"sender": str(sender) or "<>", "recipients": [str(a) for a in
    recipients], "raw": raw, "smtputf8": smtputf8, "dsn": dsn}`` for a front end whose own
    parser made ``sender`` and ``recipients`` with :func:`parse_address` (the same
    ``smtputf8``; the sender with ``allow_empty``): an SMTP listener, which would otherwise
    have each address parsed a second time and the options checked that such a dict cannot
    get wrong (~15 µs of a message's ~30). The message itself gets every check :func:`prepare`
    makes; anything but the common case (no recipient or too many, a message that is not
    plain CRLF text with a plain header section) is handed to :func:`prepare` itself, so the
    result — or the :class:`ValidationError` — is the same."""
    _check_max_size(max_size)
    if not recipients or len(recipients) > MAX_RECIPIENTS or type(raw) is not bytes or \
            not raw or len(raw) > max_size or raw.find(b"\x00") >= 0:
        return _prepare_as_dict(sender, recipients, raw, smtputf8, dsn, now, max_size)
    plain = _plain_raw(raw)
    if plain is None:
        return _prepare_as_dict(sender, recipients, raw, smtputf8, dsn, now, max_size)
    body, sender, added = _finish_raw(plain[0], plain[1], sender, now)
    if len(body) > max_size:
        raise ValidationError("body", _too_big(len(body), max_size))
    rcpts: tuple[Address, ...]
    if len(recipients) == 1:
        rcpts = (recipients[0],)
    else:   # RFC 5321 §2.4: the local part is case-sensitive, the domain is not
        seen: dict[tuple[str, str], Address] = {}
        for addr in recipients:
            seen.setdefault((addr.local, addr.ascii_domain), addr)
        rcpts = tuple(seen.values())
    return PreparedMessage(body, str(sender), rcpts, {}, {DSN_REQUEST_KEY: True} if dsn else {},
                           None, None, None, smtputf8, added)


def _prepare_as_dict(sender: Address, recipients: Sequence[Address], raw: object,
                     smtputf8: bool, dsn: bool, now: float, max_size: int) -> PreparedMessage:
    return prepare({"sender": str(sender) or "<>", "recipients": [str(a) for a in recipients],
                    "raw": raw, "smtputf8": smtputf8, "dsn": dsn}, now=now, max_size=max_size)


# --------------------------------------------------------------------------- ULIDs

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_VALUE = {c: i for i, c in enumerate(_CROCKFORD)}


class _RandomPool:
    """The 80 random bits of ULIDs, already as 16 Crockford base32 characters each, made
    4,096 ids at a time: one ``os.urandom`` and one ``bytes.translate`` (each random byte's low
    5 bits pick a character) instead of an ``os.urandom`` and a base32 encoding per id (making
    an id took ~10 µs, ~8 % of a submitting client's CPU). Thread-safe; a forked child starts a
    fresh pool, so parent and child never hand out the same bits."""

    _CHARS = 16
    _BATCH = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf = ""
        self._pos = 0
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._buf, self._pos = "", 0

    def chars16(self) -> str:
        return self.chars(1)

    def chars(self, n: int) -> str:
        """16 × ``n`` random characters (``n`` ids' worth), never handed out twice."""
        want = self._CHARS * n
        with self._lock:
            if self._pos + want > len(self._buf):
                raw = os.urandom(self._CHARS * max(self._BATCH, n))
                self._buf = raw.translate(_BYTE_TO_CROCKFORD).decode("ascii")
                self._pos = 0
            out = self._buf[self._pos:self._pos + want]
            self._pos += want
        return out


_BYTE_TO_CROCKFORD = bytes(ord(_CROCKFORD[b & 31]) for b in range(256))
_RANDOM = _RandomPool()
_LAST_MS: tuple[int, str] = (-1, "")


def _time_chars(ms: int) -> str:
    """The 10 ULID characters of a millisecond time (50 bits, the top two zero); the last one
    is kept, as a batch's ids share their millisecond."""
    global _LAST_MS
    last = _LAST_MS
    if last[0] == ms:
        return last[1]
    out = "".join(_CROCKFORD[(ms >> shift) & 31] for shift in range(45, -5, -5))
    _LAST_MS = (ms, out)
    return out


def new_message_id(now: float) -> str:
    """A ULID: 26 Crockford base32 characters, 48-bit millisecond time then 80 random bits.

    Ids sort (as strings) by their millisecond; ids within one millisecond are random."""
    ms = round(now * 1000)
    if not 0 <= ms < 1 << 48:
        raise ValueError(f"now={now!r} is outside the ULID time range")
    return _time_chars(ms) + _RANDOM.chars16()


def new_message_ids(now: float, n: int, shard: int = 0, shards: int = 1) -> list[str]:
    """``n`` ULIDs of ``now`` (see :func:`new_message_id`) that each hash to ``shard`` of
    ``shards`` (see :func:`id_for_shard`): a sender's batch, made at ~1.2 µs an id instead of
    ~2.4 one by one."""
    ms = round(now * 1000)
    if not 0 <= ms < 1 << 48:
        raise ValueError(f"now={now!r} is outside the ULID time range")
    prefix = _time_chars(ms)
    rand = _RANDOM.chars(n)
    ids = [prefix + rand[k:k + 16] for k in range(0, 16 * n, 16)]
    if shards > 1:
        crc = zlib.crc32
        for k, mid in enumerate(ids):
            if crc(mid.encode("ascii")) % shards != shard:
                ids[k] = id_for_shard(mid, shard, shards)
    return ids


def id_for_shard(mid: str, shard: int, shards: int) -> str:
    """``mid`` (a ULID) with its last two random characters changed so that it hashes to
    ``shard`` (``stable_hash(id) % shards``, how ids are routed): ~``shards`` crc32s instead of
    as many new ids (base32-encoding whole ids was ~15 % of a submitter's CPU). The time part
    is kept."""
    if stable_hash(mid) % shards == shard:
        return mid
    for tail in _TAILS:
        cand = mid[:-2] + tail
        if stable_hash(cand) % shards == shard:
            return cand
    at = message_id_time(mid)
    while True:   # more shards than 1,024 tails can reach: draw whole ids
        cand = new_message_id(at)
        if stable_hash(cand) % shards == shard:
            return cand


_TAILS = [a + b for a in _CROCKFORD for b in _CROCKFORD]


def message_id_time(mid: str) -> float:
    """The creation time (epoch seconds, millisecond precision) encoded in a ULID.

    Also accepts a Message-ID built from one (``<ULID@domain>``)."""
    if not isinstance(mid, str):
        raise TypeError(f"not a ULID: {mid!r}")
    ulid = mid.strip().removeprefix("<").split("@", 1)[0].upper()
    # 26 characters carry 130 bits for a 128-bit value: the first is at most "7".
    if len(ulid) != 26 or ulid[0] > "7" or any(c not in _CROCKFORD_VALUE for c in ulid):
        raise ValueError(f"not a ULID: {mid!r}")
    ms = 0
    for c in ulid[:10]:  # 50 bits: two zero bits, then the 48-bit millisecond time
        ms = ms * 32 + _CROCKFORD_VALUE[c]
    return ms / 1000


# --------------------------------------------------------------------------- options

def _check_max_size(max_size: object) -> None:
    """A bad limit is the caller's bug, not the submitter's: TypeError/ValueError."""
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise TypeError(f"max_size must be an int, not {type(max_size).__name__}")
    if max_size <= 0:
        raise ValueError(f"max_size must be positive, not {max_size}")


def _type(value: object) -> str:
    return type(value).__name__


def _unknown_key_reason(key: object) -> str:
    reason = "unknown key"
    if isinstance(key, str):
        close = difflib.get_close_matches(key, sorted(SUBMISSION_KEYS), n=1)
        if close:
            reason += f" (did you mean {close[0]!r}?)"
    if key == "attachments":
        reason += " (attachments are not supported: submit a complete MIME message in 'raw')"
    return reason


def _address(value: object, field: str, smtputf8: bool, *, allow_empty: bool = False) -> Address:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, not {_type(value)}")
    try:
        return parse_address(value, field=field, allow_smtputf8=smtputf8,
                             allow_empty=allow_empty)
    except AddressError as e:
        hint = " (set smtputf8: true)" if "SMTPUTF8" in e.reason else ""
        raise ValidationError(field, f"{e.reason}{hint} ({value!r})") from None


def _recipients(value: object, smtputf8: bool) -> tuple[Address, ...]:
    if type(value) is list and len(value) == 1 and type(value[0]) is str:   # the usual case
        return (_address(value[0], "recipients[0]", smtputf8),)
    if value is None:
        raise ValidationError("recipients", "missing")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValidationError("recipients", "must be a list of addresses or a single address "
                              f"string, not {_type(value)}")
    if not items:
        raise ValidationError("recipients", "must not be empty")
    if len(items) > MAX_RECIPIENTS:
        raise ValidationError("recipients", f"{len(items)} recipients, over the limit of "
                              f"{MAX_RECIPIENTS} per message: split the submission")
    seen: dict[tuple[str, str], Address] = {}
    for i, item in enumerate(items):
        field = "recipients" if isinstance(value, str) else f"recipients[{i}]"
        addr = _address(item, field, smtputf8)
        # RFC 5321 §2.4: the local part is case-sensitive, the domain is not (lowercased).
        seen.setdefault((addr.local, addr.ascii_domain), addr)
    return tuple(seen.values())


def _check_utf8(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValidationError(field, f"not encodable as UTF-8: {e.reason} at character "
                              f"{e.start}") from None


def _check_text(value: str, field: str, *, allow_tab: bool = True) -> None:
    """No line breaks, NUL or other controls in a one-line value (header injection guard)."""
    _check_utf8(value, field)
    for ch in value:
        cp = ord(ch)
        if cp < 0x20 and not (allow_tab and ch == "\t") or cp == 0x7F:
            name = {0: "NUL", 9: "TAB", 10: "LF", 13: "CR", 0x7F: "DEL"}.get(cp)
            what = f"U+{cp:04X}" + (f" ({name})" if name else "")
            if ch in "\r\n":
                raise ValidationError(field, f"contains {what}: line breaks are not allowed "
                                      "in a header value (header injection)")
            raise ValidationError(field, f"contains control character {what}")


def _tags(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError("tags", f"must be a dict of string to string, not {_type(value)}")
    if len(value) > MAX_TAGS:
        raise ValidationError("tags", f"{len(value)} tags, over the limit of {MAX_TAGS}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise ValidationError("tags", f"keys must be strings, not {_type(k)} ({k!r})")
        field = f"tags[{k!r}]"
        if not k or len(k) > MAX_TAG_KEY:
            raise ValidationError(field, f"key must be 1-{MAX_TAG_KEY} characters")
        if not isinstance(v, str):
            raise ValidationError(field, f"value must be a string, not {_type(v)}")
        if len(v) > MAX_TAG_VALUE:
            raise ValidationError(field, f"value is {len(v)} characters, over the limit of "
                                  f"{MAX_TAG_VALUE}")
        _check_text(k, field, allow_tab=False)
        _check_text(v, field, allow_tab=False)
        out[k] = v
    return out


def _metadata(value: object) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError("metadata", f"must be a dict, not {_type(value)}")
    if DSN_OF_KEY in value:
        raise ValidationError(f"metadata.{DSN_OF_KEY}", "reserved: raymta sets it on the "
                              "delivery status notifications it makes")
    if DSN_REQUEST_KEY in value and value[DSN_REQUEST_KEY] is not True:
        raise ValidationError(f"metadata.{DSN_REQUEST_KEY}", "reserved: true (or absent); "
                              "use the submission's 'dsn' option")
    try:
        encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValidationError("metadata", f"not JSON-serialisable: {e}") from None
    try:
        size = len(encoded.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValidationError("metadata", f"not encodable as UTF-8: {e.reason}") from None
    if size > MAX_METADATA_BYTES:
        raise ValidationError("metadata", f"{size} bytes as JSON, over the limit of "
                              f"{MAX_METADATA_BYTES}")
    return json.loads(encoded)  # a private copy, exactly what will be stored


#: metadata values :func:`check_metadata` judges without a JSON round trip
_FLAT_SCALARS = (str, bool, int, float, type(None))
#: the most bytes one ASCII character of a key or value can take as JSON (a control
#: character becomes a six-character escape), and a bound on the rest of a flat entry's
#: bytes (quotes, colon, comma; an int within 64 bits or a float's repr: 24 at most)
_JSON_CHAR_MAX = 6
_JSON_ENTRY_MAX = 32


def check_metadata(value: object) -> None:
    """Raise :class:`ValidationError` unless ``value`` is metadata :func:`_metadata` accepts
    (the same verdict, same errors), without making its copy. A shard leader checks every
    message's metadata again: a small flat dict of ASCII strings and plain numbers (what
    front ends send, e.g. the DSN request) is judged from its types and a bound on its JSON
    size, without ``json.dumps`` and ``json.loads`` (they were ~8 % of a leader's event loop
    at the SMTP ingress's rate); anything else goes the whole way."""
    if type(value) is dict and len(value) <= MAX_METADATA_BYTES // _JSON_ENTRY_MAX and \
            DSN_OF_KEY not in value and value.get(DSN_REQUEST_KEY, True) is True:
        size = 2
        for k, v in value.items():
            if type(k) is not str or not k.isascii() or type(v) not in _FLAT_SCALARS:
                break
            if type(v) is str:
                if not v.isascii():
                    break
                size += _JSON_CHAR_MAX * (len(k) + len(v)) + _JSON_ENTRY_MAX
            elif type(v) is float and not math.isfinite(v) or \
                    type(v) is int and not -(1 << 63) <= v < (1 << 64):
                break
            else:
                size += _JSON_CHAR_MAX * len(k) + _JSON_ENTRY_MAX
        else:
            if size <= MAX_METADATA_BYTES:
                return
    _metadata(value)


def _idempotency_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError("idempotency_key", f"must be a string, not {_type(value)}")
    if not value:
        raise ValidationError("idempotency_key", "must not be empty")
    if len(value) > MAX_IDEMPOTENCY_KEY:
        raise ValidationError("idempotency_key", f"{len(value)} characters, over the limit of "
                              f"{MAX_IDEMPOTENCY_KEY}")
    _check_text(value, "idempotency_key", allow_tab=False)
    return value


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _not_before(value: object) -> float | None:
    if value is None:
        return None
    t = _number(value)
    if t is None and isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValidationError("not_before", "datetime has no timezone")
        t = value.timestamp()
    elif t is None and isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValidationError("not_before", f"not an ISO-8601 date-time: {value!r} "
                                  "(e.g. '2025-01-31T09:00:00Z')") from None
        if dt.tzinfo is None:
            raise ValidationError("not_before", f"ISO-8601 date-time without a timezone: "
                                  f"{value!r} (add 'Z' or an offset such as '+02:00')")
        t = dt.timestamp()
    elif t is None:
        raise ValidationError("not_before", "must be epoch seconds or an ISO-8601 string, "
                              f"not {_type(value)}")
    if not math.isfinite(t) or t < 0:
        raise ValidationError("not_before", f"must be a finite time after 1970, not {value!r}")
    return t


def _max_age(value: object) -> float | None:
    if value is None:
        return None
    seconds = _number(value)
    if seconds is None:
        if not isinstance(value, str):
            raise ValidationError("max_age", "must be seconds or a duration string like '2h', "
                                  f"not {_type(value)}")
        try:
            seconds = parse_duration(value)
        except (ValueError, TypeError) as e:
            raise ValidationError("max_age", str(e)) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValidationError("max_age", f"must be a positive duration, not {value!r}")
    if seconds > MAX_QUEUE_LIFETIME:
        raise ValidationError("max_age", f"{seconds:.0f} s is over the limit of "
                              f"{MAX_QUEUE_LIFETIME / 86400:g} days")
    return seconds


def _too_big(size: int, max_size: int) -> str:
    return f"message is {size} bytes, over the limit of {max_size}"


def _added_fields(now: float, domain: str, missing: Iterable[str]) -> list[tuple[str, str]]:
    """Values for the absent Message-ID / Date fields, in that fixed order."""
    missing = set(missing)
    out = []
    if "Message-ID" in missing:
        # RFC 5322 §3.6.4: msg-id = "<" id-left "@" id-right ">"
        out.append(("Message-ID", f"<{new_message_id(now)}@{domain}>"))
    if "Date" in missing:
        # RFC 5322 §3.3 date-time, §3.6.1 orig-date
        out.append(("Date", format_datetime(datetime.fromtimestamp(now, UTC))))
    return out


def _msgid_domain(sender: Address | None) -> str:
    return sender.ascii_domain if sender is not None and not sender.is_null else "raymta.invalid"


# --------------------------------------------------------------------------- raw messages

@dataclass
class _Field:
    name: str       # as written
    value: str      # unfolded, decoded (UTF-8, invalid bytes replaced)
    line: int       # 1-based line of the field's first line in the submitted message


def _line_of(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def _first_long_line(text: bytes) -> tuple[int, int] | None:
    """(line number, length) of the first line of LF-separated ``text`` over the limit."""
    lengths = list(map(len, text.split(b"\n")))  # C speed; a regex scan would be quadratic
    if max(lengths) <= MAX_LINE_OCTETS:
        return None
    return next((n, length) for n, length in enumerate(lengths, 1)
                if length > MAX_LINE_OCTETS)


def _prepare_raw(raw: object, sender: Address | None, smtputf8: bool, now: float,
                 max_size: int) -> tuple[bytes, Address, tuple[str, ...]]:
    if isinstance(raw, str):
        try:
            data = raw.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValidationError("raw", f"not encodable as UTF-8: {e.reason} at character "
                                  f"{e.start}") from None
    elif isinstance(raw, (bytes, bytearray, memoryview)):
        data = bytes(raw)
    else:
        raise ValidationError("raw", f"must be bytes or str, not {_type(raw)}")
    if not data:
        raise ValidationError("raw", "empty message")
    if len(data) > max_size:  # normalisation only ever adds bytes
        raise ValidationError("body", _too_big(len(data), max_size))

    # RFC 5322 §2.1/§3.5: no NUL anywhere; CR and LF only together as CRLF (§2.3).
    pos = data.find(b"\x00")
    if pos >= 0:
        raise ValidationError("raw", f"line {_line_of(data, pos)}: NUL byte (not allowed "
                              "anywhere in a message, RFC 5322 §2.1)")
    plain = _plain_raw(data) if sender is not None else None
    if plain is not None:   # the common case, checked in a few passes at C speed
        wire, present = plain
        return _finish_raw(wire, present, sender, now)
    text = data.replace(b"\r\n", b"\n")  # one LF per line; bare LFs are normalised to CRLF
    pos = text.find(b"\r")
    if pos >= 0:
        raise ValidationError("raw", f"line {_line_of(text, pos)}: bare CR (a CR must be "
                              "followed by LF, RFC 5322 §2.3)")
    long_line = _first_long_line(text)
    if long_line:
        n, length = long_line
        raise ValidationError("raw", f"line {n}: {length} octets, over the {MAX_LINE_OCTETS}-"
                              "octet line limit (RFC 5322 §2.1.1)")

    fields = _parse_header_section(text, smtputf8)
    by_name: dict[str, _Field] = {}
    for f in fields:
        key = f.name.lower()
        if key in _SINGLETON_FIELDS and key in by_name:
            raise ValidationError("raw", f"line {f.line}: second {f.name!r} header field "
                                  f"(RFC 5322 §3.6 allows at most one; the first is on "
                                  f"line {by_name[key].line})")
        by_name.setdefault(key, f)
    if "from" in by_name and sender is None:
        sender = _sender_from_headers(by_name, smtputf8)
    if not text.endswith(b"\n"):
        text += b"\n"
    return _finish_raw(text.replace(b"\n", b"\r\n"), by_name, sender, now)


def _finish_raw(wire: bytes, present: Collection[str], sender: Address | None, now: float
                ) -> tuple[bytes, Address, tuple[str, ...]]:
    """``wire`` (CRLF, ending in CRLF) with the Message-ID and Date fields it lacks added in
    front; ``present``: the lowercased names of its header fields."""
    if "from" not in present:
        raise ValidationError("raw", "missing From header field (required, RFC 5322 §3.6)")
    assert sender is not None
    missing = [n for n in ("Message-ID", "Date") if n.lower() not in present]
    if not missing:
        return wire, sender, ()
    added = _added_fields(now, _msgid_domain(sender), missing)
    prefix = "".join(f"{n}: {v}\r\n" for n, v in added).encode("ascii")
    return prefix + wire, sender, tuple(n for n, _ in added)


def _plain_raw(data: bytes) -> tuple[bytes, set[str]] | None:
    """The common case in a few passes at C speed (a submitter's hot path; the line-by-line
    checks took ~25 µs of a 2 KB message's ~50): ``data`` with CRLF line ends throughout, or
    LF throughout, every line within the limit, and a header section of plain ASCII fields
    (``Name: value`` or folded continuations holding more than whitespace, RFC 5322 §2.2), no
    field twice, ended by an empty line. Returns its wire form (CRLF, ending in CRLF) and which
    of From, Message-ID and Date it has (lowercased); None for anything else, which :func:`_prepare_raw` then checks
    line by line (and explains). No NUL is in ``data`` (checked before)."""
    crlf = data.find(b"\r") >= 0
    lines = data.split(b"\r\n" if crlf else b"\n")
    if crlf:   # no CR or LF may be left once the CRLFs are gone
        rest = b"".join(lines)
        if rest.find(b"\r") >= 0 or rest.find(b"\n") >= 0:
            return None
    if max(map(len, lines)) > MAX_LINE_OCTETS:
        return None
    try:
        end = lines.index(b"")
    except ValueError:
        return None
    if end == 0 or end == len(lines) - 1:   # no field, or no empty line ending the section
        return None
    head = lines[:end]
    joined = b"\n".join(head)
    if not joined.isascii() or _PLAIN_FIELDS.fullmatch(joined) is None:
        return None
    names = b"\n".join([line[:line.find(b":")] for line in head
                         if line[0] != 32 and line[0] != 9]).lower().split(b"\n")
    unique = set(names)
    if len(unique) != len(names):
        return None
    present = {name for name, raw in _FIELDS_ADDED_OR_NEEDED if raw in unique}
    wire = data if crlf else data.replace(b"\n", b"\r\n")
    return (wire if lines[-1] == b"" else wire + b"\r\n"), present


# A plain header section, its lines joined by LF: every line a "Name: value" field (RFC 5322
# §2.2) or a folded continuation holding more than whitespace (§2.2.3).
_PLAIN_FIELDS = re.compile(rb"[\x21-\x39\x3b-\x7e]+:[^\n]*(?:\n[ \t]+[^\s][^\n]*)*"
                           rb"(?:\n[\x21-\x39\x3b-\x7e]+:[^\n]*(?:\n[ \t]+[^\s][^\n]*)*)*")
# the fields _finish_raw looks for (lowercased), as text and as bytes
_FIELDS_ADDED_OR_NEEDED = tuple((n, n.encode()) for n in ("from", "message-id", "date"))


def _parse_header_section(text: bytes, smtputf8: bool) -> list[_Field]:
    """Check the header section (RFC 5322 §2.2, §3.6) of LF-separated ``text``."""
    fields: list[_Field] = []
    # The header section ends at the first empty line (RFC 5322 §2.1); without one, the whole
    # message is headers (a message without a body).
    if text.startswith(b"\n"):
        head = b""  # an empty header section
    else:
        end = text.find(b"\n\n")
        head = text if end < 0 else text[:end + 1]
    lines = head.split(b"\n") if head else []
    if head.endswith(b"\n"):
        lines.pop()
    all_ascii = head.isascii()
    for n, line in enumerate(lines, 1):
        if line[:1] in (b" ", b"\t"):
            # RFC 5322 §2.2.3 folding: a continuation of the previous field
            if not fields:
                raise ValidationError("raw", f"line {n}: starts with whitespace but there is no "
                                      "header field before it to continue (RFC 5322 §2.2.3)")
            if not line.strip(b" \t"):
                raise ValidationError("raw", f"line {n}: whitespace-only line in the header "
                                      "section (obsolete folding, RFC 5322 §3.2.2/§4.2; end "
                                      "the headers with an empty line)")
            name = fields[-1].name
        else:
            m = _FIELD_NAME.match(line)
            if not m and n == 1 and line.startswith(b"From "):
                raise ValidationError("raw", "line 1: mbox 'From ' separator line: remove it, "
                                      "a message starts with its header fields")
            if not m:
                colon = line.find(b":")
                if colon > 0:
                    bad = line[:colon].decode("utf-8", "replace")
                    raise ValidationError("raw", f"line {n}: invalid header field name {bad!r} "
                                          "(printable ASCII without spaces, RFC 5322 §2.2)")
                raise ValidationError("raw", f"line {n}: not a header field ('Name: value') or "
                                      "folded continuation line; the header section must end "
                                      "with an empty line before the body (RFC 5322 §2.1, "
                                      "§2.2)")
            name = m.group(1).decode("ascii")
        if not all_ascii and not line.isascii():
            if not smtputf8:
                raise ValidationError("raw", f"line {n}: 8-bit byte in the {name!r} header "
                                      "field needs smtputf8 (RFC 6532), or encode it (RFC 2047)")
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationError("raw", f"line {n}: {name!r} header field is not valid "
                                      "UTF-8 (RFC 6532 §3.2)") from None
        value = line.decode("ascii") if all_ascii else line.decode("utf-8", "replace")
        if line[:1] in (b" ", b"\t"):
            fields[-1].value += value
        else:
            fields.append(_Field(name, value[len(name) + 1:].strip(), n))
    return fields


def _sender_from_headers(by_name: dict[str, _Field], smtputf8: bool) -> Address:
    """Envelope sender from Sender (if present) else From (RFC 5322 §3.6.2)."""
    field = by_name.get("sender") or by_name["from"]
    header = email_policy.SMTPUTF8.header_factory(field.name, field.value)
    addrs = list(header.addresses)
    where = f"the {field.name} header field (line {field.line})"
    if len(addrs) != 1:
        raise ValidationError("sender", f"missing, and {where} holds {len(addrs)} addresses: "
                              "give 'sender'")
    spec = addrs[0].addr_spec
    try:
        return parse_address(spec, field="sender", allow_smtputf8=smtputf8)
    except AddressError as e:
        raise ValidationError("sender", f"missing, and the address in {where} is unusable: "
                              f"{e.reason} ({spec!r})") from None


# --------------------------------------------------------------------------- structured messages

#: parsed display-address strings (a bulk sender's From repeats in every message: the stdlib's
#: header parser costs ~0.25 ms a string); only strings that parsed, so an error still names
#: the field it came from
_ADDRESS_ITEMS: dict[tuple[str, bool], tuple[tuple[HeaderAddress | Group, ...],
                                            tuple[Address, ...]]] = {}
_ADDRESS_ITEMS_MAX = 1024


def _parse_address_item(item: str, where: str, smtputf8: bool
                        ) -> tuple[tuple[HeaderAddress | Group, ...], tuple[Address, ...]]:
    _check_text(item, where)
    header = email_policy.SMTPUTF8.header_factory("To", item)
    for defect in header.defects:
        # "Dr. Bob" (obsolete period in a phrase) is harmless; non-ASCII local parts are
        # judged by parse_address below.
        if not isinstance(defect, (email_errors.ObsoleteHeaderDefect,
                                   email_errors.NonASCIILocalPartDefect)):
            raise ValidationError(where, f"not a valid address list: {defect} ({item!r})")
    out: list[HeaderAddress | Group] = []
    addrs: list[Address] = []
    for group in header.groups:
        members = []
        for a in group.addresses:
            addr = _address(a.addr_spec, where, smtputf8)
            addrs.append(addr)
            members.append(_header_address(addr, a.display_name))
        if group.display_name is None:
            out.extend(members)
        else:
            out.append(Group(group.display_name, members))
    return tuple(out), tuple(addrs)


def _header_addresses(value: object, field: str, smtputf8: bool, *, single: bool = False
                      ) -> tuple[list[HeaderAddress | Group], list[Address]]:
    """Parse display addresses (``"Name <a@b.example>"``, lists thereof) for a header.

    Returns the header objects to render and the validated addresses they hold."""
    if single:
        if not isinstance(value, str):
            raise ValidationError(field, f"must be a string, not {_type(value)}")
        items = [(field, value)]
    elif isinstance(value, str):
        items = [(field, value)]
    elif isinstance(value, (list, tuple)):
        items = [(f"{field}[{i}]", v) for i, v in enumerate(value)]
    else:
        raise ValidationError(field, f"must be a string or a list of strings, not "
                              f"{_type(value)}")
    out: list[HeaderAddress | Group] = []
    addrs: list[Address] = []
    for where, item in items:
        if not isinstance(item, str):
            raise ValidationError(where, f"must be a string, not {_type(item)}")
        parsed = _ADDRESS_ITEMS.get((item, smtputf8))
        if parsed is None:
            parsed = _parse_address_item(item, where, smtputf8)
            if len(_ADDRESS_ITEMS) >= _ADDRESS_ITEMS_MAX:   # bounded: the last ones seen
                _ADDRESS_ITEMS.clear()
            _ADDRESS_ITEMS[(item, smtputf8)] = parsed
        out.extend(parsed[0])
        addrs.extend(parsed[1])
    if single and (len(out) != 1 or isinstance(out[0], Group)):
        raise ValidationError(field, f"must be exactly one address, got {value!r}")
    return out, addrs


def _header_address(addr: Address, display_name: str = "") -> HeaderAddress:
    """A header mailbox for a validated address (A-label domain unless SMTPUTF8 is needed)."""
    local = addr.local
    if local.startswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    domain = addr.domain if addr.needs_smtputf8 else addr.ascii_domain
    return HeaderAddress(display_name=display_name, username=local, domain=domain)


def _prepare_structured(sub: dict, sender: Address | None, smtputf8: bool, now: float,
                        max_size: int) -> tuple[bytes, Address, tuple[str, ...]]:
    for key in ("subject", "text", "html"):
        if key in sub and not isinstance(sub[key], str):
            raise ValidationError(key, f"must be a string, not {_type(sub[key])}")
    text, html = sub.get("text"), sub.get("html")
    for key in ("text", "html"):
        if key in sub:
            _check_utf8(sub[key], key)
    size = sum(len(s.encode("utf-8")) for s in (text, html) if s is not None)
    if size > max_size:  # every content-transfer-encoding is at least as long as its input
        raise ValidationError("body", _too_big(size, max_size))
    for key in ("text", "html"):
        if key in sub and "\x00" in sub[key]:
            raise ValidationError(key, "contains a NUL character (RFC 5322 §2.1)")

    from_, from_addrs = _header_addresses(sub["from"], "from", smtputf8, single=True) \
        if "from" in sub else ([], [])
    to = cc = reply_to = []
    if "to" in sub:
        to, _ = _header_addresses(sub["to"], "to", smtputf8)
    if "cc" in sub:
        cc, _ = _header_addresses(sub["cc"], "cc", smtputf8)
    if "reply_to" in sub:
        reply_to, _ = _header_addresses(sub["reply_to"], "reply_to", smtputf8)
    if "subject" in sub:
        _check_text(sub["subject"], "subject")
    extra = _extra_headers(sub.get("headers"))

    if sender is None:
        if not from_addrs:
            raise ValidationError("sender", "missing (and no 'from' to take it from)")
        sender = from_addrs[0]
    if not from_:
        if sender.is_null:
            raise ValidationError("from", "missing: a From header is required (RFC 5322 "
                                  "§3.6) and the sender is the null reverse-path")
        from_ = [_header_address(sender)]

    given = {name.lower() for name in extra}
    missing = [n for n in ("Message-ID", "Date") if n.lower() not in given]
    added = _added_fields(now, _msgid_domain(sender), missing)
    subject = sub.get("subject")
    body = None
    if not smtputf8 and not extra:
        body = _render_plain(added, from_, to, cc, reply_to, subject, text, html)
    if body is None:
        body = _render_mime(added, from_, to, cc, reply_to, subject, extra, text, html,
                            smtputf8, now)
    if len(body) > max_size:
        raise ValidationError("body", _too_big(len(body), max_size))
    # The stdlib folds and encodes; check its output against the same rules as a raw message.
    try:
        _parse_header_section(body.replace(b"\r\n", b"\n"), smtputf8)
    except ValidationError as e:  # pragma: no cover - a stdlib rendering fault
        raise ValidationError("headers", f"rendered message: {e.reason}") from None
    if _first_long_line(body.replace(b"\r\n", b"\n")):  # pragma: no cover
        raise ValidationError("headers", f"rendered message has a line over {MAX_LINE_OCTETS} "
                              "octets")
    return body, sender, tuple(n for n, _ in added)


def _render_mime(added: list[tuple[str, str]], from_: list, to: list, cc: list,
                 reply_to: list, subject: str | None, extra: dict[str, str], text: str | None,
                 html: str | None, smtputf8: bool, now: float) -> bytes:
    """A structured message rendered by the stdlib's ``email`` package."""
    # policy SMTP: CRLF line ends, RFC 2047 encoded words for non-ASCII header text, folding at
    # 78. Without SMTPUTF8 the body is kept 7-bit too (quoted-printable/base64), so the message
    # can be relayed to any server, 8BITMIME (RFC 6152) or not.
    policy = email_policy.SMTPUTF8 if smtputf8 else email_policy.SMTP.clone(cte_type="7bit")
    msg = EmailMessage(policy=policy)
    for name, value in added:
        msg[name] = value
    msg["From"] = from_
    if to:
        msg["To"] = to
    if cc:
        msg["Cc"] = cc
    if reply_to:
        msg["Reply-To"] = reply_to
    if subject is not None:
        msg["Subject"] = subject
    for name, value in extra.items():
        msg[name] = value
        defects = getattr(msg[name], "defects", ())
        if defects:
            raise ValidationError(f"headers[{name!r}]", f"invalid value: {defects[0]}")
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
            for part in msg.iter_parts():
                del part["MIME-Version"]  # RFC 2045 §4: only the top-level entity needs it
            # The stdlib would draw the boundary from `random`; use a fresh ULID (80 bits from
            # `secrets`) instead: unguessable, so no body can contain it (RFC 2046 §5.1.1),
            # and "=_" cannot even start a line of quoted-printable or base64 text.
            msg.set_boundary(f"=_raymta_{new_message_id(now)}")
    else:
        msg.set_content(html, subtype="html")
    return bytes(msg)


# What _render_plain takes: text the stdlib would write unchanged (no quoting, encoded words,
# folding or transfer encoding), so both renderings are the same bytes
# (tests/test_message_render.py compares them).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9]+(?: [A-Za-z0-9]+)*")
_PLAIN_LOCAL = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*")
_PLAIN_DOMAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_PLAIN_SUBJECT = re.compile(r"[A-Za-z0-9!#$%&'*+,./:;<>@\[\]^_`{|}~-]+"
                            r"(?: [A-Za-z0-9!#$%&'*+,./:;<>@\[\]^_`{|}~-]+)*")
_PLAIN_BODY = re.compile(r"[\t\n\x20-\x7e]+")
_PLAIN_HEADER_LINE = 78     # the policy's max_line_length: longer lines would be folded


def _plain_addresses(addrs: list) -> str | None:
    out = []
    for a in addrs:
        if isinstance(a, Group) or not _PLAIN_LOCAL.fullmatch(a.username) or \
                not _PLAIN_DOMAIN.fullmatch(a.domain):
            return None
        name = a.display_name
        if name and not _PLAIN_NAME.fullmatch(name):
            return None
        out.append(f"{name} <{a.username}@{a.domain}>" if name else f"{a.username}@{a.domain}")
    return ", ".join(out)


def _render_plain(added: list[tuple[str, str]], from_: list, to: list, cc: list,
                  reply_to: list, subject: str | None, text: str | None,
                  html: str | None) -> bytes | None:
    """The common structured message — plain addresses, a short ASCII subject, one short-lined
    ASCII text or HTML part — written directly, as the stdlib writes it at ~1/20 of the cost
    (~1 ms a message there: the HTTP API's bottleneck); None when it is not that message."""
    if (text is None) == (html is None):
        return None                  # none (not reached) or both: multipart/alternative
    content = text if text is not None else html
    assert content is not None
    if not content or "=?" in (subject or "") or not _PLAIN_BODY.fullmatch(content):
        return None
    lines = content.encode("ascii").splitlines()
    if max(map(len, lines)) > _PLAIN_HEADER_LINE:
        return None                  # quoted-printable
    fields = list(added)
    for name, addrs in (("From", from_), ("To", to), ("Cc", cc), ("Reply-To", reply_to)):
        if addrs:
            value = _plain_addresses(addrs)
            if value is None:
                return None
            fields.append((name, value))
    if subject is not None:
        if not _PLAIN_SUBJECT.fullmatch(subject):
            return None
        fields.append(("Subject", subject))
    head = "".join(f"{n}: {v}\r\n" for n, v in fields)
    if any(len(n) + 2 + len(v) > _PLAIN_HEADER_LINE for n, v in fields):
        return None
    kind = "plain" if text is not None else "html"
    head += (f'Content-Type: text/{kind}; charset="utf-8"\r\n'
             "Content-Transfer-Encoding: 7bit\r\nMIME-Version: 1.0\r\n\r\n")
    return head.encode("ascii") + b"\r\n".join(lines) + b"\r\n"


def _extra_headers(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError("headers", f"must be a dict of header name to value, not "
                              f"{_type(value)}")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name, v in value.items():
        if not isinstance(name, str):
            raise ValidationError("headers", f"header names must be strings, not {_type(name)} "
                                  f"({name!r})")
        field = f"headers[{name!r}]"
        if not name:
            raise ValidationError(field, "empty header name")
        for ch in name:
            # RFC 5322 §2.2 / §3.6.8: field-name = 1*ftext, printable US-ASCII except ":"
            if ch in _INJECTION_NAMES:
                raise ValidationError(field, f"header name contains {_INJECTION_NAMES[ch]} "
                                      "(header injection)")
            if ch == ":":
                raise ValidationError(field, "header name contains ':' (RFC 5322 §2.2)")
            if ch.isspace():
                raise ValidationError(field, "header name contains whitespace (RFC 5322 §2.2)")
            if not "!" <= ch <= "~":
                raise ValidationError(field, f"header name contains {ch!r}: only printable "
                                      "ASCII is allowed (RFC 5322 §2.2)")
        key = name.lower()
        if key in _RESERVED_HEADERS:
            raise ValidationError(field, f"not allowed here: {_RESERVED_HEADERS[key]}")
        if key in seen:
            raise ValidationError(field, f"duplicate of header {seen[key]!r} (names are "
                                  "case-insensitive)")
        seen[key] = name
        if not isinstance(v, str):
            raise ValidationError(field, f"value must be a string, not {_type(v)}")
        _check_text(v, field)
        if key == "message-id" and not _MSG_ID.match(v.strip()):
            raise ValidationError(field, f"not a msg-id '<id@domain>' (RFC 5322 §3.6.4): {v!r}")
        if key == "date":
            try:
                ok = parsedate_to_datetime(v) is not None
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValidationError(field, f"not an RFC 5322 date-time (§3.3): {v!r}")
        out[name] = v
    return out
