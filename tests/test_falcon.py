"""FALCON compatibility: rpnt scored by FALCON's own evaluator equals rpnt's own harness.

The test writes small NWB files in FALCON's layout (the DANDI folders `dandi download` makes, the
fields `falcon_challenge.dataloaders.load_nwb` reads: spike times in `units`, the target in a
`BehavioralTimeSeries`, `eval_mask`, `trials`), one per held-in dataset FALCON's minival phase
expects, runs `FalconEvaluator.evaluate(decoder, phase="minival")` over them and compares each
day's R² with the one `rpnt_core.evaluate.harness` computes on the same bins.  Skipped where
`falcon-challenge` is not installed (it is the `[falcon]` extra, not part of `[dev]`).
"""

from __future__ import annotations

import datetime as dt
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomise_kernels, tiny_config

from rpnt_core import RPNT, save_checkpoint
from rpnt_core.data.session import Session
from rpnt_core.evaluate.harness import predict_session
from rpnt_core.evaluate.metrics import r2_score

BIN_S = 0.02
SESSION = "falcon-day"  # in the tiny model's session vocabulary: the checkpoint's finetuning metadata
METADATA = {"subject": "", "session": SESSION, "task": "", "date_days": 0.0}


@dataclass(frozen=True)
class Layout:
    """Where and how FALCON stores one task's minival files (see ``load_nwb``)."""

    task: str
    dandiset: str
    folder: str  # the DANDI subject folder of the minival files
    container: str  # acquisition holding the target, one TimeSeries per dimension
    bin_start: bool  # target timestamps mark bin starts (m2) or bin ends (m1)

    def file_name(self, key: str) -> str:
        """FALCON's dataset key (``Run1_20201019`` / ``20120924``) → the DANDI file name."""
        if self.task == "m2":
            run, day = key.split("_")
            ses = f"{day[:4]}-{day[4:6]}-{day[6:]}-{run}"
        else:
            ses = key
        return f"{self.folder}_ses-{ses}_behavior+ecephys.nwb"

    def day(self, key: str) -> str:
        """The recording day a key belongs to: FALCON pools a day's runs into one R²."""
        return key.split("_")[-1]


LAYOUTS = {
    "m2": Layout(
        task="m2",
        dandiset="000953",
        folder="sub-MonkeyN-held-in-minival",
        container="finger_vel",
        bin_start=True,
    ),
    "m1": Layout(
        task="m1",
        dandiset="000941",
        folder="sub-MonkeyL-held-in-minival",
        container="preprocessed_emg",
        bin_start=False,
    ),
}


@pytest.fixture(scope="module")
def falcon():
    """FALCON's evaluator module (skips the test where the package is not installed)."""
    pytest.importorskip("falcon_challenge")
    return importlib.import_module("falcon_challenge.evaluator")


def tiny_falcon_model(task: str, seed: int = 0, **kw) -> RPNT:
    """A tiny model with the channels and outputs of FALCON ``task``, non-trivial outputs."""
    from falcon_challenge.config import FalconConfig, FalconTask

    cfg = FalconConfig(task=FalconTask[task])
    torch.manual_seed(seed)
    base = dict(n_channels=cfg.n_channels, n_outputs=cfg.out_dim, sessions=(SESSION,), bin_s=BIN_S)
    model = RPNT(tiny_config(**{**base, **kw})).eval()
    randomise_kernels(model)
    with torch.no_grad():
        model.meta_embed["session"].weight.normal_(std=0.5)  # the metadata must visibly matter
    d = model.config.n_outputs
    model.set_velocity_normalisation(torch.linspace(-1, 1, d), torch.linspace(0.5, 2, d))
    return model


def write_falcon_nwb(
    path: Path,
    *,
    counts: np.ndarray,
    target: np.ndarray,
    eval_mask: np.ndarray,
    layout: Layout,
    start_s: float,
) -> None:
    """One file as FALCON's ``load_nwb`` reads it: each count becomes spikes inside its bin."""
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.behavior import BehavioralTimeSeries

    n_bins = counts.shape[0]
    stamps = start_s + np.arange(n_bins) * BIN_S  # the target's timestamps
    centres = stamps + (BIN_S / 2 if layout.bin_start else -BIN_S / 2)
    nwb = NWBFile(
        session_description="rpnt FALCON test",
        identifier=path.stem,
        session_start_time=dt.datetime(2020, 10, 19, tzinfo=dt.timezone.utc),
    )
    for ch in range(counts.shape[1]):
        nwb.add_unit(spike_times=np.repeat(centres, counts[:, ch]))
    series = BehavioralTimeSeries(name=layout.container)
    for d in range(target.shape[1]):  # names sort in column order: FALCON stacks them by name
        series.create_timeseries(name=f"dim{d:02d}", data=target[:, d], unit="a.u.", timestamps=stamps)
    nwb.add_acquisition(series)
    nwb.add_acquisition(TimeSeries(name="eval_mask", data=eval_mask, unit="n/a", timestamps=stamps))
    for s in range(0, n_bins, 20):
        nwb.add_trial(start_time=stamps[s], stop_time=stamps[min(s + 19, n_bins - 1)])
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


