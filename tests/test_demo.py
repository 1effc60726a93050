"""The main job: `raymta demo` (embedded default) runs end to end and accounts for every message."""

import pytest

# own_ray: `raymta demo` starts its own embedded Ray (default settings, not the shared one's)
pytestmark = [pytest.mark.timeout(300), pytest.mark.own_ray]


def test_demo_delivers_defers_and_bounces_as_designed(tmp_path, capsys):
    from cluster.cli import run_demo
    s = run_demo(600, 6, str(tmp_path / "spool"), quiet=True)
    assert s["accepted"] == s["submitted"] == 600
    assert s["still_queued"] == 0
    assert s["delivered"] + s["bounced"] + s["expired"] == 600
    # the demo's sinks refuse 1 in 50 (550 user unknown) and the last one is a null-MX domain
    assert s["bounced"] == 12 + 1
    assert s["delivered"] == s["received_by_sinks"] == 600 - 13
    # 1 in 20 is greylisted once (451) and delivered on retry
    assert s["deferred_then_delivered"] == 30
    out = capsys.readouterr().out
    assert "raymta demo summary" in out and "delivered" in out
    assert any((tmp_path / "spool").rglob("events-*.jsonl"))
