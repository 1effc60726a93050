"""No client can break a shard: random and malformed payloads over each leader's submit stream
and over Ray calls, then a SIGKILL of each leader (it must replay), then good mail, delivered
once. Real leaders on a local Ray, real sockets, real SMTP sinks."""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from typing import Any

import msgpack
import pytest

from tests.conftest import MAIN_SINKS, pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    from cluster.client import MailCluster
    from cluster.devservers import SinkGroup
    with SinkGroup(MAIN_SINKS[:1]) as sinks:
        dns_server.add_a("mx.fuzz.test", MAIN_SINKS[0])
        dns_server.add_mx("fuzz.test", [(10, "mx.fuzz.test")])
        cfg = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port,
                              sinks.port)
        with MailCluster.connect(config=cfg, num_cpus=2) as mc:
            yield {"mc": mc, "sinks": sinks, "cfg": cfg}


def _good(tag: str, n: int) -> list[dict[str, Any]]:
    return [{"sender": "s@origin.test", "recipients": [f"{tag}{i}@fuzz.test"],
             "raw": raw_message(i, f"{tag}{i}@fuzz.test")} for i in range(n)]


def _payloads(rng: random.Random, shard: int, live_ids: list[str]) -> list[Any]:
    """Hostile payloads for one shard: garbage bytes, msgpack of the wrong shapes, items with
    wrong types, foreign or repeated ids, the id of a live message beside a new one."""
    from cluster.core.intake import wire_item
    from cluster.core.message import new_message_ids, prepare
    now = 1_790_000_000.0

    def item(rcpts: list[str]) -> list[Any]:
        p = prepare({"sender": "s@origin.test", "recipients": rcpts, "subject": "x",
                     "text": "y\n"}, now=now)
        return wire_item(p, new_message_ids(now, len(p.recipients), shard, 2))

    out: list[Any] = [b"", b"\xc1\xc1", os.urandom(64), msgpack.packb(5),
                      msgpack.packb({"a": 1}), msgpack.packb([1, 2, 3]),
                      msgpack.packb([[None] * 10]), msgpack.packb([["x"] * 10]), 12345, None]
    poison = item(["p1@fuzz.test", "p2@fuzz.test"])
    poison[3][1][0] = rng.choice(live_ids)            # a live message's id beside a new one
    twice = item(["t1@fuzz.test", "t2@fuzz.test"])
    twice[3][1][0] = twice[3][0][0]                   # one id for two recipients
    other = item(["o@fuzz.test"])
    other[3][0][0] = other[0] = new_message_ids(now, 1, 1 - shard, 2)[0]
    crlf = item(["c@fuzz.test"])
    crlf[3][0][1] = "c@fuzz.test\r\nRCPT TO:<x@evil.test>"
    uni = item(["u@fuzz.test"])
    uni[3][0][2] = "füzz.test"
    out += [msgpack.packb(b, use_bin_type=True) for b in
            ([poison], [twice], [other], [crlf], [uni], [poison, twice, other, crlf])]
    for _ in range(30):   # random junk in random fields of real items
        it = item([f"r{rng.randrange(10**6)}@fuzz.test"])
        for _ in range(rng.randint(1, 3)):
            it[rng.randrange(10)] = rng.choice(
                [-1, 2**63, "", b"", [], {}, "x" * 500, float("nan"), [[1, 2, 3]]])
        out.append(msgpack.packb([it], use_bin_type=True))
    return out


def test_hostile_payloads_leave_every_shard_serving_replaying_and_delivering(env):
    import ray

    from cluster.adapters.stream import BlockingStreamClient, StreamError
    mc, sinks = env["mc"], env["sinks"]
    good = _good("before", 20)
    first = mc.submit(good[:10]) + mc.submit(good[10:])   # calls take turns over the shards
    assert all(r.accepted for r in first)
    rng = random.Random(7)
    from cluster.client import shard_of
    answered = 0
    for shard, coord in enumerate(mc.coordinators):
        ids = [r.ids[0] for r in first if shard_of(r.ids[0], 2) == shard]
        assert ids, "the first batch went to one shard: submit another"
        host, port, token = ray.get(coord.submit_endpoint.remote(), timeout=30)
        for k, payload in enumerate(_payloads(rng, shard, ids)):
            # every other payload over the stream, the rest as Ray calls
            if k % 2 == 0:
                try:
                    conn = BlockingStreamClient.connect(host, port, token, timeout=5)
                    answers = conn.call("submit", payload, timeout=30)
                    conn.close()
                except StreamError:
                    continue   # the server may close a stream on a frame it cannot read
            else:
                answers = ray.get(coord.submit.remote(payload), timeout=30)
            assert isinstance(answers, list) and answers, answers
            for a in answers:   # every hostile item is refused, for good
                assert "ids" not in a and a["error"] and a["retryable"] is False, a
            answered += 1
    assert answered >= 40
    stats = mc.stats()["shards"]
    assert all(st["serving"] for st in stats), [st["not_serving"] for st in stats]
    assert sum(st["refused_items"] for st in stats) >= 40
    assert all(st["quarantined"] == 0 for st in stats)   # nothing bad reached the log

    # each leader SIGKILLed: it must claim, replay and serve again
    for s in range(2):
        pid = mc.stats()["shards"][s]["pid"]
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(st.get("serving") and st["pid"] not in (0,)
                         for st in _shard_stats(mc)), 120, "both leaders serving again")
    stats = _shard_stats(mc)
    assert all(st["recovered"]["records"] > 0 for st in stats), stats
    assert all(st["quarantined"] == 0 for st in stats)

    after = mc.submit(_good("after", 20))
    assert all(r.accepted for r in after), [r.error for r in after]
    want = {f"{t}{i}@fuzz.test" for t in ("before", "after") for i in range(20)}
    wait_for(lambda: want <= {r.rcpt_to for r in sinks.received}, 90, "good mail delivered")
    got = Counter(r.rcpt_to for r in sinks.received if r.rcpt_to in want)
    assert set(got) == want
    # nothing of the hostile payloads was ever delivered
    bad = {r.rcpt_to for r in sinks.received} - want
    assert not bad, bad


def _shard_stats(mc: Any) -> list[dict[str, Any]]:
    import ray
    try:
        return [ray.get(c.stats.remote(), timeout=10) for c in mc.coordinators]
    except Exception:   # noqa: BLE001 - a restarting leader: not yet
        return [{"serving": False, "pid": 0}]
