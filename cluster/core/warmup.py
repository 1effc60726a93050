"""IP warm-up: how many messages a cold egress source may send per provider per UTC day.

A new address that suddenly sends a lot looks like a spammer to Gmail, Yahoo or Outlook, so
operators ramp it up over weeks (PowerMTA's and KumoMTA's warm-up plans): day 1 at most 50 to
Gmail, day 2 at most 100, ... and past the plan's last day the source is warm (no cap).

Owns:

- the schedule (:class:`WarmupSchedule`, parsed by :func:`parse_schedule` from ``[warmup.NAME]``):
  a start date (day 1, UTC), rows ``{day = N, <provider> = max per day, ...}`` whose caps hold from
  day N until the next row (the last row for its day only), and what happens to a message whose
  cold source is at its cap: ``overflow`` (another source of its pool with room sends it) or
  ``hold`` (it waits for the next day, deferred without an attempt);
- the per-shard ledger (:class:`WarmupLedger`): each queue shard may send ``share`` of a
  (source, provider)'s daily cap (the cap split evenly over the shards, so no shard ever asks
  another), and it **reserves** counts in blocks through a durable ``u`` record
  (:func:`cluster.core.queue.warmup_record`) *before* handing messages to the source. A
  restarted leader starts from the reserved count (every reserved count is taken as used), so a
  SIGKILL at any moment can only make the source send fewer than its cap, never more;
- the choice of source for one message (:func:`choose_source`).

A provider is the shaping rules' provider of the site (MX host suffixes,
``cluster/shaping_rules.toml``); sites of no listed provider count under ``default``. A
schedule without a ``default`` column leaves those sites uncapped.

Pure: no Ray, no I/O; every time is an argument.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.core.relay_choice import weighted_pick

__all__ = ["DEFAULT", "POLICIES", "WarmupError", "WarmupSchedule", "WarmupLedger",
           "choose_source", "next_day_start", "parse_schedule", "shard_share", "utc_day"]

#: the column for sites of no listed provider
DEFAULT = "default"
POLICIES = ("overflow", "hold")
_DAY = 86400.0


class WarmupError(ValueError):
    """A schedule value is wrong: ``key`` is the dotted path, ``problem`` what is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def utc_day(now: float) -> int:
    """Days since 1970-01-01, UTC (the key a day's counts are kept under)."""
    return int(now // _DAY)


def next_day_start(now: float) -> float:
    return (utc_day(now) + 1) * _DAY


def shard_share(cap: int, shards: int, shard: int) -> int:
    """Shard ``shard``'s part of a daily cap: even, the remainder to the first shards, so the
    parts add up to the cap exactly."""
    base, extra = divmod(cap, shards)
    return base + (1 if shard < extra else 0)


@dataclass(frozen=True)
class WarmupSchedule:
    name: str
    #: day 1 of the plan (UTC)
    start: _dt.date
    #: ((day, {provider: max messages that day}), ...), days increasing
    rows: tuple[tuple[int, Mapping[str, int]], ...]
    #: "overflow" or "hold"
    when_capped: str = "overflow"

    def day_of(self, now: float) -> int:
        """The plan's day at ``now`` (1 on the start date; 0 or less before it)."""
        return utc_day(now) - (self.start - _dt.date(1970, 1, 1)).days + 1

    @property
    def last_day(self) -> int:
        return self.rows[-1][0]

    def warm(self, now: float) -> bool:
        return self.day_of(now) > self.last_day

    def cap(self, provider: str, now: float) -> int | None:
        """Today's cap for ``provider`` (None: no cap, the source is warm or the provider has
        no column and there is no ``default``); 0 before the start date."""
        day = self.day_of(now)
        if day > self.last_day:
            return None
        caps = self.rows[0][1]
        if day < self.rows[0][0]:
            caps = {p: 0 for p in caps}
        for d, row in self.rows:
            if d <= day:
                caps = row
        if provider in caps:
            return caps[provider]
        return caps.get(DEFAULT)


def _date(v: Any, key: str) -> _dt.date:
    if isinstance(v, _dt.datetime):
        raise WarmupError(key, f"expected a date such as 2026-12-01, got a date-time {v}")
    if isinstance(v, _dt.date):
        return v
    if isinstance(v, str):
        try:
            return _dt.date.fromisoformat(v)
        except ValueError:
            pass
    raise WarmupError(key, f"expected a date such as 2026-12-01, got {v!r}")


def parse_schedule(name: str, raw: Any, providers: Sequence[str], where: str = ""
                   ) -> WarmupSchedule:
    """``[warmup.NAME]``: ``start``, ``when_capped`` and ``days = [{day = 1, gmail = 20,
    default = 50}, ...]``. Errors name the key (``warmup.NAME.days[2].gmail``)."""
    w = where or f"warmup.{name}"
    if not isinstance(raw, Mapping):
        raise WarmupError(w, "expected a table")
    for k in raw:
        if k not in ("start", "when_capped", "days"):
            raise WarmupError(f"{w}.{k}", "unknown key (allowed: days, start, when_capped)")
    if "start" not in raw:
        raise WarmupError(f"{w}.start", "missing: the plan's day 1 (UTC), e.g. 2026-12-01")
    start = _date(raw["start"], f"{w}.start")
    policy = raw.get("when_capped", "overflow")
    if policy not in POLICIES:
        raise WarmupError(f"{w}.when_capped", f"expected 'overflow' or 'hold', got {policy!r}")
    days = raw.get("days")
    if not isinstance(days, list) or not days:
        raise WarmupError(f"{w}.days", "expected a list such as [{day = 1, default = 50}]")
    known = set(providers) | {DEFAULT}
    rows: list[tuple[int, dict[str, int]]] = []
    for i, row in enumerate(days):
        rw = f"{w}.days[{i}]"
        if not isinstance(row, Mapping):
            raise WarmupError(rw, "expected a table {day = N, <provider> = max per day}")
        day = row.get("day")
        if isinstance(day, bool) or not isinstance(day, int) or day < 1:
            raise WarmupError(f"{rw}.day", f"expected a day number >= 1, got {day!r}")
        if rows and day <= rows[-1][0]:
            raise WarmupError(f"{rw}.day", f"day {day} is not after day {rows[-1][0]}")
        caps: dict[str, int] = {}
        for p, v in row.items():
            if p == "day":
                continue
            if p not in known:
                raise WarmupError(f"{rw}.{p}", f"unknown provider (known: "
                                  f"{', '.join(sorted(known))})")
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise WarmupError(f"{rw}.{p}", f"expected a message count >= 0, got {v!r}")
            caps[p] = v
        if not caps:
            raise WarmupError(rw, "names no provider (e.g. default = 50)")
        if rows:
            prev_day, prev = rows[-1]
            if set(caps) != set(prev):
                raise WarmupError(rw, f"names providers {sorted(caps)}, day {prev_day} names "
                                  f"{sorted(prev)}: every row names the same ones")
            for p, v in caps.items():
                if v < prev[p]:
                    raise WarmupError(f"{rw}.{p}", f"{v} is below day {prev_day}'s {prev[p]}: "
                                      "a warm-up never goes down")
        rows.append((day, caps))
    return WarmupSchedule(name, start, tuple(rows), policy)


@dataclass
class Budget:
    """One (source, provider)'s standing today on one shard."""

    cap: int | None          # the whole cluster's cap today (None: none)
    share: int               # this shard's part of it
    used: int                # sent (reserved counts after a restart) today by this shard
    reserved: int            # durably reserved today by this shard


@dataclass
class WarmupLedger:
    """Today's counts of one queue shard, per (source, provider).

    ``reserved`` is the durable side (the shard's applied ``u`` records, "source|provider|day"
    → count, :attr:`cluster.core.queue.QueueState.warmup`); :attr:`used` is this leader's own
    count since it started, and starts at the reserved count (a restart forgets what was left
    of a block, never what was sent)."""

    schedules: Mapping[str, WarmupSchedule]      # source → its plan
    shards: int
    shard: int
    #: counts reserved per record; the last block of a day is cut to the share
    block: int = 50
    used: dict[str, int] = field(default_factory=dict)
    #: key → the reservation asked for (a record on its way)
    asked: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: events to record: "source|provider|day|note" (made once a day per shard: the state
    #: keeps the ones already made)
    notes: set[str] = field(default_factory=set)

    @staticmethod
    def key(source: str, provider: str, day: int) -> str:
        return f"{source}|{provider}|{day}"

    def cold(self, source: str, now: float) -> bool:
        s = self.schedules.get(source)
        return s is not None and not s.warm(now)

    def budget(self, source: str, provider: str, now: float,
               reserved: Mapping[str, int]) -> Budget | None:
        s = self.schedules.get(source)
        cap = s.cap(provider, now) if s is not None else None
        if cap is None:
            return None
        k = self.key(source, provider, utc_day(now))
        r = reserved.get(k, 0)
        return Budget(cap, shard_share(cap, self.shards, self.shard), self.used.get(k, r), r)

    def take(self, source: str, provider: str, now: float, reserved: Mapping[str, int]) -> str:
        """Count one message for ``source``: "ok" (counted, or the source has no cap),
        "capped" (this shard's share of today's cap is used up) or "wait" (within the cap,
        but the reservation it needs is not durable yet: ask again next round)."""
        b = self.budget(source, provider, now, reserved)
        if b is None:
            return "ok"
        k = self.key(source, provider, utc_day(now))
        # pinned at first sight: a restarted leader counts every reserved message as sent
        self.used.setdefault(k, b.used)
        if b.used >= b.share:
            self.notes.add(f"{k}|capped")
            return "capped"
        if b.used >= b.reserved:
            self._ask(k, min(b.share, b.used + self.block), now)
            return "wait"
        self.used[k] = b.used + 1
        if b.reserved - (b.used + 1) < self.block // 2 and b.reserved < b.share:
            self._ask(k, min(b.share, b.reserved + self.block), now)   # the next block, early
        return "ok"

    def _ask(self, k: str, want: int, now: float) -> None:
        prev = self.asked.get(k)
        if prev is None or prev[0] < want or now - prev[1] > 5.0:
            self.asked[k] = (max(want, prev[0] if prev else 0), -1.0)   # -1: not sent yet

    def choose(self, msg_id: str, weights: Mapping[str, float], provider: str, now: float,
               reserved: Mapping[str, int], fallback: Mapping[str, float] | None = None
               ) -> tuple[str | None, str]:
        """:func:`choose_source` with this ledger's counts and plans: ``(source, outcome)``."""
        def when_capped(src: str) -> str:
            s = self.schedules.get(src)
            return s.when_capped if s is not None else "overflow"

        src, outcome, notes = choose_source(
            msg_id, weights, when_capped,
            lambda x: self.take(x, provider, now, reserved), fallback)
        day = utc_day(now)
        for s, note in notes:
            self.notes.add(f"{self.key(s, provider, day)}|{note}")
        return src, outcome

    def records(self, now: float, reserved: Mapping[str, int], noted: set[str]
                ) -> list[tuple[str, str, int, int, str]]:
        """What to write down now: reservations and first-of-the-day events, as
        ``(source, provider, day, reserved count, note)``; ``noted``: the notes the state
        already holds."""
        out = [(s, p, d, n, "") for s, p, d, n in self.reservations(now, reserved)]
        for n in sorted(self.notes):
            if n not in noted:
                src, prov, day, note = n.rsplit("|", 3)
                k = self.key(src, prov, int(day))
                out.append((src, prov, int(day), reserved.get(k, 0), note))
        self.notes.clear()
        return out

    def reservations(self, now: float, reserved: Mapping[str, int]) -> list[tuple[str, str, int,
                                                                             int]]:
        """Reservations to record now: ``(source, provider, day, count)``; each is asked
        again after 5 s if its record has not applied by then (a commit that failed)."""
        out = []
        today = utc_day(now)
        for k, (want, sent) in list(self.asked.items()):
            src, prov, day = k.rsplit("|", 2)
            if int(day) < today or reserved.get(k, 0) >= want:
                del self.asked[k]
                continue
            if sent < 0 or now - sent > 5.0:
                self.asked[k] = (want, now)
                out.append((src, prov, int(day), want))
        for k in [k for k in self.used if int(k.rsplit("|", 1)[1]) < today]:
            del self.used[k]    # bounded: yesterday's counts go
        return out


def choose_source(key: str, weights: Mapping[str, float], when_capped: Callable[[str], str],
                  take: Callable[[str], str], fallback: Mapping[str, float] | None = None
                  ) -> tuple[str | None, str, list[tuple[str, str]]]:
    """The source of one message: ``(source or None, outcome, notes)``.

    The message's own pick by weight (:func:`weighted_pick` on ``key``) if it has room
    (``take`` counts it). If that source is capped, its ``when_capped`` decides: "hold" → no
    source (outcome "hold": the message waits for the next day); "overflow" → the pick among
    the others (of ``weights``, then of ``fallback``) that have room. Outcome "wait": a
    reservation is on its way. ``notes``: ``(source, "overflow" | "hold")`` for the events."""
    w = dict(weights)
    notes: list[tuple[str, str]] = []
    pool = w
    while True:
        if not pool:
            if fallback and pool is w:
                pool = {k: v for k, v in fallback.items() if k not in weights}
                continue
            return None, "hold", notes
        src = weighted_pick(key, pool)
        r = take(src)
        if r == "ok":
            return src, "ok", notes
        if r == "wait":
            return None, "wait", notes
        if when_capped(src) == "hold":
            notes.append((src, "hold"))
            return None, "hold", notes
        notes.append((src, "overflow"))
        del pool[src]


def shard_status(ledger: WarmupLedger, now: float, reserved: Mapping[str, int]
                 ) -> list[dict[str, Any]]:
    """One shard's standing today per (source, provider): the plan's providers and the ones
    counted today (``raymta status``, :func:`merge_status`)."""
    day = utc_day(now)
    out = []
    for src, plan in sorted(ledger.schedules.items()):
        provs = set(plan.rows[0][1])
        provs.update(k.split("|")[1] for k in reserved
                     if k.startswith(src + "|") and k.endswith(f"|{day}"))
        for p in sorted(provs):
            b = ledger.budget(src, p, now, reserved)
            out.append({"source": src, "plan": plan.name, "day": plan.day_of(now),
                        "last_day": plan.last_day, "provider": p,
                        "cap": b.cap if b else None, "sent": b.used if b else 0,
                        "reserved": b.reserved if b else 0, "when_capped": plan.when_capped})
    return out


def merge_status(per_shard: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The shards' rows added up per (source, provider): ``sent`` and ``reserved`` are sums,
    the rest is the plan's."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for shard_rows in per_shard:
        for r in shard_rows:
            k = (r["source"], r["provider"])
            if k in rows:
                rows[k]["sent"] += r["sent"]
                rows[k]["reserved"] += r["reserved"]
            else:
                rows[k] = dict(r)
    return [rows[k] for k in sorted(rows)]