@dataclass
class Recording:
    key: str
    counts: np.ndarray  # (T, N)
    target: np.ndarray  # (T, D)
    eval_mask: np.ndarray  # (T,) bool
    predicted: np.ndarray  # (T, D) rpnt's harness prediction


def write_minival(root: Path, model: RPNT, layout: Layout, keys: list[str], seed: int = 0) -> list[Recording]:
    """One file per FALCON minival key under ``root`` (EVAL_DATA_PATH).  The target is the
    harness prediction plus noise, so R² is well inside (0, 1) and differs from day to day."""
    rng = np.random.default_rng(seed)
    folder = root / layout.dandiset / layout.folder
    folder.mkdir(parents=True)
    recordings = []
    for i, key in enumerate(keys):
        n_bins = 70 + 9 * i
        counts = rng.poisson(
            rng.uniform(0.2, 3.0, model.config.n_channels), (n_bins, model.config.n_channels)
        )
        session = Session(counts=counts.astype(np.int64), bin_s=BIN_S, session=SESSION)
        predicted = predict_session(model, session)
        noise = rng.normal(size=predicted.shape) * predicted.std(axis=0) * rng.uniform(0.3, 1.5)
        target = (predicted + noise).astype(np.float64)
        eval_mask = rng.random(n_bins) < 0.8
        eval_mask[:5] = False  # FALCON masks e.g. trial starts; at least some bins are left out
        write_falcon_nwb(
            folder / layout.file_name(key),
            counts=counts,
            target=target,
            eval_mask=eval_mask,
            layout=layout,
            start_s=2.0 + 0.37 * i,
        )
        recordings.append(
            Recording(key=key, counts=counts, target=target, eval_mask=eval_mask, predicted=predicted)
        )
    return recordings


def harness_r2_by_day(layout: Layout, recordings: list[Recording]) -> dict[str, float]:
    """rpnt's R² (pooled, variance-weighted) over each day's evaluated bins."""
    days = sorted({layout.day(r.key) for r in recordings})
    out = {}
    for day in days:
        mine = [r for r in recordings if layout.day(r.key) == day]
        out[day] = r2_score(
            np.concatenate([r.target[r.eval_mask] for r in mine]),
            np.concatenate([r.predicted[r.eval_mask] for r in mine]),
        )
    return out


def run_falcon(falcon, decoder, task: str, root: Path, monkeypatch) -> dict:
    """FALCON's own local evaluation of ``decoder`` on the minival files under ``root``."""
    monkeypatch.setenv("EVAL_DATA_PATH", str(root))
    monkeypatch.setenv("PREDICTION_PATH_LOCAL", str(root / "prediction.pkl"))  # FALCON's own payload files
    monkeypatch.setenv("GT_PATH", str(root / "gt.pkl"))
    monkeypatch.chdir(root)  # verbose mode also writes its per-day predictions to the working directory
    evaluator = falcon.FalconEvaluator(eval_remote=False, split=task, verbose=True, dataloader_workers=0)
    result = evaluator.evaluate(decoder, phase="minival")
    return result["result"][0][f"minival_split_{task}"]


def checkpoint_path(tmp_path: Path, model: RPNT) -> Path:
    path = tmp_path / "ft.safetensors"
    save_checkpoint(model, path, meta={"kind": "finetuned", "metadata": METADATA})
    return path


