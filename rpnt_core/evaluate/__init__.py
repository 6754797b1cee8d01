"""Offline evaluation: the R² convention (:mod:`.metrics`) and classic baselines (:mod:`.baselines`)."""

from rpnt_core.evaluate.baselines import BASELINES, GRUDecoder, GRUOptions, KalmanFilter, WienerFilter
from rpnt_core.evaluate.metrics import r2_per_dim, r2_score

__all__ = ["r2_score", "r2_per_dim", "BASELINES", "WienerFilter", "KalmanFilter", "GRUDecoder", "GRUOptions"]
