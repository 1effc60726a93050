"""The shape of a queue: live messages by site and by age, as Postfix's ``qshape`` shows it.

Pure: takes the messages and ``now``, imports neither ``ray`` nor does any I/O. A site is the
one a message was last dispatched to (``m.site``), else its recipient domain (not routed yet).
Label cardinality is bounded: the ``top`` biggest sites by count keep their name, the rest are
summed as "other". Age is ``now - created``, in the fixed buckets of :data:`AGE_BUCKETS`.

Cost is bounded: past ``limit`` messages, a random sample of about ``limit`` is looked at and
scaled up (an estimate, within a few per cent for any site or bucket holding more than a few
per cent of the queue; random rather than every k-th, which aliases with round-robin
submissions); the total is exact, and the oldest age too when the messages come in arrival
order (a shard's dict does). The sample is drawn in C (``randbytes``, ``compress``).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Collection, Iterable
from typing import Any, Protocol

__all__ = ["AGE_BUCKETS", "OTHER", "age_bucket", "merge_shapes", "queue_shape"]

#: (label, upper bound in seconds): qshape's buckets, coarser past an hour
AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("0-5m", 300.0), ("5-10m", 600.0), ("10-20m", 1200.0), ("20-40m", 2400.0),
    ("40-80m", 4800.0), ("80m-4h", 14400.0), ("4h-1d", 86400.0), ("1d+", float("inf")))
OTHER = "other"


class _Msg(Protocol):
    site: str
    domain: str
    created: float
    state: str


def age_bucket(age: float) -> str:
    for label, bound in AGE_BUCKETS:
        if age < bound:
            return label
    return AGE_BUCKETS[-1][0]


def queue_shape(messages: Collection[_Msg], now: float, top: int = 20,
                limit: int = 20_000, by: str = "site") -> dict[str, Any]:
    """``{"sites": {key: n} (top + other), "ages": {bucket: n}, "oldest_age": s,
    "states": {state: n}, "site_ages": {key: {bucket: n}}, "total": n, "sampled": k}``
    (k: messages looked at; the counts are scaled by total / k; ``limit=0``: every message,
    exact). ``by``: "site" (the metrics' key) or "domain" (the recipient domain, as
    ``raymta queue`` and Postfix's qshape show it)."""
    if by not in ("site", "domain"):
        raise ValueError(f"by: {by!r} is not 'site' or 'domain'")
    by_domain = by == "domain"
    n_all = len(messages)
    first = next(iter(messages), None)
    sample: Iterable[_Msg] = messages
    if limit and n_all > limit:
        # each message is taken with probability limit / n_all (a byte below the threshold)
        threshold = max(1, min(255, round(256 * limit / n_all)))
        table = bytes(1 if b < threshold else 0 for b in range(256))
        sample = itertools.compress(messages, random.randbytes(n_all).translate(table))
    per_site: Counter[str] = Counter()
    per_age: Counter[str] = Counter()
    site_age: Counter[tuple[str, str]] = Counter()
    states: Counter[str] = Counter()
    oldest = now
    total = 0
    bounds = AGE_BUCKETS
    for m in sample:
        total += 1
        created = m.created
        oldest = min(oldest, created)
        age = now - created
        for label, bound in bounds:
            if age < bound:
                break
        site = m.domain if by_domain else (m.site or m.domain)
        per_site[site] += 1
        per_age[label] += 1
        site_age[(site, label)] += 1
        states[m.state] += 1
    if first is not None and first.created < oldest:
        oldest = first.created
    scale = n_all / total if total else 1.0

    def up(v: int) -> int:
        return round(v * scale)
    keep = {s for s, _ in per_site.most_common(top)}
    sites: Counter[str] = Counter()
    site_ages: dict[str, Counter[str]] = {}
    for (site, label), n in site_age.items():
        key = site if site in keep else OTHER
        sites[key] += n
        site_ages.setdefault(key, Counter())[label] += n
    return {"total": n_all, "sites": {k: up(v) for k, v in sites.items()},
            "ages": {k: up(v) for k, v in per_age.items()},
            "oldest_age": max(0.0, now - oldest) if total else 0.0,
            "states": {k: up(v) for k, v in states.items()},
            "site_ages": {s: {k: up(v) for k, v in c.items()} for s, c in site_ages.items()},
            "sampled": total}


def merge_shapes(shapes: Iterable[dict[str, Any]], top: int = 20) -> dict[str, Any]:
    """Shapes of several shards as one (the top sites chosen again over the sum)."""
    sites: Counter[str] = Counter()
    ages: Counter[str] = Counter()
    states: Counter[str] = Counter()
    site_ages: dict[str, Counter[str]] = {}
    oldest = 0.0
    total = 0
    for sh in shapes:
        total += sh["total"]
        oldest = max(oldest, sh["oldest_age"])
        sites.update(sh["sites"])
        ages.update(sh["ages"])
        states.update(sh.get("states", {}))
        for s, c in sh.get("site_ages", {}).items():
            site_ages.setdefault(s, Counter()).update(c)
    keep = {s for s, _ in sites.most_common(top + 1) if s != OTHER}
    keep = set(sorted(keep, key=lambda s: -sites[s])[:top])
    out_sites: Counter[str] = Counter()
    out_site_ages: dict[str, Counter[str]] = {}
    for s, n in sites.items():
        key = s if s in keep else OTHER
        out_sites[key] += n
        out_site_ages.setdefault(key, Counter()).update(site_ages.get(s, {}))
    return {"total": total, "sites": dict(out_sites), "ages": dict(ages), "oldest_age": oldest,
            "states": dict(states), "site_ages": {s: dict(c) for s, c in out_site_ages.items()}}
