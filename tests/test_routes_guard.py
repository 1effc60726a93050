"""[routes] smart hosts go through the MX address guard too (cluster/core/mxguard.py), driven
on a RelayPool object with a real config (no Ray, no sockets: the decision comes before any
connection). A route host outside ``delivery.allow_networks`` on a refused range defers its
mail (transient 4.4.4, the configuration's fault, not the recipient's) instead of being used;
one inside an allowed network is used; an MX route keeps its permanent 5.4.4."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import pipeline_config


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    from actors.relay_pool import RelayPool
    from cluster.core.sites import StaticRoute
    cfg = pipeline_config(str(tmp_path_factory.mktemp("spool")), 53, 2525)
    cfg = dataclasses.replace(
        cfg, routes=(StaticRoute("smart.test", "10.1.2.3", 2525),
                     StaticRoute("lan.test", "10.9.9.9", 25),
                     StaticRoute("named.test", "relay.corp.test", 587)),
        delivery=dataclasses.replace(cfg.delivery, allow_networks=("10.9.9.0/24",)))
    return RelayPool(cfg, "relay:test:default", cfg.egress[0])


def _spec(hosts: list, port: int) -> dict:
    from cluster.core.sites import SiteLimits, limits_to_wire
    return {"hosts": hosts, "port": port, "limits": limits_to_wire(SiteLimits()),
            "throttle": "throttle:pool:0", "items": []}


@pytest.mark.parametrize("site, hosts, port, outcome, enhanced, text", [
    ("route:10.1.2.3:2525", [[0, "10.1.2.3", ["10.1.2.3"]]], 2525, "transient", "4.4.4",
     ("[routes] 10.1.2.3 resolves only to 10.1.2.3, a private address; refused "
      "(delivery.allow_networks)")),
    # a route host name resolving to loopback
    ("route:relay.corp.test:587", [[0, "relay.corp.test", ["127.0.0.3"]]], 587, "transient",
     "4.4.4", ("[routes] relay.corp.test resolves only to 127.0.0.3, a loopback address; "
               "refused (delivery.allow_networks)")),
    ("route:10.9.9.9:25", [[0, "10.9.9.9", ["10.9.9.9"]]], 25, None, None, None),
    # not a route (the port differs from the route's): an MX, refused permanently as before
    ("mx.private.test", [[10, "10.1.2.3", ["10.1.2.3"]]], 25, "permanent", "5.4.4",
     ("10.1.2.3 resolves only to 10.1.2.3, a private address; refused "
      "(delivery.allow_networks)")),
])
def test_route_hosts_are_guarded_and_allowed_networks_win(relay, site, hosts, port, outcome,
                                                         enhanced, text) -> None:
    s = relay._site(site, _spec(hosts, port))
    c = relay._guard(s)
    if outcome is None:
        assert c is None and s.usable_hosts == hosts
        return
    assert c is not None and s.usable_hosts == []
    assert (c.outcome.value, c.enhanced, c.category, c.text) == (outcome, enhanced, "routing",
                                                                  text)
