"""Score rpnt with FALCON's own evaluator: an rpnt decoder behind the ``falcon_challenge`` interface.

FALCON (the ``falcon-challenge`` package, ``pip install 'rpnt[falcon]'``) streams each evaluation
file to a ``BCIDecoder`` one 20 ms bin at a time and scores the outputs itself.
:class:`FalconDecoder` is that ``BCIDecoder`` around any rpnt :class:`~rpnt_core.decoder.Decoder`
(the torch model, an ONNX Runtime engine from ``exporters``, a baseline)::

    from falcon_challenge.evaluator import FalconEvaluator
    from rpnt_core.falcon import FalconDecoder

    decoder = FalconDecoder.from_checkpoint("ft.safetensors", task="m2")
    # or FalconDecoder(decoder=exporters.runtime.load_engine("exports/m2"), task="m2")
    FalconEvaluator(split="m2", dataloader_workers=0).evaluate(decoder, phase="minival")

Contract
--------
- Tasks: FALCON's regression tasks ``h1``, ``m1``, ``m2`` (continuous targets, 20 ms bins).
  ``h2`` (decoded text, scored by edit distance) and ``b1`` (30 kHz samples, spectrograms) are
  refused.
- Construction checks the wrapped decoder against the task: bin width against FALCON's
  (``FalconConfig.bin_size_ms``), input channels against the task's ``n_channels``, outputs
  against its ``out_dim``.  A mismatch raises ``ValueError`` naming the field.
- Batch size 1 only: ``reset(dataset_tags)`` takes one tag and starts a new stream (an empty
  history); ``predict(neural_observations (1, N))`` is one causal ``step`` → ``(1, D)`` float32.
- ``on_done`` does nothing: FALCON's regression tasks decode continually, so the history runs on
  across trial ends until the next ``reset`` (the next file), as the daemon's would.
- Conditioning metadata (subject/session/task/date) is fixed when the decoder is built;
  :meth:`FalconDecoder.from_checkpoint` uses the checkpoint's finetuning metadata, as an export
  does.  The dataset tags only delimit streams.

Importing this module needs ``falcon_challenge``; nothing else in ``rpnt_core`` imports it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from .data.session import METADATA_FIELDS, check_bin_width
from .decoder import Decoder, DecoderInfo

try:
    from falcon_challenge.config import FalconConfig, FalconTask
    from falcon_challenge.interface import BCIDecoder
except ImportError as exc:  # the core install does not carry FALCON's dependencies
    raise ImportError(
        "falcon: the falcon-challenge package is not installed; pip install 'rpnt[falcon]'"
    ) from exc

__all__ = ["SUPPORTED_TASKS", "FalconDecoder", "check_fits_task", "falcon_config"]

SUPPORTED_TASKS = ("h1", "m1", "m2")
_REFUSED = {
    "h2": "FALCON h2 scores decoded text by edit distance",
    "b1": "FALCON b1 streams 30 kHz samples and scores spectrograms",
}


def falcon_config(task: str) -> FalconConfig:
    """FALCON's own config for a task.

    Args:
        task: ``h1`` | ``m1`` | ``m2``.
    Returns:
        ``falcon_challenge``'s ``FalconConfig`` for it.
    Raises:
        ValueError: starting with ``task:`` for any other name.
    """
    if task in _REFUSED:
        raise ValueError(
            f"task: {_REFUSED[task]}; rpnt decodes continuous targets — "
            f"choose one of {', '.join(SUPPORTED_TASKS)}"
        )
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"task: unknown FALCON task {task!r}; choose one of {', '.join(SUPPORTED_TASKS)}")
    return FalconConfig(task=FalconTask[task])


def check_fits_task(info: DecoderInfo, config: FalconConfig) -> None:
    """Check that a decoder can run a FALCON task.

    Args:
        info: the decoder's :class:`~rpnt_core.decoder.DecoderInfo`.
        config: the task's ``FalconConfig`` (:func:`falcon_config`).
    Raises:
        ValueError: naming the field that does not match: bin width (``bin_s``), input channels
            (``n_channels``) or outputs (``n_outputs``).
    """
    task = config.task.name
    check_bin_width(data_bin_s=config.bin_size_ms / 1000.0, model_bin_s=info.bin_s)
    if info.n_channels != config.n_channels:
        raise ValueError(
            f"n_channels: the decoder reads {info.n_channels} channels per bin; FALCON {task} "
            f"serves {config.n_channels}"
        )
    if info.n_outputs != config.out_dim:
        raise ValueError(
            f"n_outputs: the decoder outputs {info.n_outputs} dimensions; FALCON {task} "
            f"scores {config.out_dim}"
        )


class FalconDecoder(BCIDecoder):
    """A FALCON ``BCIDecoder`` (batch size 1) that streams bins through an rpnt ``decoder``.

    See the module docstring for the contract.

    Args:
        decoder: any :class:`~rpnt_core.decoder.Decoder` (``info``, ``reset()``, ``step``).
        task: ``h1`` | ``m1`` | ``m2``.
    Raises:
        ValueError: an unsupported task, or a decoder that does not fit it (:func:`check_fits_task`).
    """

    def __init__(self, *, decoder: Decoder, task: str) -> None:
        config = falcon_config(task)
        check_fits_task(decoder.info, config)
        super().__init__(task_config=config, batch_size=1)
        self.decoder = decoder
        self.decoder.reset()

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, task: str, metadata: Mapping[str, Any] | None = None
    ) -> FalconDecoder:
        """The torch model of a finetuned checkpoint behind FALCON's interface.

        Args:
            path: the checkpoint.
            task: ``h1`` | ``m1`` | ``m2``.
            metadata: conditioning fields ``subject``, ``session``, ``task``, ``date_days``;
                ``None``: the checkpoint's finetuning metadata.
        Raises:
            CheckpointError: a pretraining checkpoint (its head never saw a label).
            ValueError: an unknown metadata field, or a model that does not fit the task.
        """
        from .checkpoint import load_checkpoint, require_trained_head
        from .model.torch_decoder import TorchDecoder

        model = load_checkpoint(path)
        require_trained_head(model.checkpoint_meta, path)
        names = (model.checkpoint_meta.get("metadata") or {}) if metadata is None else dict(metadata)
        unknown = sorted(set(names) - set(METADATA_FIELDS))
        if unknown:
            raise ValueError(f"metadata: unknown field {unknown[0]!r}; expected {', '.join(METADATA_FIELDS)}")
        given = {k: v for k, v in names.items() if v not in (None, "")}
        return cls(decoder=TorchDecoder(model, metadata=model.metadata_for(batch_size=1, **given)), task=task)

    def reset(self, dataset_tags: Sequence[Any] = ("",)) -> None:
        """Start a new stream: FALCON calls this before each file, with one tag per batch slot."""
        if len(dataset_tags) != self.batch_size:
            raise ValueError(
                f"dataset_tags: expected {self.batch_size} tag (batch size 1), got {len(dataset_tags)}"
            )
        self.decoder.reset()

    def predict(self, neural_observations: np.ndarray) -> np.ndarray:
        """Decode one bin causally.

        Shape: neural_observations (1, N) → (1, D) float32.
        """
        obs = np.asarray(neural_observations)
        want = (self.batch_size, self.decoder.info.n_channels)
        if obs.shape != want:
            raise ValueError(f"neural_observations: expected shape {want}, got {obs.shape}")
        return np.asarray(self.decoder.step(obs[0]), dtype=np.float32)[None, :]

    def on_done(self, dones: np.ndarray) -> None:
        """Trial ends do not reset the history (continual decoding): nothing to do."""

    def set_batch_size(self, batch_size: int) -> None:
        """Only batch size 1 is supported: one stream, one causal state."""
        if batch_size != 1:
            raise ValueError(f"batch_size: FalconDecoder streams one file at a time (1), got {batch_size}")
        self.batch_size = 1
