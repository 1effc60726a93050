"""DKIM keys and the fast signer: PEM files through ``cryptography`` (OpenSSL), never pure Python.

Role: load DKIM private keys from PEM files (RSA → ``rsa-sha256``, PKCS#1 v1.5 with SHA-256,
RFC 6376 §3.3.1; Ed25519 → ``ed25519-sha256``, which signs the SHA-256 digest of the data,
RFC 8463 §3), keep them fresh when their files change (a cheap ``stat`` at most every
``reload_interval`` seconds, or an explicit :meth:`KeyRing.reload`), and sign messages with
every key of the From domain (a dual RSA + Ed25519 signature when both are configured) using
``cluster.core.dkim`` for everything but the arithmetic. A body shared by several recipients
is canonicalised and hashed once (:class:`Signer` keeps a small cache keyed by the body bytes).
Owns: the private keys of the process it runs in. Keys never leave it: reprs, errors and log
lines name a key by domain, selector, algorithm, size and file, never by its contents.
Must not: talk to the network, or write a key anywhere but :func:`write_private_key` (keygen).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from cluster.core.dkim import (
    DEFAULT_SIGN_HEADERS,
    DkimError,
    SignatureSpec,
    body_canon,
    build_signature,
    from_domain,
    is_valid_selector,
    parse_headers,
    signing_domains,
    split_message,
    wire_form,
)

__all__ = [
    "DkimKey",
    "KeyFileError",
    "KeyRing",
    "KeySource",
    "Signer",
    "config_sources",
    "dns_record",
    "generate_private_key",
    "load_private_key",
    "public_key_b64",
    "scan_key_directory",
    "signer_from_config",
    "write_private_key",
]

log = logging.getLogger("raymta.dkim")

#: RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048
RSA_MIN_BITS = 1024
RSA_GOOD_BITS = 2048
_ALG = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}


class KeyFileError(ValueError):
    """A key file that cannot be used: ``path`` and ``problem`` (never the key itself)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


