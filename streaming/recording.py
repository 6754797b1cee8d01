"""The daemon's session recording: every decoded bin of a run, kept for writing out at stop
(``rpnt serve --record-nwb``, setting ``record.nwb``; :mod:`streaming.nwb_out` writes it).

The loop thread appends one row per decoded bin -- counts, output, flags, spike count, decoder
generation and the four stage stamps -- into preallocated blocks (a few array stores; no
allocation but one block per ``block`` bins), and notes each KINEMATICS message as it comes.
Memory grows with the run, ``4·(N + D) + 72`` bytes per bin (+ ``4·D`` per bin of kinematics;
96 channels, 2 outputs, 20 ms bins: 180 000 bins × 464 bytes ≈ 84 MB per hour), up to
``max_bins``; bins past that are counted, not kept.
:meth:`SessionRecorder.session` assembles the rows (any thread, once the loop has stopped).
"""

from __future__ import annotations

import numpy as np

from .nwb_out import DecodedSession

# columns of the integer block
_EPOCH, _BIN, _FLAGS, _NSPIKES, _GEN, _RECV, _CLOSE, _INFER, _PUB = range(9)


class SessionRecorder:
    """Rows of decoded bins, in decode order (writes from the loop thread only)."""

    def __init__(self, *, n_channels: int, n_outputs: int, max_bins: int, block: int = 4096) -> None:
        if max_bins < 1:
            raise ValueError(f"max_bins: must be ≥ 1, got {max_bins}")
        self.n_channels = int(n_channels)
        self.n_outputs = int(n_outputs)
        self.max_bins = int(max_bins)
        self.block = int(block)
        self._counts: list[np.ndarray] = []  # blocks (B, N) int32
        self._out: list[np.ndarray] = []  # blocks (B, D) float32
        self._meta: list[np.ndarray] = []  # blocks (B, 9) int64
        self._n = 0
        self.bins_not_recorded = 0
        self._kinematics: list[tuple[int, int, np.ndarray]] = []  # (epoch, first bin, (n, D_k) values)
        self._versions: dict[int, str] = {}

    @property
    def n_bins(self) -> int:
        return self._n

    def append(
        self,
        *,
        epoch: int,
        k: int,
        counts: np.ndarray,
        output: bytes,
        flags: int,
        n_spikes: int,
        generation: int,
        stamps: tuple[int, int, int, int],
    ) -> None:
        """One decoded bin: counts (N,), the prediction's float32 bytes, flags, its spike count, the
        decoder generation and the daemon's (recv, close, infer, publish) stamps in ns."""
        n = self._n
        if n >= self.max_bins:
            self.bins_not_recorded += 1
            return
        i = n % self.block
        if i == 0:
            self._counts.append(np.zeros((self.block, self.n_channels), np.int32))
            self._out.append(np.full((self.block, self.n_outputs), np.nan, np.float32))
            self._meta.append(np.zeros((self.block, 9), np.int64))
        self._counts[-1][i] = counts
        out = np.frombuffer(output, dtype=np.float32)
        d = min(out.shape[0], self.n_outputs)  # a swapped-in decoder with other outputs: the first D kept
        self._out[-1][i, :d] = out[:d]
        self._meta[-1][i] = (epoch, k, flags, n_spikes, generation, *stamps)
        self._n = n + 1

    def add_kinematics(self, epoch: int, first: int, values: np.ndarray) -> None:
        """KINEMATICS ``values`` (n, D) for bins ``first …`` of stream ``epoch`` (matched to rows at the end)."""
        if self._n < self.max_bins:
            self._kinematics.append((int(epoch), int(first), np.array(values, dtype=np.float32)))

    def add_version(self, generation: int, version: str) -> None:
        self._versions.setdefault(int(generation), str(version))

    def session(
        self, *, bin_ns: int, target: str, description: str = "rpnt serve session"
    ) -> DecodedSession | None:
        """The recorded rows as a :class:`~streaming.nwb_out.DecodedSession` (None when no bin was
        decoded).  The rig's KINEMATICS become the ``target`` label series when they cover every
        recorded bin (a series with gaps is no label; the rows then carry no behaviour)."""
        n = self._n
        if n == 0:
            return None
        counts = np.concatenate(self._counts)[:n]
        out = np.concatenate(self._out)[:n]
        meta = np.concatenate(self._meta)[:n]
        labels = {}
        kin = self._kinematics_rows(meta[:, _EPOCH], meta[:, _BIN])
        if kin is not None:
            labels[target] = kin
        stamps = meta[:, _RECV:]
        latency = {
            "parse": stamps[:, 1] - stamps[:, 0],
            "infer": stamps[:, 2] - stamps[:, 1],
            "publish": stamps[:, 3] - stamps[:, 2],
            "daemon": stamps[:, 3] - stamps[:, 0],
        }
        return DecodedSession(
            bin_ns=int(bin_ns),
            target=target,
            counts=counts,
            decoded=out,
            received=np.ones(n, bool),
            flags=meta[:, _FLAGS].copy(),
            n_spikes=meta[:, _NSPIKES].copy(),
            epoch=meta[:, _EPOCH].copy(),
            bin=meta[:, _BIN].copy(),
            generation=meta[:, _GEN].copy(),
            model_versions=dict(self._versions),
            latency_ns=latency,
            labels=labels,
            starting_time=float(meta[0, _BIN]) * bin_ns / 1e9,
            description=description,
        )

    def _kinematics_rows(self, epochs: np.ndarray, bins: np.ndarray) -> np.ndarray | None:
        """(T, D) the KINEMATICS of each recorded bin, or None unless every bin has them."""
        if not self._kinematics:
            return None
        D = self._kinematics[0][2].shape[1]
        row_of = {(int(e), int(b)): i for i, (e, b) in enumerate(zip(epochs, bins, strict=True))}
        out = np.full((epochs.shape[0], D), np.nan, np.float32)
        have = np.zeros(epochs.shape[0], bool)
        for epoch, first, values in self._kinematics:
            if values.shape[1] != D:
                return None
            for j in range(values.shape[0]):
                i = row_of.get((epoch, first + j))
                if i is not None:
                    out[i] = values[j]
                    have[i] = True
        return out if have.all() else None
