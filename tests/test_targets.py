"""Behaviour targets beyond velocity, and the bin-width check wherever data meets a model.

A session carries every behaviour series it has (``Session.targets``) and a chosen one
(``Session.target``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from rpnt_core.data import Session
from rpnt_core.data.session import check_bin_width

T, N = 1200, 7


def session(*, bin_s: float = 0.05, seed: int = 0, **kw) -> Session:
    rng = np.random.default_rng(seed)
    t = np.arange(T) * bin_s
    velocity = np.stack([np.sin(t), np.cos(t)], axis=1)
    position = np.stack([np.cos(0.3 * t), np.sin(0.5 * t)], axis=1)
    counts = rng.poisson(np.exp(1.5 + 0.5 * (velocity @ rng.normal(size=(2, N)))) * bin_s)
    return Session(counts=counts, bin_s=bin_s, velocity=velocity, position=position, session="day1", **kw)


def test_targets_choice_and_fingerprint():
    s = session(behaviour={"emg": np.ones((T, 3))})
    assert list(s.targets) == ["velocity", "position", "emg"] and s.target == "velocity" and s.n_outputs == 2
    e = s.with_target("emg")
    assert e.target == "emg" and e.n_outputs == 3 and e.labels is s.behaviour["emg"]
    assert s.with_target(None) is s and e.slice_bins(10, 20).labels.shape == (10, 3)
    with pytest.raises(ValueError, match=r"^target: day1 has no 'force' \(it has velocity, position, emg\)$"):
        s.with_target("force")
    # velocity keeps the fingerprint it always had (checkpoints match their data); another target changes it
    assert s.fingerprint() == replace(s, position=None, behaviour={}).fingerprint()
    assert len({s.fingerprint(), s.with_target("position").fingerprint(), e.fingerprint()}) == 3


def test_behaviour_series_are_validated():
    from rpnt_core.data import validate_session

    with pytest.raises(ValueError, match=r"^emg: length 5 does not match counts length 1200$"):
        validate_session(session(behaviour={"emg": np.ones((5, 2))}))
    with pytest.raises(ValueError, match=r"^behaviour: names must be identifiers other than velocity/position"):
        validate_session(session(behaviour={"velocity": np.ones((T, 2))}))
    assert validate_session(session(behaviour={"force": np.ones((T, 2))})).behaviour["force"].dtype == np.float32


# ------------------------------------------------------------------------------------ bin width

MISMATCH = "bin_s: data bin width 50 ms does not match the model's 20 ms"


def test_check_bin_width():
    check_bin_width(data_bin_s=0.05, model_bin_s=0.05 * (1 + 1e-9))
    with pytest.raises(ValueError, match=f"^{MISMATCH}$"):
        check_bin_width(data_bin_s=0.05, model_bin_s=0.02)
