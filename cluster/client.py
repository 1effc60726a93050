"""The sender's API: ``MailCluster`` — submit messages, follow them, wait, cancel.

Validation and MIME rendering happen here, in the submitter's process (pure
``cluster.core.message``), so a bad message is refused with a precise error before anything
crosses the network, and one bad message never rejects the rest of its batch. Good messages are
split one per recipient (the body stored once), given time-ordered ids that hash to one shard
per call (calls take turns over the shards; a message with an idempotency key goes to the key's
shard), and sent in one batch per shard, over the shard leader's own submit stream (a Ray call
when it cannot be reached); :meth:`MailCluster.submit` returns only after the shard has made
them durable. Retried calls are safe: the ids are made here, and a shard answers a repeated id
instead of queueing it twice.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generator, Iterable, Iterator

import msgpack
import ray

from cluster.adapters.stream import BlockingStreamClient, StreamClient, StreamError
from cluster.config import Config, load_config
from cluster.core.dkim import DkimError, dkim_refusal, from_domain, parse_headers, split_message
from cluster.core.intake import retryable_error, wire_item
from cluster.core.templates import TemplateError, per_recipient, recipient_variables
from cluster.core.message import (MAX_IDEMPOTENCY_KEY, PreparedMessage, ValidationError,
                                  new_message_ids, validate_batch)
from cluster.core.sites import stable_hash

__all__ = ["MailCluster", "SubmitResult", "SubmitError"]


class SubmitError(RuntimeError):
    """The cluster could not take a batch at all (not a per-message validation error)."""


@dataclass(frozen=True)
class SubmitResult:
    """Outcome for one submitted message (in input order)."""

    index: int
    ids: list[str] = field(default_factory=list)   # one per recipient (see outcome_unknown)
    error: str | None = None                       # "field: reason" when refused
    duplicate: bool = False                        # idempotency key (or ids) seen before
    #: the refusal may pass later (no quorum, shard not serving, queue full, still being
    #: committed, timeout): try again; protocol front ends answer 4xx, never 5xx, for these
    retryable: bool = False
    #: why a retryable refusal is retryable, machine-readable (``cluster.core.intake.
    #: RETRY_REASONS``): "queue_full", "no_quorum", "not_serving", "pending_commit", "timeout";
    #: None for an accepted or a permanently refused message
    reason: str | None = None
    #: the message may or may not be queued (the shard had it but could not confirm it in
    #: time): ``ids`` are the ids it was sent with; ``status(ids)`` tells, and submitting it
    #: again with the same ``idempotency_key`` is safe
    outcome_unknown: bool = False
    #: recipients left out because they are suppressed: ``{"recipient", "reason", "since",
    #: "error"}`` each (with ``suppression.on_submit = "drop"`` they are queued and finished
    #: at once instead, and listed here too)
    suppressed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.error is None


def shard_of(msg_id: str, shards: int) -> int:
    return stable_hash(msg_id) % shards


#: a submit call carries at most this many messages and, past its first, this many body bytes
#: (so a batch of big messages is several calls, and no call needs gigabytes packed at once)
CHUNK_MESSAGES = 1000
CHUNK_BYTES = 32 << 20


def _chunked(items: list[tuple[int, list[Any]]], max_items: int, max_bytes: int
             ) -> list[list[tuple[int, list[Any]]]]:
    """``items`` (input index, wire item whose [1] is the body) in order, cut into runs of at
    most ``max_items`` whose bodies add up to at most ``max_bytes`` (a single bigger item
    makes a run of its own)."""
    out: list[list[tuple[int, list[Any]]]] = []
    run: list[tuple[int, list[Any]]] = []
    size = 0
    for it in items:
        n = len(it[1][1])
        if run and (len(run) >= max_items or size + n > max_bytes):
            out.append(run)
            run, size = [], 0
        run.append(it)
        size += n
    if run:
        out.append(run)
    return out


class _SubmitStream:
    """A shard leader's submit stream for this sender: pools of connections, one per call in
    progress (cluster/adapters/stream.py) — blocking ones for callers' threads, and asyncio
    ones for one event loop (:meth:`MailCluster.submit_prepared_async`). A submit call over
    it costs both sides a socket write and read instead of a Ray call's ~1.5-2.5 ms of CPU
    each.

    :meth:`call` (steps for :func:`_drive` / :func:`_drive_async`) returns None when the
    stream cannot be reached (nothing was sent: the caller uses a Ray call, and so does every
    call for the next ``RETRY_AFTER`` seconds), and raises ``StreamError`` when a request was
    sent but no answer came (it may have been committed)."""

    RETRY_AFTER = 30.0
    #: idle connections kept per pool
    KEEP = 16

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._lock = threading.Lock()
        self._endpoint: list[Any] | None = None
        #: idle connections: blocking ones under None, asyncio ones under their loop (one
        #: loop at a time: another loop's connections are dropped, not used across loops)
        self._idle: dict[Any, list[Any]] = {None: []}
        self._off_until = 0.0

    def _pool(self, loop: Any) -> list[Any]:
        """``loop``'s idle connections (None: blocking ones); the caller holds the lock."""
        pool = self._idle.get(loop)
        if pool is None:
            self._idle = {None: self._idle[None], loop: []}
            pool = self._idle[loop]
        return pool

    def _connect(self, loop: Any, timeout: float) -> Steps:
        with self._lock:
            pool = self._pool(loop)
            if pool:
                return pool.pop()
            if time.monotonic() < self._off_until:
                return None
            endpoint = self._endpoint
        for fresh in (endpoint is None, True):
            try:
                if fresh:
                    endpoint = yield ("endpoint", self._handle, min(10.0, timeout))
                    with self._lock:
                        self._endpoint = endpoint
                assert endpoint is not None
                return (yield ("open", endpoint, min(2.0, timeout)))
            except (StreamError, ray.exceptions.RayError, ray.exceptions.GetTimeoutError,
                    TimeoutError):
                if fresh:   # a leader that moved has a new endpoint: asked once, then off
                    break
        with self._lock:
            self._endpoint = None
            self._off_until = time.monotonic() + self.RETRY_AFTER
        return None

    def call(self, payload: bytes, timeout: float, loop: Any = None) -> Steps:
        conn = yield from self._connect(loop, timeout)
        if conn is None:
            return None
        try:
            answers = yield ("call", conn, payload, timeout)
        except StreamError:
            # the leader may have died or moved: ask it again next time, and drop the other
            # pooled connections to it rather than fail on each in turn
            self.close(loop)
            with self._lock:
                self._endpoint = None
            raise
        with self._lock:
            pool = self._pool(loop)
            if len(pool) < self.KEEP:
                pool.append(conn)
                conn = None
        if conn is not None:
            conn.close()
        return answers

    def close(self, loop: Any = None) -> None:
        """Close the idle connections of ``loop``'s pool (None: the blocking one), from
        the thread that uses them."""
        with self._lock:
            idle = self._idle.get(loop) or []
            if loop is None:
                self._idle[None] = []
            else:   # a loop that stops is not kept alive here
                self._idle.pop(loop, None)
        for conn in idle:
            conn.close()


