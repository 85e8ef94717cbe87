"""Trust every validation across seeds (issues 24 and 26): intervals, events, warning scores by hand, and the
command on real runs."""
import math
import shutil

import numpy as np
import pytest
import xarray as xr

from analyses.monitor import WARNING_RULES
from analyses.trust import (announced, events_of, precision_recall, t_interval, trust_study,
                            welch_interval)
from conftest import train_tiny
from diagnostics import trust as command


def history(recalibrated, excess, steps=None) -> dict:
    n = len(excess)
    return {"epoch": list(range(1, n + 1)), "step": steps or [10 * e for e in range(1, n + 1)],
            "val_loss": [r + e for r, e in zip(recalibrated, excess)], "val_acc": [0.5] * n,
            "val_loss_recalibrated": recalibrated, "val_acc_recalibrated": [0.6] * n, "bn_excess": excess}


def test_intervals_by_hand():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert (mean, high - mean) == pytest.approx((2.0, 4.303 / math.sqrt(3)))
    assert t_interval([0.0, 1.0]) == pytest.approx((0.5, 0.5 - 12.706 / 2, 0.5 + 12.706 / 2))
    assert t_interval([0.0, 1.0], (0.0, math.inf)) == pytest.approx((0.5, 0.0, 0.5 + 12.706 / 2))
    assert t_interval([0.9, 1.0], (0.0, 1.0)) == pytest.approx((0.95, 0.95 - 12.706 * 0.05, 1.0))
    assert t_interval([5.0])[0] == 5 and math.isnan(t_interval([5.0])[1]) and math.isnan(t_interval([])[0])
    difference, low, high = welch_interval([1.0, 2.0, 3.0], [1.0, 1.0, 4.0])
    # variances 1/3 and 3/3: df = (4/3)^2 / ((1/3)^2/2 + 1/2) = 3.2 -> t(3) = 3.182
    assert difference == pytest.approx(0.0) and high == pytest.approx(3.182 * math.sqrt(4 / 3))
    assert welch_interval([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)


def test_two_seeds_interval_stays_within_what_a_count_and_a_share_can_be():
    """Seeds with no event and one event in two validations: t's interval of the mean, 0.5 +- 6.35, is cut at 0
    events and at a share of 1; the excess, which can be negative, keeps its whole interval."""
    runs = [history([0.5, 0.5], [0.0, 0.0]), history([0.5, 0.5], [0.0, 0.3])]
    ds = trust_study(runs, [None, None], ["a", "b"], ["g", "g"], [0, 1], [])
    assert ds.events_by_group.sel(group="g").values == pytest.approx([0.5, 0.0, 0.5 + 12.706 / 2])
    assert ds.event_share_by_group.sel(group="g").values == pytest.approx([0.25, 0.0, 1.0])
    assert ds.max_excess_by_group.sel(group="g", statistic="low") == pytest.approx(0.15 - 12.706 * 0.15)
    assert "within the possible values" in ds.events_by_group.attrs["long_name"]


def test_events_and_announcements_by_hand():
    h = history([0.5, 0.5, 0.5, 1.0], [0.05, 0.2, 0.13, 0.3], steps=[10, 20, 30, 40])
    # running against recomputed, 1.25 x and 0.1 nats: 0.55 no (+0.05), 0.7 yes, 0.63 yes (1.26 x), 1.3 yes (1.3 x)
    assert events_of(h, 1.25, 0.1).tolist() == [False, True, True, True]
    assert events_of(h, 1.27, 0.1).tolist() == [False, True, False, True]
    steps, scores = np.array([2, 5, 12, 18, 25, 33, 38]), np.array([9.0, 0, 0, 2, 0, 0, 3])
    fired, lead = announced(steps, scores, 3, [10, 20, 30, 40], threshold=1.0)
    assert fired.tolist() == [False, True, False, True]  # step 2 scored 9 before the warning was armed
    assert lead[1] == 2 and lead[3] == 2 and np.isnan(lead[0])
    assert precision_recall(fired, [False, True, True, True]) == (1.0, 2 / 3)
    scores[2] = 5.0  # step 12: the epoch's window announces validation 20 eight steps ahead, the last 3 steps do not
    assert announced(steps, scores, 3, [10, 20, 30, 40], 1.0)[1][1] == 8
    fired, lead = announced(steps, scores, 3, [10, 20, 30, 40], 1.0, within=3)
    assert fired.tolist() == [False, True, False, True] and lead[1] == 2
    assert not announced(steps, scores, 3, [10, 20, 30, 40], 1.0, within=1)[0].any()
    assert math.isnan(precision_recall([False], [True])[0])


def test_a_study_of_real_runs(tiny_runs):
    monitors = [xr.load_dataset(tiny_runs[name] / "monitor.nc") for name in ("plain20", "resnet20")]
    from train import rundir
    histories = [rundir.read_metrics(tiny_runs[name]) for name in ("plain20", "resnet20")]
    # metrics.csv's val_acc is over every validation image, the attribution's over its first N: here as if N were
    # fewer, so that the accuracies compared (running against recomputed) must both be the attribution's
    histories = [{**h, "val_acc": [a - 0.25 for a in h["val_acc"]]} for h in histories]
    ds = trust_study(histories + histories, monitors + monitors, ["p0", "r0", "p1", "r1"],
                     ["plain20", "resnet20", "plain20", "resnet20"], [0, 0, 1, 1], [("plain20", "resnet20")],
                     choose_on=(0,))
    events = [events_of(h, 1.25, 0.1).sum() for h in histories]
    assert ds.events.values.tolist() == events + events
    assert ds.events_by_group.sel(group="plain20", statistic="mean") == events[0]
    assert ds.events_contrast.sel(statistic="mean").item() == events[0] - events[1]
    excess = ds.excess.sel(run="r1").values
    np.testing.assert_allclose(excess, histories[1]["bn_excess"])
    assert ds.max_excess.sel(run="p0") == pytest.approx(max(histories[0]["bn_excess"]))
    assert list(ds.rule.values) == list(WARNING_RULES) and ds.warning_threshold.notnull().any()
    assert ds.final_acc_running.sel(run="p0") == monitors[0].val_acc.sel(val_bn="running").values[-1]
    assert ds.final_acc_recalibrated.sel(run="p0") == monitors[0].val_acc.sel(val_bn="recalibrated").values[-1]


def test_the_command_prints_the_tables_and_writes_its_files(tiny_runs, tmp_path, capsys):
    runs = []
    for name in ("plain20", "resnet20"):
        for seed in (0, 1):
            copy = tmp_path / f"{name}-s{seed}"
            shutil.copytree(tiny_runs[name], copy, ignore=shutil.ignore_patterns("diagnostics"))
            runs.append(str(copy))
    command.main([*runs, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "plain minus residual" in out and "plain20 - resnet20" in out and "probe_excess" in out
    assert "the warnings the runs printed, at the last measurement before each validation:" in out
    ds = xr.load_dataset(tmp_path / "out" / "trust.nc")
    assert ds.sizes["run"] == 4 and ds.sizes["group"] == 2 and (tmp_path / "out" / "trust.png").is_file()


def test_a_damaged_monitor_is_one_line(tiny_runs, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(tiny_runs["plain20"], copy, ignore=shutil.ignore_patterns("diagnostics"))
    (copy / "monitor.nc").write_bytes(b"not a netcdf file")
    assert command.common.main_guard(lambda: command.main([str(copy), "--out", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "monitor.nc cannot be read" in err and not (tmp_path / "o").exists()


def test_warning_scores_by_hand():
    from analyses.monitor import warning_scores
    scores = warning_scores([[1.0, 0.5], [0.9, 0.6], [3.0, 0.5]], [[0.1, 0.2]] * 3,
                            [[np.nan, np.nan], [0.1, 0.3], [0.2, 0.4]], [False, True, True])
    np.testing.assert_allclose(scores["probe_excess"], [0.5, 0.3, 2.5])
    np.testing.assert_allclose(scores["probe_ratio"], [2.0, 1.5, 6.0])
    np.testing.assert_allclose(scores["departure"], [np.nan, np.nan, 2.5 / 0.3])  # baseline: armed ones only
    np.testing.assert_allclose(scores["predicted_gap"], [np.nan, 0.2, 0.3])
    np.testing.assert_allclose(scores["bn_gap"], [0.2] * 3)


def test_the_monitor_scores_its_measurements_as_the_study_does(tiny_runs):
    from analyses.monitor import WARNING_RULE, WARNING_THRESHOLD
    from analyses.trust import rule_scores
    ds = xr.load_dataset(tiny_runs["plain20"] / "monitor.nc")
    online, offline = rule_scores(ds), rule_scores(ds.drop_vars("warning_score"))
    for rule in WARNING_RULES:
        np.testing.assert_allclose(online[rule], offline[rule], rtol=1e-12, err_msg=rule)
    armed = ds.step.values >= ds.attrs["warn_after"]
    assert (ds.warning.values == (armed & (online[WARNING_RULE] > WARNING_THRESHOLD))).all()


def test_t_quantiles_are_never_narrower_than_the_table():
    from analyses.trust import _t
    assert [_t(df) for df in (1, 20, 21, 30, 35, 59, 60, 500)] == [12.706, 2.086, 2.080, 2.042, 2.042, 2.021, 2.000,
                                                                    1.980]


def test_runs_without_attributed_validations_are_studied_not_a_traceback(tiny_runs, tmp_path, capsys):
    """A run of version 2 (no attribution columns, a monitor without the new variables) and a run trained with
    --attribution-images 0, beside a current one."""
    from train import rundir
    old = tmp_path / "old"
    shutil.copytree(tiny_runs["plain20"], old, ignore=shutil.ignore_patterns("diagnostics"))
    history = rundir.read_metrics(old)
    columns = rundir.METRICS[:10]
    rundir.write_csv(old / "metrics.csv", columns, list(zip(*(history[c] for c in columns))))
    monitor = xr.load_dataset(old / "monitor.nc")
    keep = ["probe_loss", "probe_acc", "bn_gap", "eval_mismatch", "grad_norm", "weight_norm", "scaled_grad_norm",
            "train_loss", "lr", "warning"]
    monitor[keep].drop_vars(["momentum", "rule", "val_bn"], errors="ignore").to_netcdf(old / "monitor.nc")
    off = train_tiny(tmp_path / "off", "resnet20", "--attribution-images", "0")
    assert command.common.main_guard(lambda: command.main([str(old), str(off), str(tiny_runs["resnet20"]),
                                                           "--out", str(tmp_path / "out")])) == 0
    ds = xr.load_dataset(tmp_path / "out" / "trust.nc")
    assert ds.validations.values.tolist() == [0, 0, 2]


def test_the_figure_colours_by_model_and_keeps_many_labels_apart():
    """Six groups of two models: a model's groups share one colour, the other model's another, and the tick
    labels stand upright (at 30 degrees, six study labels overlapped)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    groups = [f"{model}{option}" for option in ("", " bn_momentum=0.8", " lr=0.05")
              for model in ("plain20", "resnet20")]
    runs = [history([0.5, 0.5], [0.0, 0.3 * i]) for i in range(len(groups))]
    ds = trust_study(runs, [None] * len(runs), groups, groups, [0] * len(runs), [])
    fig = command.figure(ds)
    events_axis = fig.axes[0]
    colours = [to_rgba(c.get_edgecolor()[0]) for c in events_axis.collections]
    assert len(colours) == len(groups)
    assert colours[0] == colours[2] == colours[4] and colours[1] == colours[3] == colours[5] != colours[0]
    assert all(label.get_rotation() == 90 for label in fig.axes[-1].get_xticklabels())
    plt.close(fig)


def _dots_in_points(fig, axis):
    """Every seed's dot of `axis` in points on the page: (x, y, series)."""
    from matplotlib.collections import PathCollection
    fig.canvas.draw()
    scale = 72 / fig.dpi
    scatters = [c for c in axis.collections if isinstance(c, PathCollection)]  # not the error bars' lines
    return [(*(axis.transData.transform(xy) * scale), k) for k, dots in enumerate(scatters)
            for xy in dots.get_offsets()]


def test_seeds_whose_dots_would_cover_each_other_are_drawn_side_by_side_or_counted():
    """Three seeds with 1 event each and one with 2: four dots in panel (a), the three tied ones at least a dot's
    width apart on the page, the mean's bar and its tick right of them all. With twelve groups, five tied seeds
    that a column cannot hold are one dot with "5" written above it."""
    import matplotlib.pyplot as plt
    runs = [history([0.5, 0.5], [0.3, 0.0]) for _ in range(3)] + [history([0.5, 0.5], [0.3, 0.3])]
    ds = trust_study(runs, [None] * 4, [f"plain20-s{seed}" for seed in range(4)], ["plain20"] * 4, [0, 1, 2, 3], [])
    fig = command.figure(ds)
    axis = fig.axes[0]
    dots = np.array(_dots_in_points(fig, axis))
    diameter = 2 * math.sqrt(command.DOT / math.pi)
    tied = np.sort(dots[np.isclose(dots[:, 1], dots[:, 1].min()), 0])
    assert len(dots) == 4 and len(tied) == 3 and np.diff(tied).min() >= diameter
    bar = [line for line in axis.lines if len(line.get_xdata())][0]
    bar_x = axis.transData.transform((bar.get_xdata()[0], 0))[0] * 72 / fig.dpi
    assert bar_x - bar.get_markersize() / 2 > dots[:, 0].max() + diameter / 2
    plt.close(fig)

    groups = [f"plain20 lr={lr}" for lr in range(12)]
    runs = [history([0.5, 0.5], [0.3, 0.0]) for _ in groups for _ in range(5)]
    ds = trust_study(runs, [None] * len(runs), [f"{g}-s{seed}" for g in groups for seed in range(5)],
                     [g for g in groups for _ in range(5)], [seed for _ in groups for seed in range(5)], [])
    fig = command.figure(ds)
    axis = fig.axes[0]
    xs = sorted(x for x, _, _ in _dots_in_points(fig, axis))
    counts = [text.get_text() for text in axis.texts]
    assert len(xs) == 60
    assert counts == ["5"] * 12 or (not counts and min(np.diff(xs)) >= 2 * math.sqrt(command.DOT / math.pi))
    plt.close(fig)


def test_a_diffusion_of_0_is_drawn_at_a_floor_of_the_log_axis_and_said():
    """The lag model's fit can put all of a run's motion in drift (the demo's resnet20, resnet18-s0): its diffusion
    of 0 had no place on panel (e)'s log axis and its dot vanished. Now every run has a dot there, the 0 a
    triangle below the others, and the panel says so."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.markers import MarkerStyle
    runs = [history([0.5, 0.5], [0.3, 0.0]) for _ in range(4)]
    ds = trust_study(runs, [None] * 4, [f"{m}-s{s}" for m in ("plain20", "resnet20") for s in (0, 1)],
                     ["plain20"] * 2 + ["resnet20"] * 2, [0, 1, 0, 1], [])
    ds["diffusion"] = ("run", np.array([0.02, 0.03, 0.0, 0.025]))
    ds["diffusion_by_group"].loc[{"group": "resnet20"}] = [0.0125, 0.0, 0.17]  # a mean and a bound of 0 too
    fig = command.figure(ds)
    axis = fig.axes[4]
    assert axis.get_yscale() == "log" and "triangles: 0" in axis.get_title(loc="left")
    dots = np.array(_dots_in_points(fig, axis))
    assert len(dots) == 4  # every run, the 0 included
    zero_y = axis.transData.transform((0, 0.02 / 3))[1] * 72 / fig.dpi
    assert np.isclose(dots[:, 1], zero_y).sum() == 1 and dots[:, 1].min() == pytest.approx(zero_y)
    triangle = MarkerStyle("v")
    triangle = triangle.get_path().transformed(triangle.get_transform()).vertices
    at_floor = [c for c in axis.collections if len(c.get_offsets()) == 1 and c.get_offsets()[0][1] == 0.02 / 3]
    assert len(at_floor) == 1 and np.allclose(at_floor[0].get_paths()[0].vertices, triangle)
    renderer = fig.canvas.get_renderer()
    said, beside = (fig.axes[k]._left_title for k in (4, 5))  # the Text of set_title(loc="left")
    gap = beside.get_window_extent(renderer).x0 - said.get_window_extent(renderer).x1
    assert gap > 6 * fig.dpi / 72, gap  # (e)'s note ends at least 6 points before (f)'s title begins
    bars = [segment[:, 1] for c in axis.collections if isinstance(c, LineCollection) for segment in c.get_segments()]
    assert any(np.allclose(sorted(y), [0.02 / 3, 0.17]) for y in bars), bars  # its low bound of 0 at the floor
    plt.close(fig)
    ds["diffusion"] = ("run", np.array([0.02, 0.03, 0.01, 0.025]))
    fig = command.figure(ds)
    assert "triangles" not in fig.axes[4].get_title(loc="left") and len(_dots_in_points(fig, fig.axes[4])) == 4
    plt.close(fig)


def test_dodging_leaves_missing_values_alone_and_spaces_only_what_would_overlap():
    offsets, counted = command.dodged(np.array([np.nan, np.nan, 0.5, 0.6, 0.5001]), step=0.1, width=0.5,
                                      tolerance=0.01)
    assert offsets[:2].tolist() == [0, 0] and offsets[3] == 0 and sorted(offsets[[2, 4]]) == [-0.05, 0.05]
    assert counted == {}
    offsets, counted = command.dodged(np.array([1.0, 1.0, 1.0]), step=0.3, width=0.5, tolerance=0.01)
    assert offsets.tolist() == [0, 0, 0] and counted == {0: 3}


def test_the_warnings_a_run_printed_are_scored_at_the_last_measurement_before_each_validation():
    """Measurements every 2 steps; validations at 10, 20, 30 (events, events, none). Step 10 warned: caught; step
    18 warned but 20, the last before the validation, did not: missed; step 30 warned: a false alarm."""
    from analyses.trust import own_warnings
    monitor = xr.Dataset({"warning": ("step", [False, True, True, False, False, True])},
                         coords={"step": [8, 10, 18, 20, 28, 30]}, attrs={"every": 2})
    h = history([0.5, 0.5, 0.5], [0.3, 0.3, 0.0], steps=[10, 20, 30])
    scores = own_warnings([h, h], [monitor, None], [events_of(h, 1.25, 0.1)] * 2)
    assert [int(scores[f"own_warning_{k}"].values) for k in ("caught", "missed", "false_alarms")] == [1, 1, 1]
