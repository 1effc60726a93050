"""SMTP submission ingress: senders hand raymta mail over SMTP instead of the Python API.

Owns the SMTP listeners of one process (aiosmtpd on one asyncio loop in a thread of its own):
submission with STARTTLS (RFC 6409, port 587) and submissions over implicit TLS (RFC 8314,
port 465), AUTH PLAIN and LOGIN offered only once the session is encrypted (RFC 4954 §4),
what an authenticated user may do (:mod:`cluster.core.submission`: its sender domains in the
envelope and the From/Sender fields, per-IP and per-user connection and message-rate limits),
the ``Received:`` field it prepends (RFC 5321 §4.4) and the hop count that stops a loop
(554 5.4.6). Every DATA ends in :meth:`cluster.client.MailCluster.submit` — the same call as
the Python client — through a :class:`cluster.submit_batcher.SubmitBatcher`, so concurrent
sessions share commits, and is answered 250 only after that call returned accepted, i.e. once
the message is on disk on a quorum of its shard's copies ("accepted means durable").

Reply policy (RFC 5321 §4.2.1): a refusal the result marks ``retryable`` (no quorum, a leader
starting, queue full, outcome unknown, the cluster unreachable) is a 4xx so the sending MTA
keeps the message and retries; a 5xx only for a message raymta will never take (bad address,
a domain the user may not use, a loop, too big). The flags decide, never the error text.

Never an open relay: without authentication configured a listener refuses to start on any
address but loopback (:class:`IngressError`), and with it nothing is accepted before AUTH
(530 5.7.0 on MAIL, RCPT and DATA). Passwords are checked off the loop (scrypt takes ~50 ms)
and appear in no log line, error or repr; aiosmtpd's own debug log (which would show an AUTH
LOGIN response) is held at INFO.

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
import contextlib
import functools
import ipaddress
import logging
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from cluster.config import IngressConfig, load_users_file
from cluster.core.addresses import AddressError, parse_address
from cluster.adapters.proxy_listen import ProxyGate, ProxyListener
from cluster.core.submission import (
    LimitBook,
    completion_fields,
    SubmissionUser,
    UserTable,
    count_hops,
    domain_allowed,
    envelope_domain,
    header_sender_problem,
    received_header,
)
from cluster.submit_batcher import SubmitBatcher

__all__ = ["SmtpIngress", "IngressError", "Listener", "reply_for_refusal", "tls_context"]

log = logging.getLogger("raymta.ingress")
# aiosmtpd logs what a client answers to an AUTH LOGIN challenge (base64 of the password) at
# DEBUG, and every command line at INFO (a log record per line: measurable CPU at thousands of
# messages a second): let only its warnings through; this module logs what matters
logging.getLogger("mail.log").setLevel(max(logging.WARNING,
                                           logging.getLogger("mail.log").getEffectiveLevel()))

# aiosmtpd sets its deprecated Session.login_data itself on every successful AUTH, and says so
logging.getLogger("mail.log").addFilter(
    lambda r: not str(r.msg).startswith("Session.login_data is deprecated"))

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


def _txid() -> str:
    return f"{time.time_ns() // 1000:x}{os.urandom(3).hex()}".upper()


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when RAYMTA_INGRESS_UVLOOP=1 (measured in bench/ingress_smtp.py), else asyncio's."""
    if os.environ.get("RAYMTA_INGRESS_UVLOOP") == "1":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


#: ``<local@domain>`` with a dot-atom local part and an LDH domain: the address of nearly every
#: MAIL and RCPT, read without aiosmtpd's RFC 5322 parser (~15 % of the listener's CPU at
#: load, py-spy); anything else still goes through it
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SIMPLE_ADDRESS = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)>")


