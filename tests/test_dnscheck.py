"""``raymta dns-check`` against loopback zones: one domain set up right, and broken ones.

Every lookup goes to the LoopbackDNS server of the test (the config's nameservers); the test
also proves no other server was needed by checking the server saw the queries."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from cluster.adapters.dkim_keys import dns_record
from cluster.cli import main
from cluster.config import parse_config
from cluster.dnscheck import Resolver, _spf_terms, check_fcrdns, run_checks, spf_lookup_count
from tests.dkim_helpers import publish, txt_strings, write_key

EGRESS = "127.0.0.42"
BADPTR = "127.0.0.43"


def _txt(dns, name, *texts):
    for t in texts:
        dns.add_record(name, "TXT", txt_strings(t))


@pytest.fixture(scope="module")
def zones(dns_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("dnscheck")
    good_key = rsa.generate_private_key(65537, 2048)
    other_key = rsa.generate_private_key(65537, 2048)
    ed = ed25519.Ed25519PrivateKey.generate()
    files = {"good": write_key(d / "good.pem", good_key), "ed": write_key(d / "ed.pem", ed)}
    dns = dns_server
    dns.add_a("relay.raymta.test", EGRESS)
    dns.add_record("42.0.0.127.in-addr.arpa", "PTR", "relay.raymta.test.")
    dns.add_record("43.0.0.127.in-addr.arpa", "PTR", "elsewhere.test.")
    dns.add_a("elsewhere.test", "127.0.0.99")
    for dom in ("good.test", "twospf.test", "eleven.test", "nodmarc.test", "pnone.test",
                "nosel.test", "mismatch.test"):
        dns.add_a(f"mx.{dom}", "127.0.0.2")
        dns.add_mx(dom, [(10, f"mx.{dom}")])
        if dom not in ("twospf.test", "eleven.test"):
            _txt(dns, dom, f"v=spf1 ip4:{EGRESS} include:_spf.good.test -all")
        if dom not in ("nodmarc.test", "pnone.test"):
            _txt(dns, f"_dmarc.{dom}", f"v=DMARC1; p=reject; rua=mailto:dmarc@{dom}")
        _txt(dns, f"_mta-sts.{dom}", "v=STSv1; id=20261204")
        _txt(dns, f"_smtp._tls.{dom}", f"v=TLSRPTv1; rua=mailto:tls@{dom}")
        if dom == "mismatch.test":
            publish(dns, "s1", dom, dns_record(other_key))
        elif dom != "nosel.test":
            publish(dns, "s1", dom, dns_record(good_key))
            publish(dns, "e1", dom, dns_record(ed))
    _txt(dns, "_spf.good.test", "v=spf1 ip4:192.0.2.0/24 ~all")
    _txt(dns, "twospf.test", f"v=spf1 ip4:{EGRESS} -all", "v=spf1 mx -all")
    for i in range(11):
        _txt(dns, f"inc{i}.spf.test", "v=spf1 ip4:198.51.100.0/24 -all")
    _txt(dns, "eleven.test", "v=spf1 " + " ".join(f"include:inc{i}.spf.test"
                                                  for i in range(11)) + f" ip4:{EGRESS} -all")
    _txt(dns, "_dmarc.pnone.test", "v=DMARC1; p=none")
    keys = [{"domain": dom, "selector": "s1", "key_file": str(files["good"])}
            for dom in ("good.test", "twospf.test", "eleven.test", "nodmarc.test",
                        "pnone.test", "nosel.test", "mismatch.test")]
    keys.append({"domain": "good.test", "selector": "e1", "algorithm": "ed25519",
                 "key_file": str(files["ed"])})
    raw = {"dns": {"nameservers": ["127.0.0.1"], "port": dns.port, "timeout": "2s"},
           "egress": [{"name": "ip1", "bind_address": EGRESS,
                       "ehlo_name": "relay.raymta.test"}],
           "dkim": {"key": keys}}
    return {"dns": dns, "raw": raw, "cfg": parse_config(raw), "dir": d}


def _run(zones, domain, cfg=None, **kw):
    c = cfg or zones["cfg"]
    return run_checks(domain, c, Resolver(c.dns.nameservers, c.dns.port, 2.0), **kw)


def _by(checks, area, status):
    return [c for c in checks if c.area == area and c.status == status]


def test_a_domain_set_up_right_passes_everything(zones):
    before = zones["dns"].query_count()
    checks = _run(zones, "good.test")
    assert [c for c in checks if c.status != "pass"] == []
    areas = {c.area for c in checks}
    assert areas == {"MX", "SPF", "DKIM", "DMARC", "FCrDNS", "MTA-STS", "TLS-RPT"}
    assert len(_by(checks, "DKIM", "pass")) == 2          # rsa and ed25519, both match
    assert any("egress ip1 (127.0.0.42): SPF pass" in c.detail for c in checks)
    assert zones["dns"].query_count() - before >= 10       # answered by the loopback server


@pytest.mark.parametrize("domain,area,text", [
    ("twospf.test", "SPF", "2 SPF records"),
    ("eleven.test", "SPF", "11 DNS-querying terms"),
    ("nodmarc.test", "DMARC", "no DMARC record"),
    ("nosel.test", "DKIM", "no key record at s1._domainkey.nosel.test"),
    ("mismatch.test", "DKIM", "does not match the configured private key"),
])
def test_broken_domains_fail_with_a_fix(zones, domain, area, text):
    checks = _run(zones, domain)
    bad = [c for c in _by(checks, area, "fail") if text in c.detail]
    assert bad, [c for c in checks if c.status != "pass"]
    assert bad[0].fix
    # the other areas are unaffected
    assert not [c for c in checks if c.status == "fail" and c.area != area]


def test_dmarc_p_none_warns(zones):
    checks = _run(zones, "pnone.test")
    w = [c for c in _by(checks, "DMARC", "warn") if "p=none" in c.detail]
    assert w and "quarantine" in w[0].fix
    assert [c for c in _by(checks, "DMARC", "warn") if "no rua" in c.detail]


def test_ptr_mismatch_fails(zones):
    raw = dict(zones["raw"])
    raw["egress"] = [{"name": "ip2", "bind_address": BADPTR, "ehlo_name": "relay.raymta.test"}]
    checks = _run(zones, "good.test", cfg=parse_config(raw))
    f = _by(checks, "FCrDNS", "fail")
    assert f and "elsewhere.test does not resolve back to 127.0.0.43" in f[0].detail
    # and SPF says this address is not covered
    assert [c for c in _by(checks, "SPF", "fail") if BADPTR in c.detail]


def test_fcrdns_ehlo_must_be_the_ptr_name():
    c = check_fcrdns("ip1", "192.0.2.1", "mta.example.com", ["host-1.isp.test"],
                     {"host-1.isp.test": ["192.0.2.1"]})
    assert c.status == "fail" and 'ehlo_name = "host-1.isp.test"' in c.fix


@pytest.mark.parametrize("record,ok", [
    ("v=spf1 ip4:192.0.2.0/24 -all", True),
    ("v=spf1 a/24 mx:example.com/28 ~all", True),
    ("v=spf1 redirect=_spf.example.com", True),
    ("v=spf1 ip4:300.1.1.1 -all", False),
    ("v=spf1 foo:bar -all", False),
    ("v=spf1 include: -all", False),
])
def test_spf_syntax(record, ok):
    if ok:
        assert _spf_terms(record)
    else:
        with pytest.raises(ValueError):
            _spf_terms(record)


def test_spf_lookup_count_follows_includes():
    zone = {"a.test": ["v=spf1 include:b.test mx a -all"],
            "b.test": ["v=spf1 exists:x.test redirect=c.test"],
            "c.test": ["v=spf1 ptr -all"]}
    assert spf_lookup_count("a.test", lambda d: zone.get(d, [])) == 1 + 1 + 1 + 1 + 1 + 1


def test_cli_keygen_and_dns_check(zones, tmp_path, capsys):
    assert main(["dkim", "keygen", "--domain", "new.test", "--selector", "k1", "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    key = tmp_path / "new.test" / "k1.rsa.pem"
    assert (key.stat().st_mode & 0o777) == 0o600
    line = next(x for x in out.splitlines() if x.startswith("k1._domainkey.new.test. IN TXT"))
    assert "v=DKIM1; k=rsa; p=" in line
    assert key.read_text() not in out                      # the key itself is not printed
    assert main(["dkim", "keygen", "--domain", "new.test", "--selector", "k1", "--out",
                 str(tmp_path)]) == 2                      # never overwrites
    assert "exists already" in capsys.readouterr().err
    # dns-check from a config file: good.test passes (exit 0), twospf.test fails (exit 1)
    cfgf = tmp_path / "raymta.toml"
    cfgf.write_text(
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {zones["dns"].port}\ntimeout = "2s"\n'
        f'[[egress]]\nname = "ip1"\nbind_address = "{EGRESS}"\n'
        f'ehlo_name = "relay.raymta.test"\n'
        f'[[dkim.key]]\ndomain = "good.test"\nselector = "s1"\n'
        f'key_file = "{zones["dir"] / "good.pem"}"\n')
    assert main(["dns-check", "good.test", "--config", str(cfgf)]) == 0
    table = capsys.readouterr().out
    assert "PASS DKIM     selector s1: rsa 2048 bits published, matches the configured key" \
        in table and " 0 fail" in table
    assert main(["dns-check", "twospf.test", "--json", "--config", str(cfgf)]) == 1
    res = json.loads(capsys.readouterr().out)
    assert res["fail"] >= 1 and any("2 SPF records" in c["detail"] for c in res["checks"])