@pytest.mark.parametrize("task", ["m2", "m1"])
def test_falcon_evaluator_scores_the_checkpoint_as_our_harness_does(falcon, task, tmp_path, monkeypatch):
    from rpnt_core.falcon import FalconDecoder

    layout = LAYOUTS[task]
    model = tiny_falcon_model(task)
    keys = falcon.DATASET_HELDINOUT_MAP[task]["held_in"]  # every dataset FALCON's minival expects
    recordings = write_minival(tmp_path / "data", model, layout, keys)
    expected = harness_r2_by_day(layout, recordings)
    assert all(0.05 < r2 < 0.95 for r2 in expected.values()), expected  # a score that can move

    decoder = FalconDecoder.from_checkpoint(checkpoint_path(tmp_path, model), task=task)
    scores = run_falcon(falcon, decoder, task, tmp_path / "data", monkeypatch)

    falcon_by_day = {day: scores[f"Held In {day} R2"] for day in expected}
    assert falcon_by_day == pytest.approx(expected, abs=1e-5)
    assert scores["Held In R2 Mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-5)
    assert scores["Held In R2 Std."] == pytest.approx(np.std(list(expected.values())), abs=1e-5)


def test_falcon_scores_the_onnx_step_engine_like_the_checkpoint(falcon, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from exporters.onnx_export import export_step_graph
    from exporters.runtime import load_engine
    from rpnt_core.falcon import FalconDecoder

    layout = LAYOUTS["m2"]
    model = tiny_falcon_model("m2", seed=1)
    recordings = write_minival(
        tmp_path / "data", model, layout, falcon.DATASET_HELDINOUT_MAP["m2"]["held_in"], seed=1
    )
    expected = harness_r2_by_day(layout, recordings)
    with torch.no_grad():  # the step graph only, with the metadata baked in as an export does
        meta_bias = model.metadata_bias(model.metadata_for(batch_size=1, session=SESSION), 1)[0].numpy()
    export_step_graph(model, tmp_path / "rpnt_step.onnx", meta_bias=meta_bias, metadata=METADATA)

    decoder = FalconDecoder(decoder=load_engine(tmp_path / "rpnt_step.onnx", warmup_bins=0), task="m2")
    scores = run_falcon(falcon, decoder, "m2", tmp_path / "data", monkeypatch)

    assert {day: scores[f"Held In {day} R2"] for day in expected} == pytest.approx(expected, abs=1e-4)


def test_metadata_reaches_the_model(falcon, tmp_path):
    """The checkpoint's finetuning metadata conditions the decoder; other metadata changes outputs."""
    from rpnt_core.falcon import FalconDecoder

    model = tiny_falcon_model("m2")
    ckpt = checkpoint_path(tmp_path, model)
    counts = np.random.default_rng(3).poisson(1.5, (30, 96))
    predicted = predict_session(model, Session(counts=counts, bin_s=BIN_S, session=SESSION))

    def stream(decoder: FalconDecoder) -> np.ndarray:
        decoder.reset(dataset_tags=[Path("x.nwb")])
        return np.concatenate(
            [decoder.predict(counts[t : t + 1].astype(np.uint8)) for t in range(len(counts))]
        )

    stored = stream(FalconDecoder.from_checkpoint(ckpt, task="m2"))
    unknown = stream(FalconDecoder.from_checkpoint(ckpt, task="m2", metadata={"session": "elsewhere"}))
    assert stored.shape == (30, 2) and stored.dtype == np.float32
    np.testing.assert_allclose(stored, predicted, atol=1e-4)
    assert np.abs(unknown - predicted).max() > 1e-2


def test_reset_starts_a_new_stream(falcon, tmp_path):
    from rpnt_core.falcon import FalconDecoder

    decoder = FalconDecoder.from_checkpoint(checkpoint_path(tmp_path, tiny_falcon_model("m2")), task="m2")
    counts = np.random.default_rng(4).poisson(2.0, (12, 1, 96)).astype(np.uint8)
    first = [decoder.predict(c) for c in counts]
    decoder.on_done(np.array([True]))  # a trial end keeps the history (continual decoding)
    carried_on = decoder.predict(counts[0])
    decoder.reset(dataset_tags=[Path("next.nwb")])
    again = [decoder.predict(c) for c in counts]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert not np.allclose(carried_on, first[0])


@pytest.mark.parametrize(
    "kw, task, field",
    [
        ({"bin_s": 0.05}, "m2", "bin_s"),
        ({"n_channels": 64}, "m2", "n_channels"),
        ({"n_outputs": 7}, "m2", "n_outputs"),
    ],
)
def test_a_decoder_that_does_not_fit_the_task_is_refused(falcon, tmp_path, kw, task, field):
    from rpnt_core.falcon import FalconDecoder

    ckpt = checkpoint_path(tmp_path, tiny_falcon_model(task, **kw))
    with pytest.raises(ValueError) as err:
        FalconDecoder.from_checkpoint(ckpt, task=task)
    msg = str(err.value)
    assert msg.startswith(f"{field}:") and "\n" not in msg, msg


@pytest.mark.parametrize("task", ["h2", "b1", "m3"])
def test_tasks_without_a_continuous_target_are_refused(falcon, tmp_path, task):
    from rpnt_core.falcon import FalconDecoder

    ckpt = checkpoint_path(tmp_path, tiny_falcon_model("m2"))
    with pytest.raises(ValueError, match=r"^task: .*h1, m1, m2$"):
        FalconDecoder.from_checkpoint(ckpt, task=task)


def test_bad_calls_name_their_field(falcon, tmp_path):
    from rpnt_core.falcon import FalconDecoder

    ckpt = checkpoint_path(tmp_path, tiny_falcon_model("m2"))
    decoder = FalconDecoder.from_checkpoint(ckpt, task="m2")
    with pytest.raises(ValueError, match=r"^neural_observations: expected shape \(1, 96\), got \(2, 96\)$"):
        decoder.predict(np.zeros((2, 96), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"^batch_size: "):
        decoder.set_batch_size(7)
    with pytest.raises(ValueError, match=r"^dataset_tags: "):
        decoder.reset(dataset_tags=["a.nwb", "b.nwb"])
    with pytest.raises(ValueError, match=r"^metadata: unknown field 'sesion'"):
        FalconDecoder.from_checkpoint(ckpt, task="m2", metadata={"sesion": SESSION})


def test_without_falcon_the_import_error_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "rpnt_core.falcon", raising=False)
    for name in ("falcon_challenge", "falcon_challenge.config", "falcon_challenge.interface"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'rpnt\[falcon\]'"):
        importlib.import_module("rpnt_core.falcon")
