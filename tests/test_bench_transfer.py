"""The transfer benchmark's label accounting, and its --quick run end to end on synthetic days."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_transfer  # noqa: E402

from rpnt_core.data import SimulationSpec, simulate_sessions  # noqa: E402
from rpnt_core.evaluate.baselines import WienerFilter  # noqa: E402
from rpnt_core.evaluate.harness import evaluate_model  # noqa: E402
from rpnt_core.train.finetune import FinetuneOptions, fit_decoder  # noqa: E402


@pytest.fixture(scope="module")
def day():
    spec = SimulationSpec(
        n_subjects=1,
        sessions_per_subject=1,
        bins_per_session=(1200, 1200),
        bin_s=0.05,
        channels_per_session=(12, 12),
        population_size=(20, 20),
        n_multisite_subjects=0,
    )
    return simulate_sessions(spec, seed=3)[0].with_target("position")


@pytest.mark.parametrize("seconds", [5.0, 15.0, 30.0])
def test_label_split_spends_only_the_first_seconds(seconds):
    s = bench_transfer.label_split(1200, bin_s=0.05, seconds=seconds)
    n_lab = round(seconds / 0.05)
    assert s.train[0] == 0 and s.train[1] == s.val[0] and s.val[1] == n_lab  # train + val = the labelled bins
    assert s.val[1] - s.val[0] == max(2, round(0.2 * n_lab))  # validation is the end of the same seconds
    assert s.test == (1200 - 240, 1200)  # test = the last 20 % whatever the budget


def test_label_split_refuses_a_budget_reaching_the_test_part():
    with pytest.raises(ValueError, match="^seconds: 50 s of labels reach into the test part"):
        bench_transfer.label_split(1200, bin_s=0.05, seconds=50.0)


def test_calibration_view_holds_no_label_after_the_budget_and_no_test_bin(day):
    splits = bench_transfer.label_split(day.n_bins, bin_s=day.bin_s, seconds=15.0)
    view = bench_transfer.calibration_view(day, splits)
    assert view.n_bins == splits.test[0]  # unlabelled bins up to the test part, none of it
    assert list(view.targets) == ["position"]  # only the decoded series
    assert np.isfinite(view.labels[: splits.val[1]]).all()
    assert np.isnan(view.labels[splits.val[1] :]).all()
    np.testing.assert_array_equal(view.labels[: splits.val[1]], day.labels[: splits.val[1]])


def _fit_rpnt(view, splits):
    opts = FinetuneOptions(
        epochs=2,
        steps_per_epoch=2,
        batch_size=4,
        window_len=32,
        patience=2,
        device="cpu",
        progress=False,
        config_overrides=(
            ("d_model", 16),
            ("n_heads", 2),
            ("window", 8),
            ("kernel_hidden", 8),
            ("input_norm", True),
        ),
    )
    return fit_decoder(view, init=None, options=opts, splits=splits)


def test_decoders_fitted_on_the_view_never_touch_a_label_past_the_budget(day):
    """The view's labels after the budget are NaN: a decoder that read one would fail or return NaN."""
    splits = bench_transfer.label_split(day.n_bins, bin_s=day.bin_s, seconds=15.0)
    view = bench_transfer.calibration_view(day, splits)
    model, fit = _fit_rpnt(view, splits)
    assert math.isfinite(fit["val_r2"]) and math.isfinite(evaluate_model(model, day, splits)["r2"])
    (lo, hi), (vlo, vhi) = splits.train, splits.val
    dec = WienerFilter.fit(
        train_counts=view.counts[lo:hi],
        train_velocity=view.labels[lo:hi],
        val_counts=view.counts[vlo:vhi],
        val_velocity=view.labels[vlo:vhi],
        bin_s=day.bin_s,
    )
    assert np.isfinite(dec.predict(day.counts)).all()


