"""Where a session lives inside each kind of MAT file: the :class:`MatLayout` records.

:func:`~rpnt_core.data.mat.load_mat` is driven by :data:`MAT_LAYOUTS`, a table of
:class:`MatLayout` records that say which keys hold what (top-level variables or the fields of one
struct), whether arrays are stored channels-first, which rows/columns to take, whether counts are
stored as rates in Hz, where the bin width comes from (a variable, a constant, or the
checked-uniform step of the time stamps), which further behaviour series exist (force, EMG:
:class:`MatSeries`) and where the session name, recording date, channel names and trial table
are.  Supporting a new MAT file means adding a record, not a function.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAT_LAYOUTS", "MILLER_SESSION_NAME", "MatLayout", "MatSeries"]


@dataclass(frozen=True, kw_only=True)
class MatSeries:
    """A named behaviour series beyond velocity/position (→ ``Session.behaviour[name]``).

    ``key``: the variable; ``dims``: its columns to keep (``None`` = all).  A variable that is
    absent or empty in a file (e.g. wrist force on a day it was not recorded) leaves the series
    out of that session."""

    name: str
    key: str
    dims: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class MatLayout:
    """Where the session lives inside one kind of MAT file.

    Arrays:

    - ``struct_key``: the variables named below are fields of this struct variable (e.g. the
      Miller lab's ``binnedData``); else they are top-level variables.
    - ``counts_key``/``velocity_key``/``position_key``/``timestamps_key``: variable names
      (``None`` = absent).  Velocity and position may share one variable (different columns).
    - ``behaviour``: further named series (:class:`MatSeries`), e.g. force and EMG.
    - ``channels_first``: 2-D arrays are stored (C, T) and are transposed to (T, C).
    - ``counts_dims``/``velocity_dims``/``position_dims``: which rows (channels-first) or
      columns to keep, after which the array is (T, D).  ``None`` keeps every column.
    - ``counts_in_hz``: the counts variable holds rates in Hz; rate × bin width must be a whole
      spike count in every bin (checked, so smoothed rates are refused rather than rounded).

    Bin width, exactly one of: ``bin_s_key`` (a variable holding seconds), ``bin_s`` (a
    constant), ``bin_s_from_timestamps`` (the step of ``timestamps_key``, checked uniform).

    Metadata (each optional in a file; absent → the default):

    - ``subject``/``task``: constants to attach.
    - ``session_key``: dotted path (``meta.filename``) of the recording's original file name;
      the session name is its stem.  Default: the MAT file's stem.
    - ``datetime_key`` + ``datetime_format``: the recording start (a ``strptime`` format) →
      ``date_days`` (days since 1970-01-01 on the recording's own clock) and
      ``extra["session_start_time"]`` (ISO 8601).
    - ``name_pattern``: a regular expression that must match the whole session name (or else the
      file stem); its named groups ``subject``/``task`` override the constants.
    - ``channel_names_key``/``trials_key``: → ``extra["channel_names"]`` / ``extra["trials"]``.
    """

    name: str
    counts_key: str
    velocity_key: str | None = None
    position_key: str | None = None
    timestamps_key: str | None = None
    behaviour: tuple[MatSeries, ...] = ()
    struct_key: str | None = None
    channels_first: bool = False
    counts_dims: tuple[int, ...] | None = None
    velocity_dims: tuple[int, ...] | None = None
    position_dims: tuple[int, ...] | None = None
    counts_in_hz: bool = False
    bin_s_key: str | None = None
    bin_s: float | None = None
    bin_s_from_timestamps: bool = False
    subject: str = ""
    task: str = ""
    session_key: str | None = None
    datetime_key: str | None = None
    datetime_format: str = ""
    name_pattern: str | None = None
    channel_names_key: str | None = None
    trials_key: str | None = None

    def __post_init__(self) -> None:
        sources = (self.bin_s_key is not None) + (self.bin_s is not None) + bool(self.bin_s_from_timestamps)
        if sources != 1:
            raise ValueError(
                f"bin_s: layout {self.name!r} needs exactly one of bin_s_key, bin_s or bin_s_from_timestamps"
            )
        if self.bin_s_from_timestamps and self.timestamps_key is None:
            raise ValueError(
                f"bin_s: layout {self.name!r} takes the bin width from time stamps but has no timestamps_key"
            )
        if (self.datetime_key is None) != (not self.datetime_format):
            raise ValueError(
                f"datetime_format: layout {self.name!r} needs it exactly when datetime_key is set"
            )

    @property
    def array_keys(self) -> frozenset[str]:
        """Variables every file of this layout holds (fields of ``struct_key`` when set)."""
        keys = (self.counts_key, self.velocity_key, self.position_key, self.timestamps_key, self.bin_s_key)
        return frozenset(k for k in keys if k is not None)

    @property
    def all_keys(self) -> frozenset[str]:
        """Every variable the layout may read (the first part of a dotted path), required or not."""
        optional = [s.key for s in self.behaviour] + [
            self.channel_names_key,
            self.trials_key,
            self.session_key,
            self.datetime_key,
        ]
        return self.array_keys | {k.split(".")[0] for k in optional if k}

    @property
    def required_keys(self) -> frozenset[str]:
        """Top-level variables that identify a file of this layout."""
        return frozenset((self.struct_key,)) if self.struct_key else self.array_keys

    def describe(self) -> str:
        """One line for error messages: the name and the variables (or struct fields) it reads."""
        fields = ", ".join(sorted(self.array_keys))
        return (
            f"{self.name} (struct {self.struct_key}: {fields})"
            if self.struct_key
            else f"{self.name} ({fields})"
        )


# The Miller Limb Lab's file names: <monkey>_<MM-DD-YY>[_<task code>]_<NNN>, e.g. Spike_07-18-12_WF_001.
MILLER_SESSION_NAME = r"(?P<subject>[A-Za-z]+)_\d{2}-\d{2}-\d{2}(?:_(?P<task>[A-Za-z]+))?_\d+"

MAT_LAYOUTS: dict[str, MatLayout] = {
    # Stevenson et al. 2011 (CRCNS DREAM), M1 centre-out; see shared/data/stevenson2011_m1_centerout.
    "StevensonV2": MatLayout(
        name="StevensonV2",
        counts_key="spikes",  # (196, T)
        velocity_key="handVel",  # (3, T), rows 0..1 = x, y; row 2 all zeros
        position_key="handPos",  # (3, T)
        timestamps_key="time",  # (1, T) seconds
        channels_first=True,
        velocity_dims=(0, 1),
        position_dims=(0, 1),
        bin_s_key="timeBase",  # (1, 1) = 0.05
        subject="stevenson2011",
        task="center-out",
    ),
    # BME 517 course file, origin undocumented; see shared/data/contdata95_bme517.
    "contdata95": MatLayout(
        name="contdata95",
        counts_key="Y",  # (T, 95)
        velocity_key="X",  # (T, 4): x pos, y pos, x vel, y vel
        position_key="X",
        velocity_dims=(2, 3),
        position_dims=(0, 1),
        bin_s=0.05,
        subject="bme517",
    ),
    # Miller lab area 2 ("S1", Kording lab copy); see shared/data/miller_area2_s1.  No time base:
    # 50 ms bins as the papers state.
    "miller_area2_s1": MatLayout(
        name="miller_area2_s1",
        counts_key="spikes",  # (T, 52) counts
        velocity_key="vel",  # (T, 2)
        position_key="pos",  # (T, 2)
        bin_s=0.05,
        subject="miller_area2",
        task="random-target",
    ),
    # The Miller Limb Lab's binnedData struct (shared/data/limblab_spike_wf_2012, limblab_nick_co).
    "binnedData": MatLayout(
        name="binnedData",
        struct_key="binnedData",
        counts_key="spikeratedata",  # (T, N) Hz per bin
        counts_in_hz=True,
        velocity_key="velocbin",  # (T, 3): x, y velocity and speed
        velocity_dims=(0, 1),
        position_key="cursorposbin",  # (T, 2)
        behaviour=(
            MatSeries(name="force", key="forcedatabin"),  # (T, 2), or empty when not recorded
            MatSeries(name="emg", key="emgdatabin"),
        ),  # (T, muscles), or empty
        timestamps_key="timeframe",  # (T, 1) seconds
        bin_s_from_timestamps=True,
        session_key="meta.filename",  # the original .nev path
        datetime_key="meta.datetime",  # e.g. "7/18/2012 14:0:46.750"
        datetime_format="%m/%d/%Y %H:%M:%S.%f",
        name_pattern=MILLER_SESSION_NAME,
        channel_names_key="spikeguide",  # eeNNuK: electrode NN, unit K
        trials_key="trialtable",
    ),
}
