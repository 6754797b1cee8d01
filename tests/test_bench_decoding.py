"""The decoding benchmark's ``--reuse``: earlier cells are taken whole, and only from a run of the
same recipe."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_decoding  # noqa: E402


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"quick": False, "train_fraction": 0.2, "data_seed": 0, **kw})


def _result(path: Path, **changes) -> Path:
    rows = [
        {"session": s, "decoder": d, "seed": seed, "test_r2": 0.5}
        for seed in (0, 1)
        for s in ("a", "b")
        for d in ("x", "y")
    ]
    probes = [
        {"session": s, "features": "f", "seed": seed, "test_r2": 0.1} for seed in (0, 1) for s in ("a", "b")
    ]
    res = {
        "recipe": bench_decoding.recipe(False),
        "train_fraction": 0.2,
        "data_seed": 0,
        "model_overrides": {},
        "quick": False,
        "rows": rows,
        "probes": probes,
        **changes,
    }
    path.write_text(json.dumps(res))
    return path


def test_reuse_takes_whole_cells_from_a_run_of_the_same_recipe(tmp_path):
    cells = bench_decoding.reusable(_args(), [str(_result(tmp_path / "r.json"))])
    assert set(cells) == {(0, "a"), (0, "b"), (1, "a"), (1, "b")}
    path, rows, probes = cells[(1, "b")]
    assert path.endswith("r.json") and [r["decoder"] for r in rows] == ["x", "y"] and len(probes) == 1
    assert all(r["seed"] == 1 and r["session"] == "b" for r in rows + probes)


@pytest.mark.parametrize(
    "change",
    [
        {"recipe": {**bench_decoding.recipe(False), "target_share": 0.5}},
        {"data_seed": 3},
        {"train_fraction": 0.5},
        {"quick": True},
    ],
)
def test_reuse_refuses_a_run_made_differently(tmp_path, change):
    with pytest.raises(SystemExit, match="different"):
        bench_decoding.reusable(_args(), [str(_result(tmp_path / "r.json", **change))])


def test_reuse_of_a_missing_or_broken_file_says_which(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    for name in ("missing.json", "broken.json"):
        with pytest.raises(SystemExit, match=f"--reuse .*{name}: cannot read"):
            bench_decoding.reusable(_args(), [str(tmp_path / name)])
