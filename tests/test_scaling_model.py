"""The scale-out model of bench/scaling.py (bench/README.md, "Scaling out"): pure arithmetic
over recorded runs, checked here on made-up runs whose answers are worked out by hand."""

from __future__ import annotations

from bench.scaling import model


def _run(nodes: int, rate: float, idle: float, *, n: int = 10_000) -> dict:
    # per message: relay 0.1 ms, leaders 0.08, copies 0.02 (both), throttle 0.02, gcs 0.001
    cpu = {"ray::RelayPool": 1.0, "ray::QueueCoord": 0.8, "ray::ReplicaLog": 0.2,
           "ray::SiteThrott": 0.2, "gcs_server": 0.01}
    return {"nodes": nodes, "ok": True, "delivered": n, "delivered_per_s": rate,
            "cpu_by_process": cpu, "cpu_ray_s": sum(cpu.values()), "cpu_client_s": 0.5,
            "idle_cpu": {"cores": idle}}


def test_one_box_check_takes_idle_cost_out_and_fits_the_growth_per_node_on_two_nodes():
    one, two, three = _run(1, 5000, 0.05), _run(2, 4000, 0.15), _run(3, 3000, 0.25)
    two["cpu_client_s"] = 1.0          # 2 nodes: 0.321 ms a message instead of 0.271
    three["cpu_client_s"] = 1.5        # 3 nodes: 0.371
    m = model([one, two, three])
    c1 = (2.21 + 0.5) / 10_000
    busy = 5000 * c1 + 0.05
    d = (2.21 + 1.0) / 10_000 - c1
    got = {ch["nodes"]: ch for ch in m["check_one_box"]}
    assert got[2]["naive_predicted_per_s"] == round((busy - 0.15) / c1)
    assert got[3]["naive_predicted_per_s"] == round((busy - 0.25) / c1)
    assert got[3]["fitted_predicted_per_s"] == round((busy - 0.25) / (c1 + 2 * d))
    assert got[2]["fitted_on_this_run"] and not got[3]["fitted_on_this_run"]
    assert m["growth_ms_per_msg_per_node"] == round(1000 * d, 4)
    # per-kind costs come from the run with the most nodes
    assert m["costs_from_nodes"] == 3 and m["cpu_ms_per_msg"]["relay"] == 0.1


def test_projection_names_what_saturates_first():
    m = model([_run(1, 5000, 0.05)], shards=2)
    proj = {(p["cores_per_node"], p["nodes"]): p for p in m["projection"]}
    # 2 cores per node: the cores bind first (0.271 ms per message in all)
    assert proj[(2, 1)]["saturates"] == "cores"
    assert proj[(2, 1)]["rate"] == round(2 * 1000 / 0.271)
    # with 2 shards the two leaders cap the cluster at 2 x 1000 / 0.08 = 25,000 msgs/s
    assert proj[(8, 20)]["saturates"] == "leader" and proj[(8, 20)]["rate"] == 25_000
    # a relay process per node caps a node of many cores at 1000 / 0.1 = 10,000 msgs/s
    assert proj[(8, 1)]["saturates"] == "relay" and proj[(8, 1)]["rate"] == 10_000


def test_no_model_without_a_one_node_run():
    assert "error" in model([_run(2, 4000, 0.1)])