# ------------------------------------------------------------------------------ key files
def load_private_key(path: str | os.PathLike[str], *, data: bytes | None = None
                     ) -> tuple[Any, str, int, list[str]]:
    """(key object, "rsa" | "ed25519", bits, warnings) from a PEM private key file.

    Raises :class:`KeyFileError` naming the file for: unreadable, not a PEM private key, an
    encrypted key (raymta holds no passphrases), a key type DKIM cannot use, RSA under 1024
    bits (RFC 8301). RSA of 1024-2047 bits loads with a warning."""
    p = str(path)
    if data is None:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise KeyFileError(p, f"cannot read: {e.strerror}") from None
    if b"ENCRYPTED" in data[:200] or b"Proc-Type: 4,ENCRYPTED" in data:
        raise KeyFileError(p, "the key is encrypted; raymta needs an unencrypted PEM key "
                              "(decrypt it with `openssl pkey -in F -out F2` and chmod 600 F2)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:   # "Password was not given but private key is encrypted"
        raise KeyFileError(p, "the key is encrypted; raymta needs an unencrypted PEM key") \
            from None
    except (ValueError, UnsupportedAlgorithm):
        # the library's message may quote the input: say only what is wrong
        raise KeyFileError(p, "not a PEM private key (expected -----BEGIN PRIVATE KEY----- "
                              "or -----BEGIN RSA PRIVATE KEY-----)") from None
    warnings: list[str] = []
    if isinstance(key, rsa.RSAPrivateKey):
        bits = key.key_size
        if bits < RSA_MIN_BITS:
            raise KeyFileError(p, f"RSA key of {bits} bits: DKIM keys must have at least "
                                  f"{RSA_MIN_BITS} (RFC 8301 §3.2); use 2048")
        if bits < RSA_GOOD_BITS:
            warnings.append(f"{p}: RSA key of {bits} bits: RFC 8301 recommends at least "
                            f"{RSA_GOOD_BITS}; some receivers treat shorter keys as weak")
        return key, "rsa", bits, warnings
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key, "ed25519", 256, warnings
    raise KeyFileError(p, f"a {type(key).__name__.replace('PrivateKey', '')} key: DKIM "
                          "signs with RSA (rsa-sha256) or Ed25519 (ed25519-sha256) only")


def public_key_b64(key: Any) -> str:
    """The p= value of the key's DNS record (RFC 6376 §3.6.1; RFC 8463 §4: the raw 32-byte
    Ed25519 public key)."""
    pub = key.public_key()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = pub.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def dns_record(key: Any) -> str:
    """The TXT record text to publish at ``<selector>._domainkey.<domain>``."""
    k = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    return f"v=DKIM1; k={k}; p={public_key_b64(key)}"


def generate_private_key(algorithm: str = "rsa", bits: int = 2048) -> Any:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm != "rsa":
        raise ValueError(f"algorithm must be rsa or ed25519, got {algorithm!r}")
    if bits < RSA_MIN_BITS:
        raise ValueError(f"RSA keys must have at least {RSA_MIN_BITS} bits (RFC 8301)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_private_key(key: Any, path: str | os.PathLike[str]) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, created with mode 0600 (never readable by
    others, even for an instant), refusing to overwrite an existing file."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ key sources
@dataclass(frozen=True)
class KeySource:
    """Where one key comes from and what its signatures say (from ``[[dkim.key]]`` or a file
    ``<key_directory>/<domain>/<selector>.<rsa|ed25519>.pem``)."""

    domain: str
    selector: str
    algorithm: str              # "rsa" | "ed25519"
    key_file: str
    headers: tuple[str, ...] = DEFAULT_SIGN_HEADERS
    expire_after: int | None = None
    identity: str | None = None


def scan_key_directory(directory: str, *, headers: tuple[str, ...] = DEFAULT_SIGN_HEADERS,
                       expire_after: int | None = None) -> list[KeySource]:
    """Key files under ``directory``: ``<domain>/<selector>.<rsa|ed25519>.pem``. Other files
    are ignored; a misnamed ``.pem`` raises :class:`KeyFileError` naming it."""
    out: list[KeySource] = []
    root = Path(directory)
    if not root.is_dir():
        raise KeyFileError(directory, "dkim.key_directory is not a directory")
    for ddir in sorted(root.iterdir()):
        if not ddir.is_dir():
            continue
        domain = ddir.name.lower().rstrip(".")
        for f in sorted(ddir.glob("*.pem")):
            parts = f.name[:-4].rsplit(".", 1)
            if len(parts) != 2 or parts[1] not in _ALG:
                raise KeyFileError(str(f), "name must be <selector>.rsa.pem or "
                                           "<selector>.ed25519.pem")
            if not is_valid_selector(parts[0]):
                raise KeyFileError(str(f), f"selector {parts[0]!r} is not made of DNS labels "
                                           "(letters, digits, inner '-', dots between)")
            out.append(KeySource(domain, parts[0], parts[1], str(f), headers, expire_after))
    return out


class DkimKey:
    """One loaded private key and what its signatures say. Its repr and str name it by
    domain, selector, algorithm, size and file; the key stays inside."""

    __slots__ = ("_key", "_sign", "bits", "mtime", "source", "spec")

    def __init__(self, source: KeySource, key: Any, bits: int, mtime: float) -> None:
        self.source = source
        self.bits = bits
        self.mtime = mtime
        self._key = key
        self.spec = SignatureSpec(domain=source.domain, selector=source.selector,
                                  algorithm=_ALG[source.algorithm],
                                  identity=source.identity, expire_after=source.expire_after,
                                  headers=source.headers)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            sign = key.sign
            self._sign = lambda data: sign(hashlib.sha256(data).digest())   # RFC 8463 §3
        else:
            pad, sha = padding.PKCS1v15(), hashes.SHA256()
            rsign = key.sign
            self._sign = lambda data: rsign(data, pad, sha)

    @classmethod
    def load(cls, source: KeySource) -> tuple[DkimKey, list[str]]:
        try:
            st = os.stat(source.key_file)
        except OSError as e:
            raise KeyFileError(source.key_file, f"cannot read: {e.strerror}") from None
        key, alg, bits, warnings = load_private_key(source.key_file)
        if alg != source.algorithm:
            raise KeyFileError(source.key_file, f"holds an {alg} key but is configured as "
                                                f"{source.algorithm}")
        return cls(source, key, bits, st.st_mtime), warnings

    def sign(self, data: bytes) -> bytes:
        return self._sign(data)

    def public_key_b64(self) -> str:
        return public_key_b64(self._key)

    def describe(self) -> dict[str, Any]:
        """What ``status`` may show about the key: never the key."""
        return {"domain": self.source.domain, "selector": self.source.selector,
                "algorithm": self.spec.algorithm, "bits": self.bits,
                "file": self.source.key_file}

    def __repr__(self) -> str:
        s = self.source
        return (f"DkimKey({s.domain}/{s.selector} {self.spec.algorithm} {self.bits} bits "
                f"from {s.key_file}, key hidden)")

    __str__ = __repr__

    def __reduce__(self) -> Any:   # never pickled into a Ray object, a log or a backup
        raise TypeError("DkimKey objects are not serialisable (they hold a private key)")


class KeyRing:
    """The keys of one process, by signing domain, reloaded when their files change.

    ``sources`` is a callable returning the current :class:`KeySource` list (the configured
    keys plus a fresh scan of the key directory), so files added to or removed from the
    directory are noticed too. :meth:`maybe_reload` costs one ``stat`` per key and one
    directory scan, at most every ``interval`` seconds; a file that fails to load keeps the
    previous key of that source (and the failure is logged, naming the file)."""

    def __init__(self, sources: Any, *, interval: float = 5.0, parent_domains: bool = True,
                 strict: bool = True) -> None:
        self._sources = sources
        self.interval = interval
        self.parent_domains = parent_domains
        self.by_domain: dict[str, list[DkimKey]] = {}
        self._keys: dict[tuple[str, str, str], DkimKey] = {}
        self._checked = 0.0
        self.generation = 0
        self.errors: list[str] = []
        self.reload(strict=strict)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._keys)} keys for {sorted(self.by_domain)})"

    def __bool__(self) -> bool:
        return bool(self._keys)

    def reload(self, *, strict: bool = False) -> list[str]:
        """Re-read every key whose file changed (or is new); drop keys no longer configured.
        Returns what changed, as text naming domain/selector (never key contents). With
        ``strict`` the first bad file raises :class:`KeyFileError`."""
        self._checked = time.monotonic()
        changed: list[str] = []
        errors: list[str] = []
        keys: dict[tuple[str, str, str], DkimKey] = {}
        try:
            sources = list(self._sources())
        except KeyFileError as e:
            if strict:
                raise
            log.warning("dkim: %s (keeping the keys loaded before)", e)
            self.errors = [str(e)]
            return []
        for src in sources:
            ident = (src.domain, src.selector, src.algorithm)
            old = self._keys.get(ident)
            try:
                mtime = os.stat(src.key_file).st_mtime
                if old is not None and old.mtime == mtime and old.source == src:
                    keys[ident] = old
                    continue
                key, warnings = DkimKey.load(src)
            except KeyFileError as e:
                if strict:
                    raise
                errors.append(str(e))
                log.warning("dkim key %s/%s: %s (%s)", src.domain, src.selector, e,
                            "keeping the key loaded before" if old else "not signing with it")
                if old is not None:
                    keys[ident] = old
                continue
            except OSError as e:
                if strict:
                    raise KeyFileError(src.key_file, f"cannot read: {e.strerror}") from None
                errors.append(f"{src.key_file}: cannot read: {e.strerror}")
                log.warning("dkim key %s/%s: cannot read %s: %s", src.domain, src.selector,
                            src.key_file, e.strerror)
                if old is not None:
                    keys[ident] = old
                continue
            for w in warnings:
                log.warning("dkim key %s/%s: %s", src.domain, src.selector, w)
            keys[ident] = key
            changed.append(f"{src.domain}/{src.selector} ({key.spec.algorithm}, {key.bits} "
                           f"bits) {'reloaded' if old else 'loaded'}")
        for ident in self._keys.keys() - keys.keys():
            changed.append(f"{ident[0]}/{ident[1]} removed")
        self.errors = errors
        if changed or keys.keys() != self._keys.keys():
            self._keys = keys
            by: dict[str, list[DkimKey]] = {}
            for k in keys.values():
                by.setdefault(k.source.domain, []).append(k)
            self.by_domain = by
            self.generation += 1
            for c in changed:
                log.info("dkim key %s", c)
        return changed

    def maybe_reload(self) -> None:
        if time.monotonic() - self._checked >= self.interval:
            self.reload()

    def keys_for(self, domain: str) -> list[DkimKey]:
        """The keys that sign mail From ``domain``: its own, else its nearest parent's (when
        parent domains are on)."""
        by = self.by_domain
        for d in signing_domains(domain, self.parent_domains):
            ks = by.get(d)
            if ks:
                return ks
        return []

    def describe(self) -> list[dict[str, Any]]:
        return [k.describe() for k in self._keys.values()]


