"""Rate specifications and the GCRA arithmetic that enforces them.

Owns three small concepts: durations written the way operators write them (``"250ms"``,
``"5m"``, ``"1h30m"``), rate specs that round-trip through strings (``"100/h,burst=10"``, after
KumoMTA's ``ThrottleSpec``), and the Generic Cell Rate Algorithm limiter (:class:`Gcra`,
combined by :class:`MultiLimiter`) that a SiteThrottle uses to grant "send up to N now".

Pure: no clock (``now`` is always an argument, seconds on any monotonic-enough scale), no I/O,
no Ray. Limiters are soft state: a fresh limiter is idle, i.e. allows a full burst.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "UNLIMITED",
    "Gcra",
    "MultiLimiter",
    "RateSpec",
    "format_duration",
    "parse_duration",
]

#: what an empty :class:`MultiLimiter` reports as available ("no limit")
UNLIMITED = 1 << 30

# Duration units, longest spelling first is not needed: the tokenizer takes a whole word.
_UNIT_SECONDS: dict[str, Fraction] = {}
for _names, _secs in (
    (("ms", "msec", "msecs", "millisecond", "milliseconds"), Fraction(1, 1000)),
    (("s", "sec", "secs", "second", "seconds"), Fraction(1)),
    (("m", "min", "mins", "minute", "minutes"), Fraction(60)),
    (("h", "hr", "hrs", "hour", "hours"), Fraction(3600)),
    (("d", "day", "days"), Fraction(86400)),
    (("w", "wk", "wks", "week", "weeks"), Fraction(604800)),
):
    for _n in _names:
        _UNIT_SECONDS[_n] = _secs

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_PLAIN_NUMBER = re.compile(rf"\s*({_NUMBER})\s*")
_DURATION_TERM = re.compile(rf"\s*({_NUMBER})\s*([a-z]+)\s*")


def parse_duration(value: str | float) -> float:
    """Seconds in ``value``: a number of seconds, or text such as ``"250ms"``, ``"10s"``,
    ``"5m"``, ``"2h"``, ``"5d"``, ``"1w"`` or a sum of terms (``"1h30m"``, ``"1h 30m"``).

    Units are case-insensitive; ``m`` is minutes (``ms`` is milliseconds). A bare number in text
    (``"30"``) is seconds. Negative, infinite and NaN durations are refused.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"expected a duration such as '10s' or '5m', got {value!r}")
    if not isinstance(value, str):
        secs = float(value)
        if not math.isfinite(secs) or secs < 0:
            raise ValueError(f"invalid duration {value!r}: must be a finite number >= 0")
        return secs
    text = value.strip().lower()
    if not text:
        raise ValueError("invalid duration '': empty (expected e.g. '10s', '5m', '1h30m')")
    plain = _PLAIN_NUMBER.fullmatch(text)
    if plain:
        return float(Fraction(plain.group(1)))
    total = Fraction(0)
    pos = 0
    # Exact arithmetic (Fraction) so that format_duration's output parses back bit-for-bit.
    while pos < len(text):
        m = _DURATION_TERM.match(text, pos)
        if m is None:
            raise ValueError(f"invalid duration {value!r}: cannot read {text[pos:]!r} "
                             "(expected terms like '250ms', '10s', '5m', '2h', '5d', '1w')")
        unit = _UNIT_SECONDS.get(m.group(2))
        if unit is None:
            raise ValueError(f"invalid duration {value!r}: unknown unit {m.group(2)!r} "
                             "(use ms, s, m, h, d or w)")
        total += Fraction(m.group(1)) * unit
        pos = m.end()
    return float(total)


_FORMAT_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))
_WEEK_MS = 604_800_000


