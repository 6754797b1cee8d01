"""Typed, validated model configuration and presets.

``RPNTConfig`` is frozen and keyword-only; every impossible shape is rejected in
``__post_init__`` with a message naming the field, so a bad config fails at construction and
not three layers down.  ``RPNTConfig.preset(name, **overrides)`` gives the two presets:

- ``paper``: d_model 512, 4 layers, 16 heads (the RPNT paper's LTRCH setting), W = 50 bins,
  context kernels of 9 query rows (180 ms at 20 ms bins, the paper's best) × 3 key taps.
- ``small``: d_model 128, 2 layers, 4 heads, W = 50, kernels 5 × 3, dropout 0.3 — sized for CPU
  deployment and few-shot data.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        d_model=512,
        n_layers=4,
        n_heads=16,
        window=50,
        kernel_q=9,
        kernel_k=3,
        ff_mult=4,
        kernel_hidden=128,
        dropout=0.1,
    ),
    "small": dict(
        d_model=128,
        n_layers=2,
        n_heads=4,
        window=50,
        kernel_q=5,
        kernel_k=3,
        ff_mult=2,
        kernel_hidden=64,
        dropout=0.3,
    ),
}


_POSITIVE_INTS = (
    "n_channels",
    "n_outputs",
    "d_model",
    "n_layers",
    "n_heads",
    "window",
    "kernel_q",
    "kernel_k",
    "kernel_hidden",
    "ff_mult",
    "spatial_heads",
)

# Fields removed from the config (CHANGELOG), with the one value they could take and still mean the
# model that is built today: a stored config carrying that value loads (the key is dropped), any
# other value is refused.
_RETIRED = {"mask_token": False, "kernel_mode": "add"}


class ConfigError(ValueError):
    """An impossible or inconsistent configuration value."""


@dataclass(frozen=True, kw_only=True)
class RPNTConfig:
    """Shape and hyper-parameters of an RPNT model.

    Attributes:
        n_channels: N, spike-count channels consumed per bin (per site for multi-site models).
        n_outputs: D, behaviour dimensions decoded by the output head.
        target: the name of the behaviour series the head decodes (``velocity``, ``position``,
            ``force``, ``emg``, ...: a session's :attr:`~rpnt_core.data.session.Session.targets` key).
            The head and its output keep the name ``velocity`` in code and graphs; this field says
            what they hold, and travels with the checkpoint and the export contract.
        d_model, n_layers, n_heads: temporal encoder width / depth / heads (d_model % n_heads == 0
            and the head dimension must be even for rotary embedding).
        window: W, bins of history (including the current one) each query attends to and pools
            context from; also the size of the streaming caches.
        kernel_q, kernel_k: context kernel size: k_q rows back on the query axis (≥ 1, current row
            included), k_k (odd) taps centred on the key axis.  The context convolution is added
            to the attention scores (Ŝ + S), its kernel generator initialised near zero.
        kernel_hidden: hidden width of the MLP that maps the context vector to kernels.
        ff_mult: feed-forward expansion factor.
        dropout: dropout on residual branches and attention probabilities (training only).
        rope_base: base of the rotary frequencies on the time axis.
        bin_s: bin width in seconds the model was trained at (travels to the daemon).
        subjects, sessions, tasks: metadata vocabularies; index 0 of each embedding is "unknown".
        use_date: condition on the recording date (continuous, days) through Fourier features.
        input_norm: standardise each input channel's sqrt(count) by the recording's own statistics
            before the read-in: ``(sqrt(x) − input_mean) / input_scale``, two (n_channels,) buffers of
            the model (see :func:`rpnt_core.data.normalise.sqrt_count_stats`), set from the unlabelled
            bins of the day being decoded.  Firing rates of one array drift several-fold across days;
            with it a read-in learned on one day meets another day's counts on the same scale.  The
            buffers travel with the checkpoint and every export (they are part of ``step``).  On by
            default; a config written before the field existed reads as off.
        spatial_layers, spatial_heads, site_rope_base: multi-site spatial encoder (0 layers = none).
        input_channels, channel_map: fixed channel resampling inside the model.  When ``channel_map``
            is set, the model consumes counts with ``input_channels`` channels and gathers
            ``counts[..., channel_map]`` (length ``n_channels``) first — how a model pretrained at a
            fixed width N_max is deployed on a session with its own channel count.  Log-rates are
            over the ``n_channels`` mapped slots.
    """

    n_channels: int
    n_outputs: int = 2
    target: str = "velocity"
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    window: int = 50
    kernel_q: int = 5
    kernel_k: int = 3
    kernel_hidden: int = 64
    ff_mult: int = 2
    dropout: float = 0.1
    rope_base: float = 10000.0
    bin_s: float = 0.02
    subjects: tuple[str, ...] = ()
    sessions: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    use_date: bool = True
    input_norm: bool = True
    spatial_layers: int = 0
    spatial_heads: int = 4
    site_rope_base: float = 100.0
    input_channels: int = 0
    channel_map: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self._check_sizes()
        self._check_heads()
        self._check_kernel()
        self._check_scalars()
        self._check_channel_map()
        self._check_vocabularies()

    def _check_sizes(self) -> None:
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
        if not isinstance(self.spatial_layers, int) or self.spatial_layers < 0:
            raise ConfigError(f"spatial_layers: must be an integer ≥ 0, got {self.spatial_layers!r}")
        if not isinstance(self.target, str) or not self.target.isidentifier():
            raise ConfigError(
                f"target: must be a behaviour series name such as 'velocity', got {self.target!r}"
            )

    def _check_heads(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"n_heads: head dimension d_model/n_heads = {self.d_model // self.n_heads} must be even "
                "(rotary embedding rotates pairs of features)"
            )
        if self.spatial_layers and (
            self.d_model % self.spatial_heads or (self.d_model // self.spatial_heads) % 4
        ):
            raise ConfigError(
                f"spatial_heads: d_model/spatial_heads must be a multiple of 4 (2-D rotary on site x/y), "
                f"got d_model={self.d_model}, spatial_heads={self.spatial_heads}"
            )

    def _check_kernel(self) -> None:
        if self.kernel_k % 2 == 0:
            raise ConfigError(f"kernel_k: must be odd (taps centred on the key), got {self.kernel_k}")
        if self.kernel_q > self.window:
            raise ConfigError(f"kernel_q: {self.kernel_q} query rows exceed the window W={self.window}")

    def _check_scalars(self) -> None:
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        for name in ("rope_base", "site_rope_base"):
            if not float(getattr(self, name)) > 1.0:
                raise ConfigError(f"{name}: must be > 1, got {getattr(self, name)}")
        if not float(self.bin_s) > 0.0:
            raise ConfigError(f"bin_s: must be > 0, got {self.bin_s}")

    def _check_channel_map(self) -> None:
        if not self.channel_map:
            if self.input_channels not in (0, self.n_channels):
                raise ConfigError(
                    f"input_channels: {self.input_channels} differs from n_channels={self.n_channels} "
                    "but no channel_map says how to map them"
                )
            return
        if not isinstance(self.channel_map, tuple) or len(self.channel_map) != self.n_channels:
            raise ConfigError(
                f"channel_map: must be a tuple of n_channels={self.n_channels} indices, "
                f"got {len(self.channel_map)}"
            )
        if self.input_channels < 1 or not all(0 <= int(i) < self.input_channels for i in self.channel_map):
            raise ConfigError(f"channel_map: indices must lie in [0, input_channels={self.input_channels})")

    def _check_vocabularies(self) -> None:
        for name in ("subjects", "sessions", "tasks"):
            vocab = getattr(self, name)
            if not isinstance(vocab, tuple) or not all(isinstance(x, str) for x in vocab):
                raise ConfigError(f"{name}: must be a tuple of strings")
            if len(set(vocab)) != len(vocab):
                raise ConfigError(f"{name}: contains duplicates")

    @property
    def n_input_channels(self) -> int:
        """Channels per bin that callers feed the model (the daemon's channel count)."""
        return self.input_channels if self.channel_map else self.n_channels

    @property
    def head_dim(self) -> int:
        """Width of one attention head, d_model / n_heads."""
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RPNTConfig":
        """A named preset (``paper`` or ``small``) with field overrides (n_channels is required)."""
        if name not in _PRESETS:
            raise ConfigError(f"preset: unknown preset {name!r}; choose from {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "RPNTConfig":
        """A copy with ``changes`` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists); :meth:`from_dict` reads it back to an equal config."""
        d = dataclasses.asdict(self)
        for k in ("subjects", "sessions", "tasks", "channel_map"):
            d[k] = list(d[k])
        return d

    def to_json(self) -> str:
        """:meth:`to_dict` as canonical JSON (sorted keys): what checkpoints and exports store."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RPNTConfig":
        """The config :meth:`to_json` wrote (or an older version of it; see :meth:`from_dict`).

        Raises:
            ConfigError: the text is not a JSON object or holds an invalid config.
        """
        try:
            d = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config: not JSON ({exc})") from exc
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RPNTConfig":
        """A config from :meth:`to_dict`'s fields, including ones stored by earlier versions.

        A field written before it existed takes its old meaning (``input_norm`` missing: off).  A
        removed field (``mask_token``, ``kernel_mode``) loads when it holds the one value that means
        today's model, and is dropped.

        Raises:
            ConfigError: an unknown field, a removed field with another value, or an invalid value.
        """
        d = dict(d)
        for name, kept in _RETIRED.items():
            value = d.pop(name, kept)
            if value != kept:
                raise ConfigError(
                    f"config: {name}={value!r} models are no longer supported ({name} was removed; "
                    f"only {kept!r} still loads): retrain without it"
                )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"config: unknown fields {sorted(unknown)}")
        d.setdefault("input_norm", False)  # written before the field existed: raw sqrt counts
        for k in ("subjects", "sessions", "tasks", "channel_map"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


PRESETS = tuple(_PRESETS)


def same_config(stored: str, config: RPNTConfig) -> bool:
    """Whether ``stored`` (config JSON from a checkpoint or an export, of any version) describes
    ``config``; JSON that does not read as a config describes none."""
    try:
        return RPNTConfig.from_json(stored) == config
    except ConfigError:
        return False
