"""The soak benchmark's arithmetic: least-squares slopes per minute over the samples after warm-up."""
import math

import numpy as np
import pytest

from ray_eplb.controller.bench.soak import MB, slope_per_min, slopes


def test_slope_of_a_line_is_its_rate_per_minute():
    t = [0.0, 10.0, 20.0, 30.0, 40.0]
    assert slope_per_min(t, [5 + 0.5 * x for x in t]) == pytest.approx(30.0)  # 0.5 per s = 30 per min
    assert slope_per_min(t, [7.0] * 5) == 0.0
    assert slope_per_min([0.0, 60.0], [100.0, 90.0]) == pytest.approx(-10.0)


def test_slope_matches_numpy_least_squares_on_noisy_samples():
    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 600, size=40))
    y = 400 + 0.02 * t + rng.normal(0, 3, size=40)
    want = 60 * np.polyfit(t, y, 1)[0]
    assert slope_per_min(t.tolist(), y.tolist()) == pytest.approx(want, rel=1e-9)
    # An outlier moves a least-squares fit, unlike the end points alone.
    assert slope_per_min([0, 10, 20, 30], [0, 0, 30, 0]) == pytest.approx(60 * 0.3)


@pytest.mark.parametrize("t,y,match", [
    ([0.0], [1.0], "at least 2"), ([0.0, 1.0], [1.0], "2 times but 1 values"),
    ([5.0, 5.0], [1.0, 2.0], "same time"), ([0.0, 1.0], [1.0, math.nan], "finite"),
])
def test_slope_refuses_what_has_no_slope(t, y, match):
    with pytest.raises(ValueError, match=match):
        slope_per_min(t, y)


def test_slopes_skip_the_warm_up_and_missing_values():
    samples = []
    for i in range(10):
        t = 10.0 * i
        warm = 50 * MB if t < 30 else 0.0  # a warm-up jump that must not count
        samples.append({"t": t, "store": None if i == 5 else (10 + t) * MB,
                        "rss": {"w": 100 * MB + warm + 0.1 * t * MB, "gone": None if i > 6 else 1.0 * MB},
                        "routers": 1 + i})
    fit = slopes(samples, warmup_s=30.0)
    assert fit["w"]["slope"] == pytest.approx(6.0) and fit["w"]["samples"] == 7
    assert fit["w"]["first"] == pytest.approx(103.0) and fit["w"]["last"] == pytest.approx(109.0)
    assert fit["object_store"]["slope"] == pytest.approx(60.0) and fit["object_store"]["samples"] == 6
    assert fit["routers"]["slope"] == pytest.approx(6.0)
    assert fit["gone"]["samples"] == 4 and fit["gone"]["slope"] == pytest.approx(0.0)
    assert "gone" not in slopes(samples[7:], warmup_s=0.0)  # no value at all: no series


def test_ray_processes_are_told_apart_by_name_not_by_the_raylet_command_line():
    from ray_eplb.controller.bench.soak import ray_label

    raylet_cmd = "/x/raylet --dashboard_agent_command=python dashboard/agent.py --runtime_env_agent_command=..."
    assert ray_label("raylet", raylet_cmd) == "raylet"
    assert ray_label("gcs_server", "/x/gcs_server --log_dir=/tmp") == "gcs_server"
    assert ray_label("ray::DashboardAgent", "ray::DashboardAgent") == "dashboard_agent"
    assert ray_label("ray::RuntimeEnvAgent", "ray::RuntimeEnvAgent") == "runtime_env_agent"
    assert ray_label("python", "/v/bin/python /v/ray/dashboard/dashboard.py --port=8265") == "dashboard"
    assert ray_label("ray-dashboard-StateHead-0", "ray-dashboard-StateHead-0 (python -B -c ...)") == "dashboard_modules"
    assert ray_label("ray::RayExpertWorker", "ray::RayExpertWorker.forward") is None  # actors come from the state API
    assert ray_label("ray::IDLE", "ray::IDLE") is None
