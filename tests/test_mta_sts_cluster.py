"""MTA-STS (RFC 8461) in a running cluster, with real parts on loopback: the test DNS server
publishes each domain's MX, ``_mta-sts`` TXT record and policy host; a loopback HTTPS server
with a test CA serves the policies; a TLS sink holds a certificate for its MX names, a plain
sink offers no STARTTLS.

- enforce.test (enforce, MX matches, valid certificate): delivered over TLS;
- mismatch.test (enforce, its MX is not in the policy's patterns): deferred 4.7.5 naming the
  patterns, never sent;
- notls.test (enforce, MX without STARTTLS): deferred 4.7.5, never sent in plaintext;
- testing.test (testing, MX without STARTTLS): delivered in plaintext, the relay counts the
  failure (``sts_testing_failures``, overall and for the site);
- override.test (enforce policy that would refuse it, but a [[site]] entry sets ``tls``):
  the operator's setting wins, delivered;
- shared.test (no policy) shares mismatch.test's MX, hence its site: delivered all the same
  (a policy binds its own domain's messages only)."""

from __future__ import annotations

import dataclasses
import ssl
import time

import pytest

from tests.conftest import pipeline_config, raw_message, wait_for
from tests.ingress_certs import make_ca
from tests.mta_sts_helpers import PolicyServer, policy_text

pytestmark = pytest.mark.timeout(180)

HTTPS_HOST = "127.0.0.71"
TLS_SINK = "127.0.0.72"
PLAIN_SINK = "127.0.0.73"


