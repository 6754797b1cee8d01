"""End to end on the real recordings in ../shared/data (skipped where they are absent)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CONTDATA, SPIKE_WF, STEVENSON

pytestmark = pytest.mark.realdata


@pytest.mark.parametrize("path,channels", [(STEVENSON, 196), (CONTDATA, 95)])
def test_real_session_finetune_and_stream_evaluate(path, channels, tmp_path):
    if not path.exists():
        pytest.skip(f"{path} not present")
    from rpnt_core import load_checkpoint
    from rpnt_core.data import Splits, load_session
    from rpnt_core.evaluate.harness import evaluate_baseline, evaluate_model
    from rpnt_core.train.finetune import FinetuneOptions, finetune

    session = load_session(path)
    assert session.n_channels == channels and session.bin_s == pytest.approx(0.05)
    # a 4-minute slice keeps the test quick; splits are contiguous in time
    session = session.slice_bins(0, 4800)
    res = finetune(
        session,
        init=None,
        options=FinetuneOptions(
            epochs=5,
            steps_per_epoch=20,
            batch_size=8,
            window_len=64,
            train_fraction=0.5,
            progress=False,
            device="cpu",
            lr=2e-3,
            config_overrides=(("d_model", 64), ("n_heads", 4), ("n_layers", 1)),
        ),
        out=tmp_path / "m.safetensors",
    )
    splits = Splits.from_dict(res["splits"])
    model = load_checkpoint(tmp_path / "m.safetensors")
    again = evaluate_model(model, session, splits)
    assert again["r2"] == pytest.approx(res["test_r2"], abs=1e-6)
    assert res["test_r2"] > 0.3, res  # real motor cortex → velocity, decoded causally
    wiener = evaluate_baseline("wiener", session, splits)
    assert wiener["r2"] > 0.3 and np.isfinite(wiener["r2"])


def test_twenty_spike_days_load_and_only_the_broken_one_is_flagged():
    """limblab_spike_wf_2012 as its README describes it: 20 days of the same 96 electrodes at 50 ms,
    whole counts from the Hz rates, position and velocity every day, force from 08-17 on (16 EMG
    channels before, 14 from then), and 07-20 (channels switching on late) the one flagged day."""
    files = sorted(SPIKE_WF.glob("Spike_*.mat"))
    if len(files) != 20:
        pytest.skip(f"{SPIKE_WF} not present")
    from scipy.io import loadmat

    from rpnt_core.data import load_session
    from rpnt_core.data.quality import assess_session

    sessions = [load_session(f) for f in files]
    raw = loadmat(files[0], squeeze_me=True, struct_as_record=False)["binnedData"].spikeratedata
    np.testing.assert_array_equal(sessions[0].counts, np.rint(raw.astype(np.float64) * 0.05))
    guide = sessions[0].extra["channel_names"]
    force_from = load_session(SPIKE_WF / "Spike_08-17-12_WF_001.mat").date_days
    for s in sessions:
        assert s.counts.dtype == np.int32 and s.counts.shape[1] == 96 and s.bin_s == 0.05
        assert list(s.extra["channel_names"]) == list(guide)  # the same electrodes every day
        assert s.subject == "Spike" and s.task == "WF"
        has_force = s.date_days >= force_from
        assert set(s.targets) == {"velocity", "position", "emg"} | ({"force"} if has_force else set())
        assert s.targets["emg"].shape[1] == (14 if has_force else 16)
    assert [s.n_bins for s in sessions].count(24000) == 18
    assert sorted(s.date_days for s in sessions) == [s.date_days for s in sessions]  # file order = date order
    flagged = [s.session for s in sessions if assess_session(s).flagged]
    assert flagged == ["Spike_07-20-12_WF_001"]
    unlabelled = [s.session for s in sessions if assess_session(s, labels=False).flagged]
    assert unlabelled == ["Spike_07-20-12_WF_001"]  # flagged on its counts alone (pretraining's view)