class _Submission(SMTP):
    """One SMTP session of a listener: connection limits, implicit TLS, AUTH off the loop."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _SIMPLE_ADDRESS.match(arg)
        if m is not None:
            return m.group(1), arg[m.end():]
        return super()._getaddr(arg)

    def __init__(self, ingress: "SmtpIngress", handler: "_Handler", listener: Listener,
                 client: tuple[str, int] | None = None, **kw: Any) -> None:
        super().__init__(handler, **kw)
        self.ingress = ingress
        self.listener = listener
        #: the client a PROXY header named (cluster/adapters/proxy_listen.py), else None
        self.client = client
        self.user: SubmissionUser | None = None
        self.peer_ip = "?"
        self._refused: str | None = None
        self._counted = False
        self._auth_failures = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrade = self._original_transport is not None
        super().connection_made(transport)
        if upgrade:
            return
        self.ingress.sessions.add(self)
        peer = self.client or transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "?"
        if self.client is not None and self.session is not None:
            self.session.peer = self.client  # type: ignore[assignment]
        self.ingress.count("connections")
        self._open_ip()
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            # implicit TLS (465): the session is encrypted from the first byte; aiosmtpd only
            # knows about STARTTLS, so tell it (AUTH is then offered, STARTTLS is not)
            self._tls_protocol = True  # type: ignore[assignment]
            assert self.session is not None
            self.session.ssl = {"ssl_object": sslobj}

    def _open_ip(self) -> None:
        refusal = self.ingress.limits.open_ip(self.peer_ip)
        if refusal is not None:
            self._refused = refusal.reason
        else:
            self._counted = True

    def connection_lost(self, error: Exception | None) -> None:
        self.ingress.sessions.discard(self)
        if self._counted:
            self._counted = False
            self.ingress.limits.close_ip(self.peer_ip)
        if self.user is not None:
            self.ingress.limits.logout(self.user.name)
            self.user = None
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._refused is None and self.ingress.draining:
            self._refused = "node draining"
            self.ingress.count("refused_draining")
        if self._refused is not None:
            # RFC 5321 §3.8: a server that cannot serve a client now says 421 and closes
            await self.push(f"421 4.7.0 {self.ingress.hostname} {self._refused}; try again "
                            "later")
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def tls_info(self) -> tuple[str | None, str | None]:
        ssl_info = self.session.ssl if self.session is not None else None
        obj = (ssl_info or {}).get("ssl_object")
        if obj is None:
            return None, None
        cipher = obj.cipher()
        return obj.version(), cipher[0] if cipher else None

    # AUTH: aiosmtpd's mechanisms decode the exchange and call _authenticate (synchronously);
    # that only hands the credentials back, and the scrypt check runs off the loop here.
    _PENDING = "raymta: pending"

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        return AuthResult(success=False, handled=False, auth_data=auth_data,
                          message=self._PENDING)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(_, args))

    async def _verify(self, res: AuthResult) -> AuthResult:
        if res.message != self._PENDING or not isinstance(res.auth_data, LoginPassword):
            return res
        creds: LoginPassword = res.auth_data
        loop = asyncio.get_running_loop()
        user = await loop.run_in_executor(None, self.ingress.users.authenticate,
                                          creds.login, creds.password)
        login = creds.login.decode("utf-8", "replace")[:64]
        if user is None:
            self._auth_failures += 1
            self.ingress.count("auth_failed")
            log.warning("AUTH failed for %r from %s", login, self.peer_ip)
            if self._auth_failures >= MAX_AUTH_FAILURES:
                assert self.transport is not None
                loop.call_soon(self.transport.close)
                return AuthResult(success=False, handled=False,
                                  message="421 4.7.0 too many failed authentications")
            return AuthResult(success=False, handled=False,
                              message="535 5.7.8 Authentication credentials invalid")
        refusal = self.ingress.limits.login(user)
        if refusal is not None:
            # RFC 4954 §6: 454 4.7.0 temporary authentication failure
            return AuthResult(success=False, handled=False,
                              message=f"454 4.7.0 {refusal.reason}; try again later")
        self.user = user
        self.ingress.count("auth_ok")
        return AuthResult(success=True, auth_data=user)


class _Handler:
    def __init__(self, ingress: "SmtpIngress") -> None:
        self.ingress = ingress

    async def handle_MAIL(self, server: _Submission, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        ing = self.ingress
        utf8 = "SMTPUTF8" in [o.upper() for o in mail_options]
        try:
            parse_address(address, field="sender", allow_empty=True, allow_smtputf8=utf8)
        except AddressError as e:
            return f"553 5.1.7 {e}"
        user = server.user
        if user is not None:
            dom = envelope_domain(address)
            if not dom or not domain_allowed(dom, user.domains):
                ing.count("refused_sender")
                return (f"550 5.7.1 sender <{address}>: user {user.name} may not send as "
                        f"{dom or 'the null sender'}")
        elif ing.auth_required:   # aiosmtpd answers 530 before this; never rely on it alone
            return "530 5.7.0 Authentication required"
        refusal = ing.limits.take_message(server.peer_ip, user, time.monotonic())
        if refusal is not None:
            ing.count("rate_limited")
            return (f"450 4.7.1 {refusal.reason}; try again in "
                    f"{max(1, round(refusal.retry_after))} s")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: _Submission, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if server.user is None and self.ingress.auth_required:
            return "530 5.7.0 Authentication required"
        if len(envelope.rcpt_tos) >= self.ingress.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 for too many recipients (the client sends the rest
            # in another transaction)
            return f"452 4.5.3 too many recipients (limit {self.ingress.max_recipients})"
        try:
            parse_address(address, field="recipient",
                          allow_smtputf8="SMTPUTF8" in [o.upper() for o in envelope.mail_options])
        except AddressError as e:
            return f"553 5.1.3 {e}"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _Submission, session: Session, envelope: Envelope) -> str:
        ing = self.ingress
        if server.user is None and ing.auth_required:
            return "530 5.7.0 Authentication required"
        raw: bytes = envelope.original_content or b""
        hops = count_hops(raw)
        if hops >= ing.max_hops:
            ing.count("refused_loop")
            return (f"554 5.4.6 too many hops: {hops} Received fields (limit {ing.max_hops}); "
                    "a mail loop?")
        user = server.user
        if user is not None:
            problem = header_sender_problem(raw, user.domains)
            if problem:
                ing.count("refused_sender")
                return f"550 5.7.1 {problem}"
        txid = _txid()
        version, cipher = server.tls_info()
        rcpts = list(envelope.rcpt_tos)
        received = received_header(
            helo=session.host_name or "", peer_ip=server.peer_ip, by=ing.hostname,
            queue_id=txid, now=time.time(), tls_version=version, cipher=cipher,
            user=user.name if user else None, for_rcpt=rcpts[0] if len(rcpts) == 1 else None)
        utf8 = "SMTPUTF8" in [o.upper() for o in envelope.mail_options]
        added = completion_fields(raw, now=time.time(), token=txid, domain=ing.hostname)
        msg = {"sender": envelope.mail_from or "<>", "recipients": rcpts,
               "raw": received + added + raw, "smtputf8": utf8, "dsn": ing.dsn}
        try:
            res = await ing.batcher.submit(msg)
        except Exception as e:   # cluster unreachable, timeout: the sender must retry
            log.warning("submission %s failed: %s", txid, e)
            ing.count("tempfail")
            return f"451 4.3.0 raymta could not queue the message, try again later: {e}"
        if res.accepted:
            ing.count("accepted")
            n = len(res.ids)
            return (f"250 2.0.0 queued as {res.ids[0]}" +
                    (f" (+{n - 1} more recipients)" if n > 1 else ""))
        ing.count("tempfail" if res.retryable else "refused")
        return reply_for_refusal(res)


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
        self.sessions: set[_Submission] = set()

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

    def _submit(self, msgs: list[dict[str, Any]]) -> list[Any]:
        # a short retry window: a failover longer than this is the sending MTA's to retry
        return self.mc.submit(msgs, timeout=120.0, retry_for=5.0)

    # ---------------------------------------------------------------------- running
    def _factory(self, li: Listener, client: tuple[str, int] | None = None) -> _Submission:
        starttls = li.mode == "starttls"
        return _Submission(
            self, _Handler(self), li, client, hostname=self.hostname, data_size_limit=self.max_size,
            enable_SMTPUTF8=True, decode_data=False,
            tls_context=self._tls if starttls else None,
            require_starttls=starttls and self.auth_required,
            auth_required=self.auth_required, auth_require_tls=True,
            auth_exclude_mechanism=None if len(self.users) else ["LOGIN", "PLAIN"],
            authenticator=lambda *a: None,   # replaced by _Submission._authenticate
            timeout=self.settings.command_timeout, loop=self._loop)

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
                for srv in self._servers:
                    srv.close()
                for sess in list(self.sessions):
                    if sess.transport is not None:
                        sess.transport.close()
                for t in asyncio.all_tasks():
                    if t is not asyncio.current_task():
                        t.cancel()
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
