"""HTTP API ingress: JSON over HTTP(S) into the same submit call as the Python client.

Owns an aiohttp server (one asyncio loop in a thread of its own, in the ingress actor beside
the SMTP listeners) and the mapping between HTTP and :class:`cluster.client.MailCluster`:

- ``POST /v1/messages`` — up to 1,000 messages; recipients as addresses or
  ``{"address", "variables"}``; ``"template": true`` renders subject/text/html per recipient
  (:mod:`cluster.core.templates`); ``Idempotency-Key`` makes a retried request queue nothing
  twice; 200 once every message is durable on a quorum or refused for good (per-message errors
  name the field); when a message was refused ``retryable``: 429 with ``Retry-After`` when
  every such refusal is a full queue (``reason`` "queue_full"), else 503 with ``Retry-After``
  (no quorum, not serving, still being committed, timeout) — chosen from
  :attr:`cluster.client.SubmitResult.reason`, never from the text;
- ``GET /v1/messages/{id}``, ``DELETE /v1/messages/{id}`` (cancel);
- ``GET /v1/events?cursor=0:12,1:40&wait=10`` (keys with ``events = true``): long-poll — at
  once when there are events after the cursor, else when the first comes, at most ``wait``
  seconds (0-30); ``skipped`` (per shard) when events after the cursor left the event files
  before this reader got them (rotated away, or older than a rebuilt leader's snapshot);
- ``GET /healthz`` (process up), ``GET /readyz`` (every shard serving with a quorum);
- ``GET /v1/openapi.json`` (the document in :mod:`cluster.ingress_openapi`).

Behind a load balancer: a listener named in ``[ingress] proxy_protocol`` takes a PROXY header
(v1/v2, before the TLS handshake on HTTPS) from ``proxy_networks`` only
(:mod:`cluster.adapters.proxy_listen`); behind an HTTP-mode balancer, ``X-Forwarded-For`` is
believed only from a peer in ``proxy_networks`` and ignored from anyone else. The client so
found is ``request.remote`` for every handler and the address the logs name (a refused key
is logged with it).

Errors are JSON ``{"error": {"status", "field", "message"}}``: 400 bad input, 401 no or an
unknown key, 403 a domain the key may not use, 404, 413 too big or too many, 429 queue full
(retry after ``Retry-After``), 503 retry (no quorum, not serving). API keys
are checked by hash and never logged. It must not decide queue matters (the leader does) nor
render templates anywhere but here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import threading
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from cluster.adapters.proxy_listen import ProxyGate, ProxyListener
from cluster.config import IngressConfig
from cluster.core.submission import ApiKey, ApiKeyTable, domain_allowed
from cluster.core.templates import TemplateError, per_recipient

__all__ = ["HttpIngress", "MAX_BATCH"]

#: messages per POST /v1/messages
MAX_BATCH = 1000
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}\Z")
_PASSED = ("to", "cc", "reply_to", "headers", "tags", "metadata", "not_before", "max_age",
           "dsn")
_ALLOWED = {"from", "sender", "recipients", "subject", "text", "html", "template", *_PASSED}
_KEY = web.AppKey("ingress", object)
log = logging.getLogger("raymta.ingress")
#: the longest ``wait`` of GET /v1/events (a load balancer's idle timeout is usually >= 60 s)
MAX_EVENTS_WAIT = 30.0
#: Retry-After (seconds) for a full queue (429) and for no quorum / not serving (503)
RETRY_AFTER_FULL = "5"
RETRY_AFTER_UNAVAILABLE = "1"


class _Fail(Exception):
    def __init__(self, status: int, field: str | None, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers


def _error(status: int, field: str | None, message: str,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"status": status, "field": field, "message": message}},
                             status=status, headers=headers)


def _address_domain(text: str) -> str:
    from email.utils import parseaddr
    addr = parseaddr(text)[1]
    return addr.rpartition("@")[2] if "@" in addr else ""


class HttpIngress:
    """The HTTP API listeners of one process."""

    def __init__(self, mc: Any, settings: IngressConfig,
                 tls: ssl.SSLContext | None = None) -> None:
        self.mc = mc
        self.settings = settings
        #: set while this node is drained (``raymta drain``): /readyz answers 503
        self.draining = False
        self.keys = ApiKeyTable(settings.api_keys)
        self.tls = tls
        self.addresses: list[tuple[str, int]] = []
        self.counters: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.gate = ProxyGate(settings.proxy_networks, settings.proxy_timeout,
                              lambda: self._count("proxy_refused"))
        #: transport -> the client its PROXY header named (PROXY listeners only)
        self._clients: dict[asyncio.BaseTransport, str] = {}
        self._proxy_servers: list[ProxyListener] = []

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # ---------------------------------------------------------------------- app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.http_max_body,
                              middlewares=[self._errors])
        app[_KEY] = self
        app.router.add_post("/v1/messages", self.post_messages)
        app.router.add_get("/v1/messages/{id}", self.get_message)
        app.router.add_delete("/v1/messages/{id}", self.delete_message)
        app.router.add_get("/v1/events", self.get_events)
        app.router.add_get("/v1/openapi.json", self.openapi)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        peer = self._clients.get(request.transport) if request.transport else None
        client = self.gate.client(peer or request.remote,
                                  request.headers.getall("X-Forwarded-For", []))
        if client is not None and client != request.remote:
            request = request.clone(remote=client)
        try:
            return await handler(request)
        except _Fail as f:
            self._count(str(f.status))
            if f.status in (401, 403):
                log.warning("HTTP API %s %s from %s: %d %s", request.method, request.path,
                            request.remote, f.status, f.message)
            return _error(f.status, f.field, f.message, f.headers)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "body", f"request body over {self.settings.http_max_body} bytes")
        except web.HTTPException as e:
            return _error(e.status, None, e.reason)

    def _key(self, request: web.Request) -> ApiKey:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Fail(401, "Authorization", "send 'Authorization: Bearer <api key>'",
                        {"WWW-Authenticate": "Bearer"})
        key = self.keys.lookup(token.strip())
        if key is None:
            raise _Fail(401, "Authorization", "unknown API key", {"WWW-Authenticate": "Bearer"})
        return key

    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: fn(*args, **kw))

    # ---------------------------------------------------------------------- handlers
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        try:
            st = await asyncio.wait_for(self._call(self.mc.stats), 5.0)
        except Exception as e:   # noqa: BLE001 - a leader moving, the cluster unreachable
            return web.json_response({"ready": False, "reason": type(e).__name__}, status=503)
        ready = bool(st.get("serving"))
        return web.json_response({"ready": ready, "shards": [
            {"shard": s.get("shard"), "serving": bool(s.get("serving")),
             "reason": s.get("not_serving")} for s in st.get("shards", [])]},
            status=200 if ready else 503)

    async def openapi(self, request: web.Request) -> web.Response:
        from cluster.ingress_openapi import openapi_document
        return web.json_response(openapi_document())

    async def post_messages(self, request: web.Request) -> web.Response:
        key = self._key(request)
        try:
            doc = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise _Fail(400, "body", f"not JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
            raise _Fail(400, "messages", "expected {\"messages\": [ ... ]}")
        msgs = doc["messages"]
        if not msgs:
            raise _Fail(400, "messages", "empty")
        if len(msgs) > MAX_BATCH:
            raise _Fail(413, "messages", f"{len(msgs)} messages, over the limit of {MAX_BATCH}")
        idem = request.headers.get("Idempotency-Key")
        if idem is not None and not 1 <= len(idem) <= 100:
            raise _Fail(400, "Idempotency-Key", "1-100 characters")
        subs, owners, errors = self._expand(msgs, key, idem)
        results: list[Any] = []
        if subs:
            try:
                results = await self._call(self.mc.submit, subs, timeout=60.0, retry_for=2.0)
            except Exception as e:   # noqa: BLE001 - unreachable cluster: the client retries
                raise _Fail(503, None, f"the queue could not be reached: {e}",
                            {"Retry-After": "5"}) from None
        out: list[dict[str, Any]] = [{"index": i} for i in range(len(msgs))]
        reasons: set[str] = set()
        for i, err in errors.items():
            out[i]["error"] = err
        for r, i in zip(results, owners, strict=True):
            o = out[i]
            if o.get("error"):
                continue
            if r.accepted:
                o.setdefault("ids", []).extend(r.ids)
                o["duplicate"] = o.get("duplicate", True) and r.duplicate
            else:
                field, _, message = (r.error or "refused").partition(": ")
                if r.retryable or not message:   # ours, not the message's: no field
                    field, message = "", r.error or "refused"
                o.pop("ids", None)
                o["error"] = {"field": f"messages[{i}].{field}" if field else None,
                              "message": message, "retryable": r.retryable,
                              "outcome_unknown": r.outcome_unknown}
                if r.retryable:
                    o["error"]["reason"] = r.reason
                    reasons.add(r.reason or "not_serving")
        self.counters["messages"] = self.counters.get("messages", 0) + len(msgs)
        if reasons == {"queue_full"}:
            self.counters["429"] = self.counters.get("429", 0) + 1
            return web.json_response({"results": out}, status=429,
                                     headers={"Retry-After": RETRY_AFTER_FULL})
        if reasons:
            self.counters["503"] = self.counters.get("503", 0) + 1
            return web.json_response({"results": out}, status=503,
                                     headers={"Retry-After": RETRY_AFTER_UNAVAILABLE})
        return web.json_response({"results": out})

    def _expand(self, msgs: list[Any], key: ApiKey, idem: str | None
                ) -> tuple[list[dict[str, Any]], list[int], dict[int, dict[str, Any]]]:
        """Client submissions (one per recipient for a template), the message index each
        belongs to, and the messages that failed here; 403 for a domain the key may not use."""
        subs: list[dict[str, Any]] = []
        owners: list[int] = []
        errors: dict[int, dict[str, Any]] = {}
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                errors[i] = {"field": where, "message": "must be an object"}
                continue
            unknown = sorted(set(m) - _ALLOWED)
            if unknown:
                errors[i] = {"field": f"{where}.{unknown[0]}", "message": "unknown field"}
                continue
            frm = m.get("from")
            if not isinstance(frm, str) or not frm:
                errors[i] = {"field": f"{where}.from", "message": "required (a string)"}
                continue
            for name, value in (("from", frm), ("sender", m.get("sender"))):
                if value is None:
                    continue
                dom = _address_domain(value) if isinstance(value, str) else ""
                if not dom or not domain_allowed(dom, key.domains):
                    raise _Fail(403, f"{where}.{name}", f"API key {key.name!r} may not send "
                                f"as {dom or value!r}")
            rcpts = m.get("recipients")
            if not isinstance(rcpts, list) or not rcpts:
                errors[i] = {"field": f"{where}.recipients", "message": "a non-empty list"}
                continue
            base = {k: m[k] for k in _PASSED if k in m}
            base["from"] = frm
            if m.get("sender") is not None:   # else the client takes the From address
                base["sender"] = m["sender"]
            addrs: list[str] = []
            variables: list[Any] = []
            for j, r in enumerate(rcpts):
                if isinstance(r, str):
                    addrs.append(r)
                    variables.append({})
                elif isinstance(r, dict) and isinstance(r.get("address"), str):
                    addrs.append(r["address"])
                    variables.append(r.get("variables", {}))
                else:
                    errors[i] = {"field": f"{where}.recipients[{j}]",
                                 "message": "an address or {\"address\", \"variables\"}"}
                    break
            if i in errors:
                continue
            if not m.get("template"):
                sub = dict(base, recipients=addrs,
                           **{p: m[p] for p in ("subject", "text", "html") if p in m})
                if idem:
                    sub["idempotency_key"] = f"{idem}:{i}"
                subs.append(sub)
                owners.append(i)
                continue
            try:
                rendered = per_recipient(
                    dict(base, **{p: m.get(p) for p in ("subject", "text", "html")}),
                    list(zip(addrs, variables, strict=True)))
            except TemplateError as e:
                errors[i] = {"field": f"{where}.{e.field}", "line": e.line,
                             "message": e.problem}
                continue
            for j, sub in enumerate(rendered):
                if idem:
                    sub["idempotency_key"] = f"{idem}:{i}:{j}"
                subs.append(sub)
                owners.append(i)
        return subs, owners, errors

    async def get_message(self, request: web.Request) -> web.Response:
        self._key(request)
        mid = request.match_info["id"]
        if not _ULID.match(mid):
            raise _Fail(400, "id", "not a message id (a ULID of 26 characters)")
        st = await self._call(self.mc.status, mid)
        if st is None:
            raise _Fail(404, "id", f"no message {mid} (or it finished long ago)")
        return web.json_response(st)

    async def delete_message(self, request: web.Request) -> web.Response:
        self._key(request)
        mid = request.match_info["id"]
        if not _ULID.match(mid):
            raise _Fail(400, "id", "not a message id (a ULID of 26 characters)")
        res = await self._call(self.mc.cancel, mid)
        if res == "unknown":
            raise _Fail(404, "id", f"no message {mid}")
        return web.json_response({"id": mid, "result": res})

    async def get_events(self, request: web.Request) -> web.Response:
        key = self._key(request)
        if not key.events:
            raise _Fail(403, "Authorization", f"API key {key.name!r} may not read events "
                        "(set events = true)")
        cursor: dict[int, int] = {}
        text = request.query.get("cursor", "")
        try:
            for part in filter(None, text.split(",")):
                shard, _, seq = part.partition(":")
                cursor[int(shard)] = int(seq)
            limit = int(request.query.get("limit", "1000"))
        except ValueError:
            raise _Fail(400, "cursor", "expected shard:seq,shard:seq (from 'cursor' of the "
                        "last answer) and an integer limit") from None
        if not 1 <= limit <= 10_000:
            raise _Fail(400, "limit", "between 1 and 10000")
        try:
            wait = float(request.query.get("wait", "0"))
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= MAX_EVENTS_WAIT:
            raise _Fail(400, "wait", f"seconds between 0 and {MAX_EVENTS_WAIT:g}")
        if any(s < 0 or s >= len(self.mc.coordinators) for s in cursor):
            raise _Fail(400, "cursor", f"shards are 0..{len(self.mc.coordinators) - 1}")
        evs = await self._call(self.mc.events, cursor, limit)
        if not evs and wait > 0:
            evs = await self._wait_events(cursor, limit, wait)
        nxt = self.mc.next_cursor(evs, cursor)
        out: dict[str, Any] = {"events": evs, "cursor": ",".join(
            f"{s}:{q}" for s, q in sorted(nxt.items()))}
        if cursor:   # a reader behind the event files' rotation is told what it lost
            skipped = await self._call(self.mc.skipped, cursor)
            if skipped:
                out["skipped"] = {str(s): g for s, g in skipped.items()}
        return web.json_response(out)

    async def _wait_events(self, cursor: dict[int, int], limit: int, wait: float
                           ) -> list[dict[str, Any]]:
        """Long-poll every shard leader (``wait_events``) without holding a thread: the first
        shard with an event after the cursor answers; none within ``wait``: []."""
        futs = {asyncio.wrap_future(c.wait_events.remote(cursor.get(s, 0), limit, wait)
                                    .future()): s
                for s, c in enumerate(self.mc.coordinators)}
        out: list[dict[str, Any]] = []
        pending = set(futs)
        deadline = time.monotonic() + wait + 10.0
        try:
            while pending and not out:
                done, pending = await asyncio.wait(
                    pending, timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                for f in done:
                    if f.exception() is None:
                        out.extend({**ev, "shard": futs[f]} for ev in f.result())
        finally:
            for f in pending:
                f.cancel()
        return out

    # ---------------------------------------------------------------------- running
    def start(self, listeners: list[tuple[str, int]],
              proxy: list[bool] | None = None) -> "HttpIngress":
        """Listen on ``listeners``; ``proxy[i]``: listener ``i`` takes a PROXY header."""
        proxy = proxy or [False] * len(listeners)
        loop = asyncio.new_event_loop()
        self._loop = loop
        started = threading.Event()
        errors: list[BaseException] = []

        async def serve() -> None:
            self._runner = web.AppRunner(self.app(), access_log=None)
            await self._runner.setup()
            server = self._runner.server
            assert server is not None
            for (host, port), proxied in zip(listeners, proxy, strict=True):
                if proxied:
                    pl = await ProxyListener(
                        self.gate, host, port,
                        lambda client: _ClientTag(server(), client[0], self._clients),
                        ssl=self.tls).start()
                    self._proxy_servers.append(pl)
                    self.addresses.append((host, pl.port))
                    continue
                site = web.TCPSite(self._runner, host, port, ssl_context=self.tls)
                await site.start()
                sock = site._server.sockets[0]   # type: ignore[union-attr]
                self.addresses.append((host, sock.getsockname()[1]))

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(serve())
            except BaseException as e:   # noqa: BLE001 - reported to start()
                errors.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="raymta-http-ingress", daemon=True)
        self._thread.start()
        started.wait(30)
        if errors:
            self.stop()
            raise RuntimeError(f"HTTP API cannot listen: {errors[0]}") from errors[0]
        return self

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is not None and self._thread is not None and self._thread.is_alive():
            for pl in self._proxy_servers:
                loop.call_soon_threadsafe(pl.close)
            if runner is not None:
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)
        if loop is not None and not loop.is_running():
            loop.close()
        self._loop = None

    def stats(self) -> dict[str, Any]:
        return {"http": dict(self.counters),
                "http_listeners": [f"{h}:{p}" for h, p in self.addresses], "at": time.time()}


class _ClientTag(asyncio.Protocol):
    """aiohttp's protocol for one connection of a PROXY listener, noting in ``book`` which
    client (from the header) its transport carries until the connection ends."""

    def __init__(self, inner: asyncio.Protocol, client: str,
                 book: dict[asyncio.BaseTransport, str]) -> None:
        self.inner, self.client, self.book = inner, client, book
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.book[transport] = self.client
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.book.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