def test_the_poisoned_view_catches_a_decoder_that_reads_later_labels(day):
    """The check above can fail: validating one bin past the budget meets a NaN label."""
    splits = bench_transfer.label_split(day.n_bins, bin_s=day.bin_s, seconds=15.0)
    view = bench_transfer.calibration_view(day, splits)
    leaky = type(splits)(train=splits.train, val=(splits.val[0], splits.val[1] + 1), test=splits.test)
    with pytest.raises(ValueError, match="y_true: contains NaN"):
        _fit_rpnt(view, leaky)


def test_quick_run_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "transfer.json"
    only = [
        "wiener",
        "RPNT from scratch +norm",
        "supervised+norm, full FT core lr ×0.1",
        "last day's decoder, re-aligned (no labels)",
    ]
    assert (
        bench_transfer.main(
            [
                "--quick",
                "--budgets",
                "15,30",
                "--only",
                ";".join(only),
                "--out",
                str(out),
                "--workdir",
                str(tmp_path / "work"),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["quick"] and res["budget"] == bench_transfer.budget(True)
    sc = res["scenarios"][0]
    assert len(sc["pool"]) == 4 and sc["tests"] and not set(sc["pool"]) & set(sc["tests"])
    got = {(r["decoder"], r["label_seconds"]) for r in res["rows"]}
    want = {(d, s) for d in ("baseline: wiener", *only[1:3]) for s in (15.0, 30.0)} | {(only[3], 0.0)}
    assert got == want
    assert all(math.isfinite(r["test_r2"]) for r in res["rows"])
    assert {"pretraining_seconds", "calibration_and_test_seconds"} <= set(res["stages"])
    md = out.with_suffix(".md").read_text()
    assert "| supervised+norm, full FT core lr ×0.1 |" in md and "15 s" in md
    assert out.with_suffix(".png").stat().st_size > 1000


def _result(**changes) -> dict:
    rows = [
        {
            "scenario": "spike",
            "day": d,
            "decoder": "x",
            "seed": seed,
            "label_seconds": 15.0,
            "test_r2": 0.1 * seed,
        }
        for d in ("a", "b")
        for seed in (0, 1)
    ]
    return {
        "quick": False,
        "budget": bench_transfer.budget(False),
        "protocol": {"test_fraction": 0.2},
        "scenarios": [{"name": "spike", "target": "position", "pool": ["p1", "p2"]}],
        "rows": rows,
        "pretraining": [],
        "seeds": [0, 1],
        **changes,
    }


def test_merge_adds_only_cells_this_run_did_not_measure(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps(_result()))
    now = _result(rows=[r for r in _result()["rows"] if r["seed"] == 1], seeds=[1])
    now["rows"] = [r | {"seed": 2} for r in now["rows"]] + [{**now["rows"][0], "test_r2": 0.9}]
    merged = bench_transfer.merge(now, [str(tmp_path / "old.json")])
    cells = {(r["day"], r["seed"]): r for r in merged["rows"]}
    assert merged["seeds"] == [0, 1, 2] and len(merged["rows"]) == 6
    assert cells[("a", 1)]["test_r2"] == 0.9 and "from" not in cells[("a", 1)]  # this run's cell wins
    assert cells[("b", 1)]["from"] == "old.json" and cells[("a", 0)]["from"] == "old.json"
    assert (
        len(bench_transfer.merge(now, [str(tmp_path / "old.json")], ["y"])["rows"]) == 3
    )  # only decoders named


@pytest.mark.parametrize(
    "change",
    [
        {"budget": {**bench_transfer.budget(False), "ft_epochs": 99}},
        {"scenarios": [{"name": "spike", "target": "position", "pool": ["p2"]}]},
    ],
)
def test_merge_refuses_a_run_made_differently(tmp_path, change):
    (tmp_path / "old.json").write_text(json.dumps(_result(**change)))
    with pytest.raises(SystemExit, match="--merge .*old.json: made with a different"):
        bench_transfer.merge(_result(), [str(tmp_path / "old.json")])


def test_unknown_decoder_names_are_refused():
    with pytest.raises(SystemExit, match="--only: unknown"):
        bench_transfer.parse(["--only", "wiener;nonsense"])
