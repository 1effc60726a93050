"""The one-click unsubscribe HTTP endpoint (RFC 8058): ``POST /u/TOKEN``.

Owns a small stdlib HTTP server (its own thread): a POST to ``/u/<token>`` whose token verifies
(:func:`cluster.core.unsubscribe.read_token`) calls ``unsubscribe`` and answers 200 only after
it returned (503 when it failed: the mailbox provider retries); a forged, altered or unknown
token answers 400 and changes nothing. A GET answers a page with a button that POSTs: RFC 8058
§3.2 forbids unsubscribing on GET (link scanners fetch every URL in a message). Request bodies
are read up to 4 KiB (RFC 8058's is ``List-Unsubscribe=One-Click``). Plain HTTP: TLS ends at
the operator's reverse proxy in front of it.

Must not: know Ray, or log a token's secret key (tokens themselves are not secret).
"""

from __future__ import annotations

import html
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cluster.core.unsubscribe import read_token
from cluster.core.verp import VerpKeys

__all__ = ["UnsubscribeHttp"]

log = logging.getLogger("raymta.unsubscribe")
_MAX_BODY = 4096


class UnsubscribeHttp:
    """``unsubscribe(recipient, sender domain, cause)`` blocks until recorded (raises if not)."""

    def __init__(self, host: str, port: int, keys_for: Mapping[str, VerpKeys],
                 unsubscribe: Callable[[str, str, str], None]) -> None:
        self.keys_for = dict(keys_for)
        self.unsubscribe = unsubscribe
        self.counters = {"unsubscribed": 0, "refused": 0, "failed": 0}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "raymta-unsubscribe"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("unsubscribe http: " + fmt, *args)

            def _answer(self, code: int, text: str, page: str | None = None) -> None:
                body = (page or f"{text}\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/html; charset=utf-8" if page else
                                 "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _token(self) -> str | None:
                path = self.path.split("?", 1)[0]
                return path[3:] if path.startswith("/u/") else None

            def do_GET(self) -> None:
                token = self._token()
                if token is None or not read_token(token, outer.keys_for).ok:
                    self._answer(400, "not a valid unsubscribe link")
                    return
                t = html.escape(token)
                self._answer(200, "confirm", (
                    "<!doctype html><title>Unsubscribe</title><form method=post "
                    f'action="/u/{t}"><input type=hidden name=List-Unsubscribe '
                    'value=One-Click><button>Unsubscribe</button></form>\n'))

            def do_POST(self) -> None:
                try:
                    n = min(int(self.headers.get("Content-Length") or 0), _MAX_BODY)
                except ValueError:
                    n = 0
                if n:
                    self.rfile.read(n)
                token = self._token()
                t = read_token(token or "", outer.keys_for)
                if not t.ok or not t.recipient or not t.domain:
                    outer.counters["refused"] += 1
                    log.info("unsubscribe http: refused: %s", t.reason)
                    self._answer(400, "not a valid unsubscribe link")
                    return
                try:
                    outer.unsubscribe(t.recipient, t.domain, "one-click unsubscribe (http)")
                except Exception as e:   # noqa: BLE001 - the provider retries a 5xx
                    outer.counters["failed"] += 1
                    log.warning("unsubscribe http: could not record: %s", e)
                    self._answer(503, "try again later")
                    return
                outer.counters["unsubscribed"] += 1
                self._answer(200, "unsubscribed")

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="unsub-http",
                                        daemon=True)

    def start(self) -> UnsubscribeHttp:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
