"""SMTP submission ingress: senders hand raymta mail over SMTP instead of the Python API.

Owns the SMTP listeners of one process (one asyncio loop in a thread of its own) and their
sessions: an :class:`asyncio.Protocol` per connection over :mod:`cluster.core.smtp_reader`
(framing without I/O), replies to pipelined commands (RFC 2920) sent in one write; submission with STARTTLS (RFC 6409, port 587) and submissions over implicit TLS (RFC 8314,
port 465), AUTH PLAIN and LOGIN offered only once the session is encrypted (RFC 4954 §4),
what an authenticated user may do (:mod:`cluster.core.submission`: its sender domains in the
envelope and the From/Sender fields, per-IP and per-user connection and message-rate limits),
the ``Received:`` field it prepends (RFC 5321 §4.4) and the hop count that stops a loop
(554 5.4.6). Every DATA ends in :meth:`cluster.client.MailCluster.submit_prepared` — the
Python client's submit after its validation, which :func:`cluster.core.message.prepare_parsed`
makes here with the addresses MAIL and RCPT parsed (the same result, the same errors, without
parsing them twice) — through a :class:`cluster.submit_batcher.SubmitBatcher`, so concurrent
sessions share commits (awaited on the listener's own loop), and is answered 250 only after
that call returned accepted, i.e. once
the message is on disk on a quorum of its shard's copies ("accepted means durable").

Reply policy (RFC 5321 §4.2.1): a refusal the result marks ``retryable`` (no quorum, a leader
starting, queue full, outcome unknown, the cluster unreachable) is a 4xx so the sending MTA
keeps the message and retries; a 5xx only for a message raymta will never take (bad address,
a domain the user may not use, a loop, too big). The flags decide, never the error text.

Never an open relay: without authentication configured a listener refuses to start on any
address but loopback (:class:`IngressError`), and with it nothing is accepted before AUTH
(530 5.7.0 on MAIL, RCPT and DATA). Passwords are checked off the loop (scrypt takes ~50 ms)
and appear in no log line, error or repr (nothing logs what a client sends).

Behind a TCP load balancer (docs: README "Behind a load balancer"), any listener — STARTTLS
or implicit TLS — may require the PROXY protocol (v1 or v2, ``[ingress] proxy_protocol``;
:mod:`cluster.adapters.proxy_listen`): a connection from outside ``proxy_networks``, or one
whose first bytes are not a valid header, is logged and closed before the greeting (on 465
before the TLS handshake, which follows the header); the client address the header carries
is the one the per-IP limits, the ``Received:`` field and the logs use. A LOCAL header (the
balancer's own health check) keeps the connection's own address.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import ipaddress
import logging
import random
import re
import ssl
import threading
import time
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from cluster.adapters.proxy_listen import ProxyGate, ProxyListener
from cluster.client import SubmitResult
from cluster.config import IngressConfig, load_users_file
from cluster.core.addresses import Address, AddressError, parse_address
from cluster.core.message import ValidationError, prepare_parsed
from cluster.core.smtp_reader import Body, Line, LineTooLong, SmtpReader
from cluster.core.submission import (
    LimitBook,
    SubmissionUser,
    UserTable,
    completion_fields,
    domain_allowed,
    envelope_domain,
    header_sender_problem,
    received_header,
    scan_header,
)
from cluster.submit_batcher import SubmitBatcher

__all__ = ["IngressError", "Listener", "SmtpIngress", "reply_for_refusal", "tls_context"]

log = logging.getLogger("raymta.ingress")
#: failed AUTH attempts a session gets before it is closed (421)
MAX_AUTH_FAILURES = 3


class IngressError(RuntimeError):
    """A listener cannot start as configured (the message says why and what to change)."""


@dataclass(frozen=True)
class Listener:
    """One listening socket: ``mode`` is "starttls" (587), "implicit" (465) or "plain";
    ``proxy``: every connection must start with a PROXY protocol header."""

    host: str
    port: int
    mode: str = "starttls"
    proxy: bool = False


def reply_for_refusal(res: Any) -> str:
    """The SMTP reply for a submission raymta did not accept: a 4xx when the result says it
    may pass later (``retryable``: no quorum, a leader starting, queue full, outcome unknown),
    so the sending MTA keeps the message and retries (RFC 5321 §4.2.1); a 5xx only for a
    message that raymta will never take."""
    err = (res.error or "refused").replace("\r", " ").replace("\n", " ")
    if res.retryable:
        # RFC 3463 X.3.0: other or undefined mail system status (ours, not the message's)
        return f"451 4.3.0 {err}"
    # RFC 3463 X.6.0: other or undefined media error (the message itself is wrong)
    return f"554 5.6.0 {err}"


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for ``cert_file``/``key_file`` (TLS 1.2 at least, RFC 8314 §4.1)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


#: seeded from os.urandom once: a getrandom() system call per message was 2.6 % of the
#: listener's samples (py-spy); the ids need to be unlikely to collide, not unpredictable
_ids = random.Random()


def _txid() -> str:
    """A queue id: the time in microseconds and 24 random bits (also the Message-ID's token
    when the message has none, so it must not repeat across listeners)."""
    return f"{time.time_ns() // 1000:X}{_ids.getrandbits(24):06X}"


def _new_loop() -> asyncio.AbstractEventLoop:
    """The listeners' own loop (in a thread of their own, never Ray's): uvloop, as the
    ingress actor got anyway (Ray's worker installs uvloop's event-loop policy), so that
    ``raymta listen`` and the in-process tests run the loop production runs."""
    import uvloop
    return uvloop.new_event_loop()


#: ``<local@domain>`` with a dot-atom local part and an LDH domain: the address of nearly every
#: MAIL and RCPT, read without the RFC 5322 parser of :mod:`email` (~15 % of the listener's
#: CPU at load, py-spy); anything else still goes through it
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SIMPLE_ADDRESS = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)>")


#: what a client may send before STARTTLS on a listener that requires it (RFC 3207 §4)
_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})
#: longest command line without its line end: 512 (RFC 5321 §4.5.3.1.4), MAIL's longer by
#: what SIZE and SMTPUTF8 add in ESMTP (RFC 1870, RFC 6531), AUTH's 12288 (RFC 4954 §4)
_COMMAND_LINE, _MAIL_LINE, _AUTH_LINE = 512, 512 + 26 + 10, 12288
#: unknown commands a session may send before it is closed
_BOGUS_LIMIT = 5
#: bytes a session waiting for its commit or a password check may hold before its socket
#: stops being read (a pipelining client, or one that does not wait)
_MAX_BUFFERED = 1 << 20
_USERNAME, _PASSWORD = "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"   # "Username:", "Password:"


def _address(text: str) -> tuple[str | None, str]:
    """(address, the parameters after it) of a MAIL or RCPT argument; None: malformed."""
    m = _SIMPLE_ADDRESS.match(text)
    if m is not None:
        return m.group(1), text[m.end():]
    if not text:
        return "", ""
    try:
        addr, rest = (get_angle_addr if text.startswith("<") else get_addr_spec)(text)
    except HeaderParseError:
        return None, ""
    return addr.addr_spec, str(rest)


def _params(options: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters (RFC 5321 §4.1.2 esmtp-param), None if one is malformed."""
    out: dict[str, str | bool] = {}
    for p in options:
        key, eq, value = p.partition("=")
        if not key.isalnum() or (eq and not value):
            return None
        out[key] = value if eq else True
    return out