#: a step of a submission (see _drive): a generator that yields effects — ("endpoint",
#: leader, timeout), ("open", endpoint, timeout), ("call", connection, payload, timeout), ("ray", [(leader,
#: payload, n), ...], deadline), ("sleep", seconds) — is sent each one's outcome (or has the
#: exception it raised thrown in), and returns its result. The decisions (retry, fall back,
#: ask again) are written once; only the waiting differs between the blocking and the
#: asyncio path.
Steps = Generator[tuple[Any, ...], Any, Any]


def _failed_answers(e: BaseException, n: int) -> list[dict[str, Any]]:
    """What a Ray submit call that got no answer (timeout, dead leader) says for each of its
    ``n`` items: outcome unknown, retryable."""
    if isinstance(e, (ray.exceptions.GetTimeoutError, TimeoutError)):
        why, reason = "the queue shard did not answer within the submit timeout", "timeout"
    else:
        why = f"the queue shard's call failed ({type(e).__name__})"
        reason = "not_serving"
    return [retryable_error(f"outcome unknown: {why}; the message may or may not be queued",
                            reason=reason, unknown=True)] * n


def _ray_calls(calls: list[tuple[Any, bytes, int]], deadline: float
               ) -> list[list[dict[str, Any]]]:
    """("ray", ...) for a blocking caller: every call in flight at once, then each answer."""
    refs = [(leader.submit.remote(payload), n) for leader, payload, n in calls]
    out = []
    for ref, n in refs:
        try:
            out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
            out.append(_failed_answers(e, n))
    return out


async def _ray_calls_async(calls: list[tuple[Any, bytes, int]], deadline: float
                           ) -> list[list[dict[str, Any]]]:
    """("ray", ...) on an event loop: the same calls, awaited instead of waited for."""
    refs = [(asyncio.wrap_future(leader.submit.remote(payload).future()), n)
            for leader, payload, n in calls]
    out = []
    for fut, n in refs:
        try:
            out.append(await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic())))
        except (TimeoutError, ray.exceptions.RayError) as e:
            out.append(_failed_answers(e, n))
    return out


async def _endpoint_async(leader: Any, timeout: float) -> Any:
    return await asyncio.wait_for(asyncio.wrap_future(leader.submit_endpoint.remote().future()),
                                  timeout)


_BLOCKING: dict[str, Callable[..., Any]] = {
    "endpoint": lambda leader, timeout: ray.get(leader.submit_endpoint.remote(),
                                                timeout=timeout),
    "open": lambda endpoint, timeout: BlockingStreamClient.connect(*endpoint, timeout=timeout),
    "call": lambda conn, payload, timeout: conn.call("submit", payload, timeout=timeout),
    "ray": _ray_calls,
    "sleep": time.sleep,
}

_ASYNC: dict[str, Callable[..., Awaitable[Any]]] = {
    "endpoint": _endpoint_async,
    "open": lambda endpoint, timeout: StreamClient.connect(*endpoint, timeout=timeout),
    "call": lambda conn, payload, timeout: conn.call("submit", payload, timeout=timeout),
    "ray": _ray_calls_async,
    "sleep": asyncio.sleep,
}


