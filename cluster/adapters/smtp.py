"""SMTP client adapter: one outbound ESMTP connection over aiosmtplib, and MX host walking.

Owns: opening a connection to a site (hosts in MX preference order, each address in turn,
failing over on connect errors and 421 greetings, RFC 5321 §5.1), EHLO, STARTTLS by policy,
and one transaction per message (MAIL, RCPT, DATA) returning the raw reply of the step that
decided it. What a reply *means* is decided by ``cluster.core.replies``, not here.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Sequence

import aiosmtplib

__all__ = ["Attempt", "ConnectFailure", "SmtpConnection", "connect_site"]


@dataclass(frozen=True)
class Attempt:
    """The reply that decided one transaction: which step, code, and text."""

    phase: str          # "mail" | "rcpt" | "data" | "connection"
    code: int | None    # None when the connection broke before a reply
    text: str


class ConnectFailure(Exception):
    """No host of the site could be used. ``code``/``text`` are those of the last host tried;
    ``all_421`` tells whether every host answered 421 (the site asks us to back off)."""

    def __init__(self, code: int | None, text: str, all_421: bool, tried: list[str]) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.all_421 = all_421
        self.tried = tried


def _insecure_tls() -> ssl.SSLContext:
    # Opportunistic TLS (RFC 7435): encrypt whenever offered, without authenticating the peer;
    # MX certificates rarely match and refusing them would fall back to plaintext anyway.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_TLS_CTX: ssl.SSLContext | None = None


class SmtpConnection:
    def __init__(self, client: aiosmtplib.SMTP, host: str, address: str) -> None:
        self.client = client
        self.host = host
        self.address = address
        self.sent = 0
        self.tls = False
        self.smtputf8 = False

    @property
    def usable(self) -> bool:
        return self.client.is_connected

    async def send(self, sender: str, rcpt: str, body: bytes, smtputf8: bool = False) -> Attempt:
        """One transaction for one recipient. Never raises for a reply; a broken connection
        gives phase "connection" and the caller must not reuse this connection."""
        c = self.client
        step = "mail"
        try:
            opts: list[str] = []
            if smtputf8:
                if not self.smtputf8:
                    # RFC 6531 §3.4: no downgrade; the receiving site cannot take this message
                    return Attempt("mail", 553, "5.6.7 SMTPUTF8 required but not offered by "
                                   f"{self.host}")
                opts.append("SMTPUTF8")
            if "8bitmime" in c.esmtp_extensions:
                opts.append("BODY=8BITMIME")
            # The addresses were validated and normalised at submission: send them as they are
            # (aiosmtplib's mail()/rcpt() would re-parse every address with email.utils, ~8 %
            # of the relay's CPU per message).
            enc = "utf-8" if smtputf8 else "ascii"
            r = await c.execute_command(b"MAIL", b"FROM:<" + sender.encode(enc) + b">",
                                        *(o.encode("ascii") for o in opts))
            if r.code != 250:
                raise aiosmtplib.SMTPResponseException(r.code, r.message)
            step = "rcpt"
            r = await c.execute_command(b"RCPT", b"TO:<" + rcpt.encode(enc) + b">")
            if r.code not in (250, 251):   # 251: user not local; will forward (RFC 5321 §3.4)
                raise aiosmtplib.SMTPResponseException(r.code, r.message)
            step = "data"
            r = await c.data(body)
            self.sent += 1
            return Attempt("data", r.code, r.message)
        except aiosmtplib.SMTPResponseException as e:
            self.sent += 1
            if e.code == 421 or not c.is_connected:
                # 421: the server is closing the channel (RFC 5321 §3.8)
                await self.close(quit=False)
            else:
                try:
                    await c.rset()
                except aiosmtplib.SMTPException:
                    await self.close(quit=False)
            return Attempt(step, e.code, e.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            await self.close(quit=False)
            return Attempt("connection", None, f"connection to {self.host} [{self.address}] "
                           f"lost during {step.upper()}: {e}")

    async def close(self, quit: bool = True) -> None:
        c = self.client
        if not c.is_connected:
            return
        try:
            if quit:
                await c.quit(timeout=5)
            else:
                c.close()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            c.close()


async def _try_address(host: str, address: str, port: int, *, ehlo_name: str, bind_address: str,
                       tls: str, connect_timeout: float, command_timeout: float
                       ) -> SmtpConnection:
    global _TLS_CTX
    client = aiosmtplib.SMTP(hostname=address, port=port, local_hostname=ehlo_name,
                             source_address=(bind_address, 0) if bind_address else None,
                             timeout=command_timeout, start_tls=False, use_tls=False)
    await client.connect(timeout=connect_timeout)
    try:
        await client.ehlo()
        conn = SmtpConnection(client, host, address)
        if tls != "disabled" and client.supports_extension("starttls"):
            if _TLS_CTX is None:
                _TLS_CTX = _insecure_tls()
            await client.starttls(tls_context=_TLS_CTX, server_hostname=host)
            # RFC 3207 §4.2: forget what the server said before TLS and ask again
            await client.ehlo()
            conn.tls = True
        elif tls == "required":
            raise aiosmtplib.SMTPResponseException(
                421, f"4.7.10 {host} does not offer STARTTLS and this site requires TLS")
        conn.smtputf8 = client.supports_extension("smtputf8")
        return conn
    except BaseException:
        client.close()
        raise


async def connect_site(hosts: Sequence[tuple[int, str, Sequence[str]]], port: int, *,
                       ehlo_name: str, bind_address: str = "", tls: str = "opportunistic",
                       connect_timeout: float = 30.0, command_timeout: float = 60.0
                       ) -> SmtpConnection:
    """Connect to the first usable host, walking MX hosts in preference order.

    Fails over on connection errors, timeouts and 4xx/5xx greetings or EHLO replies, as
    RFC 5321 §5.1 asks ("try the next MX"); raises :class:`ConnectFailure` when all fail."""
    last_code: int | None = None
    last_text = "no MX host has an address"
    all_421 = True
    tried: list[str] = []
    for _pref, host, addresses in sorted(hosts, key=lambda h: h[0]):
        for address in addresses:
            tried.append(f"{host}[{address}]")
            try:
                return await _try_address(host, address, port, ehlo_name=ehlo_name,
                                          bind_address=bind_address, tls=tls,
                                          connect_timeout=connect_timeout,
                                          command_timeout=command_timeout)
            except aiosmtplib.SMTPResponseException as e:
                last_code, last_text = e.code, f"{host}[{address}] said: {e.code} {e.message}"
                all_421 = all_421 and e.code == 421
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
                last_code, last_text = None, f"{host}[{address}]:{port}: {e}"
                all_421 = False
    raise ConnectFailure(last_code, last_text, all_421 and bool(tried), tried)