def format_duration(seconds: float) -> str:
    """The shortest conventional text for ``seconds``: ``"0s"``, ``"250ms"``, ``"5m"``,
    ``"1h30m"``, ``"2w"``. Whole milliseconds use units; anything finer is written as
    decimal seconds. ``parse_duration(format_duration(x)) == x`` for every finite ``x >= 0``.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"expected a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format duration {seconds!r}: must be a finite number >= 0")
    if seconds == 0:
        return "0s"
    ms = round(seconds * 1000)
    if ms == 0 or ms / 1000 != seconds:
        return f"{float(seconds)!r}s"
    if ms % _WEEK_MS == 0:
        return f"{ms // _WEEK_MS}w"
    parts = []
    for unit, size in _FORMAT_UNITS:
        q, ms = divmod(ms, size)
        if q:
            parts.append(f"{q}{unit}")
    return "".join(parts)


# "limit / period [, option=value ...]"; the period is a bare unit ("h") or a duration ("5m").
_RATE = re.compile(r"\s*(\d+)\s*/\s*([^,]+?)\s*(?:,(.*))?", re.DOTALL)
_OPTION = re.compile(r"\s*([a-z_]+)\s*=\s*(\S+?)\s*")
_BURST_OPTIONS = ("burst", "max_burst")  # max_burst: KumoMTA's spelling
_PERIOD_NAMES = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "d"}


@dataclass(frozen=True)
class RateSpec:
    """At most ``limit`` events per ``period`` seconds, with up to ``burst`` at once.

    ``burst`` defaults to ``limit`` (KumoMTA's ``max_burst`` default): an idle limiter lets a
    whole period's worth through at once. Pass ``burst=0`` (the default) to mean "same as
    limit"; the stored value is then ``limit``.
    """

    limit: int
    period: float
    burst: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit <= 0:
            raise ValueError(f"rate limit must be a positive integer, got {self.limit!r}")
        if (isinstance(self.period, bool) or not isinstance(self.period, (int, float))
                or not math.isfinite(self.period) or self.period <= 0):
            raise ValueError(f"rate period must be a positive number of seconds, "
                             f"got {self.period!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 0:
            raise ValueError(f"rate burst must be an integer >= 1, got {self.burst!r}")
        object.__setattr__(self, "period", float(self.period))
        if self.burst == 0:
            object.__setattr__(self, "burst", self.limit)

    @classmethod
    def parse(cls, text: str) -> RateSpec:
        """``"100/s"``, ``"5000/h"``, ``"50/min"``, ``"10/5m"``, ``"100/h,burst=10"``.

        Period units: s/sec/second, m/min/minute, h/hour, d/day (any case, plural allowed),
        or any duration ``parse_duration`` reads (``"5m"``, ``"90s"``).
        """
        if not isinstance(text, str):
            raise TypeError(f"expected a rate such as '100/s', got {text!r}")
        m = _RATE.fullmatch(text.lower())
        if m is None:
            raise ValueError(f"invalid rate {text!r}: expected 'LIMIT/PERIOD[,burst=N]', "
                             "e.g. '100/s', '5000/h', '10/5m', '100/h,burst=10'")
        limit = int(m.group(1))
        if limit <= 0:
            raise ValueError(f"invalid rate {text!r}: limit must be greater than zero")
        period_text = m.group(2)
        try:
            unit = _UNIT_SECONDS.get(period_text)
            period = float(unit) if unit is not None else parse_duration(period_text)
        except ValueError:
            raise ValueError(f"invalid rate {text!r}: unknown period {period_text!r} "
                             "(use s, min, h, d or a duration such as '5m')") from None
        if period <= 0:
            raise ValueError(f"invalid rate {text!r}: period must be greater than zero")
        burst = 0
        if m.group(3) is not None:
            for opt in m.group(3).split(","):
                om = _OPTION.fullmatch(opt)
                if om is None:
                    raise ValueError(f"invalid rate {text!r}: cannot read option {opt.strip()!r}"
                                     " (expected 'burst=N')")
                name, val = om.groups()
                if name not in _BURST_OPTIONS:
                    raise ValueError(f"invalid rate {text!r}: unknown option {name!r} "
                                     "(known: burst)")
                if not val.isdigit() or int(val) < 1:
                    raise ValueError(f"invalid rate {text!r}: burst must be an integer >= 1, "
                                     f"got {val!r}")
                burst = int(val)
        return cls(limit, period, burst)

    def __str__(self) -> str:
        period = _PERIOD_NAMES.get(self.period) or format_duration(self.period)
        out = f"{self.limit}/{period}"
        if self.burst != self.limit:
            out += f",burst={self.burst}"
        return out

    @property
    def per_second(self) -> float:
        return self.limit / self.period

    @property
    def emission_interval(self) -> float:
        """Seconds of "credit" one event uses: GCRA's T."""
        return self.period / self.limit


# Slack for float rounding when turning a fractional cell count into whole events: without
# it, 0.9999999999 cells (a rounding artefact of exactly 1) would refuse an event.
_EPS = 1e-9


class Gcra:
    """Generic Cell Rate Algorithm limiter for one :class:`RateSpec` (ITU-T I.371 GCRA,
    virtual-scheduling form), as used by KumoMTA and redis-cell.

    With emission interval ``T = period / limit``, an event at time ``t`` conforms when the
    theoretical arrival time ``TAT <= t + (burst - 1) * T``; taking it sets
    ``TAT = max(TAT, t) + T``. The TAT is stored as a backlog of cells at an anchor time
    (``TAT = anchor + backlog * T``) so that large Unix timestamps do not eat the precision
    of small emission intervals.

    Guarantees (up to float rounding of ~1e-9 events):

    * from idle, at most ``burst`` events are taken at one instant;
    * over ANY closed time window ``[a, a + w]`` (idle at ``a`` or not), the number of events
      taken at times inside the window is at most ``burst + floor(w * limit / period)``.
      (After each take, ``TAT <= t + burst*T``, and each event pushes TAT up by ``T`` from at
      least ``a``, so ``n*T <= w + burst*T``.)
    * a limiter taken greedily from idle reaches that bound: ``burst`` at once, then one event
      every ``T``.

    Time that runs backwards (``now`` earlier than a previous call) counts as no time passing.
    """

    __slots__ = ("_anchor", "_backlog", "_burst", "_t", "spec")

    def __init__(self, spec: RateSpec) -> None:
        self.spec = spec
        self._anchor = -math.inf   # time of the last take
        self._backlog = 0.0        # cells outstanding at _anchor (TAT - anchor) / T
        # the spec's burst and T, read on every take (a throttle takes for every site of every
        # grant round: the property's division and the attribute chain showed in profiles)
        self._burst = spec.burst
        self._t = spec.emission_interval

    def _outstanding(self, now: float) -> float:
        if self._backlog <= 0.0:
            return 0.0
        elapsed = now - self._anchor
        if elapsed <= 0.0:
            return self._backlog
        return max(0.0, self._backlog - elapsed / self._t)

    def available(self, now: float) -> int:
        """How many events could be taken at ``now`` without waiting."""
        return self._available(self._outstanding(now))

    def _available(self, outstanding: float) -> int:
        if outstanding <= 0.0:   # idle: the whole burst (as the general formula gives)
            return self._burst
        return max(0, min(self._burst, math.floor(self._burst - outstanding + _EPS)))

    def take(self, now: float, n: int = 1) -> int:
        """Take up to ``n`` events at ``now``; returns how many were taken (0..n)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"can only take a whole number >= 0 of events, got {n!r}")
        out = self._outstanding(now)
        k = min(n, self._available(out))
        if k > 0:
            self._backlog = out + k
            self._anchor = max(self._anchor, now)
        return k

    def wait_time(self, now: float) -> float:
        """Seconds from ``now`` until at least one more event conforms (0 if one does now)."""
        if self.available(now) >= 1:
            return 0.0
        # one event conforms once the backlog has drained to burst - 1 cells
        excess = self._outstanding(now) - (self.spec.burst - 1)
        at = now + max(0.0, excess * self.spec.emission_interval)
        # ``now + wait`` rounds to the float grid of ``now`` (2.4e-7 s at Unix times): step up
        # to the first representable time at which the event really conforms.
        for _ in range(64):
            if self.available(at) >= 1:
                break
            at = math.nextafter(at, math.inf)
        return at - now

    def idle(self, now: float) -> bool:
        """Nothing outstanding at ``now``: a fresh limiter would behave the same."""
        return self._outstanding(now) <= 0.0

    def __repr__(self) -> str:
        return f"Gcra({str(self.spec)!r}, backlog={self._backlog:.3f} at {self._anchor})"


class MultiLimiter:
    """Several limiters that all apply (e.g. ``100/s`` AND ``20000/h``).

    Takes are all-or-nothing across members: ``take`` takes the same count from every member,
    the minimum any of them allows. An empty MultiLimiter is unlimited.
    """

    __slots__ = ("members",)

    def __init__(self, members: Iterable[Gcra] = ()) -> None:
        self.members: list[Gcra] = list(members)

    @classmethod
    def from_specs(cls, specs: Iterable[RateSpec]) -> MultiLimiter:
        return cls(Gcra(s) for s in specs)

    def available(self, now: float) -> int:
        return min((g.available(now) for g in self.members), default=UNLIMITED)

    def take(self, now: float, n: int = 1) -> int:
        if len(self.members) == 1:   # the usual case: the member's own take is all-or-nothing
            return self.members[0].take(now, n)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"can only take a whole number >= 0 of events, got {n!r}")
        k = min(n, self.available(now))
        for g in self.members:
            taken = g.take(now, k)
            # every member allowed at least k a moment ago, at the same `now`
            assert taken == k, (taken, k)
        return k

    def wait_time(self, now: float) -> float:
        """Seconds until every member allows at least one more event."""
        return max((g.wait_time(now) for g in self.members), default=0.0)

    def idle(self, now: float) -> bool:
        """Every member idle: dropping this limiter and building it again loses nothing."""
        return all(g.idle(now) for g in self.members)

    def state(self) -> list[list[float]]:
        """Each member's ``[anchor, backlog]`` (to hand a site to another throttle)."""
        return [[g._anchor, g._backlog] for g in self.members]

    def restore(self, state: list[list[float]]) -> None:
        """Take over :meth:`state` of a limiter of the same specs."""
        if len(state) != len(self.members):
            raise ValueError(f"limiter state of {len(state)} members for "
                             f"{len(self.members)}")
        for g, (anchor, backlog) in zip(self.members, state):
            g._anchor, g._backlog = float(anchor), float(backlog)

    def __repr__(self) -> str:
        return f"MultiLimiter({self.members!r})"