def _advance(steps: Steps, reply: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Hand ``steps`` the last effect's reply (or its error): (False, the next effect) or
    (True, the steps' result). The drivers below differ only in how they run an effect."""
    try:
        return False, steps.throw(error) if error is not None else steps.send(reply)
    except StopIteration as stop:
        return True, stop.value


def _drive(steps: Steps) -> Any:
    """Run ``steps`` in this thread, waiting for each effect."""
    done, eff = _advance(steps, None, None)
    while not done:
        try:
            reply, error = _BLOCKING[eff[0]](*eff[1:]), None
        except Exception as e:   # noqa: BLE001 - thrown into the step, which decides
            reply, error = None, e
        done, eff = _advance(steps, reply, error)
    return eff


async def _drive_async(steps: Steps) -> Any:
    """Run ``steps`` on the running event loop, awaiting each effect."""
    done, eff = _advance(steps, None, None)
    while not done:
        try:
            reply, error = await _ASYNC[eff[0]](*eff[1:]), None
        except Exception as e:   # noqa: BLE001 - thrown into the step, which decides
            reply, error = None, e
        done, eff = _advance(steps, reply, error)
    return eff


def _requires_dkim(cfg: Config) -> bool:
    dk = cfg.dkim
    return dk.sign == "required" or any(p == "required" for _, p in dk.policy)


def _check_dkim_policy(p: Any, cfg: Config, index: int) -> Any:
    """``p`` itself, or the ValidationError that refuses it under ``sign = "required"``."""
    if isinstance(p, ValidationError):
        return p
    try:
        domain = from_domain(parse_headers(split_message(p.body)[0])) or ""
    except DkimError:
        domain = ""
    why = dkim_refusal(domain, cfg)
    if why is None:
        return p
    field_, _, reason = why.partition(": ")
    return ValidationError(field_, reason, index=index)


class MailCluster:
    def __init__(self, cfg: Config, coordinators: list[Any], *, owns_ray: bool = False,
                 handles: dict[str, Any] | None = None, direct: bool = True) -> None:
        self.cfg = cfg
        self.coordinators = coordinators
        self.owns_ray = owns_ray
        self.handles = handles or {}
        # submit calls go over each leader's submit stream when it can be reached (not through
        # the Ray client's proxy: ``ray://`` addresses use Ray calls)
        self._streams = [_SubmitStream(c) for c in coordinators] if direct else None
        # the shard of the next submit call's messages (round robin; a random start so that
        # many submitters do not all begin on shard 0)
        self._next_shard = itertools.count(int.from_bytes(os.urandom(2), "big"))

    # ------------------------------------------------------------------ connecting
    @classmethod
    def connect(cls, address: str | None = None, *, config: Config | str | None = None,
                spool_dir: str | None = None, num_cpus: int | None = None,
                dashboard: bool = False, direct: bool | None = None) -> "MailCluster":
        """``connect()``: embedded local Ray with raymta deployed (stopped by :meth:`close`).
        ``connect("auto")``: the Ray cluster this process runs in (after ``raymta up``).
        ``connect("ray://host:10001")``: through the Ray client.

        ``direct``: submit over each shard leader's own stream (default, except through the
        Ray client) rather than by Ray calls; either way a batch is answered only once durable.

        With Ray's token authentication on (the 2.60 default), a remote cluster's token must
        be available to this process: ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``."""
        cfg = config if isinstance(config, Config) else load_config(config)
        if spool_dir is not None:
            cfg = cfg.with_spool(spool_dir)
        if address is None:
            from cluster.deploy import deploy, init_local_ray
            init_local_ray(num_cpus, dashboard=dashboard, namespace=cfg.cluster.namespace)
            try:
                handles = deploy(cfg)
            except BaseException:
                ray.shutdown()
                raise
            coords = [handles[f"coordinator:{s}"] for s in range(cfg.queue.shards)]
            return cls(cfg, coords, owns_ray=True, handles=handles,
                       direct=True if direct is None else direct)
        if not ray.is_initialized():
            from cluster.deploy import NoCluster, find_cluster, join_with_token
            try:   # within seconds, naming the address, rather than minutes of retries
                address = find_cluster(address)
            except NoCluster as e:
                raise SubmitError(str(e)) from None
            join_with_token()
            # The Ray client's head starts a server process per client session; on a busy head
            # that start can fail ("Starting Ray client server failed"): try a few times.
            attempts = 3 if address.startswith("ray://") else 1
            for attempt in range(1, attempts + 1):
                try:
                    ray.init(address=address, namespace=cfg.cluster.namespace,
                             log_to_driver=False)
                    break
                except (ConnectionError, RuntimeError) as e:
                    if attempt == attempts:
                        raise SubmitError(f"cannot connect to {address} after {attempts} "
                                          f"attempts: {e}") from e
                    ray.shutdown()
                    time.sleep(2.0 * attempt)
        ns = cfg.cluster.namespace
        try:
            first = ray.get_actor("coordinator:0", namespace=ns)
        except ValueError:
            raise SubmitError(f"no raymta deployment in namespace {ns!r} at {address}: "
                              "run `raymta up` first") from None
        cfg = ray.get(first.config.remote())
        coords = [first] + [ray.get_actor(f"coordinator:{s}", namespace=ns)
                            for s in range(1, cfg.queue.shards)]
        if direct is None:
            direct = not address.startswith("ray://")
        return cls(cfg, coords, direct=direct)

    def close(self) -> None:
        for st in self._streams or []:
            st.close()
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()

    def close_streams(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the idle submit-stream connections :meth:`submit_prepared_async` opened on
        ``loop`` (from that loop's thread, before it stops)."""
        for st in self._streams or []:
            st.close(loop)

    def __enter__(self) -> "MailCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ submission
    def submit(self, messages: Iterable[dict[str, Any]] | dict[str, Any], *,
               timeout: float = 300.0, retry_for: float = 15.0) -> list[SubmitResult]:
        """Validate and queue messages; returns one :class:`SubmitResult` per message.

        Accepted ids are returned only after the shard has written them to disk. Refusals
        marked retryable (no quorum, a leader starting, queue full, still being committed) are
        tried again for up to ``retry_for`` seconds, with the same ids: a shard answers ids it
        already committed as queued, so a retry never queues a message twice. What is still
        refused then comes back with ``retryable`` (and ``outcome_unknown`` where the shard
        could not tell) set."""
        msgs = [messages] if isinstance(messages, dict) else list(messages)
        if self.cfg.dsn.api:   # DSNs on failure unless a message says otherwise
            msgs = [{**m, "dsn": True} if isinstance(m, dict) and m.get("dsn") is None else m
                    for m in msgs]
        now = time.time()
        prepared = validate_batch(msgs, now=now, max_size=self.cfg.queue.max_message_size)
        return self.submit_prepared(prepared, timeout=timeout, retry_for=retry_for, now=now)

    def submit_template(self, message: dict[str, Any], recipients: list[Any], *,
                        timeout: float = 300.0, retry_for: float = 15.0
                        ) -> list[SubmitResult]:
        """One message rendered for each recipient and queued: ``message`` is a structured
        submission (``from``, ``subject``, ``text``, ``html``, ...) whose subject, text and
        html are sandboxed Jinja2 templates (:mod:`cluster.core.templates`); ``recipients``
        are addresses or ``{"address": ..., "variables": {...}}``. Rendered here, in the
        client, never in a queue leader; each recipient gets a message of its own (``To``
        names the recipient unless ``message`` has a ``to``); an ``idempotency_key`` becomes
        ``<key>:<n>`` for the n-th recipient. One :class:`SubmitResult` per recipient, in
        order. A template that fails for any recipient raises :class:`ValidationError` naming
        the part and line, and nothing of the message is queued (as the HTTP API fails it)."""
        if not isinstance(message, dict):
            raise ValidationError("message", f"must be a dict, not {type(message).__name__}")
        if "recipients" in message:
            raise ValidationError("recipients", "give them as submit_template's recipients "
                                  "argument, each with its variables")
        try:
            subs = per_recipient(message, recipient_variables(recipients))
        except TemplateError as e:
            raise ValidationError(e.field, f"line {e.line}: {e.problem}" if e.line
                                  else e.problem) from None
        key = message.get("idempotency_key")
        if isinstance(key, str) and key:
            longest = len(f"{key}:{len(subs) - 1}")
            if longest > MAX_IDEMPOTENCY_KEY:   # all or none: not just the later recipients
                raise ValidationError("idempotency_key", f"{len(key)} characters: with "
                                      f"':<recipient number>' added it would be {longest}, "
                                      f"over the limit of {MAX_IDEMPOTENCY_KEY}")
            for n, sub in enumerate(subs):
                sub["idempotency_key"] = f"{key}:{n}"
        return self.submit(subs, timeout=timeout, retry_for=retry_for)

    def submit_prepared(self, prepared: list[PreparedMessage | ValidationError], *,
                        timeout: float = 300.0, retry_for: float = 15.0,
                        now: float | None = None) -> list[SubmitResult]:
        """:meth:`submit` for messages a front end validated itself (``cluster.core.message``
        ``prepare`` or ``prepare_parsed``, bounded by ``queue.max_message_size``): an SMTP
        listener that parsed each address already. A :class:`ValidationError` in a slot is
        that message's refusal. The DKIM policy and everything after apply as in
        :meth:`submit`."""
        return _drive(self._submit_steps(prepared, timeout, retry_for, now, None))

    async def submit_prepared_async(self, prepared: list[PreparedMessage | ValidationError],
                                    *, timeout: float = 300.0, retry_for: float = 15.0,
                                    now: float | None = None) -> list[SubmitResult]:
        """:meth:`submit_prepared` for a caller on an event loop (a protocol front end): the
        same calls, retries and answers, awaited on the running loop instead of blocking a
        thread (its stream connections belong to that loop)."""
        return await _drive_async(self._submit_steps(prepared, timeout, retry_for, now,
                                                     asyncio.get_running_loop()))

    def _submit_steps(self, prepared: list[PreparedMessage | ValidationError], timeout: float,
                      retry_for: float, now: float | None, loop: Any) -> Steps:
        if now is None:
            now = time.time()
        if _requires_dkim(self.cfg):
            prepared = [_check_dkim_policy(p, self.cfg, i) for i, p in enumerate(prepared)]
        shards = len(self.coordinators)
        batch_shard = next(self._next_shard) % shards
        results: list[SubmitResult | None] = [None] * len(prepared)
        # per shard: list of (input index, item)
        per_shard: dict[int, list[tuple[int, list[Any]]]] = {}
        # ids for every recipient, made for this call's shard in one go (a message with an
        # idempotency key whose shard is another gets its own; these then go unused)
        fresh = iter(new_message_ids(now, sum(len(p.recipients) for p in prepared
                                              if not isinstance(p, ValidationError)),
                                     batch_shard, shards))
        for i, p in enumerate(prepared):
            if isinstance(p, ValidationError):
                results[i] = SubmitResult(i, error=str(p))
                continue
            # Every id is made to hash to one shard (ids stay routable by hash alone): the
            # message's idempotency key's shard, which remembers the key, or else this call's
            # shard, so that a batch is one call and one commit instead of one per shard.
            home = shard_of(p.idempotency_key, shards) if p.idempotency_key else batch_shard
            ids = fresh if home == batch_shard else \
                new_message_ids(now, len(p.recipients), home, shards)
            per_shard.setdefault(home, []).append((i, wire_item(p, ids)))
        deadline = time.monotonic() + timeout
        retry_until = min(deadline, time.monotonic() + max(0.0, retry_for))
        tried: set[int] = set()   # messages sent before: "duplicate" of their own ids is ours
        pause = 0.05
        while per_shard:
            answered = yield from self._send(per_shard, deadline, loop)
            again: dict[int, list[tuple[int, list[Any]]]] = {}
            for shard, chunk, answers in answered:   # a message is one item of one chunk
                for (i, item), a in zip(chunk, answers):
                    error = a.get("error")
                    if error is None:
                        ids = a["ids"]
                        own = i in tried and ids == [r[0] for r in item[3]]
                        results[i] = SubmitResult(i, ids=ids,
                                                  duplicate=bool(a.get("duplicate")) and not own,
                                                  suppressed=a.get("suppressed") or [])
                        continue
                    retryable = bool(a.get("retryable"))
                    results[i] = SubmitResult(
                        i, ids=[r[0] for r in item[3]] if a.get("unknown") else [],
                        error=error, retryable=retryable,
                        reason=a.get("reason") if retryable else None,
                        outcome_unknown=bool(a.get("unknown")),
                        suppressed=a.get("suppressed") or [])
                    if retryable:
                        again.setdefault(shard, []).append((i, item))
                        tried.add(i)
            if not again or time.monotonic() + pause >= retry_until:
                break
            yield ("sleep", pause)
            pause = min(2.0, pause * 2)
            per_shard = again
        return [r if r is not None else SubmitResult(i, error="internal: no answer")
                for i, r in enumerate(results)]

    def _send(self, per_shard: dict[int, list[tuple[int, list[Any]]]], deadline: float,
              loop: Any) -> Steps:
        """Each shard's items in calls of at most CHUNK_MESSAGES / CHUNK_BYTES; returns the
        answers of each call (a call that got none says so for each of its items)."""
        chunks = [(shard, chunk) for shard, items in per_shard.items()
                  for chunk in _chunked(items, CHUNK_MESSAGES, CHUNK_BYTES)]
        if len(chunks) == 1:    # the usual call: one shard, up to 1,000 messages
            shard, chunk = chunks[0]
            answers = yield from self._submit_chunk(shard, [it for _, it in chunk], deadline,
                                                    loop)
            return [(shard, chunk, answers)]
        # Ray calls, all in flight at once
        answers_each = yield ("ray", [(self.coordinators[shard],
                                       msgpack.packb([it for _, it in chunk], use_bin_type=True),
                                       len(chunk)) for shard, chunk in chunks], deadline)
        return [(shard, chunk, answers)
                for (shard, chunk), answers in zip(chunks, answers_each)]

    def _submit_chunk(self, shard: int, items: list[list[Any]], deadline: float, loop: Any
                      ) -> Steps:
        """One shard's answers for ``items``: over its submit stream, or by a Ray call when the
        stream is out of reach or broke. After a break the request may have reached the leader
        and be committing: the ids are the same, so the Ray call gets "duplicate" for what it
        committed, and what it still commits is asked about again until the answer is final."""
        payload = msgpack.packb(items, use_bin_type=True)
        leader = self.coordinators[shard]
        maybe_sent = False
        if self._streams is not None:
            try:
                answers = yield from self._streams[shard].call(
                    payload, max(0.001, deadline - time.monotonic()), loop)
                if answers is not None:
                    return answers
            except StreamError:
                maybe_sent = True
        (answers,) = yield ("ray", [(leader, payload, len(items))], deadline)
        while maybe_sent and any(a.get("pending") for a in answers):
            if time.monotonic() >= deadline:
                break   # the answers say "still being committed; retry"
            yield ("sleep", 0.05)
            again = [k for k, a in enumerate(answers) if a.get("pending")]
            (more,) = yield ("ray", [(leader, msgpack.packb([items[k] for k in again],
                                                           use_bin_type=True), len(again))],
                             deadline)
            for k, a in zip(again, more):
                answers[k] = a
        return answers

    # ------------------------------------------------------------------ following messages
    def _by_shard(self, ids: list[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for mid in ids:
            out.setdefault(shard_of(mid, len(self.coordinators)), []).append(mid)
        return out

    def _fan_out(self, method: str, ids: str | list[str]) -> Any:
        """Call a per-id coordinator method on each id's shard; answers in input order."""
        single = isinstance(ids, str)
        lst = [ids] if isinstance(ids, str) else list(ids)
        found: dict[str, Any] = {}
        for shard, group in self._by_shard(lst).items():
            call = getattr(self.coordinators[shard], method)
            found.update(zip(group, ray.get(call.remote(group))))
        out = [found.get(m) for m in lst]
        return out[0] if single else out

    def status(self, ids: str | list[str]) -> Any:
        """State of one message (dict or None) or of a list of them."""
        return self._fan_out("status", ids)

    def cancel(self, ids: str | list[str]) -> Any:
        """Cancel queued messages: "cancelled", "cancel pending (in flight)", "already …"."""
        return self._fan_out("cancel", ids)

    def events(self, since: int | dict[int, int] = 0, limit: int = 10_000, *,
               wait: float = 0.0) -> list[dict[str, Any]]:
        """Events after ``since`` (a seq, or per-shard seqs), oldest first per shard.

        Each event carries ``shard`` and ``seq``; pass ``next_cursor(events)`` back in. With
        ``wait`` (seconds, at most 30): when there is none yet, wait for the first shard that
        has one (long-poll), returning an empty list after ``wait``."""
        def after(shard: int) -> int:
            return since.get(shard, 0) if isinstance(since, dict) else since
        out: list[dict[str, Any]] = []
        for shard, c in enumerate(self.coordinators):
            for ev in ray.get(c.events.remote(after(shard), limit)):
                ev["shard"] = shard
                out.append(ev)
        if out or wait <= 0:
            return out
        refs = {c.wait_events.remote(after(shard), limit, min(wait, 30.0)): shard
                for shard, c in enumerate(self.coordinators)}
        pending = list(refs)
        deadline = time.monotonic() + min(wait, 30.0) + 10.0
        while pending and not out:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for ref in ready:
                for ev in ray.get(ref):
                    ev["shard"] = refs[ref]
                    out.append(ev)
        return out

    def skipped(self, cursor: dict[int, int]) -> dict[int, dict[str, Any]]:
        """Per shard of ``cursor``, the events after its seq that rotated out of the event
        files before they were read (``{"first_seq", "last_seq", "events", "exact"}``); shards
        that lost none are left out. A reader that fell this far behind is told, not skipped
        over silently."""
        shards = sorted(s for s in cursor if 0 <= s < len(self.coordinators))
        gaps = ray.get([self.coordinators[s].events_gap.remote(cursor[s]) for s in shards])
        return {s: g for s, g in zip(shards, gaps, strict=True) if g is not None}

    def follow(self, since: int | dict[int, int] = 0, *, poll: float = 1.0,
               limit: int = 10_000, until: float | None = None,
               stop: Callable[[], bool] | None = None) -> Iterator[dict[str, Any]]:
        """Every event after ``since`` (a seq for every shard, or per-shard seqs), then each
        new one as it comes, oldest first per shard, until ``until`` (a ``time.time()``) or
        ``stop()`` says so. Goes on through a leader's restart or move (the call waits or is
        retried); each event comes once and in order within its shard."""
        cursor = dict(since) if isinstance(since, dict) else \
            {s: since for s in range(len(self.coordinators))}
        while (until is None or time.time() < until) and not (stop and stop()):
            try:
                evs = self.events(cursor, limit)
            except (ray.exceptions.RayError, RuntimeError):
                time.sleep(poll)      # a leader restarting or moving: ask again
                continue
            for ev in evs:
                if ev["seq"] > cursor.get(ev["shard"], 0):
                    yield ev
            cursor = self.next_cursor(evs, cursor)
            if len(evs) < limit:
                time.sleep(poll)

    @staticmethod
    def next_cursor(events: list[dict[str, Any]], cursor: dict[int, int] | None = None
                    ) -> dict[int, int]:
        cur = dict(cursor or {})
        for ev in events:
            cur[ev["shard"]] = max(cur.get(ev["shard"], 0), ev["seq"])
        return cur

    def stats(self) -> dict[str, Any]:
        per = ray.get([c.stats.remote() for c in self.coordinators])
        total: dict[str, Any] = {}
        for s in per:
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in (
                        "shard", "pid", "epoch", "lsn"):
                    total[k] = total.get(k, 0) + v
        # a shard leader that is starting (after a restart: claiming, replaying its log) has
        # not rebuilt its queue yet, so its counts say nothing: "serving" is False until then
        total["serving"] = all(s.get("serving") for s in per)
        total["shards"] = per
        return total

    # ------------------------------------------------------------------ operators
    def queue_shape(self, top: int = 20) -> dict[str, Any]:
        """Live messages per destination domain by age bucket (qshape), every shard summed
        (:func:`cluster.core.queue_shape.merge_shapes`: ``"sites"`` are the domains here,
        ``"site_ages"`` each one's counts per bucket of ``AGE_BUCKETS``)."""
        from cluster.core.queue_shape import merge_shapes
        return merge_shapes(ray.get([c.queue_shape.remote(top) for c in self.coordinators]),
                            top)

    def suspend(self, site: str, seconds: float) -> dict[str, Any]:
        """Stop dispatching to a domain or site for ``seconds`` (every shard, durable)."""
        until = time.time() + seconds if seconds > 0 else 0.0
        res = ray.get([c.suspend.remote(site, until) for c in self.coordinators])
        return {"site": res[0]["site"], "until": until,
                "messages": sum(r["messages"] for r in res)}

    def shaping(self) -> list[dict[str, Any]]:
        """Shaping rules in force (every shard's pause records, merged): one row per site (or
        site#source) and action, with the rule's name, ``until`` and the reply that fired it."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for shard_rows in ray.get([c.shaping_state.remote() for c in self.coordinators]):
            for a in shard_rows:
                rows[(a["key"], a["action"])] = a
        return [rows[k] for k in sorted(rows)]

    def warmup(self) -> list[dict[str, Any]]:
        """Warm-up standing today per (egress source, provider), every shard added up:
        the plan's ``day``, today's ``cap`` (None: warm) and what was ``sent``."""
        from cluster.core.warmup import merge_status
        return merge_status(ray.get([c.warmup_state.remote() for c in self.coordinators]))

    def resume(self, site: str) -> dict[str, Any]:
        return self.suspend(site, 0)

    def retry_now(self, site: str) -> int:
        """Deferred messages for a domain or site are tried again now; how many."""
        return sum(ray.get([c.retry_now.remote(site) for c in self.coordinators]))

    def admin_bounce(self, *, domain: str | None = None, tag: str | None = None,
                     ids: list[str] | None = None) -> dict[str, int]:
        """Bounce (AdminBounce event) live messages by destination domain, tag
        (``key=value``) or id; in-flight ones are bounced if their attempt fails."""
        if not (domain or tag or ids):
            raise ValueError("give a domain, a tag or ids")
        targets = list(ids or [])
        if domain or tag:
            for found in ray.get([c.select.remote(domain, tag) for c in self.coordinators]):
                targets.extend(found)
        out: dict[str, int] = {}
        for k in range(0, len(targets), 10_000):
            for r in self.cancel(targets[k:k + 10_000]):
                key = r.split(" (")[0]
                out[key] = out.get(key, 0) + 1
        return out

    def inspect(self, msg_id: str) -> dict[str, Any] | None:
        return ray.get(self.coordinators[shard_of(msg_id, len(self.coordinators))]
                       .inspect.remote(msg_id))

    # ------------------------------------------------------------------ suppression
    SUPPRESS_CHUNK = 50_000

    def _on_every_shard(self, method: str, rows: list[Any], timeout: float) -> list[dict]:
        """``method(rows)`` on every shard (each holds the whole list), in chunks; the answers
        of shard 0 summed (every shard checks the same rows the same way)."""
        total: dict[str, Any] = {}
        for k in range(0, max(1, len(rows)), self.SUPPRESS_CHUNK):
            part = rows[k:k + self.SUPPRESS_CHUNK]
            answers = ray.get([getattr(c, method).remote(part) for c in self.coordinators],
                              timeout=timeout)
            for key, v in answers[0].items():
                if isinstance(v, int) and key != "shard":
                    total[key] = total.get(key, 0) + v
                elif isinstance(v, list):
                    total.setdefault(key, []).extend(v[: max(0, 100 - len(total.get(key, [])))])
        return [total]

    def suppress(self, entries: Iterable[str | dict[str, Any]] | str, *, reason: str = "manual",
                 scope: str = "", cause: str | None = None, expires_at: float | None = None,
                 timeout: float = 600.0) -> dict[str, Any]:
        """Suppress addresses (strings, or dicts with ``address``, ``scope``, ``reason``,
        ``cause``, ``expires_at``): mail to them is refused at submission (or dropped, with
        ``suppression.on_submit = "drop"``). Scope "" is every sender, else a sender domain
        (and its sub-domains). Reasons: hard-bounce, complaint, unsubscribe, manual. Durable on
        every shard before it returns; returns ``{"added", "refused", "errors"}``."""
        items = [entries] if isinstance(entries, str) else list(entries)
        rows = [[e, scope, reason, cause, expires_at] if isinstance(e, str) else e
                for e in items]
        return self._on_every_shard("suppress", rows, timeout)[0]

    def unsuppress(self, addresses: Iterable[str] | str, *, scope: str = "",
                   timeout: float = 600.0) -> dict[str, Any]:
        """Lift suppressions (of ``scope``: "" for the global ones); ``{"removed", ...}``."""
        items = [addresses] if isinstance(addresses, str) else list(addresses)
        return self._on_every_shard("unsuppress", [[a, scope] for a in items], timeout)[0]

    def suppressions(self, prefix: str = "", *, address: str | None = None,
                     limit: int = 1000) -> list[dict[str, Any]]:
        """Suppression entries (address, scope, reason, created, expires_at, cause) whose
        address starts with ``prefix``, or all of one ``address``."""
        return ray.get(self.coordinators[0].suppressions.remote(prefix, limit, address))

    # ------------------------------------------------------------------ replication, backups
    def replication(self) -> list[dict[str, Any]]:
        """Per shard: epoch, log end, and each copy's state and lag (records, seconds)."""
        return ray.get([c.replication.remote() for c in self.coordinators])

    def backup(self, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
        """Snapshot every shard into ``out_dir/<UTC time>/shard-<n>.msgpack``; returns where
        and how much. Each file is written atomically (``.tmp``, fsync, rename)."""
        from cluster.adapters.backup import backup_stamp, write_shard_backup
        stamp = backup_stamp()
        d = Path(out_dir) / stamp
        d.mkdir(parents=True, exist_ok=False)
        datas = ray.get([c.backup.remote() for c in self.coordinators])
        files = []
        messages = 0
        for shard, data in enumerate(datas):
            doc = msgpack.unpackb(data, raw=False)
            messages += len(doc["state"]["messages"])
            files.append(str(write_shard_backup(out_dir, stamp, shard, data)))
        return {"directory": str(d), "files": files, "messages": messages,
                "bytes": sum(len(x) for x in datas)}

    def restore(self, backup_dir: str | os.PathLike[str], *, chunk: int = 1000
                ) -> dict[str, Any]:
        """Queue every message of a backup (a directory of ``shard-<n>.msgpack``, as written by
        :meth:`backup` or the periodic backups) into this cluster, which must hold no live
        messages. Messages go to the shard their id hashes to here, so the shard count may
        differ from the backup's. Attempts and next-attempt times carry over, and so do the
        DSNs the backup still owed (``dsns``: how many are owed again here)."""
        files = sorted(Path(backup_dir).glob("shard-*.msgpack"))
        if not files:
            raise SubmitError(f"{backup_dir}: no shard-<n>.msgpack files: not a raymta backup")
        st = self.stats()
        if not st["serving"]:
            raise SubmitError("restore needs every queue shard serving; not serving: " + ", ".join(
                f"shard {s['shard']} ({s['not_serving']})" for s in st["shards"]
                if not s.get("serving")))
        live = st.get("live", 0)
        if live:
            raise SubmitError(f"restore needs an empty cluster; this one has {live} live "
                              "messages")
        shards = len(self.coordinators)
        restored = skipped = suppressed = dsns = 0
        for f in files:
            try:
                doc = msgpack.unpackb(f.read_bytes(), raw=False, strict_map_key=False)
                state = doc["state"]
                bodies = dict((bid, data) for bid, data in state["bodies"])
            except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
                raise SubmitError(f"{f}: not a raymta backup file ({e})") from None
            # per target shard: body id → rows
            per: dict[int, dict[str, list[Any]]] = {}
            for row in state["messages"]:
                per.setdefault(shard_of(row[0], shards), {}).setdefault(row[1], []).append(row)
            supp = state.get("suppression") or []
            if supp:   # every shard's backup holds the whole list: the first one is enough
                from cluster.core.suppression import rows_from_snapshot
                now = time.time()
                live = [r for r in rows_from_snapshot(supp) if not r[4] or r[4] > now]
                suppressed = self.suppress(live)["added"] if live and not suppressed else \
                    suppressed
            for shard, by_body in per.items():
                items = [[bid, bodies[bid], rows] for bid, rows in by_body.items()]
                for k in range(0, len(items), chunk):
                    res = ray.get(self.coordinators[shard].restore.remote(
                        msgpack.packb(items[k:k + chunk], use_bin_type=True)))
                    restored += res["restored"]
                    skipped += res["skipped"]
            # DSNs owed but not yet queued when the backup was taken: owed again here, on
            # the shard the original's id hashes to (which remembers what it settled)
            owed: dict[int, list[Any]] = {}
            for row in state.get("dsn_due") or ():
                owed.setdefault(shard_of(row[0], shards), []).append(row)
            for shard, rows in owed.items():
                for k in range(0, len(rows), chunk):
                    dsns += ray.get(self.coordinators[shard].restore_dsns.remote(
                        rows[k:k + chunk]))["dsns"]
        return {"files": len(files), "restored": restored, "skipped": skipped,
                "suppressions": suppressed, "dsns": dsns}

    def wait_until_idle(self, timeout: float = 60.0, poll: float = 0.2) -> bool:
        """Wait until every shard serves and none has a message queued, deferred or in flight;
        False on timeout. (A leader still recovering after a restart counts nothing yet.)"""
        deadline = time.time() + timeout
        while True:
            st = self.stats()
            if st["serving"] and st.get("live", 0) == 0 and st.get("pending_commit", 0) == 0:
                return True
            if time.time() >= deadline:
                return False
            time.sleep(poll)
