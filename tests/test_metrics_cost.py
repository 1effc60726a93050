"""bench/metrics_cost.py's statistics: paired relative differences and their interval."""

from __future__ import annotations

import pytest

from bench.metrics_cost import paired, summarize


@pytest.mark.parametrize("on, off, mean, ci, higher", [
    # the same on and off: no difference, a zero-width interval
    ([100.0, 200.0, 300.0], [100.0, 200.0, 300.0], 0.0, [0.0, 0.0], 0),
    # on 10 % higher in every pair: the interval is the point
    ([110.0, 220.0, 330.0], [100.0, 200.0, 300.0], 10.0, [10.0, 10.0], 3),
    # +10 % and -10 %: mean 0, t(1) = 12.706 x sd 14.14 / sqrt 2 = +-127 %
    ([110.0, 90.0], [100.0, 100.0], 0.0, [-127.06, 127.06], 1),
])
def test_paired_relative_difference_and_t_interval(on, off, mean, ci, higher):
    p = paired(on, off)
    assert p["mean_pct"] == pytest.approx(mean)
    assert p["ci95_pct"] == pytest.approx(ci, abs=0.01)
    assert p["on_higher_in"] == higher and p["n"] == len(on)


def test_summarize_pairs_only_complete_ok_rounds():
    def r(pair, m, v, ok=True):
        return {"pair": pair, "metrics": m, "ok": ok, "delivered_per_s": v,
                "delivered_per_s_10_90": None, "accepted_per_s_while_delivering": None,
                "accepted_per_s_intake_only": None, "cpu_ray_s_per_1000": v / 1000,
                "cpu_ray_s_per_1000_intake_only": None}
    rounds = [r(0, True, 100), r(0, False, 100), r(1, False, 200), r(1, True, 180),
              r(2, True, 999), r(2, False, 1, ok=False)]      # pair 2 failed: left out
    s = summarize(rounds)
    assert s["pairs_complete"] == 2
    f = s["figures"]["delivered_per_s"]
    assert f["median_on"] == 140 and f["median_off"] == 150 and f["mean_pct"] == -5.0
    assert "delivered_per_s_10_90" not in s["figures"]     # no values: no figure
