"""Config: documented defaults, typed values, and errors that name the key and the problem."""

import pytest

from cluster.config import Config, ConfigError, load_config, parse_config, parse_size
from cluster.core.ratespec import RateSpec


def test_defaults_follow_the_design_card():
    c = Config()
    assert c.queue.retry.max_age == 5 * 86400
    assert c.site_defaults.max_connections == 10
    assert c.site_defaults.deliveries_per_connection == 100
    assert c.site_defaults.rates == (RateSpec.parse("100/s"),)
    assert c.delivery.smtp_port == 25
    assert c.egress[0].name == "default"
    assert c.delivery.throttle_actors == "auto" and c.delivery.fixed_throttles is None
    assert parse_config({"delivery": {"throttle_actors": 3}}).delivery.fixed_throttles == 3
    assert c.delivery.max_connections == 1000


def test_full_config_parses_to_typed_values(tmp_path):
    p = tmp_path / "raymta.toml"
    p.write_text("""
[spool]
directory = "/var/spool/raymta"
segment_bytes = "32MiB"
[queue]
retry_initial = "5m"
retry_max_delay = "2h"
max_age = "3d"
max_message_size = "20MB"
[dns]
nameservers = ["127.0.0.1"]
port = 5353
[delivery]
smtp_port = 2525
[[egress]]
name = "ip1"
bind_address = "127.0.0.1"
ehlo_name = "mta1.example.com"
[site_defaults]
rate = ["100/s", "20000/h"]
[[site]]
mx_suffix = "google.com"
max_connections = 5
deliveries_per_connection = 50
tls = "required"
dedicated = true
[[site]]
domain = "example.org"
rate = "5/m"
[routes]
"smarthost.test" = "127.0.0.5:2526"
""")
    c = load_config(p)
    assert c.spool.segment_bytes == 32 * 1024 * 1024
    assert c.queue.retry.initial == 300 and c.queue.retry.max_delay == 7200
    assert c.queue.retry.max_age == 3 * 86400
    assert c.queue.max_message_size == 20_000_000
    assert c.dns.nameservers == ("127.0.0.1",) and c.dns.port == 5353
    assert c.delivery.smtp_port == 2525
    assert c.egress[0].bind_address == "127.0.0.1"
    assert c.site_defaults.rates == (RateSpec.parse("100/s"), RateSpec.parse("20000/h"))
    g = c.sites[0]
    assert g.mx_suffix == "google.com" and g.limits.max_connections == 5 and g.limits.dedicated
    assert g.limits.rates == c.site_defaults.rates  # inherits what it does not set
    assert c.sites[1].limits.rates == (RateSpec.parse("5/m"),)
    assert c.route_for("smarthost.test").port == 2526


@pytest.mark.parametrize("raw, key, words", [
    ({"queue": {"retry_initial": "soon"}}, "queue.retry_initial", "soon"),
    ({"queue": {"max_age": "-5"}}, "queue.max_age", ""),
    ({"queue": {"shards": 0}}, "queue.shards", "between"),
    ({"queue": {"typo_key": 1}}, "queue.typo_key", "unknown key"),
    ({"spool": {"fsync": "yes"}}, "spool.fsync", "true or false"),
    ({"spool": {"segment_bytes": "lots"}}, "spool.segment_bytes", "size"),
    ({"dns": {"nameservers": ["resolver.example"]}}, "dns.nameservers[0]", "not an IP"),
    ({"dns": {"port": 70000}}, "dns.port", "between"),
    ({"dns": {"servfail_ttl": "0s"}}, "dns.servfail_ttl", ""),
    ({"delivery": {"smtp_port": "25"}}, "delivery.smtp_port", "integer"),
    ({"delivery": {"mta_sts": "on"}}, "delivery.mta_sts", "true or false"),
    ({"delivery": {"dane": "yes"}}, "delivery.dane", "true or false"),
    ({"delivery": {"mta_sts_port": 0}}, "delivery.mta_sts_port", "between"),
    ({"delivery": {"max_connections": 0}}, "delivery.max_connections", "between 1 and"),
    ({"delivery": {"max_connections": "1000"}}, "delivery.max_connections", "integer"),
    ({"site_defaults": {"rate": "fast"}}, "site_defaults.rate", "fast"),
    ({"site_defaults": {"tls": "maybe"}}, "site_defaults.tls", "opportunistic"),
    ({"site_defaults": {"max_connections": 0}}, "site_defaults.max_connections", "between"),
    ({"site": [{"max_connections": 3}]}, "site[0]", "exactly one"),
    ({"site": [{"domain": "a.test", "sources": ["nope"]}]}, "site[0].sources", "unknown egress"),
    ({"egress": [{"name": "a"}, {"name": "a"}]}, "egress[1].name", "duplicate"),
    ({"egress": [{"bind_address": "somewhere"}]}, "egress[0].bind_address", "not an IP"),
    ({"routes": {"x.test": "host-without-port"}}, "routes.x.test", "host:port"),
    ({"nonsense": {}}, "nonsense", "unknown key"),
    ({"cluster": {"replicas": 9}}, "cluster.replicas", "between"),
    ({"replication": {"ack_timeout": "never"}}, "replication.ack_timeout", "never"),
    ({"replication": {"transport": "carrier-pigeon"}}, "replication.transport", "carrier-pigeon"),
    ({"backup": {"keep": 0}}, "backup.keep", ""),
    ({"spool": {"per_node": 1}}, "spool.per_node", "true or false"),
    ({"spool": {"event_retain_bytes": "plenty"}}, "spool.event_retain_bytes", "size"),
    ({"spool": {"event_retain_bytes": -1}}, "spool.event_retain_bytes", "negative"),
    ({"spool": {"event_retain_bytes": "1MiB"}}, "spool.event_retain_bytes",
     ("must be 0 (no retention for webhook endpoints) or at least spool.event_file_bytes "
      "(67108864), got 1048576")),
    ({"spool": {"event_retain_bytes": 4095, "event_file_bytes": 4096}},
     "spool.event_retain_bytes", "at least spool.event_file_bytes (4096)"),
    ({"spool": {"snapshot_held_events_bytes": "lots"}}, "spool.snapshot_held_events_bytes",
     "size"),
    ({"delivery": {"throttle_actors": "many"}}, "delivery.throttle_actors", '"auto"'),
    ({"delivery": {"throttle_actors": 0}}, "delivery.throttle_actors", "between"),
    ({"delivery": {"throttle_max_sites": 5}}, "delivery.throttle_max_sites", ">= 100"),
    ({"delivery": {"throttle_site_idle": "a while"}}, "delivery.throttle_site_idle", "a while"),
])
def test_bad_values_name_the_key_and_the_problem(raw, key, words):
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    assert ei.value.key == key
    assert words in str(ei.value)


