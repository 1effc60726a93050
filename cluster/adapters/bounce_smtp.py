"""The bounce/FBL listener's SMTP server: the MX of the return-path domain.

Owns the aiosmtpd server (its own thread and event loop) and what each SMTP step answers:

- RCPT: 250 only for a VERP return path raymta issued (tag verified with the configured keys)
  or the feedback-loop address; anything else, a forged or altered tag included, 550 5.1.1.
- SIZE (RFC 1870) is advertised and enforced: a report over ``bounce.max_message_size`` is
  refused with 552 (at MAIL when the client declares its size, else at the end of DATA), and
  never parsed.
- DATA: the report is parsed (:func:`cluster.core.dsn.parse_message`, at most 1 MiB read) in a
  worker thread, tied to its message (:mod:`cluster.core.bounce_intake`), and what it records
  goes to the owning shard through ``record``. 250 only after the shard answered; 451 (the
  sender keeps the report and retries) when a shard cannot be reached, so no report is lost to
  a fault of ours. An auto-reply, an unknown report, a bounce of a bounce, a report for an
  unknown message: 250 with "nothing recorded" and a log line saying why. raymta never answers
  a report (no bounce of a bounce can come from here).

With ``[[unsubscribe]]``: mail to ``unsub-TOKEN@<bounce domain>`` (or ``unsub@`` with the token
in the Subject) unsubscribes the token's recipient from its sender domain; a forged or altered
token is refused (550 at RCPT, or at DATA for the Subject form) and changes nothing.

Must not: know Ray (the actor gives ``lookup`` and ``record`` coroutines), or log a secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from email.parser import HeaderParser
from typing import Any
from collections.abc import Awaitable, Callable

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from cluster.core.bounce_intake import RcptVerdict, check_rcpt, claims, decide
from cluster.core.unsubscribe import read_token, token_from_mail
from cluster.core.dsn import MAX_BYTES, parse_message
from cluster.core.verp import VerpKeys

__all__ = ["BounceServer", "Lookup", "Record", "Unsubscribe"]

log = logging.getLogger("raymta.bounce")

#: message id -> the recipient its shard knows it for (None: unknown id)
Lookup = Callable[[list[str]], Awaitable[dict[str, str | None]]]
#: outside_reports items -> None once every owning shard has them durable (raises otherwise)
Record = Callable[[list[dict[str, Any]]], Awaitable[None]]
#: [(recipient, sender domain, cause)] -> None once suppressed ("unsubscribe", that scope)
Unsubscribe = Callable[[list[tuple[str, str, str]]], Awaitable[None]]

_MAX_RCPTS = 100    # one report names one return path; a few more are tolerated


def _clean(text: str) -> str:
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())[:300]


class _Handler:
    def __init__(self, server: BounceServer) -> None:
        self.s = server

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        s = self.s
        if len(envelope.rcpt_tos) >= _MAX_RCPTS:
            return "452 4.5.3 too many recipients"
        v = s.verdict(address)
        if not v.accepted:
            s.counters["rcpt_refused"] += 1
            log.info("bounce listener: RCPT %s refused from %s: %s", _clean(address)[:120],
                     session.peer, v.reason)
            return "550 5.1.1 no such return path"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        s = self.s
        raw = envelope.original_content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        verdicts = [s.verdict(a) for a in envelope.rcpt_tos]
        if any(v.kind.startswith("unsub") for v in verdicts):
            answer = await self._unsubscribe(raw, verdicts)
            if not answer.startswith("250") or all(v.kind.startswith("unsub")
                                                   for v in verdicts):
                return answer
            # the same mail also went to a return path: read it as a report too (a 451 below
            # makes the sender retry both; the unsubscribe is idempotent)
        loop = asyncio.get_running_loop()
        # parsing is CPU work of up to a few ms (1 MiB cap): not on the loop serving sessions
        report = await loop.run_in_executor(s.pool, parse_message, raw[:MAX_BYTES + 1])
        s.counters[f"kind_{report.kind}"] += 1
        if report.loop:
            s.counters["loops"] += 1
        if report.kind not in ("dsn", "arf"):
            why = decide(report, None, None).reason
            log.info("bounce listener: %s", why)
            return f"250 2.0.0 nothing recorded: {_clean(why)}"
        found = claims(report, verdicts, s.keys, prefix=s.prefix, domain=s.domain)
        if not found:
            why = decide(report, None, None).reason
            log.info("bounce listener: %s", why)
            s.counters["unclaimed"] += 1
            return f"250 2.0.0 nothing recorded: {_clean(why)}"
        try:
            rcpts = await asyncio.wait_for(s.lookup([c.message_id for c in found]),
                                           s.timeout)
        except Exception as e:   # noqa: BLE001 - a shard we cannot reach: the sender retries
            s.counters["deferred"] += 1
            log.warning("bounce listener: message lookup failed, report deferred (451): %s", e)
            return "451 4.3.0 raymta cannot record this report now, try again later"
        items, whys = [], []
        for c in found:
            d = decide(report, c, rcpts.get(c.message_id))
            whys.append(d.reason)
            log.info("bounce listener: %s", d.reason)
            if d.item is not None:
                items.append(d.item)
        if not items:
            s.counters["nothing_recorded"] += 1
            return f"250 2.0.0 nothing recorded: {_clean('; '.join(whys))}"
        try:
            await asyncio.wait_for(s.record(items), s.timeout)
        except Exception as e:   # noqa: BLE001
            s.counters["deferred"] += 1
            log.warning("bounce listener: recording %d report(s) failed, deferred (451): %s",
                        len(items), e)
            return "451 4.3.0 raymta cannot record this report now, try again later"
        s.counters["recorded"] += len(items)
        return f"250 2.0.0 recorded: {_clean('; '.join(whys))}"


    async def _unsubscribe(self, raw: bytes, verdicts: list[RcptVerdict]) -> str:
        """Mail to an unsubscribe address (RFC 2369 mailto): the signed token in the address
        (or, for ``unsub@``, in the Subject) names the recipient and sender domain."""
        s = self.s
        rows = [(*v.unsubscribe, "one-click unsubscribe (mail)") for v in verdicts
                if v.kind == "unsub" and v.unsubscribe]
        if any(v.kind == "unsub-subject" for v in verdicts):
            head = raw[:64 * 1024].split(b"\r\n\r\n", 1)[0]
            subject = HeaderParser().parsestr(head.decode("utf-8", "replace")).get("Subject")
            t = read_token(token_from_mail("unsub", str(subject or "")) or "",
                           s.unsub_keys)
            if not t.ok or not t.recipient or not t.domain:
                s.counters["unsubscribe_refused"] += 1
                log.info("bounce listener: unsubscribe by mail refused: %s", t.reason)
                return "550 5.7.1 not a valid unsubscribe request"
            rows.append((t.recipient, t.domain, "one-click unsubscribe (mail)"))
        assert s.unsubscribe is not None     # unsub verdicts are only given with it
        try:
            await asyncio.wait_for(s.unsubscribe(rows), s.timeout)
        except Exception as e:   # noqa: BLE001
            s.counters["deferred"] += 1
            log.warning("bounce listener: unsubscribe failed, deferred (451): %s", e)
            return "451 4.3.0 raymta cannot record this request now, try again later"
        s.counters["unsubscribed"] += len(rows)
        log.info("bounce listener: unsubscribed %d by mail", len(rows))
        return f"250 2.0.0 unsubscribed ({len(rows)})"


class BounceServer:
    """The listener on ``host:port``; ``start()``/``stop()``."""

    def __init__(self, *, keys: VerpKeys, prefix: str, domain: str, fbl_address: str,
                 lookup: Lookup, record: Record, host: str, port: int,
                 max_size: int = 2_000_000, timeout: float = 30.0,
                 hostname: str = "raymta-bounce",
                 unsub_keys: Mapping[str, VerpKeys] | None = None,
                 unsubscribe: Unsubscribe | None = None) -> None:
        self.keys = keys
        self.prefix = prefix
        self.domain = domain
        self.fbl_address = fbl_address
        self.lookup = lookup
        self.record = record
        self.timeout = timeout
        self.unsub_keys = dict(unsub_keys or {})
        self.unsubscribe = unsubscribe
        self.host = host
        self.port = port
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bounce-parse")
        from collections import Counter
        self.counters: Counter[str] = Counter()
        self._controller = Controller(_Handler(self), hostname=host, port=port,
                                      server_hostname=hostname, data_size_limit=max_size,
                                      enable_SMTPUTF8=True, decode_data=False)

    def verdict(self, address: str) -> RcptVerdict:
        return check_rcpt(address, self.keys, prefix=self.prefix, domain=self.domain,
                          fbl_address=self.fbl_address,
                          unsub_keys=self.unsub_keys if self.unsubscribe else None)

    def start(self) -> BounceServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:   # never the keys
        return f"BounceServer({self.host}:{self.port}, domain={self.domain!r})"