# ------------------------------------------------------------------------------ the signer
class Signer:
    """Signs messages with the keys of their From domain (:class:`KeyRing`).

    :meth:`sign` returns the message to deliver: the DKIM-Signature fields (one per key)
    followed by the message in wire form, exactly the bytes the SMTP adapter will send.
    Caches (both bounded, LRU): the canonical body's digest per body (a body sent to many
    recipients is hashed once), and the From domain per From field."""

    def __init__(self, ring: KeyRing, *, body_cache: int = 4096,
                 body_cache_bytes: int = 64 * 1024 * 1024) -> None:
        self.ring = ring
        self._bodies: OrderedDict[bytes, bytes] = OrderedDict()
        self._body_cache = body_cache
        self._body_cache_bytes = body_cache_bytes
        self._body_bytes = 0
        self._domains: dict[bytes, str | None] = {}
        #: the signature fields of the last few messages, by (key generation, t=, bytes): the
        #: same message for several recipients within one second is signed once (RSA and
        #: Ed25519 signatures are deterministic, so this gives the very same bytes)
        self._sigs: OrderedDict[tuple[int, int, bytes], bytes] = OrderedDict()
        self._sig_cache = 256
        self._sig_bytes = 0      # message bytes held as keys (at most 16 MiB)
        self.counters = {"signed": 0, "signatures": 0, "unsigned_no_key": 0,
                         "body_hashes": 0, "body_hash_hits": 0, "signature_reuses": 0,
                         "errors": 0}

    def __repr__(self) -> str:
        return f"Signer({self.ring!r})"

    def body_hash(self, body: bytes, canon: str) -> bytes:
        """SHA-256 of the canonical body, computed once per distinct (body, canonicalisation)."""
        key = body if canon == "relaxed" else b"s" + body
        h = self._bodies.get(key)
        if h is not None:
            self._bodies.move_to_end(key)
            self.counters["body_hash_hits"] += 1
            return h
        h = hashlib.sha256(body_canon(body, canon)).digest()
        self.counters["body_hashes"] += 1
        if len(body) <= self._body_cache_bytes // 8:
            self._bodies[key] = h
            self._body_bytes += len(key)
            while len(self._bodies) > self._body_cache or \
                    self._body_bytes > self._body_cache_bytes:
                old, _ = self._bodies.popitem(last=False)
                self._body_bytes -= len(old)
        return h

    def _from_domain(self, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
        for name, value in headers:
            if len(name) == 4 and name.lower() == b"from":
                d = self._domains.get(value, "")
                if d == "":
                    d = from_domain([(name, value)])
                    if len(self._domains) > 10_000:
                        self._domains.clear()
                    self._domains[value] = d
                return d
        return None

    def signatures(self, msg: bytes, now: float, *,
                   keys: Iterable[DkimKey] | None = None) -> bytes:
        """The DKIM-Signature fields for ``msg`` (in wire form), b"" when no key applies."""
        section, body = split_message(msg)
        headers = parse_headers(section)
        if keys is None:
            domain = self._from_domain(headers)
            keys = self.ring.keys_for(domain) if domain else []
        out = []
        ts = int(now)
        for k in keys:
            spec = k.spec
            out.append(build_signature(headers, self.body_hash(body, spec.body_canon), spec,
                                       ts, k.sign))
        if out:
            self.counters["signed"] += 1
            self.counters["signatures"] += len(out)
        else:
            self.counters["unsigned_no_key"] += 1
        # several signatures: in the order the keys are listed, top down (none covers another:
        # DKIM-Signature is not in any signed-header list)
        return b"".join(out)

    def sign(self, raw: bytes, now: float, *, keys: Iterable[DkimKey] | None = None) -> bytes:
        """``raw`` signed: the signature fields, then ``raw`` in wire form. A message no key
        applies to comes back in wire form unchanged; one the signer cannot parse comes back
        unsigned too (counted in ``errors``; it is still delivered, as today)."""
        msg = wire_form(raw)
        try:
            if keys is not None or len(msg) > 1_000_000:
                return self.signatures(msg, now, keys=keys) + msg
            ck = (self.ring.generation, int(now), msg)
            sigs = self._sigs.get(ck)
            if sigs is not None:
                self.counters["signature_reuses"] += 1
                return sigs + msg
            sigs = self.signatures(msg, now)
            self._sigs[ck] = sigs
            self._sig_bytes += len(msg)
            while len(self._sigs) > self._sig_cache or self._sig_bytes > 16 * 1024 * 1024:
                (_g, _t, old), _ = self._sigs.popitem(last=False)
                self._sig_bytes -= len(old)
            return sigs + msg
        except DkimError as e:
            self.counters["errors"] += 1
            log.warning("dkim: message not signed: %s", e)
            return msg


# ------------------------------------------------------------------------------ from the config
def config_sources(dk: Any) -> Any:
    """A callable giving the current :class:`KeySource` list of a ``DkimConfig``: the listed
    ``[[dkim.key]]`` entries, then a fresh scan of ``key_directory`` (so keys added to or
    removed from the directory take effect at the next reload)."""
    def exp(v: float | None) -> int | None:
        return int(v) if v else None

    def sources() -> list[KeySource]:
        out: list[KeySource] = []
        listed: set[tuple[str, str]] = set()
        for k in dk.keys:
            if k.from_directory:
                continue
            out.append(KeySource(k.domain, k.selector, k.algorithm, k.key_file,
                                 tuple(k.headers or dk.headers),
                                 exp(k.expire_after if k.expire_after is not None
                                     else dk.expire_after), k.identity))
            listed.add((k.domain, k.selector))
        if dk.key_directory:
            out += [s for s in scan_key_directory(dk.key_directory, headers=tuple(dk.headers),
                                                  expire_after=exp(dk.expire_after))
                    if (s.domain, s.selector) not in listed]
        return out
    return sources


def signer_from_config(dk: Any, *, strict: bool = False) -> Signer | None:
    """The :class:`Signer` for a ``DkimConfig``, or None when it configures no keys at all
    (then nothing is signed and nothing costs anything)."""
    if not dk.keys and not dk.key_directory:
        return None
    ring = KeyRing(config_sources(dk), interval=dk.reload_interval,
                   parent_domains=dk.parent_domains, strict=strict)
    return Signer(ring)