def test_servfail_ttl_reaches_the_resolver_policy():
    from cluster.config import parse_config
    assert parse_config({}).dns.policy().cache_ttl("servfail") == 10.0
    policy = parse_config({"dns": {"servfail_ttl": "2s"}}).dns.policy()
    assert policy.cache_ttl("servfail") == 2.0
    # a timeout is never remembered longer than a SERVFAIL
    assert parse_config({"dns": {"servfail_ttl": "500ms"}}).dns.policy().cache_ttl("timeout") \
        == 0.5


def test_unreadable_and_invalid_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


@pytest.mark.parametrize("raw, n", [
    ({}, 1 << 30),                                          # the default: 1 GiB a shard
    ({"event_retain_bytes": 0}, 0),                         # no retention
    ({"event_retain_bytes": "4KiB", "event_file_bytes": 4096}, 4096),
    ({"event_retain_bytes": "8GiB"}, 8 << 30),
])
def test_event_retain_bytes(raw, n):
    assert parse_config({"spool": raw}).spool.event_retain_bytes == n


@pytest.mark.parametrize("text, n", [("10MB", 10_000_000), ("64MiB", 64 << 20), (1024, 1024),
                                     ("1.5k", 1500), ("2 GiB", 2 << 30)])
def test_sizes(text, n):
    assert parse_size(text) == n


def test_a_spool_with_more_shards_than_configured_is_refused(tmp_path):
    from cluster.deploy import check_spool_shards
    cfg = parse_config({"spool": {"directory": str(tmp_path)}, "queue": {"shards": 2}})
    check_spool_shards(cfg)                                   # empty spool: fine
    for s in range(4):
        (tmp_path / f"shard-{s}" / "copy-0").mkdir(parents=True)
    check_spool_shards(cfg)                                   # empty directories: fine
    (tmp_path / "shard-1" / "copy-0" / "log-000001").write_bytes(b"x")
    check_spool_shards(cfg)                                   # within the count: fine
    (tmp_path / "shard-3" / "copy-0" / "log-000001").write_bytes(b"x")
    with pytest.raises(ConfigError) as e:
        check_spool_shards(cfg)
    assert e.value.key == "queue.shards"
    assert "shard 3" in str(e.value) and "queue.shards = 4" in str(e.value)
    per_node = parse_config({"spool": {"directory": str(tmp_path / "pn"), "per_node": True},
                             "queue": {"shards": 1}})
    (tmp_path / "pn" / "node-abc" / "shard-1" / "copy-2").mkdir(parents=True)
    (tmp_path / "pn" / "node-abc" / "shard-1" / "copy-2" / "snapshot").write_bytes(b"x")
    with pytest.raises(ConfigError, match="queue.shards = 2"):
        check_spool_shards(per_node)


def test_cluster_yaml_starts_ray_with_the_embedded_system_config():
    """A launched cluster (cluster.yaml) runs Ray with the same system settings as the
    embedded default, so the two do not drift apart."""
    import json
    import shlex
    from pathlib import Path

    import yaml

    from cluster.deploy import RAY_CLUSTER_SYSTEM_CONFIG, RAY_SYSTEM_CONFIG
    root = Path(__file__).resolve().parent.parent
    doc = yaml.safe_load((root / "cluster.yaml").read_text())
    found = [json.loads(arg.split("=", 1)[1]) for cmd in doc["head_start_ray_commands"]
             for arg in shlex.split(cmd) if arg.startswith("--system-config=")]
    assert found == [RAY_CLUSTER_SYSTEM_CONFIG]
    assert RAY_SYSTEM_CONFIG["max_direct_call_object_size"] >= 1 << 20
