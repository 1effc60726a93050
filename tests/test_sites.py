"""Site rollup: domains sharing an MX set are one site; overrides by domain and MX suffix."""

import pytest

from cluster.core.ratespec import RateSpec
from cluster.core.sites import (SiteLimits, SiteOverride, StaticRoute, site_for, site_key,
                                throttle_actor_name)

GOOGLE = SiteLimits(max_connections=5, deliveries_per_connection=50, tls="required",
                    dedicated=True)
SLOW = SiteLimits(rates=(RateSpec.parse("5/m"),))
OVR = (SiteOverride(SLOW, domain="slow.example"), SiteOverride(GOOGLE, mx_suffix="google.com"))
DEF = SiteLimits()


@pytest.mark.parametrize("domain, mx, key, limits", [
    ("a.example", ["aspmx.l.google.com", "alt1.aspmx.l.google.com"],
     "alt1.aspmx.l.google.com,aspmx.l.google.com", GOOGLE),
    ("b.example", ["ALT1.aspmx.l.google.com.", "aspmx.l.google.com"],
     "alt1.aspmx.l.google.com,aspmx.l.google.com", GOOGLE),
    ("c.example", ["mx.c.example"], "mx.c.example", DEF),
    ("slow.example", ["aspmx.l.google.com"], "domain:slow.example", SLOW),
    ("d.example", ["notgoogle.com.evil"], "notgoogle.com.evil", DEF),
    ("e.example", ["mailgoogle.com"], "mailgoogle.com", DEF),
])
def test_site_and_limits(domain, mx, key, limits):
    s = site_for(domain, mx, DEF, OVR)
    assert s.key == key
    assert s.limits == limits


def test_site_key_ignores_order_and_duplicates():
    assert site_key(["b", "a", "B."]) == site_key(["a", "b"]) == "a,b"


def test_static_route_is_its_own_site():
    s = site_for("x.test", ["127.0.0.9"], DEF, OVR, StaticRoute("x.test", "127.0.0.9", 2525))
    assert s.key == "route:127.0.0.9:2525"


def test_throttle_names_dedicated_or_hashed_stably():
    assert throttle_actor_name("mx.a", True, 4) == "throttle:mx.a"
    names = {throttle_actor_name(f"site{i}", False, 4) for i in range(200)}
    assert names == {f"throttle:pool:{k}" for k in range(4)}
    assert throttle_actor_name("site7", False, 4) == throttle_actor_name("site7", False, 4)


def test_limits_round_trip_through_the_wire_form():
    from cluster.core.sites import limits_from_wire, limits_to_wire
    lim = SiteLimits(rates=(RateSpec.parse("50/s,burst=5"), RateSpec.parse("20000/h")),
                     max_connections=3, deliveries_per_connection=40, tls="required",
                     dedicated=True, sources=("ip1", "ip2"))
    assert limits_from_wire(limits_to_wire(lim)) == lim
    assert limits_from_wire(limits_to_wire(GOOGLE)) == GOOGLE
    # both directions are cached: a wire dict that went through msgpack (a fresh, equal dict)
    # parses to the very same object, and the same limits give the very same dict
    import msgpack
    w = msgpack.unpackb(msgpack.packb(limits_to_wire(lim)), raw=False)
    assert w is not limits_to_wire(lim) and limits_from_wire(w) is limits_from_wire(
        limits_to_wire(lim))
    assert limits_to_wire(lim) is limits_to_wire(lim)
