"""A loopback HTTPS server serving MTA-STS policies (aiohttp, in a thread of its own), for the
MTA-STS tests. Not a fixture: tests start it with a certificate from tests.ingress_certs and
stop it. Each ``mta-sts.<domain>`` (the Host header) gets what :attr:`PolicyServer.policies`
says: (status, content type, body); unknown hosts get 404. Requests are counted per host."""

from __future__ import annotations

import collections
import ssl
from pathlib import Path

from aiohttp import web

from cluster.devservers import _LoopThread

__all__ = ["PolicyServer", "policy_text"]


def policy_text(mode: str, mx: list[str], max_age: int = 86400) -> str:
    lines = "".join(f"mx: {m}\r\n" for m in mx)
    return f"version: STSv1\r\nmode: {mode}\r\n{lines}max_age: {max_age}\r\n"


class PolicyServer:
    def __init__(self, host: str, cert: Path, key: Path) -> None:
        self.host = host
        self.port = 0
        self.policies: dict[str, tuple[int, str, bytes]] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(cert, key)
        self._runner: web.AppRunner | None = None
        self._thread = _LoopThread("mta-sts-https", self._setup, self._teardown)

    def serve(self, domain: str, body: str | bytes, status: int = 200,
              content_type: str = "text/plain") -> None:
        raw = body.encode() if isinstance(body, str) else body
        self.policies[f"mta-sts.{domain}"] = (status, content_type, raw)

    async def _handle(self, request: web.Request) -> web.Response:
        host = (request.host or "").rsplit(":", 1)[0]
        self.requests[host] += 1
        if request.path != "/.well-known/mta-sts.txt" or host not in self.policies:
            return web.Response(status=404, text="not found")
        status, ctype, body = self.policies[host]
        if status in (301, 302):
            return web.Response(status=status, headers={"Location": "https://elsewhere.test/"})
        return web.Response(status=status, body=body, content_type=ctype)

    async def _setup(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self._ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _teardown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def start(self) -> PolicyServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop()
