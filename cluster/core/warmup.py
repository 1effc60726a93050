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
- the counts (:class:`WarmupLedger`, one per queue shard): a batch of submissions lands on one
  shard, so the cap is not split over the shards in advance. Each source has a **home shard**
  (:func:`home_shard`) that keeps the day's total granted and writes it down in a ``u`` record
  (:func:`cluster.core.queue.warmup_record`) *before* it answers; every shard, the home
  included, sends from a cold source only counts granted to it, asked for a small block at a
  time (:func:`block_size`). A restarted leader starts with nothing granted, so a SIGKILL
  anywhere can only make a source send fewer than its cap (what a shard held unused, at most
  one block per shard), never more;
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
from cluster.core.sites import stable_hash

__all__ = [
    "DEFAULT",
    "POLICIES",
    "WarmupError",
    "WarmupLedger",
    "WarmupSchedule",
    "block_size",
    "choose_source",
    "grant",
    "home_shard",
    "merge_status",
    "next_day_start",
    "parse_schedule",
    "shard_status",
    "utc_day",
]

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


def home_shard(source: str, shards: int) -> int:
    """The shard that keeps ``source``'s counts (and grants blocks of them to the others)."""
    return stable_hash(f"warmup:{source}") % shards


def block_size(cap: int, shards: int, largest: int = 50) -> int:
    """How many counts a shard reserves at once: small next to the cap (what a shard holds
    unused is what the source may send less than its cap), at most ``largest``."""
    return max(1, min(largest, cap // (2 * shards)))


def grant(total: int, cap: int, n: int) -> int:
    """The home shard's answer to a request for ``n`` counts when ``total`` are already
    reserved today: never past the cap."""
    return max(0, min(n, cap - total))


@dataclass
class WarmupLedger:
    """One queue shard's warm-up counts today, per (source, provider, day) key.

    The durable total of a source is kept by its home shard (:func:`home_shard`) in ``u``
    records; a shard sends only counts the home granted it (:attr:`granted`, asked for a block
    at a time, :meth:`requests`). This leader's counts are soft: a restarted leader starts with
    none granted, so what it held unused is lost for the day (the source sends less), and what
    it sent stays in the home's total (it never sends more)."""

    schedules: Mapping[str, WarmupSchedule]      # source → its plan
    shards: int
    shard: int
    #: the most a block may be (:func:`block_size`)
    block: int = 50
    granted: dict[str, int] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)
    #: keys whose home said "nothing left today"
    capped: set[str] = field(default_factory=set)
    #: key → (counts asked, when the request went out; -1: not yet)
    asking: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: events to record: "source|provider|day|note"
    notes: set[str] = field(default_factory=set)

    @staticmethod
    def key(source: str, provider: str, day: int) -> str:
        return f"{source}|{provider}|{day}"

    def cold(self, source: str, now: float) -> bool:
        s = self.schedules.get(source)
        return s is not None and not s.warm(now)

    def take(self, source: str, provider: str, now: float) -> str:
        """Count one message for ``source``: "ok" (counted, or the source has no cap today),
        "capped" (today's cap is used up) or "wait" (a block is asked for: next round)."""
        s = self.schedules.get(source)
        cap = s.cap(provider, now) if s is not None else None
        if cap is None:
            return "ok"
        k = self.key(source, provider, utc_day(now))
        used, got = self.used.get(k, 0), self.granted.get(k, 0)
        if used < got:
            # (no asking ahead: a block this shard asks for and then has no mail for is lost
            # to the others for the day; a cold source waits a round per block instead)
            self.used[k] = used + 1
            return "ok"
        if cap == 0 or k in self.capped:
            self.notes.add(f"{k}|capped")
            return "capped"
        self._ask(k, block_size(cap, self.shards, self.block))
        return "wait"

    def _ask(self, k: str, n: int) -> None:
        if k not in self.asking:
            self.asking[k] = (n, -1.0)

    def requests(self, now: float) -> list[tuple[str, str, int, int]]:
        """Blocks to ask the home shards for now: ``(source, provider, day, n)``. One request
        per key at a time; one unanswered for 15 s is asked again."""
        out = []
        today = utc_day(now)
        for k, (n, sent) in list(self.asking.items()):
            src, prov, day = k.rsplit("|", 2)
            if int(day) < today:
                del self.asking[k]
            elif sent < 0 or now - sent > 15.0:
                self.asking[k] = (n, now)
                out.append((src, prov, int(day), n))
        for d in (self.used, self.granted):
            for k in [k for k in d if int(k.rsplit("|", 1)[1]) < today]:
                del d[k]    # bounded: yesterday's counts go
        self.capped = {k for k in self.capped if int(k.rsplit("|", 1)[1]) >= today}
        return out

    def answered(self, source: str, provider: str, day: int, asked: int, got: int | None
                 ) -> None:
        """The home's answer: ``got`` counts granted (fewer than asked: the cap is reached),
        None: the request failed (asked again next round)."""
        k = self.key(source, provider, day)
        self.asking.pop(k, None)
        if got is None:
            return
        self.granted[k] = self.granted.get(k, 0) + got
        if got < asked:
            self.capped.add(k)

    def choose(self, msg_id: str, weights: Mapping[str, float], provider: str, now: float,
               fallback: Mapping[str, float] | None = None) -> tuple[str | None, str]:
        """:func:`choose_source` with this ledger's counts and plans: ``(source, outcome)``."""
        def when_capped(src: str) -> str:
            s = self.schedules.get(src)
            return s.when_capped if s is not None else "overflow"

        src, outcome, notes = choose_source(
            msg_id, weights, when_capped, lambda x: self.take(x, provider, now), fallback)
        day = utc_day(now)
        for s, note in notes:
            self.notes.add(f"{self.key(s, provider, day)}|{note}")
        return src, outcome

    def take_notes(self, noted: set[str]) -> list[tuple[str, str, int, str]]:
        """First-of-the-day events to record, ``(source, provider, day, note)``; ``noted``:
        the ones the state already holds."""
        out = []
        for n in sorted(self.notes - noted):
            src, prov, day, note = n.rsplit("|", 3)
            out.append((src, prov, int(day), note))
        self.notes.clear()
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
    """One shard's rows today per (source, provider): ``count`` is the durable total (on the
    source's home shard only, else 0), ``sent`` what this leader sent since it started
    (:func:`merge_status` adds the shards up)."""
    day = utc_day(now)
    out = []
    for src, plan in sorted(ledger.schedules.items()):
        home = home_shard(src, ledger.shards) == ledger.shard
        provs = set(plan.rows[0][1])
        provs.update(k.split("|")[1] for k in (*reserved, *ledger.used)
                     if k.startswith(src + "|") and k.endswith(f"|{day}"))
        for p in sorted(provs):
            k = WarmupLedger.key(src, p, day)
            out.append({"source": src, "plan": plan.name, "day": plan.day_of(now),
                        "last_day": plan.last_day, "provider": p, "cap": plan.cap(p, now),
                        "count": reserved.get(k, 0) if home else 0,
                        "sent": ledger.used.get(k, 0), "when_capped": plan.when_capped})
    return out


def merge_status(per_shard: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The shards' rows added up per (source, provider)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for shard_rows in per_shard:
        for r in shard_rows:
            k = (r["source"], r["provider"])
            if k in rows:
                rows[k]["sent"] += r["sent"]
                rows[k]["count"] += r["count"]
            else:
                rows[k] = dict(r)
    return [rows[k] for k in sorted(rows)]
