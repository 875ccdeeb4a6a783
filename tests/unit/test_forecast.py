"""The load forecast (controller/forecast.py): hand-computed values, specs, validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_eplb.controller.forecast import DEFAULT_SPEC, Forecaster, forecast_series


def _w(*vals):
    """One window ``[1, len(vals)]`` float64."""
    return torch.tensor([vals], dtype=torch.float64)


def test_last_returns_the_last_window():
    f = Forecaster("last")
    f.update(_w(1, 2))
    f.update(_w(5, 0))
    assert torch.equal(f.predict(), _w(5, 0))


def test_ema_by_hand():
    f = Forecaster("ema", alpha=0.25)
    f.update(_w(4, 0))  # starts at the first window
    assert torch.equal(f.predict(), _w(4, 0))
    f.update(_w(0, 8))  # 0.25 * new + 0.75 * old
    assert torch.allclose(f.predict(), _w(3, 2))
    f.update(_w(4, 4))
    assert torch.allclose(f.predict(), _w(0.25 * 4 + 0.75 * 3, 0.25 * 4 + 0.75 * 2))


def test_ema_alpha_one_is_last():
    a, b = Forecaster("ema", alpha=1.0), Forecaster("last")
    for w in torch.rand(5, 3, 4, dtype=torch.float64):
        a.update(w)
        b.update(w)
        assert torch.equal(a.predict(), b.predict())


@pytest.mark.parametrize("reduce,scale", [("mean", 1.0), ("sum", None)])
def test_window_mean_and_sum(reduce, scale):
    f = Forecaster("window", window=2, reduce=reduce)
    f.update(_w(2, 0))
    assert torch.allclose(f.predict(), _w(2, 0))  # fewer windows than W: combine what there is
    f.update(_w(4, 2))
    f.update(_w(6, 6))  # the first window has left
    want = _w(10, 8) if scale is None else _w(5, 4)
    assert torch.allclose(f.predict(), want)


def test_mean_and_sum_plan_equally_well():
    from ray_eplb.solver import balancedness_per_layer, rebalance_experts

    loads = torch.rand(4, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 100
    mean, total = forecast_series(loads, "window:3"), forecast_series(loads, "window:3:sum")
    assert torch.allclose(total[2:], 3 * mean[2:]) and torch.allclose(total[0], mean[0])
    for m, t in zip(mean, total):  # the plans may differ among ties (float rounding), their balance not
        (pm, _, cm), (pt, _, ct) = rebalance_experts(m, 16, 4, 2, 4), rebalance_experts(t, 16, 4, 2, 4)
        assert torch.allclose(balancedness_per_layer(pm, cm, m, 4), balancedness_per_layer(pt, ct, m, 4))


def test_predict_is_a_copy_and_input_is_copied():
    f = Forecaster("ema", alpha=0.5)
    w = _w(1, 1)
    f.update(w)
    w += 10  # the caller's buffer changes
    p = f.predict()
    p += 100
    assert torch.equal(f.predict(), _w(1, 1))


def test_numpy_and_integer_input():
    f = Forecaster("window", window=3)
    f.update(np.array([[1, 2, 3]], dtype=np.int32))
    f.update(torch.tensor([[3, 2, 1]], dtype=torch.int64))
    out = f.predict()
    assert out.dtype == torch.float64 and torch.allclose(out, _w(2, 2, 2))


def test_forecast_series_matches_updates():
    loads = torch.rand(6, 2, 5, dtype=torch.float64)
    series = forecast_series(loads, "ema:0.3")
    f = Forecaster("ema", alpha=0.3)
    for i, w in enumerate(loads):
        f.update(w)
        assert torch.allclose(series[i], f.predict())
    assert series.shape == loads.shape
    assert torch.equal(forecast_series(loads, "last"), loads)
    assert torch.equal(forecast_series(loads.numpy(), "last"), loads)


def test_forecast_series_continues_a_given_forecaster():
    f = Forecaster("window", window=2)
    f.update(_w(4, 0))
    out = forecast_series(torch.stack([_w(0, 4)]), f)  # [1, 1, 2]
    assert torch.allclose(out[0], _w(2, 2)) and f.updates == 2


@pytest.mark.parametrize("spec,kind,attrs", [
    ("last", "last", {}), ("ema:0.3", "ema", {"alpha": 0.3}), ("window:4", "window", {"window": 4, "reduce": "mean"}),
    ("window:8:sum", "window", {"window": 8, "reduce": "sum"}), (" ema:1 ", "ema", {"alpha": 1.0}),
])
def test_from_spec_round_trip(spec, kind, attrs):
    f = Forecaster.from_spec(spec)
    assert f.kind == kind and all(getattr(f, k) == v for k, v in attrs.items())
    g = Forecaster.from_spec(f.spec)
    assert (g.kind, g.alpha, g.window, g.reduce) == (f.kind, f.alpha, f.window, f.reduce)
    assert spec.strip() in repr(f) or f.spec in repr(f)


def test_default_spec_parses():
    assert Forecaster.from_spec(DEFAULT_SPEC).spec == DEFAULT_SPEC


@pytest.mark.parametrize("spec", ["", "ema", "ema:x", "ema:0", "ema:1.5", "window:0", "window:2.5", "window:2:max",
                                  "last:1", "median:3", "ema:0.5:1"])
def test_bad_specs(spec):
    with pytest.raises(ValueError, match="spec|alpha|window|reduce"):
        Forecaster.from_spec(spec)


@pytest.mark.parametrize("kwargs,name", [
    ({"kind": "median"}, "kind='median'"), ({"alpha": 0}, "alpha=0"), ({"alpha": 1.01}, "alpha=1.01"),
    ({"alpha": -0.5}, "alpha=-0.5"), ({"alpha": "0.5"}, "alpha='0.5'"), ({"alpha": True}, "alpha=True"),
    ({"alpha": float("nan")}, "alpha=nan"), ({"window": 0}, "window=0"), ({"window": 2.0}, "window=2.0"),
    ({"window": True}, "window=True"), ({"reduce": "max"}, "reduce='max'"),
])
def test_bad_arguments_name_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(").replace(".", r"\.")):
        Forecaster(**kwargs)


@pytest.mark.parametrize("load,msg", [
    (torch.ones(3), r"\[L, E\].*\(3,\)"), (torch.ones(1, 2, 3), r"\(1, 2, 3\)"),
    (_w(1, float("nan")), "NaN"), (_w(1, float("inf")), "inf"), (_w(1, -1), "negative"),
    (torch.ones(1, 2, dtype=torch.complex64), "real"), (torch.ones(1, 2, dtype=torch.bool), "real"),
    ([["a", "b"]], "numeric"),
])
def test_bad_loads(load, msg):
    f = Forecaster()
    with pytest.raises(ValueError, match=msg):
        f.update(load)
    assert not f.ready  # a rejected window leaves no trace


def test_shape_change_is_rejected_and_reset_allows_it():
    f = Forecaster("window", window=3)
    f.update(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 4\)"):
        f.update(torch.ones(2, 5))
    assert f.updates == 1
    f.reset()
    assert not f.ready
    f.update(torch.ones(2, 5))
    assert f.predict().shape == (2, 5)


def test_predict_before_update_raises():
    with pytest.raises(RuntimeError, match="before any update"):
        Forecaster().predict()


def test_all_zero_window_only_scales():
    f = Forecaster("ema", alpha=0.5)
    f.update(_w(2, 6))
    f.update(_w(0, 0))
    out = f.predict()
    assert torch.allclose(out / out.sum(), _w(0.25, 0.75))


def test_forecast_series_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[T, L, E\]"):
        forecast_series(torch.ones(2, 3), "last")
