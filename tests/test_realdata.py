"""End to end on the real recordings in ../shared/data (skipped where they are absent)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CONTDATA, STEVENSON

pytestmark = pytest.mark.realdata


@pytest.mark.parametrize("path,channels", [(STEVENSON, 196), (CONTDATA, 95)])
def test_real_session_finetune_and_stream_evaluate(path, channels, tmp_path):
    if not path.exists():
        pytest.skip(f"{path} not present")
    from rpnt_core import load_checkpoint
    from rpnt_core.data import load_session
    from rpnt_core.evaluate.harness import evaluate_baseline, evaluate_model
    from rpnt_core.data import Splits
    from rpnt_core.train.finetune import FinetuneOptions, finetune

    session = load_session(path)
    assert session.n_channels == channels and session.bin_s == pytest.approx(0.05)
    # a 4-minute slice keeps the test quick; splits are contiguous in time
    session = session.slice_bins(0, 4800)
    res = finetune(session, init=None, options=FinetuneOptions(
        epochs=5, steps_per_epoch=20, batch_size=8, window_len=64, train_fraction=0.5, progress=False, device="cpu",
        lr=2e-3, config_overrides=(("d_model", 64), ("n_heads", 4), ("n_layers", 1))), out=tmp_path / "m.safetensors")
    splits = Splits.from_dict(res["splits"])
    model = load_checkpoint(tmp_path / "m.safetensors")
    again = evaluate_model(model, session, splits)
    assert again["r2"] == pytest.approx(res["test_r2"], abs=1e-6)
    assert res["test_r2"] > 0.3, res  # real motor cortex → velocity, decoded causally
    wiener = evaluate_baseline("wiener", session, splits)
    assert wiener["r2"] > 0.3 and np.isfinite(wiener["r2"])
