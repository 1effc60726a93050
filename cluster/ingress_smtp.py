"""SMTP submission ingress: senders hand raymta mail over SMTP instead of the Python API.

Owns an aiosmtpd listener (loopback by default) whose DATA handler ends in the same call as the
Python client — :meth:`cluster.client.MailCluster.submit` — and answers 250 only after that call
returned, i.e. after the message is on disk in its queue shard ("accepted means durable"). A
message raymta refuses gets a 5xx naming the problem (RFC 5321 §4.2.2); a full queue or a
cluster that cannot be reached gets a 4xx so the sending MTA retries.

It does no authentication: bind it to loopback or a private interface only (the default is
127.0.0.1), as operators do with Postfix's submission on a trusted network.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from cluster.core.addresses import AddressError, parse_address

__all__ = ["SmtpIngress", "reply_for_refusal"]

log = logging.getLogger("raymta.ingress")


class _Handler:
    def __init__(self, mc: Any) -> None:
        self.mc = mc

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        try:
            parse_address(address, field="sender", allow_empty=True,
                          allow_smtputf8="SMTPUTF8" in [o.upper() for o in mail_options])
        except AddressError as e:
            return f"553 5.1.7 {e}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        try:
            parse_address(address, field="recipient",
                          allow_smtputf8="SMTPUTF8" in [o.upper() for o in envelope.mail_options])
        except AddressError as e:
            return f"553 5.1.3 {e}"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        utf8 = "SMTPUTF8" in [o.upper() for o in envelope.mail_options]
        msg = {"sender": envelope.mail_from or "<>", "recipients": list(envelope.rcpt_tos),
               "raw": envelope.original_content, "smtputf8": utf8}
        loop = asyncio.get_running_loop()
        try:
            res = (await loop.run_in_executor(None, self.mc.submit, [msg]))[0]
        except Exception as e:   # cluster unreachable, timeout: the sender must retry
            log.warning("submission failed: %s", e)
            return f"451 4.3.0 raymta could not queue the message, try again later: {e}"
        if res.accepted:
            n = len(res.ids)
            return (f"250 2.0.0 queued as {res.ids[0]}" +
                    (f" (+{n - 1} more recipients)" if n > 1 else ""))
        return reply_for_refusal(res)


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


class SmtpIngress:
    """An SMTP listener that queues what it receives into raymta."""

    def __init__(self, mc: Any, host: str = "127.0.0.1", port: int = 2525, *,
                 hostname: str = "raymta", max_size: int | None = None) -> None:
        self.mc = mc
        self.host = host
        self.port = port
        size = max_size or mc.cfg.queue.max_message_size
        self._controller = Controller(_Handler(mc), hostname=host, port=port,
                                      server_hostname=hostname, data_size_limit=size,
                                      enable_SMTPUTF8=True, decode_data=False)

    def start(self) -> "SmtpIngress":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> "SmtpIngress":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