def _b64(text: bytes | str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


class _Session(asyncio.Protocol):
    """One SMTP session: a :class:`SmtpReader` frames what the client sends, each command is
    answered in order, and the replies to one read go out in one write (so a pipelining
    client, RFC 2920, costs one send per batch of commands). While the session waits — for the
    commit of its message, a password check, a TLS handshake — it reads on but processes
    nothing, and stops reading once :data:`_MAX_BUFFERED` bytes wait."""

    def __init__(self, ingress: SmtpIngress, listener: Listener,
                 client: tuple[str, int] | None = None) -> None:
        self.ingress = ingress
        self.listener = listener
        #: the client a PROXY header named (cluster/adapters/proxy_listen.py), else None
        self.client = client
        self.require_starttls = listener.mode == "starttls" and ingress.auth_required
        self.transport: asyncio.Transport | None = None
        self.reader = SmtpReader(max_line=_AUTH_LINE)
        self.user: SubmissionUser | None = None
        self.peer_ip = "?"
        self.helo = ""                  # the last HELO/EHLO name ("": none yet)
        self.esmtp = False
        self.tls: ssl.SSLObject | None = None
        self.mail_from: str | None = None
        self.sender: Address | None = None     # mail_from as parsed (given to the client)
        self.mail_options: list[str] = []
        self.smtputf8 = False
        self.rcpts: list[str] = []
        self.rcpt_addresses: list[Address] = []  # rcpts as parsed
        self.last_active = time.monotonic()
        self._out: list[bytes] = []
        self._busy = False              # waiting for a commit, a password check, TLS
        self._closing = False
        self._paused = False
        self._write_paused = False
        self._auth: tuple[str, bytes | None] | None = None   # (mechanism, login) in progress
        self._auth_failures = 0
        self._bogus = 0
        self._counted = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # an asyncio or uvloop transport (uvloop's are not asyncio.Transport subclasses)
        self.transport = transport  # type: ignore[assignment]
        # asked once: get_running_loop() makes a getpid() system call each time (strace)
        self._loop = asyncio.get_running_loop()
        ing = self.ingress
        ing.sessions.add(self)
        peer = self.client or transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "?"
        ing.count("connections")
        # implicit TLS (465): encrypted from the first byte (AUTH offered, STARTTLS not)
        self.tls = transport.get_extra_info("ssl_object")
        refusal = ing.limits.open_ip(self.peer_ip)
        reason = refusal.reason if refusal is not None else None
        self._counted = refusal is None
        if reason is None and ing.draining:
            reason = "node draining"
            ing.count("refused_draining")
        if reason is not None:
            # RFC 5321 §3.8: a server that cannot serve a client now says 421 and closes
            self._reply(f"421 4.7.0 {ing.hostname} {reason}; try again later")
            self._close()
            return
        self._reply(f"220 {ing.hostname} ESMTP raymta")
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return
        self.transport = None
        self._closing = True
        self.ingress.sessions.discard(self)
        if self._counted:
            self._counted = False
            self.ingress.limits.close_ip(self.peer_ip)
        if self.user is not None:
            self.ingress.limits.logout(self.user.name)
            self.user = None

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        if not self._busy and not self._write_paused:
            self._run()
        elif self.reader.buffered > _MAX_BUFFERED and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        # a client that sends commands but reads no replies: answer nothing more until it does
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._busy:
            self._run()

    def eof_received(self) -> bool | None:
        return None                      # close (a half-closed client sends nothing more)

    def _run(self) -> None:
        """Answer every complete command (or body) read so far, unless waiting."""
        reader = self.reader
        self.last_active = time.monotonic()
        while not self._busy and not self._closing and not self._write_paused:
            ev = reader.next_event()
            if ev is None:
                break
            if isinstance(ev, Line):
                if self._auth is not None:
                    self._auth_response(ev.text)
                else:
                    self._command(ev.text)
            elif isinstance(ev, Body):
                self._message(ev.content)
            elif isinstance(ev, LineTooLong):
                self._auth = None
                self._reply("500 Command line too long")
            else:                        # BodyRefused
                self._reset()
                self._reply("552 Error: Too much mail data" if ev.reason == "size" else
                            "500 Line too long (see RFC5321 4.5.3.1.6)")
        self._flush()
        if self._paused and not self._busy and not self._write_paused and self.transport:
            self._paused = False
            self.transport.resume_reading()

    def _reply(self, text: str) -> None:
        self._out.append(text.encode("utf-8", "replace") + b"\r\n")

    def _flush(self) -> None:
        if self._out and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _close(self) -> None:
        self._flush()
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def idle_timeout(self) -> None:
        log.info("SMTP session from %s idle too long: closed", self.peer_ip)
        self._reply(f"421 4.4.2 {self.ingress.hostname} idle too long, closing")
        self._close()

    def _reset(self) -> None:
        self.mail_from = None
        self.sender = None
        self.mail_options = []
        self.smtputf8 = False
        self.rcpts = []
        self.rcpt_addresses = []

    def tls_info(self) -> tuple[str | None, str | None]:
        if self.tls is None:
            return None, None
        cipher = self.tls.cipher()
        return self.tls.version(), cipher[0] if cipher else None

    # ------------------------------------------------------------------ commands
    def _command(self, line: bytes) -> None:
        verb_b, _, arg_b = line.partition(b" ")
        try:
            verb = verb_b.decode("ascii").upper()
        except UnicodeDecodeError:
            verb = ""
        if not verb:
            return self._reply("500 Error: bad syntax")
        limit = _MAIL_LINE if verb == "MAIL" and self.esmtp else \
            _AUTH_LINE if verb == "AUTH" else _COMMAND_LINE
        if len(line) > limit:
            return self._reply("500 Command line too long")
        if self.require_starttls and self.tls is None and verb not in _BEFORE_STARTTLS:
            return self._reply("530 Must issue a STARTTLS command first")
        method = _COMMANDS.get(verb)
        if method is None:
            self._bogus += 1
            if self._bogus >= _BOGUS_LIMIT:
                self._reply("502 5.5.1 Too many unrecognized commands, goodbye.")
                return self._close()
            return self._reply(f'500 Error: command "{verb}" not recognized')
        method(self, arg_b.strip().decode("utf-8", "surrogateescape"))

    def _refused_before_transaction(self) -> bool:
        if not self.helo:
            self._reply("503 Error: send HELO first")
            return True
        if self.ingress.auth_required and self.user is None:
            self._reply("530 5.7.0 Authentication required")
            return True
        return False

    def smtp_HELO(self, arg: str) -> None:
        if not arg:
            return self._reply("501 Syntax: HELO hostname")
        self._reset()
        self.helo, self.esmtp = arg, False
        self._reply(f"250 {self.ingress.hostname}")

    def smtp_EHLO(self, arg: str) -> None:
        if not arg:
            return self._reply("501 Syntax: EHLO hostname")
        self._reset()
        self.helo, self.esmtp = arg, True
        ing = self.ingress
        lines = [ing.hostname, f"SIZE {ing.max_size}", "8BITMIME", "SMTPUTF8", "PIPELINING"]
        if self.listener.mode == "starttls" and ing._tls is not None and self.tls is None:
            lines.append("STARTTLS")
        if self.tls is not None and len(ing.users):   # RFC 4954 §4: AUTH only encrypted
            lines.append("AUTH LOGIN PLAIN")
        lines.append("HELP")
        self._reply("\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")

    def smtp_NOOP(self, arg: str) -> None:
        self._reply("250 OK")

    def smtp_RSET(self, arg: str) -> None:
        if arg:
            return self._reply("501 Syntax: RSET")
        self._reset()
        self._reply("250 OK")

    def smtp_QUIT(self, arg: str) -> None:
        if arg:
            return self._reply("501 Syntax: QUIT")
        self._reply("221 Bye")
        self._close()

    def smtp_HELP(self, arg: str) -> None:
        self._reply("250 Supported commands: " + " ".join(sorted(_COMMANDS)))

    def smtp_VRFY(self, arg: str) -> None:
        if self.ingress.auth_required and self.user is None:
            return self._reply("530 5.7.0 Authentication required")
        self._reply("252 Cannot VRFY user, but will accept message and attempt delivery"
                    if arg else "501 Syntax: VRFY <address>")

    def smtp_EXPN(self, arg: str) -> None:
        self._reply("502 EXPN not implemented")

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            return self._reply("501 Syntax: STARTTLS")
        ctx = self.ingress._tls if self.listener.mode == "starttls" else None
        if ctx is None or self.tls is not None:
            return self._reply("454 TLS not available")
        self._reply("220 Ready to start TLS")
        self._flush()
        self.reader.discard()          # RFC 3207 §4.2: nothing sent before the handshake
        self._busy = True
        asyncio.get_running_loop().create_task(self._starttls(ctx))

    async def _starttls(self, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        old = self.transport
        assert old is not None
        try:
            new = await loop.start_tls(old, self, ctx, server_side=True,
                                       ssl_handshake_timeout=self.ingress.settings.command_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError) as e:
            log.info("STARTTLS with %s failed: %s", self.peer_ip, e)
            old.close()
            self.connection_lost(None)
            return
        if self._closing or new is None:
            return
        self.transport = new
        self.tls = new.get_extra_info("ssl_object")
        # RFC 3207 §4.2: forget what the client said before (its EHLO name included)
        self.helo, self.esmtp = "", False
        self._reset()
        self._busy = False
        self._run()

    # ------------------------------------------------------------------ AUTH (RFC 4954)
    def smtp_AUTH(self, arg: str) -> None:
        if not self.helo:
            return self._reply("503 Error: send EHLO first")
        if not self.esmtp:
            return self._reply("500 Error: command 'AUTH' not recognized")
        if self.tls is None:
            return self._reply("538 5.7.11 Encryption required for requested "
                               "authentication mechanism")
        if self.user is not None:
            return self._reply("503 Already authenticated")
        if self.mail_from is not None:
            return self._reply("503 5.5.1 AUTH not permitted during a mail transaction")
        args = arg.split()
        if not args:
            return self._reply("501 Not enough value")
        if len(args) > 2:
            return self._reply("501 Too many values")
        mech = args[0].upper()
        if mech not in ("PLAIN", "LOGIN") or not len(self.ingress.users):
            return self._reply("504 5.5.4 Unrecognized authentication type")
        if len(args) == 1:
            self._auth = (mech, None)
            return self._reply("334 " if mech == "PLAIN" else _USERNAME)
        initial = _b64(args[1])
        if initial is None:
            return self._reply("501 5.5.2 Can't decode base64")
        if mech == "PLAIN":
            return self._plain(initial)
        self._auth = ("LOGIN", initial)
        self._reply(_PASSWORD)

    def _auth_response(self, line: bytes) -> None:
        mech, login = self._auth or ("", None)
        self._auth = None
        blob = line.strip()
        if blob == b"*":
            return self._reply("501 5.7.0 Auth aborted")
        data = _b64(blob)
        if data is None:
            return self._reply("501 5.5.2 Can't decode base64")
        if mech == "PLAIN":
            return self._plain(data)
        if login is None:
            self._auth = ("LOGIN", data)
            return self._reply(_PASSWORD)
        self._check(login, data)

    def _plain(self, data: bytes) -> None:
        parts = data.split(b"\0")       # authzid NUL authcid NUL passwd (RFC 4616 §2)
        if len(parts) != 3:
            return self._reply("501 5.5.2 Can't split auth value")
        self._check(parts[1], parts[2])

    def _check(self, login: bytes, password: bytes) -> None:
        # scrypt takes ~50 ms: off the loop
        self._busy = True
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self.ingress.users.authenticate, login, password)
        fut.add_done_callback(functools.partial(self._checked, login))

    def _checked(self, login_b: bytes, fut: asyncio.Future[Any]) -> None:
        self._busy = False
        if self._closing:
            return
        ing = self.ingress
        login = login_b.decode("utf-8", "replace")[:64]
        try:
            user = fut.result()
        except Exception as e:   # noqa: BLE001 - a broken users table: try again later
            log.warning("AUTH for %r from %s could not be checked: %s", login, self.peer_ip,
                        type(e).__name__)
            self._reply("454 4.7.0 Temporary authentication failure")
            return self._run()
        if user is None:
            self._auth_failures += 1
            ing.count("auth_failed")
            log.warning("AUTH failed for %r from %s", login, self.peer_ip)
            if self._auth_failures >= MAX_AUTH_FAILURES:
                self._reply("421 4.7.0 too many failed authentications")
                return self._close()
            self._reply("535 5.7.8 Authentication credentials invalid")
            return self._run()
        refusal = ing.limits.login(user)
        if refusal is not None:
            # RFC 4954 §6: 454 4.7.0 temporary authentication failure
            self._reply(f"454 4.7.0 {refusal.reason}; try again later")
            return self._run()
        self.user = user
        ing.count("auth_ok")
        self._reply("235 2.7.0 Authentication successful")
        self._run()

    # ------------------------------------------------------------------ the transaction
    def _syntax(self, verb: str) -> str:
        return f"501 Syntax: {verb} <address>" + (" [SP <mail-parameters>]" if self.esmtp
                                                  else "")

    def _envelope_arg(self, arg: str, verb: str
                      ) -> tuple[str, list[str], dict[str, str | bool]] | None:
        """``arg`` of MAIL (``verb`` "MAIL FROM:") or RCPT ("RCPT TO:"): (address, the
        parameters as sent upper-cased, parsed), or None once the refusal is answered."""
        keyword = verb[verb.index(" ") + 1:]
        if arg[:len(keyword)].upper() != keyword:
            self._reply(self._syntax(verb))
            return None
        address, rest = _address(arg[len(keyword):].strip())
        if address is None:
            self._reply("553 5.1.3 Error: malformed address")
            return None
        if not rest:            # the usual case: no parameters
            if not address:
                self._reply(self._syntax(verb))
                return None
            return address, [], {}
        if not address or (rest.strip() and not self.esmtp):
            self._reply(self._syntax(verb))
            return None
        options = rest.upper().split()
        params = _params(options)
        if params is None:
            self._reply(self._syntax(verb))
            return None
        return address, options, params

    def smtp_MAIL(self, arg: str) -> None:
        if self._refused_before_transaction():
            return
        parsed = self._envelope_arg(arg, "MAIL FROM:")
        if parsed is None:
            return
        address, options, params = parsed
        if self.mail_from is not None:
            return self._reply("503 Error: nested MAIL command")
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            return self._reply("501 Error: BODY can only be one of 7BIT, 8BITMIME")
        utf8 = params.pop("SMTPUTF8", False)
        if utf8 is not True and utf8 is not False:
            return self._reply("501 Error: SMTPUTF8 takes no arguments")
        size = params.pop("SIZE", None)
        if size is not None:
            if size is True or not str(size).isdigit():
                return self._reply(self._syntax("MAIL FROM:"))
            if int(size) > self.ingress.max_size:
                return self._reply("552 Error: message size exceeds fixed maximum message "
                                   "size")
        if params:
            return self._reply("555 MAIL FROM parameters not recognized or not implemented")
        ing = self.ingress
        sender = ing.senders.get((address, utf8))
        if sender is None:
            try:
                sender = parse_address(address, field="sender", allow_empty=True,
                                       allow_smtputf8=utf8)
            except AddressError as e:
                return self._reply(f"553 5.1.7 {e}")
            if len(ing.senders) >= 256:      # bounded: the last senders seen
                ing.senders.clear()
            ing.senders[(address, utf8)] = sender
        user = self.user
        if user is not None:
            dom = envelope_domain(address)
            if not dom or not domain_allowed(dom, user.domains):
                ing.count("refused_sender")
                return self._reply(f"550 5.7.1 sender <{address}>: user {user.name} may not "
                                   f"send as {dom or 'the null sender'}")
        refusal = ing.limits.take_message(self.peer_ip, user, time.monotonic())
        if refusal is not None:
            ing.count("rate_limited")
            return self._reply(f"450 4.7.1 {refusal.reason}; try again in "
                               f"{max(1, round(refusal.retry_after))} s")
        self.mail_from, self.mail_options, self.smtputf8 = address, options, utf8
        self.sender = sender
        self._reply("250 2.1.0 OK")

    def smtp_RCPT(self, arg: str) -> None:
        if self._refused_before_transaction():
            return
        if self.mail_from is None:
            return self._reply("503 Error: need MAIL command")
        parsed = self._envelope_arg(arg, "RCPT TO:")
        if parsed is None:
            return
        address, _, params = parsed
        if params:
            return self._reply("555 RCPT TO parameters not recognized or not implemented")
        limit = self.ingress.max_recipients
        if len(self.rcpts) >= limit:
            # RFC 5321 §4.5.3.1.10: 452, and the client sends the rest in another transaction
            return self._reply(f"452 4.5.3 too many recipients (limit {limit})")
        try:
            parsed_rcpt = parse_address(address, field="recipient",
                                        allow_smtputf8=self.smtputf8)
        except AddressError as e:
            return self._reply(f"553 5.1.3 {e}")
        self.rcpts.append(address)
        self.rcpt_addresses.append(parsed_rcpt)
        self._reply("250 2.1.5 OK")

    def smtp_DATA(self, arg: str) -> None:
        if self._refused_before_transaction():
            return
        if not self.rcpts:
            return self._reply("503 Error: need RCPT command")
        if arg:
            return self._reply("501 Syntax: DATA")
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        self.reader.begin_data(self.ingress.max_size)

    def _message(self, raw: bytes) -> None:
        """A whole body: checked, given its Received field, then queued (replied when the
        commit carrying it returned)."""
        ing = self.ingress
        scan = scan_header(raw)     # hops, Date, Message-ID: one pass over the header
        if scan.hops >= ing.max_hops:
            ing.count("refused_loop")
            self._reset()
            return self._reply(f"554 5.4.6 too many hops: {scan.hops} Received fields (limit "
                               f"{ing.max_hops}); a mail loop?")
        user = self.user
        if user is not None:
            problem = header_sender_problem(raw, user.domains)
            if problem:
                ing.count("refused_sender")
                self._reset()
                return self._reply(f"550 5.7.1 {problem}")
        txid = _txid()
        version, cipher = self.tls_info()
        rcpts = self.rcpts
        now = time.time()
        received = received_header(
            helo=self.helo, peer_ip=self.peer_ip, by=ing.hostname, queue_id=txid, now=now,
            tls_version=version, cipher=cipher, user=user.name if user else None,
            for_rcpt=rcpts[0] if len(rcpts) == 1 else None)
        added = completion_fields(raw, now=now, token=txid, domain=ing.hostname, scan=scan)
        assert self.sender is not None
        try:
            # what MailCluster.submit's validation would make of it, without parsing the
            # addresses MAIL and RCPT parsed again (the message gets every check)
            msg = prepare_parsed(self.sender, self.rcpt_addresses, received + added + raw,
                                 smtputf8=self.smtputf8, dsn=ing.dsn, now=now,
                                 max_size=ing.queue_max_size)
        except ValidationError as e:
            self._reset()
            ing.count("refused")
            return self._reply(reply_for_refusal(SubmitResult(0, error=str(e))))
        self._reset()
        self._busy = True
        assert self._loop is not None
        fut = ing.batcher.enqueue(msg, self._loop)
        fut.add_done_callback(functools.partial(self._queued, txid))

    def _queued(self, txid: str, fut: asyncio.Future[Any]) -> None:
        self._busy = False
        if self._closing:
            return
        ing = self.ingress
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if exc is not None:       # cluster unreachable, timeout: the sender must retry
            log.warning("submission %s failed: %s", txid, exc)
            ing.count("tempfail")
            self._reply(f"451 4.3.0 raymta could not queue the message, try again later: "
                        f"{exc}".replace("\r", " ").replace("\n", " "))
            return self._run()
        res = fut.result()
        if res.accepted:
            ing.count("accepted")
            n = len(res.ids)
            self._reply(f"250 2.0.0 queued as {res.ids[0]}" +
                        (f" (+{n - 1} more recipients)" if n > 1 else ""))
        else:
            ing.count("tempfail" if res.retryable else "refused")
            self._reply(reply_for_refusal(res))
        self._run()


_COMMANDS: dict[str, Any] = {name[5:]: fn for name, fn in vars(_Session).items()
                             if name.startswith("smtp_")}

class SmtpIngress:
    """SMTP listeners that queue what they receive into raymta.

    ``SmtpIngress(mc, host, port)``: one plain listener without AUTH, allowed on loopback
    only (``raymta listen``). ``SmtpIngress.from_config(mc, cfg.ingress)``: the configured
    submission (STARTTLS) and submissions (TLS) listeners with AUTH."""

    def __init__(self, mc: Any, host: str = "127.0.0.1", port: int = 2525, *,
                 hostname: str = "raymta", max_size: int | None = None,
                 settings: IngressConfig | None = None,
                 listeners: list[Listener] | None = None) -> None:
        self.mc = mc
        s = settings or IngressConfig(auth=False)
        self.settings = s
        self.hostname = s.hostname if settings is not None else hostname
        self.listeners = listeners if listeners is not None else [Listener(host, port, "plain")]
        self.auth_required = s.auth
        self.max_recipients = s.max_recipients
        self.max_hops = s.max_hops
        self.max_size = max_size or s.max_message_size or mc.cfg.queue.max_message_size
        #: a bounce or expiry sends a DSN to the envelope sender ([dsn] smtp)
        self.dsn = mc.cfg.dsn.smtp
        #: the limit MailCluster.submit checks a message's final bytes against
        self.queue_max_size = mc.cfg.queue.max_message_size
        #: (MAIL address, SMTPUTF8) -> the sender as parsed: most sessions send as one
        #: sender, and each message asked parse_address again (bounded: 256, then cleared)
        self.senders: dict[tuple[str, bool], Address] = {}
        #: set while this node is drained (``raymta drain``): a new connection gets 421
        #: and is closed, so senders and a load balancer go to another node; sessions
        #: already open go on
        self.draining = False
        self.counters: dict[str, int] = {}
        self._tls: ssl.SSLContext | None = None
        self.users = UserTable()
        self.load_users()
        if s.cert_file:
            self._tls = tls_context(s.cert_file, s.key_file)
        for li in self.listeners:
            if li.mode not in ("plain", "starttls", "implicit"):
                raise IngressError(f"listener {li.host}:{li.port}: unknown mode {li.mode!r}")
            if li.mode != "plain" and self._tls is None:
                raise IngressError(f"listener {li.host}:{li.port} ({li.mode}) needs a "
                                   "certificate: set ingress.cert_file and ingress.key_file")
            if not self.auth_required and not _is_loopback(li.host):
                raise IngressError(
                    f"refusing to listen on {li.host}:{li.port} without authentication: "
                    "anyone who reaches it could send as anyone (an open relay). Listen on "
                    "127.0.0.1, or configure [ingress] with TLS and users (docs/ingress.md)")
            if self.auth_required and li.mode == "plain":
                raise IngressError(f"listener {li.host}:{li.port}: AUTH needs TLS "
                                   "(starttls or implicit), not plain")
        if self.auth_required and not len(self.users):
            raise IngressError("authentication is required but no users are configured")
        self.proxy_gate = ProxyGate(s.proxy_networks, s.proxy_timeout,
                                    lambda: self.count("proxy_refused"))
        if any(li.proxy for li in self.listeners) and not self.proxy_gate.networks:
            raise IngressError("a listener requires the PROXY protocol but "
                               "ingress.proxy_networks is empty")
        self.limits = LimitBook(per_ip_connections=s.max_connections_per_ip,
                                per_user_connections=s.max_connections_per_user,
                                ip_rate=s.message_rate_per_ip, user_rate=s.message_rate_per_user)
        self.batcher = SubmitBatcher(self._submit, window=s.batch_window,
                                     max_items=s.batch_max, concurrency=s.batch_concurrency)
        self.addresses: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self.sessions: set[_Session] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    @classmethod
    def from_config(cls, mc: Any, settings: IngressConfig, *,
                    bind_host: str | None = None) -> "SmtpIngress":
        """``bind_host``: listen on this address instead of each configured listener's host
        (the node's own address, where one config serves several nodes)."""
        def split(a: str) -> tuple[str, int]:
            host, _, port = a.rpartition(":")
            return bind_host or host.strip("[]"), int(port)
        proxied = set(settings.proxy_protocol)
        listeners = [Listener(*split(a), "starttls", a in proxied) for a in settings.submission] \
            + [Listener(*split(a), "implicit", a in proxied) for a in settings.submissions]
        if not settings.auth:   # loopback only (checked): STARTTLS only when a cert is given
            listeners = [li if settings.cert_file or li.mode == "implicit" else
                         Listener(li.host, li.port, "plain", li.proxy) for li in listeners]
        return cls(mc, settings=settings, listeners=listeners)

    # ---------------------------------------------------------------------- configuration
    def load_users(self) -> None:
        users = list(self.settings.users)
        if self.settings.users_file:
            users.extend(load_users_file(self.settings.users_file))
        self.users = UserTable(users)

    def reload(self) -> dict[str, Any]:
        """Read the certificate, key and users file again (new sessions use them)."""
        s = self.settings
        if self._tls is not None:
            self._tls.load_cert_chain(s.cert_file, s.key_file)
        self.load_users()
        return {"users": len(self.users), "tls": self._tls is not None}

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "batches": dict(self.batcher.stats),
                "open_connections": sum(self.limits.ip_conns.values()),
                "listeners": [f"{a.mode}{'+proxy' if a.proxy else ''}:{a.host}:{a.port}"
                              for a in self.addresses]}

    async def _submit(self, msgs: list[Any]) -> list[Any]:
        # on the listener's loop: no thread blocks on the call, and no hand-off to one and
        # back per call. A short retry window: a longer failover is the sending MTA's to retry
        return await self.mc.submit_prepared_async(msgs, timeout=120.0, retry_for=5.0)

    # ---------------------------------------------------------------------- running
    def _factory(self, li: Listener, client: tuple[str, int] | None = None) -> _Session:
        return _Session(self, li, client)

    def _sweep(self) -> None:
        """Close sessions silent for ``command_timeout`` (slow or stalled clients hold a
        connection slot otherwise); a session waiting for its commit is not idle."""
        assert self._loop is not None
        timeout = self.settings.command_timeout
        now = time.monotonic()
        for sess in list(self.sessions):
            if not sess._busy and now - sess.last_active > timeout:
                sess.idle_timeout()
        self._sweeper = self._loop.call_later(min(5.0, max(0.2, timeout / 4)), self._sweep)

    def start(self) -> "SmtpIngress":
        loop = _new_loop()
        self._loop = loop
        started = threading.Event()
        errors: list[BaseException] = []

        async def serve() -> None:
            for li in self.listeners:
                tls = self._tls if li.mode == "implicit" else None
                srv: Any
                if li.proxy:     # the header first, then (465) the TLS handshake
                    srv = await ProxyListener(self.proxy_gate, li.host, li.port,
                                              functools.partial(self._factory, li),
                                              ssl=tls).start()
                else:
                    srv = await loop.create_server(lambda li=li: self._factory(li),
                                                   host=li.host, port=li.port, ssl=tls)
                self._servers.append(srv)
                port = srv.sockets[0].getsockname()[1]
                self.addresses.append(Listener(li.host, port, li.mode, li.proxy))
            self._sweep()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(serve())
            except BaseException as e:   # a port in use, an address not ours
                errors.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="raymta-smtp-ingress", daemon=True)
        self._thread.start()
        started.wait(30)
        if errors:
            self.stop()
            raise IngressError(f"cannot listen: {errors[0]}") from errors[0]
        for a in self.addresses:
            log.info("SMTP ingress listening on %s:%d (%s)", a.host, a.port, a.mode)
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None and self._thread.is_alive():
            async def shutdown() -> None:
                if self._sweeper is not None:
                    self._sweeper.cancel()
                for srv in self._servers:
                    srv.close()
                for sess in list(self.sessions):
                    if sess.transport is not None:
                        sess.transport.close()
                for t in asyncio.all_tasks():
                    if t is not asyncio.current_task():
                        t.cancel()
                # the leaders' stream connections this loop opened (awaited submit calls)
                self.mc.close_streams(loop)
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)
        if loop is not None and not loop.is_running():
            loop.close()
        self._servers = []
        self._loop = None
        self.batcher.close()

    def __enter__(self) -> "SmtpIngress":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