def test_mta_sts_enforce_and_testing_in_a_cluster(tmp_path, dns_server) -> None:
    import ray

    from actors.remote import list_relays
    from cluster.client import MailCluster
    from cluster.core.sites import SiteOverride
    from cluster.devservers import SmtpSink

    ca = make_ca(tmp_path / "ca")
    mx_cert, mx_key = ca.server_cert("mx.enforce.test", [], stem="mx",
                                     also=["mx.other.test", "mx.override.test"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(mx_cert, mx_key)
    domains = ["enforce.test", "mismatch.test", "notls.test", "testing.test", "override.test"]
    web_cert, web_key = ca.server_cert(f"mta-sts.{domains[0]}", [], stem="web",
                                       also=[f"mta-sts.{d}" for d in domains[1:]])
    tls_sink = SmtpSink(TLS_SINK, name="tls", tls_context=ctx).start()
    plain = SmtpSink(PLAIN_SINK, tls_sink.port, name="plain").start()
    web = PolicyServer(HTTPS_HOST, web_cert, web_key).start()
    z = dns_server
    mx = {"enforce.test": ("mx.enforce.test", TLS_SINK), "mismatch.test": ("mx.other.test",
          TLS_SINK), "notls.test": ("mx.notls.test", PLAIN_SINK),
          "testing.test": ("mx.testing.test", PLAIN_SINK),
          "override.test": ("mx.override.test", TLS_SINK)}
    for d, (host, addr) in mx.items():
        z.add_a(host, addr)
        z.add_mx(d, [(10, host)])
        z.add_record(f"_mta-sts.{d}", "TXT", '"v=STSv1; id=20261205"')
        z.add_a(f"mta-sts.{d}", HTTPS_HOST)
    z.add_mx("shared.test", [(10, "mx.other.test")])
    web.serve("enforce.test", policy_text("enforce", ["*.enforce.test"]))
    web.serve("mismatch.test", policy_text("enforce", ["mx.mismatch.test", "*.mx.mismatch.test"]))
    web.serve("notls.test", policy_text("enforce", ["mx.notls.test"]))
    web.serve("testing.test", policy_text("testing", ["mx.testing.test"]))
    web.serve("override.test", policy_text("enforce", ["mx.elsewhere.test"]))
    try:
        cfg = pipeline_config(str(tmp_path / "spool"), dns_server.port, tls_sink.port)
        cfg = dataclasses.replace(
            cfg, delivery=dataclasses.replace(cfg.delivery, mta_sts_port=web.port,
                                              tls_ca_file=str(ca.ca_file)),
            sites=cfg.sites + (SiteOverride(cfg.site_defaults, domain="override.test",
                                            tls_set=True),))
        assert cfg.delivery.mta_sts     # on by default
        with MailCluster.connect(config=cfg, num_cpus=2) as mc:
            # shared.test first: its message heads the shared site's queue
            domains.insert(0, "shared.test")
            rcpts = [f"user@{d}" for d in domains]
            t0 = time.monotonic()
            res = mc.submit([{"sender": "s@origin.test", "recipients": [r],
                              "raw": raw_message(i, r)} for i, r in enumerate(rcpts)])
            assert all(r.accepted for r in res), [r.error for r in res]
            ids = dict(zip(domains, (r.ids[0] for r in res)))

            def first_failures() -> dict[str, dict]:
                out: dict[str, dict] = {}
                for e in mc.events(0, limit=1_000_000):
                    if e["type"] == "TransientFailure":
                        out.setdefault(e["id"], e)
                return out

            wait_for(lambda: all(mc.status(ids[d])["state"] == "delivered"
                                 for d in ("enforce.test", "testing.test", "override.test",
                                           "shared.test"))
                     and {ids["mismatch.test"], ids["notls.test"]} <= set(first_failures()),
                     60, "four deliveries and two MTA-STS deferrals")
            took = time.monotonic() - t0
            got = {r.rcpt_to: r for r in tls_sink.received + plain.received}
            assert set(got) == {"user@enforce.test", "user@testing.test", "user@override.test",
                                "user@shared.test"}
            assert got["user@enforce.test"].tls and got["user@enforce.test"].sink == "tls"
            assert not got["user@testing.test"].tls and got["user@testing.test"].sink == "plain"
            fails = first_failures()
            mis, notls = fails[ids["mismatch.test"]], fails[ids["notls.test"]]
            assert mis["text"] == ("MTA-STS: no MX host of mismatch.test matches its enforce "
                                   "policy (mx: mx.mismatch.test, *.mx.mismatch.test): "
                                   "mx.other.test refused"), mis
            assert notls["text"] == ("MTA-STS: TLS required: mx.notls.test [127.0.0.73] does "
                                     "not offer STARTTLS"), notls
            for f in (mis, notls):
                assert f["enhanced"] == "4.7.5" and f["category"] == "auth-failure", f
            assert mc.status(ids["notls.test"])["state"] != "delivered"
            relay = ray.get_actor(list_relays(cfg.cluster.namespace)[0],
                                  namespace=cfg.cluster.namespace)
            st = ray.get(relay.stats.remote(), timeout=30)
            sts = st["mta_sts"]
            assert sts["sts_testing_failures"] >= 1 and sts["sts_deferred"] >= 2, sts
            assert sts["sts_enforced_connections"] >= 1, sts
            # every policy fetched once (the deferred domains are retried from the cache)
            assert sts["sts_fetches"] == 4 == sum(web.requests.values()), (sts, web.requests)
            assert web.requests["mta-sts.override.test"] == 0   # its site's tls wins
            # the TXT records were looked up by the throttle beside the MX, once per domain
            # for the cluster, and came to the relay with the batches: none of its own
            assert sts["sts_lookups"] == 0 and sts["sts_txt_given"] >= 5, sts
            txt_asked = {d: z.queries[(f"_mta-sts.{d}", "TXT")] for d in domains}
            assert set(txt_asked.values()) == {1}, txt_asked
            site_figs = st["tls_sites"]
            assert site_figs["mx.testing.test"]["sts_testing_failures"] >= 1, site_figs
            assert site_figs["mx.enforce.test"]["sts_enforced"] >= 1, site_figs
            print(f"mta-sts: 4 delivered, 2 deferred in {took:.1f} s; relay {sts}; "
                  f"tls_sites {site_figs}")
    finally:
        web.stop()
        plain.stop()
        tls_sink.stop()
