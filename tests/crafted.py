"""Hostile files for the upload tests, built byte by byte: zip bombs, lying zip entries and .npy
headers, an HDF5 file whose dataset declares far more than it stores."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIB = 1 << 20


@dataclass(frozen=True)
class Member:
    """One zip entry: its name, stored bytes (raw deflate or stored), CRC-32 and true size;
    ``declared`` overrides the uncompressed size written into the zip's headers (a lie)."""

    name: str
    data: bytes
    crc: int
    size: int
    method: int = 8  # deflate
    declared: int | None = None


def write_zip(path: Path, members: list[Member]) -> Path:
    """A plain (non-zip64) zip of ``members``: local headers, data, central directory, end record."""
    body, central = io.BytesIO(), io.BytesIO()
    for m in members:
        name = m.name.encode()
        size = m.size if m.declared is None else m.declared
        offset = body.tell()
        body.write(
            struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                20,
                0,
                m.method,
                0,
                0x21,
                m.crc,
                len(m.data),
                size,
                len(name),
                0,
            )
            + name
            + m.data
        )
        central.write(
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                20,
                20,
                0,
                m.method,
                0,
                0x21,
                m.crc,
                len(m.data),
                size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name
        )
    cd = central.getvalue()
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(cd), body.tell(), 0)
    path.write_bytes(body.getvalue() + cd + end)
    return path


def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def deflated(name: str, raw: bytes, **kw) -> Member:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return Member(name, c.compress(raw) + c.flush(), zlib.crc32(raw), len(raw), **kw)


def _zeros_stream(header: bytes, n_mib: int) -> tuple[bytes, int, int]:
    """(raw deflate, CRC-32, size) of ``header`` + ``n_mib`` MiB of zeros, at about 1000:1: the
    stream for one MiB, cut at a full flush (so it does not depend on what came before), repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(MIB)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    seg = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(header)
    for _ in range(n_mib):
        crc = zlib.crc32(zeros, crc)
    return head + seg * n_mib + c.flush(), crc, len(header) + n_mib * MIB


def zeros_bomb(name: str, n_mib: int) -> Member:
    """``name`` = a .npy of ``n_mib`` MiB of uint8 zeros that says so, deflated."""
    return Member(name, *_zeros_stream(npy_header((n_mib * MIB,), "uint8"), n_mib))


def session_members(T: int = 400, N: int = 8) -> list[Member]:
    """A plausible labelled session's small fields (bin_s and velocity), to sit beside a bomb."""
    t = np.arange(T) * 0.02
    vel = np.stack([np.sin(2 * np.pi * 0.3 * t), np.cos(2 * np.pi * 0.5 * t)], 1).astype(np.float32)
    return [deflated("bin_s.npy", npy(np.float64(0.02))), deflated("velocity.npy", npy(vel))]


def npz_zip_bomb(path: Path, n_mib: int) -> Path:
    """An honest zip bomb: ``counts`` really inflates to ``n_mib`` MiB, and says so."""
    return write_zip(path, [zeros_bomb("counts.npy", n_mib), *session_members()])


def npz_lying_header(path: Path, shape: tuple[int, ...], dtype: str = "int32") -> Path:
    """``counts``' .npy header declares ``shape`` but the entry holds 16 bytes of data (the zip's
    own sizes are true)."""
    return write_zip(path, [deflated("counts.npy", npy_header(shape, dtype) + bytes(16)), *session_members()])


def npz_lying_zip_size(path: Path, n_mib: int, *, declared_items: int = 4000) -> Path:
    """``counts`` inflates to ``n_mib`` MiB of zeros, but its .npy header and the zip's entry both
    declare only ``declared_items`` bytes of data: what a reader that trusts the stream (or checks
    the CRC only after inflating it all) would inflate in full."""
    header = npy_header((declared_items,), "uint8")
    data, crc, _ = _zeros_stream(header, n_mib)
    return write_zip(
        path, [Member("counts.npy", data, crc, len(header) + declared_items), *session_members()]
    )


def hdf5_bomb(
    path: Path, *, shape: tuple[int, ...] = (1 << 31,), where: str = "acquisition/bomb/data"
) -> Path:
    """An HDF5 file whose chunked, compressed float64 dataset declares ``shape`` but stores no chunk
    (reading it would fill it from the fill value): a few KB on disk."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset(where, shape=shape, dtype="f8", chunks=(1 << 16,), compression="gzip", fillvalue=0.0)
    return path
