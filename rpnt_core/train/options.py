"""The trainers' options, each declared once: type, default and help text in one field.

:class:`PretrainOptions` and :class:`FinetuneOptions` are frozen, keyword-only and validated at
construction.  Every field carries its description in ``metadata["help"]``, and
``metadata["flag"]`` says how the ``rpnt pretrain`` / ``rpnt finetune`` command line offers it
(:func:`rpnt_core.flags.add_option_flags` builds the argparse flags from these fields).
Torch-free: the CLI imports this module to build its parsers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import PRESETS
from .choices import CHANNEL_MODES, FINETUNE_MODES, OBJECTIVES


def option(default: Any, help: str, *, flag: bool | str = True, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its description.

    Args:
        default: the field's default (immutable).
        help: what the field means; the command line's help text for its flag.
        flag: True: offered as ``--field-name``; a string: offered under that flag name (a bool
            that defaults to True gets a flag that turns it off, e.g. ``--quiet`` for ``progress``);
            False: not on the command line.
        choices: the allowed values of a string field.

    Returns:
        A :func:`dataclasses.field` carrying ``help``, ``flag`` and ``choices`` in its metadata.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


_PRESET_HELP = (
    "model size: 'small' (d_model 128, 2 layers; CPU deployment) or 'paper' (d_model 512, 4 layers, 16 heads)"
)
_SEED_HELP = "random seed; runs are reproducible on CPU"
_DEVICE_HELP = "'cpu', 'cuda', 'cuda:1' or 'auto' (cuda if available)"
_OVERRIDES_HELP = "RPNTConfig fields that differ from the preset, as (name, value) pairs"


def _at_least_one(options: object, names: tuple[str, ...]) -> None:
    for name in names:
        if int(getattr(options, name)) < 1:
            raise ValueError(f"{name}: must be ≥ 1, got {getattr(options, name)}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class PretrainOptions:
    """How :func:`rpnt_core.train.pretrain.pretrain` trains (see the fields' help).

    Raises:
        ValueError: a count below 1, an unknown ``channels`` or ``objective``, or a fraction or
            scale out of range.
    """

    preset: str = option("small", _PRESET_HELP, choices=PRESETS)
    epochs: int = option(10, "training epochs")
    steps_per_epoch: int = option(50, "optimizer steps per epoch")
    batch_size: int = option(16, "windows per batch (per process)")
    window_len: int = option(100, "bins per training window")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay", flag=False)
    warmup_steps: int = option(
        50, "steps of linear learning-rate warm-up before the cosine decay", flag=False
    )
    grad_clip: float = option(1.0, "largest gradient norm of a step", flag=False)
    channels: str = option(
        "resample",
        "how sessions with different channel counts meet the model: 'resample' to a fixed width "
        "(the paper's recipe) or 'readin' (a per-session read-in)",
        choices=CHANNEL_MODES,
    )
    n_max: int = option(0, "resample width; 0: the largest channel count in the data")
    val_fraction: float = option(0.1, "the last fraction of each recording, for validation", flag=False)
    spatial: bool = option(
        False, "train the multi-site spatial encoder + site contrast (multi-site recordings only)"
    )
    contrastive_weight: float = option(0.1, "weight of the site-contrast loss (spatial models)", flag=False)
    adapter_lr_scale: float = option(
        10.0,
        "with --channels readin: learning-rate multiplier for the per-session read-ins/read-outs "
        "(each sees only its own session's batches; at 1 a pool of many short sessions stays at the "
        "mean-rate loss)",
    )
    target_share: float = option(
        0.0,
        "fraction of the batches drawn from the LAST session (e.g. a new session's unlabelled bins); "
        "the others share the rest by length; 0: every session by its length",
    )
    objective: str = option(
        "masked",
        "'supervised': the sessions' labels of the target train the core and the head together (a "
        "decoder of the pool that finetuning starts from); 'masked': self-supervised, no labels",
        choices=OBJECTIVES,
    )
    seed: int = option(0, _SEED_HELP)
    device: str = option("auto", _DEVICE_HELP)
    resume: bool = option(False, "continue from OUT.resume.safetensors if present")
    progress: bool = option(True, "progress bars", flag="--quiet")
    config_overrides: tuple[tuple[str, object], ...] = option((), _OVERRIDES_HELP, flag=False)

    def __post_init__(self) -> None:
        _at_least_one(self, ("epochs", "steps_per_epoch", "batch_size", "window_len"))
        _one_of("channels", self.channels, CHANNEL_MODES)
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction: must be in (0, 0.5), got {self.val_fraction}")
        if not self.adapter_lr_scale > 0:
            raise ValueError(f"adapter_lr_scale: must be > 0, got {self.adapter_lr_scale}")
        if not 0 <= self.target_share < 1:
            raise ValueError(f"target_share: must be in [0, 1), got {self.target_share}")
        _one_of("objective", self.objective, OBJECTIVES)

    @property
    def supervised(self) -> bool:
        """Whether the run trains on the pool's labels (``objective`` "supervised")."""
        return self.objective == "supervised"


# Training sized to a short block of labels (a new day's calibration), see FinetuneOptions.for_labels.
LABEL_BUDGET = {
    "epochs": 10,
    "max_steps": 10,
    "bins_per_step": 150,
    "batch_size": 8,
    "window_len": 64,
    "patience": 4,
}


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions:
    """How :func:`rpnt_core.train.finetune.finetune` trains (see the fields' help).

    Raises:
        ValueError: an unknown ``mode`` or ``channels``, a count below 1, or ``lr`` ≤ 0.
    """

    mode: str = option(
        "full",
        "what to train: the velocity head only (encoder frozen), the last layers, or everything",
        choices=FINETUNE_MODES,
    )
    last_layers: int = option(1, "blocks trained in --mode last")
    epochs: int = option(40, "training epochs")
    steps_per_epoch: int = option(20, "optimizer steps per epoch")
    batch_size: int = option(16, "windows per batch")
    window_len: int = option(100, "bins per training window")
    lr: float = option(1e-3, "learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay", flag=False)
    patience: int = option(8, "epochs without validation gain before stopping")
    train_fraction: float = option(0.2, "fraction of the session used for training (from its start)")
    val_fraction: float = option(0.1, "fraction just before the test split, for validation", flag=False)
    test_fraction: float = option(0.2, "the last fraction of the session, for testing", flag=False)
    channels: str = option(
        "resample",
        "when the session's channel count differs from the checkpoint's: resample to the "
        "checkpoint's width, or learn a fresh per-session read-in",
        choices=CHANNEL_MODES,
    )
    preset: str = option("small", _PRESET_HELP + ", when training from scratch", choices=PRESETS)
    seed: int = option(0, _SEED_HELP)
    device: str = option("auto", _DEVICE_HELP)
    progress: bool = option(True, "progress output", flag="--quiet")
    config_overrides: tuple[tuple[str, object], ...] = option((), _OVERRIDES_HELP, flag=False)

    def __post_init__(self) -> None:
        _one_of("mode", self.mode, FINETUNE_MODES)
        _one_of("channels", self.channels, CHANNEL_MODES)
        _at_least_one(self, ("epochs", "batch_size", "window_len", "patience", "last_layers"))
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")

    @classmethod
    def for_labels(
        cls, n_train_bins: int, *, budget: dict | None = None, **overrides: object
    ) -> "FinetuneOptions":
        """Options sized to a block of labels.

        Args:
            n_train_bins: labelled bins in the train split.
            budget: the sizing rule (default :data:`LABEL_BUDGET`): one step per ``bins_per_step``
                bins, between 1 and ``max_steps`` per epoch, and its epochs, batch size, window
                and patience.
            **overrides: fields that win over the budget.

        Returns:
            The options.
        """
        b = budget or LABEL_BUDGET
        steps = int(min(max(n_train_bins // b["bins_per_step"], 1), b["max_steps"]))
        return cls(
            **{
                "epochs": b["epochs"],
                "steps_per_epoch": steps,
                "batch_size": b["batch_size"],
                "window_len": b["window_len"],
                "patience": b["patience"],
                **overrides,
            }
        )
