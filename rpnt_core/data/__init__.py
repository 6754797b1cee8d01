"""Data layer: the :class:`Session` record, file formats, simulator, splits, channel maps, windows."""

from rpnt_core.data.channels import ChannelResampler
from rpnt_core.data.formats import load_session, session_files
from rpnt_core.data.mat import load_mat
from rpnt_core.data.mat_layouts import MAT_LAYOUTS, MatLayout, MatSeries
from rpnt_core.data.npz import load_npz, save_npz
from rpnt_core.data.nwb import load_nwb
from rpnt_core.data.session import Session, fingerprint_sessions
from rpnt_core.data.simulate import SimulationSpec, simulate_sessions, write_simulated
from rpnt_core.data.splits import Splits, contiguous_splits
from rpnt_core.data.validate import validate_session
from rpnt_core.data.windows import WindowSampler, make_windows

__all__ = [
    "MAT_LAYOUTS",
    "ChannelResampler",
    "MatLayout",
    "MatSeries",
    "Session",
    "SimulationSpec",
    "Splits",
    "WindowSampler",
    "contiguous_splits",
    "fingerprint_sessions",
    "load_mat",
    "load_npz",
    "load_nwb",
    "load_session",
    "make_windows",
    "save_npz",
    "session_files",
    "simulate_sessions",
    "validate_session",
    "write_simulated",
]
