"""Classic causal baselines that run in the same harness and on the same splits as RPNT.

Every baseline implements the :class:`rpnt_core.decoder.Decoder` contract (``info``,
``reset()``, ``step(counts (N,)) -> velocity (D,)``), so offline evaluation streams it through
:func:`rpnt_core.decoder.decode_stream` exactly like the transformer.  Each also has

- ``fit(*, train_counts (T, N), train_velocity (T, D), val_counts, val_velocity, bin_s,
  seed=0, **hyper) -> Self`` — learns on the train split only; the validation split is used for
  model selection (Wiener: ridge alpha; GRU: early stopping) or only reported (Kalman), and is
  streamed from a reset, as evaluation will be;
- ``predict(counts (T, N)) -> (T, D) float32`` — the vectorised equivalent of ``reset()`` then
  one ``step`` per bin (equal to float tolerance; it does not touch the streaming state).

All of them read the counts as ``sqrt(counts)`` (variance-stabilised).  Bin t's output depends
only on bins ≤ t, and a ``step`` costs the same at any stream position.

Registry: :data:`BASELINES` maps ``"wiener" | "kalman" | "gru"`` to the class.  One module each:
:mod:`.wiener`, :mod:`.kalman`, :mod:`.gru` (with :class:`GRUOptions`); shared plumbing in
:mod:`.common`.
"""

from __future__ import annotations

from rpnt_core.evaluate.baselines.common import Baseline
from rpnt_core.evaluate.baselines.gru import GRUDecoder, GRUOptions
from rpnt_core.evaluate.baselines.kalman import KalmanFilter
from rpnt_core.evaluate.baselines.wiener import WienerFilter

__all__ = ["BASELINES", "GRUDecoder", "GRUOptions", "KalmanFilter", "WienerFilter"]

BASELINES: dict[str, type[Baseline]] = {
    "wiener": WienerFilter,
    "kalman": KalmanFilter,
    "gru": GRUDecoder,
}
